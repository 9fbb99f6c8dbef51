"""A few rows times a matrix, reading the matrix once, in place.

    y = x @ w          x (R, K), w (K, N)

Decode-time projections on CPU (the language-model head: 4 rows x 512 x 8192 on the benchmark
model). XLA:CPU hands such a product to YNNPACK, which repacks the whole right-hand side on every
call. Here each core streams a contiguous block of w's rows once, four rows at a time, accumulating
every output row together; the per-core partial sums are then added. (Cutting the output columns across cores
instead read w in 256-byte pieces 32 KB apart, which the prefetchers do not follow: 12 ms for that
head, measured.)

Numerics: float32; within a core's block of K each output adds its terms four at a time (the four
summed first), then the blocks' partial sums are added in order. Gradients: a custom VJP whose backward pass is `jnp.dot`'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numba
from numba import cfunc, njit, prange

from cpu_kernels import ffi
from cpu_kernels._loops import rows_block, sum_parts

__all__ = ["rows_matmul"]

_TARGET = "omni_jax_cpu_rows_matmul"


@njit(parallel=True, cache=True)
def _rows_matmul(x, matrix, partial, out):
    """partial (P, R, N) scratch: part p sums the products of its own contiguous block of rows of
    `matrix` (each core streams whole rows, which the prefetchers follow), then the parts are added.
    Four rows of `matrix` per pass over the accumulators (`_loops.rows_block`). Measured on the
    benchmark head (4 x 512 x 8192, cycling 16 heads to defeat the cache): 0.78-0.92 ms against
    1.21-1.46 ms a row at a time; eight rows per pass was slower again (1.06-1.12 ms)."""
    depth = x.shape[1]
    parts = partial.shape[0]
    for p in prange(parts):
        rows_block(x, matrix, depth * p // parts, depth * (p + 1) // parts, partial[p])
    sum_parts(partial, out)


@cfunc(ffi.HANDLER_SIGNATURE, cache=True)
def _handler(frame_address):
    frame = ffi.call_frame(frame_address)
    if frame.size == 0:
        return ffi.null()
    # Arguments: x (R, K), w (K, N). Results: out (R, N), scratch (P, R, N).
    x, w = ffi.float32_2d(frame, 0), ffi.float32_2d(frame, 1)
    out, partial = ffi.float32_2d(frame, 0, True), ffi.float32_3d(frame, 1, True)
    _rows_matmul(x, w, partial, out)
    return ffi.null()


@functools.cache
def _registered() -> str:
    ffi.register(_TARGET, _handler.address)
    return _TARGET


def _forward(x, w):
    rows, width = x.shape[0], w.shape[1]
    parts = max(1, min(numba.get_num_threads(), x.shape[1]))
    call = jax.ffi.ffi_call(
        _registered(),
        (jax.ShapeDtypeStruct((rows, width), jnp.float32), jax.ShapeDtypeStruct((parts, rows, width), jnp.float32)),
        vmap_method="sequential",
    )
    return call(x, w)[0]


@jax.custom_vjp
def _differentiable(x, w):
    return _forward(x, w)


def _fwd(x, w):
    return _forward(x, w), (x, w)


def _bwd(residuals, dy):
    x, w = residuals
    _, pullback = jax.vjp(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), x, w)
    return pullback(dy)


_differentiable.defvjp(_fwd, _bwd)


def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (R, K) @ w (K, N) -> (R, N), float32 only; meant for few rows (decode). Differentiable."""
    if x.ndim != 2 or w.ndim != 2 or w.shape[0] != x.shape[1]:
        raise ValueError(f"rows_matmul expects x (R, K) and w (K, N); got x {x.shape}, w {w.shape}")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"rows_matmul takes float32 operands; got x {x.dtype}, w {w.dtype}: cast them or use jnp.dot")
    return _differentiable(x, w)
