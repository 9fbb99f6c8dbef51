"""Grouped (per-expert) matmul: the public entry point, its gradients, and the dispatch.

    out = grouped_matmul(lhs, rhs, group_sizes)
    lhs (rows, k) sorted by group; rhs (groups, k, n); group_sizes (groups,) int32 summing to
    <= rows (rows past the sum are padding and produce 0) -> (rows, n)

Gradients (custom_vjp, both through the kernels):
    dlhs = grouped_matmul(dout, rhs^T)      (the forward kernel reading rhs transposed in place)
    drhs[g] = lhs_g^T @ dout_g              (the transposed kernel) -> (groups, k, n)

The wrapper pads rows/k/n up to the tiles (padding rows are owned by a padding group, so they
cost at most one tile of work and come back as zeros), builds the visit metadata, calls the
kernel of the chosen implementation and slices the padding off.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import choose_implementation, pad_axis, round_up
from pallas_kernels.grouped_matmul import gpu as _gpu
from pallas_kernels.grouped_matmul import tpu as _tpu
from pallas_kernels.grouped_matmul.metadata import GroupMetadata, make_group_metadata
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from pallas_kernels.grouped_matmul.tiling import (
    GroupedMatmulTiling,
    default_tiling,
    fit_tile,
)

__all__ = [
    "GroupMetadata",
    "GroupedMatmulTiling",
    "default_tiling",
    "grouped_matmul",
    "grouped_matmul_reference",
    "make_group_metadata",
]


@dataclasses.dataclass(frozen=True)
class _Config:
  implementation: str  # 'gpu' or 'tpu'
  tiling: GroupedMatmulTiling
  interpret: bool


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    interpret: bool = False,
    tiling: GroupedMatmulTiling | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Grouped matmul through the Pallas kernels (differentiable in lhs and rhs).

  Args:
    lhs: (rows, k), rows sorted by group.
    rhs: (groups, k, n).
    group_sizes: (groups,) int32; rows past their sum are padding and give 0.
    interpret: run the Pallas kernels in interpret mode (works on CPU).
    tiling: tile sizes; default: per device kind (`tiling.py`). Requested tiles are adapted to
      small or unaligned dimensions by `fit_tile`.
    implementation: force 'gpu' (Triton), 'tpu' (Mosaic) or 'reference'; default by backend
      (see `_common.choose_implementation`).

  Returns:
    (rows, n) in the promoted dtype of lhs and rhs (fp32 accumulation).
  """
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
    raise ValueError(f"expected lhs (rows, k), rhs (groups, k, n), group_sizes (groups,); got "
                     f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
  if lhs.shape[1] != rhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
    raise ValueError(f"shape mismatch: lhs {lhs.shape}, rhs {rhs.shape}, "
                     f"group_sizes {group_sizes.shape}")
  impl = choose_implementation(implementation, interpret)
  if impl == "reference":
    return grouped_matmul_reference(lhs, rhs, group_sizes)
  cfg = _Config(impl, tiling if tiling is not None else default_tiling(impl), bool(interpret))
  return _grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32), cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(lhs, rhs, group_sizes, cfg):
  return _gmm(lhs, rhs, group_sizes, cfg=cfg, transpose_rhs=False,
              out_dtype=jnp.result_type(lhs.dtype, rhs.dtype))


def _grouped_matmul_fwd(lhs, rhs, group_sizes, cfg):
  return _grouped_matmul(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(cfg, residuals, dout):
  lhs, rhs, group_sizes = residuals
  dlhs = _gmm(dout, rhs, group_sizes, cfg=cfg, transpose_rhs=True, out_dtype=lhs.dtype)
  drhs = _tgmm(lhs, dout, group_sizes, cfg=cfg, out_dtype=rhs.dtype)
  return dlhs, drhs, None  # group_sizes is integer: no cotangent


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def _tiles(cfg: _Config, m: int, k: int, n: int) -> GroupedMatmulTiling:
  t = cfg.tiling
  return dataclasses.replace(t, tm=fit_tile(m, t.tm, cfg.implementation),
                             tk=fit_tile(k, t.tk, cfg.implementation),
                             tn=fit_tile(n, t.tn, cfg.implementation))


@functools.partial(jax.jit, static_argnames=("cfg", "transpose_rhs", "out_dtype"))
def _gmm(lhs, rhs, group_sizes, *, cfg: _Config, transpose_rhs: bool, out_dtype):
  """lhs (m, k) @ rhs[g] per group; rhs (G, k, n), or (G, n, k) if transpose_rhs -> (m, n)."""
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if m == 0 or num_groups == 0 or k == 0:
    return jnp.zeros((m, n), out_dtype)
  dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  t = _tiles(cfg, m, k, n)
  mp, kp, np_ = round_up(m, t.tm), round_up(k, t.tk), round_up(n, t.tn)
  lhs = pad_axis(pad_axis(lhs.astype(dtype), 0, mp), 1, kp)
  k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
  rhs = pad_axis(pad_axis(rhs.astype(dtype), k_axis, kp), n_axis, np_)
  meta = make_group_metadata(group_sizes, num_rows=mp, tm=t.tm, padding_group=True,
                             visit_empty_groups=False)
  kernel = _tpu.gmm if cfg.implementation == "tpu" else _gpu.gmm
  out = kernel(lhs, rhs, meta, tiling=t, num_groups=num_groups, transpose_rhs=transpose_rhs,
               out_dtype=out_dtype, interpret=cfg.interpret)
  return out[:m, :n]


@functools.partial(jax.jit, static_argnames=("cfg", "out_dtype"))
def _tgmm(lhs, dout, group_sizes, *, cfg: _Config, out_dtype):
  """Per group g: lhs (m, k)[rows of g]^T @ dout (m, n)[rows of g] -> (G, k, n)."""
  m, k = lhs.shape
  n = dout.shape[1]
  num_groups = group_sizes.shape[0]
  if m == 0 or num_groups == 0:
    return jnp.zeros((num_groups, k, n), out_dtype)
  dtype = jnp.result_type(lhs.dtype, dout.dtype)
  t = _tiles(cfg, m, k, n)
  mp, kp, np_ = round_up(m, t.tm), round_up(k, t.tk), round_up(n, t.tn)
  lhs = pad_axis(pad_axis(lhs.astype(dtype), 0, mp), 1, kp)
  dout = pad_axis(pad_axis(dout.astype(dtype), 0, mp), 1, np_)
  meta = make_group_metadata(group_sizes, num_rows=mp, tm=t.tm, padding_group=False,
                             visit_empty_groups=True)
  if cfg.implementation == "tpu":
    out = _tpu.tgmm(lhs, dout, meta, tiling=t, num_groups=num_groups, out_dtype=out_dtype,
                    interpret=cfg.interpret)
  else:
    out = _gpu.tgmm(lhs, dout, meta.offsets, tiling=t, num_groups=num_groups,
                    out_dtype=out_dtype, interpret=cfg.interpret)
  return out[:, :k, :n]
