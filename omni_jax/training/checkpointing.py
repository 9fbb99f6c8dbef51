"""Training checkpoints (orbax): asynchronous, every N steps, keep K, restore onto any mesh.

    manager = CheckpointManager("runs/x/ckpt", save_every=500, keep=3)
    restored = manager.restore_latest(abstract_state)       # None on a fresh run
    if restored:
        step, state, data_state = restored
        data_iterator.set_state(data_state)
    ...
    manager.save(step, state, data_iterator.get_state())    # only every `save_every` steps (or force)
    manager.close()                                         # waits for the last save

A step folder `<directory>/<step>/` holds three items:

    state/   the train-state pytree (orbax StandardSave: params, optimizer state, step counter)
    data/    the data iterator state, one JSON file per process (`process_<i>-of-<n>.json`):
             each process reads its own share of the data, so each saves its own position
    meta/    a small JSON: {"step", "time", "process_count", "format", ...user metadata}

Crash safety: orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only
after every item is written (the commit). A process killed during a save leaves a temporary folder
that `latest_step` / `restore_latest` never see; the next manager deletes it before its constructor
returns (`cleanup_tmp_directories`). The last committed step stays restorable.

Resharding: `restore_latest(abstract_state)` restores into the shapes, dtypes and shardings of
`abstract_state` (`jax.ShapeDtypeStruct`s with `.sharding`, e.g. from `jax.eval_shape` + the target
mesh's shardings), whatever mesh the checkpoint was written from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from omni_jax.checkpoint import save_params

__all__ = ["CheckpointManager", "export_params", "DataStateSave", "DataStateRestore", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


# --------------------------------------------------------------------------- data state, per process
def _data_state_file(directory) -> epath.Path:
    return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _DataStateHandler(ocp.CheckpointHandler):
    """Each process writes / reads its own JSON (orbax's JsonCheckpointHandler writes on process 0 only)."""

    def save(self, directory, args: "DataStateSave"):
        _data_state_file(directory).write_text(json.dumps(args.state))

    def restore(self, directory, args: "DataStateRestore | None" = None):
        path = _data_state_file(directory)
        if not path.exists():
            names = sorted(p.name for p in epath.Path(directory).iterdir())
            raise FileNotFoundError(
                f"{path} does not exist (found {names}): the checkpoint was written by a different number of "
                "processes, so the data iterators cannot resume exactly")
        return json.loads(path.read_text())

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(_DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(_DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ------------------------------------------------------------------------------------------ manager
class CheckpointManager:
    """orbax CheckpointManager for (train state, data state, metadata) every `save_every` steps.

    Args:
      directory: where step folders go (created).
      save_every: `save(step, ...)` writes when `step % save_every == 0` (or `force=True`).
      keep: the newest `keep` checkpoints are kept; older ones are deleted after a new one commits.
      async_save: `save` returns once the arrays are copied off the devices; the files are written in
        a background thread (`wait()` / `close()` block until done). A new `save` first waits for the
        previous one.
    """

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every={save_every} and keep={keep} must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every, self.keep, self.async_save = int(save_every), int(keep), bool(async_save)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the every-N rule is ours (orbax would also save the very first step)
            max_to_keep=self.keep,
            enable_async_checkpointing=self.async_save,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that crashed before its commit
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": _DataStateHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )
        # orbax deletes the leftovers in a background thread and waits for it only before its next
        # save; a restore or a listing of the folder would race with that delete. Finish it here.
        # (A private method of the pinned orbax-checkpoint 0.12.8: if it goes away, this fails loudly.)
        self._manager._maybe_await_cleanup_tmp_directory()

    def should_save(self, step: int, force: bool = False) -> bool:
        return bool(force) or (int(step) % self.save_every == 0)

    def save(self, step: int, state_pytree, data_state: dict | None, force: bool = False,
             metadata: dict | None = None) -> bool:
        """Starts saving `state_pytree` (arrays, any sharding) and `data_state` (JSON) as `step`.

        Returns True if a save was started: `step % save_every == 0` or `force`, and `step` is newer
        than every saved step (re-saving a step that exists is skipped with a warning).
        """
        step = int(step)
        if not self.should_save(step, force):
            return False
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            log.warning("checkpoint step %d not saved: step %d already exists in %s", step, latest, self.directory)
            return False
        meta = {"step": step, "time": time.time(), "process_count": jax.process_count(), "format": FORMAT_VERSION,
                **(metadata or {})}
        json.dumps(data_state)  # fail here, with the caller's stack, if the data state is not JSON
        return bool(self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_pytree),
            data=DataStateSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ), force=True))

    def latest_step(self) -> int | None:
        """The newest committed step (saves in progress and crashed partial saves are not counted)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step: int, abstract_state) -> tuple[Any, dict | None, dict]:
        """(state, data_state, metadata) of `step`, the state in `abstract_state`'s shardings."""
        restored = self._manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=DataStateRestore(),
            meta=ocp.args.JsonRestore(),
        ))
        return restored["state"], restored["data"], restored["meta"]

    def restore_latest(self, abstract_state) -> tuple[int, Any, dict | None] | None:
        """(step, state, data_state) of the newest committed checkpoint, or None if there is none.

        `abstract_state`: the train-state pytree of `jax.ShapeDtypeStruct`s (or arrays) carrying the
        target shardings; the arrays are read straight into them (a different mesh than the one that
        saved is fine).
        """
        self._manager.wait_until_finished()
        step = self._manager.latest_step()
        if step is None:
            return None
        state, data_state, _ = self.restore(step, abstract_state)
        return step, state, data_state

    def metadata(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Blocks until the save in progress (if any) is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the save in progress, then releases orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------ export
def export_params(directory: str, params, model_config, dtype: str = "float32", copy_from: str | None = None,
                  *, overwrite: bool = False) -> str:
    """Writes `params` as an omni_jax checkpoint (`omni_jax.checkpoint.save_params`: config.json,
    omni_jax.json, params/) that `infer.py --ckpt`, `omni_jax.load_pretrained` and
    `python -m convert.jax_to_hf` read. Floating-point leaves are cast to `dtype`; tokenizer files
    (tokenizer.json, chat template, preprocessor_config.json, generation_config.json, ...) are copied
    from `copy_from`. `overwrite` replaces an existing `params/` there. Returns the folder.

    Call it on every process (orbax writes each process's shards); the JSON files are the same on all.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"export dtype {dtype!r}; expected float32, bfloat16 or float16")
    directory = os.path.abspath(os.fspath(directory))
    target = os.path.join(directory, "params")
    if os.path.exists(target):
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True or choose an empty export folder")
        if jax.process_index() == 0:
            shutil.rmtree(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("omni_jax export_params: old params removed")
    want = jax.numpy.dtype(dtype)

    def cast(x):
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            return x.astype(want)
        return x

    save_params(directory, jax.tree.map(cast, params), model_config, dtype, copy_from=copy_from)
    return directory
