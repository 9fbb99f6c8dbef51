"""Flash attention kernels for GPUs (Pallas, Triton backend): forward, dq, and dk/dv.

Layout (B = batch, P = padded sequence, D = head dim padded to a power of two, see
`padded_head_dim`): q, k, v, o, do are (B, P, heads, D) as the model holds them (no transposes);
the log-sum-exp `lse` and `delta` = rowsum(o * do) are (B, q_heads, P), fp32.

* forward, grid (q blocks, B, q_heads): one program owns a q block, keeps it in registers and
  runs the online softmax over the kv blocks [lo, hi) of its row (masks.block_ranges); fully
  masked blocks outside that range are never loaded. Writes o and the base-2 lse.
* dq, grid (q blocks, B, q_heads): same walk; recomputes p = exp2(s - lse) and accumulates
  dq = scale * sum_k (p * (do v^T - delta)) k.
* dk/dv, grid (kv blocks, B, kv_heads): one program owns a kv block and walks the q blocks that
  can see it, for each of the q heads sharing this kv head (GQA), so dk/dv need no atomics and no
  per-q-head copies. q/do/lse/delta are whole-array refs indexed by head in the kernel.

Scores are fp32 (dots accumulate in fp32) and use base 2: s2 = (q . k) * scale * log2(e), so
the softmax is exp2(s2 - max) — the native GPU exponent — and lse is stored in base 2.
A query with no visible key ends with l = 0: its output is 0 and its lse is stored as 0; its
scores are all -inf, so p = exp2(-inf - 0) = 0 in the backward and nothing is NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import SQUEEZED, next_power_of_2, whole_array_spec
from pallas_kernels.windowed_attention.masks import element_mask

LOG2E = math.log2(math.e)
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static parameters of one attention call (shared with tpu.py)."""

  scale: float
  causal: bool
  window: tuple | None
  q_len: int  # real sequence length
  kv_len_mask: int | None  # real key count when keys were padded, else None
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int | None
  num_stages: int
  interpret: bool


def padded_head_dim(head_dim: int) -> int:
  """Triton tensors need power-of-two shapes (and dots >= 16): 72 -> 128, 64 -> 64."""
  return max(16, next_power_of_2(head_dim))


def _params(cfg: KernelConfig, head_dim: int):
  warps = cfg.num_warps if cfg.num_warps is not None else (4 if head_dim <= 64 else 8)
  return plgpu.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def _scores(q, k, q0, k0, cfg, q_seg, k_seg):
  """Masked base-2 scores (bq, bk) of a q block against a k block."""
  s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * (cfg.scale * LOG2E)
  mask = element_mask(q0, k0, s.shape, causal=cfg.causal, window=cfg.window,
                      kv_len=cfg.kv_len_mask, q_segment_ids=q_seg, k_segment_ids=k_seg)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  return s


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg: KernelConfig, has_segments: bool):
  if has_segments:
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, lo_ref, hi_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, lo_ref, hi_ref, o_ref, lse_ref = refs
    qseg_ref = kseg_ref = None
  bq, bk = cfg.block_q, cfg.block_k
  i = pl.program_id(0)
  q0 = i * bq
  q = q_ref[...]
  q_seg = qseg_ref[...][:, None] if has_segments else None

  def body(kb, carry):
    acc, m, l = carry
    k0 = pl.multiple_of(kb * bk, bk)
    k = k_ref[pl.ds(k0, bk), :]
    v = v_ref[pl.ds(k0, bk), :]
    k_seg = kseg_ref[pl.ds(k0, bk)][None, :] if has_segments else None
    s = _scores(q, k, q0, k0, cfg, q_seg, k_seg)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # While a row has seen no visible key its max is -inf; shift by 0 instead so that
    # exp2(-inf - (-inf)) = nan never happens.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + lax.dot_general(p.astype(v.dtype), v, _NN,
                                                 preferred_element_type=jnp.float32)
    return acc, m_new, l

  init = (jnp.zeros((bq, q.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(lo_ref[i], hi_ref[i], body, init)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(jnp.where(empty, 1.0, l)))


def forward(q, k, v, segment_ids, ranges, *, cfg: KernelConfig):
  """q (B, P, Hq, D), k/v (B, P, Hkv, D), segment_ids (B, P) or None, ranges (lo, hi) each
  (B, P // block_q) -> o (B, P, Hq, D), lse (B, Hq, P) fp32 base 2."""
  batch, plen, q_heads, d = q.shape
  rep = q_heads // k.shape[2]
  bq = cfg.block_q
  nq = plen // bq
  has_segments = segment_ids is not None
  q_spec = pl.BlockSpec((SQUEEZED, bq, SQUEEZED, d), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((SQUEEZED, plen, SQUEEZED, d), lambda i, b, h: (b, 0, h // rep, 0))
  range_spec = pl.BlockSpec((SQUEEZED, nq), lambda i, b, h: (b, 0))
  in_specs = [q_spec, kv_spec, kv_spec]
  args = [q, k, v]
  if has_segments:
    in_specs += [pl.BlockSpec((SQUEEZED, bq), lambda i, b, h: (b, i)),
                 pl.BlockSpec((SQUEEZED, plen), lambda i, b, h: (b, 0))]
    args += [segment_ids, segment_ids]
  in_specs += [range_spec, range_spec]
  args += list(ranges)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, has_segments=has_segments),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, q_heads, plen), jnp.float32)],
      grid=(nq, batch, q_heads),
      in_specs=in_specs,
      out_specs=[q_spec, pl.BlockSpec((SQUEEZED, SQUEEZED, bq), lambda i, b, h: (b, h, i))],
      compiler_params=_params(cfg, d),
      interpret=cfg.interpret,
      name="windowed_attention_fwd_gpu",
  )(*args)


# ----------------------------------------------------------------------------- dq


def _dq_kernel(*refs, cfg: KernelConfig, has_segments: bool):
  if has_segments:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, lo_ref, hi_ref,
     dq_ref) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, dq_ref = refs
    qseg_ref = kseg_ref = None
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  i = pl.program_id(0)
  q0 = i * bq
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...][:, None]
  delta = delta_ref[...][:, None]
  q_seg = qseg_ref[...][:, None] if has_segments else None

  def body(kb, dq):
    k0 = pl.multiple_of(kb * bk, bk)
    k = k_ref[pl.ds(k0, bk), :]
    v = v_ref[pl.ds(k0, bk), :]
    k_seg = kseg_ref[pl.ds(k0, bk)][None, :] if has_segments else None
    p = jnp.exp2(_scores(q, k, q0, k0, cfg, q_seg, k_seg) - lse)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    return dq + lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)

  dq = lax.fori_loop(lo_ref[i], hi_ref[i], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- dk, dv


def _dkv_kernel(*refs, cfg: KernelConfig, has_segments: bool, rep: int):
  if has_segments:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, lo_ref, hi_ref,
     dk_ref, dv_ref) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, dk_ref, dv_ref = refs
    qseg_ref = kseg_ref = None
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  j = pl.program_id(0)
  b = pl.program_id(1)
  kv_head = pl.program_id(2)
  k0 = j * bk
  k = k_ref[...]
  v = v_ref[...]
  k_seg = kseg_ref[...][None, :] if has_segments else None
  lo = lo_ref[j]
  hi = hi_ref[j]

  def head_body(r, carry):
    h = kv_head * rep + r

    def body(qb, carry):
      dk, dv = carry
      q0 = pl.multiple_of(qb * bq, bq)
      q = q_ref[b, pl.ds(q0, bq), h, :]
      do = do_ref[b, pl.ds(q0, bq), h, :]
      lse = lse_ref[b, h, pl.ds(q0, bq)][:, None]
      delta = delta_ref[b, h, pl.ds(q0, bq)][:, None]
      q_seg = qseg_ref[pl.ds(q0, bq)][:, None] if has_segments else None
      p = jnp.exp2(_scores(q, k, q0, k0, cfg, q_seg, k_seg) - lse)
      dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
      dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
      ds = p * (dp - delta)
      dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
      return dk, dv

    return lax.fori_loop(lo, hi, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, rep, head_body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, o, lse, do, q_ranges, kv_ranges, *, cfg: KernelConfig):
  """Gradients of `forward`. q_ranges: kv-block range per q block (block_q_bwd x block_k_bwd
  tiling); kv_ranges: q-block range per kv block. Returns dq, dk, dv (padded shapes)."""
  batch, plen, q_heads, d = q.shape
  kv_heads = k.shape[2]
  rep = q_heads // kv_heads
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  nq, nk = plen // bq, plen // bk
  has_segments = segment_ids is not None
  # delta_i = sum_d o_id * do_id: one fused elementwise+reduce in XLA, fp32.
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
  params = _params(cfg, d)

  # dq: grid over q blocks.
  q_spec = pl.BlockSpec((SQUEEZED, bq, SQUEEZED, d), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((SQUEEZED, plen, SQUEEZED, d), lambda i, b, h: (b, 0, h // rep, 0))
  row_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, bq), lambda i, b, h: (b, h, i))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = [q, k, v, do, lse, delta]
  if has_segments:
    in_specs += [pl.BlockSpec((SQUEEZED, bq), lambda i, b, h: (b, i)),
                 pl.BlockSpec((SQUEEZED, plen), lambda i, b, h: (b, 0))]
    args += [segment_ids, segment_ids]
  range_spec = pl.BlockSpec((SQUEEZED, nq), lambda i, b, h: (b, 0))
  in_specs += [range_spec, range_spec]
  args += list(q_ranges)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, has_segments=has_segments),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(nq, batch, q_heads),
      in_specs=in_specs,
      out_specs=q_spec,
      compiler_params=params,
      interpret=cfg.interpret,
      name="windowed_attention_dq_gpu",
  )(*args)

  # dk, dv: grid over kv blocks and kv heads; q-side operands are whole arrays.
  kv_block = pl.BlockSpec((SQUEEZED, bk, SQUEEZED, d), lambda j, b, g: (b, j, g, 0))
  in_specs = [whole_array_spec(q.shape), kv_block, kv_block, whole_array_spec(do.shape),
              whole_array_spec(lse.shape), whole_array_spec(delta.shape)]
  args = [q, k, v, do, lse, delta]
  if has_segments:
    in_specs += [pl.BlockSpec((SQUEEZED, plen), lambda j, b, g: (b, 0)),
                 pl.BlockSpec((SQUEEZED, bk), lambda j, b, g: (b, j))]
    args += [segment_ids, segment_ids]
  range_spec = pl.BlockSpec((SQUEEZED, nk), lambda j, b, g: (b, 0))
  in_specs += [range_spec, range_spec]
  args += list(kv_ranges)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, has_segments=has_segments, rep=rep),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(nk, batch, kv_heads),
      in_specs=in_specs,
      out_specs=[kv_block, kv_block],
      compiler_params=params,
      interpret=cfg.interpret,
      name="windowed_attention_dkv_gpu",
  )(*args)
  return dq, dk, dv
