"""`python train.py` end to end on a tiny synthetic manifest, as a user runs it.

One uninterrupted run of 6 steps and one run of 4 steps resumed to 6: both write metrics.jsonl,
TensorBoard events, checkpoints and an export; the resumed steps' losses equal the uninterrupted
run's (exact resume: optimizer state, step counter and data position restored); `infer.py --ckpt`
answers from the export. Bad configuration keys fail before any work, naming the valid keys.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METRICS = ("loss", "ce_loss", "aux_loss", "grad_norm", "lr", "tokens", "tokens_per_s", "step_time")


def _run(args, cwd, timeout=900):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT))
    return proc


def _read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@functools.lru_cache(maxsize=None)
def _workspace(root: str):
    """(config path, data dir) of a 24-example synthetic task and a 4-row tiny-preset config."""
    from omni_jax.training.synthetic import write_synthetic_task

    data = os.path.join(root, "data")
    write_synthetic_task(data, num_train=24, num_eval=2, seed=0)
    cfg = {
        "model": {"name": "tiny"},
        "runtime": {"dtype": "float32", "param_dtype": "float32"},
        "data": {"manifest": os.path.join(data, "train.jsonl"), "tokenizer": data, "batch_size": 4,
                 "seq_buckets": [64]},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "total_steps": 6},  # the schedule of both runs
        "max_steps": 6,
        "checkpoint": {"save_every": 2, "keep": 2},
        "log": {"every": 1, "progress_bar": False},
    }
    path = os.path.join(root, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path, data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_cli"))
    config, data = _workspace(root)
    full = _run(["--config", config, f"checkpoint.directory={root}/full"], root)
    part = _run(["--config", config, f"checkpoint.directory={root}/resumed", "max_steps=4"], root)
    resumed = _run(["--config", config, f"checkpoint.directory={root}/resumed"], root) if part.returncode == 0 else None
    return {"root": root, "data": data, "full": full, "part": part, "resumed": resumed}


def _ok(proc):
    assert proc is not None and proc.returncode == 0, (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]) if proc else ""


def test_run_writes_logs_checkpoints_and_export(runs):
    _ok(runs["full"])
    run_dir = os.path.join(runs["root"], "full")
    records = _read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert all(k in r for k in METRICS), sorted(r)
    assert records[0]["includes_compile"] is True
    assert "step 6 |" in runs["full"].stdout and "loss" in runs["full"].stdout
    events = os.listdir(os.path.join(run_dir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints")), key=int)[-2:] == ["4", "6"]
    export = os.path.join(run_dir, "export")
    assert {"config.json", "params", "tokenizer.json"} <= set(os.listdir(export))
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert yaml.safe_load(f)["max_steps"] == 6


def test_resumed_run_continues_exactly(runs):
    _ok(runs["part"])
    _ok(runs["resumed"])
    assert "resumed from step 4" in runs["resumed"].stdout
    full = {r["step"]: r for r in _read_metrics(os.path.join(runs["root"], "full"))}
    resumed = {r["step"]: r for r in _read_metrics(os.path.join(runs["root"], "resumed"))}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        for key in ("loss", "ce_loss", "aux_loss", "grad_norm", "lr", "tokens"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=0), (step, key)


def test_infer_answers_from_the_export(runs):
    _ok(runs["full"])
    export = os.path.join(runs["root"], "full", "export")
    out = os.path.join(runs["root"], "infer_out")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "infer.py"), "--ckpt", export, "--requests",
         os.path.join(runs["data"], "eval.jsonl"), "--out", out, "--no-audio", "--greedy", "--max-new-tokens", "4"],
        cwd=runs["root"], capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(os.path.join(out, "results.jsonl")) as f:
        results = [json.loads(line) for line in f]
    assert len(results) == 2 and all("text" in r and len(r["generated_ids"]) >= 1 for r in results)


def test_unknown_config_key_is_an_error_naming_the_valid_ones(tmp_path):
    proc = _run(["optim.learning_rate=1e-3"], str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'learning_rate' in optim" in proc.stderr and "valid keys: lr, b1" in proc.stderr
