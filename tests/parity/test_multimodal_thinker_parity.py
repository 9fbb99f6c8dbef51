"""The whole thinker on media (audio tower + vision encoder + TM-RoPE + merge + DeepStack + decoder)
vs the reference `Qwen3OmniMoeThinkerForConditionalGeneration` on the tiny preset, fp32.

Inputs are built here with the processor's keys: random log-mel features and random pixel patches
whose sizes agree with the grids, and `input_ids` with the placeholder counts the processor emits
(audio: `audio_output_lengths(frames)`; image/video: `t*h*w / 4`; audio in video: the interleaving
of `processing.video_with_audio_placeholder`). Two left-padded batches, each row with its own media:

* A (`use_audio_in_video=True`): image + audio | video with its sound track | text only | a silent
  video (plain `<|video_pad|>` tokens, as the processor leaves a video without sound). The reference
  counts only `<|vision_start|><|audio_start|>` videos under the flag, so the silent video's tokens
  get text positions there (its features and DeepStack additions are still placed); we must agree.
* B (`use_audio_in_video=False`): video (3 frames, fractional temporal ids) + image | audio + image +
  audio | audio + video: image and video DeepStack features interleaved across rows.

Pitfalls covered: P3 (positions through the model), P4 (placeholder counts), P8 (DeepStack per row,
disabled must differ), P13 (batched == single). Media sizes are chosen so that the encoders compile
few shapes: audio 6 chunks per batch, 3 per single row; vision rows of 32 or 64 patches.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch

from omni_jax import OmniModel
from omni_jax.audio_encoder import audio_output_lengths
from omni_jax.processing import video_with_audio_placeholder
from tests.conftest import FP32, reference_and_params

# The bar of the issue: max |logit difference| <= 1e-5 x max |reference logit| over real tokens.
LOGIT_TOLERANCE = 1e-5
PATCH = 3 * 2 * 16 * 16  # channels * temporal_patch_size * patch_size**2 (tiny preset)


@functools.lru_cache(maxsize=None)
def _setup():
    """(config, reference, one shared OmniModel: its jitted functions are reused by every test)."""
    config, ref, params = reference_and_params("tiny")
    return config, ref, OmniModel(config, params, FP32)


# ------------------------------------------------------------------------------------------ inputs
# A row is a list of segments; media segments carry their own data, so that a row can be assembled
# alone or within a batch with identical values.
class _Segments:
    def __init__(self, config, seed: int):
        self.c = config.thinker_config
        self.rng = np.random.default_rng(seed)

    def text(self, n):
        return ("text", self.rng.integers(0, 400, n).tolist())

    def _mel(self, frames):
        return self.rng.standard_normal((128, frames)).astype(np.float32)

    def _patches(self, grid):
        return self.rng.standard_normal((int(np.prod(grid)), PATCH)).astype(np.float32)

    def audio(self, frames):
        return ("audio", self._mel(frames))

    def image(self, grid):
        return ("image", grid, self._patches(grid))

    def video(self, grid, spg):
        return ("video", grid, spg, self._patches(grid))

    def video_with_audio(self, grid, spg, frames):
        return ("video_with_audio", grid, spg, self._patches(grid), self._mel(frames))


def _assemble(config, rows, use_audio_in_video: bool):
    """Rows of segments -> (input_ids, attention_mask) left padded + the processor's media keys.

    Media go in token order across the batch, as the processor emits them (a video's sound track
    takes its audio slot at the video)."""
    c = config.thinker_config
    tokens = {"<|audio_pad|>": c.audio_token_id, "<|video_pad|>": c.video_token_id,
              "<|audio_start|>": c.audio_start_token_id, "<|audio_end|>": c.audio_end_token_id}
    mels, images, image_grids, videos, video_grids, spgs = [], [], [], [], [], []
    id_rows = []

    def vision(pads):
        return [c.vision_start_token_id] + pads + [c.vision_end_token_id]

    for row in rows:
        ids = []
        for seg in row:
            kind = seg[0]
            if kind == "text":
                ids += seg[1]
            elif kind == "audio":
                mels.append(seg[1])
                n = int(audio_output_lengths(np.array([seg[1].shape[1]]))[0])
                ids += [c.audio_start_token_id] + [c.audio_token_id] * n + [c.audio_end_token_id]
            elif kind == "image":
                image_grids.append(seg[1])
                images.append(seg[2])
                ids += vision([c.image_token_id] * (int(np.prod(seg[1])) // 4))
            else:
                video_grids.append(seg[1])
                spgs.append(seg[2])
                videos.append(seg[3])
                if kind == "video":
                    ids += vision([c.video_token_id] * (int(np.prod(seg[1])) // 4))
                else:  # the processor's interleaving, between <|vision_start|> and <|vision_end|>
                    mels.append(seg[4])
                    n = int(audio_output_lengths(np.array([seg[4].shape[1]]))[0])
                    text = video_with_audio_placeholder(seg[1], seg[2], n)
                    ids += vision([tokens[t] for t in re.findall(r"<\|\w+\|>", text)])
        id_rows.append(ids)
    ids, mask = _left_pad(id_rows)
    media = {}
    if mels:
        frames = np.array([m.shape[1] for m in mels])
        fam = (np.arange(frames.max())[None] < frames[:, None]).astype(np.int64)
        feats = np.zeros((len(mels), 128, frames.max()), np.float32)
        for i, m in enumerate(mels):
            feats[i, :, : m.shape[1]] = m
        media.update(input_features=feats, feature_attention_mask=fam)
    if images:
        media.update(pixel_values=np.concatenate(images), image_grid_thw=np.array(image_grids, np.int64))
    if videos:
        media.update(pixel_values_videos=np.concatenate(videos), video_grid_thw=np.array(video_grids, np.int64),
                     video_second_per_grid=np.array(spgs, np.float32), use_audio_in_video=use_audio_in_video)
    return ids, mask, media


def _left_pad(rows):
    seq = max(map(len, rows))
    ids = np.zeros((len(rows), seq), np.int64)
    mask = np.zeros((len(rows), seq), np.int64)
    for i, row in enumerate(rows):
        ids[i, seq - len(row):] = row
        mask[i, seq - len(row):] = 1
    return ids, mask


@functools.lru_cache(maxsize=None)
def _rows(name: str):
    """Segment rows of batch "A" (use_audio_in_video=True) or "B" (False).

    A: audio 230 frames (3 chunks) and a 250-frame sound track (3 chunks); the silent video after
    the one with sound (the reference indexes videos with a running counter that skips silent ones
    under the flag, so only then is the batch well defined). B: audio 60 + 130 + 300 frames (6
    chunks); video patches 48 + 16, image patches 24 + 8.
    """
    config = _setup()[0]
    s = _Segments(config, seed={"A": 0, "B": 1}[name])
    t = s.text
    if name == "A":
        return (
            [t(3), s.image((1, 4, 6)), t(2), s.audio(230), t(4)],
            [t(2), s.video_with_audio((2, 4, 4), 0.8, 250), t(3)],
            [t(7)],
            [t(4), s.video((2, 4, 4), 1.0), t(2)],
        )
    return (
        [t(2), s.video((3, 4, 4), 0.8), t(3), s.image((1, 6, 4)), t(2)],
        [t(1), s.audio(60), t(2), s.image((1, 2, 4)), t(1), s.audio(130), t(3)],
        [t(2), s.audio(300), s.video((1, 2, 8), 0.5), t(5)],
    )


@functools.lru_cache(maxsize=None)
def _inputs(name: str):
    """(input_ids, attention_mask, media dict) of batch "A" or "B"."""
    return _assemble(_setup()[0], _rows(name), use_audio_in_video=name == "A")


def _torch_kwargs(media: dict) -> dict:
    return {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in media.items()}


@functools.lru_cache(maxsize=None)
def _reference_logits(name: str) -> np.ndarray:
    _, ref, _ = _setup()
    ids, mask, media = _inputs(name)
    with torch.no_grad():
        return ref.thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           **_torch_kwargs(media)).logits.numpy()


@functools.lru_cache(maxsize=None)
def _our_logits(name: str, use_deepstack: bool = True) -> np.ndarray:
    _, _, model = _setup()
    ids, mask, media = _inputs(name)
    return model.thinker_logits(ids, mask, use_deepstack=use_deepstack, **media)


def _max_rel_error(got, expected) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["A", "B"])
def test_mixed_batch_logits_match_reference(name):
    ids, mask, media = _inputs(name)
    c = _setup()[0].thinker_config
    # The batch really is what the docstring says: every media kind, rows of different lengths.
    assert len(set(mask.sum(1).tolist())) == len(mask)
    kinds = {c.audio_token_id, c.image_token_id, c.video_token_id}
    assert kinds <= set(ids.reshape(-1).tolist())
    valid = mask.astype(bool)
    err = _max_rel_error(_our_logits(name)[valid], _reference_logits(name)[valid])
    assert err <= LOGIT_TOLERANCE, f"batch {name}: max |diff| / max |logit| = {err:.2e}"


def test_batched_equals_single_rows():
    """Each media row of batch A alone (unpadded, its own media only) equals its batched row."""
    config, _, model = _setup()
    batched = _our_logits("A")
    _, mask, _ = _inputs("A")
    for row in (0, 1):
        ids, single_mask, media = _assemble(config, [_rows("A")[row]], use_audio_in_video=True)
        assert single_mask.all()
        got = model.thinker_logits(ids, single_mask, **media)[0]
        err = _max_rel_error(got, batched[row][mask[row].astype(bool)])
        assert err <= LOGIT_TOLERANCE, f"row {row}: single vs batched {err:.2e}"


def test_deepstack_disabled_differs_at_and_after_visual_tokens():
    """use_deepstack=False (an ablation) leaves every position before a row's first visual token and
    every row without visual tokens as they were, and changes the rest far beyond the tolerance;
    the enabled path is the one that matches the reference (`test_mixed_batch_logits_match_reference`)."""
    c = _setup()[0].thinker_config
    ids, mask, _ = _inputs("A")
    on, off, expected = _our_logits("A"), _our_logits("A", use_deepstack=False), _reference_logits("A")
    real = mask.astype(bool)
    scale = np.abs(expected[real]).max()
    assert _max_rel_error(on[real], expected[real]) <= LOGIT_TOLERANCE
    assert _max_rel_error(off[real], expected[real]) > 1e-2
    visual = (ids == c.image_token_id) | (ids == c.video_token_id)
    assert visual[[0, 1, 3]].any(1).all() and not visual[2].any()
    for row in range(len(ids)):
        valid = mask[row].astype(bool)
        after = np.cumsum(visual[row]) > 0  # at or after the row's first visual token
        same = valid & ~after
        assert np.abs(on[row][same] - off[row][same]).max() <= LOGIT_TOLERANCE * scale, f"row {row} before"
        if after.any():
            # every position from the first visual token on moves by more than 1000x the tolerance
            per_position = np.abs(on[row][after] - off[row][after]).max(-1)
            assert per_position.min() > 1e-2 * scale, f"row {row}: {per_position.min() / scale:.2e}"


def test_greedy_generate_matches_reference():
    """model.generate on batch A (every media kind) equals the reference thinker's greedy generate,
    token for token (prefill on the merged media, decode with the rope deltas); the EOS id is picked
    among the reference's greedy tokens so that rows stop at different steps (one compilation of our
    decode loop: its EOS ids are static)."""
    config, ref, model = _setup()
    ids, mask, media = _inputs("A")
    steps = 6

    def reference(eos):
        with torch.no_grad():
            return ref.thinker.generate(
                input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=steps,
                do_sample=False, eos_token_id=eos, pad_token_id=0, **_torch_kwargs(media),
            ).numpy()

    first_seen = {}
    for row in reference(config.text.vocab_size - 1)[:, ids.shape[1]:]:
        for i, token in enumerate(row.tolist()):
            first_seen[token] = min(first_seen.get(token, i), i)
    # The earliest token that is not a first token: some row stops after >= 2 tokens, others go on.
    eos = min((t for t in first_seen if first_seen[t] >= 1), key=lambda t: (first_seen[t], t))
    expected = reference(eos)
    out = model.generate(ids, mask, max_new_tokens=steps, eos_token_id=eos, pad_token_id=0, **media)
    assert len(set(out.num_generated.tolist())) > 1, out.num_generated
    np.testing.assert_array_equal(out.sequences[:, : expected.shape[1]], expected)
    assert (out.sequences[:, expected.shape[1]:] == 0).all()


def _replace_one(ids, mask, token_id, new_id):
    """A copy of ids with the first real `token_id` replaced by `new_id`."""
    ids = ids.copy()
    where = np.argwhere((ids == token_id) & (mask == 1))[0]
    ids[tuple(where)] = new_id
    return ids


@pytest.mark.parametrize("kind", ["image", "video", "audio"])
def test_placeholder_count_mismatch_is_a_clear_error(kind):
    config, _, model = _setup()
    c = config.thinker_config
    ids, mask, media = _inputs("A")
    token = {"image": c.image_token_id, "video": c.video_token_id, "audio": c.audio_token_id}[kind]
    message = rf"{kind}.* produced \d+ embeddings but input_ids hold \d+ placeholder"
    fewer = _replace_one(ids, mask, token, 7)  # same length: positions alone would not notice
    with pytest.raises(ValueError, match=message):
        model.thinker_logits(fewer, mask, **media)
    with pytest.raises(ValueError, match=message):
        model.generate(fewer, mask, max_new_tokens=1, **media)
    # One too many: a text token of the text-only row turned into a placeholder.
    more = ids.copy()
    more[2, -1] = token
    with pytest.raises(ValueError, match=message):
        model.thinker_logits(more, mask, **media)


def test_placeholders_without_their_media_are_a_clear_error():
    """Audio placeholders in input_ids but only images given."""
    _, _, model = _setup()
    ids, mask, media = _inputs("A")
    images_only = {k: media[k] for k in ("pixel_values", "image_grid_thw")}
    with pytest.raises(ValueError, match="audio"):
        model.thinker_logits(ids, mask, **images_only)


def test_incomplete_media_keys_are_clear_errors():
    _, _, model = _setup()
    ids, mask, media = _inputs("B")
    for drop, needs in (("image_grid_thw", "pixel_values"), ("pixel_values", "image_grid_thw"),
                        ("video_grid_thw", "pixel_values_videos"), ("feature_attention_mask", "input_features"),
                        ("video_second_per_grid", "video_second_per_grid")):
        partial = {k: v for k, v in media.items() if k != drop}
        with pytest.raises(ValueError, match=needs):
            model.thinker_logits(ids, mask, **partial)
    short = dict(media, pixel_values=media["pixel_values"][:-1])
    with pytest.raises(ValueError, match="pixel_values has"):
        model.thinker_logits(ids, mask, **short)
    with pytest.raises(TypeError, match="pixel_value"):
        model.thinker_logits(ids, mask, pixel_value=media["pixel_values"])
