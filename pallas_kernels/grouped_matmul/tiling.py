"""Tile sizes for the grouped matmul kernels and their per-device defaults.

A `GroupedMatmulTiling` names the tile of one kernel program: `tm` rows of lhs, `tk` of the
contraction, `tn` output columns. The same tiling serves the three products of a training step
(forward, dlhs, drhs); in each, tm/tk/tn keep these roles (rows, contraction, output columns).

The defaults below are starting points chosen from the usual shapes of Triton/Mosaic matmuls, NOT
tuned measurements: no GPU or TPU was available when they were written. Run `bench/kernels.py` on
the target device and put the winners here.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels._common import lookup_by_device_kind, next_power_of_2, round_up


@dataclasses.dataclass(frozen=True)
class GroupedMatmulTiling:
  """Tile sizes (and GPU launch parameters) for one grouped matmul call.

  Attributes:
    tm: rows of lhs per tile. Small keeps the waste at group boundaries low: a row tile that
      straddle groups is computed once per group it touches.
    tk: contraction elements per inner step.
    tn: output columns per tile.
    num_warps, num_stages: Triton launch parameters (ignored on TPU).
  """

  tm: int = 128
  tk: int = 128
  tn: int = 128
  num_warps: int = 4
  num_stages: int = 3


# Keys are substrings of `jax.devices()[0].device_kind`; the longest match wins.
GPU_TILINGS: dict[str, GroupedMatmulTiling] = {
    "H100": GroupedMatmulTiling(tm=128, tk=64, tn=128, num_warps=8, num_stages=4),
    "H200": GroupedMatmulTiling(tm=128, tk=64, tn=128, num_warps=8, num_stages=4),
    "A100": GroupedMatmulTiling(tm=128, tk=32, tn=128, num_warps=4, num_stages=3),
}
GPU_DEFAULT = GroupedMatmulTiling(tm=64, tk=32, tn=64, num_warps=4, num_stages=3)

TPU_TILINGS: dict[str, GroupedMatmulTiling] = {
    "TPU v4": GroupedMatmulTiling(tm=128, tk=512, tn=512),
    "TPU v5 lite": GroupedMatmulTiling(tm=128, tk=512, tn=512),
    "TPU v5": GroupedMatmulTiling(tm=128, tk=512, tn=512),
    "TPU v6": GroupedMatmulTiling(tm=256, tk=512, tn=512),
}
TPU_DEFAULT = GroupedMatmulTiling(tm=128, tk=128, tn=128)


def default_tiling(implementation: str, kind: str | None = None) -> GroupedMatmulTiling:
  """The per-device default tiling for 'gpu' (Triton) or 'tpu' (Mosaic)."""
  if implementation == "tpu":
    return lookup_by_device_kind(TPU_TILINGS, TPU_DEFAULT, kind)
  return lookup_by_device_kind(GPU_TILINGS, GPU_DEFAULT, kind)


def fit_tile(dim: int, tile: int, implementation: str) -> int:
  """The tile actually used along a dimension of size `dim` given a requested `tile`.

  Triton tensors need power-of-two shapes (and tl.dot at least 16), so GPU tiles are powers of
  two >= 16. Mosaic wants multiples of 128 lanes for the dims that land on lanes, so TPU tiles are
  multiples of 128. A dimension smaller than the tile gets one tile of its own (rounded up), so
  tiny test shapes are not padded to a full production tile. Among allowed tiles not larger than
  the request, the largest whose padding stays within 1/8 of `dim` wins (e.g. 768 columns with
  tn=512 on TPU -> 384, no padding), falling back to the least padding.
  """
  if implementation == "tpu":
    if dim <= tile:
      return round_up(dim, 128)
    candidates = list(range(max(128, tile // 128 * 128), 127, -128))
  else:
    if dim <= tile:
      return max(16, next_power_of_2(dim))
    top = max(16, next_power_of_2(tile + 1) // 2)  # largest power of two <= tile
    candidates = [top >> i for i in range(top.bit_length()) if (top >> i) >= 16]
  # Largest tile whose padding stays within 1/8 of the dimension; else the least padding.
  for t in candidates:
    if round_up(dim, t) - dim <= dim // 8:
      return t
  return min(candidates, key=lambda t: (round_up(dim, t) - dim, -t))
