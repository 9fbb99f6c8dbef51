"""AdamW with warm-up + cosine decay, global-norm clipping, a weight-decay mask, and freezing.

Freezing: the parameter tree is split by path (`partition`) into the trainable part and the frozen
part. Only the trainable part is differentiated and handed to the optimizer, so frozen parameters
get no gradient computation, no optimizer state (no Adam moments), and stay bit-identical; the
train step recombines the two (`combine`). This is what `optax.multi_transform` with
`optax.set_to_zero` gives for the state, without computing the frozen gradients first.

Weight decay (decoupled, AdamW) applies to every trainable matrix except embedding tables; no
decay on rank-1 parameters (norm scales, biases, layer-scale gammas; the stacked `layers` axis does
not count) or on paths matching `OptimConfig.no_decay_patterns` (embeddings by default).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from omni_jax.nn.params import ParamSpec, flatten, unflatten
from omni_jax.training.config import OptimConfig, TrainConfig

__all__ = [
    "learning_rate_schedule", "trainable_paths", "partition", "combine", "decay_mask", "make_optimizer",
]


def learning_rate_schedule(optim: OptimConfig, total_steps: int):
    """step -> learning rate: linear warm-up to `lr` (step 0 already trains, at lr / warmup_steps), then
    cosine decay to `lr * min_lr_ratio` at `total_steps`, constant after."""
    lr, warmup, floor = optim.lr, optim.warmup_steps, optim.min_lr_ratio
    decay_steps = max(1, total_steps - warmup)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = lr * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def trainable_paths(spec_tree: dict, train_cfg: TrainConfig) -> tuple[str, ...]:
    """'/'-joined paths of the parameters this run trains (sorted). Raises if none matches."""
    paths = tuple(sorted(p for p in flatten(spec_tree) if train_cfg.is_trainable(p)))
    if not paths:
        raise ValueError(
            f"no parameter matches train_patterns {list(train_cfg.effective_train_patterns)} minus freeze_patterns "
            f"{list(train_cfg.freeze_patterns)} (stage {train_cfg.stage!r}); parameter paths look like "
            "'thinker/model/layers/self_attn/q_proj/kernel'"
        )
    return paths


def partition(params: dict, paths) -> tuple[dict, dict]:
    """(trainable subtree, frozen subtree): nested dicts holding the leaves at `paths` and the rest."""
    flat = flatten(params)
    keep = set(paths)
    trainable = {p: v for p, v in flat.items() if p in keep}
    frozen = {p: v for p, v in flat.items() if p not in keep}
    return unflatten(trainable), unflatten(frozen)


def combine(trainable: dict, frozen: dict) -> dict:
    """Inverse of `partition`."""
    return unflatten({**flatten(frozen), **flatten(trainable)})


def _non_layer_rank(spec: ParamSpec) -> int:
    return sum(1 for axis in spec.axes if axis != "layers")


def decay_mask(spec_tree: dict, paths, optim: OptimConfig) -> dict:
    """Nested bools over the trainable subtree: True where AdamW decays the weight."""
    flat = flatten(spec_tree)
    out = {}
    for p in paths:
        spec = flat[p]
        out[p] = _non_layer_rank(spec) >= 2 and not any(re.search(pat, p) for pat in optim.no_decay_patterns)
    return unflatten(out)


def make_optimizer(train_cfg: TrainConfig, spec_tree: dict, paths) -> tuple[optax.GradientTransformation, Any]:
    """(optax transformation over the trainable subtree, learning-rate schedule)."""
    optim = train_cfg.optim
    schedule = learning_rate_schedule(optim, train_cfg.total_steps)
    parts = []
    if optim.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                             mask=decay_mask(spec_tree, paths, optim)))
    return optax.chain(*parts), schedule


def global_norm(tree) -> jax.Array:
    """fp32 global L2 norm of a pytree."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.float32(0.0)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
