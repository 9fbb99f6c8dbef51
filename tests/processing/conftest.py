"""Shared fixtures for the processing tests: synthetic media and the reference processors.

Everything is built offline in the test: tones and chirps written with soundfile, images drawn
with numpy, small videos (with a sound track) written with PyAV, and the transformers 5.23.0
reference processors configured with the Qwen3-Omni checkpoint settings
(``preprocessor_config.json``: Whisper features 128 mels; Qwen2VL image processor with
patch 16, merge 2, temporal patch 2, min/max pixels 3136/12845056, mean = std = 0.5).
"""

from __future__ import annotations

import fractions
import os
from unittest import mock

import numpy as np
import pytest

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
]

# A minimal chat template in the Qwen3-Omni format: ChatML turns, one placeholder per media block,
# vision placeholders wrapped in <|vision_start|>/<|vision_end|>, audio in <|audio_start|>/<|audio_end|>.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(n_media=0) -%}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set ns.n_media = ns.n_media + 1 %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'audio' %}{%- set ns.n_media = ns.n_media + 1 %}"
    "{{- '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{%- elif content['type'] == 'video' %}{%- set ns.n_media = ns.n_media + 1 %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}"
    "{%- else %}{{- raise_exception('unknown content type ' + content['type']) }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# ------------------------------------------------------------------------------------------------
# Media
# ------------------------------------------------------------------------------------------------


def tone(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A chirp plus a tone plus a little noise: float32 (samples,) or (samples, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    sig = 0.3 * np.sin(2 * np.pi * (220 * t + 150 * t**2 / max(seconds, 1.0))) + 0.1 * np.sin(2 * np.pi * 1000 * t)
    chans = [sig * (1 - 0.3 * c) + 0.003 * rng.standard_normal(t.size) for c in range(channels)]
    out = np.stack(chans, axis=-1).astype(np.float32)
    return out[:, 0] if channels == 1 else out


def write_audio(path, seconds: float, sr: int, channels: int = 1, seed: int = 0) -> str:
    import soundfile

    data = tone(seconds, sr, channels, seed)
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}[os.path.splitext(str(path))[1]]
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}[fmt]
    soundfile.write(str(path), data, sr, format=fmt, subtype=subtype)
    return str(path)


def drawn_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): gradients, a disc and a checkerboard, so resampling has edges to work on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    r = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
    g = (yy * 255 // max(height - 1, 1)).astype(np.uint8)
    b = (((xx // 7 + yy // 5) % 2) * 200).astype(np.uint8)
    img = np.stack([r, g, b], axis=-1)
    cy, cx, rad = height * 0.4, width * 0.6, min(height, width) * 0.25
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < rad**2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


def write_video(path, fps: float, seconds: float, size=(64, 64), audio_sr: int | None = 44100, codec="mpeg4") -> str:
    """A small video whose frames change every frame, optionally with a stereo AAC sound track."""
    import av

    h, w = size
    n = int(round(fps * seconds))
    with av.open(str(path), "w") as container:
        vs = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1000))
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = None
        if audio_sr:
            aus = container.add_stream("aac", rate=audio_sr)
            aus.layout = "stereo"
        for i in range(n):
            img = drawn_image(h, w, seed=i)
            img[..., 0] = (i * 37) % 256
            for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        if aus is not None:
            wav = tone(seconds, audio_sr, channels=2).T.copy()  # (2, samples)
            for k in range(0, wav.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, k : k + 1024]), format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = audio_sr, k
                for packet in aus.encode(frame):
                    container.mux(packet)
            for packet in aus.encode():
                container.mux(packet)
    return str(path)


class Media:
    """The media helpers above, handed to tests as the ``media`` fixture (no test-package imports needed)."""

    tone = staticmethod(tone)
    write_audio = staticmethod(write_audio)
    drawn_image = staticmethod(drawn_image)
    write_video = staticmethod(write_video)


@pytest.fixture(scope="session")
def media() -> Media:
    return Media()


# ------------------------------------------------------------------------------------------------
# Reference processors
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer (no merges) carrying the Qwen3-Omni special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


EXTRA_SPECIAL = dict(
    image_token="<|image_pad|>",
    audio_token="<|audio_pad|>",
    video_token="<|video_pad|>",
    vision_bos_token="<|vision_start|>",
    vision_eos_token="<|vision_end|>",
    audio_bos_token="<|audio_start|>",
    audio_eos_token="<|audio_end|>",
)


@pytest.fixture(scope="session")
def ref_tokenizer(tokenizer_file):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=tokenizer_file,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=EXTRA_SPECIAL,
    )


@pytest.fixture(scope="session")
def ref_feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, padding_value=0.0, return_attention_mask=True
    )


def make_ref_image_processor(**overrides):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kw = dict(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=3136,
        max_pixels=12845056,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    kw.update(overrides)
    return Qwen2VLImageProcessorPil(**kw)


@pytest.fixture(scope="session")
def ref_image_processor():
    return make_ref_image_processor()


class StandInVideoProcessor:
    """Stands in for the reference ``Qwen2VLVideoProcessor`` inside ``Qwen3OmniMoeProcessor``.

    The reference video processor only exists with torchvision, which is not installed here, so
    the reference *processor* is given this object: it returns omni_jax's own video outputs
    (checked separately against the reference image processor in test_video.py). What the
    reference processor then does with them (placeholder counts, audio/video interleaving,
    ``video_second_per_grid`` from ``videos_kwargs["fps"]``, feature batching, tokenisation,
    padding) is the reference's own code.
    """

    temporal_patch_size = 2
    merge_size = 2
    patch_size = 16
    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    valid_kwargs = None

    def __call__(self, videos, **kwargs):
        from omni_jax.processing.video import process_videos

        flat = []
        for v in videos:
            flat.extend(v if isinstance(v, list) else [v])
        out = process_videos(flat, fps=kwargs.get("fps"))
        return {"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": out["video_grid_thw"]}


@pytest.fixture(scope="session")
def ref_processor(ref_tokenizer, ref_feature_extractor, ref_image_processor):
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor
    from transformers.processing_utils import ProcessorMixin

    real_check = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        if name == "video_processor":  # the stand-in is not a BaseVideoProcessor
            return type(arg)
        return real_check(self, name, arg)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check):
        return Qwen3OmniMoeProcessor(
            image_processor=ref_image_processor,
            video_processor=StandInVideoProcessor(),
            feature_extractor=ref_feature_extractor,
            tokenizer=ref_tokenizer,
            chat_template=CHAT_TEMPLATE,
        )


@pytest.fixture(scope="session")
def text_assets(tokenizer_file):
    from tokenizers import Tokenizer

    from omni_jax.processing import TextAssets

    tok = Tokenizer.from_file(tokenizer_file)
    return TextAssets(
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
        special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **EXTRA_SPECIAL},
        pad_token_id=tok.token_to_id("<|endoftext|>"),
    )
