"""Speech output: thinker result -> talker -> code predictor -> Code2Wav, offline (`speak`) or streamed
(`stream_speak`). The talker half of the reference's `Qwen3OmniMoeForConditionalGeneration.generate(...,
return_audio=True)` (transformers 5.23.0), for a left-padded batch whose rows have different lengths.

    out = speak(params, config, rt, prompt_ids=ids, prompt_mask=mask, sequences=seqs,
                thinker_embeds=embeds, thinker_hidden=hidden, speakers=["Ethan"] * B)
    out.audio[b]   float32 (samples,) 24 kHz      out.codes[b]   int32 (num_code_groups, frames)

    for row, audio, final in stream_speak(...same arguments...):   # audio as frames arrive
        ...

What the reference does, and where we differ on purpose:

* Thinker states. The reference concatenates the thinker's `hidden_states[0]` (input embeddings, media
  features at their placeholders) and `hidden_states[accept_hidden_layer]` over the generate steps.
  Only prompt positions of `hidden_states[accept_hidden_layer]` are ever read (multimodal placeholders
  of user turns go through `hidden_projection`), and a generated token's input embedding is its token
  embedding; so `speak` needs the states of the prompt positions only and looks the generated tokens
  up in the thinker's embedding table. Longer arrays (every position) are accepted and cut.
* Sequence length. The reference's `sequences` end where its thinker stopped (the step at which every
  row had emitted EOS, or `thinker_max_new_tokens`). Ours may carry extra pad columns (a preallocated
  output buffer); they are cut to the reference's length first, because that length decides which
  trailing-text entry holds `tts_eos` for the longest row.
* A thinker that produced one token only (e.g. immediate EOS in every row) makes the reference fail
  (its 9-position prefix needs the first reply token's embedding, which it never computed); we take
  that embedding from the table and give such a row what a batched reference gives it: the prefix,
  then `tts_eos`, then `tts_pad`.
* Talker position ids. With media grids or audio lengths the reference runs `get_rope_index` on the
  talker's ids (user-turn ids, then 9 x tts_pad) with the batch's grids; otherwise 1-D positions. It
  reads the *talker* config, which has no `audio_config`, so any prompt with audio and an image or
  video crashes there (AttributeError on `audio_config.n_window`), and it never passes
  `use_audio_in_video` to the talker. We use the talker's token ids and `position_id_per_seconds`
  with the thinker's `audio_config.n_window`, and pass `use_audio_in_video` through (the talker's ids
  hold the thinker's audio-in-video layout), so those prompts work. Media must sit in user turns (as
  the processor builds prompts): the grids are consumed in token order over the talker's ids.
* Audio. `chunked=True` (default) is the reference's `chunked_decode(chunk_size=300,
  left_context_size=25)` with its per-row cut; `chunked=False` the seamless full causal decode, which
  is also what `stream_speak` yields (see `code2wav.py` for the difference).
"""

from __future__ import annotations

import types
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import code2wav, positions, talker, thinker
from omni_jax.config import OmniConfig, Runtime
from omni_jax.generate import SamplingConfig

__all__ = [
    "SpeechOutput",
    "StreamChunk",
    "check_speech_config",
    "talker_position_ids",
    "TalkerRun",
    "prepare_talker",
    "speak",
    "stream_speak",
]

# Static-shape buckets of the talker prompt: user part and trailing text are padded up to these
# multiples so that batches of similar prompts share one compilation of the talker loop.
USER_BUCKET = 16
TRAILING_BUCKET = 16


class SpeechOutput(NamedTuple):
    audio: list[np.ndarray]  # per row: float32 (samples,) at 24 kHz
    codes: list[np.ndarray]  # per row: int32 (num_code_groups, frames), the frames before the codec EOS


class StreamChunk(NamedTuple):
    row: int  # batch row
    audio: np.ndarray  # float32 (samples,) the next samples of that row (may be empty when `final`)
    final: bool  # the row's audio is complete after this chunk


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def check_speech_config(config: OmniConfig) -> None:
    """Raises a clear error for a configuration without a talker / Code2Wav (Thinking, Captioner)."""
    if config.talker_config is None or config.code2wav_config is None or not config.enable_audio_output:
        raise ValueError(
            "this model has no talker/Code2Wav (a Thinking or Captioner checkpoint, or enable_audio_output is "
            "false): it generates text only; ask for text (return_audio=False)"
        )


def _has_media_positions(multimodal: dict) -> bool:
    """The reference's `has_multimodal_data` for the talker: audio lengths or a non-empty grid."""
    if multimodal.get("feature_attention_mask") is not None or multimodal.get("audio_feature_lengths") is not None:
        return True
    return any(
        multimodal.get(k) is not None and np.asarray(multimodal[k]).size > 0
        for k in ("image_grid_thw", "video_grid_thw")
    )


def talker_position_ids(
    input_ids_bs, attention_mask_bs, config: OmniConfig, multimodal: dict | None = None
) -> np.ndarray:
    """(3, B, S) float32 talker M-RoPE positions for the talker prompt ids (`TalkerInputPlan.input_ids`).

    Without media (no grids, no audio lengths): 1-D `cumsum(mask) - 1`. With media: `get_rope_index`
    over the talker's ids with the processor's grids / audio lengths, with the talker config's token
    ids and `position_id_per_seconds`, the thinker's `audio_config.n_window` (the reference reads a
    talker `audio_config` that does not exist) and `use_audio_in_video` (see the module docstring).
    """
    multimodal = dict(multimodal or {})
    if not _has_media_positions(multimodal):
        return talker.text_position_ids(attention_mask_bs)
    tc = config.talker_config
    fields = types.SimpleNamespace(
        image_token_id=tc.image_token_id, video_token_id=tc.video_token_id, audio_token_id=tc.audio_token_id,
        vision_start_token_id=tc.vision_start_token_id, audio_start_token_id=tc.audio_start_token_id,
        position_id_per_seconds=tc.position_id_per_seconds, spatial_merge_size=tc.spatial_merge_size,
        vision_config=None, audio_config=config.thinker_config.audio_config,
    )
    grids = {k: multimodal.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    grids = {k: (None if v is None or np.asarray(v).size == 0 else np.asarray(v)) for k, v in grids.items()}
    fam = multimodal.get("feature_attention_mask")
    pos, _ = positions.rope_index(
        input_ids_bs, attention_mask_bs, config=fields, **grids,
        audio_seqlens=None if fam is not None else multimodal.get("audio_feature_lengths"),
        feature_attention_mask=fam,
        second_per_grids=multimodal.get("video_second_per_grid"),
        use_audio_in_video=bool(multimodal.get("use_audio_in_video") or False),
    )
    return pos


def _as_eos_ids(eos, default: int) -> tuple[int, ...] | None:
    if eos is None:
        return None
    if isinstance(eos, str) and eos == "default":
        return (default,)
    return tuple(int(e) for e in np.atleast_1d(np.asarray(eos)).reshape(-1))


def _reference_length(sequences: np.ndarray, prompt_len: int, eos_ids: tuple[int, ...] | None) -> int:
    """Columns of the reference's `sequences`: the prompt plus the steps until every row had its EOS."""
    generated = sequences[:, prompt_len:]
    if eos_ids is None or generated.shape[1] == 0:
        return sequences.shape[1]
    is_eos = np.isin(generated, eos_ids)
    if not is_eos.any(-1).all():
        return sequences.shape[1]
    return prompt_len + int(is_eos.argmax(-1).max()) + 1


class TalkerRun(NamedTuple):
    """Everything the talker loop needs, from `prepare_talker` (host and device arrays)."""

    inputs: talker.TalkerInputs
    plan: talker.TalkerInputPlan
    position_ids: np.ndarray  # (3, B, U + 9) float32
    suppress: np.ndarray  # (vocab,) bool
    eos: int  # codec EOS id
    sampling: SamplingConfig
    cp_sampling: SamplingConfig
    max_new_tokens: int  # talker tokens: max_frames + 1 (the token after the last frame is its EOS)
    key: jax.Array


def speaker_ids(config: OmniConfig, speakers, batch: int) -> np.ndarray:
    """(B,) talker speaker token ids for one name or one per row; unknown names raise, listing the valid ones."""
    names = [speakers] * batch if isinstance(speakers, str) else list(speakers)
    if len(names) != batch:
        raise ValueError(f"speakers: got {len(names)} names for a batch of {batch}; give one name or one per row")
    return np.array([talker.speaker_token_id(config.talker_config, n) for n in names], np.int32)


def prepare_talker(
    params: dict,
    config: OmniConfig,
    rt: Runtime,
    *,
    prompt_ids,
    prompt_mask,
    sequences,
    thinker_embeds,
    thinker_hidden,
    speakers: str | Sequence[str] = "Ethan",
    greedy: bool = True,
    seed: int = 0,
    max_frames: int = 4095,
    multimodal: dict | None = None,
    thinker_eos_token_id: int | Sequence[int] | None | str = "default",
    sampling: SamplingConfig | None = None,
    suppress_tokens: Sequence[int] | None = None,
    codec_eos_token_id: int | None = None,
) -> TalkerRun:
    """Talker prompt, trailing text and position ids from a thinker result (arguments: see `speak`)."""
    check_speech_config(config)
    tc = config.talker_config
    ids = np.asarray(prompt_ids)
    if ids.ndim != 2:
        raise ValueError(f"prompt_ids must be (batch, seq), got shape {ids.shape}")
    b, s = ids.shape
    mask = np.ones_like(ids) if prompt_mask is None else np.asarray(prompt_mask).reshape(b, s)
    seq = np.asarray(sequences)
    if seq.ndim != 2 or seq.shape[0] != b or seq.shape[1] <= s:
        raise ValueError(f"sequences must be (batch, prompt + generated) = ({b}, > {s}), got shape {seq.shape}")
    if not np.array_equal(seq[:, :s], ids):
        raise ValueError("sequences must start with prompt_ids (the prompt as given to generate)")
    for name, x in (("thinker_embeds", thinker_embeds), ("thinker_hidden", thinker_hidden)):
        if x is not None and (x.ndim != 3 or x.shape[0] != b or x.shape[1] < s):
            raise ValueError(f"{name} must be (batch, >= prompt length, hidden) = ({b}, >= {s}, D), got {x.shape}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    speaker_token_ids = speaker_ids(config, speakers, b)
    eos_ids = _as_eos_ids(thinker_eos_token_id, config.im_end_token_id)

    seq = seq[:, : _reference_length(seq, s, eos_ids)]
    if seq.shape[1] - s < 2:
        # One generated token (see the module docstring): one pad column makes room for the tts_eos entry.
        pad = config.thinker_config.text_config.pad_token_id
        seq = np.concatenate([seq, np.full((b, 1), 0 if pad is None else pad, seq.dtype)], axis=1)
    t = seq.shape[1]
    # Upper bounds of what the plan needs, rounded to buckets (exact sizes are computed inside).
    user_needed = int(_user_lengths(ids, mask, config).max())
    plan = talker.plan_talker_inputs(
        ids, mask, seq, config, thinker_eos_token_id=eos_ids,
        user_length=_round_up(user_needed, USER_BUCKET),
        trailing_length=_round_up(int(t - _assistant_starts(ids, config).min() - 4), TRAILING_BUCKET),
    )
    if thinker_hidden is None:
        if plan.user_is_multimodal.any():
            raise ValueError("thinker_hidden is required: the user turns hold audio/image/video placeholders")
        thinker_hidden = jnp.zeros_like(thinker_embeds)
    inputs = _talker_inputs(params, config, rt, thinker_embeds[:, :s], thinker_hidden[:, :s], seq[:, s:], plan,
                            speaker_token_ids)
    pos = talker_position_ids(plan.input_ids, plan.attention_mask, config, multimodal)

    if sampling is None:
        sampling = talker.GREEDY_SAMPLING if greedy else talker.DEFAULT_SAMPLING
    # The reference mirrors the talker's do_sample onto the code predictor (top-k 50, top-p 0.8 when sampling).
    cp_sampling = talker.cp.DEFAULT_SAMPLING if sampling.do_sample else SamplingConfig()
    vocab = tc.text_config.vocab_size
    suppress = talker.suppress_mask(
        vocab, talker.default_suppress_tokens(tc) if suppress_tokens is None else tuple(suppress_tokens)
    )
    eos = tc.codec_eos_token_id if codec_eos_token_id is None else int(codec_eos_token_id)
    return TalkerRun(inputs, plan, pos, suppress, eos, sampling, cp_sampling, int(max_frames) + 1,
                     jax.random.key(seed))


def _user_lengths(ids, mask, config: OmniConfig) -> np.ndarray:
    s = ids.shape[1]
    pos = np.arange(s)[None].repeat(ids.shape[0], 0)
    previous = np.maximum.accumulate(np.where(ids == config.im_start_token_id, pos, -1), axis=1).clip(min=0)
    role = np.take_along_axis(ids, np.minimum(previous + 1, s - 1), axis=1)
    return ((role == config.user_token_id) & (mask != 0)).sum(-1)


def _assistant_starts(ids, config: OmniConfig) -> np.ndarray:
    hits = (ids[:, :-1] == config.im_start_token_id) & (ids[:, 1:] == config.assistant_token_id)
    if not hits.any(-1).all():
        row = int(np.argmin(hits.any(-1)))
        raise ValueError(f"row {row} of input_ids has no '<|im_start|>assistant' to start the talker's reply from")
    return (hits.shape[1] - 1 - np.argmax(hits[:, ::-1], axis=-1)).astype(np.int64)


def _talker_inputs(params, config: OmniConfig, rt: Runtime, prompt_embeds, prompt_hidden, generated_ids, plan,
                   speaker_ids) -> talker.TalkerInputs:
    dtype = jnp.dtype(rt.dtype)
    tp = params["thinker"]
    # A generated token's thinker input embedding is its token embedding (no media after the prompt).
    generated = thinker.embed_tokens(tp, jnp.asarray(generated_ids, jnp.int32), dtype)
    embed = jnp.concatenate([jnp.asarray(prompt_embeds).astype(dtype), generated], axis=1)
    hidden = jnp.concatenate([jnp.asarray(prompt_hidden).astype(dtype), jnp.zeros_like(generated)], axis=1)
    tts = thinker.embed_tokens(tp, jnp.asarray(talker.tts_token_ids(config)), dtype)
    return talker.build_talker_inputs(params["talker"], embed, hidden, tts, plan, speaker_ids, config.talker_config, rt)


def _start(params, config: OmniConfig, rt: Runtime, run: TalkerRun) -> talker.TalkerState:
    return talker.start(
        params["talker"], run.inputs.embeds, run.inputs.attention_mask, jnp.asarray(run.position_ids, jnp.float32),
        run.key, run.suppress, jnp.int32(run.eos), cfg=config.talker_config, rt=rt,
        max_new_tokens=run.max_new_tokens, sampling=run.sampling,
    )


def _advance(params, config: OmniConfig, rt: Runtime, run: TalkerRun, state, until: int) -> talker.TalkerState:
    return talker.advance(
        params["talker"], state, run.inputs.trailing, run.inputs.tts_pad, run.suppress, jnp.int32(run.eos),
        jnp.int32(until), cfg=config.talker_config, rt=rt, sampling=run.sampling, cp_sampling=run.cp_sampling,
    )


def speak(
    params: dict,
    config: OmniConfig,
    rt: Runtime,
    *,
    prompt_ids,
    prompt_mask,
    sequences,
    thinker_embeds,
    thinker_hidden,
    speakers: str | Sequence[str] = "Ethan",
    greedy: bool = True,
    seed: int = 0,
    max_frames: int = 4095,
    multimodal: dict[str, Any] | None = None,
    chunked: bool = True,
    thinker_eos_token_id: int | Sequence[int] | None | str = "default",
    sampling: SamplingConfig | None = None,
    suppress_tokens: Sequence[int] | None = None,
    codec_eos_token_id: int | None = None,
) -> SpeechOutput:
    """Speaks the thinker's answers: one waveform per row.

    Args:
      params: the full parameter tree ("thinker", "talker", "code2wav").
      prompt_ids, prompt_mask: (B, S) the left-padded prompt exactly as given to the thinker.
      sequences: (B, S + N) prompt then generated ids (pad after a row's EOS; extra pad columns are fine).
      thinker_embeds: (B, >= S, D_thinker) the thinker's input embeddings (`hidden_states[0]`, media
        features at their placeholders); only the prompt positions are read.
      thinker_hidden: (B, >= S, D_thinker) `hidden_states[talker_config.accept_hidden_layer]` (the
        output of decoder layer accept_hidden_layer - 1); only the prompt positions are read; may be
        None when no user turn holds media.
      speakers: one name for every row or one per row (case-insensitive; unknown -> ValueError listing
        the valid ones).
      greedy: the reference's `talker_do_sample=False` (talker argmax after repetition penalty 1.05,
        code predictor argmax); else its sampling defaults (talker T 0.9, top-k 50, top-p 1.0,
        penalty 1.05; predictor top-k 50, top-p 0.8) with JAX random draws from `seed`.
      max_frames: at most this many codec frames per row (the reference's talker_max_new_tokens - 1).
      multimodal: the processor's keys (`image_grid_thw`, `video_grid_thw`, `video_second_per_grid`,
        `feature_attention_mask`, `use_audio_in_video`; pixel/feature arrays ignored) for the talker's
        position ids.
      chunked: True: the reference's chunked Code2Wav decode (what its generate returns); False: the
        seamless full decode (what `stream_speak` yields).
      thinker_eos_token_id: the thinker's EOS id(s) used in generation (default `<|im_end|>`, the
        reference's default); None = no EOS (as the reference's `thinker_eos_token_id=None`).
      sampling, suppress_tokens, codec_eos_token_id: overrides of the talker's sampling, suppressed
        codebook-0 ids (`talker.default_suppress_tokens`) and codec EOS (the reference's
        `talker_do_sample/...`, `talker_suppress_tokens`, `talker_eos_token_id`).

    Returns SpeechOutput: audio[b] float32 (samples,) at 24 kHz; codes[b] int32 (num_code_groups, frames).
    """
    run = prepare_talker(
        params, config, rt, prompt_ids=prompt_ids, prompt_mask=prompt_mask, sequences=sequences,
        thinker_embeds=thinker_embeds, thinker_hidden=thinker_hidden, speakers=speakers, greedy=greedy, seed=seed,
        max_frames=max_frames, multimodal=multimodal, thinker_eos_token_id=thinker_eos_token_id, sampling=sampling,
        suppress_tokens=suppress_tokens, codec_eos_token_id=codec_eos_token_id,
    )
    state = _start(params, config, rt, run)
    state = _advance(params, config, rt, run, state, run.max_new_tokens)
    out = talker.collect_codes(state, run.eos)
    audio = code2wav.decode_batch(params["code2wav"], out.codes, out.lengths, config.code2wav_config, rt,
                                  chunked=chunked)
    codes = [np.ascontiguousarray(out.codes[r, :, : int(n)]) for r, n in enumerate(out.lengths)]
    return SpeechOutput(audio, codes)


def stream_speak(
    params: dict,
    config: OmniConfig,
    rt: Runtime,
    *,
    chunk_frames: int = 8,
    **kwargs,
) -> Iterator[StreamChunk]:
    """`speak` as a stream: yields StreamChunk(row, audio, final) as codec frames are produced.

    Same keyword arguments as `speak` (minus `chunked`). The talker runs `chunk_frames` frames at a
    time (`talker.advance`, one compilation for every chunk); each chunk's frames go through one
    batched `code2wav.StreamingDecoder` (seamless: no samples lost at chunk seams). Per row, the
    concatenated audio equals `speak(..., chunked=False).audio[row]` and the frames equal its codes;
    every row ends with one chunk with `final=True` (possibly empty audio). Rows are cut at their own
    codec EOS: frames after it are zeroed before decoding, and nothing past the row's length is yielded.
    """
    if kwargs.pop("chunked", False):
        raise ValueError("stream_speak yields the seamless decode; chunked=True is only for speak")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    run = prepare_talker(params, config, rt, **kwargs)
    cfg = config.code2wav_config
    b = run.inputs.embeds.shape[0]
    max_frames = run.max_new_tokens - 1
    state = _start(params, config, rt, run)
    # Every push holds at most chunk_frames frames: one compiled decoder step for the whole stream.
    decoder = code2wav.StreamingDecoder(params["code2wav"], cfg, rt, batch=b, buckets=(chunk_frames,))
    lengths: list[int | None] = [None] * b  # frames before each row's codec EOS, once known
    emitted = np.zeros(b, np.int64)  # samples yielded per row
    finished = np.zeros(b, bool)
    pushed = 0
    while not finished.all():
        state = _advance(params, config, rt, run, state, min(pushed + chunk_frames, max_frames))
        step = int(state.step)
        tokens = np.asarray(state.tokens)[:, : step + 1]  # token k = frame k's c0; EOS ends the row
        for r in range(b):
            if lengths[r] is None:
                hits = np.nonzero(tokens[r] == run.eos)[0]
                if hits.size:
                    lengths[r] = int(hits[0])
                elif step >= max_frames:
                    lengths[r] = max_frames
        frames = np.asarray(state.codes)[:, pushed:step].transpose(0, 2, 1)  # (B, G, n)
        valid = np.array([lengths[r] if lengths[r] is not None else step for r in range(b)])
        frames = np.where(np.arange(pushed, step)[None, None] < valid[:, None, None], frames, 0)
        before = decoder.samples
        audio = decoder.push(frames.astype(np.int32))
        pushed = step
        for r in range(b):
            if finished[r]:
                continue
            final = lengths[r] is not None
            end = decoder.samples
            if final:
                end = min(end, code2wav.output_length(cfg, lengths[r]) if lengths[r] else 0)
            piece = audio[r, emitted[r] - before : max(end, emitted[r]) - before]
            emitted[r] += piece.shape[0]
            if piece.size or final:
                yield StreamChunk(r, np.ascontiguousarray(piece, np.float32), final)
            finished[r] = final
