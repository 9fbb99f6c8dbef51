"""Code predictor (MTP) vs the PyTorch reference on tiny random configs (fp32).

Covers pitfall P11's "fresh code-predictor cache per frame" and "16 code groups": per-group logits
with teacher forcing, the greedy per-frame loop token for token against the reference's
`code_predictor.generate`, and sampled codes within the reference's top-k 50 / top-p 0.8 nucleus.

`talker_reference` (shared with test_talker_parity.py) builds the whole reference model once per
shape and converts its `talker.*` weights through the strict converter, so a talker key that no
parameter consumes (or a parameter no key fills) fails here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax import code_predictor as cp
from omni_jax import talker
from omni_jax.config import OmniConfig, preset
from omni_jax.generate import SamplingConfig
from tests.conftest import FP32

# max |difference| <= 1e-5 x max |reference| (measured: ~3e-7).
TOLERANCE = 1e-5


def _tiny() -> OmniConfig:
    return preset("tiny")


def _g16() -> OmniConfig:
    """The real checkpoint's 16 code groups; MHA predictor, GQA 4:1 talker, un-normalised top-3 of 6."""
    config = preset("tiny")
    t = config.talker_config
    text = dataclasses.replace(
        t.text_config, num_attention_heads=4, num_key_value_heads=1, head_dim=8, mrope_section=(2, 1, 1),
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
    )
    predictor = dataclasses.replace(
        t.code_predictor_config, num_code_groups=16, vocab_size=40, num_key_value_heads=4, num_hidden_layers=3,
    )
    return config.replace(
        talker_config=dataclasses.replace(t, text_config=text, code_predictor_config=predictor, num_code_groups=16)
    )


TALKER_SHAPES = {"tiny": _tiny, "g16": _g16}


@functools.lru_cache(maxsize=None)
def talker_reference(name: str, seed: int = 0):
    """(config, fp32 reference `Qwen3OmniMoeForConditionalGeneration`, omni_jax talker params)."""
    from convert.hf_to_jax import convert_tensors
    from convert.reference import randomize_, reference_model, state_dict_tensors
    from omni_jax.nn.params import unflatten

    config = TALKER_SHAPES[name]()
    ref = reference_model(config, seed=seed)
    randomize_(ref, seed)
    tensors = [t for t in state_dict_tensors(ref) if t[0].startswith("talker.")]
    flat = convert_tensors(tensors, {"talker": talker.talker_specs(config.talker_config)}, dtype="float32")
    params = jax.tree.map(jnp.asarray, unflatten(flat)["talker"])
    return config, ref, params


def _frame_inputs(ref, config, rng, batch):
    """Random talker hidden states and codebook-0 tokens, and the reference's 2-token prefill input."""
    d = config.talker_config.text_config.hidden_size
    hidden = rng.normal(size=(batch, d)).astype(np.float32)
    c0 = rng.integers(0, config.talker_config.code_predictor_config.vocab_size, batch)
    with torch.no_grad():
        first = ref.talker.model.codec_embedding(torch.tensor(c0))
    prefix = torch.cat([torch.tensor(hidden)[:, None], first[:, None]], 1)
    return hidden, c0, prefix


@functools.lru_cache(maxsize=None)
def _predict_fn(name: str, sampling: SamplingConfig):
    config, _, _ = talker_reference(name)
    tc = config.talker_config

    @jax.jit
    def fn(params, hidden, c0, key):
        first = talker.codec_embed(params, c0, jnp.float32)
        return cp.predict_residual_codes(params["code_predictor"], hidden, first, key, tc.code_predictor_config, FP32,
                                         sampling=sampling)

    return fn


def _reference_teacher_forced(ref, prefix, codes):
    """Reference per-group logits (B, G-1, V): lm_head[g] at position g+1 of the teacher-forced sequence."""
    m = ref.talker.code_predictor
    groups = len(m.lm_head)
    with torch.no_grad():
        xs = [prefix] + [m.model.codec_embedding[g](torch.tensor(codes[:, g]))[:, None] for g in range(groups - 1)]
        hidden = m.model(inputs_embeds=torch.cat(xs, 1)).last_hidden_state
        return torch.stack([m.lm_head[g](hidden[:, g + 1]) for g in range(groups)], 1).numpy()


@pytest.mark.parametrize("name", sorted(TALKER_SHAPES))
def test_teacher_forced_logits_per_group_match(name, rng):
    config, ref, params = talker_reference(name)
    tc = config.talker_config
    hidden, c0, prefix = _frame_inputs(ref, config, rng, 3)
    codes = rng.integers(0, tc.code_predictor_config.vocab_size, (3, tc.num_code_groups - 1))
    expected = _reference_teacher_forced(ref, prefix, codes)
    first = talker.codec_embed(params, c0, jnp.float32)
    got = np.asarray(
        jax.jit(cp.teacher_forced_logits, static_argnums=(4, 5))(
            params["code_predictor"], hidden, first, codes, tc.code_predictor_config, FP32
        )
    )
    assert got.shape == expected.shape == (3, tc.num_code_groups - 1, tc.code_predictor_config.vocab_size)
    for g in range(expected.shape[1]):  # every group's own head, not only the overall maximum
        scale = np.abs(expected[:, g]).max()
        assert np.abs(got[:, g] - expected[:, g]).max() <= TOLERANCE * scale, f"group {g}"


@pytest.mark.parametrize("name", sorted(TALKER_SHAPES))
def test_greedy_frame_equals_reference_generate(name, rng):
    config, ref, params = talker_reference(name)
    groups = config.talker_config.num_code_groups - 1
    hidden, c0, prefix = _frame_inputs(ref, config, rng, 5)
    with torch.no_grad():
        expected = ref.talker.code_predictor.generate(
            inputs_embeds=prefix, max_new_tokens=groups, do_sample=False
        ).numpy()
    out = _predict_fn(name, SamplingConfig())(params, hidden, c0, jax.random.key(0))
    assert expected.shape == (5, groups)
    np.testing.assert_array_equal(np.asarray(out.codes), expected)
    # The embeddings handed back to the talker are the per-group tables at the predicted codes.
    m = ref.talker.code_predictor
    with torch.no_grad():
        expected_embeds = torch.stack(
            [m.model.codec_embedding[g](torch.tensor(expected[:, g])) for g in range(groups)], 1
        ).numpy()
    np.testing.assert_allclose(np.asarray(out.embeds), expected_embeds, rtol=0, atol=1e-7)


def test_fresh_cache_per_frame_makes_rows_independent(rng):
    """A row's codes do not depend on the other rows nor on a previous frame (no state is carried)."""
    config, ref, params = talker_reference("g16")
    hidden, c0, _ = _frame_inputs(ref, config, rng, 5)
    fn = _predict_fn("g16", SamplingConfig())
    together = np.asarray(fn(params, hidden, c0, jax.random.key(0)).codes)
    reversed_rows = np.asarray(fn(params, hidden[::-1], c0[::-1], jax.random.key(0)).codes)
    np.testing.assert_array_equal(together, reversed_rows[::-1])


def test_sampled_codes_lie_in_the_reference_nucleus(rng):
    """Sampling (top-k 50, top-p 0.8, temperature 1): every drawn code is in the set the reference's
    warpers keep for that group's logits given the codes drawn before it; draws vary with the key
    and repeat with the same key."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    config, ref, params = talker_reference("g16")
    tc = config.talker_config
    hidden, c0, prefix = _frame_inputs(ref, config, rng, 4)
    fn = _predict_fn("g16", cp.DEFAULT_SAMPLING)
    draws = [np.asarray(fn(params, hidden, c0, jax.random.key(seed)).codes) for seed in range(3)]
    np.testing.assert_array_equal(draws[0], np.asarray(fn(params, hidden, c0, jax.random.key(0)).codes))
    assert not (np.array_equal(draws[0], draws[1]) and np.array_equal(draws[1], draws[2]))
    top_k, top_p = TopKLogitsWarper(50), TopPLogitsWarper(0.8)
    for codes in draws:
        logits = torch.tensor(_reference_teacher_forced(ref, prefix, codes))
        for g in range(tc.num_code_groups - 1):
            kept = top_p(None, top_k(None, logits[:, g].clone())).isfinite().numpy()
            assert kept[np.arange(4), codes[:, g]].all(), f"group {g}: a code outside the nucleus"
            assert (kept.sum(-1) < tc.code_predictor_config.vocab_size).all()  # the nucleus does cut
