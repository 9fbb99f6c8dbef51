"""The embedded synthetic task: "which digit?" from a drawn image or a tone, for the tiny preset.

Everything is generated offline with numpy (no downloads), small enough that the tiny preset
(`omni_jax.config.preset("tiny")`: text vocabulary 512, hidden 64) learns it on a 2-core CPU in a
few minutes:

* image examples: a seven-segment digit drawn on a 64x64 picture (random position, stroke width
  and grey levels, a little noise). 64x64 is one 4x4 grid of 16-pixel patches: 4 image tokens.
* audio examples: a ~1 s tone at 16 kHz whose pitch encodes the digit (digit d sounds at
  `400 * 2**(d/3)` Hz, 400 Hz to 3.2 kHz, 26 % apart; +-3 % jitter, a harmonic, noise): ~13 audio
  tokens.
* the answer is the digit's English word ("seven"), then `<|im_end|>`.
* optional speech targets: a fixed codec-id pattern per digit (`digit_codes`), so the talker and
  code predictor have teacher-forcing data (the real codec encoder is not public).

Written to `out_dir`:

    tokenizer.json, tokenizer_config.json, chat_template.jinja   the tiny vocabulary's text assets
    preprocessor_config.json, generation_config.json             image settings; greedy decoding
    media/{train,eval}-NNNNN.{png,wav}
    train.jsonl   {"id", "messages", "target", "target_codes", "speaker", "kind", "digit"}  (data.py)
    eval.jsonl    {"id", "messages", "answer", "kind", "digit"}  (infer.py request format)
    task.json     what was generated (seed, counts, frequencies, answers)

The text assets sit in `out_dir` itself, so `out_dir` is both the data's `tokenizer` folder and
`export_params(..., copy_from=out_dir)`'s source: the exported checkpoint then carries them and
`infer.py --ckpt EXPORT --requests out_dir/eval.jsonl` answers with words. `score(eval, results)`
computes the accuracy of an infer.py `results.jsonl`.

    python -m omni_jax.training.synthetic write OUT_DIR [--num-train N] [--num-eval N] [--seed S]
    python -m omni_jax.training.synthetic score OUT_DIR/eval.jsonl RESULTS_DIR/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

__all__ = [
    "DIGIT_WORDS",
    "SPECIAL_TOKEN_IDS",
    "WORD_TOKEN_IDS",
    "CHAT_TEMPLATE",
    "IMAGE_QUESTION",
    "AUDIO_QUESTION",
    "digit_frequency",
    "digit_codes",
    "draw_digit",
    "tone_digit",
    "build_tokenizer",
    "write_text_assets",
    "write_synthetic_task",
    "score",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_QUESTION = "Which digit is drawn in the picture?"
AUDIO_QUESTION = "Which digit does the tone encode?"

# The tiny preset's ids (omni_jax/config.py `_tiny`): special tokens and the role words that the
# talker looks for after <|im_start|> (user 507, assistant 497, system 498).
SPECIAL_TOKEN_IDS = {
    "<|endoftext|>": 496,
    "<tts_text_eod>": 499,
    "<|audio_pad|>": 500,
    "<|image_pad|>": 501,
    "<|video_pad|>": 502,
    "<|audio_start|>": 503,
    "<|audio_end|>": 504,
    "<|vision_start|>": 505,
    "<|vision_end|>": 506,
    "<|im_start|>": 508,
    "<|im_end|>": 509,
    "<tts_pad>": 510,
    "<tts_text_bos>": 511,
}
ROLE_TOKEN_IDS = {"assistant": 497, "system": 498, "user": 507}
_WORDS = (
    ("<unk>", "\n", "?", ".", ",", "!", "'", ":")
    + DIGIT_WORDS
    + tuple(str(d) for d in range(10))
    + tuple(
        "which what digit number is are was drawn shown written in on the a an picture image photo tone sound "
        "audio does do you hear heard encode encodes say says said it this that of and or to i see".split()
    )
)
WORD_TOKEN_IDS = {**{w: i for i, w in enumerate(_WORDS)}, **ROLE_TOKEN_IDS}

# ChatML turns, one placeholder per media block (vision wrapped in <|vision_start|>/<|vision_end|>,
# audio in <|audio_start|>/<|audio_end|>): the Qwen3-Omni layout, as omni_jax.processing expects.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'audio' %}{{- '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{%- elif content['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}"
    "{%- else %}{{- raise_exception('unknown content type ' + content['type']) }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

IMAGE_SIZE = 64  # one 4x4 grid of 16-pixel patches after smart_resize: 4 LLM tokens
SAMPLE_RATE = 16_000
NUM_CODE_GROUPS = 4  # the tiny talker's num_code_groups
CODEBOOK_SIZE = 32  # the tiny code predictor's vocabulary
CODE_FRAMES = 8

# Seven segments: a top, b top right, c bottom right, d bottom, e bottom left, f top left, g middle.
_SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc",
    5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


# --------------------------------------------------------------------------------------- media
def digit_frequency(digit: int) -> float:
    """The tone's pitch in Hz for `digit`: 400 Hz * 2**(digit / 3) (400 Hz .. 3.2 kHz)."""
    return 400.0 * 2.0 ** (digit / 3.0)


def digit_codes(digit: int, frames: int = CODE_FRAMES, groups: int = NUM_CODE_GROUPS,
                codebook: int = CODEBOOK_SIZE) -> list[list[int]]:
    """A fixed codec-id pattern per digit, frame-major (frames, groups): speech targets for the talker
    (codebook 0) and the code predictor (codebooks 1..groups-1). Not real speech."""
    return [[(5 * digit + 3 * f + 7 * g + digit * f) % codebook for g in range(groups)] for f in range(frames)]


def draw_digit(digit: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size, 3): a seven-segment `digit`, light on dark, at a random place and stroke."""
    bg = int(rng.integers(0, 60))
    fg = int(rng.integers(180, 256))
    img = np.full((size, size), bg, np.float32)
    w, h = int(rng.integers(22, 31)), int(rng.integers(40, 53))  # digit box
    t = int(rng.integers(4, 8))  # stroke
    x0 = int(rng.integers(2, size - w - 1))
    y0 = int(rng.integers(2, size - h - 1))
    mid = y0 + h // 2
    boxes = {
        "a": (y0, y0 + t, x0, x0 + w),
        "d": (y0 + h - t, y0 + h, x0, x0 + w),
        "g": (mid - t // 2, mid - t // 2 + t, x0, x0 + w),
        "f": (y0, mid, x0, x0 + t),
        "b": (y0, mid, x0 + w - t, x0 + w),
        "e": (mid, y0 + h, x0, x0 + t),
        "c": (mid, y0 + h, x0 + w - t, x0 + w),
    }
    for seg in _SEGMENTS[int(digit)]:
        y_a, y_b, x_a, x_b = boxes[seg]
        img[y_a:y_b, x_a:x_b] = fg
    img += rng.normal(0.0, 8.0, img.shape)
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def tone_digit(digit: int, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 (samples,): 0.8-1.2 s of the digit's pitch (+-3 %), a soft octave harmonic, noise."""
    seconds = float(rng.uniform(0.8, 1.2))
    f = digit_frequency(digit) * float(rng.uniform(0.97, 1.03))
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    amp = float(rng.uniform(0.3, 0.6))
    sig = amp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    sig += 0.25 * amp * np.sin(2 * np.pi * 2 * f * t)
    ramp = np.minimum(1.0, np.minimum(t, seconds - t) / 0.02)  # 20 ms fades: no clicks
    sig = sig * ramp + rng.normal(0.0, 0.01, n)
    return sig.astype(np.float32)


# ---------------------------------------------------------------------------------- text assets
def build_tokenizer():
    """A `tokenizers` WordLevel tokenizer over the task's words whose special tokens and role words have
    exactly the tiny preset's ids; lower-cased; newlines are tokens, other whitespace separates words."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = dict(WORD_TOKEN_IDS)
    vocab.update(SPECIAL_TOKEN_IDS)
    ids = sorted(vocab.values())
    if len(set(ids)) != len(ids) or ids[-1] >= 512:
        raise AssertionError("synthetic vocabulary ids collide or exceed the tiny vocabulary")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # special tokens are matched before normalisation
    # Keep "\n", words and single punctuation marks; drop other whitespace (Whitespace's rule + "\n").
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKEN_IDS])
    for s, i in SPECIAL_TOKEN_IDS.items():
        if tok.token_to_id(s) != i:
            raise AssertionError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def write_text_assets(out_dir: str) -> str:
    """Writes tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json and
    generation_config.json (greedy) to `out_dir`; returns `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    extra = dict(
        image_token="<|image_pad|>", audio_token="<|audio_pad|>", video_token="<|video_pad|>",
        vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>",
        audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>",
    )
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "extra_special_tokens": extra, "model_max_length": 4096,
    })
    # The Qwen3-Omni image settings, with max_pixels small: the task's pictures are 64x64 anyway.
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136, "max_pixels": 64 * 64 * 4,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "feature_size": 128, "sampling_rate": SAMPLE_RATE, "hop_length": 160, "n_fft": 400,
    })
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "do_sample": False, "eos_token_id": SPECIAL_TOKEN_IDS["<|im_end|>"],
        "pad_token_id": SPECIAL_TOKEN_IDS["<|endoftext|>"],
    })
    return out_dir


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# ---------------------------------------------------------------------------------------- task
def _example(split: str, index: int, kind: str, digit: int, rng: np.random.Generator, media_dir: str) -> dict:
    import soundfile
    from PIL import Image

    name = f"{split}-{index:05d}"
    if kind == "image":
        rel = f"media/{name}.png"
        Image.fromarray(draw_digit(digit, rng)).save(os.path.join(media_dir, f"{name}.png"))
        content = [{"type": "image", "image": rel}, {"type": "text", "text": IMAGE_QUESTION}]
    else:
        rel = f"media/{name}.wav"
        soundfile.write(os.path.join(media_dir, f"{name}.wav"), tone_digit(digit, rng), SAMPLE_RATE, subtype="PCM_16")
        content = [{"type": "audio", "audio": rel}, {"type": "text", "text": AUDIO_QUESTION}]
    return {"id": name, "messages": [{"role": "user", "content": content}], "kind": kind, "digit": digit}


def write_synthetic_task(out_dir: str, num_train: int = 2000, num_eval: int = 100, seed: int = 0,
                         kinds: tuple[str, ...] = ("image", "audio"), speech_targets: bool = True) -> dict:
    """Generates the task into `out_dir` (see the module docstring); deterministic given `seed`.

    Digits and kinds are balanced (example i has digit i % 10 and kind (i // 10) % len(kinds), then
    the order is shuffled). Returns the paths: {"root", "train", "eval", "tokenizer", "media", "task"}.
    """
    for k in kinds:
        if k not in ("image", "audio"):
            raise ValueError(f"unknown kind {k!r}; expected 'image' or 'audio'")
    if num_train < 0 or num_eval < 0:
        raise ValueError("num_train and num_eval must be >= 0")
    out_dir = os.path.abspath(out_dir)
    media_dir = os.path.join(out_dir, "media")
    os.makedirs(media_dir, exist_ok=True)
    write_text_assets(out_dir)
    rng = np.random.default_rng(seed)
    paths = {"root": out_dir, "train": os.path.join(out_dir, "train.jsonl"), "eval": os.path.join(out_dir, "eval.jsonl"),
             "tokenizer": out_dir, "media": media_dir, "task": os.path.join(out_dir, "task.json")}
    for split, count in (("train", num_train), ("eval", num_eval)):
        plan = [(i % 10, kinds[(i // 10) % len(kinds)]) for i in range(count)]
        order = rng.permutation(count)
        with open(paths[split], "w") as f:
            for index, j in enumerate(order):
                digit, kind = plan[j]
                ex = _example(split, index, kind, digit, rng, media_dir)
                word = DIGIT_WORDS[digit]
                if split == "train":
                    row = {"id": ex["id"], "messages": ex["messages"], "target": word}
                    if speech_targets:
                        row["target_codes"] = digit_codes(digit)
                        row["speaker"] = "ethan"
                else:
                    row = {"id": ex["id"], "messages": ex["messages"], "answer": word}
                row.update(kind=kind, digit=digit)
                f.write(json.dumps(row) + "\n")
    _write_json(paths["task"], {
        "task": "which digit? (seven-segment image or pitch-coded tone)", "seed": seed,
        "num_train": num_train, "num_eval": num_eval, "kinds": list(kinds), "answers": list(DIGIT_WORDS),
        "tone_hz": [round(digit_frequency(d), 2) for d in range(10)], "image_size": IMAGE_SIZE,
        "speech_targets": speech_targets, "code_frames": CODE_FRAMES, "code_groups": NUM_CODE_GROUPS,
    })
    return paths


def score(eval_path: str, results_path: str) -> dict:
    """Accuracy of infer.py results against eval.jsonl answers: the first word of the generated text must
    be the answer. Returns {"accuracy", "correct", "total", "by_kind": {kind: accuracy}, "errors"}."""
    with open(eval_path) as f:
        expected = {r["id"]: r for r in (json.loads(line) for line in f if line.strip())}
    with open(results_path) as f:
        results = {r["id"]: r for r in (json.loads(line) for line in f if line.strip())}
    correct, by_kind, errors = 0, {}, 0
    for rid, ex in expected.items():
        r = results.get(rid, {})
        if "error" in r or rid not in results:
            errors += 1
        words = str(r.get("text", "")).strip().split()
        ok = bool(words) and words[0].strip(".,!?").lower() == ex["answer"]
        correct += ok
        hit, n = by_kind.get(ex.get("kind", "all"), (0, 0))
        by_kind[ex.get("kind", "all")] = (hit + ok, n + 1)
    total = len(expected)
    return {"accuracy": correct / max(total, 1), "correct": correct, "total": total,
            "by_kind": {k: h / n for k, (h, n) in by_kind.items()}, "errors": errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The embedded synthetic digit task: write it, or score infer.py results.")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="generate the task into OUT_DIR")
    w.add_argument("out_dir")
    w.add_argument("--num-train", type=int, default=2000)
    w.add_argument("--num-eval", type=int, default=100)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--no-speech-targets", action="store_true", help="leave out target_codes")
    s = sub.add_parser("score", help="accuracy of an infer.py results.jsonl against eval.jsonl")
    s.add_argument("eval_jsonl")
    s.add_argument("results_jsonl")
    args = p.parse_args(argv)
    if args.cmd == "write":
        paths = write_synthetic_task(args.out_dir, args.num_train, args.num_eval, args.seed,
                                     speech_targets=not args.no_speech_targets)
        print(json.dumps(paths, indent=2))
    else:
        print(json.dumps(score(args.eval_jsonl, args.results_jsonl), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
