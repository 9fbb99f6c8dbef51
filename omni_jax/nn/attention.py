"""The one attention entry point.

Model code asks for attention by *mask structure*: causal or bidirectional, restricted to equal
segment ids (padding, packed sequences, audio windows, video frames), optionally within a sliding
window. `self_attention` dispatches to the Pallas flash kernel (`pallas_kernels.windowed_attention`)
on GPU/TPU and to the pure-XLA reference here on CPU; `cached_attention` serves decode steps over a
preallocated KV cache.

Shapes: q (B, Sq, Hq, D); k, v (B, Sk, Hkv, D) with Hq % Hkv == 0 (grouped-query attention, computed
without materialising repeated K/V). Softmax runs in fp32 (pitfall P10). A query with no visible key
(a padding row) yields zeros rather than NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from omni_jax import sharding

__all__ = ["self_attention", "cached_attention", "masked_attention", "segment_attention_in_blocks", "structure_mask"]

_MASKED = -1e30  # finite: a fully masked row stays NaN-free


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_bqk: jax.Array, scale: float) -> jax.Array:
    """Reference attention with an explicit boolean mask (B, Sq, Sk). Returns (B, Sq, Hq, D)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    groups = hq // hkv
    # Heads-major layout, the query groups of a KV head stacked along the rows: every product is
    # then a plain batched 2-D matmul ((groups * Sq, D) x (D, Sk)), which XLA:CPU runs well; the
    # 5-D einsum form measured ~1.5-2x slower per vision layer.
    q_bhrd = q.reshape(b, sq, hkv, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, groups * sq, d)
    k_bhkd = k.transpose(0, 2, 1, 3)
    v_bhkd = v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bhrd,bhkd->bhrk", q_bhrd, k_bhkd, preferred_element_type=jnp.float32) * scale
    logits = logits.reshape(b, hkv, groups, sq, sk)
    mask = mask_bqk[:, None, None, :, :]
    logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(v.dtype).reshape(b, hkv, groups * sq, sk)
    out = jnp.einsum("bhrk,bhkd->bhrd", probs, v_bhkd, preferred_element_type=jnp.float32)
    out = out.reshape(b, hkv, groups, sq, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, sq, hq, d).astype(q.dtype)


def structure_mask(
    q_len: int,
    k_len: int,
    *,
    segment_ids_q: jax.Array | None = None,
    segment_ids_k: jax.Array | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    batch: int = 1,
) -> jax.Array:
    """Boolean (B, q_len, k_len) mask from a mask structure (query i and key j share a 0-based axis)."""
    qi = jnp.arange(q_len)[:, None]
    kj = jnp.arange(k_len)[None, :]
    mask = jnp.ones((q_len, k_len), bool)
    if causal:
        mask &= kj <= qi
    if window is not None:
        left, right = window
        if left is not None:
            mask &= kj >= qi - left
        if right is not None:
            mask &= kj <= qi + right
    mask = jnp.broadcast_to(mask, (batch, q_len, k_len))
    if segment_ids_q is not None:
        seg_k = segment_ids_q if segment_ids_k is None else segment_ids_k
        mask = mask & (segment_ids_q[:, :, None] == seg_k[:, None, :])
    return mask


def _use_pallas(impl: str) -> tuple[bool, bool]:
    """(use the kernel, in interpret mode) for an `attention_impl` setting."""
    if impl == "pallas":
        return True, False
    if impl == "pallas_interpret":
        return True, True
    if impl == "auto":
        return jax.default_backend() in ("gpu", "tpu"), False
    return False, False


def _kernel_pspecs(q_shape, kv_heads: int, mesh) -> tuple[P, P, P]:
    """(q, k/v, segment-id) PartitionSpecs for the kernel's shard_map: batch over the activation batch
    axes, heads over `tensor`, each as far as the sizes divide (heads only when both Hq and Hkv divide:
    contiguous head blocks then keep every query head with its KV head)."""
    shape = dict(mesh.shape)
    b = q_shape[0]
    batch = sharding.logical_to_pspec(("batch",), None, (b,), shape)[0]
    heads = sharding.logical_to_pspec(("q_heads",), None, (kv_heads,), shape)[0]
    return P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None)


def _kernel_attention(q, k, v, segment_ids, causal, window, scale, interpret):
    """The Pallas flash kernel, in `shard_map` under a multi-device ambient mesh.

    XLA cannot partition the kernel's custom call: left to the partitioner it would gather q, k and
    v onto every device. Attention is independent per (row, head), so each shard runs the kernel on
    its own rows and heads. One device (or no mesh): the kernel is called directly.
    """
    import pallas_kernels  # noqa: PLC0415 - optional dependency of the model package

    def kernel(q, k, v, segment_ids):
        return pallas_kernels.windowed_attention(
            q, k, v, segment_ids=segment_ids, causal=causal, window=window, scale=scale, interpret=interpret
        )

    mesh = sharding.ambient_mesh()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    q_spec, kv_spec, seg_spec = _kernel_pspecs(q.shape, k.shape[2], mesh)
    # check_vma=False: the kernels' `pallas_call` out_shapes carry no varying-axes type, which
    # check_vma=True requires; each shard's output depends only on its own rows and heads.
    if segment_ids is None:
        return jax.shard_map(
            lambda q, k, v: kernel(q, k, v, None),
            in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False,
        )(q, k, v)
    return jax.shard_map(
        kernel, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False,
    )(q, k, v, segment_ids)


def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Self-attention over one sequence axis with a structured mask.

    segment_ids: (B, S) int32; a query attends only to keys with the same id (0 may be used for
      padding: padding then attends only to padding, and real tokens never see it).
    window: (left, right) in tokens; query i sees keys in [i - left, i + right].
    impl: "auto" | "xla" | "pallas" | "pallas_interpret".
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    use_kernel, interpret = _use_pallas(impl)
    if use_kernel:
        return _kernel_attention(q, k, v, segment_ids, causal, window, scale, interpret)
    sq = q.shape[1]
    if causal and window is None and sq == k.shape[1] and sq >= _CAUSAL_SPLIT_MIN:
        return _causal_blocks(q, k, v, segment_ids, scale)
    mask = structure_mask(
        q.shape[1], k.shape[1], segment_ids_q=segment_ids, causal=causal, window=window, batch=q.shape[0]
    )
    return masked_attention(q, k, v, mask, scale)


# Causal self-attention of at least this many queries runs in `_CAUSAL_BLOCKS` query blocks.
_CAUSAL_SPLIT_MIN = 256
_CAUSAL_BLOCKS = 4


def _causal_blocks(q, k, v, segment_ids, scale):
    """Causal masked attention in query blocks, block i over keys [0, end of block i) only: the
    keys after a block are masked for all its queries, so this skips (n - 1) / 2n of the square
    (measured 4% of the benchmark thinker prefill with 4 blocks of 64 of 256 queries)."""
    b, sq = q.shape[:2]
    block = -(-sq // _CAUSAL_BLOCKS)
    mask = structure_mask(sq, sq, segment_ids_q=segment_ids, causal=True, batch=b)
    outs = []
    for q0 in range(0, sq, block):
        q1 = min(q0 + block, sq)
        outs.append(masked_attention(q[:, q0:q1], k[:, :q1], v[:, :q1], mask[:, q0:q1, :q1], scale))
    return jnp.concatenate(outs, axis=1)


def segment_attention_in_blocks(
    q_sd: jax.Array, k_sd: jax.Array, v_sd: jax.Array, segment_ids_s: jax.Array, scale: float, num_blocks: int
) -> jax.Array:
    """Bidirectional attention of one head within segments, (S, D) each -> (S, D), queries in
    `num_blocks` blocks (it must divide S). For CPU loops over (row, head): a block's scores stay in
    cache, and the softmax is normalised after the value product (a (block, D) division instead of a
    pass over the scores). Every query must share its segment with some key (itself, here).
    """
    seq = q_sd.shape[0]
    block = seq // num_blocks
    outs = []
    for start in range(0, seq, block):
        q, seg = q_sd[start:start + block], segment_ids_s[start:start + block]
        scores = jnp.dot(q, k_sd.T, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(seg[:, None] == segment_ids_s[None, :], scores, -jnp.inf)
        probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        total = jnp.sum(probs, axis=-1, keepdims=True)
        out = jnp.dot(probs.astype(v_sd.dtype), v_sd, preferred_element_type=jnp.float32) / total
        outs.append(out.astype(v_sd.dtype))
    return jnp.concatenate(outs, axis=0)


def cached_attention(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, key_valid_bk: jax.Array, scale: float | None = None
) -> jax.Array:
    """Decode-step attention of q (B, Sq, Hq, D) over a KV cache (B, K, Hkv, D).

    key_valid_bk: (B, K) bool, the cache slots each row may see (its real prompt tokens and the
    tokens generated so far). With Sq > 1 the same key set is used for every query (the caller
    adds causality by passing a (B, Sq, K) mask instead).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = key_valid_bk if key_valid_bk.ndim == 3 else jnp.broadcast_to(
        key_valid_bk[:, None, :], (q.shape[0], q.shape[1], k_cache.shape[1])
    )
    return masked_attention(q, k_cache, v_cache, mask, scale)
