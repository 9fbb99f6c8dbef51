"""Pure-JAX grouped matmul: the CPU path of the model and the oracle of the kernel tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """out[r] = lhs[r] @ rhs[group of r], rows past sum(group_sizes) give 0.

  Args:
    lhs: (rows, k), rows sorted by group.
    rhs: (groups, k, n).
    group_sizes: (groups,) int32, summing to <= rows.

  Returns:
    (rows, n) in the promoted dtype of lhs and rhs, accumulated in fp32.

  `jax.lax.ragged_dot` has exactly these semantics (padding rows included) and its own autodiff
  rules, so the reference is a thin wrapper. It is not fast on every backend (it has been seen
  to fall back to a dense path on NVIDIA GPUs), which is why the kernels exist.
  """
  out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  out = jax.lax.ragged_dot(
      lhs.astype(out_dtype),
      rhs.astype(out_dtype),
      group_sizes.astype(jnp.int32),
      preferred_element_type=jnp.float32,
  )
  return out.astype(out_dtype)
