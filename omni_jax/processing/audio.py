"""Audio input processing for Qwen3-Omni: file loading, log-mel features, token counts.

Reproduces, in numpy only, what the reference pipeline (transformers 5.23.0) does to audio:

* ``load_audio`` matches ``librosa.load(path, sr=16000)``, which is what both Qwen's
  ``qwen-omni-utils`` and ``transformers.audio_utils.load_audio`` use for local files: libsndfile
  decode to float32, mono by averaging channels, then ``soxr_hq`` resampling (librosa's default
  ``res_type``). Formats libsndfile cannot read (m4a/aac, opus in webm, the sound track of a
  video, ...) are decoded with PyAV (FFmpeg) at their native rate and resampled the same way.
* ``log_mel_features`` is ``WhisperFeatureExtractor`` with the Qwen3-Omni checkpoint settings
  (``feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, dither=0``) called the way
  ``Qwen3OmniMoeProcessor`` calls it (``padding=True`` i.e. pad to the longest clip,
  ``truncation=False``, ``return_attention_mask=True``), so clips longer than 30 s are kept whole.
* ``audio_output_length`` is ``_get_feat_extract_output_lengths``: the number of audio-encoder
  output tokens, hence the number of ``<|audio_pad|>`` placeholders, for a feature length.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

SAMPLING_RATE = 16000  # Hz, what the audio encoder was trained on
N_FFT = 400  # 25 ms analysis window
HOP_LENGTH = 160  # 10 ms hop -> 100 feature frames per second
N_MELS = 128  # feature_size in the checkpoint's preprocessor_config.json
N_WINDOW = 50  # audio_config.n_window: the encoder works on chunks of 2 * n_window = 100 frames
RESAMPLE_TYPE = "soxr_hq"  # librosa.load's default res_type, used by qwen-omni-utils

__all__ = [
    "SAMPLING_RATE",
    "N_FFT",
    "HOP_LENGTH",
    "N_MELS",
    "N_WINDOW",
    "AudioLoadError",
    "decode_audio_pyav",
    "load_audio",
    "resample",
    "mel_filter_bank",
    "log_mel_features",
    "audio_output_length",
]


class AudioLoadError(ValueError):
    """An audio input could not be turned into a waveform (unreadable, corrupt, empty, ...)."""


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"audio file '{os.fspath(source)}'"
    return f"audio array of shape {np.shape(source)}"


def resample(waveform: np.ndarray, orig_sr: float, target_sr: float = SAMPLING_RATE) -> np.ndarray:
    """Resample a mono float32 waveform ``(samples,)`` exactly as ``librosa.load(..., sr=target_sr)``.

    librosa's ``soxr_hq`` path, including its final ``fix_length`` to ``ceil(n * target / orig)``
    samples, so that lengths (and therefore token counts) agree with the reference loaders.
    """
    if orig_sr == target_sr:
        return waveform
    import librosa  # lazily: its import is slow and only resampling needs it

    return librosa.resample(waveform, orig_sr=orig_sr, target_sr=target_sr, res_type=RESAMPLE_TYPE)


def _to_mono(data: np.ndarray) -> np.ndarray:
    """(channels, samples) -> (samples,), averaging channels the way ``librosa.to_mono`` does."""
    if data.ndim == 1:
        return data
    return np.mean(data, axis=tuple(range(data.ndim - 1)))


def _decode_soundfile(path: str) -> tuple[np.ndarray, int]:
    import soundfile

    with soundfile.SoundFile(path) as f:
        sr = f.samplerate
        # Same call as librosa.load: float32, (samples, channels) transposed to (channels, samples).
        data = f.read(frames=-1, dtype=np.float32, always_2d=False).T
    return data, sr


def decode_audio_pyav(path: str) -> tuple[np.ndarray, int] | None:
    """Decode the first audio stream of any FFmpeg-readable file with PyAV.

    Returns ``(float32 (channels, samples), native sampling rate)``, or ``None`` when the container
    has no audio stream (a silent video). Raises whatever PyAV raises for unreadable files.
    """
    import av

    with av.open(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        # Convert every frame to planar float32, keeping the native rate and channel layout:
        # resampling to 16 kHz is left to soxr so that this path and the libsndfile path agree.
        resampler = av.AudioResampler(format="fltp")
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):  # flush
            chunks.append(out.to_ndarray())
    if not chunks:
        return np.zeros((1, 0), dtype=np.float32), int(rate)
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), int(rate)


def load_audio(path_or_array, sampling_rate: int | None = None) -> np.ndarray:
    """Load audio as a 16 kHz mono float32 waveform of shape ``(samples,)``.

    Args:
      path_or_array: a file path (wav, flac, ogg, mp3 and anything libsndfile reads; other formats
        such as m4a/aac/opus/webm/mp4 through PyAV) or an array. A 1-D array is a mono waveform;
        a 2-D array is multi-channel, with the channel axis being the short one (at most 16
        channels), either ``(channels, samples)`` or ``(samples, channels)``.
      sampling_rate: sampling rate of an array input (default: already 16 kHz). Ignored for files,
        whose own rate is used.

    Returns:
      float32 array ``(samples,)`` at 16 kHz, channels averaged, resampled with soxr_hq.

    Raises:
      FileNotFoundError: the path does not exist.
      AudioLoadError: the file cannot be decoded, holds no audio stream, or has no samples.
    """
    if isinstance(path_or_array, (str, os.PathLike)):
        path = os.fspath(path_or_array)
        if path.startswith(("http://", "https://")):
            raise AudioLoadError(
                f"Audio '{path}' is a URL; omni_jax does not download media. Download it and pass the local path."
            )
        if path.startswith("file://"):
            path = path[len("file://") :]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Audio file '{path}' does not exist. Pass the path of an existing audio file.")
        try:
            data, sr = _decode_soundfile(path)
        except Exception as sf_error:  # libsndfile cannot read this format: let FFmpeg try
            try:
                decoded = decode_audio_pyav(path)
            except Exception as av_error:
                raise AudioLoadError(
                    f"Could not decode audio file '{path}' (libsndfile: {sf_error}; FFmpeg/PyAV: {av_error}). "
                    "Expected a readable audio file (wav, flac, ogg, mp3, m4a, ... or a video with a sound "
                    "track); check that it is not truncated or corrupt."
                ) from av_error
            if decoded is None:
                raise AudioLoadError(
                    f"File '{path}' has no audio stream. Pass an audio file, or a video that has a sound track."
                ) from None
            data, sr = decoded
        waveform = _to_mono(data)
        if waveform.size == 0:
            raise AudioLoadError(f"Audio file '{path}' contains no samples. Pass a non-empty recording.")
        return _finish(resample(np.ascontiguousarray(waveform, dtype=np.float32), sr), _describe(path))

    # Array input.
    arr = np.asarray(path_or_array)
    if arr.dtype.kind not in "fiu":
        raise AudioLoadError(f"Audio array has dtype {arr.dtype}; expected a real-valued waveform (float or int PCM).")
    if arr.dtype.kind in "iu":
        # Integer PCM: scale to [-1, 1) like libsndfile does when it reads int files as float.
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max + 1)
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim == 2:
        if min(arr.shape) > 16:
            raise AudioLoadError(
                f"Audio array has shape {arr.shape}; expected (samples,) or a multi-channel array with at most "
                "16 channels on one axis."
            )
        arr = arr if arr.shape[0] <= arr.shape[1] else arr.T  # -> (channels, samples)
        arr = _to_mono(arr)
    elif arr.ndim != 1:
        raise AudioLoadError(f"Audio array has shape {arr.shape}; expected a 1-D waveform (samples,).")
    if arr.size == 0:
        raise AudioLoadError("Audio array is empty (0 samples). Pass a non-empty waveform.")
    sr = SAMPLING_RATE if sampling_rate is None else sampling_rate
    return _finish(resample(np.ascontiguousarray(arr), sr), _describe(path_or_array))


def _finish(waveform: np.ndarray, what: str) -> np.ndarray:
    if waveform.size == 0:
        raise AudioLoadError(f"{what} has no samples after resampling to 16 kHz. Pass a longer recording.")
    if not np.all(np.isfinite(waveform)):
        raise AudioLoadError(f"{what} contains NaN or infinite samples. Fix or re-encode the input.")
    return waveform.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Log-mel features
# ----------------------------------------------------------------------------------------------


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels = np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-30) / 1000.0) * (27.0 / np.log(6.4)), mels)
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freq = 200.0 * mels / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels - 15.0)), freq)


@lru_cache(maxsize=4)
def mel_filter_bank(
    n_freqs: int = N_FFT // 2 + 1, n_mels: int = N_MELS, sampling_rate: int = SAMPLING_RATE
) -> np.ndarray:
    """Slaney-scale, slaney-normalised triangular mel filters, float64 ``(n_freqs, n_mels)``.

    Same construction as ``transformers.audio_utils.mel_filter_bank(..., min_frequency=0,
    max_frequency=8000, norm="slaney", mel_scale="slaney")`` that ``WhisperFeatureExtractor`` uses.
    """
    mel_freqs = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sampling_rate / 2), n_mels + 2)
    filter_freqs = _mel_to_hz_slaney(mel_freqs)
    fft_freqs = np.linspace(0, sampling_rate // 2, n_freqs)
    filter_diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= (2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels]))[None, :]
    filters.setflags(write=False)
    return filters


@lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    # Periodic Hann window (torch.hann_window / transformers window_function default).
    w = np.hanning(N_FFT + 1)[:-1]
    w.setflags(write=False)
    return w


def _log_mel(padded: np.ndarray) -> np.ndarray:
    """(B, samples) float32 -> (B, n_mels, samples // hop) float32 Whisper log-mel."""
    batch, n = padded.shape
    # Centre the frames on t * hop with reflect padding (torch.stft(center=True) / np.pad reflect).
    x = np.pad(padded.astype(np.float64), ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    n_frames = 1 + (x.shape[1] - N_FFT) // HOP_LENGTH
    # Whisper drops the last STFT frame, so only n_frames - 1 frames are needed.
    n_keep = n_frames - 1
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT, axis=1)[:, : n_keep * HOP_LENGTH : HOP_LENGTH]
    spec = np.fft.rfft(frames * _hann_window(), axis=-1)  # (B, T, 201)
    power = spec.real**2 + spec.imag**2
    mel = power @ mel_filter_bank()  # (B, T, n_mels)
    log_spec = np.log10(np.maximum(mel, 1e-10))
    # Dynamic range: floor at (max - 8) per clip, the max taken over the padded clip as the reference does.
    peak = log_spec.reshape(batch, -1).max(axis=1) if log_spec.size else np.zeros(batch)
    log_spec = np.maximum(log_spec, peak[:, None, None] - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return np.ascontiguousarray(log_spec.transpose(0, 2, 1), dtype=np.float32)


def log_mel_features(audios: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Whisper log-mel features of a batch of 16 kHz waveforms, padded to the longest.

    Exactly what ``Qwen3OmniMoeProcessor`` gets from ``WhisperFeatureExtractor(feature_size=128)``
    with ``padding=True, truncation=False, return_attention_mask=True``:

    * every waveform is zero-padded (``padding_value=0.0``) on the right to the longest length
      ``L_max`` (no padding to a multiple, no 30 s cut), and the features of each row are computed
      on the *padded* waveform (padding frames get the floor value, and the per-clip
      ``max - 8`` floor sees them), giving ``T_max = L_max // 160`` frames;
    * the mask is the sample-domain mask subsampled every ``hop_length`` samples (``[:, ::160]``,
      dropping the last column when ``L_max % 160 != 0``), so row ``i`` has
      ``min(ceil(L_i / 160), T_max)`` ones: the frame domain, not the sample domain.

    Args:
      audios: list of 1-D float waveforms at 16 kHz (e.g. from ``load_audio``).

    Returns:
      features: float32 ``(B, 128, T_max)``.
      feature_attention_mask: int32 ``(B, T_max)``.
    """
    if isinstance(audios, np.ndarray) and audios.ndim == 1:
        audios = [audios]
    if len(audios) == 0:
        raise ValueError("log_mel_features got an empty list of audios; pass at least one waveform.")
    waves = []
    for i, a in enumerate(audios):
        a = np.asarray(a, dtype=np.float32)
        if a.ndim != 1:
            raise ValueError(
                f"Audio #{i} has shape {a.shape}; expected a 1-D 16 kHz mono waveform (use load_audio to convert)."
            )
        if a.size == 0:
            raise ValueError(f"Audio #{i} is empty (0 samples); pass a non-empty waveform.")
        waves.append(a)
    lengths = np.array([a.size for a in waves])
    max_len = int(lengths.max())
    if max_len <= N_FFT // 2:
        raise ValueError(
            f"The longest audio has {max_len} samples; log-mel features need more than {N_FFT // 2} samples "
            f"(12.5 ms at 16 kHz). Pass a longer recording."
        )
    padded = np.zeros((len(waves), max_len), dtype=np.float32)
    for i, a in enumerate(waves):
        padded[i, : a.size] = a
    # One row at a time keeps the float64 frame matrix small for long clips.
    features = np.concatenate([_log_mel(padded[i : i + 1]) for i in range(len(waves))], axis=0)
    t_max = max_len // HOP_LENGTH
    assert features.shape[2] == t_max, (features.shape, t_max)
    # Frame t is valid iff sample t * hop is a real sample.
    mask = (np.arange(t_max)[None, :] * HOP_LENGTH < lengths[:, None]).astype(np.int32)
    return features, mask


def audio_output_length(feature_len, n_window: int = N_WINDOW):
    """Audio-encoder output tokens for ``feature_len`` mel frames (vectorised; ints or arrays).

    Same integer arithmetic as ``_get_feat_extract_output_lengths`` in the reference: each full
    chunk of ``2 * n_window`` (100) frames gives 13 tokens after three stride-2 convolutions, the
    remainder ``r`` gives ``((((r - 1) // 2 + 1) - 1) // 2 + 1 - 1) // 2 + 1``, i.e. ``ceil(r / 8)``
    (0 when ``r == 0``). This is also the number of ``<|audio_pad|>`` tokens in the prompt.
    """
    lengths = np.asarray(feature_len)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"feature_len must be an integer or integer array, got dtype {lengths.dtype}.")
    chunk = n_window * 2
    rem = lengths % chunk
    feat = (rem - 1) // 2 + 1
    out = ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (lengths // chunk) * 13
    return int(out) if out.ndim == 0 else out
