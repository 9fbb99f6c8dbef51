"""Training checkpoints: round trip, keep K, async saves, exact resume, reshard on restore, crash during save,
export."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from omni_jax.config import preset
from omni_jax.training import synthetic
from omni_jax.training.checkpointing import CheckpointManager, export_params
from omni_jax.training.data import IGNORE_INDEX, DataConfig, make_iterator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TrainState(NamedTuple):  # the shape of omni_jax.training.step.TrainState
    step: Any
    params: Any
    opt_state: Any


OPTIMIZER = optax.adamw(1e-2)


def make_state(seed: int = 0) -> TrainState:
    """A small train state: fp32 and bf16 parameters, adamw moments, an int32 step."""
    rng = np.random.default_rng(seed)
    params = {
        "emb": jnp.asarray(rng.normal(size=(512, 8)), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16),
        "out": jnp.asarray(rng.normal(size=(16, 512)) * 0.1, jnp.float32),
    }
    return TrainState(jnp.int32(0), params, OPTIMIZER.init(params))


def tree_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                      err_msg=jax.tree_util.keystr(path))


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def bump(state: TrainState, by: float) -> TrainState:
    params = jax.tree.map(lambda x: (x + by).astype(x.dtype), state.params)
    return TrainState(state.step + 1, params, state.opt_state)


def run_subprocess(code: str, *args: str, devices: int = 1, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_save_every_keep_async_round_trip(tmp_path):
    manager = CheckpointManager(str(tmp_path), save_every=2, keep=2, async_save=True)
    expected = {}
    state = make_state()
    for step in range(1, 8):
        state = bump(state, 0.5)
        expected[step] = jax.tree.map(np.asarray, state)
        assert manager.save(step, state, {"consumed": 10 * step}) == (step % 2 == 0)
        # An async save returns before its commit, and the next train step donates (deletes) the state's
        # buffers at once: what is saved must be the state at the save.
        next_state = jax.tree.map(jnp.copy, state)
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        state = next_state
    manager.wait()
    assert manager.all_steps() == [4, 6]  # keep 2
    assert manager.save(6, state, {}, force=True) is False  # an existing step is not rewritten
    assert manager.save(7, state, {"consumed": 70}, force=True)
    manager.close()

    manager = CheckpointManager(str(tmp_path), save_every=2, keep=2)
    step, restored, data = manager.restore_latest(abstract_of(make_state()))
    assert (step, data) == (7, {"consumed": 70})
    assert isinstance(restored, TrainState)
    tree_equal(restored, expected[7])
    restored6, data6, meta6 = manager.restore(6, abstract_of(make_state()))
    tree_equal(restored6, expected[6])
    assert data6 == {"consumed": 60} and meta6["step"] == 6 and meta6["process_count"] == 1
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]
    manager.close()
    assert CheckpointManager(str(tmp_path / "empty"), save_every=1, keep=1).restore_latest(
        abstract_of(make_state())) is None


# ------------------------------------------------------------------------------------------ exact resume
def _loss(params, batch):
    h = jnp.tanh(params["emb"][batch["input_ids"]] @ params["w"] + params["b"].astype(jnp.float32))
    logits = h @ params["out"]
    mask = batch["labels"] != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, batch["labels"], 0))
    return jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1)


def _train_step(state: TrainState, batch):
    loss, grads = jax.value_and_grad(_loss)(state.params, batch)
    updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), loss


_step = jax.jit(_train_step, donate_argnums=0)


def _text_manifest(path):
    with open(path, "w") as f:
        for i in range(14):
            words = " ".join(["which", "digit", "is", "it"][: 1 + i % 4] + ["tone"] * (i % 3))
            row = {"messages": [{"role": "user", "content": [{"type": "text", "text": words}]}],
                   "target": synthetic.DIGIT_WORDS[i % 10]}
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_exact_resume_losses_after_restart_equal_an_uninterrupted_run(tmp_path):
    assets_dir = synthetic.write_text_assets(str(tmp_path / "assets"))
    cfg = DataConfig(manifest=_text_manifest(tmp_path / "m.jsonl"), tokenizer=assets_dir, batch_size=4,
                     seq_buckets=(16, 24))
    config = preset("tiny")
    keys = ("input_ids", "labels")

    it = make_iterator(cfg, None, config)
    state, reference = make_state(), []
    for _ in range(8):  # 14 examples, 4 per batch: crosses epochs
        batch = next(it)
        state, loss = _step(state, {k: batch[k] for k in keys})
        reference.append(float(loss))

    # Interrupted run: an async save at step 4, two more (donating) steps, then the process is gone.
    it = make_iterator(cfg, None, config)
    manager = CheckpointManager(str(tmp_path / "ckpt"), save_every=4, keep=2, async_save=True)
    state, losses = make_state(), []
    for step in range(1, 7):
        batch = next(it)
        state, loss = _step(state, {k: batch[k] for k in keys})
        losses.append(float(loss))
        manager.save(step, state, it.get_state())
    manager.close()
    assert losses == reference[:6]

    # Restart: fresh iterator and manager, restore, continue.
    it = make_iterator(cfg, None, config)
    manager = CheckpointManager(str(tmp_path / "ckpt"), save_every=4, keep=2)
    step, state, data_state = manager.restore_latest(abstract_of(make_state()))
    it.set_state(data_state)
    assert step == 4 and int(state.step) == 4
    for _ in range(4):
        batch = next(it)
        state, loss = _step(state, {k: batch[k] for k in keys})
        losses.append(float(loss))
    manager.close()
    assert losses[6:] == reference[4:]  # bitwise: same batches, same state


# ------------------------------------------------------------------------------------------ reshard
RESHARD = """
import sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tests.training.test_checkpointing import make_state, bump, tree_equal
from omni_jax.training.checkpointing import CheckpointManager

assert jax.device_count() == 8
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))

def spec(x):
    if x.ndim == 2:
        return P("data", "tensor")
    if x.ndim == 1 and x.shape[0] % 4 == 0:
        return P("tensor")
    return P()

expected = bump(make_state(), 0.25)
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x))),
                        expected)
manager = CheckpointManager(sys.argv[1], save_every=1, keep=2)
step, state, data = manager.restore_latest(abstract)
assert step == 5 and data == {"consumed": 5}, (step, data)
tree_equal(state, expected)
for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert x.sharding == a.sharding, (x.sharding, a.sharding)
    assert len(x.addressable_shards) == 8
w = state.params["w"]
assert w.addressable_shards[0].data.shape == (4, 4)
# And back: save from the 8-device layout, the 1-device test process restores.
manager.save(6, bump(state, 1.0), {"consumed": 6})
manager.close()
print("RESHARD OK")
"""


def test_restore_onto_a_different_mesh_and_back(tmp_path):
    manager = CheckpointManager(str(tmp_path), save_every=1, keep=2)
    assert manager.save(5, bump(make_state(), 0.25), {"consumed": 5})
    manager.close()
    proc = run_subprocess(RESHARD, str(tmp_path), devices=8)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "RESHARD OK" in out, out[-3000:]
    manager = CheckpointManager(str(tmp_path), save_every=1, keep=2)
    step, state, data = manager.restore_latest(abstract_of(make_state()))
    assert (step, data) == (6, {"consumed": 6})
    tree_equal(state, bump(bump(make_state(), 0.25), 1.0))
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(state))
    manager.close()


# ------------------------------------------------------------------------------------------ crash
CRASH = """
import os, sys, time
import numpy as np
import orbax.checkpoint._src.path.atomicity as atomicity
from tests.training.test_checkpointing import make_state, bump
from omni_jax.training.checkpointing import CheckpointManager

directory, marker = sys.argv[1], sys.argv[2]
manager = CheckpointManager(directory, save_every=1, keep=3)
manager.save(1, bump(make_state(), 1.0), {"consumed": 1})
manager.wait()

async def killed_before_commit(self, *args, **kwargs):
    # The first commit step of step 2 (its arrays are written to state.orbax-checkpoint-tmp inside
    # 2.orbax-checkpoint-tmp): the process is killed here, before anything is renamed.
    open(marker, "w").close()
    time.sleep(3600)

atomicity.AtomicRenameTemporaryPath.finalize = killed_before_commit
manager.save(2, bump(make_state(), 2.0), {"consumed": 2})
time.sleep(3600)
"""


def test_a_crash_during_save_leaves_the_last_complete_checkpoint(tmp_path):
    directory, marker = tmp_path / "ckpt", tmp_path / "writing"
    proc = run_subprocess(CRASH, str(directory), str(marker))
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "the save never reached its commit"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = glob.glob(str(directory / "2.orbax-checkpoint-tmp*"))
    assert len(partial) == 1 and not (directory / "2").exists()
    written = [f for d in glob.glob(os.path.join(partial[0], "state*")) for _, _, fs in os.walk(d) for f in fs]
    assert written, "step 2's arrays were being written when the process was killed"

    manager = CheckpointManager(str(directory), save_every=1, keep=3)
    assert manager.latest_step() == 1 and manager.all_steps() == [1]
    step, state, data = manager.restore_latest(abstract_of(make_state()))
    assert (step, data) == (1, {"consumed": 1})
    tree_equal(state, bump(make_state(), 1.0))
    assert not glob.glob(str(directory / "*orbax-checkpoint-tmp*"))  # the leftover is cleaned up
    assert manager.save(2, bump(make_state(), 3.0), {"consumed": 2})  # and step 2 can be written again
    manager.close()
    tree_equal(CheckpointManager(str(directory), save_every=1, keep=3).restore_latest(
        abstract_of(make_state()))[1], bump(make_state(), 3.0))


# ------------------------------------------------------------------------------------------ export
def test_export_params_is_an_omni_jax_checkpoint(tmp_path):
    from omni_jax.checkpoint import is_omni_jax_checkpoint, restore_params
    from omni_jax.config import load_config
    from omni_jax.model import model_specs
    from omni_jax.nn.params import abstract_params

    config = preset("tiny")
    rng = np.random.default_rng(0)  # random values of the model's parameter tree (init_params compiles per leaf)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                          abstract_params(model_specs(config), dtype=jnp.float32))
    assets = synthetic.write_text_assets(str(tmp_path / "assets"))
    out = export_params(str(tmp_path / "export"), params, config, "bfloat16", copy_from=assets)
    assert is_omni_jax_checkpoint(out) and load_config(out) == config
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "generation_config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    device = jax.devices()[0]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16,
                                                           sharding=jax.sharding.SingleDeviceSharding(device)), params)
    restored = restore_params(out, abstract)
    tree_equal(restored, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))  # numpy: no per-leaf compiles
    with pytest.raises(FileExistsError):
        export_params(out, params, config, "float32")
    export_params(out, params, config, "float32", overwrite=True)
    abstract32 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding), abstract)
    tree_equal(restore_params(out, abstract32), params)
