"""The thinker: token embeddings, the MoE text decoder, the untied `lm_head`.

Parameter tree (paths mirror the hub checkpoint's `thinker.*` keys):

    model/embed_tokens/weight   (vocab, hidden)
    model/layers/...            stacked decoder layers (see `nn/decoder.py`)
    model/norm/weight           (hidden,)
    lm_head/kernel              (hidden, vocab)   not tied to the embeddings

    audio_tower/...             the AuT audio encoder (`audio_encoder.py`)
    visual/...                  the vision encoder with its DeepStack mergers (`vision_encoder.py`)

Multimodal inputs arrive as encoder outputs (`MediaEmbeds`) and are scattered into the placeholder
token positions with static shapes; DeepStack features are added to the hidden states at visual
positions after decoder layers 0..n-1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from omni_jax.audio_encoder import audio_encoder_specs
from omni_jax.config import Runtime, ThinkerConfig
from omni_jax.nn import decoder
from omni_jax.nn.dense import project
from omni_jax.sharding import constrain
from omni_jax.vision_encoder import vision_encoder_specs
from omni_jax.nn.params import ParamSpec

__all__ = [
    "thinker_specs", "text_dims", "embed_tokens", "lm_logits", "MediaEmbeds", "scatter_rows", "merge_media",
    "ThinkerOutput", "forward",
]


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
        "audio_tower": audio_encoder_specs(cfg.audio_config),
        "visual": vision_encoder_specs(cfg.vision_config),
    }


def embed_tokens(params: dict, input_ids_bs: jax.Array, dtype) -> jax.Array:
    """(B, S) ids -> (B, S, D) embeddings in `dtype`."""
    x = jnp.take(params["model"]["embed_tokens"]["weight"], input_ids_bs, axis=0).astype(dtype)
    return constrain(x, decoder.RESIDUAL_AXES)


def lm_logits(params: dict, hidden_bsd: jax.Array) -> jax.Array:
    """(B, S, D) final-normed hidden -> (B, S, vocab) logits in the hidden dtype.

    Vocabulary-parallel under a mesh: `lm_head` is split on vocab over `tensor` and so are the logits.
    At decode on CPU (float32) the product is `cpu_kernels.rows_matmul` (see `nn/dense.project`).
    """
    logits = project(hidden_bsd, params["lm_head"]["kernel"])
    return constrain(logits, ("batch", "seq", "vocab"))


class MediaEmbeds(NamedTuple):
    """Encoder outputs to place at the placeholder tokens, in the order the tokens appear.

    Each array may carry padding rows past the number of placeholders (encoders bucket their
    outputs); only the first `count(placeholder)` rows are used.
    """

    audio: jax.Array | None = None  # (Na, D) audio tower output
    image: jax.Array | None = None  # (Ni, D) vision merger output for images
    video: jax.Array | None = None  # (Nv, D) vision merger output for videos
    image_deepstack: jax.Array | None = None  # (n, Ni, D) DeepStack merger outputs for images
    video_deepstack: jax.Array | None = None  # (n, Nv, D)


def scatter_rows(x_bsd: jax.Array, mask_bs: jax.Array, rows_nd: jax.Array) -> jax.Array:
    """x with the rows of `rows_nd` placed, in order, at the True positions of `mask_bs` (row-major).

    The jit-friendly form of torch's `masked_scatter`: position p gets row `cumsum(mask)[p] - 1`.
    """
    flat_mask = mask_bs.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat_mask.astype(jnp.int32)) - 1, 0, rows_nd.shape[0] - 1)
    placed = jnp.take(rows_nd.astype(x_bsd.dtype), index, axis=0).reshape(x_bsd.shape)
    return jnp.where(mask_bs[..., None], placed, x_bsd)


def merge_media(
    embeds_bsd: jax.Array, input_ids_bs: jax.Array, media: MediaEmbeds, cfg: ThinkerConfig
) -> tuple[jax.Array, jax.Array | None]:
    """Places encoder outputs at their placeholder tokens; builds the DeepStack additions.

    Returns (embeds (B, S, D), deepstack (n, B, S, D) or None). DeepStack features of images and
    videos go to their own token positions (zeros elsewhere), which is what the reference's joint
    visual mask amounts to.
    """
    x = embeds_bsd
    placements = (
        (media.audio, cfg.audio_token_id),
        (media.image, cfg.image_token_id),
        (media.video, cfg.video_token_id),
    )
    for rows, token_id in placements:
        if rows is not None:
            x = scatter_rows(x, input_ids_bs == token_id, rows)
    deepstack = None
    for rows, token_id in ((media.image_deepstack, cfg.image_token_id), (media.video_deepstack, cfg.video_token_id)):
        if rows is None:
            continue
        mask = input_ids_bs == token_id
        zeros = jnp.zeros_like(x)
        layer_feats = jnp.stack([scatter_rows(zeros, mask, rows[j]) for j in range(rows.shape[0])])
        deepstack = layer_feats if deepstack is None else deepstack + layer_feats
    return x, deepstack


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
    media: MediaEmbeds | None = None,
    use_deepstack: bool = True,
    return_all_hidden: bool = False,
) -> ThinkerOutput:
    """Full-sequence forward (training and `thinker_logits`): (B, S) ids -> (B, S, vocab) logits.

    media: encoder outputs placed at the placeholder tokens (see `merge_media`); `use_deepstack`
    False drops the DeepStack additions (an ablation, not the reference behaviour).
    """
    x = embed_tokens(params, input_ids_bs, jnp.dtype(rt.dtype))
    deepstack = None
    if media is not None:
        x, deepstack = merge_media(x, input_ids_bs, media, cfg)
    out = decoder.prefill(
        params["model"], x, position_ids_3bs, attention_mask_bs, text_dims(cfg), rt,
        deepstack_nbsd=deepstack if use_deepstack else None, return_all_hidden=return_all_hidden,
    )
    return ThinkerOutput(lm_logits(params, out.hidden), out.router_logits, out.all_hidden)
