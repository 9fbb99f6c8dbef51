"""The jitted train step on the tiny preset: overfitting, freezing, gradient accumulation, media row
groups, the talker stage, and the 8-device sharded step against one device.

Compilations are shared through module-level caches: one step for the overfit + freezing tests
(the default precision: fp32 master weights, bf16 compute), two fp32 steps for accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.config import preset
from omni_jax.nn.params import flatten
from omni_jax.training import forward as fwd_lib
from omni_jax.training.config import TrainConfig
from omni_jax.training.optimizer import decay_mask, learning_rate_schedule, trainable_paths
from omni_jax.training.step import init_params_for_training, make_train_step
from tests.distributed._multidevice import run_on_devices

FP32 = ["runtime.dtype=float32", "runtime.param_dtype=float32"]


def _text_batch(rows=4, seq=32, seed=0, lengths=(32, 27, 20, 30), answer_from=(10, 8, 12, 5)):
    """Right-padded rows of different lengths, labels (the data pipeline's shifted form) on each row's
    tail: micro-batches of this batch hold different numbers of label tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 400, (rows, seq)).astype(np.int32)
    mask = np.zeros((rows, seq), np.int32)
    labels = np.full((rows, seq), -100, np.int32)
    for r in range(rows):
        n = lengths[r % len(lengths)]
        start = answer_from[r % len(answer_from)]
        mask[r, :n] = 1
        ids[r, n:] = 0
        labels[r, start:n - 1] = ids[r, start + 1:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _with_audio(batch, config, rows_frames: dict):
    """`batch` with an audio clip (random log-mel of the given frame count) at the start of some rows."""
    from omni_jax.audio_encoder import audio_output_lengths

    c = config.thinker_config
    rng = np.random.default_rng(7)
    ids = batch["input_ids"].copy()
    frames = [rows_frames[r] for r in sorted(rows_frames)]
    feats = np.zeros((len(frames), 128, max(frames)), np.float32)
    fam = np.zeros((len(frames), max(frames)), np.int32)
    for i, (row, f) in enumerate(sorted(rows_frames.items())):
        n = int(audio_output_lengths(np.array([f]))[0])
        ids[row, : n + 2] = [c.audio_start_token_id] + [c.audio_token_id] * n + [c.audio_end_token_id]
        assert (batch["labels"][row, : n + 2] == -100).all()
        feats[i, :, :f] = rng.standard_normal((128, f))
        fam[i, :f] = 1
    return dict(batch, input_ids=ids, input_features=feats, feature_attention_mask=fam)


# ---------------------------------------------------------------------------------- cheap units
def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig.load(None, ["optim.lr=1.0", "optim.warmup_steps=4", "optim.min_lr_ratio=0.1", "max_steps=14"])
    lr = learning_rate_schedule(cfg.optim, cfg.total_steps)
    values = [float(lr(s)) for s in range(20)]
    np.testing.assert_allclose(values[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(values[4], 1.0, rtol=1e-6)  # cosine starts at the peak
    np.testing.assert_allclose(values[9], 0.1 + 0.9 * 0.5, rtol=1e-6)  # half way
    np.testing.assert_allclose(values[14:], [0.1] * 6, rtol=1e-6)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_weight_decay_mask_and_stage_patterns():
    from omni_jax.model import model_specs

    specs = model_specs(preset("tiny"))
    cfg = TrainConfig()
    paths = trainable_paths(specs, cfg)
    assert all(p.startswith("thinker/") for p in paths) and len(paths) == len(
        [p for p in flatten(specs) if p.startswith("thinker/")])
    mask = flatten(decay_mask(specs, paths, cfg.optim))
    assert mask["thinker/model/layers/self_attn/q_proj/kernel"]
    assert mask["thinker/model/layers/mlp/experts/gate_proj"]
    assert mask["thinker/visual/patch_embed/proj/weight"]
    # rank-1 (beyond the stacked layer axis): norms and biases; embedding tables by pattern
    for path in ("thinker/model/layers/input_layernorm/weight", "thinker/model/norm/weight",
                 "thinker/audio_tower/proj2/bias", "thinker/model/embed_tokens/weight", "thinker/visual/pos_embed/weight"):
        assert not mask[path], path
    enc = trainable_paths(specs, TrainConfig(stage="encoder_alignment"))
    assert enc and all(p.startswith(("thinker/audio_tower/", "thinker/visual/")) for p in enc)
    talk = trainable_paths(specs, TrainConfig(stage="talker"))
    assert any("code_predictor" in p for p in talk) and all(p.startswith("talker/") for p in talk)
    with pytest.raises(ValueError, match="no parameter matches"):
        trainable_paths(specs, TrainConfig(stage="custom", train_patterns=("nothing_here",)))


# ---------------------------------------------------------------------------- overfit + freezing
FROZEN = "thinker/model/embed_tokens/weight"


@functools.lru_cache(maxsize=None)
def _overfit_run():
    """40 steps on one batch (bf16 compute, fp32 master weights; embeddings frozen)."""
    config = preset("tiny")
    cfg = TrainConfig.load(None, ["optim.lr=1e-2", "optim.weight_decay=0.0", "max_steps=40",
                                  "freeze_patterns=[^thinker/model/embed_tokens/]"])
    step = make_train_step(config, cfg)
    params = init_params_for_training(config, cfg.runtime, step.mesh, seed=0)
    initial = jax.tree.map(np.asarray, params)
    state = step.init_state(params)
    batch = _text_batch()
    history = []
    for _ in range(cfg.max_steps):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return step, initial, state, history


def test_overfits_a_small_batch():
    _, _, state, history = _overfit_run()
    first, last = history[0]["ce_loss"], history[-1]["ce_loss"]
    assert last <= first / 10, f"cross-entropy {first:.3f} -> {last:.3f}"
    assert int(state.step) == len(history)
    assert all(np.isfinite(h["grad_norm"]) and h["aux_loss"] > 0 for h in history)
    assert history[0]["tokens"] == _text_batch()["attention_mask"].sum()


def test_default_precision_is_fp32_master_weights_with_bf16_compute():
    step, _, state, _ = _overfit_run()
    assert step.rt.dtype == "bfloat16" and step.rt.param_dtype == "float32"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state.opt_state))


def test_frozen_parameters_are_bit_identical_and_have_no_optimizer_state():
    step, initial, state, _ = _overfit_run()
    before, after = flatten(initial), flatten(jax.tree.map(np.asarray, state.params))
    assert np.array_equal(before[FROZEN], after[FROZEN])
    for path in before:  # every component other than the thinker is frozen by the stage
        if not path.startswith("thinker/"):
            assert np.array_equal(before[path], after[path]), path
    assert not np.array_equal(before["thinker/lm_head/kernel"], after["thinker/lm_head/kernel"])
    assert FROZEN not in step.trainable and "thinker/lm_head/kernel" in step.trainable
    # Adam moments exist for exactly the trainable parameters.
    mu = state.opt_state[1][0].mu  # chain(clip, adamw): adamw = chain(scale_by_adam, ...)
    assert sorted(flatten(mu)) == sorted(step.trainable)
    assert not any(p.startswith(("talker/", "code2wav/")) for p in flatten(mu))


# -------------------------------------------------------------------------------- accumulation
@functools.lru_cache(maxsize=None)
def _accum_steps():
    config = preset("tiny")
    one = make_train_step(config, TrainConfig.load(None, FP32))
    two = make_train_step(config, TrainConfig.load(None, FP32 + ["optim.grad_accum_steps=2"]))
    params = init_params_for_training(config, one.rt, one.mesh, seed=1)
    return config, one, two, params


def test_two_micro_batches_equal_one_double_batch():
    """Accumulating 2 micro-batches whose label-token counts and expert loads differ gives the loss and
    gradients of the whole batch (global-batch cross-entropy and load balancing)."""
    _, one, two, params = _accum_steps()
    batch = _text_batch()
    m1, g1 = one.loss_and_grads(one.init_state(params), batch)
    m2, g2 = two.loss_and_grads(two.init_state(params), batch)
    for key in ("loss", "ce_loss", "aux_loss", "grad_norm", "tokens", "label_tokens"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=2e-6, err_msg=key)
    for path, a in flatten(g1).items():
        b = flatten(g2)[path]
        scale = float(jnp.abs(a).max())
        if scale == 0:  # parameters this batch does not reach (encoders): zero in both
            assert float(jnp.abs(b).max()) == 0, path
            continue
        assert float(jnp.abs(a - b).max()) <= 1e-5 * scale, path
    # The micro-batches really differ (a per-micro-batch mean would weight their tokens unequally).
    halves = [{k: v[i * 2:(i + 1) * 2] for k, v in batch.items()} for i in range(2)]
    counts = [int((h["labels"] != -100).sum()) for h in halves]
    assert counts[0] != counts[1]


# ------------------------------------------------------------------------------- media groups
def test_media_row_groups_match_one_group():
    """Encoding media per row group (one group per batch shard) gives the logits of one group; a group
    without images gets a dummy that nothing reads."""
    from tests.training.test_losses import _media_batch

    config = preset("tiny")
    rt = TrainConfig.load(None, FP32).runtime
    params = init_params_for_training(config, rt, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                                                                       ("data", "expert", "tensor")), seed=2)
    ids, mask, _, labels, media = _media_batch(config)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, **media)
    fn = jax.jit(lambda p, mb: fwd_lib.thinker_forward(p, mb, config.thinker_config, rt).logits)
    logits = {}
    for groups in (1, 2):
        planned, _ = fwd_lib.plan_batch(batch, config, groups=groups)
        assert planned["image"]["pixels"].shape[1] == groups
        logits[groups] = np.asarray(fn(params["thinker"], fwd_lib.micro_batch(planned, 0)))
    valid = mask.astype(bool)
    scale = np.abs(logits[1][valid]).max()
    assert np.abs(logits[2][valid] - logits[1][valid]).max() <= 1e-5 * scale


def test_plan_batch_rejects_placeholder_mismatches():
    from tests.training.test_losses import _media_batch

    config = preset("tiny")
    ids, mask, _, labels, media = _media_batch(config)
    bad = ids.copy()
    bad[0, np.argmax(ids[0] == config.thinker_config.audio_token_id)] = 7
    with pytest.raises(ValueError, match="audio: input_ids hold"):
        fwd_lib.plan_batch(dict(input_ids=bad, attention_mask=mask, labels=labels, **media), config)
    no_media = {k: v for k, v in media.items() if not k.startswith("pixel") and k != "image_grid_thw"}
    with pytest.raises(ValueError, match="no pixel_values"):
        fwd_lib.plan_batch(dict(input_ids=ids, attention_mask=mask, labels=labels, **no_media), config)
    with pytest.raises(ValueError, match="do not split"):
        fwd_lib.plan_batch(dict(input_ids=ids, attention_mask=mask, labels=labels, **media), config, micro_batches=3)


# ------------------------------------------------------------------------------- 8 devices
_SHARDED = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, ".")
from omni_jax.config import preset
from omni_jax.nn.params import flatten
from omni_jax.sharding import make_mesh
from omni_jax.training.config import TrainConfig
from omni_jax.training.step import init_params_for_training, make_train_step
from tests.training.test_step import _text_batch, _with_audio, FP32

config = preset("tiny")
batch = _text_batch(rows=8, lengths=(32, 27, 20, 30, 31, 12, 25, 29), answer_from=(10, 8, 12, 5, 3, 2, 9, 14))
batch = _with_audio(batch, config, {0: 50, 6: 50, 7: 40})  # media groups: one per batch shard
out = {}
ref = None
for shape in [(1, 1, 1), (8, 1, 1), (2, 2, 2)]:
    n = int(np.prod(shape))
    mesh = make_mesh(*shape, devices=jax.devices()[:n])
    cfg = TrainConfig.load(None, FP32 + [f"mesh.data={shape[0]}", f"mesh.expert={shape[1]}", f"mesh.tensor={shape[2]}"])
    step = make_train_step(config, cfg, mesh=mesh)
    params = init_params_for_training(config, cfg.runtime, mesh, seed=3)
    state, metrics = step(step.init_state(params), batch)
    state, metrics2 = step(state, batch)
    got = {"metrics": {k: float(v) for k, v in jax.device_get(metrics2).items()},
           "params": {k: np.asarray(v) for k, v in flatten(state.params).items() if k.startswith("thinker/model")}}
    sharded = [k for k, v in flatten(state.params).items() if len(v.sharding.device_set) > 1 and not v.sharding.is_fully_replicated]
    if ref is None:
        ref = got
        continue
    metric_err = {k: abs(got["metrics"][k] - ref["metrics"][k]) / max(abs(ref["metrics"][k]), 1e-12) for k in ref["metrics"]}
    param_err = max(float(np.abs(got["params"][k] - ref["params"][k]).max()) for k in ref["params"])
    out[str(shape)] = {"metric_err": metric_err, "param_err": param_err, "num_sharded": len(sharded)}
print(json.dumps(out))
"""


def test_sharded_step_equals_one_device():
    """Two steps on meshes (8,1,1) and (2,2,2) (expert parallelism over 2, tensor parallelism over 2)
    equal the one-device steps: metrics of the second step and the updated decoder parameters. Three
    rows carry audio, encoded per batch shard (8 and 4 row groups; most groups get the dummy)."""
    result = run_on_devices(_SHARDED, num_devices=8, timeout=900)
    print(result)
    for mesh, r in result.items():
        assert r["num_sharded"] > 0 or mesh == "(8, 1, 1)", f"{mesh}: nothing sharded"
        for key, err in r["metric_err"].items():
            assert err <= 1e-5, f"{mesh}: {key} differs by {err:.2e}"
        # Adam's first steps move each weight by ~lr * g / |g|: elements whose gradient is at rounding
        # level may move differently; bound the difference by 1% of a step (measured ~0.6%).
        assert r["param_err"] <= 1e-2 * 3e-4, f"{mesh}: parameters differ by {r['param_err']:.2e}"


# ------------------------------------------------------------------------------------ talker stage
def _speech_batch(config, rows=2, frames=(4, 3)):
    """Chat rows (user turn, then the assistant's reply) with target codec ids per row."""
    c = config
    rng = np.random.default_rng(11)
    seq = 16
    ids = np.zeros((rows, seq), np.int32)
    mask = np.zeros((rows, seq), np.int32)
    labels = np.full((rows, seq), -100, np.int32)
    for r in range(rows):
        user = rng.integers(0, 400, 3 + r).tolist()
        reply = rng.integers(0, 400, 3).tolist()
        row = [c.im_start_token_id, c.user_token_id, *user, c.im_end_token_id, c.im_start_token_id,
               c.assistant_token_id, *reply, c.im_end_token_id]
        ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
        start = len(row) - len(reply) - 1
        labels[r, start - 1:len(row) - 1] = row[start:]
    g = config.talker_config.num_code_groups
    f = max(frames)
    codes = rng.integers(0, 32, (rows, f, g)).astype(np.int32)
    codec_mask = (np.arange(f)[None] < np.array(frames)[:, None]).astype(np.int32)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, codec_ids=codes, codec_mask=codec_mask)


def test_talker_stage_trains_talker_and_code_predictor_with_the_thinker_frozen():
    config = preset("tiny")
    cfg = TrainConfig.load(None, FP32 + ["stage=talker", "optim.lr=1e-2", "optim.weight_decay=0.0"])
    step = make_train_step(config, cfg)
    params = init_params_for_training(config, cfg.runtime, step.mesh, seed=4)
    before = flatten(jax.tree.map(np.asarray, params))
    state = step.init_state(params)
    batch = _speech_batch(config)
    history = []
    for _ in range(12):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    assert "ce_loss" not in history[0]  # the thinker's loss is not trained in this stage
    # The loss is both cross-entropies plus the talker's own load-balancing term (the reference talker's).
    first = history[0]
    coef = config.talker_config.text_config.router_aux_loss_coef
    assert first["talker_aux_loss"] > 0  # its value is checked against the reference in test_speech_losses
    np.testing.assert_allclose(
        first["loss"], first["talker_loss"] + first["code_predictor_loss"] + coef * first["talker_aux_loss"], rtol=1e-6)
    for key in ("talker_loss", "code_predictor_loss"):
        assert history[-1][key] < 0.5 * history[0][key], (key, history[0][key], history[-1][key])
    after = flatten(jax.tree.map(np.asarray, state.params))
    assert all(np.array_equal(before[p], after[p]) for p in before if not p.startswith("talker/"))
    moved = [p for p in before if p.startswith("talker/") and not np.array_equal(before[p], after[p])]
    assert any("code_predictor" in p for p in moved) and any(p.startswith("talker/model/layers") for p in moved)
    mu = state.opt_state[1][0].mu
    assert all(p.startswith("talker/") for p in flatten(mu))
