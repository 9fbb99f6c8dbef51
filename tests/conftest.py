"""Shared fixtures: tiny configurations and their PyTorch references, built once per test worker."""

from __future__ import annotations

import dataclasses
import functools
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from omni_jax.config import OmniConfig, Runtime, ThinkerTextConfig, preset  # noqa: E402

FP32 = Runtime(dtype="float32", param_dtype="float32")


def thinker_only(config: OmniConfig) -> OmniConfig:
    return config.replace(talker_config=None, code2wav_config=None, enable_audio_output=False)


def with_text(config: OmniConfig, **text_overrides) -> OmniConfig:
    thinker = config.thinker_config
    text = dataclasses.replace(thinker.text_config, **text_overrides)
    return config.replace(thinker_config=dataclasses.replace(thinker, text_config=text))


# Text-decoder shapes exercised by the parity tests: (name, overrides of the tiny preset's text config).
TEXT_SHAPES = {
    "tiny": {},
    "gqa4_hd32": dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                      mrope_section=(8, 4, 4), num_experts=16, num_experts_per_tok=4, moe_intermediate_size=48,
                      num_hidden_layers=2),
    "mha_unnormed": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=24, mrope_section=(6, 3, 3),
                         norm_topk_prob=False, num_experts=6, num_experts_per_tok=3, num_hidden_layers=2),
}


@functools.lru_cache(maxsize=None)
def text_config(name: str) -> OmniConfig:
    return thinker_only(with_text(preset("tiny"), **TEXT_SHAPES[name]))


@functools.lru_cache(maxsize=None)
def reference_and_params(name: str, seed: int = 0):
    """(config, torch reference model with re-drawn weights, fp32 omni_jax params) for a shape."""
    from convert.hf_to_jax import convert_tensors
    from convert.reference import randomize_, reference_model, state_dict_tensors
    from omni_jax.model import model_specs
    from omni_jax.nn.params import unflatten

    config = text_config(name)
    ref = reference_model(config, seed=seed)
    randomize_(ref, seed)
    params = unflatten(
        convert_tensors(state_dict_tensors(ref), model_specs(config), dtype="float32", skip_absent_components=True)
    )
    return config, ref, params


def left_padded_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int, pads=(0, 5, 11)):
    ids = rng.integers(0, vocab, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    for row, pad in enumerate(pads[:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


@pytest.fixture
def rng():
    return np.random.default_rng(0)
