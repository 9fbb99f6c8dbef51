"""The embedded synthetic task: tiny-vocabulary text assets, learnable media, infer.py-compatible eval requests."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from omni_jax.config import preset
from omni_jax.processing import VisionSettings, load_text_assets, load_audio, process_messages
from omni_jax.training import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return synthetic.write_synthetic_task(str(tmp_path_factory.mktemp("digits")), num_train=40, num_eval=20, seed=3)


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_tokenizer_ids_are_the_tiny_presets(task):
    config = preset("tiny")
    tc = config.thinker_config
    tok = load_text_assets(task["tokenizer"]).tokenizer
    expected = {
        "<|audio_pad|>": tc.audio_token_id, "<|image_pad|>": tc.image_token_id, "<|video_pad|>": tc.video_token_id,
        "<|audio_start|>": tc.audio_start_token_id, "<|audio_end|>": tc.audio_end_token_id,
        "<|vision_start|>": tc.vision_start_token_id, "<|vision_end|>": tc.vision_end_token_id,
        "<|im_start|>": config.im_start_token_id, "<|im_end|>": config.im_end_token_id,
        "<tts_pad>": config.tts_pad_token_id, "<tts_text_bos>": config.tts_bos_token_id,
        "<tts_text_eod>": config.tts_eos_token_id, "user": config.user_token_id,
        "assistant": config.assistant_token_id, "system": config.system_token_id,
    }
    assert {s: tok.token_to_id(s) for s in expected} == expected
    assert max(tok.get_vocab().values()) < tc.text_config.vocab_size
    ids = tok.encode("<|im_start|>assistant\nSeven<|im_end|>\n").ids
    assert ids == [508, 497, 1, tok.token_to_id("seven"), 509, 1]
    assert 0 not in tok.encode(synthetic.IMAGE_QUESTION + synthetic.AUDIO_QUESTION).ids  # no <unk>
    assert tok.decode(ids, skip_special_tokens=True) == "assistant \n seven \n"


def test_files_are_balanced_deterministic_and_processed_to_few_tokens(task, tmp_path):
    train, evals = rows(task["train"]), rows(task["eval"])
    assert len(train) == 40 and len(evals) == 20
    assert sorted(r["digit"] for r in train) == sorted(list(range(10)) * 4)
    assert {r["kind"] for r in train} == {"image", "audio"}
    assert all(r["target"] == synthetic.DIGIT_WORDS[r["digit"]] and len(r["target_codes"]) == 8 for r in train)
    assert all(set(r) >= {"id", "messages", "answer"} and "target" not in r for r in evals)
    again = synthetic.write_synthetic_task(str(tmp_path / "again"), num_train=40, num_eval=20, seed=3)
    for name in ("train.jsonl", "eval.jsonl", "media/train-00007.png", "media/eval-00003.wav"):
        digest = [hashlib.sha256(open(os.path.join(p, name), "rb").read()).hexdigest() for p in (task["root"],
                                                                                              again["root"])]
        assert digest[0] == digest[1], name

    assets = load_text_assets(task["tokenizer"])
    settings = VisionSettings.from_preprocessor_config(task["tokenizer"])
    by_kind = {r["kind"]: r for r in train}
    for kind, row in by_kind.items():
        messages = json.loads(json.dumps(row["messages"]))
        block = messages[0]["content"][0]
        block[kind] = os.path.join(task["root"], block[kind])
        out = process_messages([messages], assets, image_settings=settings)
        ids = out["input_ids"][0]
        if kind == "image":
            assert out["image_grid_thw"].tolist() == [[1, 4, 4]] and (ids == 501).sum() == 4
        else:
            assert 10 <= (ids == 500).sum() <= 16  # 0.8-1.2 s of audio


def _segments_on(img: np.ndarray) -> str:
    """Reads the seven segments back from a drawn digit (bounding box of the light pixels)."""
    gray = img[..., 0].astype(np.float32)
    on = gray > (gray.max() + np.median(gray)) / 2
    ys, xs = np.nonzero(on)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    probes = {"a": (y0 + 1, (x0 + x1) // 2), "d": (y1 - 2, (x0 + x1) // 2), "g": ((y0 + y1) // 2, (x0 + x1) // 2),
              "f": (y0 + h // 4, x0 + 1), "b": (y0 + h // 4, x1 - 2), "e": (y1 - h // 4, x0 + 1),
              "c": (y1 - h // 4, x1 - 2)}
    if w < h // 3:  # a "1": only the right column exists
        return "bc"
    return "".join(sorted(s for s, (y, x) in probes.items() if on[y, x]))


def test_images_and_tones_encode_their_digit(task):
    for r in rows(task["train"]) + rows(task["eval"]):
        path = os.path.join(task["root"], r["messages"][0]["content"][0][r["kind"]])
        if r["kind"] == "image":
            img = np.asarray(Image.open(path))
            assert img.shape == (64, 64, 3)
            assert _segments_on(img) == "".join(sorted(synthetic._SEGMENTS[r["digit"]])), r["id"]
        else:
            wav = load_audio(path)
            spectrum = np.abs(np.fft.rfft(wav))
            peak = np.argmax(spectrum) * 16000 / len(wav)
            nearest = np.argmin([abs(np.log(peak / synthetic.digit_frequency(d))) for d in range(10)])
            assert nearest == r["digit"], (r["id"], peak)


def test_eval_lines_are_infer_requests(task):
    sys.path.insert(0, REPO)
    try:
        import infer
    finally:
        sys.path.remove(REPO)
    config = preset("tiny")
    assets = load_text_assets(task["tokenizer"])
    ctx = infer.Context(config=config, assets=assets, base_dir=task["root"], speech=False, default_speaker="Ethan",
                        no_audio=True, image_settings=VisionSettings.from_preprocessor_config(task["tokenizer"]))
    requests = infer.read_requests(task["eval"])
    for obj in requests[:4]:
        req = infer.prepare_request(obj, ctx, "eval")
        assert req.input_ids[-3:] == [config.im_start_token_id, config.assistant_token_id, 1]
        assert req.media and ("pixel_values" in req.media or "input_features" in req.media)


def test_score(task, tmp_path):
    evals = rows(task["eval"])
    results = tmp_path / "results.jsonl"
    with open(results, "w") as f:
        for i, r in enumerate(evals):
            text = r["answer"] if i % 2 == 0 else "nine" if r["answer"] != "nine" else "zero"
            f.write(json.dumps({"id": r["id"], "text": text + "."}) + "\n")
    s = synthetic.score(task["eval"], str(results))
    assert (s["correct"], s["total"], s["errors"]) == (10, 20, 0) and s["accuracy"] == 0.5
