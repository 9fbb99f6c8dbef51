"""Vision encoder vs the PyTorch reference `Qwen3OmniMoeVisionEncoder` on tiny random configs (fp32).

Covers pitfall P8 (DeepStack features: every one compared, in the reference's order, including an
unsorted `deepstack_visual_indexes`), P6 (tanh GELU in the blocks, exact GELU in the mergers: a swap
shows up far above the tolerance), P10 (fp32 RoPE; bf16 against the reference's own bf16 error) and
P13 (batched == single). The position grid is resampled to sizes other than its native 8 x 8.

Parameters are converted from the reference's state dict with the strict converter (`blocks.{i}.*`
into the stacked `blocks`, `merger_list.{j}.*`, Conv3d weight as is).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch

from omni_jax import vision_encoder as ve
from omni_jax.config import preset
from tests.conftest import FP32

# Bar: max |difference| <= 1e-5 x max |reference output| (measured ~1e-6 for every output).
TOLERANCE = 1e-5

BASE = preset("tiny").thinker_config.vision_config  # hidden 32, 4 heads (head_dim 8), 3 blocks, 8 x 8 grid
# A second shape: 5 blocks, DeepStack indexes unsorted and one past the depth (never fires), 2 heads.
ODD = dataclasses.replace(BASE, depth=5, num_heads=2, intermediate_size=48, deepstack_visual_indexes=(3, 1, 7))
CONFIGS = {"tiny": BASE, "odd": ODD}

# Two image sizes (neither the native 8 x 8) and a 3-frame video, each a multiple of the 2 x 2 merge.
GRIDS = [(1, 6, 10), (1, 12, 8), (3, 8, 6)]


def _hf_vision_config(cfg):
    from convert.reference import hf_config

    base = preset("tiny")
    thinker = dataclasses.replace(base.thinker_config, vision_config=cfg)
    hv = hf_config(base.replace(thinker_config=thinker, talker_config=None, code2wav_config=None,
                                enable_audio_output=False)).thinker_config.vision_config
    hv._attn_implementation = "eager"
    return hv


def _params_from_reference(ref, cfg):
    """The reference's state dict through the strict converter, under the transformers-5 in-memory
    prefix `thinker.model.visual.` and into the thinker's `visual` subtree: a missing, unused or
    mis-shaped key would raise."""
    from convert.hf_to_jax import convert_tensors
    from convert.reference import state_dict_tensors
    from omni_jax.nn.params import unflatten

    tensors = (("thinker.model.visual." + key, load, shape) for key, load, shape in state_dict_tensors(ref))
    specs = {"thinker": {"visual": ve.vision_encoder_specs(cfg)}}
    tree = unflatten(convert_tensors(tensors, specs, dtype="float32"))["thinker"]["visual"]
    return jax.tree.map(jax.numpy.asarray, tree)


@functools.lru_cache(maxsize=None)
def reference_and_params(name: str, seed: int = 0):
    from convert.reference import randomize_
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    ref = modeling.Qwen3OmniMoeVisionEncoder(_hf_vision_config(cfg)).eval().float()
    randomize_(ref, seed)
    return cfg, ref, _params_from_reference(ref, cfg)


def _pixels(grids, seed=0):
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, 3 * 2 * 16 * 16)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _reference_out(name: str, grids: tuple):
    _, ref, _ = reference_and_params(name)
    with torch.no_grad():
        out = ref(torch.tensor(_pixels(list(grids))), torch.tensor(np.asarray(grids)))
    return out.pooler_output.numpy(), [f.numpy() for f in out.deepstack_features]


def _rel_err(got, expected):
    return float(np.abs(np.asarray(got, np.float32) - expected).max() / np.abs(expected).max())


def _assert_matches(merged, deepstack, expected_merged, expected_features):
    assert merged.shape == expected_merged.shape
    assert deepstack.shape == (len(expected_features), *expected_merged.shape)
    assert _rel_err(merged, expected_merged) <= TOLERANCE
    for j, feature in enumerate(expected_features):
        assert _rel_err(deepstack[j], feature) <= TOLERANCE, f"DeepStack feature {j}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_images_and_video_in_one_batch_match_reference(name):
    cfg, _, params = reference_and_params(name)
    grids = tuple(GRIDS)
    merged, deepstack = ve.encode(params, _pixels(GRIDS), np.asarray(GRIDS), cfg, FP32)
    expected_merged, expected_features = _reference_out(name, grids)
    assert len(expected_features) == (3 if name == "tiny" else 2)
    _assert_matches(merged, deepstack, expected_merged, expected_features)
    # The DeepStack features are distinct block outputs, not copies of one another or of the merger.
    assert _rel_err(deepstack[0], expected_features[1]) > 1e-2
    assert _rel_err(deepstack[-1], expected_merged) > 1e-2


@pytest.mark.parametrize("index", range(len(GRIDS)))
def test_each_input_alone_matches_reference_and_the_batch(index):
    cfg, _, params = reference_and_params("tiny")
    pixels = _pixels(GRIDS)
    start = sum(t * h * w for t, h, w in GRIDS[:index])
    t, h, w = GRIDS[index]
    alone = pixels[start : start + t * h * w]
    merged, deepstack = ve.encode(params, alone, np.asarray([GRIDS[index]]), cfg, FP32)
    with torch.no_grad():
        _, ref, _ = reference_and_params("tiny")
        out = ref(torch.tensor(alone), torch.tensor([GRIDS[index]]))
    _assert_matches(merged, deepstack, out.pooler_output.numpy(), [f.numpy() for f in out.deepstack_features])

    batched, batched_deepstack = ve.encode(params, pixels, np.asarray(GRIDS), cfg, FP32)
    tokens = slice(start // 4, (start + t * h * w) // 4)
    scale = np.abs(np.asarray(merged)).max()
    assert np.abs(np.asarray(batched[tokens]) - np.asarray(merged)).max() <= TOLERANCE * scale
    assert np.abs(np.asarray(batched_deepstack[:, tokens]) - np.asarray(deepstack)).max() <= TOLERANCE * scale


def test_duplicate_inputs_give_the_same_tokens():
    """Two copies of an image share one packed row at different offsets: same tokens up to fp32
    summation order (measured ~1.3e-7 of the output scale)."""
    cfg, _, params = reference_and_params("tiny")
    grids = [(1, 6, 10), (1, 6, 10)]
    one = _pixels([grids[0]])
    plan = ve.vision_plan(np.asarray(grids), cfg)
    assert plan.segment_ids.shape[0] == 1  # both in one row
    merged, deepstack = ve.encode(params, np.concatenate([one, one]), np.asarray(grids), cfg, FP32)
    merged, deepstack = np.asarray(merged), np.asarray(deepstack)
    half = merged.shape[0] // 2
    scale = np.abs(merged).max()
    assert np.abs(merged[:half] - merged[half:]).max() <= 1e-6 * scale
    assert np.abs(deepstack[:, :half] - deepstack[:, half:]).max() <= 1e-6 * scale


@pytest.mark.parametrize("grid", [(1, 6, 10), (1, 12, 8), (2, 4, 14), (1, 16, 2), (1, 8, 8), (1, 2, 2)])
def test_position_grid_interpolation_matches_reference(grid):
    """Indices and weights equal the reference helper's; the embeddings equal F.interpolate with
    aligned corners on the 8 x 8 table, read in merge-block order and repeated over frames."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    cfg, ref, params = reference_and_params("tiny")
    side = int(cfg.num_position_embeddings**0.5)
    plan = ve.vision_plan(np.asarray([grid]), cfg)
    slots = plan.slot_of_patch
    ref_idx, ref_w = get_vision_interpolation_indices_and_weights(
        torch.tensor([grid]), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    np.testing.assert_array_equal(plan.interp_index[slots], ref_idx.numpy())
    np.testing.assert_array_equal(plan.interp_weight[slots], ref_w.numpy())

    table_jax = params["pos_embed"]["weight"]
    ours = np.asarray(ve.position_embeddings(table_jax, plan.interp_index, plan.interp_weight))[slots]
    table = ref.pos_embed.weight.detach()
    with torch.no_grad():
        expected = (table[ref_idx] * ref_w[:, :, None]).sum(1).numpy()
        t, h, w = grid
        image = table.T.reshape(1, -1, side, side)
        resized = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", align_corners=True)[0]
    rows, cols = ve.merge_block_positions(h, w, 2)
    direct = np.tile(resized.numpy()[:, rows, cols].T, (t, 1))
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() <= 1e-6 * scale
    assert np.abs(ours - direct).max() <= 1e-6 * scale
    assert not np.allclose(plan.interp_weight[slots], 0)


def test_rope_and_segments_follow_the_reference_grid_helpers():
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    cfg, ref, _ = reference_and_params("tiny")
    plan = ve.vision_plan(np.asarray(GRIDS), cfg)
    slots = plan.slot_of_patch
    ref_pos = get_vision_position_ids(torch.tensor(GRIDS), 2)
    np.testing.assert_array_equal(plan.positions_hw[slots], ref_pos.numpy())
    cos, sin = ve.rope_cos_sin(plan.positions_hw, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
    ref_cos, ref_sin = ref.rotary_pos_emb(torch.zeros(1), ref_pos)
    np.testing.assert_allclose(np.asarray(cos)[slots], ref_cos.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin)[slots], ref_sin.numpy(), rtol=0, atol=1e-6)

    # One segment per frame (cu_seqlens with merge_temporal=False), padding slots have id 0.
    cu = get_vision_cu_seqlens(torch.tensor(GRIDS)).numpy()
    frame_of_patch = np.searchsorted(cu, np.arange(cu[-1]), side="right") - 1
    seg = plan.segment_ids.reshape(-1)
    assert np.all(seg[slots] == frame_of_patch + 1)
    padding = np.setdiff1d(np.arange(seg.size), slots)
    assert np.all(seg[padding] == 0)


def test_buckets_share_one_compilation():
    cfg, _, params = reference_and_params("tiny")
    ve.encode(params, _pixels([(1, 6, 10)]), np.asarray([(1, 6, 10)]), cfg, FP32)
    before = ve._encode_packed_jit._cache_size()
    for grid in [(1, 8, 8), (1, 4, 14), (1, 2, 30)]:  # 64, 56 and 60 patches: one (1, 64) bucket
        merged, _ = ve.encode(params, _pixels([grid]), np.asarray([grid]), cfg, FP32)
        assert merged.shape[0] == grid[1] * grid[2] // 4
    assert ve._encode_packed_jit._cache_size() == before


def test_scanned_unrolled_and_pallas_interpret_agree():
    cfg, _, params = reference_and_params("odd")
    pixels, grid = _pixels(GRIDS), np.asarray(GRIDS)
    scanned = ve.encode(params, pixels, grid, cfg, FP32)
    for rt in (FP32.replace(scan_layers=False), FP32.replace(attention_impl="pallas_interpret")):
        other = ve.encode(params, pixels, grid, cfg, rt)
        for a, b in zip(scanned, other):
            assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6 * np.abs(np.asarray(a)).max()


def test_bfloat16_error_is_within_the_references_own():
    """bf16 weights and activations: our error against the fp32 reference is of the order of the
    reference's own bf16 error (both use fp32 norms, softmax and RoPE)."""
    cfg, ref, params = reference_and_params("tiny")
    expected_merged, expected_features = _reference_out("tiny", tuple(GRIDS))
    bf16 = FP32.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), params)
    merged, deepstack = ve.encode(params16, _pixels(GRIDS), np.asarray(GRIDS), cfg, bf16)
    ref16 = _bf16_reference("tiny")
    with torch.no_grad():
        out16 = ref16(torch.tensor(_pixels(GRIDS)), torch.tensor(GRIDS))
    ours = [_rel_err(merged, expected_merged)] + [_rel_err(deepstack[j], f) for j, f in enumerate(expected_features)]
    theirs = [_rel_err(out16.pooler_output.float().numpy(), expected_merged)] + [
        _rel_err(f.float().numpy(), e) for f, e in zip(out16.deepstack_features, expected_features)]
    for mine, reference in zip(ours, theirs):
        assert mine <= 2 * reference + 1e-3, (ours, theirs)


def _bf16_reference(name):
    import copy

    return copy.deepcopy(reference_and_params(name)[1]).to(torch.bfloat16)


def test_bad_inputs_are_refused_with_a_clear_error():
    cfg, _, params = reference_and_params("tiny")
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        ve.vision_plan(np.asarray([(1, 5, 8)]), cfg)
    with pytest.raises(ValueError, match="non-positive"):
        ve.vision_plan(np.asarray([(0, 4, 4)]), cfg)
    with pytest.raises(ValueError, match="patches but grid_thw describes"):
        ve.encode(params, _pixels([(1, 4, 4)]), np.asarray([(1, 4, 6)]), cfg, FP32)
