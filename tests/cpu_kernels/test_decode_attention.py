"""The CPU decode-attention kernel: one decoder layer's attention block for one new token per row.

It equals the XLA ops it replaces (`omni_jax.nn`'s RMSNorm, rotary and masked attention) within the
project's fp32 bound (1e-5 of each output's scale), its exponential is within 1 ulp of float64's,
and `nn.decoder.decode` runs it exactly where it should: on CPU, float32, one new token per row,
`attention_impl="auto"`. Whole decode steps through it equal decode steps through XLA's attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from omni_jax.config import Runtime
from omni_jax.nn import decoder
from omni_jax.nn.attention import cached_attention
from omni_jax.nn.norms import rms_norm
from omni_jax.nn.params import init_params
from omni_jax.nn.rope import apply_rotary

FP32_SCALE_BOUND = 1e-5  # the project's fp32 parity target, relative to the output's scale
EPS = 1e-6


def _xla_block(x, cos, sin, key_valid, slot, layer, w, k_cache, v_cache):
    """The same block from the XLA path's ops (decoder._layer's attention half)."""
    batch = x.shape[0]
    kv_heads, head_dim = k_cache.shape[3:]
    h = rms_norm(x, w["input_norm"][layer], EPS)
    q = (h @ w["q_proj"][layer]).reshape(batch, 1, -1, head_dim)
    k = (h @ w["k_proj"][layer]).reshape(batch, 1, kv_heads, head_dim)
    v = (h @ w["v_proj"][layer]).reshape(batch, 1, kv_heads, head_dim)
    q = apply_rotary(rms_norm(q, w["q_norm"][layer], EPS), cos[:, None], sin[:, None])
    k = apply_rotary(rms_norm(k, w["k_norm"][layer], EPS), cos[:, None], sin[:, None])
    keys = jax.lax.dynamic_update_slice(k_cache[layer], k, (0, slot, 0, 0))
    values = jax.lax.dynamic_update_slice(v_cache[layer], v, (0, slot, 0, 0))
    a = cached_attention(q, keys, values, key_valid)
    return x + a.reshape(batch, -1) @ w["o_proj"][layer], k[:, 0], v[:, 0]


def _operands(batch, hidden, heads, kv_heads, head_dim, layers, slots, seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    weights = {
        "input_norm": 1 + normal(layers, hidden, scale=0.1), "q_proj": normal(layers, hidden, heads * head_dim, scale=0.05),
        "k_proj": normal(layers, hidden, kv_heads * head_dim, scale=0.05),
        "v_proj": normal(layers, hidden, kv_heads * head_dim, scale=0.05),
        "q_norm": 1 + normal(layers, head_dim, scale=0.1), "k_norm": 1 + normal(layers, head_dim, scale=0.1),
        "o_proj": normal(layers, heads * head_dim, hidden, scale=0.05),
    }
    angles = rng.uniform(0, 300, (batch, head_dim // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    k_cache, v_cache = normal(layers, batch, slots, kv_heads, head_dim), normal(layers, batch, slots, kv_heads, head_dim)
    return normal(batch, hidden), cos, sin, weights, k_cache, v_cache


def _assert_within_scale(got, want, name):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, name
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    assert err <= FP32_SCALE_BOUND, f"{name}: max error {err:.2e} of the scale {scale:.3g}"


# (batch, hidden, heads, kv_heads, head_dim, layers, slots, layer, slot): GQA groups 4/2/1, head_dim
# 8-64 (even, not all multiples of 16), the new slot first / inside / last.
SHAPES = [
    (4, 512, 8, 2, 32, 3, 40, 1, 30),  # the benchmark's attention
    (3, 64, 4, 4, 16, 2, 9, 0, 8),
    (1, 48, 6, 2, 8, 1, 5, 0, 0),
    (2, 96, 4, 2, 64, 2, 70, 1, 37),
    (5, 40, 2, 1, 24, 2, 33, 1, 32),
]


@pytest.mark.parametrize("batch,hidden,heads,kv_heads,head_dim,layers,slots,layer,slot", SHAPES)
def test_equals_the_xla_attention_block(batch, hidden, heads, kv_heads, head_dim, layers, slots, layer, slot):
    x, cos, sin, weights, k_cache, v_cache = _operands(batch, hidden, heads, kv_heads, head_dim, layers, slots)
    # Left padding of row-dependent length, slots past the new one invisible, and (when there are
    # several rows) one row with a hole in the middle of its history.
    valid = np.zeros((batch, slots), bool)
    for b in range(batch):
        valid[b, min(b, slot):slot + 1] = True
    if batch > 1 and slot > 3:
        valid[1, 1:3] = False
    valid = jnp.asarray(valid)
    got = jax.jit(cpu_kernels.decode_attention, static_argnums=(9,))(
        x, cos, sin, valid, slot, layer, weights, k_cache, v_cache, EPS)
    want = jax.jit(_xla_block)(x, cos, sin, valid, slot, layer, weights, k_cache, v_cache)
    for g, w, name in zip(got, want, ("out", "k_new", "v_new")):
        _assert_within_scale(g, w, name)


def test_a_row_without_visible_slots_gets_no_attention():
    """As XLA's masked softmax: the row's attention output is zero, so out = x."""
    x, cos, sin, weights, k_cache, v_cache = _operands(2, 32, 4, 2, 8, 1, 6)
    valid = jnp.asarray(np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool))
    out, _, _ = cpu_kernels.decode_attention(x, cos, sin, valid, 2, 0, weights, k_cache, v_cache, EPS)
    want, _, _ = _xla_block(x, cos, sin, valid, 2, 0, weights, k_cache, v_cache)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(x[1]))
    _assert_within_scale(out, want, "out")


def test_rejects_bad_shapes_and_dtypes_by_name():
    x, cos, sin, weights, k_cache, v_cache = _operands(2, 32, 4, 2, 8, 2, 6)
    valid = jnp.ones((2, 6), bool)
    with pytest.raises(ValueError, match=r"o_proj \(2, 16, 32\) \(expected \(2, 32, 32\)\)"):
        cpu_kernels.decode_attention(x, cos, sin, valid, 0, 0, dict(weights, o_proj=weights["o_proj"][:, :16]),
                                     k_cache, v_cache, EPS)
    with pytest.raises(ValueError, match=r"key_valid \(2, 5\)"):
        cpu_kernels.decode_attention(x, cos, sin, valid[:, :5], 0, 0, weights, k_cache, v_cache, EPS)
    with pytest.raises(ValueError, match=r"float32 operands; got k_cache bfloat16"):
        cpu_kernels.decode_attention(x, cos, sin, valid, 0, 0, weights, k_cache.astype(jnp.bfloat16), v_cache, EPS)


def _dims(**overrides):
    base = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=EPS,
                rope_theta=10_000.0, mrope_section=(4, 2, 2), num_experts=6, top_k=2, moe_intermediate_size=32)
    return decoder.DecoderDims(**{**base, **overrides})


def _decode_program(dims, rt, new_tokens, dtype=jnp.float32, batch=3, max_len=12, position_rows=None):
    params = init_params(decoder.decoder_specs(dims), jax.random.key(0), dtype)
    cache = decoder.init_cache(dims, batch, max_len, dtype)
    embeds = jax.random.normal(jax.random.key(1), (batch, new_tokens, dims.hidden_size), dtype)
    positions = jnp.broadcast_to(jnp.arange(new_tokens)[None, None] + 5, (3, position_rows or batch, new_tokens))
    key_valid = jnp.arange(max_len)[None] < 5 + new_tokens

    def step(params, embeds, cache):
        return decoder.decode(params, embeds, positions, cache, jnp.int32(5), key_valid, dims, rt)

    return step, (params, embeds, cache)


@pytest.mark.parametrize("case,expect_kernel", [
    (dict(), True),
    (dict(rt=Runtime(dtype="float32", param_dtype="float32", attention_impl="xla")), False),
    (dict(new_tokens=2), False),  # several new tokens per row: XLA's attention
    (dict(dtype=jnp.bfloat16), False),
])
def test_decode_runs_the_kernel_only_for_one_float32_token_with_auto_attention(case, expect_kernel):
    rt = case.get("rt", Runtime(dtype="float32", param_dtype="float32"))
    step, args = _decode_program(_dims(), rt, case.get("new_tokens", 1), case.get("dtype", jnp.float32))
    text = jax.jit(step).lower(*args).as_text()
    on_cpu_host = jax.default_backend() == "cpu"  # GPU/TPU hosts never pick a CPU kernel
    assert ("omni_jax_cpu_decode_attention" in text) == (expect_kernel and on_cpu_host)


@pytest.mark.parametrize("scan_layers,position_rows", [(True, None), (False, None), (True, 1)],
                         ids=["scanned", "unrolled", "positions_broadcast_over_rows"])
@pytest.mark.parametrize("dims", [_dims(), _dims(num_heads=2, num_kv_heads=2, head_dim=32, mrope_section=(8, 4, 4), num_experts=0,
                                                 intermediate_size=48)], ids=["moe_gqa", "dense_mha"])
def test_decode_step_through_the_kernel_equals_xla_attention(scan_layers, position_rows, dims):
    """A whole decode step (every layer, the MoE, the cache writes) both ways."""
    outs = []
    for impl in ("auto", "xla"):
        rt = Runtime(dtype="float32", param_dtype="float32", attention_impl=impl, scan_layers=scan_layers)
        step, args = _decode_program(dims, rt, 1, position_rows=position_rows)
        outs.append(jax.jit(step)(*args))
    kernel, xla = outs
    _assert_within_scale(kernel.hidden, xla.hidden, "hidden")
    _assert_within_scale(kernel.cache.k, xla.cache.k, "cache.k")
    _assert_within_scale(kernel.cache.v, xla.cache.v, "cache.v")
    # Only slot 5 (the new token's) of each layer's zero-initialised cache was written.
    for cache in (kernel.cache.k, kernel.cache.v):
        written = np.any(np.asarray(cache) != 0, axis=(1, 3, 4))  # (L, S)
        assert written[:, 5].all() and not np.delete(written, 5, axis=1).any()
