"""infer.py with audio, image and video requests and speech output, through the command line.

The tiny preset's seeded random weights (`--preset tiny`) with a word-level tokenizer and a chat
template written in the test (`--tokenizer DIR`; special tokens at the tiny preset's ids); media
made in the test: a tone (soundfile), a drawn PNG (pillow), a 2 s video with a sound track (PyAV),
and broken files. Three runs share one requests file: speech (offline decode), speech with
--stream, and --no-audio. Greedy decoding, so that the streamed wavs must equal the offline ones.
"""

import fractions
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import omni_jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = omni_jax.preset("tiny")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'audio' %}{{- '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{%- elif content['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_tokenizer(folder):
    """Word-level tokenizer whose special tokens and role words carry the tiny preset's ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    c, t = CONFIG, CONFIG.thinker_config
    special = {
        "<|endoftext|>": 0, "<|im_start|>": c.im_start_token_id, "<|im_end|>": c.im_end_token_id,
        "<|audio_pad|>": t.audio_token_id, "<|image_pad|>": t.image_token_id, "<|video_pad|>": t.video_token_id,
        "<|audio_start|>": t.audio_start_token_id, "<|audio_end|>": t.audio_end_token_id,
        "<|vision_start|>": t.vision_start_token_id, "<|vision_end|>": t.vision_end_token_id,
    }
    vocab = {"user": c.user_token_id, "assistant": c.assistant_token_id, "system": c.system_token_id}
    for i, w in enumerate(["\n", " ", "?", "what", "do", "you", "hear", "see", "in", "this", "hello"], start=1):
        vocab[w] = i
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| +"), behavior="isolated")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def tone(seconds, sr, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    sig = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * (300 * t + 200 * t**2))
    return np.stack([sig] * channels, -1).astype(np.float32) if channels > 1 else sig.astype(np.float32)


def drawn(h, w, seed=0):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 5 + yy // 3) % 2) * 200], -1).astype(np.uint8)
    img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 4) ** 2] = (seed * 50 % 256, 30, 200)
    return img


def write_video(path, fps=4, seconds=2, size=(64, 64), audio_sr=16000):
    import av

    h, w = size
    with av.open(str(path), "w") as container:
        vs = container.add_stream("mpeg4", rate=fractions.Fraction(fps))
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = container.add_stream("aac", rate=audio_sr)
        aus.layout = "stereo"
        for i in range(fps * seconds):
            for packet in vs.encode(av.VideoFrame.from_ndarray(drawn(h, w, i), format="rgb24")):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        wav = np.ascontiguousarray(tone(seconds, audio_sr, channels=2).T)
        for k in range(0, wav.shape[1], 1024):
            piece = np.ascontiguousarray(wav[:, k : k + 1024])
            frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = audio_sr, k
            for packet in aus.encode(frame):
                container.mux(packet)
        for packet in aus.encode():
            container.mux(packet)


def user(*content):
    return [{"role": "user", "content": list(content)}]


def text(s):
    return {"type": "text", "text": s}


GOOD = ["audio", "image", "video-with-sound", "chat-text", "ids-no-header", "voice-chelsie"]
BAD = {  # id -> (file the error must name, what else it must say)
    "missing": ("nowhere.wav", "does not exist"),
    "corrupt-audio": ("corrupt.wav", "corrupt.wav"),
    "empty-audio": ("empty.wav", "no samples"),
    "zero-size-image": ("zero.png", "empty (0 bytes)"),
    "unreadable-video": ("broken.mp4", "broken.mp4"),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_media")
    tok = root / "tok"
    tok.mkdir()
    write_tokenizer(tok)
    media = root / "media"
    media.mkdir()
    # 16 kHz throughout (the model rate): no resampling, so librosa is not imported (~7 s per run here).
    soundfile.write(media / "tone.wav", tone(1.0, 16000), 16000)
    from PIL import Image

    Image.fromarray(drawn(48, 64)).save(media / "drawn.png")
    write_video(media / "clip.mp4")
    (media / "corrupt.wav").write_bytes(b"RIFF\x00\x01garbage" * 40)
    soundfile.write(media / "empty.wav", np.zeros(0, np.float32), 16000)
    (media / "zero.png").write_bytes(b"")
    (media / "broken.mp4").write_bytes(os.urandom(2048))
    lines = [
        {"id": "audio", "messages": user({"type": "audio", "audio": "media/tone.wav"}, text("what do you hear"))},
        {"id": "missing", "messages": user({"type": "audio", "audio": "media/nowhere.wav"}, text("hello"))},
        {"id": "image", "messages": user({"type": "image", "image": "media/drawn.png"}, text("what do you see"))},
        {"id": "corrupt-audio", "messages": user({"type": "audio", "audio": "media/corrupt.wav"})},
        {"id": "video-with-sound", "use_audio_in_video": True,
         "messages": user({"type": "video", "video": "media/clip.mp4"}, text("what do you see in this"))},
        {"id": "empty-audio", "messages": user({"type": "audio", "audio": "media/empty.wav"})},
        {"id": "chat-text", "messages": user(text("hello"))},
        {"id": "zero-size-image", "messages": user({"type": "image", "image": "media/zero.png"})},
        {"id": "ids-no-header", "input_ids": [3, 1, 4, 1, 5]},
        {"id": "unreadable-video", "messages": user({"type": "video", "video": "media/broken.mp4"})},
        {"id": "voice-chelsie", "speaker": "Chelsie", "messages": user(text("hello you"))},
        {"id": "unknown-voice", "speaker": "Nobody", "messages": user(text("hello"))},
    ]
    (root / "requests.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    few = [x for x in lines if x["id"] in ("image", "corrupt-audio", "unknown-voice", "ids-no-header")]
    (root / "few.jsonl").write_text("".join(json.dumps(x) + "\n" for x in few))
    return root


def run_infer(root, out, *args, requests="requests.jsonl"):
    cmd = [sys.executable, os.path.join(ROOT, "infer.py"), "--preset", "tiny", "--tokenizer", str(root / "tok"),
           "--requests", str(root / requests), "--out", str(root / out), "--greedy", "--max-new-tokens", "4",
           "--max-audio-frames", "8", *args]
    # Run from elsewhere: media paths must resolve against the requests file, not the working directory.
    proc = subprocess.run(cmd, cwd=str(root / "tok"), capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    results = {}
    if os.path.exists(root / out / "results.jsonl"):
        results = {r["id"]: r for r in map(json.loads, open(root / out / "results.jsonl"))}
    return proc, results


@pytest.fixture(scope="module")
def offline(workdir):
    return run_infer(workdir, "offline")


@pytest.fixture(scope="module")
def streamed(workdir):
    return run_infer(workdir, "streamed", "--stream", "--chunk-frames", "4")


def test_media_requests_are_served_and_spoken(workdir, offline):
    proc, results = offline
    assert proc.returncode == 1, proc.stderr  # the bad lines fail, nothing else
    assert "RANDOM weights" in proc.stderr
    assert list(results) == [
        "audio", "missing", "image", "corrupt-audio", "video-with-sound", "empty-audio", "chat-text",
        "zero-size-image", "ids-no-header", "unreadable-video", "voice-chelsie", "unknown-voice",
    ]  # file order
    for rid in GOOD:
        r = results[rid]
        assert "error" not in r, r
        assert len(r["generated_ids"]) == 4 and r["finish_reason"] == "length" and isinstance(r["text"], str)
    # Prompts hold the media placeholders: 1 s of audio -> 13 tokens; the image and the video tokens;
    # the video's sound track interleaved (audio tokens inside the video's bracket).
    assert results["audio"]["prompt_tokens"] > 13 and results["image"]["prompt_tokens"] > 4
    assert results["video-with-sound"]["prompt_tokens"] > results["image"]["prompt_tokens"]
    for rid in ["audio", "image", "video-with-sound", "chat-text", "voice-chelsie"]:
        r = results[rid]
        path = workdir / "offline" / r["audio"]
        assert r["audio"] == f"{rid}.wav" and path.exists()
        info = soundfile.info(str(path))
        assert info.samplerate == 24000 and info.channels == 1 and r["sample_rate"] == 24000
        assert info.frames == r["audio_samples"] > 0
        wav, _ = soundfile.read(str(path), dtype="float32")
        assert np.all(np.isfinite(wav)) and np.any(wav != 0)
    assert results["voice-chelsie"]["speaker"] == "Chelsie" and results["audio"]["speaker"] == "Ethan"
    # Pre-tokenized input without an assistant header: text, no speech, and a note saying why.
    assert "audio" not in results["ids-no-header"] and "chat prompt" in results["ids-no-header"]["note"]
    assert not (workdir / "offline" / "ids-no-header.wav").exists()


def test_bad_media_give_per_line_errors_naming_the_file(workdir, offline):
    _, results = offline
    for rid, (name, says) in BAD.items():
        error = results[rid]["error"]
        assert name in error and says in error, (rid, error)
        assert "requests.jsonl:" in error
        assert not (workdir / "offline" / f"{rid}.wav").exists()
    assert "unknown speaker 'Nobody'" in results["unknown-voice"]["error"]
    assert "chelsie" in results["unknown-voice"]["error"]  # lists the valid ones


def test_stream_writes_the_same_audio_and_reports_first_packet(workdir, offline, streamed):
    proc, results = streamed
    assert proc.returncode == 1, proc.stderr
    _, reference = offline
    assert "first audio packet after" in proc.stderr
    for rid in ["audio", "image", "video-with-sound", "chat-text", "voice-chelsie"]:
        r, ref = results[rid], reference[rid]
        assert r["generated_ids"] == ref["generated_ids"]
        assert 0 < r["time_to_first_audio_s"] < 900
        a, sr = soundfile.read(str(workdir / "streamed" / r["audio"]), dtype="float32")
        b, _ = soundfile.read(str(workdir / "offline" / ref["audio"]), dtype="float32")
        # 8 frames < one 300-frame chunk: the reference's chunked decode is the full decode, which the
        # stream equals; only float rounding of differently compiled programs separates them.
        assert sr == 24000 and a.shape == b.shape and a.size == r["audio_samples"]
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), rid
    assert "time_to_first_audio_s" not in reference["audio"]


@pytest.fixture(scope="module")
def text_only(workdir):
    return run_infer(workdir, "text_only", "--no-audio", requests="few.jsonl")


API = """
import json, sys, numpy as np, omni_jax
from omni_jax.processing import load_text_assets, process_messages
root = sys.argv[1]
assets = load_text_assets(root + '/tok')
model = omni_jax.OmniModel.random(omni_jax.preset('tiny'), seed=0,
                                  runtime=omni_jax.Runtime(dtype='float32', param_dtype='float32'))
out = {}
for line in open(root + '/requests.jsonl'):
    r = json.loads(line)
    if r['id'] not in ('audio', 'image', 'video-with-sound'):
        continue
    for m in r['messages']:
        for c in m['content']:
            if c['type'] != 'text':
                c[c['type']] = root + '/' + c[c['type']]
    uav = r.get('use_audio_in_video', False)
    inputs = process_messages([r['messages']], assets, use_audio_in_video=uav)
    ids, mask = inputs.pop('input_ids'), inputs.pop('attention_mask')
    g = model.generate(ids, mask, max_new_tokens=4, **inputs)
    out[r['id']] = g.sequences[0, ids.shape[1]:].tolist()
print(json.dumps(out))
"""


def test_batched_cli_results_equal_the_python_api_on_each_request_alone(workdir, offline, text_only):
    """infer.py batches media requests (speech batch: audio, image, chat-text, voice-chelsie; text batch:
    image, unknown-voice, ids-no-header) and collates their media; each row's greedy tokens must be those
    of `process_messages` + `model.generate` on the request alone."""
    proc = subprocess.run([sys.executable, "-c", API, str(workdir)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=os.environ.get(
                              "OMNI_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/omni_jax/xla"))))
    assert proc.returncode == 0, proc.stderr
    api = json.loads(proc.stdout.splitlines()[-1])
    for rid in ("audio", "image", "video-with-sound"):
        assert offline[1][rid]["generated_ids"] == api[rid], rid
    assert text_only[1]["image"]["generated_ids"] == api["image"]


def test_no_audio_writes_no_wav(workdir, text_only):
    proc, results = text_only
    assert proc.returncode == 1, proc.stderr
    assert not [f for f in os.listdir(workdir / "text_only") if f.endswith(".wav")]
    for rid in ("image", "ids-no-header"):
        assert "error" not in results[rid] and "audio" not in results[rid] and "note" not in results[rid]
        assert len(results[rid]["generated_ids"]) == 4
    assert "error" not in results["unknown-voice"]  # request speakers are ignored with --no-audio
    assert "corrupt.wav" in results["corrupt-audio"]["error"]
