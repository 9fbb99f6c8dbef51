"""The CPU kernel for SwiGLU experts, both loops (streaming for few rows, register tiles for many):
equals a per-group float64 product, reads one layer of a stack in place, stays in bounds on bad
sizes, differentiates like the pure-JAX path, and is what `grouped_swiglu` runs on CPU for float32
rows: few rows always, many where the tiles fit the widths on an AVX-512 or AVX2 + FMA CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from cpu_kernels.expert_swiglu import STREAM_MAX_ROWS
from omni_jax.nn.dense import CPU_KERNEL_MAX_ROWS
from omni_jax.nn.grouped_matmul import grouped_swiglu


def _silu(a):
    return a / (1.0 + np.exp(-a))


def _reference(x, gate, up, down, sizes):
    """Per-group float64 SwiGLU; rows past the groups are zeros (sizes clamped to the rows)."""
    out = np.zeros((x.shape[0], down.shape[-1]), np.float64)
    start = 0
    for g, size in enumerate(sizes):
        size = int(min(max(size, 0), x.shape[0] - start))
        rows = x[start:start + size].astype(np.float64)
        h = _silu(rows @ gate[g].astype(np.float64)) * (rows @ up[g].astype(np.float64))
        out[start:start + size] = h @ down[g].astype(np.float64)
        start += size
    return out


def _operands(rng, layers, groups, hidden, inter, hidden_out, rows):
    shape = (layers,) if layers else ()
    gate = (rng.standard_normal((*shape, groups, hidden, inter)) / np.sqrt(hidden)).astype(np.float32)
    up = (rng.standard_normal((*shape, groups, hidden, inter)) / np.sqrt(hidden)).astype(np.float32)
    down = (rng.standard_normal((*shape, groups, inter, hidden_out)) / np.sqrt(inter)).astype(np.float32)
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    return x, gate, up, down


CASES = [
    # (rows, group sizes): empty groups, several rows per group, padding rows past the sum, one row.
    (16, [3, 0, 5, 0, 1, 7]),
    (12, [0, 0, 2, 0, 4, 0]),  # 6 padding rows
    (1, [0, 1, 0]),
    (64, [16, 16, 0, 32]),
]


def _assert_equals_float64(seed, rows, sizes, layers, inter, hidden_out):
    """The jitted kernel against `_reference` on random operands (the last layer when stacked); rows
    past the groups are zeros."""
    x, gate, up, down = _operands(np.random.default_rng(seed), layers, len(sizes), 40, inter, hidden_out, rows)
    layer = layers - 1 if layers else None
    got = np.asarray(jax.jit(cpu_kernels.expert_swiglu)(x, gate, up, down, jnp.asarray(sizes, jnp.int32), layer))
    pick = (lambda w: w[layer]) if layers else (lambda w: w)
    want = _reference(x, pick(gate), pick(up), pick(down), sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not got[sum(sizes):].any()


@pytest.mark.parametrize("rows,sizes", CASES)
@pytest.mark.parametrize("stacked", [False, True])
def test_equals_per_group_float64_product(rows, sizes, stacked):
    _assert_equals_float64(rows + len(sizes), rows, sizes, 3 if stacked else 0, 24, 36)


# The tiled loop: more than STREAM_MAX_ROWS rows, widths multiples of 64. Groups whose sizes leave
# each remainder of the 6-row register tile (0-5), groups longer than a task (48 rows for the first
# three; on two threads 120 for the last, whose tasks copy b's column blocks on AVX2), groups too
# short for the copy, empty groups, padding rows past the groups.
TILED_CASES = [
    (200, [49, 0, 6, 7, 8, 9, 10, 11, 0, 96]),  # 4 padding rows
    (STREAM_MAX_ROWS + 1, [STREAM_MAX_ROWS + 1]),
    (130, [0, 1, 2, 3, 4, 5, 0, 110]),
    (1000, [401, 0, 3, 11, 585]),
]


@pytest.mark.parametrize("rows,sizes", TILED_CASES)
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("inter,hidden_out", [(64, 128), (128, 64)])
def test_tiled_loop_equals_per_group_float64_product(rows, sizes, stacked, inter, hidden_out):
    assert rows > STREAM_MAX_ROWS and cpu_kernels.expert_swiglu_tiles_fit(np.zeros((1, 1, inter)), np.zeros((1, 1, hidden_out)))
    _assert_equals_float64(rows + inter, rows, sizes, 2 if stacked else 0, inter, hidden_out)


def test_tiled_loop_silu_at_large_magnitudes():
    """SiLU through the kernel's own exponential: gate outputs of |a| up to ~300 (exp(-|a|) underflows
    past 87, where a * sigmoid(a) is a above zero and 0 below) stay finite and match float64."""
    rng = np.random.default_rng(5)
    x, gate, up, down = _operands(rng, 0, 2, 16, 64, 64, 80)
    gate = gate * 60  # gate outputs ~ N(0, 60^2)
    sizes = [37, 43]
    got = np.asarray(cpu_kernels.expert_swiglu(x, gate, up, down, jnp.asarray(sizes, jnp.int32)))
    assert np.abs(x @ gate[0]).max() > 150
    np.testing.assert_allclose(got, _reference(x, gate, up, down, sizes), rtol=1e-5, atol=1e-4)


def test_bad_sizes_and_layer_stay_in_bounds():
    """Raw buffers: group sizes past the rows and an out-of-range layer must not write outside them.
    Sizes are clamped to the rows left, and the layer like XLA's dynamic indices."""
    rng = np.random.default_rng(0)
    x, gate, up, down = _operands(rng, 2, 3, 16, 8, 16, 6)
    sizes = [4, -3, 9]  # sum past the 6 rows, and a negative size
    got = np.asarray(cpu_kernels.expert_swiglu(x, gate, up, down, jnp.asarray(sizes, jnp.int32), jnp.int32(7)))
    want = _reference(x, gate[1], up[1], down[1], [4, 0, 2])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tiled_loop_bad_sizes_and_layer_stay_in_bounds():
    rng = np.random.default_rng(6)
    x, gate, up, down = _operands(rng, 2, 3, 16, 64, 64, 70)
    sizes = [50, -3, 99]
    got = np.asarray(cpu_kernels.expert_swiglu(x, gate, up, down, jnp.asarray(sizes, jnp.int32), jnp.int32(-4)))
    want = _reference(x, gate[0], up[0], down[0], [50, 0, 20])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_equal_the_pure_jax_path():
    rng = np.random.default_rng(1)
    x, gate, up, down = _operands(rng, 2, 4, 24, 16, 24, 10)
    sizes = jnp.asarray([3, 0, 5, 1], jnp.int32)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)))

    kernel = jax.grad(loss(lambda *a: cpu_kernels.expert_swiglu(*a, sizes, 1)), argnums=(0, 1, 2, 3))(x, gate, up, down)
    pure = jax.grad(loss(lambda *a: grouped_swiglu(*a, sizes, impl="tiled", layer=1)), argnums=(0, 1, 2, 3))(
        x, gate, up, down)
    for got, want in zip(kernel, pure):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_vmapped_rows_run_one_call_each():
    rng = np.random.default_rng(2)
    x, gate, up, down = _operands(rng, 0, 3, 16, 8, 16, 5)
    xs = np.stack([x, 2 * x])
    sizes = jnp.asarray([[2, 0, 3], [5, 0, 0]], jnp.int32)
    got = jax.vmap(lambda x, s: cpu_kernels.expert_swiglu(x, gate, up, down, s))(xs, sizes)
    for i in range(2):
        np.testing.assert_allclose(got[i], _reference(xs[i], gate, up, down, np.asarray(sizes[i])), rtol=1e-5, atol=1e-5)


def test_rejects_other_dtypes_and_shapes_by_name():
    rng = np.random.default_rng(3)
    x, gate, up, down = _operands(rng, 0, 2, 8, 4, 8, 3)
    sizes = jnp.asarray([1, 2], jnp.int32)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.expert_swiglu(x.astype(jnp.bfloat16), gate, up, down, sizes)
    with pytest.raises(ValueError, match=r"gate/up \(G, D, F\)"):
        cpu_kernels.expert_swiglu(x, gate[:, :4], up, down, sizes)
    with pytest.raises(ValueError, match="group_sizes"):
        cpu_kernels.expert_swiglu(x, gate, up, down, sizes[:1])


def _targets(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("rows,width,dtype,expect_kernel", [
    (8, 16, jnp.float32, True),
    (CPU_KERNEL_MAX_ROWS, 16, jnp.float32, True),
    (CPU_KERNEL_MAX_ROWS + 1, 16, jnp.float32, False),  # prefill-sized, widths off the tiles: XLA's products
    # prefill-sized, the kernel's register tiles where they beat XLA:CPU (AVX-512, AVX2 + FMA)
    (CPU_KERNEL_MAX_ROWS + 1, 64, jnp.float32, cpu_kernels.expert_swiglu_prefill_faster(np.zeros((1, 1, 64)),
                                                                                        np.zeros((1, 1, 64)))),
    (8, 16, jnp.bfloat16, False),
])
def test_grouped_swiglu_runs_the_kernel_for_float32_rows_on_cpu(rows, width, dtype, expect_kernel):
    rng = np.random.default_rng(4)
    x, gate, up, down = (jnp.asarray(a, dtype) for a in _operands(rng, 2, 4, 16, width, width, rows))
    sizes = jnp.asarray([rows // 2, 0, rows - rows // 2, 0], jnp.int32)
    hlo = _targets(lambda *a: grouped_swiglu(*a, sizes, layer=jnp.int32(1), max_group_size=rows), x, gate, up, down)
    on_cpu_host = jax.default_backend() == "cpu"  # GPU/TPU hosts never pick a CPU kernel
    assert ("omni_jax_cpu_expert_swiglu" in hlo) == (expect_kernel and on_cpu_host)
    auto = grouped_swiglu(x, gate, up, down, sizes, layer=jnp.int32(1), max_group_size=rows)
    tiled = grouped_swiglu(x, gate, up, down, sizes, impl="tiled", layer=jnp.int32(1), max_group_size=rows)
    tol = 1e-5 if dtype == jnp.float32 else 0
    np.testing.assert_allclose(np.asarray(auto, np.float32), np.asarray(tiled, np.float32), rtol=tol, atol=tol)
