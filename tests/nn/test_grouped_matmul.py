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


def _swiglu_reference(x, gate, up, down, sizes):
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    out = np.zeros((x.shape[0], down.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        rows = x[start:start + size]
        h = rows @ gate[g]
        act = h / (1 + np.exp(-h)) * (rows @ up[g])
        out[start:start + size] = act @ down[g]
        start += size
    return out


@pytest.mark.parametrize("sizes,max_group_size", [
    ([3, 0, 5, 0], None),  # empty groups; 8 rows in one tile
    ([0, 4, 0, 4, 4, 4], 4),  # decode-like: tile = max group size, one visit per used group
    ([40, 0, 90, 7, 0, 3], None),  # groups spanning several tiles
    ([10, 0, 20, 0], None),  # with 6 padding rows past the sum (rows = 36)
])
@pytest.mark.parametrize("stacked", [False, True])
def test_grouped_swiglu_matches_per_group_swiglu(sizes, max_group_size, stacked):
    from omni_jax.nn.grouped_matmul import grouped_swiglu

    rng = np.random.default_rng(len(sizes) + sum(sizes))
    groups, rows = len(sizes), sum(sizes) + (6 if sizes == [10, 0, 20, 0] else 0)
    x = rng.standard_normal((rows, 16)).astype(np.float32)
    layers = 3
    w = [rng.standard_normal((layers, groups) + shape).astype(np.float32) * 0.3
         for shape in ((16, 12), (16, 12), (12, 16))]
    sizes_j = jnp.asarray(sizes, jnp.int32)
    expected = _swiglu_reference(x, w[0][1], w[1][1], w[2][1], sizes)
    for impl in ("tiled", "ragged_dot", "gathered"):  # gathered: the accelerators' path for few rows
        if impl == "gathered":
            from omni_jax.nn.grouped_matmul import _swiglu_gathered

            out = (_swiglu_gathered(x, *w, sizes_j, jnp.int32(1)) if stacked
                   else _swiglu_gathered(x, *(a[1] for a in w), sizes_j, None))
        elif stacked:
            out = grouped_swiglu(x, *w, sizes_j, impl=impl, layer=jnp.int32(1), max_group_size=max_group_size)
        else:
            out = grouped_swiglu(x, *(a[1] for a in w), sizes_j, impl=impl, max_group_size=max_group_size)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_grouped_swiglu_gradients_match_ragged_dot_composition():
    from omni_jax.nn.grouped_matmul import grouped_swiglu

    rng = np.random.default_rng(3)
    sizes = jnp.asarray([70, 0, 30, 44], jnp.int32)
    x = jnp.asarray(rng.standard_normal((144, 8)), jnp.float32)
    w = [jnp.asarray(rng.standard_normal((2, 4) + shape) * 0.3, jnp.float32) for shape in ((8, 6), (8, 6), (6, 8))]

    def loss(impl):
        return lambda x, g, u, d: jnp.sum(jnp.sin(grouped_swiglu(x, g, u, d, sizes, impl=impl, layer=1)))

    tiled = jax.grad(loss("tiled"), argnums=(0, 1, 2, 3))(x, *w)
    ragged = jax.grad(loss("ragged_dot"), argnums=(0, 1, 2, 3))(x, *w)
    for a, b in zip(tiled, ragged):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(tiled[1][0]).max()) == 0.0  # layer 0 is not used: no gradient reaches it
