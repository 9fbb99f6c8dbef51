"""Runs code on simulated CPU devices in a fresh Python process.

The pytest process has already initialised JAX with one CPU device, and the device count cannot
change after that; each multi-device check therefore runs in a subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` and `JAX_PLATFORMS=cpu`. The code prints one
JSON object as the last line of its standard output, which `run_on_devices` returns.

The subprocess compiles with `--xla_backend_optimization_level=0`: the test programs are tiny, the
numerics are the same IEEE fp32 (no fast-math either way), and compiling takes about 40% less time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["run_on_devices", "REPO_ROOT"]


def run_on_devices(code: str, num_devices: int = 8, timeout: int = 600, env: dict | None = None) -> dict:
    """Runs `code` (a Python script) with `num_devices` CPU devices; returns its last stdout line as JSON.

    Fails (AssertionError with the output tail) when the process exits non-zero or the last line is not
    JSON. `env` adds or overrides environment variables.
    """
    full_env = dict(os.environ)
    flags = [f for f in full_env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags = [f for f in flags if "xla_backend_optimization_level" not in f]
    full_env["XLA_FLAGS"] = " ".join(
        [*flags, f"--xla_force_host_platform_device_count={num_devices}", "--xla_backend_optimization_level=0"]
    )
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, full_env.get("PYTHONPATH")) if p)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )
    tail = (proc.stdout[-4000:] + "\n--- stderr ---\n" + proc.stderr[-8000:]).strip()
    assert proc.returncode == 0, f"subprocess on {num_devices} devices failed (exit {proc.returncode}):\n{tail}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"subprocess printed nothing:\n{tail}"
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise AssertionError(f"subprocess's last line is not JSON:\n{tail}") from None
