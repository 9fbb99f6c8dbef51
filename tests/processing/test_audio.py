"""omni_jax.processing.audio against the reference: librosa.load, WhisperFeatureExtractor, token counts."""

from __future__ import annotations

import numpy as np
import pytest

from omni_jax.processing import audio as A

CLIP_SECONDS = (1.0, 1.7, 4.0, 29.0, 31.0, 61.0)


def ref_features(fe, waves, use_torch: bool):
    """The reference extractor as Qwen3OmniMoeProcessor calls it; torch STFT path or numpy path."""
    import transformers.models.whisper.feature_extraction_whisper as fw

    saved = fw.is_torch_available
    fw.is_torch_available = (lambda: True) if use_torch else (lambda: False)
    try:
        out = fe(waves, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True, return_tensors="np")
    finally:
        fw.is_torch_available = saved
    return out["input_features"], out["attention_mask"]


def test_mel_filter_bank_is_the_reference_one(ref_feature_extractor):
    np.testing.assert_array_equal(A.mel_filter_bank(), ref_feature_extractor.mel_filters)


@pytest.mark.parametrize("sr", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("ext,channels", [(".wav", 1), (".flac", 2), (".ogg", 1), (".ogg", 2)])
def test_load_audio_equals_librosa_load(tmp_path, media, sr, ext, channels):
    import librosa

    path = media.write_audio(tmp_path / f"a{ext}", 1.3, sr, channels)
    ours = A.load_audio(path)
    ref, ref_sr = librosa.load(path, sr=16000)  # what qwen-omni-utils and transformers' load_audio do
    assert ref_sr == 16000 and ours.dtype == np.float32 and ours.ndim == 1
    np.testing.assert_array_equal(ours, ref)


def test_load_audio_mp3_and_pyav_fallback(tmp_path, media):
    import librosa

    mp3 = media.write_audio(tmp_path / "a.mp3", 2.0, 44100, 2)
    np.testing.assert_array_equal(A.load_audio(mp3), librosa.load(mp3, sr=16000)[0])
    # An mp4 with an AAC track: libsndfile cannot read it, PyAV decodes it.
    mp4 = media.write_video(tmp_path / "v.mp4", fps=2, seconds=2.0, audio_sr=48000)
    wav = A.load_audio(mp4)
    assert abs(wav.size - 32000) < 1200  # AAC priming/padding adds a few hundred samples
    ref = media.tone(2.0, 16000, channels=2).mean(axis=1)
    # Same signal: strong correlation with the clean tone at some small lag.
    best = max(np.corrcoef(wav[lag : lag + 28000], ref[:28000])[0, 1] for lag in range(0, 1200, 1))
    assert best > 0.95


def test_load_audio_array_inputs(media):
    x = media.tone(1.0, 44100, channels=2)
    mono = A.load_audio(x, sampling_rate=44100)
    assert mono.shape == (16000,)
    np.testing.assert_array_equal(A.load_audio(x.T, sampling_rate=44100), mono)  # (channels, samples) too
    pcm = (media.tone(0.5, 16000) * 32767).astype(np.int16)
    np.testing.assert_allclose(A.load_audio(pcm), pcm / 32768.0, atol=1e-7)


def test_features_match_reference_for_long_and_short_clips(ref_feature_extractor, media):
    waves = [media.tone(s, 16000, seed=i) for i, s in enumerate(CLIP_SECONDS)]
    waves.append(media.tone(1.1, 16000)[:16001])  # one sample past a frame boundary
    feats, mask = A.log_mel_features(waves)
    t_max = int(61.0 * 16000) // 160
    assert feats.shape == (len(waves), 128, t_max) and feats.dtype == np.float32  # no 30 s truncation
    assert mask.shape == (len(waves), t_max) and mask.dtype == np.int32

    ref_np, ref_mask = ref_features(ref_feature_extractor, waves, use_torch=False)
    ref_pt, ref_mask_pt = ref_features(ref_feature_extractor, waves, use_torch=True)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(mask, ref_mask_pt)
    # The reference numpy path (float64 FFT) agrees to float32 rounding.
    np.testing.assert_allclose(feats, ref_np, rtol=0, atol=1e-6)
    # The reference torch path is a float32 STFT: ~1e-6 typical, up to ~1e-4 on bins near the
    # (max - 8) floor. We are as close to it as the reference's own numpy path is.
    diff = np.abs(feats - ref_pt)
    ref_spread = np.abs(ref_np - ref_pt)
    assert diff.max() <= ref_spread.max() + 1e-6 and diff.max() < 2e-4
    assert np.quantile(diff, 0.999) < 3e-5 and diff.mean() < 1e-6
    # The frame-domain mask: ceil(L / 160) frames (clipped to T_max), 101 for 16001 samples.
    assert mask.sum(1).tolist() == [100, 170, 400, 2900, 3100, 6100, 101]


def test_single_clip_not_a_multiple_of_hop(ref_feature_extractor, media):
    wave = media.tone(2.345, 16000)
    feats, mask = A.log_mel_features([wave])
    ref_pt, ref_mask = ref_features(ref_feature_extractor, [wave], use_torch=False)
    assert feats.shape[-1] == wave.size // 160 == ref_pt.shape[-1]
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(feats, ref_pt, atol=1e-6)


def test_audio_output_length_matches_reference_formula():
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

    lengths = np.arange(0, 40000)
    np.testing.assert_array_equal(A.audio_output_length(lengths), _get_feat_extract_output_lengths(lengths))
    # Closed form 13 * floor(L / 100) + ceil((L % 100) / 8) and the reference examples.
    np.testing.assert_array_equal(A.audio_output_length(lengths), 13 * (lengths // 100) + -(-(lengths % 100) // 8))
    examples = {1: 1, 8: 1, 9: 2, 30: 4, 99: 13, 100: 13, 101: 14, 300: 39, 1000: 130, 3000: 390}
    assert {k: A.audio_output_length(k) for k in examples} == examples
    assert isinstance(A.audio_output_length(170), int)


@pytest.mark.parametrize("seconds", CLIP_SECONDS + (300.0,))
def test_token_count_equals_encoder_output_length(seconds):
    # Placeholder count (processor) == encoder output length (model) for the frames of the clip.
    wave = np.zeros(int(seconds * 16000), np.float32) + 0.01
    _, mask = A.log_mel_features([wave])
    frames = int(mask.sum())
    assert frames == int(seconds * 100)
    assert A.audio_output_length(frames) == 13 * (frames // 100) + -(-(frames % 100) // 8)


def test_errors_name_the_input(tmp_path, media):
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        A.load_audio(missing)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + bytes(range(256)) * 4)
    with pytest.raises(A.AudioLoadError, match="corrupt.wav.*corrupt"):
        A.load_audio(corrupt)
    empty = tmp_path / "empty.wav"
    import soundfile

    soundfile.write(str(empty), np.zeros(0, np.float32), 16000)
    with pytest.raises(A.AudioLoadError, match="empty.wav.*no samples"):
        A.load_audio(empty)
    silent_video = media.write_video(tmp_path / "silent.mp4", fps=2, seconds=1.0, audio_sr=None)
    with pytest.raises(A.AudioLoadError, match="silent.mp4.*no audio stream"):
        A.load_audio(silent_video)
    with pytest.raises(A.AudioLoadError, match="empty"):
        A.load_audio(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="Audio #1 is empty"):
        A.log_mel_features([media.tone(1.0, 16000), np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match="more than 200 samples"):
        A.log_mel_features([np.ones(100, np.float32)])
