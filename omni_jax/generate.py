"""Token generation: a jitted prefill and a jitted decode loop over a preallocated KV cache.

Shapes are static per (batch, prompt bucket, max_new_tokens): a batch of the same bucket reuses
the compiled functions, and the decode loop is one `lax.while_loop` with no per-step recompilation
or host round trip. Prompts are left-padded, so every row writes its next token to the same cache
slot.

Sampling follows the reference's order of logits processors: repetition penalty (over every token
of the sequence, prompt and padding included, as transformers does), then temperature, top-k,
top-p, and a categorical draw; greedy decoding takes the argmax after the repetition penalty.
Rows that emit an end-of-sequence id are finished: their later tokens are `pad_token_id`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["SamplingConfig", "sample_next", "first_argmax", "DecodeState", "decode_loop"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings; defaults are transformers' `GenerationConfig` defaults."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def _apply_repetition_penalty(logits_bv, seen_bv, penalty: float):
    if penalty == 1.0:
        return logits_bv
    penalised = jnp.where(logits_bv < 0, logits_bv * penalty, logits_bv / penalty)
    return jnp.where(seen_bv, penalised, logits_bv)


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis, int32: the first index of the maximum (of the first NaN if any).

    Written as a max and a min over indices: XLA:CPU lowers `jnp.argmax`'s (value, index) pair
    reduction to a scalar loop. On (4, 8192) logits, jitted alone, 128 us a call against 28 us for
    these two reductions (dispatch included); in the benchmark's decode step it was ~200 us, ~2% of
    the step (bench/RESULTS.md, session 13).
    """
    top = jnp.max(x, axis=-1, keepdims=True)  # NaN if the row has one
    hit = (x == top) | jnp.isnan(x)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, index, x.shape[-1] - 1), axis=-1)


def sample_next(logits_bv: jax.Array, seen_bv: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next token (B,) int32 from last-position logits (B, V) (fp32 inside)."""
    logits = _apply_repetition_penalty(logits_bv.astype(jnp.float32), seen_bv, cfg.repetition_penalty)
    if not cfg.do_sample:
        return first_argmax(logits)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)  # ascending, as the reference
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative <= (1.0 - cfg.top_p)
        remove_sorted = remove_sorted.at[:, -1].set(False)
        # Threshold form of "remove these sorted entries": the smallest kept logit per row.
        kept_min = jnp.min(jnp.where(remove_sorted, jnp.inf, sorted_logits), axis=-1, keepdims=True)
        logits = jnp.where(logits < kept_min, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
    step: jax.Array  # () int32, tokens generated so far (the first comes from prefill)
    tokens: jax.Array  # (B, max_new) int32 output buffer
    last_token: jax.Array  # (B,) int32
    done: jax.Array  # (B,) bool
    seen: jax.Array  # (B, V) bool, for the repetition penalty
    cache: object  # model-specific cache pytree
    key_valid: jax.Array  # (B, S_max) bool
    next_position: jax.Array  # (3, B) fp32 position ids of the next token
    key: jax.Array  # PRNG key


def mark_seen(seen_bv: jax.Array, tokens_b: jax.Array) -> jax.Array:
    return seen_bv | jax.nn.one_hot(tokens_b, seen_bv.shape[-1], dtype=bool)


def finish_token(token_b, done_b, eos_ids: tuple[int, ...], pad_id: int):
    """Replaces tokens of finished rows with `pad_id` and updates `done` with new EOS hits."""
    token_b = jnp.where(done_b, pad_id, token_b)
    hit = jnp.zeros_like(done_b)
    for eos in eos_ids:
        hit = hit | (token_b == eos)
    return token_b, done_b | hit


@functools.partial(jax.jit, static_argnames=("step_fn", "prompt_len", "sampling", "eos_ids", "pad_id"), donate_argnums=(0,))
def decode_loop(
    state: DecodeState,
    params: dict,
    *,
    step_fn: Callable,
    prompt_len: int,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> DecodeState:
    """Generates until every row is done or the output buffer is full.

    step_fn(params, tokens_b, positions_3b1, cache, cache_index, key_valid) -> (logits (B, V), cache)
    runs the model on one new token per row.
    """
    max_new = state.tokens.shape[1]

    def cond(s: DecodeState):
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s: DecodeState):
        cache_index = prompt_len + s.step - 1
        key_valid = s.key_valid.at[:, cache_index].set(True)
        logits, cache = step_fn(params, s.last_token, s.next_position[:, :, None], s.cache, cache_index, key_valid)
        key, sub = jax.random.split(s.key)
        token = sample_next(logits, s.seen, sub, sampling)
        token, done = finish_token(token, s.done, eos_ids, pad_id)
        return DecodeState(
            step=s.step + 1,
            tokens=s.tokens.at[:, s.step].set(token),
            last_token=token,
            done=done,
            seen=mark_seen(s.seen, token),
            cache=cache,
            key_valid=key_valid,
            next_position=s.next_position + 1.0,
            key=key,
        )

    return jax.lax.while_loop(cond, body, state)
