"""Train Qwen3-Omni (thinker, encoders, talker + code predictor) with omni_jax.

    python train.py --config configs/synthetic_digits.yaml                  # embedded default (tiny preset)
    python train.py --config configs/thinker.yaml model.name=CKPT data.manifest=train.jsonl optim.lr=1e-5
    python train.py --config configs/NAME.yaml --print-config               # the resolved config, then exit

`key=value` arguments override the YAML (dotted paths; see `omni_jax/training/config.py` for every key).
The run:

  1. joins a multi-host job (`omni_jax.distributed`: automatic on TPU pods / SLURM, flags otherwise);
  2. builds the mesh (`mesh.*`), the model (a preset with random weights, or a checkpoint folder) and
     the jitted train step (`omni_jax.training.step`: AdamW, accumulation, freezing by `stage`);
  3. makes the data iterator (`data.*`, JSONL manifest in infer.py's message format);
  4. resumes from the newest checkpoint in `checkpoint.directory` if there is one (state, optimizer,
     step and data position: the following steps are those of an uninterrupted run);
  5. trains to `max_steps`, logging loss, aux loss, grad norm, learning rate, tokens/s and an MFU
     estimate to stdout, `<log dir>/metrics.jsonl` and TensorBoard (`<log dir>/tensorboard`), with a
     progress bar; checkpoints every `checkpoint.save_every` steps (asynchronous) and at the end;
  6. exports the final parameters as an omni_jax checkpoint (`checkpoint.export_dir`, default
     `<checkpoint.directory>/export`) that `infer.py --ckpt` and `python -m convert.jax_to_hf` read.

Ctrl-C saves a checkpoint at the current step before exiting (exit code 130).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import numpy as np

__all__ = ["main", "run", "build_parser"]

log = logging.getLogger("omni_jax.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train omni_jax (Qwen3-Omni): python train.py --config configs/NAME.yaml [key=value ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted config keys, e.g. optim.lr=1e-4 data.batch_size=16 mesh.data=8 "
               "stage=encoder_alignment freeze_patterns=[lm_head]",
    )
    p.add_argument("--config", default=None, help="YAML run configuration (default: all defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    from omni_jax import distributed  # noqa: PLC0415

    distributed.add_distributed_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from omni_jax import distributed  # noqa: PLC0415

    distributed.initialize_from_args(args)  # before anything touches a device
    from omni_jax.training.config import ConfigError, TrainConfig  # noqa: PLC0415

    try:
        cfg = TrainConfig.load(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml  # noqa: PLC0415

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("omni_jax").setLevel(logging.INFO)
    try:
        run(cfg)
    except KeyboardInterrupt:
        return 130
    return 0


# ------------------------------------------------------------------------------------------ set-up
def _prepare_synthetic(cfg):
    """Generates the embedded task if asked for and absent; points data at it."""
    syn = cfg.synthetic
    if syn.directory is None:
        return cfg
    import jax  # noqa: PLC0415

    train_path = os.path.join(syn.directory, "train.jsonl")
    if not os.path.exists(train_path):
        if jax.process_index() == 0:
            from omni_jax.training.synthetic import write_synthetic_task  # noqa: PLC0415

            print(f"train.py: generating the synthetic digit task into {syn.directory} "
                  f"({syn.num_train} train / {syn.num_eval} eval examples)", flush=True)
            write_synthetic_task(syn.directory, num_train=syn.num_train, num_eval=syn.num_eval, seed=syn.seed,
                                 speech_targets=syn.speech_targets)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices("omni_jax train: synthetic task written")
    data = cfg.data
    data = dataclasses.replace(data, manifest=data.manifest or train_path, tokenizer=data.tokenizer or syn.directory)
    return cfg.replace(data=data)


def _load_model(cfg, mesh):
    """(OmniConfig, params on the mesh in runtime.param_dtype, folder with tokenizer files or None)."""
    from omni_jax.config import PRESETS, preset  # noqa: PLC0415
    from omni_jax.training.step import init_params_for_training  # noqa: PLC0415

    name = cfg.model.name
    if name in PRESETS and not os.path.isdir(name):
        config = preset(name)
        params = init_params_for_training(config, cfg.runtime, mesh, seed=cfg.model.init_seed, fsdp=cfg.mesh.fsdp)
        return config, params, None, f"preset {name!r} with random weights (seed {cfg.model.init_seed})"
    if not os.path.isdir(name):
        raise FileNotFoundError(f"model.name={name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                                "checkpoint folder")
    import omni_jax  # noqa: PLC0415

    model = omni_jax.load_pretrained(name, dtype=cfg.runtime.param_dtype, mesh=mesh,
                                     runtime=cfg.runtime, skip_absent_components=cfg.model.skip_absent_components)
    tokenizer = name if os.path.exists(os.path.join(name, "tokenizer.json")) else None
    return model.config, model.params, tokenizer, f"checkpoint {name}"


def _save_config(cfg, directory: str | None) -> None:
    if directory is None:
        return
    import yaml  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# ------------------------------------------------------------------------------------------- loop
def run(cfg) -> dict:
    """Trains per `cfg` (a TrainConfig); returns {"step", "last_metrics", "export_dir", "data_stats"}."""
    import jax  # noqa: PLC0415

    from omni_jax import sharding  # noqa: PLC0415
    from omni_jax.training import metrics as metrics_lib  # noqa: PLC0415
    from omni_jax.training.checkpointing import CheckpointManager, export_params  # noqa: PLC0415
    from omni_jax.training.data import make_iterator  # noqa: PLC0415
    from omni_jax.training.step import make_train_step  # noqa: PLC0415

    cache_dir = os.environ.get("OMNI_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/omni_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    cfg = _prepare_synthetic(cfg)
    is_main = jax.process_index() == 0
    ckpt_cfg = cfg.checkpoint
    log_dir = cfg.log.directory or ckpt_cfg.directory
    logger = metrics_lib.MetricsLogger(log_dir, jsonl=cfg.log.jsonl, tensorboard=cfg.log.tensorboard, enabled=is_main)
    if is_main:
        _save_config(cfg, log_dir)

    mesh = sharding.mesh_from_config(cfg.mesh)
    model_config, params, model_tokenizer, what = _load_model(cfg, mesh)
    step_fn = make_train_step(model_config, cfg, cfg.runtime, mesh)
    logger.text(f"model: {what}; stage {cfg.stage}: {len(step_fn.trainable)} trainable tensors "
                f"({_count(step_fn, trainable=True):,} of {_count(step_fn):,} parameters); mesh {dict(mesh.shape)}; "
                f"{cfg.runtime.param_dtype} weights, {cfg.runtime.dtype} compute, remat {cfg.runtime.remat}")

    tokenizer = cfg.data.tokenizer or model_tokenizer
    iterator = make_iterator(cfg.data, tokenizer, model_config, process_index=jax.process_index(),
                             process_count=jax.process_count())

    manager = None
    state = None
    start = 0
    if ckpt_cfg.directory:
        manager = CheckpointManager(os.path.join(ckpt_cfg.directory, "checkpoints"), save_every=ckpt_cfg.save_every,
                                    keep=ckpt_cfg.keep, async_save=ckpt_cfg.async_save)
        restored = manager.restore_latest(step_fn.abstract_state())
        if restored is not None:
            start, state, data_state = restored
            if data_state is not None:
                iterator.set_state(data_state)
            logger.text(f"resumed from step {start} ({manager.directory})")
    if state is None:
        state = step_fn.init_state(params)
    del params

    flops_per_token = metrics_lib.train_flops_per_token(model_config, talker=step_fn.trains_talker)
    peak = cfg.log.peak_flops_per_device or metrics_lib.peak_flops_per_device()
    num_devices = mesh.size
    bar = None
    if is_main and cfg.log.progress_bar:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    step = start
    last = {}
    timer = metrics_lib.StepTimer()
    window_tokens, window_steps = 0.0, 0
    pending = None  # the latest step's device metrics, fetched at log time
    try:
        while step < cfg.max_steps:
            try:
                batch = next(iterator)
            except StopIteration:
                logger.text(f"data exhausted after {step} steps (data.num_epochs={cfg.data.num_epochs})")
                break
            state, pending = step_fn(state, batch)
            step += 1
            window_steps += 1
            window_tokens += float(np.sum(batch["attention_mask"])) * jax.process_count()
            if step % cfg.log.every == 0 or step == cfg.max_steps:
                values = jax.device_get(pending)  # waits for the step: the window's time is real
                seconds = timer.lap()
                record = {k: float(v) for k, v in values.items()}
                record["step_time"] = seconds / window_steps
                record["tokens_per_s"] = window_tokens / seconds
                utilisation = metrics_lib.mfu(flops_per_token, window_tokens, seconds, num_devices, peak)
                if utilisation is not None:
                    record["mfu"] = utilisation
                if timer.laps == 1 and start == step - window_steps:
                    record["includes_compile"] = True
                stats = iterator.stats
                skipped = sum(stats["skipped"].values())
                if skipped:
                    record["skipped_examples"] = skipped
                last = logger.log(step, record)
                window_tokens, window_steps = 0.0, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if manager is not None and step < cfg.max_steps:
                manager.save(step, state, iterator.get_state())
    except KeyboardInterrupt:
        if manager is not None:
            logger.text(f"interrupted: saving step {step}")
            manager.save(step, state, iterator.get_state(), force=True)
            manager.close()
        raise
    finally:
        if bar is not None:
            bar.close()

    if manager is not None:
        manager.save(step, state, iterator.get_state(), force=True)
        manager.close()
    export_dir = ckpt_cfg.export_dir or (os.path.join(ckpt_cfg.directory, "export") if ckpt_cfg.directory else None)
    if export_dir is not None:
        copy_from = tokenizer if isinstance(tokenizer, str) else None
        export_dir = export_params(export_dir, state.params, model_config, ckpt_cfg.export_dtype,
                                   copy_from=copy_from, overwrite=True)  # the absolute folder
        logger.text(f"exported step {step} parameters to {export_dir} (python infer.py --ckpt {export_dir})")
    stats = iterator.stats
    if sum(stats["skipped"].values()):
        logger.text(f"data: skipped examples by reason: {json.dumps(stats['skipped'])}")
    iterator.close()
    logger.close()
    return {"step": step, "last_metrics": last, "export_dir": export_dir, "data_stats": stats}


def _count(step_fn, trainable: bool = False) -> int:
    from omni_jax.nn.params import flatten  # noqa: PLC0415

    flat = flatten(step_fn.specs)
    paths = step_fn.trainable if trainable else flat
    return int(sum(int(np.prod(flat[p].shape)) for p in paths))

if __name__ == "__main__":
    sys.exit(main())
