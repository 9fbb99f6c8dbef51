"""The CPU decode kernel for few-row products: equals a float64 product, differentiates like
`jnp.dot`, and is what `nn.dense.project` runs on CPU for few float32 rows (and only then)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from omni_jax.nn.dense import CPU_KERNEL_MAX_ROWS, project


@pytest.mark.parametrize("rows,depth,width", [(4, 512, 1000), (1, 7, 3), (64, 33, 129), (3, 1, 5), (2, 11, 40)])
def test_equals_float64_product(rows, depth, width):
    rng = np.random.default_rng(depth)
    x = rng.standard_normal((rows, depth)).astype(np.float32)
    w = rng.standard_normal((depth, width)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.rows_matmul)(x, w))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-5, atol=1e-5 * np.sqrt(depth))


def test_gradients_and_vmap_equal_jnp_dot():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    w = rng.standard_normal((16, 24)).astype(np.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(jax.vmap(fn, in_axes=(0, None))(x, w)))

    got = jax.grad(loss(cpu_kernels.rows_matmul), argnums=(0, 1))(x, w)
    want = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_rejects_other_dtypes_and_shapes_by_name():
    x, w = jnp.ones((2, 4)), jnp.ones((4, 3))
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.rows_matmul(x.astype(jnp.bfloat16), w)
    with pytest.raises(ValueError, match=r"x \(R, K\) and w \(K, N\)"):
        cpu_kernels.rows_matmul(x, w.T)


@pytest.mark.parametrize("leading,dtype,expect_kernel", [
    ((4, 1), jnp.float32, True),  # a decode step: batch x 1 new token
    ((CPU_KERNEL_MAX_ROWS,), jnp.float32, True),
    ((2, CPU_KERNEL_MAX_ROWS), jnp.float32, False),  # a prefill: XLA's product
    ((4, 1), jnp.bfloat16, False),
])
def test_project_runs_the_kernel_for_few_float32_rows_on_cpu(leading, dtype, expect_kernel):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((*leading, 32)), dtype)
    w = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
    on_cpu_host = jax.default_backend() == "cpu"  # GPU/TPU hosts never pick a CPU kernel
    assert ("omni_jax_cpu_rows_matmul" in jax.jit(project).lower(x, w).as_text()) == (expect_kernel and on_cpu_host)
    got = project(x, w)
    assert got.shape == (*leading, 48) and got.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 0
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(jnp.dot(x, w.astype(dtype)), np.float32),
                               rtol=tol, atol=tol * 10)
