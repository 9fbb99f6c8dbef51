"""The multi-token code predictor (MTP): the residual codebooks 1..G-1 of one codec frame.

Reference: `Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration` (transformers 5.23.0). A small
dense Qwen3 decoder (q/k RMSNorm, 1-D rope, causal) runs once per talker frame with a *fresh* KV cache:

    position 0: the talker's last normed hidden state        (prefill, 2 positions)
    position 1: talker.codec_embedding(c0)                    -> lm_head[0]   predicts c1
    position k: codec_embedding[k-2](c_{k-1}), k = 2..G-1     -> lm_head[k-1] predicts c_k

so `codec_embedding[i]` embeds codebook i+1 and `lm_head[i]` predicts codebook i+1; codebook 0 belongs to
the talker (its own `codec_embedding` and `codec_head`).

Parameter tree (paths mirror the checkpoint's `talker.code_predictor.*` keys; the per-group embeddings and
heads are PyTorch `ModuleList`s, so they are dicts keyed "0".."G-2" to keep the key map derived):

    model/layers/...                       stacked dense decoder layers (`nn/decoder.py`)
    model/norm/weight                      (hidden,)
    model/codec_embedding/{i}/weight       (vocab, hidden)   i = 0..G-2
    lm_head/{i}/kernel                     (hidden, vocab)   i = 0..G-2

The whole per-frame loop is one jittable function (`predict_residual_codes`): a 2-token prefill, then the
remaining groups one token at a time, unrolled. `stack_heads` turns the per-group dicts into (G-1, ...)
arrays for the teacher-forced (training) path, which applies every head at once.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from omni_jax.config import CodePredictorConfig, Runtime
from omni_jax.generate import SamplingConfig, sample_next
from omni_jax.nn import decoder
from omni_jax.nn.params import ParamSpec

__all__ = [
    "DEFAULT_SAMPLING",
    "code_predictor_dims",
    "code_predictor_specs",
    "Heads",
    "stack_heads",
    "teacher_forced_logits",
    "ResidualCodes",
    "predict_residual_codes",
]

# What the reference passes to `code_predictor.generate` when the talker samples (temperature stays 1.0);
# with a greedy talker the predictor is greedy too (`_prepare_generation_config`).
DEFAULT_SAMPLING = SamplingConfig(do_sample=True, temperature=1.0, top_k=50, top_p=0.8)


def code_predictor_dims(cfg: CodePredictorConfig) -> decoder.DecoderDims:
    return decoder.DecoderDims.from_config(cfg)


def _check(cfg: CodePredictorConfig) -> None:
    if cfg.hidden_act != "silu":
        raise ValueError(f"code predictor hidden_act={cfg.hidden_act!r}: only 'silu' is implemented")
    if cfg.attention_bias:
        raise ValueError("code predictor attention_bias=True is not implemented (no Qwen3-Omni checkpoint uses it)")
    if cfg.num_code_groups < 2:
        raise ValueError(f"num_code_groups={cfg.num_code_groups}: the code predictor needs at least 2 groups")


def code_predictor_specs(cfg: CodePredictorConfig) -> dict:
    """ParamSpec tree of `talker.code_predictor` (see the module docstring for the layout)."""
    _check(cfg)
    v, h, std = cfg.vocab_size, cfg.hidden_size, cfg.initializer_range
    groups = cfg.num_code_groups - 1
    model = {
        "codec_embedding": {
            str(i): {"weight": ParamSpec((v, h), ("vocab", "embed"), std=std)} for i in range(groups)
        }
    }
    model.update(decoder.decoder_specs(code_predictor_dims(cfg)))
    return {
        "model": model,
        "lm_head": {str(i): {"kernel": ParamSpec((h, v), ("embed", "vocab"), std=std)} for i in range(groups)},
    }


class Heads(NamedTuple):
    embeddings: jax.Array  # (G-1, V, D): embeddings[i] embeds codebook i+1
    lm_heads: jax.Array  # (G-1, D, V): lm_heads[i] predicts codebook i+1


def stack_heads(cp_params: dict) -> Heads:
    """The per-group `codec_embedding` / `lm_head` dicts as stacked arrays (indexable by a traced group)."""
    emb, head = cp_params["model"]["codec_embedding"], cp_params["lm_head"]
    n = len(emb)
    return Heads(
        jnp.stack([emb[str(i)]["weight"] for i in range(n)]),
        jnp.stack([head[str(i)]["kernel"] for i in range(n)]),
    )


def teacher_forced_logits(
    cp_params: dict,
    talker_hidden_bd: jax.Array,
    first_embed_bd: jax.Array,
    residual_codes_bk: jax.Array,
    cfg: CodePredictorConfig,
    rt: Runtime,
) -> jax.Array:
    """Logits of every residual group given the true codes (training, parity).

    talker_hidden_bd: (B, D) the talker's last normed hidden state of the frame's step.
    first_embed_bd: (B, D) `talker.codec_embedding(c0)`.
    residual_codes_bk: (B, G-1) int, codes c1..c_{G-1} (the last one is only a target, never an input).
    Returns (B, G-1, V): entry g is `lm_head[g]` at position g+1, the distribution of c_{g+1}.
    """
    dtype = jnp.dtype(rt.dtype)
    heads = stack_heads(cp_params)
    groups = cfg.num_code_groups - 1
    b = talker_hidden_bd.shape[0]
    inputs = residual_codes_bk[:, : groups - 1]  # (B, G-2): c1..c_{G-2}
    # embeddings[g](c_{g+1}) for g = 0..G-3, one table per group.
    rest = jax.vmap(lambda table, ids: jnp.take(table, ids, axis=0), in_axes=(0, 1), out_axes=1)(
        heads.embeddings[: groups - 1], inputs
    )
    x = jnp.concatenate([talker_hidden_bd[:, None], first_embed_bd[:, None], rest.astype(first_embed_bd.dtype)], 1)
    x = x.astype(dtype)
    seq = x.shape[1]
    positions = jnp.broadcast_to(jnp.arange(seq), (b, seq))
    out = decoder.prefill(cp_params["model"], x, positions, jnp.ones((b, seq), jnp.int32), code_predictor_dims(cfg), rt)
    hidden = out.hidden[:, 1:]  # (B, G-1, D): position g+1 predicts c_{g+1}
    return jnp.einsum("bgd,gdv->bgv", hidden, heads.lm_heads.astype(dtype))


class ResidualCodes(NamedTuple):
    codes: jax.Array  # (B, G-1) int32: c1..c_{G-1}
    embeds: jax.Array  # (B, G-1, D): codec_embedding[g-1](c_g), g = 1..G-1 (the talker sums them)


def predict_residual_codes(
    cp_params: dict,
    talker_hidden_bd: jax.Array,
    first_embed_bd: jax.Array,
    key: jax.Array,
    cfg: CodePredictorConfig,
    rt: Runtime,
    *,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
) -> ResidualCodes:
    """One frame's residual codes for every row, with a fresh cache (the reference's per-step
    `code_predictor.generate(inputs_embeds=[past_hidden, E(c0)], max_new_tokens=G-1)`).

    talker_hidden_bd: (B, D) the talker's last normed hidden state; first_embed_bd: (B, D)
    `talker.codec_embedding(c0)`. key: PRNG key (unused when `sampling.do_sample` is False).
    sampling: the reference's predictor settings (`DEFAULT_SAMPLING`, or `SamplingConfig()` for greedy).
    Also returns the residual codes' embeddings, which the talker sums into its next input.

    The G-1 steps and the predictor's layers are unrolled: every group's embedding table, head and
    every layer's weights are then static operands. A scan indexes them with a traced step, and on
    CPU each such index copies the matrix; inside the talker's frame loop that was a third of the
    predictor's time. The graph is small (G-1 steps of a few layers), so the unrolled compile is cheap.
    """
    dtype = jnp.dtype(rt.dtype)
    dims = code_predictor_dims(cfg)
    rt_unrolled = dataclasses.replace(rt, scan_layers=False)
    groups = cfg.num_code_groups - 1
    b = talker_hidden_bd.shape[0]
    tables = [cp_params["model"]["codec_embedding"][str(g)]["weight"] for g in range(groups)]
    lm_heads = [cp_params["lm_head"][str(g)]["kernel"] for g in range(groups)]
    no_seen = jnp.zeros((b, lm_heads[0].shape[-1]), bool)  # the predictor has no repetition penalty
    keys = jax.random.split(key, groups)

    def sample(hidden_bd, g: int):
        logits = jnp.dot(hidden_bd, lm_heads[g].astype(dtype))
        return sample_next(logits, no_seen, keys[g], sampling)

    x = jnp.stack([talker_hidden_bd, first_embed_bd.astype(talker_hidden_bd.dtype)], axis=1).astype(dtype)
    cache = decoder.init_cache(dims, b, cfg.num_code_groups, dtype)
    # Every slot up to the query is valid (no padding); `decoder.decode` adds causality, also between the
    # two prompt positions. The 2-token prompt goes through the decode path too: a sequence this short
    # gains nothing from the flash kernel that `prefill` would dispatch to on GPU.
    key_valid = jnp.ones((b, cfg.num_code_groups), bool)
    out = decoder.decode(
        cp_params["model"], x, jnp.broadcast_to(jnp.arange(2), (b, 2)), cache, 0, key_valid, dims, rt_unrolled
    )
    cache = out.cache
    codes = [sample(out.hidden[:, -1], 0)]
    embeds = []
    for g in range(1, groups):
        e = jnp.take(tables[g - 1], codes[-1], axis=0).astype(dtype)  # embeds codebook g
        embeds.append(e)
        step = decoder.decode(
            cp_params["model"], e[:, None], jnp.full((b, 1), g + 1), cache, g + 1, key_valid, dims, rt_unrolled
        )
        cache = step.cache
        codes.append(sample(step.hidden[:, 0], g))
    embeds.append(jnp.take(tables[groups - 1], codes[-1], axis=0).astype(dtype))
    return ResidualCodes(jnp.stack(codes, axis=1).astype(jnp.int32), jnp.stack(embeds, axis=1))
