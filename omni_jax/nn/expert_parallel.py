"""Expert parallelism: the MoE experts split over the mesh's `expert` axis, tokens moved by all-to-all.

Runs inside `jax.shard_map` over the ambient mesh (`jax.set_mesh`). Tokens enter split over the
batch axes (data, expert); the router's weights are replicated, expert stacks are split on their
expert dimension over `expert` (and on their hidden `mlp` dimension over `tensor` when it divides).
Each shard:

  1. routes its own tokens (softmax router, top-k; `moe.route`, the same numerics as one device);
  2. sorts its (token, choice) assignments by expert; an assignment is *kept* when its rank among
     this shard's assignments to the same expert is below the expert capacity C (dropless: C = the
     shard's token count, which nothing exceeds because a token picks an expert at most once);
  3. sends kept assignments to the shard that owns their expert (expert e lives on shard
     e // (E / n_expert)) by all-to-all over `expert`;
  4. runs its local experts on what it received with `grouped_swiglu` (sum of the partial
     down-projections over `tensor` when the hidden dimension is split there);
  5. returns the results by the reverse all-to-all and combines them with the routing weights
     (fp32 sum over the k choices, as `moe._experts_grouped`). A dropped assignment contributes
     zero: the decoder's residual connection carries the token on, as in GShard.

Capacity (`capacity_factor` c): C = min(T, ceil(c * T * k / E)) for T tokens per shard, so c = E / k
never drops and c = 1 is GShard's "capacity factor 1" (each expert takes its fair share of each
shard's assignments). Lower-ranked tokens (earlier in the shard's token order) win.

Two exchanges, chosen by platform (`exchange="auto"`):
  * "ragged" (GPU, TPU): `jax.lax.ragged_all_to_all` sends exactly the kept rows; per-destination
    counts are all-gathered first to find the receive offsets. The receive buffer is sized for the
    worst case (every shard sends its most to this one).
  * "dense" (CPU, where XLA has no ragged all-to-all): a fixed (n_expert, B, D) send buffer per
    shard, B = min(T * min(k, E_local), E_local * C) rows per destination (the most any shard can
    send to one destination), exchanged by `jax.lax.all_to_all`.
  * "ragged_emulated": the ragged bookkeeping with the transfer done by a dense all-to-all; it
    exists so that the ragged path's offsets are tested on CPU.
All are differentiable (all-to-all and ragged all-to-all transpose to themselves reversed).

With an `expert` axis of 1 (a data/tensor mesh) there is no exchange: every shard runs all experts on
its own tokens, so the token sort stays local instead of XLA partitioning a global one.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from omni_jax import sharding
from omni_jax.nn.grouped_matmul import grouped_swiglu
from omni_jax.nn.moe import route

__all__ = ["EPOutput", "expert_parallel_moe", "expert_capacity", "can_expert_parallel", "resolve_exchange"]


class EPOutput(NamedTuple):
    y: jax.Array  # (T, D) combined expert outputs, x's dtype
    router_logits: jax.Array  # (T, E) router logits, x's dtype
    num_dropped: jax.Array  # () int32 (token, expert) assignments dropped for capacity, over the whole mesh


def expert_capacity(tokens_per_shard: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Per-shard, per-expert capacity C (static): T when dropless, else min(T, ceil(c * T * k / E))."""
    if capacity_factor is None:
        return tokens_per_shard
    return max(1, min(tokens_per_shard, math.ceil(capacity_factor * tokens_per_shard * top_k / num_experts)))


def resolve_exchange(exchange: str) -> str:
    if exchange == "auto":
        return "ragged" if jax.default_backend() in ("gpu", "tpu") else "dense"
    if exchange not in ("dense", "ragged", "ragged_emulated"):
        raise ValueError(f"expert-parallel exchange {exchange!r}; expected auto, dense, ragged, ragged_emulated")
    return exchange


def can_expert_parallel(num_experts: int, mesh=None) -> bool:
    """Whether the shard_map path applies: a multi-device ambient mesh whose `expert` axis divides E."""
    mesh = sharding.ambient_mesh() if mesh is None else mesh
    if mesh is None or mesh.size == 1:
        return False
    return num_experts % sharding.mesh_axis_size("expert", mesh) == 0


def _segment_count(ids, num_segments: int):
    """Occurrences of each id in [0, num_segments); other ids are ignored."""
    return jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=num_segments).astype(jnp.int32)


def _exclusive_cumsum(x):
    return jnp.cumsum(x) - x


def _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name):
    """`jax.lax.ragged_all_to_all` semantics from a dense all-to-all (CPU has no ragged one)."""
    n = output_offsets.shape[0]
    rows = operand.shape[0]
    r = jnp.arange(rows)
    chunks = jnp.take(operand, jnp.clip(input_offsets[:, None] + r[None], 0, rows - 1), axis=0)  # (n, rows, ...)
    chunks = jnp.where((r[None] < send_sizes[:, None]).reshape(n, rows, *([1] * (operand.ndim - 1))), chunks, 0)
    recv = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # block i: from source i
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where source i's rows land here
    target = jnp.where(r[None] < recv_sizes[:, None], offsets[:, None] + r[None], output.shape[0])
    return output.at[target.reshape(-1)].set(recv.reshape(n * rows, *operand.shape[1:]), mode="drop")


def _ep_body(
    x_td, valid_t, router_de, gate_w, up_w, down_w, *,
    top_k, norm_topk_prob, num_experts, capacity_factor, impl, exchange, token_axes, tensor_split,
):
    """One shard's work; see the module docstring. Shapes are per shard."""
    n_ep = jax.lax.axis_size("expert")
    e_local = num_experts // n_ep
    tokens, hidden = x_td.shape
    dtype = x_td.dtype
    num_assign = tokens * top_k

    routing = route(x_td, router_de, top_k, norm_topk_prob)
    flat_expert = jnp.where(jnp.repeat(valid_t, top_k), routing.experts.reshape(-1), num_experts)  # padding: E
    order = jnp.argsort(flat_expert, stable=True)  # by expert, token order within an expert
    e_sorted = flat_expert[order]
    live = e_sorted < num_experts
    e_clipped = jnp.minimum(e_sorted, num_experts - 1)
    per_expert = _segment_count(e_sorted, num_experts)
    rank = jnp.arange(num_assign) - _exclusive_cumsum(per_expert)[e_clipped]
    capacity = expert_capacity(tokens, top_k, num_experts, capacity_factor)
    keep = live & (rank < capacity)
    num_dropped = jax.lax.psum(jnp.sum(live & ~keep).astype(jnp.int32), token_axes)

    dest = e_clipped // e_local  # owning expert shard
    local_id = jnp.where(keep, e_clipped % e_local, e_local)  # e_local: no expert (empty row)
    keep_i = keep.astype(jnp.int32)
    kept_before = _exclusive_cumsum(keep_i)  # compact index among kept rows (grouped by dest)
    per_dest = jax.ops.segment_sum(keep_i, dest, num_segments=n_ep)  # (n_ep,)
    dest_start = _exclusive_cumsum(per_dest)
    x_sorted = jnp.take(x_td, order // top_k, axis=0)  # (A, D)
    # Most rows any one shard can send to one destination (static): each token reaches at most
    # min(k, e_local) of that destination's experts, and each expert takes at most C of the shard's rows.
    per_dest_max = min(tokens * min(top_k, e_local), e_local * capacity)
    recv_rows = n_ep * per_dest_max

    if exchange == "dense":
        slot = jnp.where(keep, dest * per_dest_max + kept_before - dest_start[dest], recv_rows)
        send_x = jnp.zeros((recv_rows, hidden), dtype).at[slot].set(x_sorted, mode="drop")
        send_id = jnp.full((recv_rows,), e_local, jnp.int32).at[slot].set(local_id, mode="drop")
        recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True)
        recv_id = jax.lax.all_to_all(send_id, "expert", 0, 0, tiled=True)
    else:
        ragged = jax.lax.ragged_all_to_all if exchange == "ragged" else _ragged_all_to_all_emulated
        compact = jnp.where(keep, kept_before, num_assign)
        send_x = jnp.zeros((num_assign, hidden), dtype).at[compact].set(x_sorted, mode="drop")
        send_id = jnp.full((num_assign,), e_local, jnp.int32).at[compact].set(local_id, mode="drop")
        sizes = jax.lax.all_gather(per_dest, "expert")  # (src, dst) rows
        me = jax.lax.axis_index("expert")
        recv_sizes = sizes[:, me]
        recv_offsets = _exclusive_cumsum(recv_sizes)  # source i's rows land here, packed
        send_out_offsets = (jnp.cumsum(sizes, axis=0) - sizes)[me]  # where my rows land on each destination
        recv_x = ragged(send_x, jnp.zeros((recv_rows, hidden), dtype), dest_start, per_dest, send_out_offsets,
                        recv_sizes, axis_name="expert")
        recv_id = ragged(send_id, jnp.full((recv_rows,), e_local, jnp.int32), dest_start, per_dest,
                         send_out_offsets, recv_sizes, axis_name="expert")

    local_order = jnp.argsort(recv_id, stable=True)
    group_sizes = _segment_count(recv_id, e_local)
    y_sorted = grouped_swiglu(
        jnp.take(recv_x, local_order, axis=0), gate_w, up_w, down_w, group_sizes, impl=impl,
        max_group_size=min(recv_rows, n_ep * capacity),
    )
    y_recv = jnp.zeros_like(y_sorted).at[local_order].set(y_sorted)
    if tensor_split:
        y_recv = jax.lax.psum(y_recv, "tensor")  # partial down-projections over the split hidden dim

    if exchange == "dense":
        y_back = jax.lax.all_to_all(y_recv, "expert", 0, 0, tiled=True)  # block j: my rows sent to j
        y_kept = jnp.take(y_back, jnp.minimum(slot, recv_rows - 1), axis=0)
    else:
        # Reverse trip: source i's rows go back to where they started in i's send buffer.
        src_send_start = (jnp.cumsum(sizes, axis=1) - sizes)[:, me]
        y_back = ragged(y_recv, jnp.zeros((num_assign, hidden), dtype), recv_offsets, recv_sizes, src_send_start,
                        per_dest, axis_name="expert")
        y_kept = jnp.take(y_back, jnp.minimum(compact, num_assign - 1), axis=0)
    y_assign = jnp.where(keep[:, None], y_kept, 0)
    y = jnp.zeros_like(y_assign).at[order].set(y_assign).reshape(tokens, top_k, hidden)
    weighted = y * routing.weights[..., None].astype(dtype)
    return jnp.sum(weighted.astype(jnp.float32), axis=1).astype(dtype), routing.logits, num_dropped


def expert_parallel_moe(
    x_td: jax.Array,
    params: dict,
    *,
    top_k: int,
    norm_topk_prob: bool,
    layer: jax.Array | int | None = None,
    capacity_factor: float | None = None,
    grouped_matmul_impl: str = "auto",
    exchange: str = "auto",
) -> EPOutput:
    """Routed experts of x (T, D) in `shard_map` over the ambient mesh (see the module docstring).

    params: `gate/kernel` (D, E) and `experts/{gate,up,down}_proj` ([L,] E, in, out), with `layer`
    selecting the layer of stacked weights (indexed before the shard_map, so that FSDP gathers one
    layer's experts at a time). Needs `can_expert_parallel(E)`. T need not divide the shard count:
    the tokens are padded, and padding is routed nowhere.
    Returns EPOutput(y (T, D), router logits (T, E), num_dropped ()).
    """
    mesh = sharding.ambient_mesh()
    experts = params["experts"]
    num_experts = experts["gate_proj"].shape[-3]
    if not can_expert_parallel(num_experts, mesh):
        raise ValueError(f"expert parallelism needs a multi-device ambient mesh whose expert axis divides "
                         f"{num_experts} experts (jax.set_mesh); got {None if mesh is None else dict(mesh.shape)}")
    shape = dict(mesh.shape)
    token_axes = tuple(a for a in sharding.BATCH_AXES if a in shape)
    if "expert" not in shape:
        raise ValueError(f"expert parallelism needs a mesh with an 'expert' axis; got axes {tuple(shape)}")
    n_tok = math.prod(shape[a] for a in token_axes)
    n_tp = shape.get("tensor", 1)
    mlp = experts["gate_proj"].shape[-1]
    tensor_split = n_tp > 1 and mlp % n_tp == 0
    tp = "tensor" if tensor_split else None

    tokens = x_td.shape[0]
    padded = -(-tokens // n_tok) * n_tok
    x_pad = jnp.pad(x_td, ((0, padded - tokens), (0, 0)))
    valid = jnp.arange(padded) < tokens
    gate_w, up_w, down_w = experts["gate_proj"], experts["up_proj"], experts["down_proj"]
    if layer is not None:
        # Index this layer's (E, in, out) matrices *before* the shard_map. Its in_specs keep the
        # `embed` dimension whole, so handing it the whole (L, E, in, out) stack makes FSDP (embed
        # over `data`) all-gather every layer's experts at once, hoisted out of the layer scan
        # (3 x 36 GiB per device for the 30B thinker on 64x1x1:fsdp). The single-device path keeps
        # the whole-stack indexing inside the grouped matmul (a CPU speed win; `decoder._stack`).
        gate_w, up_w, down_w = (jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)
                                for w in (gate_w, up_w, down_w))

    body = functools.partial(
        _ep_body, top_k=top_k, norm_topk_prob=norm_topk_prob, num_experts=num_experts,
        capacity_factor=capacity_factor, impl=grouped_matmul_impl, exchange=resolve_exchange(exchange),
        token_axes=token_axes, tensor_split=tensor_split,
    )

    mapped = jax.shard_map(
        body,
        in_specs=(
            P(token_axes, None), P(token_axes), P(),
            P("expert", None, tp), P("expert", None, tp), P("expert", tp, None),
        ),
        out_specs=(P(token_axes, None), P(token_axes, None), P()),
        # Not check_vma=True, although grouped_swiglu's CPU loop now type-checks under it: (1) the
        # Pallas kernels' `pallas_call` out_shapes carry no varying-axes type, which it requires; (2)
        # it makes the backward of the implicit invariant->varying casts psums *inside* the body
        # (weight cotangents over `data`, router over the token axes), which XLA:CPU may order
        # differently from the all-to-all on different devices: the (2,2,2) gradient test then
        # deadlocked in the collectives' rendezvous. Replication is exact here by construction.
        check_vma=False,
    )
    y, logits, dropped = mapped(x_pad, valid, params["gate"]["kernel"], gate_w, up_w, down_w)
    return EPOutput(y[:tokens], logits[:tokens], dropped)
