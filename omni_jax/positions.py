"""Position ids for the thinker's M-RoPE: the reference `get_rope_index` (TM-RoPE), in numpy.

Positions are computed on the host, as the reference does, and handed to the jitted model as fp32:
video temporal ids are fractional (`t * second_per_grid * position_id_per_seconds`), and the
reference keeps them as float32 all the way into the rotary tables, so we do too (never truncated).

Reference: transformers 5.23.0 `modeling_qwen3_omni_moe.py`,
`Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index` and `get_llm_pos_ids_for_vision`
(used by `Qwen3OmniMoeThinkerForConditionalGeneration`, its `.model`, and the talker).

Rules (per row, over the row's real tokens `input_ids[attention_mask == 1]`; `st_idx` = the max of the
last emitted block + 1, 0 at the start):

* text: `st_idx + arange(n)` on all three rows (T, H, W);
* `<|audio_start|>` / `<|vision_start|>` and the matching end token: one position each; for audio in
  video (`<|vision_start|><|audio_start|>` ... `<|audio_end|><|vision_end|>`) two consecutive ones;
* audio: `st_idx + arange(audio_len)`, `audio_len = _get_feat_extract_output_lengths(mel_frames)`;
* image `(t, h, w)`: T = `st_idx + 0`, H = `st_idx + arange(h / merge)`, W = `st_idx + arange(w / merge)`
  (t > 1 images get T = `st_idx + 13 * k`);
* video: as an image with T = `st_idx + arange(t) * float32(second_per_grid) * position_id_per_seconds`
  in float32 (second_per_grid = temporal_patch_size / fps: 0.5, 1, 0.8, 2/3 at 4, 2, 2.5, 3 fps);
* audio in video: video and audio positions both start at the same `st_idx` and are merged by
  time, a video token first when its T <= the audio position (`replace_video_with_audio_token` lays
  the tokens out in the same order); the end tokens start after the max of the *last merged run*,
  not of the whole block (a reference quirk we keep). The processor orders the tokens with float64
  times, the model with float32 ones; they disagree on exact ties at some frame rates (e.g. 7, 15 or
  30 fps, never at 1, 2, 2.5, 3 or 4 fps), where the reference swaps the ids of the two tokens
  involved — we follow the model, as `get_rope_index` ignores the token layout.

Padding gets 0 in the multimodal branch and 1 in the text-only branch (taken when no image or video
grid is given, even with audio; audio positions are sequential so only the padding value differs).
`rope_deltas = max(position) + 1 - num_real_tokens` per row, float32 (B, 1).

Decode time (after a prefill with these positions), two reference paths that agree whenever the
prompt's last real token holds its row's max position (a text token, as in every chat prompt):

* `generate` (the path `omni_jax.generate` follows): the 4-row ids from
  `_prepare_position_ids_for_generation` grow by `last + 1` per step on each row, i.e. new token
  `k` (0-based) of row b gets `position_ids[:, b, -1] + 1 + k`;
* `compute_3d_position_ids` (forward with a cache and no `position_ids`): `cumsum(mask) - 1 + rope_delta`,
  i.e. `num_real_tokens_before_it + rope_delta` — *not* `cache_position + rope_delta`, which is only
  the same without left padding. `decode_position_ids` computes this one.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

__all__ = [
    "text_position_ids",
    "rope_index",
    "position_ids_for_inputs",
    "decode_position_ids",
    "audio_output_lengths",
]


def text_position_ids(attention_mask_bs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Text-only M-RoPE ids, exactly as the reference.

    Returns (position_ids (3, B, S) fp32, rope_deltas (B,) fp32): real tokens count 0, 1, 2, ... from
    each row's first real token (left padding is skipped); padding gets 1, as in the reference; the
    delta is `max_position + 1 - num_real_tokens` (0 for text).
    """
    mask = np.asarray(attention_mask_bs)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {mask.shape}")
    positions = np.cumsum(mask, axis=-1).astype(np.float32) - 1.0
    positions = np.where(mask == 0, 1.0, positions).astype(np.float32)
    deltas = positions.max(axis=-1) + 1.0 - mask.sum(axis=-1)
    return np.broadcast_to(positions[None], (3, *positions.shape)).copy(), deltas.astype(np.float32)


def audio_output_lengths(mel_frames, n_window: int = 50) -> np.ndarray:
    """Audio-encoder output tokens per audio (`_get_feat_extract_output_lengths`): int64, same shape.

    `13 * (L // 100) + ceil((L % 100) / 8)` for `n_window = 50`, written with the reference's
    floor divisions (so L = 0 gives 0).
    """
    lengths = np.asarray(mel_frames)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"audio lengths must be integers (mel frames), got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    chunk = n_window * 2
    feat = (lengths % chunk - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (lengths // chunk) * 13


def _config_fields(config) -> dict[str, Any]:
    """Token ids and sizes used by get_rope_index, from a ThinkerConfig, OmniConfig or TalkerConfig."""
    if hasattr(config, "thinker_config"):
        config = config.thinker_config
    vision = getattr(config, "vision_config", None)
    audio = getattr(config, "audio_config", None)
    return dict(
        image=int(config.image_token_id),
        video=int(config.video_token_id),
        audio=int(config.audio_token_id),
        vision_start=int(config.vision_start_token_id),
        audio_start=int(config.audio_start_token_id),
        pips=config.position_id_per_seconds,
        merge=int(vision.spatial_merge_size if vision is not None else config.spatial_merge_size),
        # The talker's config has no audio encoder; the reference helper's own default is 50.
        n_window=int(audio.n_window if audio is not None else 50),
    )


class _Media:
    """Per-batch media tables and the running indices (they run across rows, as in the reference)."""

    def __init__(self, image_grid_thw, video_grid_thw, second_per_grids, audio_lengths):
        self.image_grid = None if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
        self.video_grid = None if video_grid_thw is None else np.asarray(video_grid_thw, np.int64).reshape(-1, 3)
        # The reference multiplies by `second_per_grids[i].float()`: round to float32 first.
        self.spg = None if second_per_grids is None else np.asarray(second_per_grids).reshape(-1).astype(np.float32)
        self.audio_len = audio_lengths
        self.image_idx = self.video_idx = self.audio_idx = 0

    def _take(self, table, idx, what):
        if table is None:
            raise ValueError(f"input_ids contain a {what} but no {what} information was given")
        if idx >= len(table):
            raise ValueError(f"input_ids contain more {what}s than the {len(table)} given")
        return table[idx]

    def next_audio_len(self) -> int:
        return int(self._take(self.audio_len, self.audio_idx, "audio (audio lengths)"))

    def image(self):
        return self._take(self.image_grid, self.image_idx, "image (image_grid_thw)")

    def video(self):
        grid = self._take(self.video_grid, self.video_idx, "video (video_grid_thw)")
        spg = self._take(self.spg, self.video_idx, "video (second_per_grids)")
        return grid, spg


def _text(n: int, st_idx: np.float32) -> np.ndarray:
    return np.broadcast_to(np.arange(n, dtype=np.float32) + st_idx, (3, n))


def _vision(grid, t_index_f32: np.ndarray, st_idx: np.float32, merge: int) -> np.ndarray:
    """`get_llm_pos_ids_for_vision`: (3, t * h/m * w/m) fp32, frame-major then row-major."""
    hh, ww = int(grid[1]) // merge, int(grid[2]) // merge
    t = len(t_index_f32)
    t_idx = np.repeat(t_index_f32, hh * ww)
    h_idx = np.broadcast_to(np.arange(hh, dtype=np.float32)[None, :, None], (t, hh, ww)).reshape(-1)
    w_idx = np.broadcast_to(np.arange(ww, dtype=np.float32)[None, None, :], (t, hh, ww)).reshape(-1)
    return np.stack([t_idx, h_idx, w_idx]) + st_idx


def _merge_audio_video(video: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, np.float32 | None]:
    """Reference's token-by-token merge (video first when its T <= the audio position), vectorised.

    Returns the merged (3, Nv + Na) block and the max of the last block the reference appends (the
    remainder after its merge loop stops), or None when both are empty.
    """
    vt, at = video[0], audio[0]
    nv, na = vt.shape[0], at.shape[0]
    if np.any(np.diff(vt) < 0) or np.any(np.diff(at) <= 0):  # never for spg >= 0; keep exact anyway
        return _merge_audio_video_loop(video, audio)
    out = np.empty((3, nv + na), np.float32)
    # Video i follows every audio token strictly before it; audio j follows every video token <= it.
    out[:, np.arange(nv) + np.searchsorted(at, vt, side="left")] = video
    out[:, np.arange(na) + np.searchsorted(vt, at, side="right")] = audio
    if nv == 0 and na == 0:
        return out, None
    if nv == 0 or (na > 0 and vt[-1] <= at[-1]):
        return out, at[-1] if na else None  # video ran out first: the audio remainder is last
    tail = video[:, vt > at[-1]] if na else video  # audio ran out first: the video remainder is last
    return out, tail.max()


def _merge_audio_video_loop(video, audio):
    vi = ai = 0
    nv, na = video.shape[1], audio.shape[1]
    cols, last = [], None
    while vi < nv and ai < na:
        if video[0, vi] <= audio[0, ai]:
            cols.append(video[:, vi])
            last = video[:, vi : vi + 1]
            vi += 1
        else:
            cols.append(audio[:, ai])
            last = audio[:, ai : ai + 1]
            ai += 1
    if vi < nv:
        cols.extend(video[:, vi:].T)
        last = video[:, vi:]
    if ai < na:
        cols.extend(audio[:, ai:].T)
        last = audio[:, ai:]
    merged = np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((3, 0), np.float32)
    return merged, (None if last is None else last.max())


def _row_positions(ids: np.ndarray, media: _Media, f: dict, use_audio_in_video: bool) -> np.ndarray:
    """The reference's per-row loop over media segments; each segment is built vectorised."""
    n = len(ids)
    vs_pos = np.flatnonzero(ids == f["vision_start"])
    as_pos = np.flatnonzero(ids == f["audio_start"])
    if len(vs_pos) and vs_pos[-1] + 1 >= n:
        raise ValueError("a row ends with <|vision_start|>: its media token is missing")
    after_vs = ids[vs_pos + 1]
    audio_nums = len(as_pos)
    image_nums = int(np.sum(after_vs == f["image"]))
    video_nums = int(np.sum(after_vs == (f["audio_start"] if use_audio_in_video else f["video"])))
    has_vision = bool(np.any((ids == f["image"]) | (ids == f["video"])))
    has_audio = bool(np.any(ids == f["audio"]))
    vs_list, as_list = vs_pos.tolist(), as_pos.tolist()

    def next_marker(positions, st, name):
        k = bisect.bisect_left(positions, st)
        if k == len(positions):
            raise ValueError(f"no {name} left in the row after token {st}: media markers and counts disagree")
        return positions[k]

    pieces: list[np.ndarray] = []
    last_max = None  # max of the last appended block, as `llm_pos_ids_list[-1].max()`
    st = 0
    remain_images, remain_videos, remain_audios = image_nums, video_nums, audio_nums
    multimodal_nums = image_nums + audio_nums if use_audio_in_video else image_nums + video_nums + audio_nums

    def emit(block):
        nonlocal last_max
        pieces.append(block)
        if block.shape[1]:
            last_max = block.max()

    for _ in range(multimodal_nums):
        st_idx = np.float32(last_max + 1) if pieces else np.float32(0)
        ed_vs = next_marker(vs_list, st, "<|vision_start|>") if has_vision and (
            remain_videos > 0 or remain_images > 0) else n + 1
        ed_as = next_marker(as_list, st, "<|audio_start|>") if has_audio and remain_audios > 0 else n + 1
        min_ed = min(ed_vs, ed_as)
        if min_ed > n:
            raise ValueError("fewer media segments in the row than its start tokens announce")
        text_len = min_ed - st
        if text_len != 0:
            emit(_text(text_len, st_idx))
            st_idx = np.float32(st_idx + text_len)
        audio_in_video = min_ed == ed_vs and ed_vs + 1 == ed_as
        bos_len = eos_len = 2 if audio_in_video else 1
        emit(_text(bos_len, st_idx))
        st_idx = np.float32(st_idx + bos_len)

        if min_ed == ed_as:  # audio
            audio_len = media.next_audio_len()
            emit(_text(audio_len, st_idx))
            st += text_len + bos_len + audio_len + eos_len
            media.audio_idx += 1
            remain_audios -= 1
        elif ids[ed_vs + 1] == f["image"]:
            grid = media.image()
            t_index = (np.arange(int(grid[0]), dtype=np.int64) * 1 * f["pips"]).astype(np.float32)
            emit(_vision(grid, t_index, st_idx, f["merge"]))
            st += text_len + bos_len + int(np.prod(grid)) // f["merge"] ** 2 + eos_len
            media.image_idx += 1
            remain_images -= 1
        elif ids[ed_vs + 1] == f["video"]:
            grid, spg = media.video()
            t_index = np.arange(int(grid[0]), dtype=np.float32) * spg * np.float32(f["pips"])
            emit(_vision(grid, t_index, st_idx, f["merge"]))
            st += text_len + bos_len + int(np.prod(grid)) // f["merge"] ** 2 + eos_len
            media.video_idx += 1
            remain_videos -= 1
        elif audio_in_video:
            audio_len = media.next_audio_len()
            audio = _text(audio_len, st_idx)
            grid, spg = media.video()
            t_index = np.arange(int(grid[0]), dtype=np.float32) * spg * np.float32(f["pips"])
            video = _vision(grid, t_index, st_idx, f["merge"])
            merged, tail_max = _merge_audio_video(video, audio)
            pieces.append(merged)
            if tail_max is not None:
                last_max = tail_max
            st += text_len + bos_len + audio_len + int(np.prod(grid)) // f["merge"] ** 2 + eos_len
            media.audio_idx += 1
            media.video_idx += 1
            remain_videos -= 1
            remain_audios -= 1
        # (any other token after <|vision_start|>: the reference emits only BOS and EOS, and so do we)
        st_idx = np.float32(last_max + 1)
        emit(_text(eos_len, st_idx))

    if st < n:
        st_idx = np.float32(last_max + 1) if pieces else np.float32(0)
        emit(_text(n - st, st_idx))
    row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.float32)
    if row.shape[1] != n:
        raise ValueError(
            f"the media segments cover {row.shape[1]} positions but the row has {n} real tokens: placeholder "
            "counts in input_ids disagree with the grids / audio lengths (or use_audio_in_video)"
        )
    return row


def rope_index(
    input_ids,
    attention_mask=None,
    *,
    config,
    image_grid_thw=None,
    video_grid_thw=None,
    audio_seqlens=None,
    feature_attention_mask=None,
    audio_token_lengths=None,
    second_per_grids=None,
    use_audio_in_video: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """TM-RoPE position ids and rope deltas, exactly the reference `get_rope_index`.

    Args:
      input_ids: (B, S) ints.
      attention_mask: (B, S), 1 = real token (left padding, or any holes); None = all real (the
        reference requires a mask).
      config: ThinkerConfig (or OmniConfig / TalkerConfig): token ids, `position_id_per_seconds`,
        `vision_config.spatial_merge_size`, `audio_config.n_window`.
      image_grid_thw, video_grid_thw: (N, 3) patch grids, in token order across the batch.
      audio_seqlens: (N_audio,) mel-frame lengths, the reference's `audio_seqlens`
        (= `feature_attention_mask.sum(-1)`); or give `feature_attention_mask` (N_audio, frames); or
        `audio_token_lengths`, the encoder output lengths (placeholder counts) directly. At most one.
      second_per_grids: (N_video,) seconds per temporal grid (`video_second_per_grid`), cast to
        float32 as in the reference. Required with videos.
      use_audio_in_video: the reference flag (one for the whole batch): each video's placeholder is
        `<|vision_start|><|audio_start|>` + interleaved tokens + `<|audio_end|><|vision_end|>`.

    Returns:
      position_ids (3, B, S) float32 (T, H, W; fractional for video at non-integer
      `second_per_grid * position_id_per_seconds`), rope_deltas (B, 1) float32.
    """
    f = _config_fields(config)
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}")
    mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")

    if image_grid_thw is None and video_grid_thw is None:
        # Reference text branch: float cumsum, padding = 1, delta over the row's max.
        positions = np.cumsum(mask.astype(np.float32), axis=-1, dtype=np.float32) - np.float32(1)
        positions = np.where(mask == 0, np.float32(1), positions).astype(np.float32)
        deltas = positions.max(axis=-1, keepdims=True) + np.float32(1) - mask.sum(-1, keepdims=True)
        return np.broadcast_to(positions[None], (3, *ids.shape)).copy(), deltas.astype(np.float32)

    given = [a is not None for a in (audio_seqlens, feature_attention_mask, audio_token_lengths)]
    if sum(given) > 1:
        raise ValueError("give only one of audio_seqlens, feature_attention_mask, audio_token_lengths")
    audio_len = None
    if audio_token_lengths is not None:
        audio_len = np.asarray(audio_token_lengths, np.int64).reshape(-1)
    elif audio_seqlens is not None or feature_attention_mask is not None:
        frames = (np.asarray(audio_seqlens).reshape(-1) if audio_seqlens is not None
                  else np.asarray(feature_attention_mask).astype(np.int64).sum(-1))
        audio_len = audio_output_lengths(frames, f["n_window"])

    media = _Media(image_grid_thw, video_grid_thw, second_per_grids, audio_len)
    real = mask == 1
    position_ids = np.zeros((3, *ids.shape), np.float32)
    deltas = np.zeros((ids.shape[0], 1), np.float32)
    for b in range(ids.shape[0]):
        row = _row_positions(ids[b][real[b]], media, f, bool(use_audio_in_video))
        position_ids[:, b, real[b]] = row
        n = row.shape[1]
        deltas[b, 0] = (row.max() if n else np.float32(0)) + np.float32(1) - np.float32(n)
    return position_ids, deltas


def position_ids_for_inputs(
    input_ids, attention_mask, config, **multimodal: Any
) -> tuple[np.ndarray, np.ndarray]:
    """`rope_index` from the reference processor's keys (`image_grid_thw`, `video_grid_thw`,
    `video_second_per_grid`, `feature_attention_mask` or `audio_feature_lengths`, `use_audio_in_video`;
    pixel/feature arrays are ignored), as `_prepare_position_ids_for_generation` calls it."""
    fam = multimodal.get("feature_attention_mask")
    return rope_index(
        input_ids,
        attention_mask,
        config=config,
        image_grid_thw=multimodal.get("image_grid_thw"),
        video_grid_thw=multimodal.get("video_grid_thw"),
        audio_seqlens=None if fam is not None else multimodal.get("audio_feature_lengths"),
        feature_attention_mask=fam,
        second_per_grids=multimodal.get("video_second_per_grid"),
        use_audio_in_video=bool(multimodal.get("use_audio_in_video") or False),
    )


def decode_position_ids(attention_mask_bs, rope_deltas_b1, num_new: int = 1) -> np.ndarray:
    """Positions (3, B, num_new) float32 of the next `num_new` tokens appended after a prompt.

    The reference's cached-decode rule (`compute_3d_position_ids`): `cumsum(mask) - 1 + rope_delta`,
    i.e. (real tokens before the new one) + delta on all three rows. Left padding is not counted, so
    this is `cache_position + delta` only for unpadded rows. Equal to the `generate` rule
    (last prompt position + 1 + k per row) when the prompt ends with text.
    """
    mask = np.asarray(attention_mask_bs)
    deltas = np.asarray(rope_deltas_b1, np.float32).reshape(-1, 1)
    base = mask.astype(np.int64).sum(-1, keepdims=True) + np.arange(num_new, dtype=np.int64)[None]
    return np.broadcast_to((base.astype(np.float32) + deltas)[None], (3, mask.shape[0], num_new)).copy()
