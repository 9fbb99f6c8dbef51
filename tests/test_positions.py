"""TM-RoPE position ids (omni_jax.positions) against the reference `get_rope_index` (transformers 5.23.0).

Every case is compared bit for bit (float32 positions, float32 (B, 1) deltas) with the reference
method of a tiny `Qwen3OmniMoeThinkerForConditionalGeneration`; a few small cases are also checked
against hand-computed values. Token sequences use the tiny preset's special ids, with placeholder
counts consistent with the grids (t*h*w/4) and the audio output-length formula; audio-in-video
blocks are laid out by `omni_jax.processing.prompt.video_with_audio_placeholder` (pitfall P3).
"""

from __future__ import annotations

import functools
import re
import types
import zlib

import numpy as np
import pytest

from omni_jax import positions as P
from omni_jax.config import preset
from omni_jax.processing import audio_output_length
from omni_jax.processing import prompt as prompt_mod

CFG = preset("tiny").thinker_config
A, IMG, VID = CFG.audio_token_id, CFG.image_token_id, CFG.video_token_id
AS, AE, VS, VE = CFG.audio_start_token_id, CFG.audio_end_token_id, CFG.vision_start_token_id, CFG.vision_end_token_id
PAD = 0
assert CFG.position_id_per_seconds == 13 and CFG.vision_config.spatial_merge_size == 2

# second_per_grid = temporal_patch_size / fps for fps 2, 1, 2.5, 3 (and 4, 7)
SPGS = (1.0, 2.0, 0.8, 2 / 3, 0.5, 2 / 7)


@functools.lru_cache(maxsize=None)
def reference():
    from convert.reference import reference_model

    return reference_model(preset("tiny").replace(talker_config=None, code2wav_config=None,
                                                  enable_audio_output=False), thinker_only=True)


# ------------------------------------------------------------------------------ sequence builder
class Batch:
    """Rows of tokens plus the media tables in the order the reference consumes them."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.rows: list[list[int]] = []
        self.image_grid, self.video_grid, self.spg, self.frames = [], [], [], []

    def row(self, *segments):
        toks = []
        for seg in segments:
            kind, *args = seg if isinstance(seg, tuple) else ("text", seg)
            toks += getattr(self, "_" + kind)(*args)
        self.rows.append(toks)
        return self

    def _text(self, n):
        return self.rng.integers(10, 400, n).tolist()

    def _image(self, grid):
        self.image_grid.append(grid)
        return [VS] + [IMG] * (int(np.prod(grid)) // 4) + [VE]

    def _video(self, grid, spg):
        self.video_grid.append(grid)
        self.spg.append(spg)
        return [VS] + [VID] * (int(np.prod(grid)) // 4) + [VE]

    def _audio(self, frames):
        self.frames.append(frames)
        return [AS] + [A] * audio_output_length(frames) + [AE]

    def _av(self, grid, spg, frames):
        """Video with its sound track (use_audio_in_video), laid out as the prompt side does."""
        self.video_grid.append(grid)
        self.spg.append(spg)
        self.frames.append(frames)
        text = prompt_mod.video_with_audio_placeholder(grid, spg, audio_output_length(frames))
        names = {prompt_mod.AUDIO_BOS_TOKEN: AS, prompt_mod.AUDIO_EOS_TOKEN: AE,
                 prompt_mod.AUDIO_TOKEN: A, prompt_mod.VIDEO_TOKEN: VID}
        toks = [names[t] for t in re.findall(r"<\|[a-z_]+\|>", text)]
        assert "".join(re.findall(r"<\|[a-z_]+\|>", text)) == text
        return [VS] + toks + [VE]

    def arrays(self, padding="left"):
        S = max(len(r) for r in self.rows)
        ids = np.full((len(self.rows), S), PAD, np.int64)
        mask = np.zeros((len(self.rows), S), np.int64)
        for b, r in enumerate(self.rows):
            sl = slice(S - len(r), S) if padding == "left" else slice(0, len(r))
            ids[b, sl], mask[b, sl] = r, 1
        return ids, mask

    def media(self, empty_grids_as_none=True):
        def grid(g):
            return None if (not g and empty_grids_as_none) else np.asarray(g, np.int64).reshape(-1, 3)

        return dict(
            image_grid_thw=grid(self.image_grid),
            video_grid_thw=grid(self.video_grid),
            second_per_grids=np.asarray(self.spg, np.float64) if self.spg else None,
            audio_seqlens=np.asarray(self.frames, np.int64) if self.frames else None,
        )


def reference_rope_index(ids, mask, media, use_audio_in_video=False):
    import torch

    def t(x, dtype=None):
        return None if x is None else torch.tensor(x, dtype=dtype)

    pos, deltas = reference().get_rope_index(
        t(ids), image_grid_thw=t(media["image_grid_thw"]), video_grid_thw=t(media["video_grid_thw"]),
        attention_mask=t(mask), use_audio_in_video=use_audio_in_video,
        audio_seqlens=t(media["audio_seqlens"]),
        # The processor hands python floats to BatchFeature: a float32 tensor.
        second_per_grids=t(media["second_per_grids"], torch.float32),
    )
    assert pos.dtype == torch.float32 and deltas.dtype == torch.float32
    return pos.numpy(), deltas.numpy()


def check(batch: Batch, use_audio_in_video=False, padding="left", empty_grids_as_none=True):
    ids, mask = batch.arrays(padding)
    media = batch.media(empty_grids_as_none)
    ours_pos, ours_d = P.rope_index(ids, mask, config=CFG, use_audio_in_video=use_audio_in_video, **media)
    ref_pos, ref_d = reference_rope_index(ids, mask, media, use_audio_in_video)
    assert ours_pos.dtype == np.float32 and ours_d.dtype == np.float32
    assert ours_pos.shape == (3, *ids.shape) and ours_d.shape == ref_d.shape == (ids.shape[0], 1)
    np.testing.assert_array_equal(ours_pos, ref_pos)
    np.testing.assert_array_equal(ours_d, ref_d)
    return ours_pos, ours_d, ids, mask


# ------------------------------------------------------------------------------ golden values
def test_golden_image_after_text():
    b = Batch().row(2, ("image", (1, 4, 6)), 2)
    pos, d, _, _ = check(b)
    expected = np.array([
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8],
    ], np.float32)
    np.testing.assert_array_equal(pos[:, 0], expected)
    assert d[0, 0] == 9 - 12


def test_golden_left_padding_gets_zero_and_text_branch_gets_one():
    b = Batch().row(2, ("image", (1, 4, 4)), 1).row(3)
    pos, d, _, mask = check(b)
    # Row 1 = 3 text tokens after 6 pads: pads 0 in the multimodal branch.
    np.testing.assert_array_equal(pos[:, 1], np.tile([0, 0, 0, 0, 0, 0, 0, 1, 2], (3, 1)))
    np.testing.assert_array_equal(d[:, 0], [7 - 9, 0])  # max 6 (VE 5, text 6)
    text_pos, text_d = P.rope_index(np.zeros_like(mask), mask, config=CFG)  # no grids: text branch
    np.testing.assert_array_equal(text_pos[:, 1], np.tile([1, 1, 1, 1, 1, 1, 0, 1, 2], (3, 1)))
    np.testing.assert_array_equal(text_d[:, 0], [0, 0])
    legacy_pos, legacy_d = P.text_position_ids(mask)
    np.testing.assert_array_equal(legacy_pos, text_pos)
    np.testing.assert_array_equal(legacy_d, text_d[:, 0])


def test_golden_fractional_video_ids_are_float32_not_truncated():
    # Video (2, 2, 2) at 2.5 fps: second_per_grid 0.8, one token per frame; T = 2 + 0.8 * 13 in float32.
    b = Batch().row(1, ("video", (2, 2, 2), 0.8), 1)
    pos, d, _, _ = check(b)
    t1 = np.float32(2) + np.float32(0.8) * np.float32(13)  # 12.4000006
    ve = np.float32(t1 + np.float32(1))
    expected_t = np.array([0, 1, 2, t1, ve, np.float32(ve + np.float32(1))], np.float32)
    np.testing.assert_array_equal(pos[0, 0], expected_t)
    np.testing.assert_array_equal(pos[1, 0], [0, 1, 2, 2, ve, ve + 1])
    assert abs(pos[0, 0, 3] - 12.4) < 1e-5 and pos[0, 0, 3] != np.floor(pos[0, 0, 3])
    assert d[0, 0] == np.float32(np.float32(ve + 1) + np.float32(1)) - 6


def test_golden_audio_in_video_merge_video_first_on_ties():
    # Video (2, 4, 4) at 2 s/grid (T = 3, 29) + 300 frames of audio (39 tokens, positions 3..41):
    # V x4 (T=3), A x26 (3..28), V x4 (T=29: tie with audio 29, video first), A x13 (29..41), EOS 42, 43.
    b = Batch().row(1, ("av", (2, 4, 4), 2.0, 300), 1)
    pos, d, ids, _ = check(b, use_audio_in_video=True)
    row = ids[0]
    np.testing.assert_array_equal(row[:3], [row[0], VS, AS])
    block = slice(3, 3 + 47)
    kinds = "".join("V" if t == VID else "A" for t in row[block])
    assert kinds == "V" * 4 + "A" * 26 + "V" * 4 + "A" * 13
    t = pos[0, 0, block]
    np.testing.assert_array_equal(t[:4], [3] * 4)
    np.testing.assert_array_equal(t[4:30], np.arange(3, 29))
    np.testing.assert_array_equal(t[30:34], [29] * 4)
    np.testing.assert_array_equal(t[34:], np.arange(29, 42))
    np.testing.assert_array_equal(pos[1, 0, 3:7], [3, 3, 4, 4])
    np.testing.assert_array_equal(pos[2, 0, 3:7], [3, 4, 3, 4])
    np.testing.assert_array_equal(pos[:, 0, :3], np.tile([0, 1, 2], (3, 1)))  # text, then 2 BOS ids
    np.testing.assert_array_equal(pos[:, 0, 50:], np.tile([42, 43, 44], (3, 1)))  # 2 EOS ids, text
    assert d[0, 0] == 45 - 53


def test_golden_audio_in_video_eos_follows_last_run_only():
    # Text 0, BOS 1, 2; one frame of (1, 8, 8) video (16 tokens, T = 3, H/W 3..6), then 1 audio
    # token at 3: the reference starts EOS after the *last* merged run (the audio token), at 4, not
    # after the block's max 6, so EOS and the trailing text reuse ids of the video's H/W rows.
    b = Batch().row(1, ("av", (1, 8, 8), 2.0, 8), 1)
    pos, d, ids, _ = check(b, use_audio_in_video=True)
    assert (ids[0, 3:19] == VID).all() and ids[0, 19] == A
    np.testing.assert_array_equal(pos[0, 0, 3:19], [3] * 16)
    np.testing.assert_array_equal(pos[1, 0, 3:19], np.repeat([3, 4, 5, 6], 4))
    np.testing.assert_array_equal(pos[2, 0, 3:19], np.tile([3, 4, 5, 6], 4))
    np.testing.assert_array_equal(pos[:, 0, 19], [3, 3, 3])  # the audio token
    np.testing.assert_array_equal(pos[:, 0, 20:], np.tile([4, 5, 6], (3, 1)))
    assert d[0, 0] == 7 - 23


# ------------------------------------------------------------------------------ parity cases
def _case(name):
    b = Batch(seed=zlib.crc32(name.encode()))
    aiv = False
    if name == "text_only":
        b.row(7).row(3).row(1)
    elif name == "one_image":
        b.row(3, ("image", (1, 6, 8)), 4)
    elif name == "two_images_different_grids":
        b.row(2, ("image", (1, 4, 6)), 3, ("image", (1, 8, 4)), ("image", (2, 4, 4)), 2)
    elif name == "images_per_row_differ":
        b.row(("image", (1, 4, 4)), 1).row(5).row(2, ("image", (1, 2, 6)), ("image", (1, 6, 2)), 1)
    elif name.startswith("video_spg_"):
        spg = SPGS[int(name[-1])]
        b.row(3, ("video", (5, 4, 6), spg), 4).row(2, ("video", (3, 6, 4), spg), 1)
    elif name == "audio_only":  # no grids: the reference's text branch
        b.row(2, ("audio", 300), 3).row(1, ("audio", 101), 1)
    elif name == "several_audios":
        for frames in ((1, 8, 9), (99, 100, 101), (2900, 3100), (6100, 30)):
            b.row(1, *[("audio", f) for f in frames], 2)
    elif name == "audio_with_image":  # audio segments inside the multimodal branch
        b.row(2, ("audio", 170), 1, ("image", (1, 4, 4)), ("audio", 9), 3).row(("audio", 1000), 2)
    elif name == "mixed_media_per_row":
        b.row(1, ("image", (1, 4, 6)), ("audio", 230), 2, ("video", (3, 4, 4), 0.8), 1)
        b.row(("video", (2, 2, 4), 2 / 3), 3, ("image", (1, 2, 2)))
        b.row(2, ("audio", 50), ("audio", 450), ("audio", 99), 1)
        b.row(4)
    elif name.startswith("av_spg_"):
        aiv, spg = True, SPGS[int(name[-1])]
        # audio longer than the video, shorter than it, and equal-ish; several per row
        b.row(2, ("av", (4, 4, 4), spg, 900), 3)
        b.row(1, ("av", (6, 4, 2), spg, 120), 1, ("av", (2, 2, 2), spg, 30), 2)
        b.row(("av", (3, 4, 4), spg, int(100 * 3 * spg)), 1)
    elif name == "av_mixed_batch":  # rows with and without audio-in-video, left padded
        aiv = True
        b.row(2, ("av", (4, 4, 4), 0.8, 700), 2)
        b.row(1, ("audio", 300), ("image", (1, 4, 4)), 2)
        b.row(5)
        b.row(("image", (1, 2, 4)), 1, ("av", (2, 4, 4), 2.0, 100), 1, ("audio", 40))
    elif name == "av_then_silent_video":
        # use_audio_in_video with a silent video (plain video tokens) in a later row: the reference
        # counts only videos followed by <|audio_start|>, so the silent video's tokens get text ids.
        aiv = True
        b.row(1, ("av", (2, 4, 4), 1.0, 250), 1)
        b.row(2, ("video", (2, 4, 4), 1.0), 1)
    elif name == "video_and_separate_audio":  # use_audio_in_video=False with a standalone audio
        b.row(1, ("video", (4, 4, 4), 0.5), ("audio", 400), 1, ("video", (2, 2, 2), 2.0))
    else:
        raise KeyError(name)
    return b, aiv


CASES = [
    "text_only", "one_image", "two_images_different_grids", "images_per_row_differ",
    *[f"video_spg_{i}" for i in range(len(SPGS))], "audio_only", "several_audios", "audio_with_image",
    "mixed_media_per_row", *[f"av_spg_{i}" for i in range(len(SPGS))], "av_mixed_batch",
    "av_then_silent_video", "video_and_separate_audio",
]


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name, padding):
    b, aiv = _case(name)
    check(b, use_audio_in_video=aiv, padding=padding)


def test_empty_grids_take_the_multimodal_branch():
    # A given-but-empty grid selects the reference's multimodal branch: pads get 0, not 1.
    b = Batch().row(4).row(2)
    pos, _, _, _ = check(b, empty_grids_as_none=False)
    np.testing.assert_array_equal(pos[:, 1, :2], np.zeros((3, 2)))


def test_mask_with_holes_matches_reference():
    b, aiv = _case("mixed_media_per_row")
    ids, mask = b.arrays("left")
    # Insert masked-out junk tokens in the middle of each row: positions skip them.
    ids = np.insert(ids, [5, 9], 321, axis=1)
    mask = np.insert(mask, [5, 9], 0, axis=1)
    media = b.media()
    ours = P.rope_index(ids, mask, config=CFG, **media)
    ref = reference_rope_index(ids, mask, media)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def test_audio_length_inputs_agree():
    b, _ = _case("av_mixed_batch")
    ids, mask = b.arrays()
    media = b.media()
    frames = media.pop("audio_seqlens")
    base = P.rope_index(ids, mask, config=CFG, use_audio_in_video=True, audio_seqlens=frames, **media)
    fam = (np.arange(frames.max())[None] < frames[:, None]).astype(np.int64)
    via_mask = P.rope_index(ids, mask, config=CFG, use_audio_in_video=True, feature_attention_mask=fam, **media)
    via_tokens = P.rope_index(ids, mask, config=CFG, use_audio_in_video=True,
                              audio_token_lengths=audio_output_length(frames), **media)
    for other in (via_mask, via_tokens):
        np.testing.assert_array_equal(base[0], other[0])
        np.testing.assert_array_equal(base[1], other[1])
    lengths = np.array([0, 1, 8, 9, 30, 99, 100, 101, 300, 1000, 2900, 3100, 6100, 240000])
    np.testing.assert_array_equal(P.audio_output_lengths(lengths), audio_output_length(lengths))
    np.testing.assert_array_equal(P.audio_output_lengths(lengths)[1:10], [1, 1, 2, 4, 13, 13, 14, 39, 130])


@pytest.mark.parametrize("spg", SPGS[:5])
def test_prompt_layout_agrees_with_merge_order(spg):
    """The prompt's audio/video interleaving puts every token where rope_index's merge puts its id."""
    for frames in (1, 37, 260, 555, 1234):
        for grid in ((1, 2, 2), (3, 4, 2), (7, 2, 4), (12, 2, 2)):
            b = Batch().row(3, ("av", grid, spg, frames), 1)
            ids, mask = b.arrays()
            pos, _ = P.rope_index(ids, mask, config=CFG, use_audio_in_video=True, **b.media())
            st = 5  # 3 text + 2 BOS
            is_audio = ids[0] == A
            np.testing.assert_array_equal(pos[:, 0, is_audio], np.tile(st + np.arange(is_audio.sum()), (3, 1)))
            t_frames = np.arange(grid[0], dtype=np.float32) * np.float32(spg) * np.float32(13) + np.float32(st)
            per_t = grid[1] * grid[2] // 4
            np.testing.assert_array_equal(pos[0, 0, ids[0] == VID], np.repeat(t_frames, per_t))


def test_long_audio_and_long_audio_in_video_match_reference():
    # 40 minutes of audio (31,200 tokens) and a 10-minute video with its sound track (~8,400 tokens).
    b = Batch().row(3, ("audio", 240_000), 2, ("av", (300, 2, 4), 2.0, 60_000), 2)
    check(b, use_audio_in_video=True)
    assert len(b.rows[0]) > 39_000


def test_errors_name_the_problem():
    b = Batch().row(2, ("image", (1, 4, 4)), 1)
    ids, mask = b.arrays()
    with pytest.raises(ValueError, match="image"):
        P.rope_index(ids, mask, config=CFG, video_grid_thw=np.zeros((0, 3), np.int64))
    with pytest.raises(ValueError, match="real tokens"):
        P.rope_index(ids, mask, config=CFG, image_grid_thw=[[1, 4, 8]])


# ------------------------------------------------------------------------------ decode time
def test_decode_positions_match_reference_paths():
    import torch

    b, aiv = _case("av_mixed_batch")
    ids, mask = b.arrays()
    media = b.media()
    pos, deltas = P.rope_index(ids, mask, config=CFG, use_audio_in_video=aiv, **media)
    new = 3
    ours = P.decode_position_ids(mask, deltas, new)

    # compute_3d_position_ids with a cache: cumsum(mask) - 1 + rope_deltas over the whole mask.
    model = reference().model
    model.rope_deltas = torch.tensor(deltas)
    full_mask = torch.tensor(np.concatenate([mask, np.ones((mask.shape[0], new), np.int64)], 1))
    cache = types.SimpleNamespace(get_seq_length=lambda: ids.shape[1])
    ref = model.compute_3d_position_ids(
        torch.tensor(ids[:, -1:]), None, None, torch.zeros(ids.shape[0], new, 4), full_mask, cache
    )
    np.testing.assert_array_equal(ours, ref[..., -new:].numpy())

    # generate: `_prepare_position_ids_for_generation` then last + 1 per step; rows 1..3 are ours.
    fam = (np.arange(1000)[None] < media["audio_seqlens"][:, None]).astype(np.int64)
    kwargs = dict(
        attention_mask=torch.tensor(mask), image_grid_thw=torch.tensor(media["image_grid_thw"]),
        video_grid_thw=torch.tensor(media["video_grid_thw"]), use_audio_in_video=True,
        feature_attention_mask=torch.tensor(fam),
        video_second_per_grid=torch.tensor(media["second_per_grids"], dtype=torch.float32),
    )
    four = reference()._prepare_position_ids_for_generation(torch.tensor(ids), kwargs).numpy()
    assert four.shape == (4, *ids.shape)
    np.testing.assert_array_equal(four[0], np.where(mask == 1, np.cumsum(mask, -1) - 1, 0))
    processor_keys = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    processor_keys.pop("attention_mask")
    from_keys = P.position_ids_for_inputs(ids, mask, CFG, pixel_values=None, **processor_keys)
    np.testing.assert_array_equal(four[1:], from_keys[0])
    np.testing.assert_array_equal(four[1:], pos)
    # Every prompt here ends with text, so the generate rule (last + 1 + k) equals decode_position_ids.
    generate_rule = pos[:, :, -1:] + 1 + np.arange(new, dtype=np.float32)
    np.testing.assert_array_equal(generate_rule, ours)


def test_processor_float64_ties_vs_model_float32_is_reproduced():
    """Known reference inconsistency, kept: at 7 fps (second_per_grid 2/7) frame 21 sits at
    T = 78 in the processor's float64 layout (video token before audio token 78) but at 78.00001 in
    the model's float32 merge (audio first). get_rope_index ignores the layout, so that video token
    gets the audio id and the next audio token gets the video ids; we match the model bit for bit."""
    b = Batch().row(1, ("av", (22, 2, 2), 2 / 7, 700), 1)
    pos, _, ids, _ = check(b, use_audio_in_video=True)
    last_video = np.flatnonzero(ids[0] == VID)[-1]
    assert ids[0, last_video + 1] == A
    np.testing.assert_array_equal(pos[:, 0, last_video], [81, 81, 81])  # 3 + audio token 78
    t21 = np.float32(21) * np.float32(2 / 7) * np.float32(13) + np.float32(3)
    assert t21 > 81
    np.testing.assert_array_equal(pos[:, 0, last_video + 1], [t21, 3, 3])


def test_unsorted_video_times_use_the_literal_merge_loop():
    # A negative second_per_grid makes video times decrease: the vectorised merge does not apply and
    # the token-by-token loop (the reference's own) must give the same ids.
    n_a = audio_output_length(130)
    ids = np.array([[7, VS, AS] + [VID] * 3 + [A] * n_a + [AE, VE, 8]])
    mask = np.ones_like(ids)
    media = dict(image_grid_thw=None, video_grid_thw=np.array([[3, 2, 2]]), second_per_grids=np.array([-0.5]),
                 audio_seqlens=np.array([130]))
    ours = P.rope_index(ids, mask, config=CFG, use_audio_in_video=True, **media)
    ref = reference_rope_index(ids, mask, media, True)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])
    np.testing.assert_array_equal(ours[0][0, 0, 3:6], [3, -3.5, -10])
