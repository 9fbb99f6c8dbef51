"""Grouped matmul kernels for TPUs (Pallas, Mosaic backend).

Same products as `gpu.py`, organised the way the TPU wants them (the scheme of megablox gmm):
the metadata arrays are scalar-prefetched into SMEM so that BlockSpec index maps can pick the
row tile and the expert's weight block of each grid step, and the pipeline streams those blocks
into VMEM. The grid runs sequentially on a core, which the kernels rely on:

* `gmm`: grid = (n tiles, visit slots, k tiles). An fp32 VMEM accumulator sums over k; at the
  last k step the rows of the visit's group are merged into the output block with a select.
  Revisits of a tile are consecutive (metadata.py), so the output block stays in VMEM across
  them and every row ends up written by its own group (padding rows by the padding group, with
  zeros). Only the n dimension is "parallel" (megacore split); visits and k are "arbitrary".

* `tgmm`: grid = (k tiles, n tiles, visit slots), visit list with one visit per empty group. The
  accumulator is zeroed when the group changes and written to out[group] when it is about to
  change, so empty groups write zeros.

No-op visit slots (past `num_visits`) point at the same blocks as the last real visit, so the
pipeline fetches nothing for them, and they neither compute nor store.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import SQUEEZED
from pallas_kernels.grouped_matmul.metadata import GroupMetadata
from pallas_kernels.grouped_matmul.tiling import GroupedMatmulTiling

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


def _compiler_params(semantics):
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=semantics)


def _gmm_kernel(offsets_ref, visit_group_ref, visit_tile_ref, num_visits_ref,  # SMEM prefetch
                lhs_ref, rhs_ref, out_ref, acc_ref, *, tm, tn, num_groups, transpose_rhs):
  slot = pl.program_id(1)
  kt = pl.program_id(2)
  group = visit_group_ref[slot]
  is_real_visit = slot < num_visits_ref[0]

  @pl.when(kt == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(is_real_visit & (group < num_groups))  # the padding group keeps acc = 0
  def _accumulate():
    acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], _NT if transpose_rhs else _NN,
                                    preferred_element_type=jnp.float32)

  @pl.when(is_real_visit & (kt == pl.num_programs(2) - 1))
  def _store():
    rows = visit_tile_ref[slot] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    mine = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
    out_ref[...] = jnp.where(mine, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(
        out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, meta: GroupMetadata, *, tiling: GroupedMatmulTiling,
        num_groups: int, transpose_rhs: bool, out_dtype, interpret: bool) -> jax.Array:
  """out (m, n) = lhs (m, k) @ rhs[g] per group; rhs (G, k, n), or (G, n, k) if transpose_rhs.

  m, k, n must be multiples of tm, tk, tn; `meta` built with padding_group=True.
  """
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  num_k_tiles = k // tk

  def computes(slot, offsets, groups, num_visits):
    del offsets
    return (slot < num_visits[0]) & (groups[slot] < num_groups)

  def lhs_map(j, slot, kt, offsets, groups, tiles, num_visits):
    # No-op visits keep the k block fixed so the pipeline does not fetch for them.
    return tiles[slot], jnp.where(computes(slot, offsets, groups, num_visits), kt, 0)

  def rhs_map(j, slot, kt, offsets, groups, tiles, num_visits):
    kt = jnp.where(computes(slot, offsets, groups, num_visits), kt, 0)
    g = jnp.minimum(groups[slot], num_groups - 1)
    return (g, j, kt) if transpose_rhs else (g, kt, j)

  def out_map(j, slot, kt, offsets, groups, tiles, num_visits):
    return tiles[slot], j

  rhs_block = (SQUEEZED, tn, tk) if transpose_rhs else (SQUEEZED, tk, tn)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(n // tn, meta.visit_group.shape[0], num_k_tiles),
      in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
      out_specs=pl.BlockSpec((tm, tn), out_map),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
  )
  kernel = functools.partial(_gmm_kernel, tm=tm, tn=tn, num_groups=num_groups,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid_spec=grid_spec,
      compiler_params=_compiler_params(("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="grouped_matmul_tpu",
  )(meta.offsets, meta.visit_group, meta.visit_tile, meta.num_visits, lhs, rhs)


def _tgmm_kernel(offsets_ref, visit_group_ref, visit_tile_ref, num_visits_ref,  # SMEM prefetch
                 lhs_ref, rhs_ref, out_ref, acc_ref, *, tm, tk):
  slot = pl.program_id(2)
  last_slot = pl.num_programs(2) - 1
  group = visit_group_ref[slot]
  prev_group = visit_group_ref[jnp.maximum(slot - 1, 0)]
  next_group = visit_group_ref[jnp.minimum(slot + 1, last_slot)]

  @pl.when((slot == 0) | (group != prev_group))
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(slot < num_visits_ref[0])
  def _accumulate():
    rows = visit_tile_ref[slot] * tm + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
    mine = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
    b = rhs_ref[...]
    # Select (not multiply) so inf/nan in other groups' rows cannot leak. The select and the
    # transpose run in fp32: packed bf16 transposes/selects are the less supported Mosaic path.
    a = jnp.where(mine, lhs_ref[...].astype(jnp.float32), 0.0)
    acc_ref[...] += lax.dot_general(a.T.astype(b.dtype), b, _NN,
                                    preferred_element_type=jnp.float32)

  @pl.when((slot == last_slot) | (group != next_group))
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs: jax.Array, rhs: jax.Array, meta: GroupMetadata, *, tiling: GroupedMatmulTiling,
         num_groups: int, out_dtype, interpret: bool) -> jax.Array:
  """out (G, k, n) = lhs (m, k)[group rows]^T @ rhs (m, n)[group rows] for each group.

  m, k, n must be multiples of tm, tk, tn; `meta` built with padding_group=False,
  visit_empty_groups=True.
  """
  m, k = lhs.shape
  n = rhs.shape[1]
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn

  def lhs_map(i, j, slot, offsets, groups, tiles, num_visits):
    return tiles[slot], i

  def rhs_map(i, j, slot, offsets, groups, tiles, num_visits):
    return tiles[slot], j

  def out_map(i, j, slot, offsets, groups, tiles, num_visits):
    return groups[slot], i, j

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(k // tk, n // tn, meta.visit_group.shape[0]),
      in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), rhs_map)],
      out_specs=pl.BlockSpec((SQUEEZED, tk, tn), out_map),
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
  )
  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid_spec=grid_spec,
      compiler_params=_compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="grouped_matmul_transposed_tpu",
  )(meta.offsets, meta.visit_group, meta.visit_tile, meta.num_visits, lhs, rhs)
