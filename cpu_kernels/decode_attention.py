"""A decoder layer's whole attention block for one new token per row, in one call.

    h = RMSNorm(x) * input_norm[l]
    q, k, v = h @ Wq[l], h @ Wk[l], h @ Wv[l]           per head: RMSNorm (q_norm[l], k_norm[l]), rotary
    a = softmax(q k^T * head_dim^-0.5 over the valid slots) v      over the cache of layer l, the new
                                                                    k/v standing in at slot `cache_index`
    out = x + a @ Wo[l]                                  returns out and the new k, v (for the cache)

The decode-time attention block on CPU. In XLA:CPU a decode step's attention is a dozen small ops
per layer, and most of their time is memory traffic around them, not arithmetic: the layer's four
projection matrices copied out of the scanned stacks (dynamic-slice), repacked by YNNPACK for the
products, the layer's KV cache copied out of the stack and transposed to heads-major for the two
attention products. Here the stacks and the cache are read in place, once, with the layer index,
and the block's ~20 XLA ops become one call. The caller writes the returned k, v into the cache
(an in-place dynamic-update-slice).

What made it fast (benchmark model, 4 rows, 301 slots; `bench/RESULTS.md`, sessions 9 and 10):
  * No libm call per element: numba's `np.exp` is a scalar `expf` call, and in the decode graph the
    first version took 375 us a layer (67 us of it outside the exponentials); `exp_nonpositive`
    (in `_loops`) is a vectorisable polynomial (within 1 ulp).
  * One parallel region per layer, a KV head per task: the task computes its query heads' and its
    KV head's columns of the projections, their norms and rotary, every row's attention over its
    KV head's slice of the cache, and its rows of the o projection (a partial sum, added after the
    region). Each region's start costs 10-30 us of hand-off on this machine; the first version had
    three (the products split over the contraction, the attention over the rows) and took ~10% more
    of the decode step. Layers under `_PARALLEL_MIN_BYTES` of weights run on the calling thread.
    The cores used are at most the KV heads (4 on Qwen3-Omni's thinker): enough for a desktop CPU,
    not for a many-core server.
  * The cache is read in its own order, with software prefetch ahead of the reads: between two
    layers the experts stream ~20 MB, so the layer's cache is cold every time; read a KV head at
    a time it ran at ~3 GB/s. (Prefetching the weights' rows as well was slower.)
  In the decode graph the three-region version took ~235 us a layer against ~300 us for XLA's ops;
  the one-region version cut the whole decode step by a further ~10% (paired A/B in one process).

Numerics: float32. Projections add their terms four at a time in order of the contraction; the
norms', scores' and softmax's sums are vectorised (reassociated) reductions; the value sum is
normalised after it. So results differ from XLA's only in summation order (tested to ~1e-6 of
the output's scale against `omni_jax.nn`'s ops).

Forward only: decoding is not differentiated, and JAX refuses to differentiate through it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numba
from numba import cfunc, njit, prange

from cpu_kernels import ffi
from cpu_kernels._loops import exp_nonpositive, rms_norm_into, rows_block, sum_parts

__all__ = ["decode_attention"]

_TARGET = "omni_jax_cpu_decode_attention"

# Reassociation lets LLVM vectorise the sums over head_dim / hidden; `contract` allows FMAs.
# No finite-math flags: the softmax's masked slots are skipped, not -inf, but keep IEEE semantics.
_FAST = {"reassoc", "contract"}

# A layer's attention weights from which the block runs on all cores. Below, the parallel regions'
# hand-offs cost more than the second core saves: on `bench/speech_cpu.py`'s talker and code
# predictor (0.79 MB a layer, one row, ~1,600 short calls a second) the talker + code predictor took
# 0.45 s serial against 0.87 s on both cores (0.55 s with XLA's attention); on the thinker benchmark
# (1.31 MB, 4 rows) both cores were ahead, though inside that machine's noise (paired decode step
# against XLA's attention 1.013 / 1.067 on both cores, 1.010 / 0.986 serial). Measured with the
# three-region block of session 9; the one-region block hands off a third as often.
_PARALLEL_MIN_BYTES = 1 << 20

# Slots the attention prefetches ahead of the one it reads. (Prefetching the weights' rows ahead
# of the products as well was slower: 141-261 against 122-135 us a layer, cold.)
_AHEAD = 16


@njit(cache=True, fastmath=_FAST, inline="always")
def _norm_rotate(row, weight, cos, sin, eps, rotated):
    """In place on row (head_dim,): RMSNorm by weight, then the rotary embedding (rotate-half form)."""
    dim = row.shape[0]
    half = dim // 2
    rms_norm_into(row, weight, eps, row)
    for i in range(half):
        rotated[i] = -row[i + half]
        rotated[i + half] = row[i]
    for i in range(dim):
        row[i] = row[i] * cos[i] + rotated[i] * sin[i]


@njit(cache=True, fastmath=_FAST, inline="always")
def _attend(q_heads, keys, values, group, k_head, v_head, valid, slot, scale, scores, exp_bits, a_heads):
    """One row's attention for one KV head: a_heads (G, hd) from its query heads q_heads (G, hd) over
    KV head `group` of the cache slots keys, values (S, Hkv, hd), with k_head, v_head (hd,) standing in
    at `slot`. scores (G, S) scratch; exp_bits (S,) int32 scratch."""
    slots, kv_heads, head_dim = keys.shape
    heads = q_heads.shape[0]
    end = 0  # past the last valid slot: the loops stop there (decode never sees later slots)
    for s in range(slots):
        if valid[s] != 0:
            end = s + 1
    stride = kv_heads * head_dim * 4
    piece = head_dim * 4
    keys_at = keys.ctypes.data + group * piece
    values_at = values.ctypes.data + group * piece
    for s in range(min(_AHEAD, end)):
        for line in range(0, piece, 64):
            ffi.prefetch(keys_at + s * stride + line)
            ffi.prefetch(values_at + s * stride + line)
    for s in range(end):
        if s + _AHEAD < end:
            ahead = (s + _AHEAD) * stride
            for line in range(0, piece, 64):
                ffi.prefetch(keys_at + ahead + line)
                ffi.prefetch(values_at + ahead + line)
        key = k_head if s == slot else keys[s, group]
        for head in range(heads):
            qh = q_heads[head]
            dot = np.float32(0.0)
            for i in range(head_dim):
                dot += qh[i] * key[i]
            scores[head, s] = dot * scale
    # Masked softmax per query head, in place: the masked slots' weights are exact zeros.
    for head in range(heads):
        row = scores[head]
        top = np.float32(-np.inf)
        for s in range(end):
            if valid[s] != 0 and row[s] > top:
                top = row[s]
        for s in range(end):
            row[s] = row[s] - top
        exp_nonpositive(row, end, exp_bits)
        total = np.float32(0.0)
        for s in range(end):
            weight = row[s] if valid[s] != 0 else np.float32(0.0)
            row[s] = weight
            total += weight
        inv = np.float32(1.0) / total if total > 0 else np.float32(0.0)  # no valid slot: zeros, as XLA
        for s in range(end):
            row[s] *= inv
        out_head = a_heads[head]
        for i in range(head_dim):
            out_head[i] = 0.0
    for s in range(end):
        if valid[s] == 0:
            continue
        value = v_head if s == slot else values[s, group]
        for head in range(heads):
            weight = scores[head, s]
            out_head = a_heads[head]
            for i in range(head_dim):
                out_head[i] += weight * value[i]


@njit(cache=True, fastmath=_FAST)
def _kv_head_task(g, h, cos, sin, key_valid, slot, layer, eps, wq, wk, wv, wo, q_norm, k_norm, k_cache, v_cache,
                  k_new, v_new, q, k_groups, v_groups, attn, out_parts, scores, exp_bits, rotated):
    """KV head g's share of `_block` (same arguments, indexed here at `layer` and g), start to
    finish: its query heads' and its own columns of the q/k/v projections (into q[g], k_groups[g],
    v_groups[g]), their norms and rotary, every row's attention over its slice of the cache, and
    its rows of the o projection (out_parts[g], a partial sum).

    A function of its own rather than inlined into the parallel loop: numba's parallel passes then
    see a loop of one call, and both compilations of the block call this one compiled task. The
    package's first compilation (an empty numba cache: a fresh checkout) went from 62 s to 35 s on
    a 2-core Zen 4, the block's output unchanged to the bit, and the block on both cores 1.07-1.11x
    faster than when inlined (in-process A/B, benchmark model's layers, 30 rounds)."""
    wq_l, wk_l, wv_l, wo_l = wq[layer], wk[layer], wv[layer], wo[layer]
    qn, kn = q_norm[layer], k_norm[layer]
    keys_l, values_l = k_cache[layer], v_cache[layer]
    q_g, k_g, v_g, out_part = q[g], k_groups[g], v_groups[g], out_parts[g]
    scores_g, exp_bits_g, rotated_g = scores[g], exp_bits[g], rotated[g]
    batch, hidden = h.shape
    head_dim = keys_l.shape[3]
    group_width = q_g.shape[1]
    groups = group_width // head_dim
    scale = np.float32(head_dim ** -0.5)
    rows_block(h, wq_l, 0, hidden, q_g, g * group_width)
    rows_block(h, wk_l, 0, hidden, k_g, g * head_dim)
    rows_block(h, wv_l, 0, hidden, v_g, g * head_dim)
    for b in range(batch):
        for head in range(groups):
            _norm_rotate(q_g[b, head * head_dim:(head + 1) * head_dim], qn, cos[b], sin[b], eps, rotated_g)
        _norm_rotate(k_g[b], kn, cos[b], sin[b], eps, rotated_g)
        for i in range(head_dim):
            k_new[b, g * head_dim + i] = k_g[b, i]
            v_new[b, g * head_dim + i] = v_g[b, i]
    for b in range(batch):
        _attend(q_g[b].reshape((groups, head_dim)), keys_l[b], values_l[b], g, k_g[b], v_g[b], key_valid[b],
                slot, scale, scores_g[b], exp_bits_g, attn[b, g * group_width:(g + 1) * group_width].reshape((groups, head_dim)))
    rows_block(attn, wo_l, g * group_width, (g + 1) * group_width, out_part)


@njit(cache=True, fastmath=_FAST, inline="always")
def _block(x, cos, sin, key_valid, slot, layer, eps, input_norm, wq, wk, wv, q_norm, k_norm, wo,
           k_cache, v_cache, out, k_new, v_new, h, q, k_groups, v_groups, attn, out_parts, scores, exp_bits, rotated):
    """In place: out (B, D); k_new, v_new (B, Hkv*hd). Scratch, a slice per KV head g: q (Hkv, B, G*hd)
    its query heads' columns, k_groups, v_groups (Hkv, B, hd), attn (B, Hq*hd) (columns g*G*hd on),
    out_parts (Hkv, B, D) its partial o projection, scores (Hkv, B, G, S), exp_bits (Hkv, S) int32,
    rotated (Hkv, hd); h (B, D) the normed input, shared. G = Hq/Hkv. Runs on raw buffers: indices
    are clamped here."""
    num_layers, _, slots, kv_heads, _ = k_cache.shape
    layer = min(max(layer, 0), num_layers - 1)
    slot = min(max(slot, 0), slots - 1)

    for b in range(x.shape[0]):
        rms_norm_into(x[b], input_norm[layer], eps, h[b])

    # One KV head (with its query heads) per task, start to finish (`_kv_head_task`). The tasks need
    # nothing from each other, so the block is one parallel region.
    for g in prange(kv_heads):
        # int64: prange's index is unsigned in the parallel compilation, and one type for both
        # compilations of the block lets them share one compiled task.
        _kv_head_task(np.int64(g), h, cos, sin, key_valid, slot, layer, eps, wq, wk, wv, wo, q_norm, k_norm, k_cache, v_cache,
                      k_new, v_new, q, k_groups, v_groups, attn, out_parts, scores, exp_bits, rotated)
    sum_parts(out_parts, out)
    for b in range(x.shape[0]):
        ob, xb = out[b], x[b]
        for i in range(x.shape[1]):
            ob[i] = xb[i] + ob[i]


# Two compilations of the block: on the cores (its `prange` loop spread over numba's threads) and on
# the calling thread only. The wrapper picks the serial one for small blocks, where the parallel
# region's hand-off costs more than it saves (see `_PARALLEL_MIN_BYTES`).
@njit(cache=True, fastmath=_FAST, parallel=True)
def _block_on_cores(x, cos, sin, key_valid, slot, layer, eps, input_norm, wq, wk, wv, q_norm, k_norm, wo, k_cache, v_cache,
                    out, k_new, v_new, h, q, k_groups, v_groups, attn, out_parts, scores, exp_bits, rotated):
    _block(x, cos, sin, key_valid, slot, layer, eps, input_norm, wq, wk, wv, q_norm, k_norm, wo, k_cache, v_cache,
                    out, k_new, v_new, h, q, k_groups, v_groups, attn, out_parts, scores, exp_bits, rotated)


@njit(cache=True, fastmath=_FAST)
def _block_serial(x, cos, sin, key_valid, slot, layer, eps, input_norm, wq, wk, wv, q_norm, k_norm, wo, k_cache, v_cache,
                    out, k_new, v_new, h, q, k_groups, v_groups, attn, out_parts, scores, exp_bits, rotated):
    _block(x, cos, sin, key_valid, slot, layer, eps, input_norm, wq, wk, wv, q_norm, k_norm, wo, k_cache, v_cache,
                    out, k_new, v_new, h, q, k_groups, v_groups, attn, out_parts, scores, exp_bits, rotated)


@cfunc(ffi.HANDLER_SIGNATURE, cache=True)
def _handler(frame_address):
    frame = ffi.call_frame(frame_address)
    if frame.size == 0:
        return ffi.null()
    # Arguments: 0 indices (3,) int32 [cache slot, layer, on all cores (0/1)], 1 x (B, D), 2 cos (B, hd), 3 sin (B, hd),
    # 4 key_valid (B, S) int32, 5 input_norm (L, D), 6-8 wq/wk/wv (L, D, N), 9-10 q/k norm (L, hd),
    # 11 wo (L, Hq*hd, D), 12-13 k/v cache (L, B, S, Hkv, hd), 14 eps (1,).
    # Results: 0 out (B, D), 1-2 k_new/v_new (B, Hkv*hd); scratch (see `_block`): 3 h (B, D), 4 q
    # (Hkv, B, G*hd), 5 attn (B, Hq*hd), 6 out parts (Hkv, B, D), 7 scores (Hkv, B, G, S), 8 exp bits
    # (Hkv, S) int32, 9 rotated (Hkv, hd), 10-11 k/v groups (Hkv, B, hd).
    indices = ffi.int32_1d(frame, 0)
    eps = ffi.float32_1d(frame, 14)[0]
    x, cos, sin = ffi.float32_2d(frame, 1), ffi.float32_2d(frame, 2), ffi.float32_2d(frame, 3)
    key_valid = ffi.int32_2d(frame, 4)
    input_norm = ffi.float32_2d(frame, 5)
    wq, wk, wv = ffi.float32_3d(frame, 6), ffi.float32_3d(frame, 7), ffi.float32_3d(frame, 8)
    q_norm, k_norm = ffi.float32_2d(frame, 9), ffi.float32_2d(frame, 10)
    wo = ffi.float32_3d(frame, 11)
    k_cache, v_cache = ffi.float32_5d(frame, 12), ffi.float32_5d(frame, 13)
    out, k_new, v_new = ffi.float32_2d(frame, 0, True), ffi.float32_2d(frame, 1, True), ffi.float32_2d(frame, 2, True)
    h, q, attn = ffi.float32_2d(frame, 3, True), ffi.float32_3d(frame, 4, True), ffi.float32_2d(frame, 5, True)
    out_parts, scores = ffi.float32_3d(frame, 6, True), ffi.float32_4d(frame, 7, True)
    exp_bits, rotated = ffi.int32_2d(frame, 8, True), ffi.float32_2d(frame, 9, True)
    k_groups, v_groups = ffi.float32_3d(frame, 10, True), ffi.float32_3d(frame, 11, True)
    slot, layer = indices[0], indices[1]
    if indices[2] != 0:
        _block_on_cores(x, cos, sin, key_valid, slot, layer, eps, input_norm, wq, wk, wv, q_norm, k_norm, wo, k_cache,
                        v_cache, out, k_new, v_new, h, q, k_groups, v_groups, attn, out_parts, scores, exp_bits, rotated)
    else:
        _block_serial(x, cos, sin, key_valid, slot, layer, eps, input_norm, wq, wk, wv, q_norm, k_norm, wo, k_cache,
                      v_cache, out, k_new, v_new, h, q, k_groups, v_groups, attn, out_parts, scores, exp_bits, rotated)
    return ffi.null()


@functools.cache
def _registered() -> str:
    ffi.register(_TARGET, _handler.address)
    return _TARGET


def decode_attention(x, cos, sin, key_valid, cache_index, layer, weights, k_cache, v_cache, eps):
    """One decoder layer's attention block for one new token per row, over a stacked KV cache.

    x (B, D) float32, the layer's input (the residual stream); cos, sin (B, head_dim) the new
    token's rotary tables; key_valid (B, S) bool or int, the cache slots each row attends to,
    the new token's slot `cache_index` (int scalar) included; layer: int scalar, which layer of
    the stacks. weights: dict with float32 stacks `input_norm` (L, D), `q_proj` (L, D, Hq*hd),
    `k_proj`, `v_proj` (L, D, Hkv*hd), `q_norm`, `k_norm` (L, hd), `o_proj` (L, Hq*hd, D).
    k_cache, v_cache (L, B, S, Hkv, hd) float32, read in place (slot `cache_index` is not read: the
    new k, v stand in for it). eps: the RMSNorms' epsilon (a Python float).

    Returns (x + attention (B, D), k_new (B, Hkv, hd), v_new (B, Hkv, hd)), k_new after its norm
    and rotary, as the cache stores them.
    """
    batch, hidden = x.shape
    num_layers, cache_batch, slots, kv_heads, head_dim = k_cache.shape
    q_width = weights["q_proj"].shape[-1]
    shapes = {
        "x": (x.shape, (batch, hidden)), "cos": (cos.shape, (batch, head_dim)), "sin": (sin.shape, (batch, head_dim)),
        "key_valid": (key_valid.shape, (batch, slots)), "v_cache": (v_cache.shape, k_cache.shape),
        "input_norm": (weights["input_norm"].shape, (num_layers, hidden)),
        "q_proj": (weights["q_proj"].shape, (num_layers, hidden, q_width)),
        "k_proj": (weights["k_proj"].shape, (num_layers, hidden, kv_heads * head_dim)),
        "v_proj": (weights["v_proj"].shape, (num_layers, hidden, kv_heads * head_dim)),
        "q_norm": (weights["q_norm"].shape, (num_layers, head_dim)),
        "k_norm": (weights["k_norm"].shape, (num_layers, head_dim)),
        "o_proj": (weights["o_proj"].shape, (num_layers, q_width, hidden)),
    }
    wrong = [f"{name} {got} (expected {want})" for name, (got, want) in shapes.items() if tuple(got) != want]
    if cache_batch != batch or q_width % (kv_heads * head_dim) or head_dim % 2:
        wrong.append(f"k_cache {k_cache.shape} (expected (L, {batch}, S, Hkv, even hd) with Hq*hd = "
                     f"{q_width} a multiple of Hkv*hd)")
    if wrong:
        raise ValueError("decode_attention: x (B, D) against a cache (L, B, S, Hkv, hd); mismatched "
                         + ", ".join(wrong))
    floats = {"x": x, "cos": cos, "sin": sin, "k_cache": k_cache, "v_cache": v_cache, **weights}
    not_f32 = [f"{name} {a.dtype}" for name, a in floats.items() if a.dtype != jnp.float32]
    if not_f32:
        raise ValueError(f"decode_attention takes float32 operands; got {', '.join(not_f32)}: cast them, or "
                         "use the XLA path (omni_jax.nn.decoder) for these")
    groups = q_width // (kv_heads * head_dim)
    kv_width = kv_heads * head_dim
    weight_bytes = 4 * (hidden * (q_width + 2 * kv_width) + q_width * hidden)
    on_cores = weight_bytes >= _PARALLEL_MIN_BYTES and numba.get_num_threads() > 1 and kv_heads > 1
    indices = jnp.stack([jnp.asarray(cache_index, jnp.int32), jnp.asarray(layer, jnp.int32), jnp.int32(on_cores)])
    results = [(batch, hidden), (batch, kv_width), (batch, kv_width),  # out, k_new, v_new
               (batch, hidden), (kv_heads, batch, q_width // kv_heads), (batch, q_width),  # scratch: h, q, attn
               (kv_heads, batch, hidden)]
    call = jax.ffi.ffi_call(
        _registered(),
        (*(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in results),
         jax.ShapeDtypeStruct((kv_heads, batch, groups, slots), jnp.float32),
         jax.ShapeDtypeStruct((kv_heads, slots), jnp.int32), jax.ShapeDtypeStruct((kv_heads, head_dim), jnp.float32),
         jax.ShapeDtypeStruct((kv_heads, batch, head_dim), jnp.float32), jax.ShapeDtypeStruct((kv_heads, batch, head_dim), jnp.float32)),
        vmap_method="sequential",
    )
    out, k_new, v_new = call(
        indices, x, cos, sin, key_valid.astype(jnp.int32), weights["input_norm"], weights["q_proj"],
        weights["k_proj"], weights["v_proj"], weights["q_norm"], weights["k_norm"], weights["o_proj"], k_cache, v_cache,
        jnp.full((1,), eps, jnp.float32),
    )[:3]
    return out, k_new.reshape(batch, kv_heads, head_dim), v_new.reshape(batch, kv_heads, head_dim)
