"""Pure-JAX windowed attention: the CPU path of the model and the oracle of the kernel tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.windowed_attention.masks import effective_window


def attention_mask(seq_len: int, *, segment_ids=None, causal=False, window=None) -> jax.Array:
  """(batch or 1, seq, seq) bool: may query i attend to key j."""
  left, right = effective_window(causal, window)
  i = jnp.arange(seq_len)[:, None]
  j = jnp.arange(seq_len)[None, :]
  allowed = jnp.ones((seq_len, seq_len), bool)
  if left is not None:
    allowed &= j >= i - left
  if right is not None:
    allowed &= j <= i + right
  allowed = allowed[None]
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return allowed


def windowed_attention_reference(q, k, v, *, segment_ids=None, causal=False, window=None,
                                 scale=None):
  """Masked softmax attention, materialising the (seq, seq) scores.

  Args:
    q: (batch, seq, q_heads, head_dim).
    k, v: (batch, seq, kv_heads, head_dim), q_heads % kv_heads == 0 (grouped-query attention:
      q head h uses kv head h // (q_heads // kv_heads)).
    segment_ids: optional (batch, seq) int32; attention only between equal ids.
    causal: keys j <= i only.
    window: optional (left, right): query i sees keys i - left <= j <= i + right; either may be
      None (unlimited). Combined with `causal`, right is capped at 0.
    scale: logit scale, default head_dim ** -0.5.

  Returns:
    (batch, seq, q_heads, head_dim) in q's dtype. A query that may attend to no key gets 0.

  Scores and softmax are fp32 (matmuls accumulate in fp32); the probabilities are cast to v's
  dtype before the value matmul, as PyTorch's eager attention does in bf16.
  """
  batch, seq, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if q_heads % kv_heads:
    raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
  if scale is None:
    scale = head_dim ** -0.5
  rep = q_heads // kv_heads
  qg = q.reshape(batch, seq, kv_heads, rep, head_dim)
  logits = jnp.einsum("bqhrd,bkhd->bhrqk", qg, k, preferred_element_type=jnp.float32) * scale
  allowed = attention_mask(seq, segment_ids=segment_ids, causal=causal, window=window)
  allowed = allowed[:, None, None]  # (b, 1, 1, q, k)
  # Softmax over allowed keys only; a row with no allowed key has denominator 0 -> output 0.
  masked = jnp.where(allowed, logits, -jnp.inf)
  row_max = jnp.max(masked, axis=-1, keepdims=True)
  # The max only stabilises exp; the softmax does not depend on it, so no gradient through it.
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  p = jnp.where(allowed, jnp.exp(masked - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum("bhrqk,bkhd->bqhrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(batch, seq, q_heads, head_dim).astype(q.dtype)
