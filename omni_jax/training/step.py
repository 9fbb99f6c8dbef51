"""The jitted train step: state, losses, gradient accumulation, optimizer update, metrics.

    step_fn = make_train_step(model_config, train_cfg, rt, mesh)
    state = step_fn.init_state(params)                 # TrainState(step, params, opt_state)
    state, metrics = step_fn(state, batch)             # batch: the data pipeline's numpy dict

One step = one global batch = `optim.grad_accum_steps` micro-batches run by a `lax.scan` inside one
jitted program with the state donated. Statistics are those of the whole global batch, exactly:

  * thinker cross-entropy: each micro-batch contributes (sum of token losses) / (label tokens of the
    global batch), so the summed gradients are those of the global mean;
  * MoE load balancing (`losses.load_balancing_loss`, the reference's): the expert-assignment
    fractions f are counted over the global batch first (a forward-only pass per micro-batch when
    there are several; `loss.aux_loss_scope="micro_batch"` skips it), then each micro-batch adds
    E * sum_e f_e * (its router-probability sums) / rows, whose sum is the global loss;
  * talker / code-predictor cross-entropies (`speech_losses`): sums over the global target counts;
  * the talker's own MoE load balancing (the reference talker's `aux_loss`, coefficient
    `loss.talker_aux_loss_coef`, default the talker config's router_aux_loss_coef): each
    micro-batch's own statistics, averaged over micro-batches.

Across devices the batch is one global array (rows sharded over the mesh's data and expert axes),
so the same sums are global without any explicit collective. Media are encoded per row group
(`forward.plan_batch`), one group per batch shard.

Precision: parameters (and Adam moments) are stored in `rt.param_dtype` and every forward casts
them to `rt.dtype` at use: param_dtype float32 + dtype bfloat16 is "fp32 master weights, bf16
compute"; both bfloat16 is pure bf16. Losses, softmaxes and norms are fp32.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from omni_jax import sharding
from omni_jax.config import OmniConfig, Runtime
from omni_jax.nn.params import ParamSpec, abstract_params, flatten, hash_path, init_params, unflatten
from omni_jax.training import forward as fwd_lib
from omni_jax.training import losses
from omni_jax.training.config import TrainConfig
from omni_jax.training.optimizer import combine, global_norm, make_optimizer, partition, trainable_paths

__all__ = ["TrainState", "TrainStep", "make_train_step", "init_params_for_training"]


class TrainState(NamedTuple):
    step: jax.Array  # () int32, optimizer steps taken
    params: dict  # the whole model's parameters (frozen ones included), `rt.param_dtype`
    opt_state: Any  # optax state over the trainable parameters only


# Below this many parameters, random initialisation runs in numpy on the host: XLA compiles a
# program with one RNG per leaf slowly (minutes for the tiny preset's ~300 leaves on a loaded CPU).
_HOST_INIT_MAX = 200_000_000


def _host_leaf(spec, path: str, seed: int, dtype) -> np.ndarray:
    if spec.init == "normal":
        rng = np.random.default_rng([seed, hash_path(path)])
        x = spec.std * rng.standard_normal(spec.shape, dtype=np.float32)
    elif spec.init in ("ones", "zeros", "constant"):
        x = np.full(spec.shape, {"ones": 1.0, "zeros": 0.0}.get(spec.init, spec.value), np.float32)
    else:
        raise ValueError(f"unknown initialiser {spec.init!r} at {path}")
    return x.astype(dtype)


def init_params_for_training(model_config: OmniConfig, rt: Runtime, mesh, seed: int = 0, fsdp: bool = False) -> dict:
    """Random parameters (normal with std initializer_range; norms ones) in `rt.param_dtype`, sharded
    on `mesh`. Small models are drawn on the host (numpy, per-path seeds), large ones on device."""
    from omni_jax.model import model_specs  # noqa: PLC0415

    specs = model_specs(model_config)
    shardings = sharding.param_shardings(specs, mesh, sharding.rules(fsdp))
    dtype = jnp.dtype(rt.param_dtype)
    if param_count(specs) > _HOST_INIT_MAX:
        init = jax.jit(functools.partial(init_params, specs, dtype=dtype), out_shardings=shardings)
        return init(jax.random.key(seed))
    flat_specs, flat_shardings = flatten(specs), flatten(shardings)
    out = {}
    for path, spec in flat_specs.items():
        host = _host_leaf(spec, path, seed, dtype)
        out[path] = jax.make_array_from_callback(host.shape, flat_shardings[path], lambda idx, h=host: h[idx])
    return unflatten(out)


def _batch_pspec(mesh, ndim: int, batch_dim: int, shape) -> PartitionSpec:
    axes = [None] * ndim
    axes[batch_dim] = "batch"
    return sharding.logical_to_pspec(tuple(axes), None, tuple(shape), dict(mesh.shape))


class TrainStep:
    """A train step for one (model config, train config, runtime, mesh); see the module docstring.

    Attributes: `specs` (ParamSpec tree), `trainable` (sorted trainable paths), `param_shardings`,
    `optimizer`, `schedule`. Call it as `(state, batch) -> (state, metrics)`; metrics are device scalars.
    """

    def __init__(self, model_config: OmniConfig, train_cfg: TrainConfig, rt: Runtime, mesh):
        from omni_jax.model import model_specs  # noqa: PLC0415

        self.config = model_config
        self.train_cfg = train_cfg
        self.rt = rt
        self.mesh = mesh
        self.specs = model_specs(model_config)
        self.trainable = trainable_paths(self.specs, train_cfg)
        self.rules = sharding.rules(train_cfg.mesh.fsdp)
        self.param_shardings = sharding.param_shardings(self.specs, mesh, self.rules)
        trainable_specs, _ = partition(self.specs, self.trainable)
        self.optimizer, self.schedule = make_optimizer(train_cfg, self.specs, self.trainable)
        self._trainable_specs = trainable_specs
        self.accum = train_cfg.optim.grad_accum_steps
        text = model_config.thinker_config.text_config
        self.top_k = text.num_experts_per_tok if text.num_experts else 0
        self.aux_coef = train_cfg.aux_loss_coef(model_config) if self.top_k else 0.0
        self.talker_aux_coef = train_cfg.talker_aux_loss_coef(model_config)
        self.trains_thinker = any(p.startswith("thinker/") for p in self.trainable)
        self.trains_talker = any(p.startswith("talker/") for p in self.trainable)
        if self.trains_talker and model_config.talker_config is None:
            raise ValueError("the stage trains the talker but the model configuration has none")
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.state_shardings = self._state_shardings()
        self._jitted = jax.jit(self._step, donate_argnums=(0,),
                               out_shardings=(self.state_shardings, self._replicated))
        self._grads_jitted = None
        self._media_floor = fwd_lib.MediaSizes()

    # ------------------------------------------------------------------------------------ state
    def _state_shardings(self) -> TrainState:
        trainable_shardings, _ = partition(self.param_shardings, self.trainable)
        abstract_trainable, _ = partition(abstract_params(self.specs, jnp.dtype(self.rt.param_dtype)), self.trainable)
        abstract_opt = jax.eval_shape(self.optimizer.init, abstract_trainable)
        opt_shardings = optax.tree_map_params(
            self.optimizer, lambda _, s: s, abstract_opt, trainable_shardings,
            transform_non_params=lambda _: self._replicated,
        )
        return TrainState(self._replicated, self.param_shardings, opt_shardings)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with this mesh's shardings (what a checkpoint restore targets)."""
        params = abstract_params(self.specs, jnp.dtype(self.rt.param_dtype))
        trainable, _ = partition(params, self.trainable)
        opt = jax.eval_shape(self.optimizer.init, trainable)
        abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.state_shardings)

    def init_state(self, params: dict) -> TrainState:
        """A fresh state (step 0, zero Adam moments) around `params` (cast to `rt.param_dtype`)."""
        dtype = jnp.dtype(self.rt.param_dtype)

        def init(params):
            params = jax.tree.map(lambda x: x.astype(dtype), params)
            trainable, _ = partition(params, self.trainable)
            return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(trainable))

        with sharding.use_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.state_shardings)(params)

    # ------------------------------------------------------------------------------------ batches
    def media_groups(self, micro_rows_global: int) -> int:
        """Media row groups per micro-batch: the number of shards its rows get on the mesh (data x
        expert when that divides the rows, else data, else 1)."""
        entry = _batch_pspec(self.mesh, 1, 0, (micro_rows_global,))[0]
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        shape = dict(self.mesh.shape)
        return int(np.prod([shape[a] for a in axes])) if axes else 1

    def prepare(self, batch: Mapping[str, Any]) -> dict:
        """The data pipeline's numpy batch (this process's rows) -> device arrays for the jitted step."""
        procs = jax.process_count()
        local_rows = int(np.asarray(batch["input_ids"]).shape[0])
        if local_rows % self.accum:
            raise ValueError(f"batch of {local_rows} rows does not split into grad_accum_steps={self.accum} "
                             "micro-batches")
        groups = self.media_groups(local_rows * procs // self.accum)
        if groups % procs:
            raise ValueError(f"the batch's {groups} shards do not split over {procs} processes; make the per-process "
                             "batch a multiple of the process's share of the mesh's data x expert devices")
        groups_local = groups // procs
        if self.trains_talker and batch.get("codec_ids") is not None:
            from omni_jax.training.speech_losses import check_speech_targets  # noqa: PLC0415

            checked = dict(batch)
            if "speaker" not in checked and "speaker_ids" in checked:  # the data pipeline's name
                checked["speaker"] = checked["speaker_ids"]
            check_speech_targets(checked, self.config)
        planned, sizes = fwd_lib.plan_batch(batch, self.config, micro_batches=self.accum, groups=groups_local,
                                            sizes=self._media_floor)
        if procs > 1:  # every process joins (one may have no media): the padded shapes must agree
            from omni_jax import distributed  # noqa: PLC0415

            everyone = distributed.allgather_objects([None if s is None else list(s) for s in sizes])
            agreed = fwd_lib.MediaSizes()
            for other in everyone:
                agreed = agreed.merge(fwd_lib.MediaSizes(*(None if s is None else tuple(s) for s in other)))
            if agreed != sizes:
                planned, sizes = fwd_lib.plan_batch(batch, self.config, micro_batches=self.accum,
                                                    groups=groups_local, sizes=agreed)
        # Media shapes only grow: later batches pad to the largest seen (and keep every media kind seen,
        # with dummies), so the step compiles a few times while the maxima settle, not once per batch.
        self._media_floor = self._media_floor.merge(sizes)
        return self._put(planned, procs)

    def _put(self, planned: dict, procs: int) -> dict:
        def put(x, batch_dim):
            x = np.asarray(x)
            global_shape = list(x.shape)
            global_shape[batch_dim] *= procs
            pspec = _batch_pspec(self.mesh, x.ndim, batch_dim, global_shape)
            s = NamedSharding(self.mesh, pspec)
            if procs == 1:
                return jax.device_put(x, s)
            return jax.make_array_from_process_local_data(s, x, tuple(global_shape))

        out = {}
        for key, value in planned.items():
            if isinstance(value, dict):  # media: (k, g, ...) groups like rows
                out[key] = {f: put(v, 1) for f, v in value.items()}
            else:
                out[key] = put(value, fwd_lib.ROW_KEYS.get(key, 0) + 1)
        return out

    # ------------------------------------------------------------------------------------ step
    def __call__(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
        device_batch = batch if _is_prepared(batch) else self.prepare(batch)
        with sharding.use_mesh(self.mesh):
            return self._jitted(state, device_batch)

    def lower(self, state, device_batch):
        with sharding.use_mesh(self.mesh):
            return self._jitted.lower(state, device_batch)

    def _speech_totals(self, batch):
        """Global target counts of the talker (frames + EOS per speaking row) and code predictor."""
        frames = jnp.sum(batch["codec_mask"].astype(jnp.float32), axis=-1)  # (k, b)
        groups = batch["codec_ids"].shape[-1]
        talker = jnp.sum(jnp.where(frames > 0, frames + 1.0, 0.0))
        return talker, jnp.sum(frames) * (groups - 1)

    def _micro_loss(self, trainable, frozen, mb, totals):
        """One micro-batch's share of the global loss, and its metric sums."""
        params = combine(trainable, frozen)
        cfg, rt = self.config, self.rt
        speech = self.trains_talker and "codec_ids" in mb
        capture = cfg.talker_config.accept_hidden_layer if speech else None
        out = fwd_lib.thinker_forward(params["thinker"], mb, cfg.thinker_config, rt, capture_layer=capture,
                                      compute_logits=self.trains_thinker)
        loss = jnp.float32(0.0)
        sums = {}
        if self.trains_thinker:
            ce_sum, ce_count = losses.cross_entropy_sums(out.logits, mb["labels"])
            loss = loss + ce_sum / totals["label_tokens"]
            sums["ce_sum"] = ce_sum
            if self.top_k:
                stats = losses.router_stats(out.router_logits, mb["attention_mask"].reshape(-1), self.top_k)
                if "router_counts" in totals:  # global-batch assignment fractions
                    aux = losses.load_balancing_from_stats(stats, totals["router_counts"], totals["router_rows"])
                else:  # this micro-batch's own statistics (the global batch's when accum == 1)
                    aux = losses.load_balancing_from_stats(stats) / self.accum
                loss = loss + self.aux_coef * aux
                sums["aux_loss"] = aux
        if speech:
            from omni_jax.training.speech_losses import speech_losses  # noqa: PLC0415

            _, _, sm = speech_losses(params, out.embeds, out.hidden, mb, cfg, rt)
            tcfg = self.train_cfg.loss
            loss = loss + tcfg.talker_loss_coef * sm["talker_ce_sum"] / totals["talker_targets"]
            loss = loss + tcfg.code_predictor_loss_coef * sm["code_predictor_ce_sum"] / totals["cp_targets"]
            sums["talker_ce_sum"] = sm["talker_ce_sum"]
            sums["cp_ce_sum"] = sm["code_predictor_ce_sum"]
            sums["talker_hits"] = sm["talker_accuracy"] * sm["talker_targets"]
            sums["cp_hits"] = sm["code_predictor_accuracy"] * sm["code_predictor_targets"]
            # Per micro-batch statistics (as the thinker's "micro_batch" scope), averaged over them.
            loss = loss + self.talker_aux_coef * sm["talker_aux_loss"] / self.accum
            sums["talker_aux_loss"] = sm["talker_aux_loss"] / self.accum
        sums["loss"] = loss
        return loss, sums

    def _router_counts(self, trainable, frozen, batch):
        """(E,) expert assignments and rows over every micro-batch (forward only, no gradient)."""
        params = combine(jax.lax.stop_gradient(trainable), frozen)

        def one(carry, mb):
            out = fwd_lib.thinker_forward(params["thinker"], mb, self.config.thinker_config, self.rt,
                                          compute_logits=False)
            stats = losses.router_stats(out.router_logits, mb["attention_mask"].reshape(-1), self.top_k)
            return (carry[0] + stats.counts, carry[1] + stats.rows), None

        num_experts = self.config.thinker_config.text_config.num_experts
        init = (jnp.zeros((num_experts,), jnp.float32), jnp.float32(0.0))
        (counts, rows), _ = jax.lax.scan(one, init, batch)
        return counts, rows

    def _loss_and_grads(self, params: dict, batch: dict):
        """(metrics without the optimizer's, gradients of the trainable subtree) of one global batch."""
        trainable, frozen = partition(params, self.trainable)
        labels = batch["labels"]
        mask = batch["attention_mask"]
        totals = {"label_tokens": jnp.maximum(jnp.sum((labels != losses.IGNORE_INDEX).astype(jnp.float32)), 1.0)}
        speech = self.trains_talker and "codec_ids" in batch
        if speech:
            t, c = self._speech_totals(batch)
            totals["talker_targets"], totals["cp_targets"] = jnp.maximum(t, 1.0), jnp.maximum(c, 1.0)
        if self.trains_thinker and self.top_k and self.train_cfg.loss.aux_loss_scope == "global" and self.accum > 1:
            # One micro-batch is the global batch; several need the global counts first.
            totals["router_counts"], totals["router_rows"] = self._router_counts(trainable, frozen, batch)

        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)
        if self.accum == 1:
            (_, sums), grads = grad_fn(trainable, frozen, fwd_lib.micro_batch(batch, 0), totals)
        else:
            def body(carry, mb):
                acc_grads, acc_sums = carry
                (_, s), g = grad_fn(trainable, frozen, mb, totals)
                acc_grads = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc_grads, g)
                acc_sums = jax.tree.map(jnp.add, acc_sums, s)
                return (acc_grads, acc_sums), None

            # fp32 accumulators whatever the parameter dtype.
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
            sums0 = jax.eval_shape(lambda: self._micro_loss(trainable, frozen, fwd_lib.micro_batch(batch, 0),
                                                            totals)[1])
            sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0)
            (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), batch)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)

        metrics = {
            "loss": sums["loss"],
            "grad_norm": global_norm(grads),
            "tokens": jnp.sum(mask.astype(jnp.float32)),
            "label_tokens": jnp.sum((labels != losses.IGNORE_INDEX).astype(jnp.float32)),
        }
        if "ce_sum" in sums:
            metrics["ce_loss"] = sums["ce_sum"] / totals["label_tokens"]
        if "aux_loss" in sums:
            metrics["aux_loss"] = sums["aux_loss"]
        if speech:
            metrics["talker_loss"] = sums["talker_ce_sum"] / totals["talker_targets"]
            metrics["code_predictor_loss"] = sums["cp_ce_sum"] / totals["cp_targets"]
            metrics["talker_accuracy"] = sums["talker_hits"] / totals["talker_targets"]
            metrics["code_predictor_accuracy"] = sums["cp_hits"] / totals["cp_targets"]
            metrics["talker_aux_loss"] = sums["talker_aux_loss"]
        return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}, grads

    def _step(self, state: TrainState, batch: dict):
        metrics, grads = self._loss_and_grads(state.params, batch)
        trainable, frozen = partition(state.params, self.trainable)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, trainable)
        params = combine(optax.apply_updates(trainable, updates), frozen)
        metrics["lr"] = jnp.asarray(self.schedule(state.step), jnp.float32)
        return TrainState(state.step + 1, params, opt_state), metrics

    def loss_and_grads(self, state: TrainState, batch) -> tuple[dict, dict]:
        """(metrics, gradients of the trainable subtree) of `batch` at `state`, without updating (tests,
        diagnostics); the same computation as the step's."""
        if self._grads_jitted is None:
            self._grads_jitted = jax.jit(lambda params, b: self._loss_and_grads(params, b))
        device_batch = batch if _is_prepared(batch) else self.prepare(batch)
        with sharding.use_mesh(self.mesh):
            return self._grads_jitted(state.params, device_batch)


def _is_prepared(batch) -> bool:
    ids = batch.get("input_ids")
    return isinstance(ids, jax.Array) and ids.ndim == 3


def make_train_step(model_config: OmniConfig, train_cfg: TrainConfig, rt: Runtime | None = None, mesh=None) -> TrainStep:
    """The jitted train step (see `TrainStep`). rt defaults to `train_cfg.runtime`, mesh to the one of
    `train_cfg.mesh` over all devices."""
    rt = train_cfg.runtime if rt is None else rt
    mesh = sharding.mesh_from_config(train_cfg.mesh) if mesh is None else mesh
    return TrainStep(model_config, train_cfg, rt, mesh)


def param_count(tree) -> int:
    """Number of parameters of a ParamSpec or array tree."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, ParamSpec))
    return int(sum(np.prod(x.shape) for x in leaves))
