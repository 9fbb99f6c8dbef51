"""Thinker training losses: next-token cross-entropy on assistant tokens and the MoE load-balancing loss.

Both are written as *sums plus counts* so that a batch split into micro-batches (gradient
accumulation) or over devices gives exactly the statistics of the whole global batch:

  * cross-entropy: sum of -log p(label) over label tokens / number of label tokens of the global
    batch (the reference's `ForCausalLMLoss`, a mean over non-ignored tokens);
  * load balancing (the reference's `load_balancing_loss_func`, Switch-style, global batch):
        aux = E * sum_e f_e * P_e,
        f_e = (top-k assignments to expert e, over all layers and real tokens) / (layers * tokens),
        P_e = (sum of softmax probabilities of e, same rows) / (layers * tokens).
    f is a count (no gradient, as in the reference, where it comes from `topk` indices); P carries the
    gradient. `RouterStats` holds the sums; `load_balancing_from_stats` forms the loss.

Labels follow the data pipeline's convention: `labels[b, t]` is the id position t must predict
(already shifted, = input_ids[b, t + 1] on assistant answer tokens), -100 elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "IGNORE_INDEX", "cross_entropy_sums", "next_token_loss", "RouterStats", "router_stats",
    "load_balancing_from_stats", "load_balancing_loss",
]

IGNORE_INDEX = -100


def cross_entropy_sums(logits_bsv: jax.Array, labels_bs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over label tokens of -log softmax(logits)[label] in fp32, number of label tokens (fp32)).

    logits_bsv: (B, S, V) any float dtype (upcast to fp32 before the log-softmax, as the reference).
    labels_bs: (B, S) int, IGNORE_INDEX (-100) where there is no target.
    """
    logits = logits_bsv.astype(jnp.float32)
    valid = labels_bs != IGNORE_INDEX
    safe = jnp.where(valid, labels_bs, 0).astype(jnp.int32)
    # -log softmax[label] = logsumexp(logits) - logits[label]: no (B, S, V) log-prob array is kept.
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, lse - picked, 0.0)
    return jnp.sum(nll), jnp.sum(valid.astype(jnp.float32))


def next_token_loss(logits_bsv: jax.Array, labels_bs: jax.Array) -> jax.Array:
    """Mean cross-entropy over label tokens (0 when there are none)."""
    total, count = cross_entropy_sums(logits_bsv, labels_bs)
    return total / jnp.maximum(count, 1.0)


class RouterStats(NamedTuple):
    """Load-balancing sums over layers and real tokens (add them across micro-batches / devices)."""

    counts: jax.Array  # (E,) fp32 top-k assignments per expert
    prob_sums: jax.Array  # (E,) fp32 summed router probabilities per expert
    rows: jax.Array  # () fp32 layers x real tokens


def router_stats(router_logits_lte: jax.Array, mask_t: jax.Array | None, top_k: int) -> RouterStats:
    """Sums for the load-balancing loss from stacked router logits.

    router_logits_lte: (L, T, E) router logits of every MoE layer (T = B*S tokens, row-major).
    mask_t: (T,) 1 for real tokens (the attention mask, flattened), or None for all tokens.
    """
    num_layers, tokens, num_experts = router_logits_lte.shape
    probs = jax.nn.softmax(router_logits_lte.astype(jnp.float32), axis=-1)
    _, experts = jax.lax.top_k(probs, top_k)  # (L, T, k)
    mask = jnp.ones((tokens,), jnp.float32) if mask_t is None else mask_t.reshape(tokens).astype(jnp.float32)
    # A scatter-add, not a (L, T, k, E) one-hot: that would be the largest array of the step.
    weights = jnp.broadcast_to(mask[None, :, None], experts.shape)
    counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(weights.reshape(-1))
    prob_sums = jnp.einsum("lte,t->e", probs, mask)
    rows = num_layers * jnp.sum(mask)
    return RouterStats(jax.lax.stop_gradient(counts), prob_sums, jax.lax.stop_gradient(rows))


def load_balancing_from_stats(stats: RouterStats, counts: jax.Array | None = None, rows: jax.Array | None = None):
    """E * sum_e f_e * P_e from sums. `counts`/`rows` override the assignment statistics (the global
    batch's, when `stats` holds one micro-batch's probability sums normalised globally)."""
    counts = stats.counts if counts is None else counts
    rows = stats.rows if rows is None else rows
    rows = jnp.maximum(rows, 1.0)
    num_experts = stats.prob_sums.shape[-1]
    return num_experts * jnp.sum((counts / rows) * (stats.prob_sums / rows))


def load_balancing_loss(router_logits_lte: jax.Array, attention_mask_bs: jax.Array | None, top_k: int) -> jax.Array:
    """The reference `load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)`:
    router_logits_lte (L, B*S, E), attention_mask (B, S) or None."""
    mask = None if attention_mask_bs is None else attention_mask_bs.reshape(-1)
    return load_balancing_from_stats(router_stats(router_logits_lte, mask, top_k))
