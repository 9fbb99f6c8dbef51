"""Mixture-of-experts feed-forward: softmax router, top-k, SwiGLU experts, optional shared expert.

Routing follows the reference exactly (pitfall P9): router logits in the activation dtype, softmax
in fp32, top-k, renormalise when `norm_topk_prob`, cast the weights back to the logits' dtype.

Two expert paths, equal up to summation order:
  * grouped: sort the (token, choice) assignments by expert, run gate/up/down as three grouped
    matmuls over the sorted rows (the `grouped_matmul` entry point), unsort and combine.
  * dense: every expert on every token, combined with a dense (T, E) weight matrix. Exact and slow;
    the test oracle.

Under a multi-device ambient mesh (`jax.set_mesh`) with `expert_parallel="auto"`, the routed experts
run in `shard_map` instead (`nn/expert_parallel.py`): tokens stay on their shard and, over an
`expert` axis > 1, go to the shard that owns their expert by all-to-all. The shared expert stays
outside (XLA partitions it like any MLP).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from omni_jax.nn.grouped_matmul import grouped_swiglu
from omni_jax.nn.params import ParamSpec

__all__ = ["moe_specs", "shared_expert_specs", "route", "moe_forward", "Routing"]


def moe_specs(hidden: int, intermediate: int, num_experts: int, std: float) -> dict:
    """Router + stacked experts. Router kernel (hidden, E); experts (E, in, out)."""
    return {
        "gate": {"kernel": ParamSpec((hidden, num_experts), ("embed", None), std=std)},
        "experts": {
            "gate_proj": ParamSpec((num_experts, hidden, intermediate), ("expert", "embed", "mlp"), std=std),
            "up_proj": ParamSpec((num_experts, hidden, intermediate), ("expert", "embed", "mlp"), std=std),
            "down_proj": ParamSpec((num_experts, intermediate, hidden), ("expert", "mlp", "embed"), std=std),
        },
    }


def shared_expert_specs(hidden: int, intermediate: int, std: float) -> dict:
    """The talker's sigmoid-gated shared SwiGLU expert."""
    return {
        "shared_expert": {
            "gate_proj": {"kernel": ParamSpec((hidden, intermediate), ("embed", "mlp"), std=std)},
            "up_proj": {"kernel": ParamSpec((hidden, intermediate), ("embed", "mlp"), std=std)},
            "down_proj": {"kernel": ParamSpec((intermediate, hidden), ("mlp", "embed"), std=std)},
        },
        "shared_expert_gate": {"kernel": ParamSpec((hidden, 1), ("embed", None), std=std)},
    }


class Routing(NamedTuple):
    logits: jax.Array  # (T, E) router logits, activation dtype (for the load-balancing loss)
    weights: jax.Array  # (T, k) combine weights, logits dtype
    experts: jax.Array  # (T, k) int32 expert index


def route(x_td: jax.Array, router_kernel_de: jax.Array, top_k: int, norm_topk_prob: bool) -> Routing:
    logits = jnp.dot(x_td, router_kernel_de.astype(x_td.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(logits, weights.astype(logits.dtype), experts.astype(jnp.int32))


def _experts_grouped(x_td, experts, routing: Routing, impl: str, layer):
    num_tokens, hidden = x_td.shape
    top_k = routing.experts.shape[-1]
    num_experts = experts["gate_proj"].shape[-3]
    dtype = x_td.dtype

    flat_expert = routing.experts.reshape(-1)  # (T*k,)
    order = jnp.argsort(flat_expert, stable=True)
    # Where each assignment landed in the sorted rows: reading the outputs back is then a gather
    # (an int scatter of T*k indices here instead of a (T*k, D) float scatter below).
    position = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    x_sorted = jnp.take(x_td, order // top_k, axis=0)  # (T*k, D)
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    y_sorted = grouped_swiglu(
        x_sorted, experts["gate_proj"], experts["up_proj"], experts["down_proj"], group_sizes,
        impl=impl, layer=layer, max_group_size=num_tokens,
    )  # (T*k, D)
    y = jnp.take(y_sorted, position, axis=0).reshape(num_tokens, top_k, hidden)
    weights = routing.weights.astype(dtype)
    # The k-term sum written out (in order, fp32) so that it fuses with the gather above.
    out = (y[:, 0] * weights[:, 0:1]).astype(jnp.float32)
    for j in range(1, top_k):
        out = out + (y[:, j] * weights[:, j:j + 1]).astype(jnp.float32)
    return out.astype(dtype)


def _experts_dense(x_td, experts, routing: Routing, layer):
    if layer is not None:
        experts = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False), experts)
    num_experts = experts["gate_proj"].shape[0]
    dtype = x_td.dtype
    gate = jnp.einsum("td,edf->etf", x_td, experts["gate_proj"].astype(dtype))
    up = jnp.einsum("td,edf->etf", x_td, experts["up_proj"].astype(dtype))
    y = jnp.einsum("etf,efd->etd", jax.nn.silu(gate) * up, experts["down_proj"].astype(dtype))
    one_hot = jax.nn.one_hot(routing.experts, num_experts, dtype=dtype)  # (T, k, E)
    combine = jnp.einsum("tk,tke->et", routing.weights.astype(dtype), one_hot)
    return jnp.einsum("et,etd->td", combine, y, preferred_element_type=jnp.float32).astype(dtype)


def _swiglu(x, p):
    dtype = x.dtype
    gate = jnp.dot(x, p["gate_proj"]["kernel"].astype(dtype))
    up = jnp.dot(x, p["up_proj"]["kernel"].astype(dtype))
    return jnp.dot(jax.nn.silu(gate) * up, p["down_proj"]["kernel"].astype(dtype))


def moe_forward(
    x_btd: jax.Array,
    params: dict,
    *,
    top_k: int,
    norm_topk_prob: bool,
    impl: str = "grouped",
    grouped_matmul_impl: str = "auto",
    layer: jax.Array | int | None = None,
    expert_parallel: str = "auto",
    capacity_factor: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """MoE block on x (B, T, D). Returns (output (B, T, D), router logits (B*T, E)).

    `params` holds `gate`, `experts` and, for the talker, `shared_expert` and `shared_expert_gate`.
    With `layer`, `params["experts"]` are the whole stacked (L, E, in, out) tensors and `layer`
    selects one; the decoder passes them so to avoid copying a layer's expert stack per layer.
    expert_parallel: "auto" runs the experts expert-parallel when the ambient mesh has more than one
    device and its `expert` axis divides E (`impl` is then unused: the shards use the grouped path),
    "none" never. capacity_factor: that path's per-expert capacity (None: dropless; see
    `expert_parallel.expert_capacity`); the single-device paths never drop.
    """
    b, t, d = x_btd.shape
    x_td = x_btd.reshape(b * t, d)
    if expert_parallel not in ("auto", "none"):
        raise ValueError(f"expert_parallel {expert_parallel!r}; expected 'auto' or 'none'")
    from omni_jax.nn import expert_parallel as ep  # noqa: PLC0415  (it imports `route` from here)

    if expert_parallel == "auto" and ep.can_expert_parallel(params["experts"]["gate_proj"].shape[-3]):
        out = ep.expert_parallel_moe(
            x_td, params, top_k=top_k, norm_topk_prob=norm_topk_prob, layer=layer,
            capacity_factor=capacity_factor, grouped_matmul_impl=grouped_matmul_impl,
        )
        return _add_shared(out.y, x_td, params).reshape(b, t, d), out.router_logits
    routing = route(x_td, params["gate"]["kernel"], top_k, norm_topk_prob)
    if impl == "dense":
        y = _experts_dense(x_td, params["experts"], routing, layer)
    elif impl == "grouped":
        y = _experts_grouped(x_td, params["experts"], routing, grouped_matmul_impl, layer)
    else:
        raise ValueError(f"moe impl {impl!r}; expected 'grouped' or 'dense'")
    return _add_shared(y, x_td, params).reshape(b, t, d), routing.logits


def _add_shared(y_td, x_td, params):
    """y plus the talker's sigmoid-gated shared expert of x, when there is one."""
    if "shared_expert" not in params:
        return y_td
    shared = _swiglu(x_td, params["shared_expert"])
    gate = jax.nn.sigmoid(jnp.dot(x_td, params["shared_expert_gate"]["kernel"].astype(x_td.dtype)))
    return y_td + gate * shared
