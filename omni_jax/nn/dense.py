"""Projections by a weight matrix, and when the CPU decode kernels (`cpu_kernels`) apply.

`project(x, kernel)` is `x @ kernel` in x's dtype. On CPU, for a few float32 rows (decode) outside
any multi-device mesh, it runs `cpu_kernels.rows_matmul`, which streams the matrix once instead of
YNNPACK's per-call repack of it; for prefill and training batches, and on GPU/TPU, it is `jnp.dot`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from omni_jax import sharding

__all__ = ["project", "use_cpu_kernel", "cpu_kernel_allowed", "CPU_KERNEL_MAX_ROWS"]

# Rows (decode: batch, or batch x top_k routed rows) up to which the CPU kernels run; above it XLA's
# products are large enough to pay for their copies and repacks.
CPU_KERNEL_MAX_ROWS = 64


def use_cpu_kernel(rows: int, *arrays: jax.Array) -> bool:
    """Whether a `cpu_kernels` kernel should run: at most CPU_KERNEL_MAX_ROWS rows, and
    `cpu_kernel_allowed`."""
    return rows <= CPU_KERNEL_MAX_ROWS and cpu_kernel_allowed(*arrays)


def cpu_kernel_allowed(*arrays: jax.Array) -> bool:
    """Whether a `cpu_kernels` kernel may run on these operands, whatever their row count: CPU
    backend, all float32, no multi-device ambient mesh and not inside shard_map (there XLA's
    partitioning of the plain ops applies)."""
    if jax.default_backend() != "cpu" or any(a.dtype != jnp.float32 for a in arrays):
        return False
    mesh = sharding.ambient_mesh()
    return (mesh is None or mesh.size == 1) and not sharding.varying_axes(*arrays)


def project(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., K) @ kernel (K, N) -> (..., N) in x's dtype (the kernel is cast to it)."""
    kernel = kernel.astype(x.dtype)
    rows = math.prod(x.shape[:-1])
    if use_cpu_kernel(rows, x, kernel):
        import cpu_kernels  # noqa: PLC0415  (numba compiles, or loads its cache, on first import)

        flat = cpu_kernels.rows_matmul(x.reshape(rows, x.shape[-1]), kernel)
        return flat.reshape(*x.shape[:-1], kernel.shape[-1])
    return jnp.dot(x, kernel)
