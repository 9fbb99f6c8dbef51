"""AuT audio encoder vs the PyTorch reference audio tower (fp32, tiny random configs).

Pitfalls covered: P4 (token-count formula), P5 (100-frame chunks padded to the batch's longest chunk,
per-chunk positions, windows of 13 * (n_window_infer // 100) tokens, layer by layer, clips of 3, 8,
9, 31 and 120 s), P6 (exact GELU), P7 (every bias present: the converter is strict), P13 (batched
equals single; duplicate rows).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch

from omni_jax import audio_encoder as ae
from omni_jax.config import preset
from tests.conftest import FP32

# Max |difference| <= 1e-5 x max |reference output| (reached: ~5e-7).
TOLERANCE = 1e-5
SECONDS = (3, 8, 9, 31, 120)  # 8 s = exactly one 104-token window, 9 s = a window and a 13-token one
ODD_FRAMES = (307, 855)  # tail chunks of 7 and 55 frames


def _audio_config(n_window_infer: int = 800):
    base = preset("tiny").thinker_config.audio_config
    return dataclasses.replace(base, n_window_infer=n_window_infer)


@functools.lru_cache(maxsize=None)
def _reference_and_params(n_window_infer: int = 800):
    """(audio config, reference audio tower with re-drawn weights, our fp32 params); the weights do
    not depend on n_window_infer, so every variant holds the same parameters."""
    from convert.hf_to_jax import convert_tensors
    from convert.reference import hf_config, randomize_
    from omni_jax.nn.params import unflatten
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    cfg = _audio_config(n_window_infer)
    omni = preset("tiny")
    omni = omni.replace(thinker_config=dataclasses.replace(omni.thinker_config, audio_config=cfg))
    hf_audio = hf_config(omni).thinker_config.audio_config
    hf_audio._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = modeling.Qwen3OmniMoeAudioEncoder(hf_audio).eval().float()
    randomize_(ref, seed=0)
    _sharpen_(ref)
    tensors = [
        (f"thinker.audio_tower.{k}", (lambda t=t: t.detach().numpy().astype(np.float32)), tuple(t.shape))
        for k, t in ref.state_dict().items()
    ]
    flat = convert_tensors(tensors, {"thinker": {"audio_tower": ae.audio_encoder_specs(cfg)}}, dtype="float32")
    return cfg, ref, unflatten(flat)["thinker"]["audio_tower"]


def _sharpen_(ref) -> None:
    """Scales attention and conv weights up from `randomize_`'s std 0.05 so that attention is far from
    uniform and the CNN's padding matters: otherwise a wrong window changes the output by < 1e-4 of
    its scale and would hide below a loose bar. (Windows of 52 vs 104 tokens now differ by ~0.6.)"""
    louder = ("v_proj.weight", "out_proj.weight", "conv2d1.weight", "conv2d2.weight", "conv2d3.weight")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
            elif name.endswith(louder):
                p.mul_(4.0)


def _features(frames: list[int], seed: int = 0) -> np.ndarray:
    """Log-mel-like features: a tone/chirp pattern plus noise, (128, sum(frames))."""
    rng = np.random.default_rng(seed)
    total = int(sum(frames))
    t = np.arange(total)[None, :] / 100.0
    mel = np.arange(128)[:, None]
    tone = np.sin(2 * np.pi * (0.3 + 0.05 * mel) * t) * np.exp(-((mel - 40 - 20 * np.sin(t)) ** 2) / 200)
    return (tone + 0.5 * rng.standard_normal((128, total)) - 0.5).astype(np.float32)


def _reference(ref, feats, frames, hidden=False):
    with torch.no_grad():
        out = ref(torch.tensor(feats), feature_lens=torch.tensor(frames), output_hidden_states=hidden)
    if hidden:
        return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]
    return out.last_hidden_state.numpy()


def _ours(params, feats, frames, cfg, hidden=False):
    if not hidden:
        out, counts = ae.encode(params, feats, frames, cfg, FP32)
        return np.asarray(out), counts
    plan = ae.plan_audio(feats, frames, cfg)
    out, all_hidden = ae._encode_padded_jit(
        params, *plan.device_inputs(), cfg=cfg, rt=FP32, return_all_hidden=True
    )
    n = plan.num_tokens
    return np.asarray(out)[:n], np.asarray(all_hidden)[:, :n], plan.token_counts


def _assert_close(got, expected, what=""):
    assert got.shape == expected.shape, f"{what}: shape {got.shape} vs {expected.shape}"
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= TOLERANCE, f"{what}: relative error {err:.2e}"


def test_output_lengths_match_reference_formula():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    lens = np.concatenate([np.arange(1, 3001), [6_000, 12_000, 29_999, 240_000, 240_017]])
    expected = _get_feat_extract_output_lengths(torch.tensor(lens), 50).numpy()
    np.testing.assert_array_equal(ae.audio_output_lengths(lens), expected)
    # The documented closed form and examples (reference doc §3).
    np.testing.assert_array_equal(ae.audio_output_lengths(lens), 13 * (lens // 100) + -(-(lens % 100) // 8))
    examples = {1: 1, 8: 1, 9: 2, 30: 4, 99: 13, 100: 13, 101: 14, 300: 39, 1000: 130, 3000: 390}
    assert ae.audio_output_lengths(list(examples)).tolist() == list(examples.values())


def test_specs_cover_the_reference_state_dict_exactly():
    from convert.layout import hub_layout

    cfg, ref, params = _reference_and_params()
    layout = hub_layout({"thinker": {"audio_tower": ae.audio_encoder_specs(cfg)}})
    state = {f"thinker.audio_tower.{k}": tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(s.source_shape) for k, s in layout.items()} == state
    # The sinusoidal table is a non-persistent buffer: computed, equal to the reference's.
    assert not any("positional_embedding" in k for k in state)
    np.testing.assert_allclose(
        ae.sinusoid_positions(cfg.max_source_positions, cfg.d_model),
        ref.positional_embedding.positional_embedding.numpy(), rtol=0, atol=3e-7,
    )
    # Conv weights stay in PyTorch layout; Linear weights are transposed kernels.
    np.testing.assert_array_equal(params["conv2d2"]["weight"], ref.conv2d2.weight.detach().numpy())
    np.testing.assert_array_equal(params["layers"]["fc1"]["kernel"][1], ref.layers[1].fc1.weight.detach().numpy().T)


def _processor_layout(packed: np.ndarray, frames: list[int]):
    """(B, mel, max frames) + feature_attention_mask, as the processor returns; padding is garbage."""
    batch = np.full((len(frames), 128, max(frames)), 7.0, np.float32)
    mask = np.zeros((len(frames), max(frames)), np.int64)
    start = 0
    for row, n in enumerate(frames):
        batch[row, :, :n], mask[row, :n] = packed[:, start:start + n], 1
        start += n
    return batch, mask


# The main batch: 3, 8, 9, 31, 120 s, two odd lengths, and the 31 s clip again (duplicate row).
MAIN_FRAMES = [100 * s for s in SECONDS] + list(ODD_FRAMES) + [3100]


@functools.lru_cache(maxsize=None)
def _batched_default():
    """The main batch through the processor layout: (packed features, batch, mask, ours, hidden, counts)."""
    cfg, _, params = _reference_and_params()
    packed = _features(MAIN_FRAMES)
    packed[:, -3100:] = packed[:, 2000:5100]  # the last audio repeats the 31 s one
    batch, mask = _processor_layout(packed, MAIN_FRAMES)
    repacked, lens = ae.pack_batched_features(batch, mask)
    got, got_hidden, counts = _ours(params, repacked, lens, cfg, hidden=True)
    return packed, batch, mask, repacked, lens, got, got_hidden, counts


def test_batch_of_clips_matches_reference_layer_by_layer():
    cfg, ref, _ = _reference_and_params()
    packed, *_, got, got_hidden, counts = _batched_default()
    expected, expected_hidden = _reference(ref, packed, MAIN_FRAMES, hidden=True)
    assert counts.tolist() == ae.audio_output_lengths(MAIN_FRAMES).tolist()
    assert len(expected_hidden) == cfg.encoder_layers + 1
    for i, h in enumerate(expected_hidden):
        _assert_close(got_hidden[i], h, f"hidden state {i}")
    _assert_close(got, expected, "output")


@pytest.mark.parametrize("index", range(len(SECONDS) + len(ODD_FRAMES)))
def test_single_clip_matches_reference_and_the_batched_rows(index):
    cfg, ref, params = _reference_and_params()
    packed, *_, batched, _, counts = _batched_default()
    start = int(np.sum(MAIN_FRAMES[:index]))
    one = np.ascontiguousarray(packed[:, start:start + MAIN_FRAMES[index]])
    expected = _reference(ref, one, [MAIN_FRAMES[index]])
    got, _ = _ours(params, one, [MAIN_FRAMES[index]], cfg)
    _assert_close(got, expected, f"{MAIN_FRAMES[index]} frames alone")
    offset = int(counts[:index].sum())
    _assert_close(batched[offset:offset + counts[index]], got, "batched row vs single")


def test_processor_layout_and_duplicate_rows():
    """Packing (B, mel, frames) + feature_attention_mask is the reference's `get_audio_features`
    indexing, and a duplicated audio gives identical rows."""
    packed, batch, mask, repacked, lens, got, _, counts = _batched_default()
    expected = torch.tensor(batch).permute(0, 2, 1)[torch.tensor(mask).bool()].permute(1, 0).numpy()
    np.testing.assert_array_equal(repacked, expected)
    np.testing.assert_array_equal(repacked, packed)
    assert lens.tolist() == MAIN_FRAMES
    ends = np.cumsum(counts)
    dup = got[ends[-2]:]
    original = got[ends[2]:ends[3]]
    np.testing.assert_allclose(dup, original, rtol=0, atol=TOLERANCE * np.abs(original).max())


def _plan_cu_seqlens(plan: ae.AudioPlan) -> list[int]:
    """The windows a plan attends over, as the reference's cu_seqlens (token order)."""
    slots = plan.out_src[: plan.num_tokens]
    width = plan.segment_ids.shape[1]
    key = (slots // width) * 1_000 + plan.segment_ids.reshape(-1)[slots]
    starts = np.flatnonzero(np.diff(key)) + 1
    return [0, *starts.tolist(), plan.num_tokens]


@pytest.mark.parametrize("n_window_infer", [800, 400, 250, 100, 1000])
def test_windows_equal_the_reference_cu_seqlens(n_window_infer):
    """Host-side: the attention windows of our plan are `get_audio_cu_seqlens`'s, for batches with
    full chunks, short tails, and short audios only (where the window depends on the batch)."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    cfg = _audio_config(n_window_infer)
    for frames in ([1000], [3000], [250, 60], [60, 30], [99, 5, 1], [12000, 307, 855, 3100], [800, 900, 100, 1]):
        feats = np.zeros((128, sum(frames)), np.float32)
        plan = ae.plan_audio(feats, frames, cfg)
        lens = torch.tensor(frames)
        _, chunk_lengths = modeling.chunk_and_pad_features(torch.tensor(feats), lens, cfg.n_window)
        expected = modeling.get_audio_cu_seqlens(chunk_lengths, lens, n_window_infer, cfg.n_window)
        assert _plan_cu_seqlens(plan) == expected.tolist(), frames
        # Each window lies within one attention row of 13 * (n_window_infer // 100) slots.
        assert plan.segment_ids.shape[1] == 13 * (n_window_infer // 100)
    # The documented examples (reference doc §3).
    if n_window_infer == 800:
        cfg = _audio_config()
        assert _plan_cu_seqlens(ae.plan_audio(np.zeros((128, 1000)), [1000], cfg)) == [0, 104, 130]
        assert _plan_cu_seqlens(ae.plan_audio(np.zeros((128, 3000)), [3000], cfg)) == [0, 104, 208, 312, 390]


def test_other_inference_window_follows_the_reference_rule():
    """n_window_infer=250: 26-token windows (250 // 100 = 2), run end to end."""
    cfg, ref, params = _reference_and_params(250)
    frames = [3100, 900, 307]
    feats = _features(frames, seed=2)
    expected = _reference(ref, feats, frames)
    got, _ = _ours(params, feats, frames, cfg)
    _assert_close(got, expected, "n_window_infer=250")
    # The window matters: the default (104-token) windows give a clearly different result.
    _, default_ref, _ = _reference_and_params(800)
    default = _reference(default_ref, feats, frames)
    assert np.abs(default - expected).max() > 100 * TOLERANCE * np.abs(expected).max()


def test_batch_of_short_audios_only_pads_to_its_longest_chunk():
    """Every audio under one chunk: the reference pads to the longest (60 frames here, not 100), and
    a short audio's CNN output depends on that padding; we follow it without recompiling."""
    cfg, ref, params = _reference_and_params()
    frames = [60, 30, 9, 1]
    feats = _features(frames, seed=3)
    expected = _reference(ref, feats, frames)
    got, counts = ae.encode_batched(params, *_processor_layout(feats, frames), cfg, FP32)
    got = np.asarray(got)
    assert counts.tolist() == [8, 4, 2, 1]
    _assert_close(got, expected, "short-only batch")

    alone = np.ascontiguousarray(feats[:, 60:90])
    expected_alone = _reference(ref, alone, [30])
    got_alone, _ = _ours(params, alone, [30], cfg)
    _assert_close(got_alone, expected_alone, "30 frames alone")
    # The rule matters: the same 30 frames padded to 60 in the batch give different tokens.
    in_batch = expected[8:12]
    assert np.abs(in_batch - expected_alone).max() > 100 * TOLERANCE * np.abs(expected_alone).max()

    # With a full chunk in the batch every chunk is padded to 100 frames.
    frames = [250, 60]
    feats = _features(frames, seed=4)
    _assert_close(_ours(params, feats, frames, cfg)[0], _reference(ref, feats, frames), "[250, 60]")


def test_plan_is_linear_in_length_and_bucketed():
    cfg = _audio_config()
    # 40 minutes: attention runs over (rows, 104) with rows ~ tokens / 104, never (N, N).
    plan = ae.plan_audio(np.zeros((128, 240_000), np.float32), [240_000], cfg)
    width = 13 * (cfg.n_window_infer // 100)
    assert plan.num_tokens == 31_200 and plan.segment_ids.shape[1] == width
    rows = plan.segment_ids.shape[0]
    assert 300 <= rows <= 1.25 * 300
    assert plan.chunks_cmf.shape[0] <= 1.25 * 2400
    # Short windows share rows: four 3 s clips (39 tokens each) fill two rows, not four.
    plan = ae.plan_audio(np.zeros((128, 1200), np.float32), [300] * 4, cfg)
    assert plan.segment_ids.shape[0] == 2 and sorted(set(plan.segment_ids[0].tolist())) == [0, 1, 2]
    # Similar lengths share one compiled shape; sizes are exact up to 8, then 4 per octave.
    shapes = {tuple(a.shape for a in ae.plan_audio(np.zeros((128, n), np.float32), [n], cfg).device_inputs())
              for n in (2900, 3000, 3100)}
    assert len(shapes) == 1
    sizes = [ae.bucket_size(n) for n in range(1, 5000)]
    assert all(s >= n for n, s in enumerate(sizes, 1)) and all(s <= max(8, 1.25 * n) for n, s in enumerate(sizes, 1))
    assert len(set(sizes)) < 50


def test_bad_inputs_are_refused_with_a_reason():
    cfg = _audio_config()
    with pytest.raises(ValueError, match="at least one mel frame"):
        ae.plan_audio(np.zeros((128, 10), np.float32), [10, 0], cfg)
    with pytest.raises(ValueError, match="sum to"):
        ae.plan_audio(np.zeros((128, 10), np.float32), [11], cfg)
    with pytest.raises(ValueError, match="num_mel_bins"):
        ae.plan_audio(np.zeros((80, 10), np.float32), [10], cfg)
    with pytest.raises(ValueError, match="n_window_infer"):
        ae.audio_encoder_specs(dataclasses.replace(cfg, n_window_infer=99))


def test_jit_cache_is_reused_for_similar_lengths():
    cfg, _, params = _reference_and_params()
    feats = _features([3050])
    # Twice: on GPU (JAX 0.11.2) the second identical call adds a cache entry of its own (measured:
    # 1 -> 2 entries for the same shapes, then no growth), which is not the recompile this test is about.
    for _ in range(2):
        ae.encode(params, feats, [3050], cfg, FP32)
    before = ae._encode_padded_jit._cache_size()
    ae.encode(params, feats[:, :3010], [3010], cfg, FP32)
    assert ae._encode_padded_jit._cache_size() == before


def test_bfloat16_error_is_the_references_own():
    """bf16 weights and activations: our error against the fp32 reference is no larger (RMS, 1.5x
    margin) than the reference's own bf16 error (measured: 1.53% vs 1.41% RMS)."""
    import copy

    from omni_jax.config import Runtime

    cfg, ref, params = _reference_and_params()
    frames = [900, 307, 60]
    feats = _features(frames, seed=5)
    expected = _reference(ref, feats, frames)
    rt = Runtime(dtype="bfloat16", param_dtype="bfloat16")
    got, _ = ae.encode(jax.tree.map(lambda a: a.astype(rt.param_dtype), params), feats, frames, cfg, rt)
    got = np.asarray(got, np.float32)
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    with torch.no_grad():
        ref_out = ref_bf16(torch.tensor(feats).to(torch.bfloat16), feature_lens=torch.tensor(frames))
    ref_got = ref_out.last_hidden_state.float().numpy()

    def rms_error(x):
        return np.sqrt(np.mean((x - expected) ** 2) / np.mean(expected**2))

    assert rms_error(got) <= 1.5 * rms_error(ref_got), (rms_error(got), rms_error(ref_got))


def test_lax_conv_path_matches_reference():
    """The accelerator default (`lax.conv`, bigger conv slices) on CPU, on the case where the convs
    must see the reference's padding (a short-only batch): same result as the reference."""
    cfg, ref, params = _reference_and_params()
    frames = [60, 30, 9, 1]
    feats = _features(frames, seed=6)
    plan = ae.plan_audio(feats, frames, cfg)
    out = ae._encode_padded_jit(params, *plan.device_inputs(), cfg=cfg, rt=FP32, conv_batch=16, conv_impl="xla")
    _assert_close(np.asarray(out)[: plan.num_tokens], _reference(ref, feats, frames), "lax.conv path")
