"""Training data: a JSONL manifest -> deterministic, sharded, resumable batches, with grain.

Manifest: one JSON object per line,

    {"id": "ex-1",
     "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                               {"type": "text", "text": "What is drawn?"}]}],
     "target": "a cat",                          # the assistant's answer (text)
     "target_codes": [[c0, c1, ..., c_G-1], ...] # optional: codec ids of the spoken answer, frame-major
     "speaker": "ethan",                         # optional: the talker voice for target_codes
     "use_audio_in_video": false}                # optional; must equal DataConfig.use_audio_in_video

`messages` is `infer.py`'s request format (media paths relative to the manifest's folder). An
example is processed by the inference code (`omni_jax.processing.process_messages`) on
`messages + [{"role": "assistant", "content": target}]` without a generation prompt; `labels` mark
the answer's tokens and its `<|im_end|>` (whatever follows is cut). The prompt part is checked to be
token-for-token what inference feeds the model (the chat template rendered with
`add_generation_prompt=True`), so training and inference see the same prefix.

Pipeline (grain): manifest records -> shuffle(seed) (a new permutation each epoch) -> repeat(num_epochs)
-> this process's share `[process_index::process_count]` -> map(process one example) -> optional
`mp_prefetch` worker processes -> batching in the calling process. Batching takes the next
`batch_size / process_count` usable examples and right-pads them to the smallest of `seq_buckets`
that holds the longest (length bucketing: one compilation per bucket). Everything is a pure function
of (manifest, seed, position in the stream), so `num_workers` does not change the batches, and the
iterator state is just the number of stream elements consumed: `get_state()` is a small JSON dict
and `set_state()` restarts the stream exactly at the next batch (also with a different num_workers).

Bad examples are never silent: a malformed JSON line, a missing key, a missing media file, an
unreadable medium, an example longer than the largest bucket, ... is logged as a warning naming
the manifest line and counted in `stats` (`on_bad_example="skip"`), or raises `BadExampleError`
with the line (`"fail"`). Manifest-level problems (JSON, keys, missing files) are found when the
iterator is made and counted once; processing problems each time the example comes round.

Batch (numpy; B = batch_size / process_count rows, S = the bucket):
    input_ids (B, S) int32, attention_mask (B, S) int32, labels (B, S) int32 (-100 = no loss;
    labels[t] = input_ids[t + 1] inside the answer), position_ids (3, B, S) float32 (TM-RoPE, 0 on
    padding), the processor's media keys for the batch's media (rows in order, audio features zero-
    padded to the batch's longest clip: `input_features`, `feature_attention_mask`, `pixel_values`,
    `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, `video_second_per_grid`,
    `use_audio_in_video`), and with `speech_targets`: `codec_ids` (B, F, G) int32, `codec_mask`
    (B, F) int32 (F from `codec_buckets`; rows without target codes are all-masked) and
    `speaker_ids` (B,) int32 (talker codec ids of the voices).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from omni_jax.positions import position_ids_for_inputs

__all__ = ["DataConfig", "BadExampleError", "TrainIterator", "make_iterator", "read_manifest", "process_example",
           "MEDIA_KEYS", "IGNORE_INDEX"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MEDIA_KEYS = (
    "input_features", "feature_attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
    "video_grid_thw", "video_second_per_grid",
)
_MEDIA_TYPES = ("audio", "image", "video")
STATE_VERSION = 1


class BadExampleError(ValueError):
    """A manifest line that cannot be used, with `on_bad_example="fail"` (the message names the line)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data settings (the `data:` section of a training YAML).

    manifest: the JSONL file (required). tokenizer: folder with tokenizer.json + chat template (and
    preprocessor_config.json for image settings); default: the `assets` given to `make_iterator`.
    batch_size: the GLOBAL batch (rows over all processes; each process makes batch_size /
    process_count). seq_buckets: padded lengths, ascending. num_epochs None = repeat forever.
    num_workers: grain worker processes (0 = process in the calling process); batches do not depend
    on it. read_threads / prefetch: threads processing examples (in each worker) and how many
    examples they may run ahead (per worker). on_bad_example: "skip" (warn, count) or "fail" (raise). drop_remainder: with finite epochs,
    drop a last partial batch (else it is padded with empty, all-masked rows). speech_targets:
    emit codec_ids / codec_mask / speaker_ids from `target_codes` (frames padded to codec_buckets).
    """

    manifest: str | None = None
    tokenizer: str | None = None
    batch_size: int = 8
    seq_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    num_workers: int = 0
    read_threads: int = 2
    prefetch: int = 8
    on_bad_example: str = "skip"
    drop_remainder: bool = True
    speech_targets: bool = False
    codec_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    default_speaker: str = "ethan"
    use_audio_in_video: bool = False

    def __post_init__(self):
        object.__setattr__(self, "seq_buckets", tuple(int(b) for b in self.seq_buckets))
        object.__setattr__(self, "codec_buckets", tuple(int(b) for b in self.codec_buckets))
        if self.on_bad_example not in ("skip", "fail"):
            raise ValueError(f"data.on_bad_example={self.on_bad_example!r}; expected 'skip' or 'fail'")
        for name in ("seq_buckets", "codec_buckets"):
            b = getattr(self, name)
            if not b or any(x < 1 for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"data.{name}={b}: expected distinct positive lengths in ascending order")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} must be >= 1")
        if self.num_workers < 0 or self.read_threads < 1 or self.prefetch < 1:
            raise ValueError("data.num_workers must be >= 0, data.read_threads and data.prefetch >= 1")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"data.num_epochs={self.num_epochs} must be >= 1 (or null: repeat forever)")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed={self.seed} must be in [0, 2**32)")


# ------------------------------------------------------------------------------------------ manifest
def _fail_or_warn(message: str, fail: bool) -> None:
    if fail:
        raise BadExampleError(message)
    log.warning("%s (skipped)", message)


def _resolve_messages(messages, base_dir: str, where: str) -> tuple[list, list[str]]:
    """Messages with local media paths made absolute (relative to `base_dir`); missing files raise
    FileNotFoundError naming the file. Returns (messages, media files)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {'role': ..., 'content': ...} messages")
    resolved, files = [], []
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message #{m} must be a dict with 'role' and 'content'")
        content = message["content"]
        if isinstance(content, str):
            resolved.append(dict(message))
            continue
        if not isinstance(content, list):
            raise ValueError(f"message #{m}: 'content' must be a string or a list of content blocks")
        blocks = []
        for b, block in enumerate(content):
            if not isinstance(block, dict) or "type" not in block:
                raise ValueError(f"message #{m}, block #{b}: content blocks must be dicts with a 'type'")
            if block["type"] in _MEDIA_TYPES:
                block = dict(block)
                for key in (block["type"], "path", "url"):
                    value = block.get(key)
                    if not isinstance(value, str) or value.startswith(("http://", "https://", "data:")):
                        continue
                    name = value[len("file://"):] if value.startswith("file://") else value
                    full = os.path.normpath(os.path.join(base_dir, os.path.expanduser(name)))
                    if not os.path.exists(full):
                        raise FileNotFoundError(f"{block['type']} file {value!r} does not exist (looked for {full})")
                    files.append(full)
                    block[key] = full
                    break
            blocks.append(block)
        resolved.append(dict(message, content=blocks))
    return resolved, files


def read_manifest(path: str, cfg: DataConfig, model_config) -> tuple[list[dict], dict[str, int]]:
    """Parses and checks the manifest. Returns (records, {reason: count} of the lines left out).

    A record: {"line", "id", "messages" (absolute media paths), "target", "codes" (list or None),
    "speaker_id" (int or None)}. Bad lines warn (skip) or raise BadExampleError (fail), naming the line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data manifest {path!r} does not exist")
    fail = cfg.on_bad_example == "fail"
    base = os.path.dirname(os.path.abspath(path))
    tc = model_config.talker_config if cfg.speech_targets else None
    if cfg.speech_targets and tc is None:
        raise ValueError("data.speech_targets needs a model with a talker (talker_config is None)")
    speakers = dict(tc.speaker_id) if tc is not None else {}
    groups = tc.num_code_groups if tc is not None else 0
    codebook = tc.code_predictor_config.vocab_size if tc is not None else 0
    records, bad = [], {}
    with open(path) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(raw)
            except ValueError as e:
                bad["bad_json"] = bad.get("bad_json", 0) + 1
                _fail_or_warn(f"{where}: malformed JSON line: {e}", fail)
                continue
            reason, message, record = _check_record(obj, base, cfg, speakers, groups, codebook)
            if reason is not None:
                bad[reason] = bad.get(reason, 0) + 1
                _fail_or_warn(f"{where}: {message}", fail)
                continue
            record["line"] = number
            record.setdefault("id", f"line-{number}")
            records.append(record)
    return records, bad


def _check_record(obj, base, cfg: DataConfig, speakers: dict, groups: int, codebook: int):
    """(None, None, record) or (reason, message, None)."""
    if not isinstance(obj, dict):
        return "bad_json", f"a manifest line must be a JSON object, got {type(obj).__name__}", None
    missing = [k for k in ("messages", "target") if k not in obj]
    if missing:
        return "missing_key", f"missing key(s) {missing} (a line needs 'messages' and 'target')", None
    if not isinstance(obj["target"], str) or not obj["target"]:
        return "bad_target", f"'target' must be a non-empty string, got {obj['target']!r}", None
    uav = obj.get("use_audio_in_video", cfg.use_audio_in_video)
    if not isinstance(uav, bool) or uav != cfg.use_audio_in_video:
        return ("bad_messages", f"use_audio_in_video={uav!r} differs from data.use_audio_in_video="
                f"{cfg.use_audio_in_video} (one setting per run)", None)
    try:
        messages, _ = _resolve_messages(obj["messages"], base, "")
    except FileNotFoundError as e:
        return "missing_media", str(e), None
    except ValueError as e:
        return "bad_messages", str(e), None
    record = {"id": str(obj["id"]) if "id" in obj else None, "messages": messages, "target": obj["target"],
              "codes": None, "speaker_id": None}
    if record["id"] is None:
        del record["id"]
    if cfg.speech_targets and obj.get("target_codes") is not None:
        codes = obj["target_codes"]
        ok = (isinstance(codes, list) and codes and all(
            isinstance(fr, list) and len(fr) == groups and all(isinstance(c, int) and 0 <= c < codebook for c in fr)
            for fr in codes))
        if not ok:
            return ("bad_target_codes", f"'target_codes' must be a non-empty list of frames of {groups} ints in "
                    f"[0, {codebook})", None)
        name = str(obj.get("speaker") or cfg.default_speaker).lower()
        if name not in speakers:
            return "bad_speaker", f"unknown speaker {name!r}; valid speakers: {', '.join(sorted(speakers))}", None
        record["codes"] = codes
        record["speaker_id"] = int(speakers[name])
    return None, None, record


# ------------------------------------------------------------------------------------------ examples
class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def process_example(record: dict, assets, model_config, *, image_settings=None, video_settings=None,
                    use_audio_in_video: bool = False, max_len: int | None = None) -> dict:
    """One manifest record -> {"input_ids" (L,) int32, "labels" (L,) int32, "position_ids" (3, L) float32,
    media keys (this example's, as process_messages returns them), "codes" (F, G) int32 or None,
    "speaker_id"}. Raises `_Skip` (reason, message) for an unusable example."""
    from omni_jax.processing import process_messages, render_chat_template
    from omni_jax.processing.audio import AudioLoadError
    from omni_jax.processing.image import ImageLoadError
    from omni_jax.processing.video import VideoLoadError

    tc = model_config.thinker_config
    messages = record["messages"]
    full = list(messages) + [{"role": "assistant", "content": record["target"]}]
    # The answer is what the template adds after the inference prompt; check the prompt is a prefix.
    prompt_text = render_chat_template([messages], assets.chat_template, True, special_tokens=assets.special_tokens)[0]
    full_text = render_chat_template([full], assets.chat_template, False, special_tokens=assets.special_tokens)[0]
    if not full_text.startswith(prompt_text):
        raise _Skip("template", "the chat template renders the conversation with the answer differently from the "
                    "inference prompt (the prompt is not a prefix); cannot place labels")
    suffix = assets.tokenizer.encode(full_text[len(prompt_text):], add_special_tokens=False).ids
    try:
        inputs = process_messages(
            [full], assets, use_audio_in_video=use_audio_in_video, image_settings=image_settings,
            video_settings=video_settings, add_generation_prompt=False, n_window=tc.audio_config.n_window,
            position_id_per_seconds=float(tc.position_id_per_seconds),
        )
    except (AudioLoadError, ImageLoadError, VideoLoadError, FileNotFoundError) as e:
        raise _Skip("bad_media", str(e)) from None
    ids = np.asarray(inputs["input_ids"][0], np.int64)
    n = len(ids)
    start = n - len(suffix)
    if not suffix or start < 1 or ids[start:].tolist() != list(suffix):
        raise _Skip("template", "the answer tokenizes differently inside the conversation than alone (a token "
                    "spans the prompt/answer boundary); cannot place labels")
    ends = np.nonzero(ids[start:] == model_config.im_end_token_id)[0]
    if not len(ends):
        raise _Skip("template", f"no <|im_end|> (id {model_config.im_end_token_id}) after the answer")
    end = start + int(ends[0])  # index of the answer's <|im_end|>; later tokens are not trained on
    length = end + 1
    if max_len is not None and length > max_len:
        raise _Skip("too_long", f"{length} tokens, longer than the largest sequence bucket {max_len}")
    ids = ids[:length]
    labels = np.full(length, IGNORE_INDEX, np.int32)
    labels[start - 1 : end] = ids[start : end + 1]  # position t predicts token t + 1
    media = {k: np.asarray(inputs[k]) for k in MEDIA_KEYS if k in inputs}
    positions, _ = position_ids_for_inputs(
        ids[None], np.ones((1, length), np.int64), model_config,
        **media, use_audio_in_video=bool(inputs.get("use_audio_in_video", False)),
    )
    codes = None if record.get("codes") is None else np.asarray(record["codes"], np.int32)
    return {"input_ids": ids.astype(np.int32), "labels": labels, "position_ids": positions[:, 0].astype(np.float32),
            "media": media, "codes": codes, "speaker_id": record.get("speaker_id")}


class _Processor:
    """The grain map function (picklable: it runs in the worker processes)."""

    def __init__(self, assets, model_config, image_settings, video_settings, cfg: DataConfig):
        self.assets, self.model_config = assets, model_config
        self.image_settings, self.video_settings = image_settings, video_settings
        self.use_audio_in_video = cfg.use_audio_in_video
        self.max_len = cfg.seq_buckets[-1]
        self.max_frames = cfg.codec_buckets[-1] if cfg.speech_targets else None

    def __call__(self, record: dict) -> dict:
        line = record["line"]
        try:
            ex = process_example(record, self.assets, self.model_config, image_settings=self.image_settings,
                                 video_settings=self.video_settings, use_audio_in_video=self.use_audio_in_video,
                                 max_len=self.max_len)
            if self.max_frames is not None and ex["codes"] is not None and len(ex["codes"]) > self.max_frames:
                raise _Skip("too_long", f"{len(ex['codes'])} codec frames, more than the largest codec bucket "
                            f"{self.max_frames}")
        except _Skip as e:
            return {"skip": e.reason, "line": line, "message": str(e)}
        except Exception as e:  # noqa: BLE001 - reported with the line by the consumer, never silent
            return {"skip": "processing", "line": line, "message": f"{type(e).__name__}: {e}"}
        ex["line"] = line
        return ex


# ------------------------------------------------------------------------------------------ batches
def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def collate(examples: list[dict], rows: int, seq_buckets, pad_id: int, *, speech_targets: bool = False,
            codec_buckets=(16,), groups: int = 0, default_speaker_id: int = 0,
            use_audio_in_video: bool = False) -> dict:
    """Right-pads processed examples into a batch of `rows` rows (rows past the examples are empty)."""
    s = _bucket(max(len(e["input_ids"]) for e in examples), tuple(seq_buckets))
    ids = np.full((rows, s), pad_id, np.int32)
    mask = np.zeros((rows, s), np.int32)
    labels = np.full((rows, s), IGNORE_INDEX, np.int32)
    positions = np.zeros((3, rows, s), np.float32)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n] = e["input_ids"]
        mask[r, :n] = 1
        labels[r, :n] = e["labels"]
        positions[:, r, :n] = e["position_ids"]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
    from omni_jax.processing.batching import concat_media  # noqa: PLC0415

    batch.update(concat_media([e["media"] for e in examples if e["media"]]))
    if "pixel_values_videos" in batch:
        batch["use_audio_in_video"] = bool(use_audio_in_video)
    if speech_targets:
        with_codes = [e["codes"] for e in examples if e["codes"] is not None]
        f = _bucket(max((len(c) for c in with_codes), default=1), tuple(codec_buckets))
        codec_ids = np.zeros((rows, f, groups), np.int32)
        codec_mask = np.zeros((rows, f), np.int32)
        speaker_ids = np.full((rows,), default_speaker_id, np.int32)
        for r, e in enumerate(examples):
            if e["codes"] is not None:
                codec_ids[r, : len(e["codes"])] = e["codes"]
                codec_mask[r, : len(e["codes"])] = 1
                speaker_ids[r] = e["speaker_id"]
        batch.update(codec_ids=codec_ids, codec_mask=codec_mask, speaker_ids=speaker_ids)
    return batch


def _mark_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags (profiling switches); a program that never parses absl
    # flags (ours) would get UnparsedFlagAccessError. Marking them parsed keeps their defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainIterator:
    """`next(it)` -> batch dict; `get_state()` / `set_state(state)`; `stats`; `close()`.

    `last_batch_lines`: the manifest line numbers of the last batch's rows (None for empty rows).
    """

    def __init__(self, cfg: DataConfig, records: list[dict], manifest_bad: dict, processor: _Processor,
                 pad_id: int, default_speaker_id: int, digest: str, process_index: int, process_count: int):
        self.cfg = cfg
        self._records = records
        self._processor = processor
        self._pad_id = pad_id
        self._default_speaker_id = default_speaker_id
        self._digest = digest
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = cfg.batch_size // process_count
        tc = processor.model_config.talker_config
        self._groups = tc.num_code_groups if (cfg.speech_targets and tc is not None) else 0
        self._manifest_bad = dict(manifest_bad)
        self._consumed = 0  # elements of this process's stream taken so far (usable or not)
        self._skipped: dict[str, int] = {}
        self._used = 0
        self._batches = 0
        self._iter = None
        self._exhausted = False
        self.last_batch_lines: list[int | None] = []

    # ------------------------------------------------------------------ stream
    def _dataset(self):
        import grain

        ds = grain.MapDataset.source(self._records)
        if self.cfg.shuffle:
            ds = ds.shuffle(seed=self.cfg.seed)  # reseeded with the epoch by repeat: a new order each epoch
        ds = ds.repeat(self.cfg.num_epochs)
        ds = ds[self.process_index :: self.process_count]
        ds = ds[self._consumed :]
        return ds.map(self._processor)

    def _start(self):
        import grain

        # grain's default read-ahead (16 threads, 500 examples) would process far more than is consumed.
        it = self._dataset().to_iter_dataset(grain.ReadOptions(num_threads=self.cfg.read_threads,
                                                               prefetch_buffer_size=self.cfg.prefetch))
        if self.cfg.num_workers > 0:
            _mark_absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.cfg.num_workers, per_worker_buffer_size=self.cfg.prefetch))
        self._iter = iter(it)

    def _next_example(self) -> dict:
        if self._iter is None:
            self._start()
        while True:
            ex = next(self._iter)  # StopIteration at the end of finite epochs
            self._consumed += 1
            if "skip" not in ex:
                return ex
            self._skipped[ex["skip"]] = self._skipped.get(ex["skip"], 0) + 1
            _fail_or_warn(f"{self.cfg.manifest}:{ex['line']}: {ex['skip']}: {ex['message']}",
                          self.cfg.on_bad_example == "fail")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._exhausted:
            raise StopIteration
        examples = []
        try:
            while len(examples) < self.local_batch_size:
                examples.append(self._next_example())
        except StopIteration:
            self._exhausted = True
            if not examples or self.cfg.drop_remainder:
                raise
        batch = collate(
            examples, self.local_batch_size, self.cfg.seq_buckets, self._pad_id,
            speech_targets=self.cfg.speech_targets, codec_buckets=self.cfg.codec_buckets, groups=self._groups,
            default_speaker_id=self._default_speaker_id, use_audio_in_video=self.cfg.use_audio_in_video,
        )
        self._used += len(examples)
        self._batches += 1
        self.last_batch_lines = [e["line"] for e in examples] + [None] * (self.local_batch_size - len(examples))
        return batch

    # ------------------------------------------------------------------ state
    @property
    def stats(self) -> dict:
        """{"examples_read": stream elements consumed, "examples_used": rows filled, "batches",
        "skipped": {reason: count} (manifest-level reasons counted once, processing ones each time),
        "manifest_records": usable manifest lines}."""
        skipped = dict(self._manifest_bad)
        for k, v in self._skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        return {"examples_read": self._consumed, "examples_used": self._used, "batches": self._batches,
                "skipped": skipped, "manifest_records": len(self._records)}

    def get_state(self) -> dict:
        """JSON-serialisable; `set_state` of it continues with exactly the next batch."""
        return {
            "version": STATE_VERSION, "consumed": self._consumed, "used": self._used, "batches": self._batches,
            "skipped": dict(self._skipped), "exhausted": self._exhausted,
            "process_index": self.process_index, "process_count": self.process_count,
            "seed": self.cfg.seed, "shuffle": self.cfg.shuffle, "num_epochs": self.cfg.num_epochs,
            "manifest_digest": self._digest,
        }

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}; expected {STATE_VERSION}")
        mine = self.get_state()
        for key in ("process_index", "process_count", "seed", "shuffle", "num_epochs", "manifest_digest"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume the data stream exactly: the saved state has {key}={state.get(key)!r}, this "
                    f"iterator {mine[key]!r} (the manifest, seed, shuffling, epochs and process layout must match)")
        self.close()
        self._consumed = int(state["consumed"])
        self._used = int(state["used"])
        self._batches = int(state["batches"])
        self._skipped = {str(k): int(v) for k, v in state["skipped"].items()}
        self._exhausted = bool(state.get("exhausted", False))

    def close(self) -> None:
        """Stops the worker processes (if any); the iterator restarts them on the next `next()`."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ------------------------------------------------------------------------------------------ entry point
def _load_assets(assets, cfg: DataConfig, image_settings, video_settings):
    from omni_jax.processing import TextAssets, VideoSettings, VisionSettings, load_text_assets

    if assets is None:
        assets = cfg.tokenizer
    if assets is None:
        raise ValueError("no tokenizer: set data.tokenizer (a folder with tokenizer.json and the chat template) or "
                         "pass assets to make_iterator")
    if isinstance(assets, (str, os.PathLike)):
        folder = os.fspath(assets)
        if image_settings is None and os.path.isdir(folder) and os.path.exists(
                os.path.join(folder, "preprocessor_config.json")):
            image_settings = VisionSettings.from_preprocessor_config(folder)
        assets = load_text_assets(folder)
    if not isinstance(assets, TextAssets):
        raise TypeError(f"assets must be TextAssets or a folder path, got {type(assets).__name__}")
    if not assets.chat_template:
        raise ValueError("the tokenizer assets have no chat template (chat_template.jinja / .json)")
    image_settings = image_settings or VisionSettings()
    video_settings = video_settings or VideoSettings.from_vision_settings(image_settings)
    return assets, image_settings, video_settings


def make_iterator(cfg: DataConfig, assets=None, model_config=None, *, process_index: int = 0,
                  process_count: int = 1, image_settings=None, video_settings=None) -> TrainIterator:
    """Builds this process's batch iterator.

    Args:
      cfg: DataConfig.
      assets: `omni_jax.processing.TextAssets`, or a folder with tokenizer.json + chat template (+
        preprocessor_config.json); None = `cfg.tokenizer`.
      model_config: the OmniConfig being trained (token ids, position settings, talker code groups).
      process_index, process_count: this process's share (`jax.process_index()`, `jax.process_count()`);
        `cfg.batch_size` must be divisible by process_count.
      image_settings, video_settings: processor settings (default: the assets folder's
        preprocessor_config.json, else Qwen3-Omni's).
    """
    if model_config is None:
        raise ValueError("make_iterator needs the model's OmniConfig (token ids and position settings)")
    if not cfg.manifest:
        raise ValueError("data.manifest is required (the JSONL training manifest)")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={cfg.batch_size} (global) is not divisible by {process_count} processes")
    assets, image_settings, video_settings = _load_assets(assets, cfg, image_settings, video_settings)
    records, bad = read_manifest(cfg.manifest, cfg, model_config)
    if not records:
        raise ValueError(f"{cfg.manifest}: no usable examples (left out: {bad or 'none; the file is empty'})")
    if bad:
        log.warning("%s: %d of %d manifest lines left out: %s", cfg.manifest, sum(bad.values()),
                    sum(bad.values()) + len(records), bad)
    with open(cfg.manifest, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    pad_id = assets.pad_token_id
    if pad_id is None:
        pad_id = assets.tokenizer.token_to_id(assets.special_tokens.get("pad_token", "<|endoftext|>"))
    default_speaker_id = 0
    if cfg.speech_targets:
        speakers = dict(model_config.talker_config.speaker_id)
        if cfg.default_speaker.lower() not in speakers:
            raise ValueError(f"data.default_speaker={cfg.default_speaker!r}; valid speakers: "
                             f"{', '.join(sorted(speakers))}")
        default_speaker_id = int(speakers[cfg.default_speaker.lower()])
    processor = _Processor(assets, model_config, image_settings, video_settings, cfg)
    return TrainIterator(cfg, records, bad, processor, int(pad_id or 0), default_speaker_id, digest,
                         process_index, process_count)


def batch_summary(batch: dict[str, Any]) -> dict[str, Any]:
    """Shapes and dtypes of a batch (for logs)."""
    return {k: (tuple(v.shape), str(v.dtype)) if hasattr(v, "shape") else v for k, v in batch.items()}
