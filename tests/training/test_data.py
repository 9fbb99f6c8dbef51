"""The grain data pipeline: determinism, process shards, exact resume, bad lines, labels, bucketing, workers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
import pytest

from omni_jax.config import preset
from omni_jax.positions import position_ids_for_inputs
from omni_jax.processing import load_text_assets, process_messages
from omni_jax.training import synthetic
from omni_jax.training.data import IGNORE_INDEX, BadExampleError, DataConfig, make_iterator

NUM_TRAIN = 24


@pytest.fixture(scope="module")
def config():
    return preset("tiny")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return synthetic.write_synthetic_task(str(tmp_path_factory.mktemp("digits")), num_train=NUM_TRAIN, num_eval=2,
                                          seed=1)


@pytest.fixture(scope="module")
def assets(task):
    return load_text_assets(task["tokenizer"])


def data_cfg(task, **kw):
    base = dict(manifest=task["train"], tokenizer=task["tokenizer"], batch_size=4, seq_buckets=(32, 48, 64),
                speech_targets=True)
    base.update(kw)
    return DataConfig(**base)


def take(it, n):
    out = []
    for _ in range(n):
        out.append((next(it), list(it.last_batch_lines)))
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (x, lx), (y, ly) in zip(a, b):
        assert lx == ly
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def manifest_rows(task):
    with open(task["train"]) as f:
        return [json.loads(line) for line in f]


def test_same_seed_same_batches_other_seed_other_order(task, config):
    a = take(make_iterator(data_cfg(task), None, config), 3)
    b = take(make_iterator(data_cfg(task), None, config), 3)
    assert_same_batches(a, b)
    c = take(make_iterator(data_cfg(task, seed=7), None, config), 3)
    assert [lines for _, lines in a] != [lines for _, lines in c]
    # Each epoch is a permutation of the manifest, a different one in the next epoch.
    it = make_iterator(data_cfg(task, batch_size=6), None, config)
    epochs = [sum((lines for _, lines in take(it, NUM_TRAIN // 6)), []) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(1, NUM_TRAIN + 1))
    assert epochs[0] != epochs[1]


def test_processes_read_disjoint_shares(task, config):
    lines = []
    for index in range(2):
        it = make_iterator(data_cfg(task, num_epochs=1), None, config, process_index=index, process_count=2)
        got = [ln for _, batch_lines in take(it, NUM_TRAIN // 4) for ln in batch_lines]
        assert it.local_batch_size == 2 and len(got) == NUM_TRAIN // 2
        with pytest.raises(StopIteration):
            next(it)
        lines.append(got)
    assert not set(lines[0]) & set(lines[1])
    assert sorted(lines[0] + lines[1]) == list(range(1, NUM_TRAIN + 1))


def test_resume_mid_epoch_gives_the_next_batches(task, config):
    # 24 examples, 5 per batch: batches 2..6 cross the epoch boundary after the state is taken.
    cfg = data_cfg(task, batch_size=5)
    it = make_iterator(cfg, None, config)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 4)
    resumed = make_iterator(cfg, None, config)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), expected)
    assert resumed.stats == it.stats
    with pytest.raises(ValueError, match="seed"):
        make_iterator(data_cfg(task, batch_size=5, seed=3), None, config).set_state(state)


def test_labels_are_the_answer_and_im_end_after_the_inference_prompt(task, config, assets):
    rows = {i + 1: r for i, r in enumerate(manifest_rows(task))}
    it = make_iterator(data_cfg(task), None, config)
    batch = next(it)
    im_end = config.im_end_token_id
    for r, line in enumerate(it.last_batch_lines):
        ids, mask, labels = batch["input_ids"][r], batch["attention_mask"][r], batch["labels"][r]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padded
        answer = assets.tokenizer.encode(rows[line]["target"], add_special_tokens=False).ids + [im_end]
        where = np.nonzero(labels != IGNORE_INDEX)[0]
        # labels[t] = ids[t + 1] exactly on the answer tokens and the final <|im_end|>
        assert labels[where].tolist() == answer
        assert (labels[where] == ids[where + 1]).all()
        assert where[-1] == n - 2 and ids[n - 1] == im_end and len(where) == len(answer)
        # What precedes the answer is the inference prompt, token for token (media paths resolved).
        messages = rows[line]["messages"]
        for block in messages[0]["content"]:
            for key in ("image", "audio"):
                if key in block:
                    block[key] = os.path.join(task["root"], block[key])
        prompt = process_messages([messages], assets, image_settings=it._processor.image_settings)
        assert ids[: where[0] + 1].tolist() == prompt["input_ids"][0].tolist()


def test_batch_positions_media_and_speech_targets(task, config):
    rows = {i + 1: r for i, r in enumerate(manifest_rows(task))}
    it = make_iterator(data_cfg(task, batch_size=8), None, config)
    batch = next(it)
    kinds = [rows[ln]["kind"] for ln in it.last_batch_lines]
    assert "image" in kinds and "audio" in kinds
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * kinds.count("image")
    assert batch["pixel_values"].shape == (16 * kinds.count("image"), 1536)
    assert batch["input_features"].shape[0] == kinds.count("audio")
    # Host positions = the reference rope index over the whole batch (media in row order).
    ref, _ = position_ids_for_inputs(batch["input_ids"], batch["attention_mask"], config, **{
        k: batch[k] for k in ("image_grid_thw", "feature_attention_mask") if k in batch})
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(batch["position_ids"][:, real], ref[:, real])
    assert batch["position_ids"].dtype == np.float32 and batch["position_ids"].shape == (3, 8, 48)
    # Speech targets: the digit's code pattern, frames bucketed to 16, Ethan's codec id.
    assert batch["codec_ids"].shape == (8, 16, 4) and batch["codec_ids"].dtype == np.int32
    for r, line in enumerate(it.last_batch_lines):
        np.testing.assert_array_equal(batch["codec_ids"][r, :8], synthetic.digit_codes(rows[line]["digit"]))
        assert batch["codec_mask"][r].tolist() == [1] * 8 + [0] * 8
    assert batch["speaker_ids"].tolist() == [dict(config.talker_config.speaker_id)["ethan"]] * 8


def _write_manifest(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def _text_line(words: int, target="seven"):
    text = " ".join(["digit"] * words)
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}], "target": target}


def test_bucketing_picks_the_smallest_bucket_and_skips_or_fails_too_long(task, config, tmp_path, caplog):
    # Lengths: 10 chat tokens (<|im_start|> user \n ... <|im_end|> \n <|im_start|> assistant \n seven <|im_end|>) + words.
    manifest = _write_manifest(tmp_path / "m.jsonl", [_text_line(2), _text_line(3), _text_line(30), _text_line(9)])
    cfg = DataConfig(manifest=manifest, tokenizer=task["tokenizer"], batch_size=1, seq_buckets=(16, 24, 32),
                     shuffle=False, num_epochs=1)
    it = make_iterator(cfg, None, config)
    with caplog.at_level(logging.WARNING, logger="omni_jax.training.data"):
        shapes = [(b["input_ids"].shape[1], int(b["attention_mask"].sum())) for b in it]
    assert shapes == [(16, 12), (16, 13), (24, 19)]  # line 3 (40 tokens) is too long
    assert it.stats["skipped"] == {"too_long": 1}
    assert any(f"{manifest}:3: too_long" in r.getMessage() for r in caplog.records)
    # A batch takes the bucket of its longest row.
    cfg2 = DataConfig(manifest=manifest, tokenizer=task["tokenizer"], batch_size=2, seq_buckets=(16, 24, 32),
                      shuffle=False, num_epochs=1, drop_remainder=False)
    assert [b["input_ids"].shape for b in make_iterator(cfg2, None, config)] == [(2, 16), (2, 24)]
    with pytest.raises(BadExampleError, match=r"m\.jsonl:3: too_long"):
        list(make_iterator(dataclasses.replace(cfg, on_bad_example="fail"), None, config))


def test_bad_lines_are_counted_with_their_line_or_fatal(task, config, tmp_path, caplog):
    good = manifest_rows(task)[0]
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF not really a wav")
    bad_media = dict(good, messages=[{"role": "user", "content": [
        {"type": "audio", "audio": "corrupt.wav"}, {"type": "text", "text": "which digit?"}]}])
    missing = dict(good, messages=[{"role": "user", "content": [{"type": "image", "image": "nowhere.png"}]}])
    for row in (good, bad_media, missing):
        for block in row["messages"][0]["content"]:
            for key in ("image", "audio"):
                if key in block and block[key].startswith("media/"):
                    block[key] = os.path.join(task["root"], block[key])
    lines = [good, "{not json", {"messages": good["messages"]}, missing, bad_media, good]
    manifest = _write_manifest(tmp_path / "bad.jsonl", lines)
    cfg = DataConfig(manifest=manifest, tokenizer=task["tokenizer"], batch_size=2, seq_buckets=(64,), shuffle=False,
                     num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="omni_jax.training.data"):
        it = make_iterator(cfg, None, config)
        batches = list(it)
    assert len(batches) == 1 and it.last_batch_lines == [1, 6]
    assert it.stats["skipped"] == {"bad_json": 1, "missing_key": 1, "missing_media": 1, "bad_media": 1}
    messages = " | ".join(r.getMessage() for r in caplog.records)
    for line, what in ((2, "malformed JSON"), (3, "missing key"), (4, "nowhere.png"), (5, "corrupt.wav")):
        assert f"bad.jsonl:{line}: " in messages and what in messages
    fail = dataclasses.replace(cfg, on_bad_example="fail")
    with pytest.raises(BadExampleError, match=r"bad\.jsonl:2: malformed JSON"):
        make_iterator(fail, None, config)
    manifest2 = _write_manifest(tmp_path / "bad2.jsonl", [good, bad_media])
    with pytest.raises(BadExampleError, match=r"bad2\.jsonl:2: bad_media: .*corrupt\.wav"):
        next(make_iterator(dataclasses.replace(fail, manifest=manifest2), None, config))


def test_two_workers_give_the_batches_of_one_and_resume_across_worker_counts(task, config):
    single = make_iterator(data_cfg(task), None, config)
    expected = take(single, 4)
    with make_iterator(data_cfg(task, num_workers=2, prefetch=2), None, config) as multi:
        got = take(multi, 2)
        state = multi.get_state()
    assert_same_batches(got, expected[:2])
    resumed = make_iterator(data_cfg(task), None, config)  # no workers now
    resumed.set_state(json.loads(json.dumps(state)))
    assert_same_batches(take(resumed, 2), expected[2:])
