"""Code2Wav vs the PyTorch reference (`Qwen3OmniMoeCode2Wav`, transformers 5.23.0) in fp32.

The tiny preset's vocoder (hidden 32, 2 layers, window 72, upsampling 2x2 then 8x5x4x3: 1920 samples
per frame) on 80 frames (several chunk seams; the sliding window cuts in), and its pre-transformer
alone on 200 frames, where the window and the stream's KV cache are exercised at length. Pitfall P12: the reference's chunked decode loses `lost_samples` (555) per
chunk; our stream does not and equals one full decode.

Compilations are shared: every decode below runs with batch 3 and a frame bucket of 80, the stream
with one chunk bucket of 8.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

from omni_jax import code2wav as c2w
from omni_jax.config import preset
from tests.conftest import FP32

# The bar: max |error| <= 1e-5 x max |reference output| (reached: ~1e-6, see the asserts).
TOLERANCE = 1e-5
FRAMES = 80  # > sliding_window (72): the window cuts in, in the full decode and in the stream's cache
BATCH = 3
BUCKET = 80  # decode_bucketed(multiple=...): whole utterances and every chunk window share one program
LONG = 200  # frames for the pre-transformer-only tests (cheap to compile), window well exercised


def _randomize(ref, seed: int) -> None:
    """Weights of a well-scaled vocoder: activations O(1) through the conv stack, output below the
    clamp; LayerScale and ConvNeXt gamma large enough that the transformer and ConvNeXt matter."""
    from convert.reference import randomize_

    randomize_(ref, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("layer_scale.scale", "gamma")):
                p.copy_(0.5 + 0.2 * noise)
            elif name.endswith(("alpha", "beta")):
                p.copy_(0.3 * noise)
            elif name.endswith("conv.weight"):
                if name.startswith("upsample.") and ".0.conv." in name:  # ConvTranspose1d, kernel = stride
                    fan_in = p.shape[0]
                elif name.endswith("block.1.conv.weight"):  # ConvTranspose1d, kernel = 2 x stride
                    fan_in = 2 * p.shape[0]
                else:  # Conv1d (out, in/groups, k)
                    fan_in = p.shape[1] * p.shape[2]
                p.copy_(0.5 * noise / fan_in**0.5)


@functools.lru_cache(maxsize=None)
def setup():
    """(cfg, reference Code2Wav, our params, codes (3, Q, 80))."""
    from convert.hf_to_jax import convert_tensors
    from convert.reference import hf_config, state_dict_tensors
    from omni_jax.nn.params import unflatten
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    config = preset("tiny")
    cfg = config.code2wav_config
    hf_cfg = hf_config(config).code2wav_config
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = modeling.Qwen3OmniMoeCode2Wav(hf_cfg).eval().float()
    _randomize(ref, 0)
    tensors = (("code2wav." + key, load, shape) for key, load, shape in state_dict_tensors(ref))
    params = unflatten(convert_tensors(tensors, {"code2wav": c2w.code2wav_specs(cfg)}, dtype="float32"))
    codes = np.random.default_rng(0).integers(0, cfg.codebook_size, (BATCH, cfg.num_quantizers, FRAMES))
    return cfg, ref, jax.device_put(params["code2wav"]), codes


@functools.lru_cache(maxsize=None)
def ours_full():
    cfg, _, params, codes = setup()
    return c2w.decode_bucketed(params, codes, cfg, FP32, multiple=BUCKET)


@functools.lru_cache(maxsize=None)
def reference_full():
    _, ref, _, codes = setup()
    with torch.no_grad():
        return ref(torch.tensor(codes)).numpy()[:, 0]


def _assert_close(got, expected, what):
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    scale = np.abs(expected).max()
    err = np.abs(got - expected).max()
    assert err <= TOLERANCE * scale, f"{what}: max error {err:.3g} > {TOLERANCE} x scale {scale:.3g}"
    return err / scale


def test_lengths_and_receptive_field_match_the_published_model():
    cfg = c2w.Code2WavConfig()  # the published (8, 5, 4, 3) x (2, 2) vocoder
    assert c2w.total_upsample(cfg) == 1920 and c2w.lost_samples(cfg) == 555
    assert c2w.output_length(cfg, 10) == 18645  # measured in the reference doc
    assert c2w.chunked_output_length(cfg, 700) == 1_342_335  # reference chunked_decode of 700 codes
    assert c2w.receptive_field_frames(cfg) == 10


def test_specs_cover_the_reference_state_dict_exactly():
    from convert.layout import hub_layout

    cfg, ref, _, _ = setup()
    ours = {k: v.source_shape for k, v in hub_layout({"code2wav": c2w.code2wav_specs(cfg)}).items()}
    theirs = {"code2wav." + k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs


def test_full_decode_matches_reference():
    cfg, _, _, codes = setup()
    got, expected = ours_full(), reference_full()
    assert got.shape == (BATCH, c2w.output_length(cfg, FRAMES))
    assert 0.05 < np.abs(expected).max() < 1.0  # not clamped flat, not vanishing
    rel = _assert_close(got, expected, "full decode")
    print(f"full decode: max error / scale = {rel:.2e}")


@functools.lru_cache(maxsize=None)
def long_hidden():
    """(codes (2, Q, LONG), reference pre-transformer output) for the long pre-transformer tests."""
    cfg, ref, _, _ = setup()
    codes = np.random.default_rng(1).integers(0, cfg.codebook_size, (2, cfg.num_quantizers, LONG))
    with torch.no_grad():
        emb = ref.code_embedding(torch.tensor(codes) + ref.code_offset).mean(1)
        return codes, emb.numpy(), ref.pre_transformer(inputs_embeds=emb).last_hidden_state.numpy()


def test_pre_transformer_matches_reference():
    cfg, _, params, _ = setup()
    codes, emb, expected = long_hidden()
    x = c2w.embed_codes(params, codes, cfg, np.float32)
    np.testing.assert_allclose(np.asarray(x), emb, rtol=0, atol=1e-6)
    got = np.asarray(jax.jit(lambda p, x: c2w.pre_transformer(p["pre_transformer"], x, cfg, FP32))(params, x))
    _assert_close(got, expected, "pre-transformer")


def test_pre_transformer_kv_cache_steps_match_reference():
    """The stream's pre-transformer: chunks of 8 (the last one padded) over a cache of the last
    sliding_window - 1 frames, absolute positions; 200 frames, so the window slides 128 frames."""
    cfg, _, params, _ = setup()
    codes, _, expected = long_hidden()
    step = jax.jit(lambda p, x, state, n: c2w._pre_transformer_step(p["pre_transformer"], x, state, n, cfg, FP32))
    state = c2w.init_stream_state(cfg, 2, np.float32)
    outs = []
    for start in range(0, LONG, 8):
        n = min(8, LONG - start - 3) if start + 8 >= LONG else 8  # a short last piece: padding must not leak
        piece = np.zeros((2, cfg.num_quantizers, 8), np.int32)
        piece[..., :n] = codes[..., start : start + n]
        x = c2w.embed_codes(params, piece, cfg, np.float32)
        hidden, k, v = step(params, x, state, np.int32(n))
        state = state._replace(k=k, v=v, seen=state.seen + n)
        outs.append(np.asarray(hidden)[:, :n])
    got = np.concatenate(outs, axis=1)
    _assert_close(got, expected[:, : got.shape[1]], "pre-transformer, KV-cache steps")


@pytest.mark.parametrize("chunk_size,left_context", [(40, 25), (17, 5), (300, 25)])
def test_chunked_decode_matches_reference(chunk_size, left_context):
    cfg, ref, params, codes = setup()
    with torch.no_grad():
        expected = ref.chunked_decode(torch.tensor(codes), chunk_size, left_context).numpy()[:, 0]
    got = c2w.chunked_decode(params, codes, cfg, FP32, chunk_size=chunk_size, left_context_size=left_context,
                             multiple=BUCKET)
    assert expected.shape[-1] == c2w.chunked_output_length(cfg, FRAMES, chunk_size)
    _assert_close(got, expected, f"chunked_decode({chunk_size}, {left_context})")


def test_reference_chunk_seams_lose_samples_and_differ_from_full_decode():
    """What the stream avoids (P12): per seam, 555 samples are missing and the audio after it differs."""
    cfg, ref, _, codes = setup()
    with torch.no_grad():
        chunked = ref.chunked_decode(torch.tensor(codes), 40, 25).numpy()[:, 0]
    full = reference_full()
    num_chunks = -(-FRAMES // 40)
    assert full.shape[-1] - chunked.shape[-1] == c2w.lost_samples(cfg) * (num_chunks - 1)
    # The first chunk is a prefix of the full decode; after the first seam the samples have shifted.
    first = c2w.output_length(cfg, 40)
    np.testing.assert_allclose(chunked[:, :first], full[:, :first], rtol=0, atol=1e-6)
    assert np.abs(chunked[:, first : first + 4000] - full[:, first : first + 4000]).max() > 1e-3


def test_stream_equals_full_causal_decode():
    cfg, _, params, codes = setup()
    dec = c2w.StreamingDecoder(params, cfg, FP32, batch=BATCH, buckets=(8,))
    sizes = [1, 3, 8, 5, 13, 0, 2, 30]  # then the remaining 18  # 13 and 30 are split into pieces of at most 8
    sizes.append(FRAMES - sum(sizes))
    pieces, start = [], 0
    for n in sizes:
        audio = dec.push(codes[..., start : start + n])
        before = c2w.output_length(cfg, start) if start else 0
        after = c2w.output_length(cfg, start + n) if start + n else 0
        assert audio.shape == (BATCH, after - before), f"push of {n} frames after {start}"
        pieces.append(audio)
        start += n
    streamed = np.concatenate(pieces, axis=-1)
    assert dec.frames == FRAMES and dec.samples == streamed.shape[-1]
    # Equal to one decode of all frames: ours to rounding, the reference within the parity bar.
    np.testing.assert_allclose(streamed, ours_full(), rtol=0, atol=1e-6)
    rel = _assert_close(streamed, reference_full(), "stream")
    print(f"stream vs reference full decode: max error / scale = {rel:.2e}")


def test_stream_decode_generator_yields_per_chunk():
    cfg, _, params, codes = setup()
    chunks = [codes[..., i : i + 8] for i in range(0, 24, 8)]
    out = list(c2w.stream_decode(params, iter(chunks), cfg, FP32, batch=BATCH, buckets=(8,)))
    assert [o.shape[-1] for o in out] == [c2w.output_length(cfg, 8), 8 * 1920, 8 * 1920]
    np.testing.assert_allclose(np.concatenate(out, -1), ours_full()[:, : c2w.output_length(cfg, 24)],
                               rtol=0, atol=1e-6)


def test_receptive_field_is_exact_on_the_reference():
    """`receptive_field_frames` is the reference architecture's own: the first sample a stream emits
    after frame s depends on frame s - ctx and on no earlier frame (autograd through the reference's
    conv part), and re-decoding from s - ctx reproduces the full decode from that sample on."""
    cfg, ref, _, codes = setup()
    ctx = c2w.receptive_field_frames(cfg)
    hop, lost = c2w.total_upsample(cfg), c2w.lost_samples(cfg)
    s, e = 60, 70

    def conv_part(h_btd):
        x = h_btd.permute(0, 2, 1)
        for blocks in ref.upsample:
            for block in blocks:
                x = block(x)
        for block in ref.decoder:
            x = block(x)
        return x[:, 0]  # before the clamp, so that no gradient is cut

    with torch.no_grad():
        emb = ref.code_embedding(torch.tensor(codes[:1]) + ref.code_offset).mean(1)
        hidden = ref.pre_transformer(inputs_embeds=emb).last_hidden_state
    w0 = s - ctx - 2  # window frame i is frame w0 + i: frame s - ctx is index 2
    window = hidden[:, w0:e].clone().requires_grad_(True)
    first = hop * s - lost - hop * w0  # the sample emitted first after frame s, in window coordinates
    conv_part(window)[:, first].sum().backward()
    reach = window.grad.abs().sum(-1)[0]  # (frames,) influence of each window frame on that sample
    assert reach[:2].eq(0).all() and reach[2] > 0, reach[:4]

    with torch.no_grad():
        wav = conv_part(hidden[:, s - ctx : e]).clamp(-1, 1).numpy()
    got = wav[:, hop * s - lost - hop * (s - ctx) :]
    np.testing.assert_allclose(got, reference_full()[:1, hop * s - lost : hop * e - lost], rtol=0, atol=1e-6)


def test_batched_rows_of_different_lengths_equal_single_decodes():
    cfg, ref, params, codes = setup()
    lengths = [FRAMES, 57, 23]
    junk = codes.copy()
    junk[1, :, 57:] = cfg.codebook_size + 5  # past a row's length the ids may be anything (EOS ...)
    full = c2w.decode_batch(params, junk, lengths, cfg, FP32, chunked=False, multiple=BUCKET)
    chunked = c2w.decode_batch(params, junk, lengths, cfg, FP32, chunked=True, chunk_size=40,
                               multiple=BUCKET)
    for row, n in enumerate(lengths):
        single = torch.tensor(codes[row : row + 1, :, :n])
        with torch.no_grad():
            exp_full = ref(single).numpy()[0, 0]
            exp_chunked = ref.chunked_decode(single, 40, 25).numpy()[0, 0]
        assert full[row].shape == (c2w.output_length(cfg, n),)
        assert chunked[row].shape == (c2w.chunked_output_length(cfg, n, 40),)
        _assert_close(full[row], exp_full, f"row {row} full")
        _assert_close(chunked[row], exp_chunked, f"row {row} chunked")
    # Row order and the other rows' lengths do not matter.
    perm = [2, 0, 1]
    again = c2w.decode_batch(params, junk[perm], [lengths[i] for i in perm], cfg, FP32, chunked=False,
                             multiple=BUCKET)
    for new_row, old_row in enumerate(perm):
        np.testing.assert_array_equal(again[new_row], full[old_row])


def test_bad_inputs_are_clear_errors():
    cfg, _, params, codes = setup()
    with pytest.raises(ValueError, match="receptive_field_frames"):
        c2w.StreamingDecoder(params, cfg, FP32, context=c2w.receptive_field_frames(cfg) - 1)
    with pytest.raises(ValueError, match=r"expected codes \(1, 4, n\)"):
        c2w.StreamingDecoder(params, cfg, FP32).push(codes[:1, :3])
    with pytest.raises(ValueError, match="layer of codes"):
        c2w.embed_codes(params, codes[:, :3], cfg, np.float32)
    with pytest.raises(ValueError, match="one length"):
        c2w.decode_batch(params, codes, [FRAMES + 1, 1, 1], cfg, FP32)
