"""The talker: codec-token MoE decoder, its input construction from thinker outputs, and the jitted
speech-code generation loop (talker + code predictor).

Reference: `Qwen3OmniMoeTalkerForConditionalGeneration` and the talker part of
`Qwen3OmniMoeForConditionalGeneration.generate` (transformers 5.23.0).

Parameter tree (paths mirror the checkpoint's `talker.*` keys):

    model/codec_embedding/weight                 (vocab, hidden)   codebook-0 ids and codec specials
    model/layers/...                             MoE decoder layers with the shared expert (`nn/decoder.py`)
    model/norm/weight                            (hidden,)
    codec_head/kernel                            (hidden, vocab)   not tied to codec_embedding
    text_projection/linear_fc{1,2}/{kernel,bias}     thinker_hidden -> intermediate -> hidden, SiLU between
    hidden_projection/linear_fc{1,2}/{kernel,bias}   same shape
    code_predictor/...                           see `code_predictor.py`

Speech generation, in the reference's terms:

1. `plan_talker_inputs` (numpy, on token ids) and `build_talker_inputs` (jittable) turn the thinker's
   prompt, generated ids, input embeddings (`hidden_states[0]`) and `accept_hidden_layer` hidden states
   into the talker prompt: the user turns (text positions: `text_projection(thinker embeddings)`;
   audio/image/video positions: `hidden_projection(thinker hidden)`), right-aligned and left-padded per
   row, then the 9-position assistant prefix; plus `trailing_text` (one entry per talker step, with the
   `tts_eos` marker after each row's thinker EOS and `tts_pad` after it).
2. `generate_codes` (one jitted call; or `start` + `advance` to stream): talker prefill, then per frame
   `frame_step` (code predictor for codebooks 1..G-1, next input = sum of the G codec embeddings +
   the step's trailing text) and one talker decode step whose `codec_head` logits give the next c0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import code_predictor as cp
from omni_jax.config import OmniConfig, Runtime, TalkerConfig
from omni_jax.generate import SamplingConfig, mark_seen, sample_next
from omni_jax.nn import decoder
from omni_jax.nn.params import ParamSpec

__all__ = [
    "DEFAULT_SAMPLING",
    "GREEDY_SAMPLING",
    "talker_dims",
    "talker_specs",
    "codec_embed",
    "codec_logits",
    "text_projection",
    "hidden_projection",
    "TalkerOutput",
    "forward",
    "prefill",
    "decode_step",
    "text_position_ids",
    "speaker_token_id",
    "default_suppress_tokens",
    "tts_token_ids",
    "TalkerInputPlan",
    "plan_talker_inputs",
    "TalkerInputs",
    "build_talker_inputs",
    "TeacherForcedPlan",
    "plan_teacher_forced",
    "teacher_forced_frame_inputs",
    "frame_step",
    "TalkerState",
    "suppress_mask",
    "start",
    "advance",
    "TalkerCodes",
    "collect_codes",
    "generate_codes",
]

# The reference's talker defaults (`Qwen3OmniMoeForConditionalGeneration.generate`), and its greedy
# mode (`talker_do_sample=False`), which keeps the repetition penalty: it is a processor, not a warper.
DEFAULT_SAMPLING = SamplingConfig(do_sample=True, temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05)
GREEDY_SAMPLING = SamplingConfig(do_sample=False, repetition_penalty=1.05)

# trailing-text entry kinds (`TalkerInputPlan.trailing_kind`)
TEXT, TTS_EOS, TTS_PAD = 0, 1, 2

ASSISTANT_PREFIX_LEN = 9


# ----------------------------------------------------------------------------------------- parameters
def talker_dims(cfg: TalkerConfig) -> decoder.DecoderDims:
    return decoder.DecoderDims.from_config(cfg.text_config)


def _resize_mlp_specs(cfg: TalkerConfig) -> dict:
    t = cfg.text_config
    std = cfg.initializer_range
    return {
        "linear_fc1": {
            "kernel": ParamSpec((cfg.thinker_hidden_size, t.intermediate_size), ("embed", "mlp"), std=std),
            "bias": ParamSpec((t.intermediate_size,), ("mlp",), init="zeros"),
        },
        "linear_fc2": {
            "kernel": ParamSpec((t.intermediate_size, t.hidden_size), ("mlp", "embed"), std=std),
            "bias": ParamSpec((t.hidden_size,), ("embed",), init="zeros"),
        },
    }


def talker_specs(cfg: TalkerConfig) -> dict:
    """ParamSpec tree of `talker` (see the module docstring)."""
    t = cfg.text_config
    if t.hidden_act != "silu":
        raise ValueError(f"talker hidden_act={t.hidden_act!r}: only 'silu' is implemented")
    if cfg.code_predictor_config.num_code_groups != cfg.num_code_groups:
        raise ValueError(
            f"talker num_code_groups={cfg.num_code_groups} differs from the code predictor's "
            f"{cfg.code_predictor_config.num_code_groups}"
        )
    std = t.initializer_range
    model = {"codec_embedding": {"weight": ParamSpec((t.vocab_size, t.hidden_size), ("vocab", "embed"), std=std)}}
    model.update(decoder.decoder_specs(talker_dims(cfg)))
    return {
        "model": model,
        "codec_head": {"kernel": ParamSpec((t.hidden_size, t.vocab_size), ("embed", "vocab"), std=std)},
        "text_projection": _resize_mlp_specs(cfg),
        "hidden_projection": _resize_mlp_specs(cfg),
        "code_predictor": cp.code_predictor_specs(cfg.code_predictor_config),
    }


# ----------------------------------------------------------------------------------------- pieces
def _resize_mlp(p: dict, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    h = jnp.dot(x, p["linear_fc1"]["kernel"].astype(dtype)) + p["linear_fc1"]["bias"].astype(dtype)
    h = jax.nn.silu(h)
    return jnp.dot(h, p["linear_fc2"]["kernel"].astype(dtype)) + p["linear_fc2"]["bias"].astype(dtype)


def text_projection(params: dict, x: jax.Array) -> jax.Array:
    """(..., thinker_hidden) thinker token embeddings -> (..., talker hidden)."""
    return _resize_mlp(params["text_projection"], x)


def hidden_projection(params: dict, x: jax.Array) -> jax.Array:
    """(..., thinker_hidden) thinker `accept_hidden_layer` states -> (..., talker hidden)."""
    return _resize_mlp(params["hidden_projection"], x)


def codec_embed(params: dict, ids: jax.Array, dtype) -> jax.Array:
    """Codec ids (...) -> (..., hidden) through `talker.model.codec_embedding`."""
    return jnp.take(params["model"]["codec_embedding"]["weight"], ids, axis=0).astype(dtype)


def codec_logits(params: dict, hidden: jax.Array) -> jax.Array:
    """(..., hidden) final-normed states -> (..., vocab) codebook-0 logits (`codec_head`)."""
    return jnp.dot(hidden, params["codec_head"]["kernel"].astype(hidden.dtype))


class TalkerOutput(NamedTuple):
    logits: jax.Array  # (B, S, vocab)
    hidden: jax.Array  # (B, S, D) final-normed hidden states
    router_logits: jax.Array  # (L, B*S, E)


def forward(
    params: dict,
    embeds_bsd: jax.Array,
    attention_mask_bs: jax.Array,
    position_ids_3bs: jax.Array,
    cfg: TalkerConfig,
    rt: Runtime,
) -> TalkerOutput:
    """Full-sequence talker forward on input embeddings (the talker never embeds ids itself).

    embeds_bsd: (B, S, D); attention_mask_bs: (B, S) 1 for real tokens (left padding);
    position_ids_3bs: (3, B, S) M-RoPE (T, H, W) rows (`text_position_ids` for text-only prompts).
    """
    x = embeds_bsd.astype(jnp.dtype(rt.dtype))
    out = decoder.prefill(params["model"], x, position_ids_3bs, attention_mask_bs, talker_dims(cfg), rt)
    return TalkerOutput(codec_logits(params, out.hidden), out.hidden, out.router_logits)


def prefill(params, embeds_bsd, attention_mask_bs, position_ids_3bs, cfg: TalkerConfig, rt: Runtime, max_len: int):
    """Prompt pass writing a fresh KV cache of `max_len` slots.

    Returns (logits (B, vocab), hidden (B, D), cache) at the last position (left padding puts every
    row's last real token there).
    """
    dims = talker_dims(cfg)
    dtype = jnp.dtype(rt.dtype)
    cache = decoder.init_cache(dims, embeds_bsd.shape[0], max_len, dtype)
    out = decoder.prefill(
        params["model"], embeds_bsd.astype(dtype), position_ids_3bs, attention_mask_bs, dims, rt, cache=cache
    )
    hidden = out.hidden[:, -1]
    return codec_logits(params, hidden), hidden, out.cache


def decode_step(params, embeds_bd, position_ids_3b, cache, cache_index, key_valid_bk, cfg: TalkerConfig, rt: Runtime):
    """One new position per row at cache slot `cache_index`.

    embeds_bd: (B, D) input embeddings; position_ids_3b: (3, B); key_valid_bk: (B, S_max) the slots
    each row may attend to, the new one included. Returns (logits (B, vocab), hidden (B, D), cache).
    """
    dtype = jnp.dtype(rt.dtype)
    out = decoder.decode(
        params["model"], embeds_bd[:, None].astype(dtype), position_ids_3b[:, :, None], cache, cache_index,
        key_valid_bk, talker_dims(cfg), rt,
    )
    hidden = out.hidden[:, 0]
    return codec_logits(params, hidden), hidden, out.cache


def text_position_ids(attention_mask_bs) -> np.ndarray:
    """(3, B, S) float32 talker positions for a prompt without media grids: `cumsum(mask) - 1` on all
    three rows, 0 at padding (`compute_3d_position_ids` / `_prepare_position_ids_for_generation`).

    With audio/image/video in the user turns the reference instead runs `get_rope_index` on
    `TalkerInputs.input_ids` with the media grids and audio lengths; pass those positions instead.
    """
    mask = np.asarray(attention_mask_bs).astype(np.int64)
    pos = np.where(mask == 0, 0, np.cumsum(mask, -1) - 1)
    return np.broadcast_to(pos[None], (3, *pos.shape)).astype(np.float32)


# ----------------------------------------------------------------------------------------- ids
def speaker_token_id(cfg: TalkerConfig, speaker: str) -> int:
    """Codec id of a speaker name (case-insensitive); an unknown name is an error listing the valid ones."""
    table = dict(cfg.speaker_id)
    if not table:
        raise ValueError("this checkpoint's talker config lists no speakers (talker_config.speaker_id is empty)")
    sid = table.get(str(speaker).lower())
    if sid is None:
        raise ValueError(f"unknown speaker {speaker!r}; valid speakers: {', '.join(sorted(table))}")
    return int(sid)


def default_suppress_tokens(cfg: TalkerConfig) -> tuple[int, ...]:
    """The reference's suppressed codebook-0 ids: `[vocab - 1024, vocab)` except the codec EOS.

    With a vocabulary of at most 1024 (the tiny preset) this leaves only EOS; pass an explicit list
    there (e.g. `range(code predictor vocab, vocab)` minus EOS), as the reference's `talker_suppress_tokens`.
    """
    v = cfg.text_config.vocab_size
    return tuple(i for i in range(max(0, v - 1024), v) if i != cfg.codec_eos_token_id)


def tts_token_ids(config: OmniConfig) -> np.ndarray:
    """(3,) thinker token ids (tts_bos, tts_eos, tts_pad) whose thinker embeddings `build_talker_inputs` takes."""
    return np.array([config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id], np.int32)


# ----------------------------------------------------------------------------------------- inputs
class TalkerInputPlan(NamedTuple):
    """Which thinker positions feed which talker input, computed from token ids alone (host side).

    Positions index the thinker's full sequence frame (prompt as given, then generated tokens).
    """

    user_positions: np.ndarray  # (B, U) int32 thinker positions of the user-turn tokens, right-aligned
    user_mask: np.ndarray  # (B, U) int32 1 for real user tokens (left padding)
    user_is_multimodal: np.ndarray  # (B, U) bool: audio/image/video placeholder -> hidden_projection
    assistant_positions: np.ndarray  # (B, 4) int32: <|im_start|>, assistant, "\n", first generated token
    trailing_positions: np.ndarray  # (B, L) int32 thinker positions of the trailing text entries
    trailing_kind: np.ndarray  # (B, L) int32: TEXT, TTS_EOS or TTS_PAD
    input_ids: np.ndarray  # (B, U + 9) int32 the talker's ids for position computation (user ids, tts_pad)
    attention_mask: np.ndarray  # (B, U + 9) int32


def plan_talker_inputs(
    input_ids,
    attention_mask,
    sequences,
    config: OmniConfig,
    *,
    thinker_eos_token_id: int | tuple[int, ...] | None = -1,
    user_length: int | None = None,
    trailing_length: int | None = None,
) -> TalkerInputPlan:
    """The talker-input plan for a left-padded batch, following the reference's `generate`.

    input_ids, attention_mask: (B, S) the thinker prompt. sequences: (B, T) prompt followed by the
    generated ids (pad after a row's EOS). thinker_eos_token_id: the thinker's EOS id(s) (default
    `<|im_end|>`, the reference's default); `None` disables moving `tts_eos` to each row's EOS, as the
    reference does when it has no EOS id.
    user_length / trailing_length: pad the user part / the trailing text to these static lengths
    (they must be at least what the batch needs); default: what the batch needs.

    User tokens are those whose latest preceding `<|im_start|>` (inclusive) is followed by `user`; every
    user turn is kept (`<|im_end|>\\n` included), system and earlier assistant turns are dropped. The
    assistant part starts at each row's last `<|im_start|>assistant` (the reference reads row 0's and
    uses it for every row, which is the same when every prompt ends with the generation prompt).
    """
    ids = np.asarray(input_ids).astype(np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}")
    b, s = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int64).reshape(b, s)
    seq = np.asarray(sequences).astype(np.int64)
    if seq.ndim != 2 or seq.shape[0] != b or seq.shape[1] <= s:
        raise ValueError(f"sequences must be (batch, prompt + generated) = ({b}, > {s}), got shape {seq.shape}")
    t = seq.shape[1]
    if thinker_eos_token_id == -1:
        thinker_eos_token_id = config.im_end_token_id

    pos = np.arange(s)[None].repeat(b, 0)
    im_start_pos = np.where(ids == config.im_start_token_id, pos, -1)
    previous = np.maximum.accumulate(im_start_pos, axis=1).clip(min=0)
    role = np.take_along_axis(ids, np.minimum(previous + 1, s - 1), axis=1)
    user = (role == config.user_token_id) & (mask != 0)
    user_lengths = user.sum(-1)
    needed = int(user_lengths.max())
    u = needed if user_length is None else int(user_length)
    if u < needed:
        raise ValueError(f"user_length={u} is shorter than the longest user part in the batch ({needed} tokens)")
    # User positions sort last (offset by S), in order: the trailing columns hold them right-aligned.
    order = np.argsort(np.where(user, s + pos, pos), axis=-1, kind="stable")[:, -min(u, s):]
    if u > s:
        order = np.concatenate([np.zeros((b, u - s), order.dtype), order], axis=1)
    user_mask = (np.arange(u)[None] >= (u - user_lengths)[:, None]).astype(np.int32)
    user_ids = np.take_along_axis(seq[:, :s], order, axis=1)
    tc = config.thinker_config
    multimodal = np.isin(seq[:, :s], [tc.audio_token_id, tc.image_token_id, tc.video_token_id])
    user_is_mm = np.take_along_axis(multimodal, order, axis=1) & (user_mask != 0)

    starts = np.empty(b, np.int64)
    for row in range(b):
        hits = np.nonzero((ids[row, :-1] == config.im_start_token_id) & (ids[row, 1:] == config.assistant_token_id))[0]
        if hits.size == 0:
            raise ValueError(f"row {row} of input_ids has no '<|im_start|>assistant' to start the talker's reply from")
        starts[row] = hits[-1]
    # The last generated token is never fed to the thinker, so its embedding does not exist: the
    # embeddings cover positions [0, T-1). The assistant part needs up to start + 3 (first reply token).
    if np.any(starts + 3 > t - 2):
        raise ValueError(
            "the thinker must generate at least 2 tokens after '<|im_start|>assistant\\n' before the talker "
            "can start (the reference builds its 9-position prefix from the first one)"
        )
    entries = t - starts - 4  # text entries start+4 .. T-2, then tts_eos
    need_l = int(entries.max())
    l = need_l if trailing_length is None else int(trailing_length)
    if l < need_l:
        raise ValueError(f"trailing_length={l} is shorter than the batch needs ({need_l})")
    j = np.arange(l)[None]
    trailing_positions = np.minimum(starts[:, None] + 4 + j, t - 2)
    kind = np.where(j < entries[:, None] - 1, TEXT, np.where(j == entries[:, None] - 1, TTS_EOS, TTS_PAD))
    if thinker_eos_token_id is not None:
        # Entry j holds thinker position start + 4 + j; the marker goes right after the row's first EOS
        # (generated token e at position S + e), pads follow. For start = S - 3 this is the reference's
        # "entry e takes the marker".
        generated = seq[:, s:]
        is_eos = np.isin(generated, np.atleast_1d(np.asarray(thinker_eos_token_id)))
        first_eos = np.where(is_eos.any(-1), is_eos.argmax(-1), generated.shape[1])
        marker = (s + first_eos - starts - 3)[:, None]
        kind = np.where(j > marker, TTS_PAD, kind)
        kind = np.where(j == marker, TTS_EOS, kind)
    # The reference's trailing text has `entries` entries and feeds tts_pad at every later step. A row whose
    # EOS is the sequence's last token (or that has none) would otherwise get its marker a second time at
    # entry `entries`, which exists here only because of the static bucket.
    kind = np.where(j >= entries[:, None], TTS_PAD, kind)

    talker_ids = np.concatenate([user_ids, np.full((b, ASSISTANT_PREFIX_LEN), config.tts_pad_token_id)], axis=1)
    talker_mask = np.concatenate([user_mask, np.ones((b, ASSISTANT_PREFIX_LEN), np.int32)], axis=1)
    return TalkerInputPlan(
        user_positions=order.astype(np.int32),
        user_mask=user_mask,
        user_is_multimodal=user_is_mm,
        assistant_positions=(starts[:, None] + np.arange(4)[None]).astype(np.int32),
        trailing_positions=trailing_positions.astype(np.int32),
        trailing_kind=kind.astype(np.int32),
        input_ids=talker_ids.astype(np.int32),
        attention_mask=talker_mask.astype(np.int32),
    )


class TalkerInputs(NamedTuple):
    embeds: jax.Array  # (B, U + 9, D) the talker prompt embeddings
    attention_mask: jax.Array  # (B, U + 9) int32
    trailing: jax.Array  # (B, L, D) text added to the input of decode step k (k < L; tts_pad after)
    tts_pad: jax.Array  # (D,) text_projection(thinker embedding of tts_pad)


def build_talker_inputs(
    params: dict,
    thinker_embed_btd: jax.Array,
    thinker_hidden_btd: jax.Array,
    tts_token_embeds_3d: jax.Array,
    plan: TalkerInputPlan,
    speaker_ids_b: jax.Array,
    cfg: TalkerConfig,
    rt: Runtime,
) -> TalkerInputs:
    """The talker prompt (user parts, then the 9-position assistant prefix) and the trailing text.

    thinker_embed_btd: (B, T', D_thinker) the thinker's input embeddings of the full sequence frame
      (`hidden_states[0]` in the reference: media features at their placeholders), T' >= T - 1.
    thinker_hidden_btd: (B, T', D_thinker) the thinker's `hidden_states[accept_hidden_layer]`.
    tts_token_embeds_3d: (3, D_thinker) thinker embeddings of (tts_bos, tts_eos, tts_pad) (`tts_token_ids`).
    plan: from `plan_talker_inputs`. speaker_ids_b: (B,) int codec speaker ids (`speaker_token_id`).
    """
    dtype = jnp.dtype(rt.dtype)
    embed = thinker_embed_btd.astype(dtype)
    hidden = thinker_hidden_btd.astype(dtype)
    b = embed.shape[0]
    if isinstance(plan.trailing_positions, np.ndarray):  # a concrete plan: check it fits (gathers clamp silently)
        needed = 1 + max(int(p.max()) for p in (plan.user_positions, plan.assistant_positions, plan.trailing_positions))
        if embed.shape[1] < needed or hidden.shape[1] < needed:
            raise ValueError(
                f"thinker states cover {min(embed.shape[1], hidden.shape[1])} positions; the plan reads up to "
                f"{needed} (every position of the sequence but the last generated token)"
            )

    def gather(x, positions):
        return jnp.take_along_axis(x, jnp.asarray(positions)[..., None].astype(jnp.int32), axis=1)

    user_text = text_projection(params, gather(embed, plan.user_positions))
    user_mm = hidden_projection(params, gather(hidden, plan.user_positions))
    user = jnp.where(jnp.asarray(plan.user_is_multimodal)[..., None], user_mm, user_text)

    tts_bos, tts_eos, tts_pad = text_projection(params, tts_token_embeds_3d.astype(dtype))
    d = tts_pad.shape[-1]
    assistant = text_projection(params, gather(embed, plan.assistant_positions))  # (B, 4, D)
    text_stream = jnp.concatenate(
        [
            assistant[:, :3],
            jnp.broadcast_to(tts_pad, (b, 4, d)),
            jnp.broadcast_to(tts_bos, (b, 1, d)),
            assistant[:, 3:4],
        ],
        axis=1,
    )
    speaker = jnp.asarray(speaker_ids_b, jnp.int32).reshape(b)
    fixed = jnp.array(
        [cfg.codec_nothink_id, cfg.codec_think_bos_id, cfg.codec_think_eos_id, 0, cfg.codec_pad_id, cfg.codec_bos_id],
        jnp.int32,
    )
    codec_ids = jnp.broadcast_to(fixed, (b, 6)).at[:, 3].set(speaker)
    codec_stream = jnp.concatenate([jnp.zeros((b, 3, d), dtype), codec_embed(params, codec_ids, dtype)], axis=1)
    prompt = jnp.concatenate([user, text_stream + codec_stream], axis=1)

    trailing = text_projection(params, gather(embed, plan.trailing_positions))
    kind = jnp.asarray(plan.trailing_kind)[..., None]
    trailing = jnp.where(kind == TTS_EOS, tts_eos, jnp.where(kind == TTS_PAD, tts_pad, trailing))
    return TalkerInputs(prompt, jnp.asarray(plan.attention_mask, jnp.int32), trailing, tts_pad)


# ----------------------------------------------------------------------------------------- teacher forcing
class TeacherForcedPlan(NamedTuple):
    """`plan_talker_inputs` for training: the talker inputs of sequences that already hold the reply."""

    plan: TalkerInputPlan  # jax arrays; trailing text of length F (one entry per target frame)
    position_ids: jax.Array  # (3, B, U + 9 + F) float32: talker prompt, then one position per frame input
    has_reply: jax.Array  # (B,) bool: the row has '<|im_start|>assistant' followed by a reply token


def plan_teacher_forced(
    input_ids_bs,
    attention_mask_bs,
    config: OmniConfig,
    *,
    num_frames: int,
    thinker_position_ids_3bs=None,
    user_length: int | None = None,
    thinker_eos_token_id: int | tuple[int, ...] | None = -1,
) -> TeacherForcedPlan:
    """The talker-input plan of training rows, jittable (jnp on traced ids).

    input_ids_bs, attention_mask_bs: (B, S) whole sequences (prompt, then the reply and its EOS), padded
      anywhere (right padding in training). Each row is planned as the reference plans one unbatched
      `generate` call whose thinker produced that reply: the user turns (every `<|im_start|>user` turn
      before the row's last `<|im_start|>assistant`), the 9-position prefix with the first reply token,
      trailing text = the reply tokens after the first one up to (excluding) the first EOS at or after
      the first reply token (or up to the last real token when there is none, as a thinker stopped by
      its length), then `tts_eos`, then `tts_pad`.
    num_frames: F, the trailing-text length (frame k's input takes entry k).
    thinker_position_ids_3bs: (3, B, S) the thinker's TM-RoPE positions, or None for text-only prompts.
      The talker's positions are the reference's `get_rope_index` over its own ids (the user tokens, then
      tts_pad): the user tokens keep their thinker positions minus the non-user tokens before them
      (dropped turns are text, one position each), the prefix and frames continue after the last user
      token. Without thinker positions: `cumsum(mask) - 1`, the text-only rule.
    user_length: U, static columns for the user part (default S, always enough); rows with more user
      tokens keep their last U.
    thinker_eos_token_id: as `plan_talker_inputs` (default `<|im_end|>`; None: no EOS, the reply runs to
      the last real token).

    Rows without a reply (`has_reply` False) get a plan that reads position 0; mask them out.
    """
    ids = jnp.asarray(input_ids_bs, jnp.int32)
    b, s = ids.shape
    mask = jnp.ones((b, s), bool) if attention_mask_bs is None else jnp.asarray(attention_mask_bs).reshape(b, s) != 0
    u = s if user_length is None else int(user_length)
    f = int(num_frames)
    if f < 1:
        raise ValueError(f"num_frames must be >= 1, got {f}")
    if thinker_eos_token_id == -1:
        eos_ids = (config.im_end_token_id,)
    elif thinker_eos_token_id is None:
        eos_ids = ()
    else:
        eos_ids = tuple(int(e) for e in np.atleast_1d(np.asarray(thinker_eos_token_id)).reshape(-1))

    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    im_start = jnp.where(ids == config.im_start_token_id, pos, -1)
    previous = jnp.maximum(jax.lax.cummax(im_start, axis=1), 0)
    role = jnp.take_along_axis(ids, jnp.minimum(previous + 1, s - 1), axis=1)
    user = (role == config.user_token_id) & mask
    # User positions sort last (offset by S), in order; the trailing U columns hold them right-aligned.
    order = jnp.argsort(jnp.where(user, s + pos, pos), axis=-1)[:, s - min(u, s):]
    if u > s:
        order = jnp.concatenate([jnp.zeros((b, u - s), order.dtype), order], axis=1)
    n_user = jnp.minimum(user.sum(-1), u)
    user_mask = jnp.arange(u)[None] >= (u - n_user)[:, None]
    tc = config.thinker_config
    multimodal = jnp.isin(ids, jnp.array([tc.audio_token_id, tc.image_token_id, tc.video_token_id]))
    user_is_mm = jnp.take_along_axis(multimodal, order, axis=1) & user_mask

    hits = (ids[:, :-1] == config.im_start_token_id) & (ids[:, 1:] == config.assistant_token_id) & mask[:, 1:]
    start = jnp.max(jnp.where(hits, pos[:, :-1], -1), axis=-1)
    last_real = jnp.max(jnp.where(mask, pos, -1), axis=-1)
    has_reply = (start >= 0) & (start + 3 <= last_real)
    start = jnp.maximum(start, 0)
    if eos_ids:
        is_eos = jnp.isin(ids, jnp.array(eos_ids)) & mask & (pos >= (start + 3)[:, None])
        end = jnp.min(jnp.where(is_eos, pos, s), axis=-1)
        end = jnp.where(end == s, last_real, end)
    else:
        end = last_real
    n_text = jnp.maximum(end - start - 4, 0)
    j = jnp.arange(f)[None]
    trailing_positions = jnp.minimum(start[:, None] + 4 + j, s - 1)
    kind = jnp.where(j < n_text[:, None], TEXT, jnp.where(j == n_text[:, None], TTS_EOS, TTS_PAD))
    assistant_positions = jnp.minimum(start[:, None] + jnp.arange(4)[None], s - 1)
    talker_ids = jnp.concatenate(
        [jnp.take_along_axis(ids, order, axis=1), jnp.full((b, ASSISTANT_PREFIX_LEN), config.tts_pad_token_id)], 1
    )
    talker_mask = jnp.concatenate([user_mask, jnp.ones((b, ASSISTANT_PREFIX_LEN), bool)], axis=1)

    if thinker_position_ids_3bs is None:
        user_pos = jnp.broadcast_to(jnp.cumsum(user_mask, -1) - 1, (3, b, u)).astype(jnp.float32)
    else:
        thinker_pos = jnp.asarray(thinker_position_ids_3bs, jnp.float32).reshape(3, b, s)
        dropped = (mask & ~user).astype(jnp.float32)
        compact = thinker_pos - (jnp.cumsum(dropped, -1) - dropped)[None]
        user_pos = jnp.take_along_axis(compact, jnp.broadcast_to(order[None], (3, b, u)), axis=2)
    user_pos = jnp.where(user_mask[None], user_pos, 0.0)
    # Every chat user turn ends with text, so its last token holds the largest position (get_rope_index's
    # next start); the prefix (tts_pad ids) and the frames are text after it.
    last = jnp.where(n_user > 0, user_pos[0, :, u - 1], -1.0)
    tail = last[:, None] + 1.0 + jnp.arange(ASSISTANT_PREFIX_LEN + f, dtype=jnp.float32)[None]
    position_ids = jnp.concatenate([user_pos, jnp.broadcast_to(tail[None], (3, b, tail.shape[1]))], axis=2)

    plan = TalkerInputPlan(
        user_positions=order.astype(jnp.int32),
        user_mask=user_mask.astype(jnp.int32),
        user_is_multimodal=user_is_mm,
        assistant_positions=assistant_positions.astype(jnp.int32),
        trailing_positions=trailing_positions.astype(jnp.int32),
        trailing_kind=kind.astype(jnp.int32),
        input_ids=talker_ids.astype(jnp.int32),
        attention_mask=talker_mask.astype(jnp.int32),
    )
    return TeacherForcedPlan(plan, position_ids, has_reply)


def teacher_forced_frame_inputs(
    params: dict, codes_bfg: jax.Array, trailing_bfd: jax.Array, cfg: TalkerConfig, rt: Runtime
) -> jax.Array:
    """The talker's input for every frame from given codes: what `frame_step` builds from generated ones.

    codes_bfg: (B, F, G) int codec ids (frame-major); trailing_bfd: (B, F, D) entry k of the trailing
    text (`TalkerInputs.trailing`, tts_pad past its end). Returns (B, F, D): frame k's input, E(c0) +
    sum over g >= 1 of `code_predictor.codec_embedding[g-1](c_g)` + trailing text k, which the talker
    reads at the step after frame k's c0 (the step predicting frame k + 1's c0, or the EOS).
    """
    dtype = jnp.dtype(rt.dtype)
    codes = jnp.asarray(codes_bfg, jnp.int32)
    tables = params["code_predictor"]["model"]["codec_embedding"]
    embeds = [codec_embed(params, codes[..., 0], dtype)]
    embeds += [jnp.take(tables[str(g)]["weight"], codes[..., g + 1], axis=0).astype(dtype)
               for g in range(cfg.num_code_groups - 1)]
    return jnp.sum(jnp.stack(embeds, axis=2), axis=2) + trailing_bfd.astype(dtype)


# ----------------------------------------------------------------------------------------- generation
def frame_step(
    params: dict,
    last_hidden_bd: jax.Array,
    c0_b: jax.Array,
    text_bd: jax.Array,
    key: jax.Array,
    cfg: TalkerConfig,
    rt: Runtime,
    *,
    cp_sampling: SamplingConfig = cp.DEFAULT_SAMPLING,
):
    """Completes one frame and builds the talker's next input (the reference's
    `prepare_inputs_for_generation` for a decode step).

    last_hidden_bd: (B, D) the talker's last normed hidden state (the step that produced c0);
    c0_b: (B,) that step's codebook-0 token; text_bd: (B, D) the step's trailing text (or tts_pad).
    Returns (codes (B, G) int32 = [c0, c1..c_{G-1}], next_embed (B, D) = E(c0) + sum of the residual
    codes' embeddings + text).
    """
    dtype = jnp.dtype(rt.dtype)
    first = codec_embed(params, c0_b, dtype)
    res = cp.predict_residual_codes(
        params["code_predictor"], last_hidden_bd.astype(dtype), first, key, cfg.code_predictor_config, rt,
        sampling=cp_sampling,
    )
    codec = jnp.sum(jnp.concatenate([first[:, None], res.embeds], axis=1), axis=1)
    codes = jnp.concatenate([c0_b[:, None].astype(jnp.int32), res.codes], axis=1)
    return codes, codec + text_bd.astype(dtype)


class TalkerState(NamedTuple):
    step: jax.Array  # () int32 frames completed (= decode steps run)
    tokens: jax.Array  # (B, N) int32 codebook-0 tokens; token k is frame k's c0 (EOS id after a row's EOS)
    codes: jax.Array  # (B, N - 1, G) int32 completed frames
    last_token: jax.Array  # (B,) int32
    last_hidden: jax.Array  # (B, D) talker hidden at the last position
    done: jax.Array  # (B,) bool
    seen: jax.Array  # (B, V) bool codebook-0 tokens generated so far (repetition penalty)
    cache: decoder.KVCache
    key_valid: jax.Array  # (B, S_max) bool
    next_position: jax.Array  # (3, B) float32
    key: jax.Array


def suppress_mask(vocab: int, suppress_tokens) -> np.ndarray:
    """(vocab,) bool mask of the ids that may never be sampled (out-of-range ids are ignored, as the
    reference's `isin` ignores them)."""
    mask = np.zeros(vocab, bool)
    ids = [int(i) for i in suppress_tokens if 0 <= int(i) < vocab]
    mask[ids] = True
    return mask


def _next_token(logits_bv, suppress_v, seen_bv, done_b, eos, key, sampling: SamplingConfig):
    """Suppression (-inf), then the reference's processors; finished rows emit `eos` (its pad id)."""
    logits = jnp.where(suppress_v, -jnp.inf, logits_bv.astype(jnp.float32))
    token = sample_next(logits, seen_bv, key, sampling)
    token = jnp.where(done_b, eos, token)
    return token, done_b | (token == eos)


@functools.partial(jax.jit, static_argnames=("cfg", "rt", "max_new_tokens", "sampling"))
def start(
    params: dict,
    embeds_bsd: jax.Array,
    attention_mask_bs: jax.Array,
    position_ids_3bs: jax.Array,
    key: jax.Array,
    suppress_v: jax.Array,
    eos_token_id: jax.Array,
    *,
    cfg: TalkerConfig,
    rt: Runtime,
    max_new_tokens: int,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
) -> TalkerState:
    """Talker prefill and the first codebook-0 token; buffers for `max_new_tokens` talker tokens
    (the reference's `talker_max_new_tokens`, EOS included: at most `max_new_tokens - 1` frames).

    suppress_v: (vocab,) bool ids never sampled (`suppress_mask`); eos_token_id: () int codec EOS.
    """
    b, s, _ = embeds_bsd.shape
    eos = jnp.asarray(eos_token_id, jnp.int32)
    logits, hidden, cache = prefill(
        params, embeds_bsd, attention_mask_bs, position_ids_3bs, cfg, rt, s + max_new_tokens
    )
    vocab = logits.shape[-1]
    key, sub = jax.random.split(key)
    # The reference's talker prompt has no ids: only generated ones count, every one of them. (Its batched
    # path in transformers 5.23.0 skips a row's first P generated codes, P its left padding; we follow its
    # batch-1 behaviour so that a row's speech does not depend on its batch mates. See
    # convert/reference.talker_penalty_over_all_generated_tokens.)
    seen = jnp.zeros((b, vocab), bool)
    token, done = _next_token(logits, suppress_v, seen, jnp.zeros((b,), bool), eos, sub, sampling)
    key_valid = jnp.concatenate(
        [jnp.asarray(attention_mask_bs, bool), jnp.zeros((b, max_new_tokens), bool)], axis=1
    )
    return TalkerState(
        step=jnp.int32(0),
        tokens=jnp.full((b, max_new_tokens), eos, jnp.int32).at[:, 0].set(token),
        codes=jnp.zeros((b, max_new_tokens - 1, cfg.num_code_groups), jnp.int32),
        last_token=token,
        last_hidden=hidden,
        done=done,
        seen=mark_seen(seen, token),
        cache=cache,
        key_valid=key_valid,
        next_position=jnp.asarray(position_ids_3bs, jnp.float32)[:, :, -1] + 1.0,
        key=key,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "rt", "sampling", "cp_sampling"), donate_argnums=(1,))
def advance(
    params: dict,
    state: TalkerState,
    trailing_bld: jax.Array,
    tts_pad_d: jax.Array,
    suppress_v: jax.Array,
    eos_token_id: jax.Array,
    until_step: jax.Array,
    *,
    cfg: TalkerConfig,
    rt: Runtime,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    cp_sampling: SamplingConfig = cp.DEFAULT_SAMPLING,
) -> TalkerState:
    """Runs frames until `state.step == until_step` (a traced scalar: one compilation serves every
    chunk of a stream), every row is done, or the buffers are full. Frame k's codes land in
    `state.codes[:, k]` when step k runs. trailing_bld, tts_pad_d: from `TalkerInputs`;
    suppress_v, eos_token_id: as given to `start`."""
    eos = jnp.asarray(eos_token_id, jnp.int32)
    max_frames = state.codes.shape[1]
    prompt_len = state.key_valid.shape[1] - state.tokens.shape[1]
    num_trailing = trailing_bld.shape[1]

    def cond(s: TalkerState):
        return (s.step < jnp.minimum(until_step, max_frames)) & ~jnp.all(s.done)

    def body(s: TalkerState):
        k = s.step
        key, k_cp, k_tok = jax.random.split(s.key, 3)
        text = jnp.where(
            k < num_trailing, jax.lax.dynamic_index_in_dim(trailing_bld, jnp.minimum(k, num_trailing - 1), 1, False),
            tts_pad_d,
        )
        frame, embed = frame_step(
            params, s.last_hidden, s.last_token, text, k_cp, cfg, rt, cp_sampling=cp_sampling
        )
        cache_index = prompt_len + k
        key_valid = s.key_valid.at[:, cache_index].set(True)
        logits, hidden, cache = decode_step(params, embed, s.next_position, s.cache, cache_index, key_valid, cfg, rt)
        token, done = _next_token(logits, suppress_v, s.seen, s.done, eos, k_tok, sampling)
        return TalkerState(
            step=k + 1,
            tokens=s.tokens.at[:, k + 1].set(token),
            codes=s.codes.at[:, k].set(frame),
            last_token=token,
            last_hidden=hidden,
            done=done,
            seen=mark_seen(s.seen, token),
            cache=cache,
            key_valid=key_valid,
            next_position=s.next_position + 1.0,
            key=key,
        )

    return jax.lax.while_loop(cond, body, state)


class TalkerCodes(NamedTuple):
    codes: np.ndarray  # (B, G, F) int32 frames in Code2Wav's layout; zeros after each row's length
    lengths: np.ndarray  # (B,) int frames before each row's codec EOS
    tokens: np.ndarray  # (B, F + 1) codebook-0 tokens (EOS included)


def collect_codes(state: TalkerState, eos_token_id: int) -> TalkerCodes:
    """Host-side result of a finished (or partial) run, as the reference hands codes to Code2Wav."""
    frames = int(state.step)
    tokens = np.asarray(state.tokens)[:, : frames + 1]
    codes = np.asarray(state.codes)[:, :frames]
    is_eos = tokens[:, :frames] == eos_token_id
    lengths = np.where(is_eos.any(-1), is_eos.argmax(-1) if frames else 0, frames)
    codes = np.where(np.arange(frames)[None, :, None] < lengths[:, None, None], codes, 0)
    return TalkerCodes(np.ascontiguousarray(codes.transpose(0, 2, 1)).astype(np.int32), lengths, tokens)


def generate_codes(
    params: dict,
    inputs: TalkerInputs,
    position_ids_3bs,
    cfg: TalkerConfig,
    rt: Runtime,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    cp_sampling: SamplingConfig | None = None,
    suppress_tokens: tuple[int, ...] | None = None,
    eos_token_id: int | None = None,
) -> TalkerCodes:
    """Talker + code predictor until every row emits the codec EOS (or `max_new_tokens` talker tokens).

    cp_sampling defaults to the reference's: greedy when `sampling` is greedy, else top-k 50 / top-p 0.8.
    suppress_tokens defaults to `default_suppress_tokens(cfg)`.
    """
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2 (one frame and its successor), got {max_new_tokens}")
    if cp_sampling is None:
        cp_sampling = cp.DEFAULT_SAMPLING if sampling.do_sample else SamplingConfig()
    suppress = suppress_mask(
        cfg.text_config.vocab_size, default_suppress_tokens(cfg) if suppress_tokens is None else suppress_tokens
    )
    eos = cfg.codec_eos_token_id if eos_token_id is None else int(eos_token_id)
    key = jax.random.key(0) if key is None else key
    state = start(
        params, inputs.embeds, inputs.attention_mask, jnp.asarray(position_ids_3bs, jnp.float32), key, suppress,
        jnp.int32(eos), cfg=cfg, rt=rt, max_new_tokens=max_new_tokens, sampling=sampling,
    )
    state = advance(
        params, state, inputs.trailing, inputs.tts_pad, suppress, jnp.int32(eos), jnp.int32(max_new_tokens), cfg=cfg,
        rt=rt, sampling=sampling, cp_sampling=cp_sampling,
    )
    return collect_codes(state, eos)
