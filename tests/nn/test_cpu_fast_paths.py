"""The CPU fast paths added for thinker speed: equal to their plain forms.

* causal self-attention in query blocks (`attention._causal_blocks`) == one masked square;
* the grouped SwiGLU's multi-height tile ladder (`grouped_matmul._swiglu_tiled`) == per-group SwiGLU,
  with skewed, empty and one-row groups, padding rows and an output width other than the input's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.nn import attention
from omni_jax.nn import grouped_matmul as gm
from tests.nn.test_grouped_matmul import _swiglu_reference


@pytest.mark.parametrize("seq", [256, 250])  # 250: blocks of 63, 63, 63, 61
def test_causal_blocks_equal_one_masked_square(seq):
    rng = np.random.default_rng(seq)
    b, hq, hkv, d = 2, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, seq, h, d)), jnp.float32) for h in (hq, hkv, hkv))
    pad = np.zeros((b, seq), np.int32)
    pad[0, :] = 1
    pad[1, 37:] = 1  # left padding: segment 0 then 1
    segment_ids = jnp.asarray(pad)
    blocks = attention._causal_blocks(q, k, v, segment_ids, d ** -0.5)
    mask = attention.structure_mask(seq, seq, segment_ids_q=segment_ids, causal=True, batch=b)
    full = attention.masked_attention(q, k, v, mask, d ** -0.5)
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(full), rtol=1e-5, atol=1e-6)
    if seq >= attention._CAUSAL_SPLIT_MIN:  # the entry point takes the block path
        entry = attention.self_attention(q, k, v, segment_ids=segment_ids, causal=True, impl="xla")
        np.testing.assert_array_equal(np.asarray(entry), np.asarray(blocks))


@pytest.mark.parametrize("tiles", [(64, 16), (32, 4), (16,)])
@pytest.mark.parametrize("out_width", [16, 8])  # 16: the output starts from x; 8: from zeros
def test_tile_ladder_matches_per_group_swiglu(tiles, out_width):
    rng = np.random.default_rng(sum(tiles) + out_width)
    sizes = [150, 0, 1, 61, 17, 0, 64, 3, 95]  # 391 rows; 9 padding rows past them
    rows = sum(sizes) + 9
    x = rng.standard_normal((rows, 16)).astype(np.float32)
    w = [rng.standard_normal((2, len(sizes)) + shape).astype(np.float32) * 0.3
         for shape in ((16, 12), (16, 12), (12, out_width))]
    out = gm._swiglu_tiled(jnp.asarray(x), *(jnp.asarray(a) for a in w), jnp.asarray(sizes, jnp.int32),
                           jnp.int32(1), None, tiles=tiles)
    expected = _swiglu_reference(x, w[0][1], w[1][1], w[2][1], sizes)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    assert not np.asarray(out)[sum(sizes):].any()  # padding rows are zeros


@pytest.mark.parametrize("tiles", [(8, 4, 2), (6, 4)])
def test_bad_ladders_are_refused(tiles):
    with pytest.raises(ValueError, match="one or two tile heights"):
        gm._swiglu_tiled(jnp.zeros((8, 4)), jnp.zeros((2, 4, 3)), jnp.zeros((2, 4, 3)), jnp.zeros((2, 3, 4)),
                         jnp.asarray([4, 4], jnp.int32), None, None, tiles=tiles)


def test_default_ladder_has_two_heights_for_prefill_and_one_for_decode():
    assert gm._swiglu_tile_ladder(4096, 32, 1024) == (128, 32)  # benchmark prefill: 1024 tokens x top-4
    assert gm._swiglu_tile_ladder(16, 32, 4) == (4,)  # decode: 4 tokens x top-4
