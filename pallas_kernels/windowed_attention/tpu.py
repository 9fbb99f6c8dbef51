"""Flash attention kernels for TPUs (Pallas, Mosaic backend): forward, dq, and dk/dv.

Same algorithm and numerics as `gpu.py` (base-2 online softmax, fp32 scores, lse saved for the
backward, empty rows -> 0), organised for the TPU pipeline:

* Layout (B, heads, P, D): Mosaic wants the last two block dims to be (sublane, lane) tiles, so
  the wrapper here transposes (B, P, heads, D) in and out. D is not padded (a block may span
  the whole head dim). lse and delta are (B, q_heads, P, 1) so a block is a (rows, 1) column
  that broadcasts against the (rows, cols) scores without a relayout; for the same reason the
  query segment ids are a (B, P, 1) column and the key segment ids a (B, 1, P) row.
* The kv loop is the innermost grid axis, sequential ("arbitrary") with fp32 VMEM scratch
  carried across it. The per-row-block ranges [lo, hi) from masks.block_ranges are
  scalar-prefetched into SMEM; grid step t of a row block maps to column block lo + t. The grid
  has a static trip count (the largest range); steps past a row's own range point at the same
  block as its last real step (so the pipeline fetches nothing) and skip the compute.
* dk/dv: grid (B, kv_heads, kv blocks, rep * q trips): the innermost axis walks every q head
  of the GQA group and, for each, the q blocks that can see this kv block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import SQUEEZED
from pallas_kernels.windowed_attention.gpu import KernelConfig
from pallas_kernels.windowed_attention.masks import element_mask

LOG2E = math.log2(math.e)
_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


def padded_head_dim(head_dim: int) -> int:
  return head_dim  # blocks span the whole head dim; Mosaic pads internally


def _compiler_params(semantics):
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=semantics)


def _col_block(lo_ref, hi_ref, row, t):
  """Column block of step t of a row's range; steps past the range repeat its last block."""
  lo, hi = lo_ref[row], hi_ref[row]
  return jnp.maximum(jnp.minimum(lo + t, hi - 1), 0)


def _scores(q, k, q0, k0, cfg, q_seg, k_seg):
  s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * (cfg.scale * LOG2E)
  mask = element_mask(q0, k0, s.shape, causal=cfg.causal, window=cfg.window,
                      kv_len=cfg.kv_len_mask, q_segment_ids=q_seg, k_segment_ids=k_seg)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  return s


def _split_refs(refs, has_segments, n_main):
  main = refs[:n_main]
  rest = refs[n_main:]
  if has_segments:
    return main, rest[0], rest[1], rest[2:]
  return main, None, None, rest


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(lo_ref, hi_ref, *refs, cfg: KernelConfig, has_segments: bool, nq: int):
  (q_ref, k_ref, v_ref), qseg_ref, kseg_ref, rest = _split_refs(refs, has_segments, 3)
  o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nq + i

  @pl.when(t == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(t < hi_ref[row] - lo_ref[row])
  def _step():
    k0 = (lo_ref[row] + t) * cfg.block_k
    q_seg = qseg_ref[...] if has_segments else None
    k_seg = kseg_ref[...] if has_segments else None
    s = _scores(q_ref[...], k_ref[...], i * cfg.block_q, k0, cfg, q_seg, k_seg)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no exp2(-inf - -inf)
    alpha = jnp.exp2(m_prev - m_safe)
    p = jnp.exp2(s - m_safe)
    l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_ref[...] = acc_ref[...] * alpha + lax.dot_general(
        p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    m_ref[...] = m_new

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    l = l_ref[...]
    empty = l == 0.0
    o_ref[...] = (acc_ref[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m_ref[...] + jnp.log2(jnp.where(empty, 1.0, l)))


def _to_bhsd(x):
  return jnp.transpose(x, (0, 2, 1, 3))


def forward(q, k, v, segment_ids, ranges, *, cfg: KernelConfig, max_trips: int):
  """q (B, P, Hq, D), k/v (B, P, Hkv, D) -> o (B, P, Hq, D), lse (B, Hq, P, 1) fp32 base 2."""
  batch, plen, q_heads, d = q.shape
  rep = q_heads // k.shape[2]
  bq, bk = cfg.block_q, cfg.block_k
  nq = plen // bq
  has_segments = segment_ids is not None
  lo, hi = (r.reshape(-1) for r in ranges)

  def q_map(b, h, i, t, lo_ref, hi_ref):
    return b, h, i, 0

  def kv_map(b, h, i, t, lo_ref, hi_ref):
    return b, lax.div(h, rep), _col_block(lo_ref, hi_ref, b * nq + i, t), 0

  in_specs = [pl.BlockSpec((SQUEEZED, SQUEEZED, bq, d), q_map),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bk, d), kv_map),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bk, d), kv_map)]
  args = [_to_bhsd(q), _to_bhsd(k), _to_bhsd(v)]
  if has_segments:
    in_specs += [
        pl.BlockSpec((SQUEEZED, bq, 1), lambda b, h, i, t, lo_ref, hi_ref: (b, i, 0)),
        pl.BlockSpec((SQUEEZED, 1, bk), lambda b, h, i, t, lo_ref, hi_ref:
                     (b, 0, _col_block(lo_ref, hi_ref, b * nq + i, t))),
    ]
    args += [segment_ids[:, :, None], segment_ids[:, None, :]]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, q_heads, nq, max_trips),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((SQUEEZED, SQUEEZED, bq, d), q_map),
                 pl.BlockSpec((SQUEEZED, SQUEEZED, bq, 1), q_map)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
  )
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, has_segments=has_segments, nq=nq),
      out_shape=[jax.ShapeDtypeStruct((batch, q_heads, plen, d), q.dtype),
                 jax.ShapeDtypeStruct((batch, q_heads, plen, 1), jnp.float32)],
      grid_spec=grid_spec,
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="windowed_attention_fwd_tpu",
  )(lo, hi, *args)
  return _to_bhsd(o), lse


# ----------------------------------------------------------------------------- dq


def _dq_kernel(lo_ref, hi_ref, *refs, cfg: KernelConfig, has_segments: bool, nq: int):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kseg_ref, rest = _split_refs(
      refs, has_segments, 6)
  dq_ref, acc_ref = rest
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nq + i

  @pl.when(t == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(t < hi_ref[row] - lo_ref[row])
  def _step():
    k0 = (lo_ref[row] + t) * cfg.block_k_bwd
    q_seg = qseg_ref[...] if has_segments else None
    k_seg = kseg_ref[...] if has_segments else None
    k = k_ref[...]
    s = _scores(q_ref[...], k, i * cfg.block_q_bwd, k0, cfg, q_seg, k_seg)
    p = jnp.exp2(s - lse_ref[...])
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    acc_ref[...] += lax.dot_general(ds.astype(k.dtype), k, _NN,
                                    preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- dk, dv


def _dkv_kernel(lo_ref, hi_ref, *refs, cfg: KernelConfig, has_segments: bool, nk: int,
                q_trips: int):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kseg_ref, rest = _split_refs(
      refs, has_segments, 6)
  dk_ref, dv_ref, dk_acc, dv_acc = rest
  b, j, s_idx = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nk + j
  t = lax.rem(s_idx, q_trips)

  @pl.when(s_idx == 0)
  def _init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  @pl.when(t < hi_ref[row] - lo_ref[row])
  def _step():
    q0 = (lo_ref[row] + t) * cfg.block_q_bwd
    q_seg = qseg_ref[...] if has_segments else None
    k_seg = kseg_ref[...] if has_segments else None
    q = q_ref[...]
    do = do_ref[...]
    s = _scores(q, k_ref[...], q0, j * cfg.block_k_bwd, cfg, q_seg, k_seg)
    p = jnp.exp2(s - lse_ref[...])
    dv_acc[...] += lax.dot_general(p.T.astype(do.dtype), do, _NN,
                                   preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dk_acc[...] += lax.dot_general(ds.T.astype(q.dtype), q, _NN,
                                   preferred_element_type=jnp.float32)

  @pl.when(s_idx == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, o, lse, do, q_ranges, kv_ranges, *, cfg: KernelConfig,
             max_trips: int, max_trips_t: int):
  """Gradients of `forward` (inputs in (B, P, heads, D); lse as returned by forward)."""
  batch, plen, q_heads, d = q.shape
  kv_heads = k.shape[2]
  rep = q_heads // kv_heads
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  nq, nk = plen // bq, plen // bk
  has_segments = segment_ids is not None
  qt, kt, vt, dot_ = _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), _to_bhsd(do)
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))[..., None]
  seg_args = [] if not has_segments else [segment_ids[:, :, None], segment_ids[:, None, :]]

  # dq: like the forward, grid (B, Hq, q blocks, kv trips).
  lo, hi = (r.reshape(-1) for r in q_ranges)

  def q_map(b, h, i, t, lo_ref, hi_ref):
    return b, h, i, 0

  def kv_map(b, h, i, t, lo_ref, hi_ref):
    return b, lax.div(h, rep), _col_block(lo_ref, hi_ref, b * nq + i, t), 0

  in_specs = [pl.BlockSpec((SQUEEZED, SQUEEZED, bq, d), q_map),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bk, d), kv_map),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bk, d), kv_map),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bq, d), q_map),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bq, 1), q_map),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bq, 1), q_map)]
  if has_segments:
    in_specs += [
        pl.BlockSpec((SQUEEZED, bq, 1), lambda b, h, i, t, lo_ref, hi_ref: (b, i, 0)),
        pl.BlockSpec((SQUEEZED, 1, bk), lambda b, h, i, t, lo_ref, hi_ref:
                     (b, 0, _col_block(lo_ref, hi_ref, b * nq + i, t))),
    ]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, has_segments=has_segments, nq=nq),
      out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, q_heads, nq, max_trips),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((SQUEEZED, SQUEEZED, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      ),
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="windowed_attention_dq_tpu",
  )(lo, hi, qt, kt, vt, dot_, lse, delta, *seg_args)

  # dk, dv: grid (B, Hkv, kv blocks, rep * q trips).
  lo, hi = (r.reshape(-1) for r in kv_ranges)
  q_trips = max_trips_t

  def head(g, s_idx):
    return g * rep + lax.div(s_idx, q_trips)

  def q_block(b, j, s_idx, lo_ref, hi_ref):
    return _col_block(lo_ref, hi_ref, b * nk + j, lax.rem(s_idx, q_trips))

  def qside_map(b, g, j, s_idx, lo_ref, hi_ref):
    return b, head(g, s_idx), q_block(b, j, s_idx, lo_ref, hi_ref), 0

  def kv_map_t(b, g, j, s_idx, lo_ref, hi_ref):
    return b, g, j, 0

  in_specs = [pl.BlockSpec((SQUEEZED, SQUEEZED, bq, d), qside_map),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bk, d), kv_map_t),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bk, d), kv_map_t),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bq, d), qside_map),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bq, 1), qside_map),
              pl.BlockSpec((SQUEEZED, SQUEEZED, bq, 1), qside_map)]
  if has_segments:
    in_specs += [
        pl.BlockSpec((SQUEEZED, bq, 1), lambda b, g, j, s_idx, lo_ref, hi_ref:
                     (b, q_block(b, j, s_idx, lo_ref, hi_ref), 0)),
        pl.BlockSpec((SQUEEZED, 1, bk), lambda b, g, j, s_idx, lo_ref, hi_ref: (b, 0, j)),
    ]
  kv_out = pl.BlockSpec((SQUEEZED, SQUEEZED, bk, d), kv_map_t)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, has_segments=has_segments, nk=nk,
                        q_trips=q_trips),
      out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, kv_heads, nk, rep * q_trips),
          in_specs=in_specs,
          out_specs=[kv_out, kv_out],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      ),
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="windowed_attention_dkv_tpu",
  )(lo, hi, qt, kt, vt, dot_, lse, delta, *seg_args)
  return _to_bhsd(dq), _to_bhsd(dk), _to_bhsd(dv)
