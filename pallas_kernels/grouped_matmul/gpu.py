"""Grouped matmul kernels for GPUs (Pallas, Triton backend).

Two kernels, both on already padded operands (see `__init__.py`):

* `gmm`: out (m, n) = lhs (m, k) @ rhs[g] for the rows of each group g. Grid = (visit slots,
  column tiles); a slot is a (row tile, group) pair from `metadata.py`. Triton programs run in
  parallel, so a row tile that straddles groups is computed by several programs that each store
  only their group's rows with a masked store: the row sets are disjoint, so there is no race and
  no read-modify-write. Padding rows belong to a padding group whose programs skip the matmul
  (zero-trip loop) and store zeros, so every output row is written exactly once.
  `transpose_rhs=True` reads rhs as (groups, n, k); the backward pass uses it for
  dlhs = dout @ rhs[g]^T without materialising a transposed copy of the weights.

* `tgmm`: out (groups, k, n) = lhs_g^T @ rhs_g per group (the weight gradient). Grid = (groups,
  k tiles, n tiles); each program walks the row tiles its group touches and zeroes the rows of
  other groups before the product. An empty group walks no tiles and writes zeros.

Triton has no scalar prefetch: metadata arrays are passed as whole-array inputs and read with
scalar loads, and lhs/rhs are whole-array refs indexed with dynamic slices in the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import SQUEEZED, idiv, whole_array_spec
from pallas_kernels.grouped_matmul.metadata import GroupMetadata
from pallas_kernels.grouped_matmul.tiling import GroupedMatmulTiling

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _gmm_kernel(offsets_ref, visit_group_ref, visit_tile_ref, num_visits_ref, lhs_ref, rhs_ref,
                out_ref, *, tm, tk, tn, num_k_tiles, num_groups, transpose_rhs):
  slot = pl.program_id(0)
  col0 = pl.multiple_of(pl.program_id(1) * tn, tn)
  group = visit_group_ref[slot]
  tile = visit_tile_ref[slot]
  is_real_visit = slot < num_visits_ref[0]
  row0 = pl.multiple_of(tile * tm, tm)
  rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
  store_mask = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1]) & is_real_visit
  # The padding group (index num_groups) and no-op slots do no matmul: zero trips. Not
  # `jnp.where(cond, num_k_tiles, 0)`: Pallas' Triton lowering (JAX 0.10-0.11) types a select of
  # two literals as i1, which Triton rejects ("scf.for ... have same type").
  trips = (is_real_visit & (group < num_groups)).astype(jnp.int32) * num_k_tiles
  weights = jnp.minimum(group, num_groups - 1)

  def body(kt, acc):
    k0 = pl.multiple_of(kt * tk, tk)
    a = lhs_ref[pl.ds(row0, tm), pl.ds(k0, tk)]
    if transpose_rhs:
      b = rhs_ref[weights, pl.ds(col0, tn), pl.ds(k0, tk)]
      return acc + lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)
    b = rhs_ref[weights, pl.ds(k0, tk), pl.ds(col0, tn)]
    return acc + lax.dot_general(a, b, _NN, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, trips, body, jnp.zeros((tm, tn), jnp.float32))
  plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)], acc.astype(out_ref.dtype),
              mask=store_mask)


def gmm(lhs: jax.Array, rhs: jax.Array, meta: GroupMetadata, *, tiling: GroupedMatmulTiling,
        num_groups: int, transpose_rhs: bool, out_dtype, interpret: bool) -> jax.Array:
  """out (m, n) = lhs (m, k) @ rhs[g] per group; rhs (G, k, n), or (G, n, k) if transpose_rhs.

  m, k, n must be multiples of tm, tk, tn; `meta` built with padding_group=True.
  """
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  kernel = functools.partial(
      _gmm_kernel, tm=tm, tk=tk, tn=tn, num_k_tiles=k // tk, num_groups=num_groups,
      transpose_rhs=transpose_rhs)
  grid = (meta.visit_group.shape[0], n // tn)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=grid,
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                           num_stages=tiling.num_stages),
      interpret=interpret,
      name="grouped_matmul_gpu",
  )(meta.offsets, meta.visit_group, meta.visit_tile, meta.num_visits, lhs, rhs)


def _tgmm_kernel(offsets_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn):
  group = pl.program_id(0)
  k0 = pl.multiple_of(pl.program_id(1) * tk, tk)
  col0 = pl.multiple_of(pl.program_id(2) * tn, tn)
  start = offsets_ref[group]
  end = offsets_ref[group + 1]
  first_tile = idiv(start, tm)
  last_tile = jnp.where(end > start, idiv(end + (tm - 1), tm), first_tile)

  def body(t, acc):
    row0 = pl.multiple_of(t * tm, tm)
    rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
    a = lhs_ref[pl.ds(row0, tm), pl.ds(k0, tk)]
    # Zero the other groups' rows (a select, not a multiply, so inf/nan there cannot leak).
    a = jnp.where((rows >= start) & (rows < end), a, jnp.zeros_like(a))
    b = rhs_ref[pl.ds(row0, tm), pl.ds(col0, tn)]
    return acc + lax.dot_general(a, b, _TN, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(first_tile, last_tile, body, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs: jax.Array, rhs: jax.Array, offsets: jax.Array, *, tiling: GroupedMatmulTiling,
         num_groups: int, out_dtype, interpret: bool) -> jax.Array:
  """out (G, k, n) = lhs (m, k)[group rows]^T @ rhs (m, n)[group rows] for each group.

  m, k, n must be multiples of tm, tk, tn; `offsets` (G + 1,) or longer (extra entries unused).
  """
  m, k = lhs.shape
  n = rhs.shape[1]
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(num_groups, k // tk, n // tn),
      in_specs=[whole_array_spec(x.shape) for x in (offsets, lhs, rhs)],  # sliced in-kernel
      out_specs=pl.BlockSpec((SQUEEZED, tk, tn), lambda g, i, j: (g, i, j)),
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                           num_stages=tiling.num_stages),
      interpret=interpret,
      name="grouped_matmul_transposed_gpu",
  )(offsets, lhs, rhs)
