"""Training observability: per-step metrics to stdout, a JSONL log and TensorBoard; throughput and MFU.

    logger = MetricsLogger("runs/x", tensorboard=True)
    logger.log(step, {"loss": 2.3, "lr": 1e-4, ...})
    logger.close()

TensorBoard goes through `tensorboardX` (imported lazily); without it the logger says once, clearly,
that TensorBoard logging is off and how to get it, and keeps the other sinks.

MFU (model FLOPs utilisation) is estimated as 6 * active parameters * tokens / (seconds * peak FLOP/s):
the forward + backward matrix products of the text decoders that run per token (MoE: the router,
attention and `top_k` of the experts per layer; the lm_head), not attention's sequence-length term
nor the encoders. It is an estimate for comparing runs, stated as such in the logs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np

__all__ = ["MetricsLogger", "active_params", "train_flops_per_token", "peak_flops_per_device", "mfu",
           "StepTimer", "format_metrics"]

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
_PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("h800", 989e12), ("a100", 312e12), ("l40s", 362e12),
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v4", 275e12),
)


def peak_flops_per_device(device=None) -> float | None:
    """Peak bf16 FLOP/s of `device` (default: the first JAX device) from its kind, None when unknown (CPU)."""
    import jax  # noqa: PLC0415

    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "").lower()
    for name, flops in _PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def _decoder_active(text, with_head: bool) -> int:
    h, heads, kv, hd = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim
    attn = h * heads * hd * 2 + h * kv * hd * 2
    experts = getattr(text, "num_experts", 0) or 0
    if experts:
        mlp = h * experts + getattr(text, "num_experts_per_tok", 0) * 3 * h * text.moe_intermediate_size
        shared = getattr(text, "shared_expert_intermediate_size", 0) or 0
        mlp += 3 * h * shared + (h if shared else 0)
    else:
        mlp = 3 * h * text.intermediate_size
    total = text.num_hidden_layers * (attn + mlp)
    if with_head:
        total += h * text.vocab_size
    return int(total)


def active_params(model_config, *, talker: bool = False) -> int:
    """Parameters touched per token by the thinker's text decoder and lm_head (plus the talker's decoder,
    codec head and code predictor when `talker`); embeddings (a lookup) excluded."""
    total = _decoder_active(model_config.thinker_config.text_config, with_head=True)
    if talker and model_config.talker_config is not None:
        tc = model_config.talker_config
        total += _decoder_active(tc.text_config, with_head=True)
        cp = tc.code_predictor_config
        total += _decoder_active(cp, with_head=False) + (tc.num_code_groups - 1) * cp.hidden_size * cp.vocab_size
    return total


def train_flops_per_token(model_config, *, talker: bool = False) -> float:
    return 6.0 * active_params(model_config, talker=talker)


def mfu(flops_per_token: float, tokens: float, seconds: float, num_devices: int, peak_per_device: float | None):
    """Model FLOPs utilisation in [0, 1], or None without a peak figure."""
    if not peak_per_device or seconds <= 0:
        return None
    return flops_per_token * tokens / (seconds * num_devices * peak_per_device)


class StepTimer:
    """Wall time between consecutive `lap()` calls (the first lap includes compilation; flagged)."""

    def __init__(self):
        self._last = time.perf_counter()
        self.laps = 0

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self.laps += 1
        return dt

    def reset(self):
        self._last = time.perf_counter()


def _scalar(v):
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    arr = np.asarray(v)
    if arr.size == 1:
        x = arr.reshape(()).item()
        return x
    return arr.tolist()


def format_metrics(step: int, metrics: Mapping[str, Any]) -> str:
    parts = [f"step {step}"]
    for key, value in metrics.items():
        if isinstance(value, float):
            if key == "lr":
                parts.append(f"{key} {value:.3e}")
            elif key in ("tokens_per_s",):
                parts.append(f"{key} {value:,.0f}")
            elif key == "mfu":
                parts.append(f"{key} {100 * value:.1f}%")
            else:
                parts.append(f"{key} {value:.4g}")
        elif value is not None:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes each logged step to stdout (`stream`), `<directory>/metrics.jsonl` and TensorBoard
    (`<directory>/tensorboard`). directory None: stdout only. Only process 0 of a multi-host job should log."""

    def __init__(self, directory: str | None = None, *, jsonl: bool = True, tensorboard: bool = True,
                 stdout: bool = True, stream=None, enabled: bool = True):
        self.directory = directory
        self.enabled = enabled
        self.stdout = stdout
        self.stream = stream
        self._jsonl = None
        self._tb = None
        self.tensorboard_error: str | None = None
        if not enabled:
            return
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            if jsonl:
                self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", buffering=1)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter  # noqa: PLC0415
                except ImportError as e:
                    self.tensorboard_error = (
                        f"TensorBoard logging is off: tensorboardX is not installed ({e}); "
                        "`pip install tensorboardX==2.6.4` to get it (stdout and metrics.jsonl are still written)"
                    )
                    self._print(self.tensorboard_error)
                else:
                    self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def _print(self, text: str) -> None:
        if not self.stdout:
            return
        stream = self.stream or sys.stdout
        try:  # keep the line clear of a tqdm progress bar when one is active
            from tqdm import tqdm  # noqa: PLC0415

            tqdm.write(text, file=stream)
        except ImportError:
            print(text, file=stream, flush=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Logs one step; returns the metrics as plain Python values."""
        plain = {k: _scalar(v) for k, v in metrics.items()}
        if not self.enabled:
            return plain
        self._print(format_metrics(step, plain))
        if self._jsonl is not None:
            record = {"step": int(step), "time": time.time()}
            record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in plain.items()})
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in plain.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, int(step))
        return plain

    def text(self, message: str) -> None:
        """A line of run information (stdout only)."""
        if self.enabled:
            self._print(message)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
