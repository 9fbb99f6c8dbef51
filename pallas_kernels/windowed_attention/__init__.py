"""Windowed (flash) attention: the public entry point, its custom VJP, padding and dispatch.

    out = windowed_attention(q, k, v, *, segment_ids=None, causal=False, window=None, scale=None)
    q (batch, seq, q_heads, head_dim); k, v (batch, seq, kv_heads, head_dim), GQA allowed;
    segment_ids (batch, seq) int32; window (left, right) in tokens -> (batch, seq, q_heads, head_dim)

The mask structures the model needs are all expressed with these arguments:
    decoder:          causal=True
    audio encoder:    segment_ids = window index of each token (block-diagonal windows of 104)
    vision encoder:   segment_ids = frame / image index of each patch
    Code2Wav:         causal=True, window=(71, 0)   (a sliding window of 72 tokens)

The wrapper pads the sequence to the kernels' blocks (padded keys are masked, padded queries
dropped) and, for Triton, the head dim to a power of two; it computes the per-block ranges of
masks.block_ranges and calls the forward kernel, saving the base-2 logsumexp for the backward
kernels (dq, dk/dv) of the same implementation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import choose_implementation, pad_axis, round_up
from pallas_kernels.windowed_attention import gpu as _gpu
from pallas_kernels.windowed_attention import tpu as _tpu
from pallas_kernels.windowed_attention.blocks import AttentionBlockSizes, default_block_sizes
from pallas_kernels.windowed_attention.masks import block_ranges
from pallas_kernels.windowed_attention.reference import (
    attention_mask,
    windowed_attention_reference,
)

__all__ = [
    "AttentionBlockSizes",
    "attention_mask",
    "default_block_sizes",
    "windowed_attention",
    "windowed_attention_reference",
]


@dataclasses.dataclass(frozen=True)
class _Config:
  implementation: str  # 'gpu' or 'tpu'
  kernel: _gpu.KernelConfig
  padded_len: int
  head_dim: int
  padded_head_dim: int


def windowed_attention(q, k, v, *, segment_ids=None, causal: bool = False, window=None,
                       scale: float | None = None, interpret: bool = False,
                       block_sizes: AttentionBlockSizes | None = None,
                       implementation: str | None = None):
  """Attention through the Pallas flash kernels (differentiable in q, k, v).

  Args:
    q: (batch, seq, q_heads, head_dim).
    k, v: (batch, seq, kv_heads, head_dim); q_heads % kv_heads == 0.
    segment_ids: optional (batch, seq) int32; attention only between equal ids.
    causal: keys j <= i only.
    window: optional (left, right): query i sees keys i - left <= j <= i + right (either may be
      None = unlimited). With causal, right is capped at 0.
    scale: logit scale (a Python number), default head_dim ** -0.5.
    interpret: run the kernels in Pallas interpret mode (works on CPU).
    block_sizes: kernel tiles; default per device kind (`blocks.py`), shrunk for short sequences.
    implementation: force 'gpu' (Triton), 'tpu' (Mosaic) or 'reference'; default by backend.

  Returns:
    (batch, seq, q_heads, head_dim) in q's dtype; a query that sees no key gets 0.
  """
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"expected q (B, S, Hq, D), k = v (B, S, Hkv, D); got {q.shape}, {k.shape},"
                     f" {v.shape}")
  batch, seq, q_heads, head_dim = q.shape
  if (k.shape[0], k.shape[1], k.shape[3]) != (batch, seq, head_dim):
    raise ValueError(f"q {q.shape} and k/v {k.shape} disagree on batch, seq or head_dim")
  if q_heads % k.shape[2]:
    raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={k.shape[2]}")
  if segment_ids is not None and segment_ids.shape != (batch, seq):
    raise ValueError(f"segment_ids must be (batch, seq) = {(batch, seq)}, got "
                     f"{segment_ids.shape}")
  window = None if window is None else tuple(None if w is None else int(w) for w in window)
  if window is not None and len(window) != 2:
    raise ValueError(f"window must be (left, right), got {window}")
  if scale is None:
    scale = head_dim ** -0.5
  impl = choose_implementation(implementation, interpret)
  if impl == "reference":
    return windowed_attention_reference(q, k, v, segment_ids=segment_ids, causal=causal,
                                        window=window, scale=scale)
  if seq == 0:
    return jnp.zeros(q.shape, q.dtype)

  blocks = (block_sizes or default_block_sizes(impl)).fitted(seq)
  padded_len = round_up(seq, blocks.max_block)
  backend = _tpu if impl == "tpu" else _gpu
  kernel_cfg = _gpu.KernelConfig(
      scale=float(scale), causal=bool(causal), window=window, q_len=seq,
      kv_len_mask=seq if padded_len > seq else None,
      block_q=blocks.block_q, block_k=blocks.block_k,
      block_q_bwd=blocks.block_q_bwd, block_k_bwd=blocks.block_k_bwd,
      num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=bool(interpret))
  cfg = _Config(impl, kernel_cfg, padded_len, head_dim, backend.padded_head_dim(head_dim))
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  return _attention_jit(q, k.astype(q.dtype), v.astype(q.dtype), segment_ids, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _attention_jit(q, k, v, segment_ids, cfg):
  return _attention(q, k, v, segment_ids, cfg)


def _pad(x, cfg: _Config):
  return pad_axis(pad_axis(x, 1, cfg.padded_len), 3, cfg.padded_head_dim)


def _ranges(segment_ids, cfg: _Config, block_q: int, block_k: int, transpose: bool):
  kc = cfg.kernel
  lo, hi, trips = block_ranges(
      segment_ids, causal=kc.causal, window=kc.window, padded_len=cfg.padded_len,
      q_len=kc.q_len, kv_len=kc.q_len, block_q=block_q, block_k=block_k, transpose=transpose)
  batch = 1 if segment_ids is None else segment_ids.shape[0]
  return (lo, hi), trips, batch


def _broadcast(ranges, batch):
  return tuple(jnp.broadcast_to(r, (batch, r.shape[-1])) for r in ranges)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, cfg):
  return _attention_fwd(q, k, v, segment_ids, cfg)[0]


def _attention_fwd(q, k, v, segment_ids, cfg: _Config):
  kc = cfg.kernel
  batch = q.shape[0]
  qp, kp, vp = _pad(q, cfg), _pad(k, cfg), _pad(v, cfg)
  segp = None
  if segment_ids is not None:
    # Edge padding: padded keys are masked by position anyway; repeating the last id keeps
    # the per-block min/max (and so the skipped blocks) of the last block unchanged.
    segp = jnp.pad(segment_ids, ((0, 0), (0, cfg.padded_len - kc.q_len)), mode="edge")
  ranges, trips, _ = _ranges(segp, cfg, kc.block_q, kc.block_k, transpose=False)
  ranges = _broadcast(ranges, batch)
  if cfg.implementation == "tpu":
    o, lse = _tpu.forward(qp, kp, vp, segp, ranges, cfg=kc, max_trips=trips)
  else:
    o, lse = _gpu.forward(qp, kp, vp, segp, ranges, cfg=kc)
  out = o[:, :kc.q_len, :, :cfg.head_dim]
  return out, (qp, kp, vp, segp, o, lse)


def _attention_bwd(cfg: _Config, residuals, dout):
  kc = cfg.kernel
  qp, kp, vp, segp, o, lse = residuals
  batch = qp.shape[0]
  dop = _pad(dout.astype(o.dtype), cfg)
  q_ranges, trips, _ = _ranges(segp, cfg, kc.block_q_bwd, kc.block_k_bwd, transpose=False)
  kv_ranges, trips_t, _ = _ranges(segp, cfg, kc.block_q_bwd, kc.block_k_bwd, transpose=True)
  q_ranges, kv_ranges = _broadcast(q_ranges, batch), _broadcast(kv_ranges, batch)
  if cfg.implementation == "tpu":
    dq, dk, dv = _tpu.backward(qp, kp, vp, segp, o, lse, dop, q_ranges, kv_ranges, cfg=kc,
                               max_trips=trips, max_trips_t=trips_t)
  else:
    dq, dk, dv = _gpu.backward(qp, kp, vp, segp, o, lse, dop, q_ranges, kv_ranges, cfg=kc)
  unpad = lambda x: x[:, :kc.q_len, :, :cfg.head_dim]
  return unpad(dq), unpad(dk), unpad(dv), None


_attention.defvjp(_attention_fwd, _attention_bwd)
