"""The thinker: token embeddings, the MoE text decoder, the untied `lm_head`.

Parameter tree (paths mirror the hub checkpoint's `thinker.*` keys):

    model/embed_tokens/weight   (vocab, hidden)
    model/layers/...            stacked decoder layers (see `nn/decoder.py`)
    model/norm/weight           (hidden,)
    lm_head/kernel              (hidden, vocab)   not tied to the embeddings

The audio tower (`audio_tower/...`) and vision encoder (`visual/...`) join this tree when the
perception components land; until then their checkpoint keys are reported by the converter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from omni_jax.config import Runtime, ThinkerConfig
from omni_jax.nn import decoder
from omni_jax.nn.params import ParamSpec

__all__ = ["thinker_specs", "text_dims", "embed_tokens", "lm_logits", "ThinkerOutput", "forward"]


def text_dims(cfg: ThinkerConfig) -> decoder.DecoderDims:
    return decoder.DecoderDims.from_config(cfg.text_config)


def thinker_specs(cfg: ThinkerConfig) -> dict:
    text = cfg.text_config
    std = text.initializer_range
    model = {"embed_tokens": {"weight": ParamSpec((text.vocab_size, text.hidden_size), ("vocab", "embed"), std=std)}}
    model.update(decoder.decoder_specs(text_dims(cfg)))
    return {
        "model": model,
        "lm_head": {"kernel": ParamSpec((text.hidden_size, text.vocab_size), ("embed", "vocab"), std=std)},
    }


def embed_tokens(params: dict, input_ids_bs: jax.Array, dtype) -> jax.Array:
    """(B, S) ids -> (B, S, D) embeddings in `dtype`."""
    return jnp.take(params["model"]["embed_tokens"]["weight"], input_ids_bs, axis=0).astype(dtype)


def lm_logits(params: dict, hidden_bsd: jax.Array) -> jax.Array:
    """(B, S, D) final-normed hidden -> (B, S, vocab) logits in the hidden dtype."""
    return jnp.dot(hidden_bsd, params["lm_head"]["kernel"].astype(hidden_bsd.dtype))


class ThinkerOutput(NamedTuple):
    logits: jax.Array  # (B, S, vocab)
    router_logits: jax.Array  # (L, B*S, E)
    all_hidden: jax.Array | None  # (L, B, S, D)


def forward(
    params: dict,
    input_ids_bs: jax.Array,
    attention_mask_bs: jax.Array,
    position_ids_3bs: jax.Array,
    cfg: ThinkerConfig,
    rt: Runtime,
    *,
    return_all_hidden: bool = False,
) -> ThinkerOutput:
    """Full-sequence text forward (training and `thinker_logits`)."""
    x = embed_tokens(params, input_ids_bs, jnp.dtype(rt.dtype))
    out = decoder.prefill(
        params["model"], x, position_ids_3bs, attention_mask_bs, text_dims(cfg), rt,
        return_all_hidden=return_all_hidden,
    )
    return ThinkerOutput(lm_logits(params, out.hidden), out.router_logits, out.all_hidden)
