"""Speech losses: the talker's codebook-0 cross-entropy and the code predictor's cross-entropy on the
residual codebooks, with teacher forcing from target codec ids.

The codec encoder is not public, so the targets are codec ids supplied in the data: `codec_ids (B, F, G)`
(frame-major, G = talker num_code_groups) and `codec_mask (B, F)` (1 = real frame, real frames first).

What the talker sees is exactly what inference gives it (`speech.prepare_talker` + `talker.advance`) for
a thinker that produced the row's reply, each row as one unbatched reference `generate` call:

    talker sequence (one parallel causal forward, length U + 9 + F):
      [user turns (left-padded into U columns) | 9-position assistant prefix | frame inputs 0..F-1]
    frame input k = E(c0_k) + sum_{g>=1} code_predictor.codec_embedding[g-1](c_g,k) + trailing text k
    (`talker.teacher_forced_frame_inputs`; trailing text = reply tokens after the first, `tts_eos`,
    then `tts_pad`).

The state at the last prefix position predicts frame 0's c0, the state at frame input k predicts
frame k+1's c0 and, after the last real frame, the codec EOS (where the reference's generation stops).
The code predictor of frame k reads the state that predicted c0_k (as `frame_step` does) and the true
codes (`code_predictor.teacher_forced_logits`). Cross-entropies use an fp32 log-softmax of the raw
logits (no suppression or repetition penalty: those are decoding rules) and are means over real
targets: F_b + 1 talker targets per row with speech (F_b real frames, then EOS), F_b x (G - 1) code
predictor targets.

Gradients reach every talker and code-predictor parameter that the forward uses, and the thinker
states (`text_projection` of the input embeddings, `hidden_projection` of the `accept_hidden_layer`
states at the user turns' audio/image/video positions), so a full-model stage trains through them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import code_predictor as cp
from omni_jax import talker, thinker
from omni_jax.config import OmniConfig, Runtime
from omni_jax.nn import decoder
from omni_jax.training.losses import load_balancing_loss

__all__ = [
    "DEFAULT_SPEAKER",
    "SPEECH_KEYS",
    "default_speaker_id",
    "check_speech_targets",
    "TeacherForcedTalker",
    "teacher_forced_talker_inputs",
    "SpeechLogits",
    "speech_logits",
    "losses_from_logits",
    "speech_losses",
]

DEFAULT_SPEAKER = "Ethan"  # the reference generate's default speaker
SPEECH_KEYS = ("codec_ids", "codec_mask")  # batch keys that carry speech targets; `speaker` is optional


def default_speaker_id(config: OmniConfig) -> int:
    """Talker codec id of the reference's default speaker (Ethan); used when a batch has no `speaker`."""
    return talker.speaker_token_id(config.talker_config, DEFAULT_SPEAKER)


def check_speech_targets(batch: dict, config: OmniConfig) -> None:
    """Host-side validation of a batch's speech targets (numpy); raises ValueError naming the problem.

    Checks shapes (`codec_ids (B, F, G)`, `codec_mask (B, F)`, optional `speaker (B,)`), that real
    frames come first in each row, that ids fit their embedding tables (codebook 0: the talker's
    vocabulary; codebooks 1..G-1: the code predictor's), that speaker ids are known speakers, and that
    every row with frames has an assistant reply to speak.
    """
    tc = config.talker_config
    if tc is None:
        raise ValueError("this configuration has no talker: speech targets cannot be trained")
    codes = np.asarray(batch["codec_ids"])
    frame_mask = np.asarray(batch["codec_mask"]).astype(bool)
    ids = np.asarray(batch["input_ids"])
    b = ids.shape[0]
    if codes.ndim != 3 or codes.shape[0] != b or codes.shape[2] != tc.num_code_groups:
        raise ValueError(f"codec_ids must be (batch, frames, {tc.num_code_groups}) = ({b}, F, "
                         f"{tc.num_code_groups}), got {codes.shape}")
    if frame_mask.shape != codes.shape[:2]:
        raise ValueError(f"codec_mask must be (batch, frames) = {codes.shape[:2]}, got {frame_mask.shape}")
    n = frame_mask.sum(-1)
    if np.any(frame_mask != (np.arange(codes.shape[1])[None] < n[:, None])):
        raise ValueError("codec_mask must mark each row's real frames first (right padding)")
    real = codes[frame_mask]
    v0, v1 = tc.text_config.vocab_size, tc.code_predictor_config.vocab_size
    if real.size and (real[:, 0].min() < 0 or real[:, 0].max() >= v0):
        raise ValueError(f"codebook-0 ids must lie in [0, {v0}), got [{real[:, 0].min()}, {real[:, 0].max()}]")
    if real.size and (real[:, 1:].min() < 0 or real[:, 1:].max() >= v1):
        raise ValueError(f"residual codebook ids must lie in [0, {v1}), got [{real[:, 1:].min()}, "
                         f"{real[:, 1:].max()}]")
    if "speaker" in batch:
        speakers = np.asarray(batch["speaker"]).reshape(-1)
        valid = set(dict(tc.speaker_id).values())
        if speakers.shape[0] != b or not set(speakers.tolist()) <= valid:
            raise ValueError(f"speaker must be ({b},) talker speaker ids among {sorted(valid)}, got {speakers}")
    plan = talker.plan_teacher_forced(ids, batch.get("attention_mask"), config, num_frames=max(codes.shape[1], 1))
    missing = np.nonzero((n > 0) & ~np.asarray(plan.has_reply))[0]
    if missing.size:
        raise ValueError(f"rows {missing.tolist()} have speech targets but no '<|im_start|>assistant' followed by a "
                         "reply token to speak")


class TeacherForcedTalker(NamedTuple):
    embeds: jax.Array  # (B, U + 9 + F, D) talker prompt, then frame inputs 0..F-1
    attention_mask: jax.Array  # (B, U + 9 + F) int32
    position_ids: jax.Array  # (3, B, U + 9 + F) float32
    has_reply: jax.Array  # (B,) bool


def teacher_forced_talker_inputs(
    params: dict,
    thinker_embeds_bsd: jax.Array,
    thinker_hidden_bsd: jax.Array,
    batch: dict,
    config: OmniConfig,
    rt: Runtime,
    *,
    user_length: int | None = None,
) -> TeacherForcedTalker:
    """The talker's teacher-forced input sequence (see the module docstring); arguments as `speech_losses`."""
    tc = config.talker_config
    dtype = jnp.dtype(rt.dtype)
    codes = jnp.asarray(batch["codec_ids"], jnp.int32)
    b, f, _ = codes.shape
    tf = talker.plan_teacher_forced(
        batch["input_ids"], batch.get("attention_mask"), config, num_frames=f,
        thinker_position_ids_3bs=batch.get("position_ids"), user_length=user_length,
    )
    speaker = batch.get("speaker")
    speaker = jnp.full((b,), default_speaker_id(config), jnp.int32) if speaker is None else speaker
    tts = thinker.embed_tokens(params["thinker"], jnp.asarray(talker.tts_token_ids(config)), dtype)
    inputs = talker.build_talker_inputs(
        params["talker"], thinker_embeds_bsd, thinker_hidden_bsd, tts, tf.plan, speaker, tc, rt
    )
    frames = talker.teacher_forced_frame_inputs(params["talker"], codes, inputs.trailing, tc, rt)
    frame_mask = jnp.asarray(batch["codec_mask"], jnp.int32).reshape(b, f)
    return TeacherForcedTalker(
        jnp.concatenate([inputs.embeds, frames], axis=1),
        jnp.concatenate([inputs.attention_mask, frame_mask], axis=1),
        tf.position_ids,
        tf.has_reply,
    )


class SpeechLogits(NamedTuple):
    talker: jax.Array  # (B, F + 1, V) codebook-0 logits: entry k predicts frame k's c0 (k = F_b: the EOS)
    talker_hidden: jax.Array  # (B, F + 1, D) the final-normed talker states behind them
    code_predictor: jax.Array  # (B, F, G - 1, V_cp): entry [k, g] predicts frame k's codebook g + 1
    inputs: TeacherForcedTalker  # the talker sequence they came from
    router_logits: jax.Array  # (L, B * S_talker, E) the talker's router logits over the whole sequence


def speech_logits(
    params: dict,
    thinker_embeds_bsd: jax.Array,
    thinker_hidden_bsd: jax.Array,
    batch: dict,
    config: OmniConfig,
    rt: Runtime,
    *,
    user_length: int | None = None,
) -> SpeechLogits:
    """Teacher-forced logits of the talker and the code predictor (arguments as `speech_losses`)."""
    tc = config.talker_config
    tp = params["talker"]
    dtype = jnp.dtype(rt.dtype)
    codes = jnp.asarray(batch["codec_ids"], jnp.int32)
    b, f, g = codes.shape
    seq = teacher_forced_talker_inputs(
        params, thinker_embeds_bsd, thinker_hidden_bsd, batch, config, rt, user_length=user_length
    )
    # The talker's stack (as `talker.forward`) without logits at the prompt positions.
    out = decoder.prefill(
        tp["model"], seq.embeds.astype(dtype), seq.position_ids, seq.attention_mask, talker.talker_dims(tc), rt
    )
    prompt = seq.embeds.shape[1] - f
    hidden = out.hidden[:, prompt - 1:]  # the last prefix position, then every frame input
    first = talker.codec_embed(tp, codes[..., 0], dtype)
    d = hidden.shape[-1]
    cp_logits = cp.teacher_forced_logits(
        tp["code_predictor"], hidden[:, :f].reshape(b * f, d), first.reshape(b * f, d),
        codes[..., 1:].reshape(b * f, g - 1), tc.code_predictor_config, rt,
    )
    return SpeechLogits(talker.codec_logits(tp, hidden), hidden, cp_logits.reshape(b, f, g - 1, -1), seq,
                        out.router_logits)


def _masked_ce(logits, targets, mask):
    """(sum of -log p(target) over mask, number of targets, correct argmax count); fp32 log-softmax."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(correct * mask)


def speech_losses(
    params: dict,
    thinker_embeds_bsd: jax.Array,
    thinker_hidden_bsd: jax.Array,
    batch: dict,
    config: OmniConfig,
    rt: Runtime,
    *,
    user_length: int | None = None,
) -> tuple[jax.Array, jax.Array, dict]:
    """Teacher-forced talker codebook-0 and code-predictor cross-entropies (jittable, differentiable).

    Args:
      params: the full parameter tree ({"thinker", "talker", ...}); reads the thinker's token embedding
        table (for tts_bos/eos/pad) and everything under "talker".
      thinker_embeds_bsd: (B, S, D_thinker) the thinker's input embeddings of the whole training sequence
        (media features at their placeholders), what `speech.prepare_talker` gets as `thinker_embeds`.
      thinker_hidden_bsd: (B, S, D_thinker) `hidden_states[talker_config.accept_hidden_layer]` of the same
        forward (`decoder.prefill(capture_layer=accept_hidden_layer)`).
      batch: `input_ids (B, S)`, `attention_mask (B, S)` (1 = real token; right padding), `codec_ids
        (B, F, G)`, `codec_mask (B, F)`; optional `position_ids (3, B, S)` (the thinker's TM-RoPE
        positions; needed for correct talker positions when user turns hold images, video or audio with
        a grid) and `speaker (B,)` talker speaker token ids (default: `default_speaker_id`).
      user_length: static columns for the user turns in the talker sequence (default S, always enough).

    Returns (talker_ce, code_predictor_ce, metrics): fp32 scalars, the means over real targets (0 when
    the batch has none), and a dict of scalars: the sums and target counts behind both means
    (`talker_ce_sum`, `talker_targets`, `code_predictor_ce_sum`, `code_predictor_targets`, for
    token-weighted accumulation), argmax accuracies, `speech_rows` and `talker_aux_loss` (the talker's
    MoE load-balancing loss, as the reference talker's `aux_loss`).
    """
    return losses_from_logits(
        speech_logits(params, thinker_embeds_bsd, thinker_hidden_bsd, batch, config, rt, user_length=user_length),
        batch, config,
    )


def losses_from_logits(logits: SpeechLogits, batch: dict, config: OmniConfig) -> tuple[jax.Array, jax.Array, dict]:
    """`speech_losses` from `speech_logits`' result (for callers that also want the logits)."""
    tc = config.talker_config
    codes = jnp.asarray(batch["codec_ids"], jnp.int32)
    b, f, _ = codes.shape
    frame_mask = jnp.asarray(batch["codec_mask"]).reshape(b, f) != 0
    frames = frame_mask.sum(-1)
    rows = logits.inputs.has_reply & (frames > 0)
    k = jnp.arange(f + 1)[None]
    c0 = jnp.concatenate([codes[..., 0], jnp.zeros((b, 1), jnp.int32)], axis=1)
    targets0 = jnp.where(k == frames[:, None], tc.codec_eos_token_id, c0)
    mask0 = (k <= frames[:, None]) & rows[:, None]
    t_sum, t_n, t_hit = _masked_ce(logits.talker, targets0, mask0)
    mask1 = jnp.broadcast_to((frame_mask & rows[:, None])[..., None], codes[..., 1:].shape)
    c_sum, c_n, c_hit = _masked_ce(logits.code_predictor, codes[..., 1:], mask1)
    talker_ce = t_sum / jnp.maximum(t_n, 1.0)
    cp_ce = c_sum / jnp.maximum(c_n, 1.0)
    # The reference talker's `aux_loss` (`output_router_logits=True`): load balancing over every real
    # position of the talker sequence, rows without speech included (they still run the talker).
    talker_aux = load_balancing_loss(logits.router_logits, logits.inputs.attention_mask,
                                     tc.text_config.num_experts_per_tok)
    metrics = {
        "talker_aux_loss": talker_aux,
        "talker_ce_sum": t_sum,
        "talker_targets": t_n,
        "talker_accuracy": t_hit / jnp.maximum(t_n, 1.0),
        "code_predictor_ce_sum": c_sum,
        "code_predictor_targets": c_n,
        "code_predictor_accuracy": c_hit / jnp.maximum(c_n, 1.0),
        "speech_rows": rows.sum().astype(jnp.float32),
    }
    return talker_ce, cp_ce, metrics
