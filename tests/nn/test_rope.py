"""Interleaved M-RoPE (pitfall P1) and fp32 rotary tables (P2), against the reference module."""

import numpy as np
import pytest
import torch

from omni_jax.nn.rope import apply_rotary, inverse_frequencies, mrope_cos_sin, mrope_section_index


def test_interleave_layout_of_the_real_checkpoint():
    index = mrope_section_index((24, 20, 20))
    assert "".join("THW"[i] for i in index) == "THW" * 20 + "TTTT"


def _reference_rotary(head_dim, theta, section):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextRotaryEmbedding

    cfg = Qwen3OmniMoeTextConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                 rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                  "mrope_section": list(section), "interleaved": True})
    return Qwen3OmniMoeThinkerTextRotaryEmbedding(cfg)


def test_cos_sin_match_reference_with_distinct_thw_rows():
    rng = np.random.default_rng(0)
    for head_dim, section in ((128, (24, 20, 20)), (16, (4, 2, 2))):
        # T, H and W rows all differ, and positions reach past 500 (short prompts hide RoPE bugs).
        pos = np.stack([np.arange(600), 3 * np.arange(600) % 97, rng.integers(0, 700, 600)])[:, None, :]
        ref = _reference_rotary(head_dim, 1e6, section)
        with torch.no_grad():
            cos_r, sin_r = ref(torch.zeros(1, dtype=torch.float32), torch.tensor(pos))
        cos, sin = mrope_cos_sin(pos.astype(np.float32), head_dim, 1e6, section, np.float32)
        np.testing.assert_allclose(np.asarray(cos), cos_r.numpy(), atol=2e-6)
        np.testing.assert_allclose(np.asarray(sin), sin_r.numpy(), atol=2e-6)


@pytest.mark.parametrize("head_dim,theta", [(128, 1e6), (128, 1e4), (64, 1e6), (80, 1e4), (16, 1e6)])
def test_inverse_frequencies_are_fp32_like_torch(head_dim, theta):
    ref = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    ours = inverse_frequencies(head_dim, theta)
    assert ours.dtype == np.float32
    # torch's fp32 pow may be 1 ulp off the correctly rounded power; nothing more is allowed, on any
    # CPU (numpy's own fp32 pow was 2 ulp off on an AVX-512 machine, and this caught it).
    np.testing.assert_array_max_ulp(ours, ref.numpy(), maxulp=1)


def test_rotate_half_pairs_i_with_i_plus_half():
    x = np.zeros((1, 1, 1, 8), np.float32)
    x[..., 0] = 1.0
    angle = np.full((1, 1, 8), np.pi / 2, np.float32)
    y = np.asarray(apply_rotary(x, np.cos(angle), np.sin(angle)))
    # dim 0 rotates into dim 4 (its rotate_half partner), not dim 1.
    np.testing.assert_allclose(y[0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0], atol=1e-6)
