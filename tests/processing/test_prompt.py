"""omni_jax.processing.prompt against the reference Qwen3OmniMoeProcessor (transformers 5.23.0).

The reference processor is built from the reference Whisper feature extractor and Qwen2VL image
processor with the Qwen3-Omni settings, a small byte-level tokenizer with the Qwen3-Omni special
tokens, and a chat template in the Qwen3-Omni format (conftest.py). Its video processor needs
torchvision, which is missing here, so it gets a stand-in returning omni_jax's video outputs
(their pixels are checked in test_video.py); everything else on the reference side — template
rendering, audio features, placeholder counts, audio/video interleaving, video_second_per_grid,
tokenisation and left padding — is the reference's code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from omni_jax.processing import audio_output_length, load_audio, process_messages, render_chat_template
from omni_jax.processing import prompt as P
from omni_jax.processing.video import load_video_audio

MM_KEYS = (
    "input_ids",
    "attention_mask",
    "input_features",
    "feature_attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "video_second_per_grid",
)


def assert_matches_reference(ours: dict, ref) -> None:
    ref = {k: np.asarray(v) for k, v in ref.items()}
    assert set(ref) == set(ours) - {"use_audio_in_video"}
    for key in MM_KEYS:
        if key not in ref:
            continue
        assert ours[key].shape == ref[key].shape, key
        if key == "input_features":
            # Reference features come from its float32 torch STFT (see test_audio.py).
            np.testing.assert_allclose(ours[key], ref[key], rtol=0, atol=2e-4)
        elif key == "video_second_per_grid":
            # Ours float32 (as with return_tensors="pt"); the reference's list becomes float64 with "np".
            np.testing.assert_allclose(ours[key], ref[key], rtol=1e-7)
        else:
            assert ours[key].dtype == ref[key].dtype, key
            np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)


def count(ids_row, token_id) -> int:
    return int((ids_row == token_id).sum())


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, media):
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(media.drawn_image(100, 150)).save(path)
    return str(path)


def test_render_matches_reference(ref_processor, ref_tokenizer, text_assets, image_file):
    convs = [
        [
            {"role": "system", "content": "You are Qwen."},
            {"role": "user", "content": [{"type": "image", "image": image_file}, {"type": "text", "text": "Où? ✓"}]},
            {"role": "assistant", "content": "A dog."},
            {"role": "user", "content": [{"type": "audio", "audio": np.zeros(10)}, {"type": "text", "text": "and this"}]},
        ],
        [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "x"}]}],
    ]
    ref = ref_processor.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
    ours = render_chat_template(convs, text_assets.chat_template, special_tokens=text_assets.special_tokens)
    assert ours == ref
    # A template using the helpers the reference environment provides.
    template = (
        "{%- for m in messages %}{%- if loop.index > 3 %}{%- break %}{%- endif %}"
        "{{- m | tojson }}{{- eos_token }}{% generation %}[{{ m.role }}]{% endgeneration %}\n"
        "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    )
    ref = ref_tokenizer.apply_chat_template(convs[0], chat_template=template, tokenize=False, add_generation_prompt=True)
    assert render_chat_template(convs[0], template, special_tokens={"eos_token": "<|im_end|>"}) == [ref]
    with pytest.raises(Exception, match="unknown content type"):
        render_chat_template([{"role": "user", "content": [{"type": "smell"}]}], text_assets.chat_template)


def test_audio_and_image_batch_matches_reference(ref_processor, text_assets, media, tmp_path, image_file):
    a1 = media.write_audio(tmp_path / "a1.wav", 1.7, 44100, channels=2)
    a2 = media.write_audio(tmp_path / "a2.flac", 4.0, 48000)
    a3 = media.write_audio(tmp_path / "a3.ogg", 1.0, 8000)
    convs = [
        [{"role": "user", "content": [{"type": "audio", "audio": a1}, {"type": "text", "text": "What is this?"}]}],
        [
            {"role": "user", "content": [{"type": "image", "image": image_file}, {"type": "audio", "audio": a2}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "audio", "audio": a3}, {"type": "text", "text": "and?"}]},
        ],
        [{"role": "user", "content": "plain text"}],
    ]
    # The reference loads the files itself (soundfile + soxr, PIL).
    ref = ref_processor.apply_chat_template(
        convs, tokenize=True, return_dict=True, add_generation_prompt=True, processor_kwargs={"padding": True}, return_tensors="np"
    )
    ours = process_messages(convs, text_assets)
    assert_matches_reference(ours, ref)
    ids, mask = ours["input_ids"], ours["attention_mask"]
    pad_id = text_assets.pad_token_id
    assert (mask[:, -1] == 1).all() and (ids[mask == 0] == pad_id).all()  # left padding
    audio_id = text_assets.tokenizer.token_to_id(P.AUDIO_TOKEN)
    n_tokens = audio_output_length(ours["feature_attention_mask"].sum(-1).astype(np.int64))
    assert [count(r, audio_id) for r in ids] == [n_tokens[0], n_tokens[1] + n_tokens[2], 0]
    image_id = text_assets.tokenizer.token_to_id(P.IMAGE_TOKEN)
    assert count(ids[1], image_id) == np.prod(ours["image_grid_thw"][0]) // 4


def test_long_audio_is_not_truncated(ref_processor, text_assets, media, tmp_path):
    clips = {s: media.write_audio(tmp_path / f"c{s}.wav", s, 16000, seed=int(s)) for s in (29.0, 31.0, 61.0)}
    convs = [
        [{"role": "user", "content": [{"type": "audio", "audio": clips[61.0]}]}],
        [{"role": "user", "content": [{"type": "audio", "audio": clips[29.0]}, {"type": "audio", "audio": clips[31.0]}]}],
    ]
    ref = ref_processor.apply_chat_template(
        convs, tokenize=True, return_dict=True, add_generation_prompt=True, processor_kwargs={"padding": True}, return_tensors="np"
    )
    ours = process_messages(convs, text_assets)
    assert_matches_reference(ours, ref)
    assert ours["input_features"].shape == (3, 128, 6100)
    assert ours["feature_attention_mask"].sum(-1).tolist() == [6100, 2900, 3100]
    audio_id = text_assets.tokenizer.token_to_id(P.AUDIO_TOKEN)
    assert [count(r, audio_id) for r in ours["input_ids"]] == [793, 377 + 403]


def ref_with_videos(ref_processor, convs, videos, audio, audio_from_video_indices, fps, images=None):
    """The reference processor on pre-decoded sound tracks (its own decoding needs torchcodec)."""
    from transformers.image_utils import load_image

    texts = ref_processor.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
    kwargs = dict(load_audio_from_video=True, audio=audio, audio_from_video_indices=audio_from_video_indices)
    if audio_from_video_indices is None:
        kwargs = dict(audio=audio) if audio else {}
    if images:
        kwargs["images"] = [load_image(i) for i in images]
    return ref_processor(
        text=texts, videos=videos, videos_kwargs={"fps": fps}, padding=True, return_tensors="np", **kwargs
    )


@pytest.fixture(scope="module")
def av_video(tmp_path_factory, media):
    """4 s, 10 fps, 64x64, with a stereo 44.1 kHz AAC sound track."""
    return media.write_video(tmp_path_factory.mktemp("vid") / "av.mp4", fps=10, seconds=4.0)


@pytest.mark.parametrize("fps", [1, 2, 2.5, 3])
def test_video_with_audio_matches_reference(ref_processor, text_assets, av_video, fps):
    convs = [[{"role": "user", "content": [{"type": "video", "video": av_video}, {"type": "text", "text": "Describe."}]}]]
    track = load_video_audio(av_video)
    ref = ref_with_videos(ref_processor, convs, [av_video], [track], [0], fps)
    ours = process_messages(convs, text_assets, use_audio_in_video=True, fps=fps)
    assert_matches_reference(ours, ref)
    assert ours["use_audio_in_video"] is True
    assert ours["video_second_per_grid"][0] == np.float32(2 / fps)
    # <|vision_start|><|audio_start|> ... <|audio_end|><|vision_end|>, video and audio interleaved.
    tok = text_assets.tokenizer
    ids = ours["input_ids"][0].tolist()
    start = ids.index(tok.token_to_id(P.VISION_BOS_TOKEN))
    assert ids[start + 1] == tok.token_to_id(P.AUDIO_BOS_TOKEN)
    end = ids.index(tok.token_to_id(P.AUDIO_EOS_TOKEN))
    assert ids[end + 1] == tok.token_to_id(P.VISION_EOS_TOKEN)
    body = ids[start + 2 : end]
    t, h, w = ours["video_grid_thw"][0]
    assert body.count(tok.token_to_id(P.VIDEO_TOKEN)) == t * h * w // 4
    assert body.count(tok.token_to_id(P.AUDIO_TOKEN)) == audio_output_length(int(ours["feature_attention_mask"][0].sum()))
    assert body[0] == tok.token_to_id(P.VIDEO_TOKEN)  # video first on the tie at time 0


def test_video_without_audio_matches_reference(ref_processor, text_assets, av_video):
    convs = [[{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "video", "video": av_video}]}]]
    ref = ref_with_videos(ref_processor, convs, [av_video], None, None, 2.0)
    ours = process_messages(convs, text_assets)
    assert_matches_reference(ours, ref)
    assert ours["use_audio_in_video"] is False


def test_mixed_batch_matches_reference(ref_processor, text_assets, media, tmp_path, av_video, image_file):
    silent = media.write_video(tmp_path / "silent.mp4", fps=4, seconds=2.0, size=(48, 80), audio_sr=None)
    a = media.write_audio(tmp_path / "a.wav", 2.2, 22050)
    convs = [
        [{"role": "user", "content": [{"type": "video", "video": av_video}, {"type": "text", "text": "1"}]}],
        [{"role": "user", "content": [{"type": "audio", "audio": a}, {"type": "image", "image": image_file}]}],
        [{"role": "user", "content": [{"type": "text", "text": "3"}, {"type": "video", "video": silent}]}],
    ]
    # Audio slots in content order: the first video's track, the standalone clip; the silent video has none.
    ref = ref_with_videos(
        ref_processor, convs, [av_video, silent], [load_video_audio(av_video), load_audio(a)], [0, None], 2.0, images=[image_file]
    )
    ours = process_messages(convs, text_assets, use_audio_in_video=True)
    assert_matches_reference(ours, ref)
    tok = text_assets.tokenizer
    row2 = ours["input_ids"][2]
    assert count(row2, tok.token_to_id(P.AUDIO_BOS_TOKEN)) == 0  # silent video: plain video tokens
    assert count(row2, tok.token_to_id(P.VIDEO_TOKEN)) == np.prod(ours["video_grid_thw"][1]) // 4


def test_interleaving_equals_reference_method(ref_processor):
    cases = [
        ((t, h, w), spg, n)
        for t in (1, 2, 3, 5, 8)
        for h, w in ((2, 2), (4, 6))
        for spg in (2.0, 1.0, 0.8, 2 / 3, 0.5, 1 / 3)
        for n in (1, 13, 39, 52, 130)
    ]
    for grid, spg, n in cases:
        ref = ref_processor.replace_video_with_audio_token(
            {"video_grid_thw": np.array([grid]), "video_second_per_grid": [spg]},
            0,
            {"num_audio_tokens": np.array([n])},
            0,
            position_id_per_seconds=13.0,
        )
        assert P.video_with_audio_placeholder(grid, spg, n) == ref, (grid, spg, n)
    # The example of the reference notes: grid (2, 4, 4) at 2 s per grid with 39 audio tokens.
    s = P.video_with_audio_placeholder((2, 4, 4), 2.0, 39)
    v, a = P.VIDEO_TOKEN, P.AUDIO_TOKEN
    assert s == P.AUDIO_BOS_TOKEN + v * 4 + a * 26 + v * 4 + a * 13 + P.AUDIO_EOS_TOKEN


def test_load_text_assets(tmp_path, tokenizer_file, text_assets, image_file):
    import shutil

    shutil.copy(tokenizer_file, tmp_path / "tokenizer.json")
    config = {
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": "stale template from tokenizer_config",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": text_assets.chat_template}))
    assets = P.load_text_assets(tmp_path)
    assert assets.chat_template == text_assets.chat_template  # chat_template.json wins
    assert assets.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert assets.pad_token_id == text_assets.pad_token_id
    convs = [[{"role": "user", "content": [{"type": "image", "image": image_file}, {"type": "text", "text": "hi"}]}]]
    a = process_messages(convs, str(tmp_path))
    b = process_messages(convs, text_assets)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        P.load_text_assets(tmp_path / "nowhere")


def test_media_given_as_data(ref_processor, text_assets, media):
    """Arrays and base64 instead of paths: a 16 kHz waveform, a base64 PNG, a frames array with its fps."""
    import base64
    import io

    wave = media.tone(1.3, 16000)
    buf = io.BytesIO()
    Image.fromarray(media.drawn_image(60, 90)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    convs = [[{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "image", "base64": b64}]}]]
    ref = ref_processor.apply_chat_template(
        convs, tokenize=True, return_dict=True, add_generation_prompt=True, processor_kwargs={"padding": True}, return_tensors="np"
    )
    assert_matches_reference(process_messages(convs, text_assets), ref)
    frames = np.stack([media.drawn_image(64, 64, seed=i) for i in range(6)])
    out = process_messages([{"role": "user", "content": [{"type": "video", "video": frames, "fps": 3.0}]}], text_assets)
    assert out["video_grid_thw"].tolist() == [[3, 24, 24]]
    assert out["video_second_per_grid"][0] == np.float32(2 / 3)


def test_input_errors(text_assets, tmp_path):
    with pytest.raises(ValueError, match="block #0.*'audio' block needs one of the keys"):
        process_messages([{"role": "user", "content": [{"type": "audio"}]}], text_assets)
    with pytest.raises(ValueError, match="unknown content type 'smell'"):
        process_messages([{"role": "user", "content": [{"type": "smell", "smell": 1}]}], text_assets)
    with pytest.raises(FileNotFoundError, match="nothere.wav"):
        process_messages([{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "nothere.wav")}]}], text_assets)
    with pytest.raises(ValueError, match="2 <\\|audio_pad\\|> placeholders but 1 audio"):
        P.expand_placeholders(["<|audio_pad|><|audio_pad|>"], audio_replacements=["x"])
    with pytest.raises(ValueError, match="No chat template"):
        process_messages([{"role": "user", "content": "hi"}], text_assets.tokenizer, chat_template=None)
