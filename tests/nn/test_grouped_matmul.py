"""The grouped-matmul entry point: every implementation equals a per-group numpy product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.nn.grouped_matmul import grouped_matmul


def _reference(lhs, rhs, sizes):
    out = np.zeros((lhs.shape[0], rhs.shape[2]), np.float64)
    start = 0
    for g, size in enumerate(sizes):
        out[start:start + size] = lhs[start:start + size].astype(np.float64) @ rhs[g].astype(np.float64)
        start += size
    return out


CASES = [
    # (rows, groups, group sizes or None for random) — includes empty groups, padding rows, one group.
    (8, 4, [3, 0, 5, 0]),
    (50, 6, [0, 20, 0, 0, 25, 0]),  # 5 padding rows past the sum
    (300, 5, None),
    (1100, 9, None),
    (130, 1, [130]),
]


@pytest.mark.parametrize("rows,groups,sizes", CASES)
@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_matches_per_group_product(rows, groups, sizes, impl):
    rng = np.random.default_rng(rows)
    if sizes is None:
        cuts = np.sort(rng.integers(0, rows + 1, groups - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [rows]]))
        sizes[rng.integers(0, groups)] = 0  # force an empty group
        sizes[-1] += rows - sizes.sum()
    sizes = np.asarray(sizes, np.int32)
    lhs = rng.standard_normal((rows, 24)).astype(np.float32)
    rhs = rng.standard_normal((groups, 24, 40)).astype(np.float32)
    out = np.asarray(grouped_matmul(lhs, rhs, jnp.asarray(sizes), impl=impl))
    np.testing.assert_allclose(out, _reference(lhs, rhs, sizes), rtol=1e-5, atol=1e-4)


def test_gradients_of_tiled_path_match_ragged_dot():
    rng = np.random.default_rng(1)
    sizes = jnp.asarray([100, 0, 60, 140], jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((300, 16)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32)

    def loss(impl):
        return lambda a, b: jnp.sum(jnp.sin(grouped_matmul(a, b, sizes, impl=impl)))

    g_tiled = jax.grad(loss("tiled"), argnums=(0, 1))(lhs, rhs)
    g_ragged = jax.grad(loss("ragged_dot"), argnums=(0, 1))(lhs, rhs)
    for a, b in zip(g_tiled, g_ragged):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="expects lhs"):
        grouped_matmul(jnp.zeros((4, 3)), jnp.zeros((2, 5, 6)), jnp.asarray([2, 2]))
