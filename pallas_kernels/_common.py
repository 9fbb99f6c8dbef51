"""Helpers shared by the kernels: choosing an implementation, device-kind lookup, padding.

Nothing here is kernel-specific; each kernel package imports what it needs.
"""

from __future__ import annotations

import math
from typing import Mapping, TypeVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

T = TypeVar("T")

# The implementations an entry point can dispatch to.
IMPLEMENTATIONS = ("reference", "gpu", "tpu")

# `pl.squeezed` marks a block dimension that is dropped from the kernel's view of the ref.
# Older/newer JAX versions spell it `None`; both are accepted by BlockSpec.
SQUEEZED = getattr(pl, "squeezed", None)


def whole_array_spec(shape) -> pl.BlockSpec:
  """A BlockSpec giving every program the whole array (indexed by hand in the kernel)."""
  ndim = len(shape)
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * ndim)


def choose_implementation(implementation: str | None, interpret: bool) -> str:
  """Picks which variant of a kernel runs.

  An explicit `implementation` wins. Otherwise: TPU backend -> Mosaic kernels, GPU backend (CUDA
  or ROCm) -> Triton kernels. On CPU the Pallas kernels can only run interpreted, so CPU gives the
  Triton variant when `interpret=True` (that is how the tests exercise kernel logic) and the
  pure-JAX reference otherwise (that is what the model uses on CPU).
  """
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation
  backend = jax.default_backend()
  if backend == "tpu":
    return "tpu"
  if backend in ("gpu", "cuda", "rocm"):
    return "gpu"
  return "gpu" if interpret else "reference"


def device_kind() -> str:
  """The first device's kind string, e.g. 'NVIDIA H100 80GB HBM3' or 'TPU v5 lite'."""
  try:
    return jax.devices()[0].device_kind
  except Exception:  # pragma: no cover - no backend at all
    return ""


def lookup_by_device_kind(table: Mapping[str, T], default: T, kind: str | None = None) -> T:
  """Returns the entry whose key is the longest substring of the device kind (else `default`).

  Longest match first so that e.g. 'TPU v5 lite' can be told apart from 'TPU v5'.
  """
  kind = device_kind() if kind is None else kind
  best = None
  for key in table:
    if key in kind and (best is None or len(key) > len(best)):
      best = key
  return table[best] if best is not None else default


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


def next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 2 ** math.ceil(math.log2(x))


def pad_axis(x: jax.Array, axis: int, new_size: int, value=0) -> jax.Array:
  """Pads `x` at the end of `axis` up to `new_size` (no-op, no copy, when already that size)."""
  size = x.shape[axis]
  if size == new_size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, new_size - size)
  return jnp.pad(x, widths, constant_values=value)


def idiv(a: jax.Array, b: int) -> jax.Array:
  """Integer division of a non-negative traced int32 scalar by a static int inside kernels.

  Triton lowering handles `lax.div` (truncating) on scalars but not always `//` (floor), and
  the two agree for the non-negative values used here.
  """
  return jax.lax.div(a, jnp.asarray(b, dtype=a.dtype))
