"""The Qwen3 decoder stack shared by the thinker, the talker and the code predictor.

Layer: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)); attention has per-head q/k RMSNorm applied
before the rotary embedding; the MLP is MoE (thinker, talker: + shared expert) or dense SwiGLU
(code predictor). Layers are stacked on a leading axis and run by `lax.scan` (or a Python loop when
`Runtime.scan_layers` is off); the KV cache (L, B, S_max, Hkv, D) travels in the scan carry and is
updated in place.

Two entry points:
  * `prefill`: a whole sequence, causal within each row's real tokens (`attention_mask`), writing
    K/V into cache slots [0, S) when a cache is given.
  * `decode`: new tokens at cache slot `cache_index`, attending over the cache slots `key_valid`.
    On CPU, for one float32 token per row (`Runtime.attention_impl="auto"`, no multi-device mesh),
    each layer's attention block is one `cpu_kernels.decode_attention` call that reads the
    attention weights and the cache in place; the returned k, v are written into the cache here.

Under a multi-device ambient mesh (`jax.set_mesh`) the residual stream is constrained to be split
over the batch axes at every layer boundary, attention over heads (`tensor`), and the KV cache
like `sharding.cache_sharding`; the MoE runs expert-parallel (`nn/expert_parallel.py`). Without a
mesh, or on one device, `constrain` returns its input: the single-device program is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from omni_jax.config import Runtime
from omni_jax.nn import attention as attn_lib
from omni_jax.sharding import constrain
from omni_jax.nn.dense import use_cpu_kernel
from omni_jax.nn.moe import moe_forward, moe_specs, shared_expert_specs
from omni_jax.nn.norms import rms_norm
from omni_jax.nn.params import ParamSpec, stack_layers
from omni_jax.nn.rope import apply_rotary, mrope_cos_sin, rope_cos_sin

__all__ = ["DecoderDims", "decoder_specs", "KVCache", "init_cache", "prefill", "decode", "DecoderOutput"]


@dataclasses.dataclass(frozen=True)
class DecoderDims:
    """What the decoder stack needs to know, read off any of the three decoder configs."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...] | None  # None: plain 1-D rope
    num_experts: int = 0  # 0: dense SwiGLU MLP
    top_k: int = 0
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 0
    intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    initializer_range: float = 0.02

    @classmethod
    def from_config(cls, cfg) -> "DecoderDims":
        num_experts = getattr(cfg, "num_experts", 0) or 0
        if num_experts and hasattr(cfg, "all_layers_moe") and not cfg.all_layers_moe:
            raise NotImplementedError(
                "decoders mixing dense and MoE layers (mlp_only_layers / decoder_sparse_step > 1) are not "
                "supported; every Qwen3-Omni checkpoint uses MoE in all layers"
            )
        return cls(
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            mrope_section=tuple(cfg.mrope_section) if hasattr(cfg, "mrope_section") else None,
            num_experts=num_experts,
            top_k=getattr(cfg, "num_experts_per_tok", 0) if num_experts else 0,
            norm_topk_prob=getattr(cfg, "norm_topk_prob", True),
            moe_intermediate_size=getattr(cfg, "moe_intermediate_size", 0),
            intermediate_size=cfg.intermediate_size,
            shared_expert_intermediate_size=getattr(cfg, "shared_expert_intermediate_size", 0) or 0,
            initializer_range=cfg.initializer_range,
        )


def _layer_specs(d: DecoderDims) -> dict:
    h, std = d.hidden_size, d.initializer_range
    q_out, kv_out = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    spec = {
        "input_layernorm": {"weight": ParamSpec((h,), ("embed",), init="ones")},
        "post_attention_layernorm": {"weight": ParamSpec((h,), ("embed",), init="ones")},
        "self_attn": {
            "q_proj": {"kernel": ParamSpec((h, q_out), ("embed", "q_heads"), std=std)},
            "k_proj": {"kernel": ParamSpec((h, kv_out), ("embed", "kv_heads"), std=std)},
            "v_proj": {"kernel": ParamSpec((h, kv_out), ("embed", "kv_heads"), std=std)},
            "o_proj": {"kernel": ParamSpec((q_out, h), ("q_heads", "embed"), std=std)},
            "q_norm": {"weight": ParamSpec((d.head_dim,), ("head_dim",), init="ones")},
            "k_norm": {"weight": ParamSpec((d.head_dim,), ("head_dim",), init="ones")},
        },
    }
    if d.num_experts:
        mlp = moe_specs(h, d.moe_intermediate_size, d.num_experts, std)
        if d.shared_expert_intermediate_size:
            mlp.update(shared_expert_specs(h, d.shared_expert_intermediate_size, std))
    else:
        mlp = {
            "gate_proj": {"kernel": ParamSpec((h, d.intermediate_size), ("embed", "mlp"), std=std)},
            "up_proj": {"kernel": ParamSpec((h, d.intermediate_size), ("embed", "mlp"), std=std)},
            "down_proj": {"kernel": ParamSpec((d.intermediate_size, h), ("mlp", "embed"), std=std)},
        }
    spec["mlp"] = mlp
    return spec


def decoder_specs(d: DecoderDims) -> dict:
    """`layers` (stacked) and the final `norm`. Embeddings and heads belong to the caller."""
    return {
        "layers": stack_layers(_layer_specs(d), d.num_layers),
        "norm": {"weight": ParamSpec((d.hidden_size,), ("embed",), init="ones")},
    }


class KVCache(NamedTuple):
    k: jax.Array  # (L, B, S_max, Hkv, D)
    v: jax.Array  # (L, B, S_max, Hkv, D)


CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
# Activation layouts for `constrain` (logical axes; see sharding.LOGICAL_RULES).
RESIDUAL_AXES = ("batch", "seq", "embed")
Q_AXES = ("batch", "seq", "q_heads", "head_dim")
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")
MLP_AXES = ("batch", "seq", "mlp")


def init_cache(d: DecoderDims, batch: int, max_len: int, dtype) -> KVCache:
    """Zeros (L, B, max_len, Hkv, D); split like `sharding.cache_sharding` under an ambient mesh."""
    shape = (d.num_layers, batch, max_len, d.num_kv_heads, d.head_dim)
    return KVCache(constrain(jnp.zeros(shape, dtype), CACHE_AXES), constrain(jnp.zeros(shape, dtype), CACHE_AXES))


class DecoderOutput(NamedTuple):
    hidden: jax.Array  # (B, S, D) after the final norm
    router_logits: jax.Array | None  # (L, B*S, E) or None for dense decoders
    cache: KVCache | None
    captured: jax.Array | None  # (B, S, D) hidden_states[capture_layer] (pre-DeepStack), if asked
    all_hidden: jax.Array | None  # (L, B, S, D) every layer's output (pre-DeepStack), if asked


def _cos_sin(d: DecoderDims, position_ids, dtype):
    if d.mrope_section is not None:
        if position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids[None], (3, *position_ids.shape))
        return mrope_cos_sin(position_ids, d.head_dim, d.rope_theta, d.mrope_section, dtype)
    return rope_cos_sin(position_ids, d.head_dim, d.rope_theta, dtype)


def _qkv(lp, x, cos, sin, d: DecoderDims):
    b, s, _ = x.shape
    dtype = x.dtype
    p = lp["self_attn"]
    q = jnp.dot(x, p["q_proj"]["kernel"].astype(dtype)).reshape(b, s, d.num_heads, d.head_dim)
    k = jnp.dot(x, p["k_proj"]["kernel"].astype(dtype)).reshape(b, s, d.num_kv_heads, d.head_dim)
    v = jnp.dot(x, p["v_proj"]["kernel"].astype(dtype)).reshape(b, s, d.num_kv_heads, d.head_dim)
    q = rms_norm(q, p["q_norm"]["weight"], d.rms_norm_eps)
    k = rms_norm(k, p["k_norm"]["weight"], d.rms_norm_eps)
    q = constrain(apply_rotary(q, cos, sin), Q_AXES)
    return q, constrain(apply_rotary(k, cos, sin), KV_AXES), constrain(v, KV_AXES)


def _mlp(lp, x, d: DecoderDims, rt: Runtime, layer):
    if d.num_experts:
        return moe_forward(
            x, lp["mlp"], top_k=d.top_k, norm_topk_prob=d.norm_topk_prob, impl=rt.moe_impl,
            grouped_matmul_impl=rt.grouped_matmul_impl, layer=layer, expert_parallel=rt.expert_parallel,
            capacity_factor=rt.expert_capacity_factor,
        )
    p = lp["mlp"]
    dtype = x.dtype
    gate = jnp.dot(x, p["gate_proj"]["kernel"].astype(dtype))
    up = jnp.dot(x, p["up_proj"]["kernel"].astype(dtype))
    act = constrain(jax.nn.silu(gate) * up, MLP_AXES)
    return jnp.dot(act, p["down_proj"]["kernel"].astype(dtype)), None


def _layer(lp, x, cos, sin, d: DecoderDims, rt: Runtime, attend, layer):
    """One decoder layer; `attend(q, k, v) -> (B, S, Hq, D)` carries the mask/cache logic.

    `lp["mlp"]["experts"]`, if present, holds every layer's experts; `layer` selects this one.
    """
    dtype = x.dtype
    h = rms_norm(x, lp["input_layernorm"]["weight"], d.rms_norm_eps)
    q, k, v = _qkv(lp, h, cos, sin, d)
    a = constrain(attend(q, k, v), Q_AXES)
    b, s = x.shape[:2]
    a = jnp.dot(a.reshape(b, s, -1), lp["self_attn"]["o_proj"]["kernel"].astype(dtype))
    x = constrain(x + a, RESIDUAL_AXES)
    h = rms_norm(x, lp["post_attention_layernorm"]["weight"], d.rms_norm_eps)
    m, router_logits = _mlp(lp, h, d, rt, layer)
    return constrain(x + m, RESIDUAL_AXES), router_logits


def _attention_kernel_applies(layers: dict, x, cache: KVCache, rt: Runtime) -> bool:
    """Whether decode runs each layer's attention block as `cpu_kernels.decode_attention`: on CPU
    (`attention_impl="auto"`), one new float32 token per row, float32 cache and weights, no
    multi-device mesh (see `nn/dense.use_cpu_kernel`)."""
    if rt.attention_impl != "auto":
        return False
    weights = [layers["input_layernorm"]["weight"], *(w for p in layers["self_attn"].values() for w in p.values())]
    return use_cpu_kernel(x.shape[0], x, cache.k, cache.v, *weights)


def _attention_in_kernel(lp, x_b1d, cos, sin, mask_b1k, cache_k, cache_v, cache_index, layer, d: DecoderDims):
    """x + Attn(RMSNorm(x)) for one new token per row by the CPU kernel, and the caches with the
    new k, v written at `cache_index` (in place). lp's attention weights are the whole stacks."""
    import cpu_kernels  # noqa: PLC0415  (numba compiles, or loads its cache, on first import)

    p = lp["self_attn"]
    weights = {
        "input_norm": lp["input_layernorm"]["weight"], "q_proj": p["q_proj"]["kernel"],
        "k_proj": p["k_proj"]["kernel"], "v_proj": p["v_proj"]["kernel"], "q_norm": p["q_norm"]["weight"],
        "k_norm": p["k_norm"]["weight"], "o_proj": p["o_proj"]["kernel"],
    }
    batch = x_b1d.shape[0]
    cos_bd, sin_bd = (jnp.broadcast_to(t[:, 0], (batch, t.shape[-1])) for t in (cos, sin))  # positions may broadcast
    y, k_new, v_new = cpu_kernels.decode_attention(
        x_b1d[:, 0], cos_bd, sin_bd, mask_b1k[:, 0], cache_index, layer, weights, cache_k, cache_v, d.rms_norm_eps)
    at = (layer, 0, cache_index, 0, 0)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k_new[None, :, None], at)
    cache_v = jax.lax.dynamic_update_slice(cache_v, v_new[None, :, None], at)
    return y[:, None], cache_k, cache_v


def _remat(fn, rt: Runtime):
    if rt.remat == "full":
        return jax.checkpoint(fn)
    if rt.remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
    return fn


def _split_in_place(layers: dict, attention: bool) -> tuple[dict, dict]:
    """(per-layer params to scan, the stacks the body reads in place with the layer index).

    The expert stacks always stay whole; with `attention`, so do the attention block's weights
    (`input_layernorm`, `self_attn`), for the CPU decode kernel."""
    in_place = {}
    mlp = layers.get("mlp", {})
    if "experts" in mlp:
        in_place["mlp"] = {"experts": mlp["experts"]}
        layers = dict(layers, mlp={k: v for k, v in mlp.items() if k != "experts"})
    if attention:
        in_place.update({k: layers[k] for k in ("input_layernorm", "self_attn")})
        layers = {k: v for k, v in layers.items() if k not in in_place or k == "mlp"}
    return layers, in_place


def _stack(layers, x, body, d: DecoderDims, rt: Runtime, carry_extra, attention_in_place: bool = False):
    """Runs `body(i, lp, x, extra) -> (x, extra, per_layer_out)` over layers (scanned or unrolled).

    Expert stacks are not sliced per layer: they reach the body whole (`lp["mlp"]["experts"]` is
    (L, E, in, out)) and the MoE indexes [layer, expert] where it reads a matrix, because slicing
    a layer's (E, in, out) stack out of the scanned inputs copies all of it every layer on CPU.
    With `attention_in_place` the attention block's weights reach it whole too (the CPU decode
    kernel reads them in place).
    """
    body = _remat(body, rt)
    per_layer, in_place = _split_in_place(layers, attention_in_place)

    def merged(lp):
        lp = dict(lp, **{k: v for k, v in in_place.items() if k != "mlp"})
        if "mlp" in in_place:
            lp["mlp"] = dict(lp["mlp"], **in_place["mlp"])
        return lp

    if rt.scan_layers:
        def scan_body(carry, inputs):
            x, extra = carry
            i, lp = inputs
            x, extra, out = body(i, merged(lp), x, extra)
            return (x, extra), out

        (x, extra), outs = jax.lax.scan(scan_body, (x, carry_extra), (jnp.arange(d.num_layers), per_layer))
        return x, extra, outs
    outs = []
    extra = carry_extra
    for i in range(d.num_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], per_layer)
        x, extra, out = body(jnp.int32(i), merged(lp), x, extra)
        outs.append(out)
    return x, extra, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def prefill(
    params: dict,
    embeds_bsd: jax.Array,
    position_ids: jax.Array,
    attention_mask_bs: jax.Array,
    d: DecoderDims,
    rt: Runtime,
    *,
    cache: KVCache | None = None,
    deepstack_nbsd: jax.Array | None = None,
    capture_layer: int | None = None,
    return_all_hidden: bool = False,
) -> DecoderOutput:
    """Runs the whole prompt.

    embeds_bsd: (B, S, D) input embeddings. position_ids: (3, B, S) for M-RoPE or (B, S) for 1-D rope.
    attention_mask_bs: (B, S) 1 for real tokens (left padding supported).
    cache: if given, K/V of every layer are written to slots [0, S).
    deepstack_nbsd: (n, B, S, D) features added to the output of layers 0..n-1 (zeros off the
      visual positions).
    capture_layer: also return `hidden_states[capture_layer]` in the reference's numbering
      (0 = embeddings, i = output of layer i-1, before any DeepStack addition).
    """
    x = constrain(embeds_bsd, RESIDUAL_AXES)
    dtype = x.dtype
    cos, sin = _cos_sin(d, position_ids, dtype)
    segment_ids = attention_mask_bs.astype(jnp.int32)
    num_deepstack = 0 if deepstack_nbsd is None else deepstack_nbsd.shape[0]

    def body(i, lp, x, extra):
        cache_k, cache_v, captured = extra

        holder = {}

        def attend(q, k, v):
            holder["k"], holder["v"] = k, v
            return attn_lib.self_attention(q, k, v, segment_ids=segment_ids, causal=True, impl=rt.attention_impl)

        y, router_logits = _layer(lp, x, cos, sin, d, rt, attend, i)
        if cache is not None:
            k = holder["k"].astype(cache_k.dtype)[None]
            v = holder["v"].astype(cache_v.dtype)[None]
            cache_k = constrain(jax.lax.dynamic_update_slice(cache_k, k, (i, 0, 0, 0, 0)), CACHE_AXES)
            cache_v = constrain(jax.lax.dynamic_update_slice(cache_v, v, (i, 0, 0, 0, 0)), CACHE_AXES)
        if capture_layer is not None:
            captured = jnp.where(i + 1 == capture_layer, y, captured)
        layer_out = y
        if num_deepstack:
            feature = deepstack_nbsd[jnp.minimum(i, num_deepstack - 1)].astype(dtype)
            y = jnp.where(i < num_deepstack, y + feature, y)
        outs = (router_logits, layer_out if return_all_hidden else None)
        return y, (cache_k, cache_v, captured), outs

    captured0 = x if capture_layer == 0 else (jnp.zeros_like(x) if capture_layer is not None else None)
    extra0 = (
        cache.k if cache is not None else None,
        cache.v if cache is not None else None,
        captured0,
    )
    x, (ck, cv, captured), (router_logits, all_hidden) = _stack(params["layers"], x, body, d, rt, extra0)
    hidden = rms_norm(x, params["norm"]["weight"], d.rms_norm_eps)
    new_cache = KVCache(ck, cv) if cache is not None else None
    return DecoderOutput(hidden, router_logits, new_cache, captured, all_hidden)


def decode(
    params: dict,
    embeds_bsd: jax.Array,
    position_ids: jax.Array,
    cache: KVCache,
    cache_index: jax.Array,
    key_valid_bk: jax.Array,
    d: DecoderDims,
    rt: Runtime,
    *,
    capture_layer: int | None = None,
) -> DecoderOutput:
    """Runs S new tokens per row (usually 1) written at cache slots [cache_index, cache_index + S).

    key_valid_bk: (B, S_max) the slots each row may attend to, *including* the new ones; for S > 1
    causality among the new tokens is added here.
    """
    x = constrain(embeds_bsd, RESIDUAL_AXES)
    dtype = x.dtype
    cos, sin = _cos_sin(d, position_ids, dtype)
    new = x.shape[1]
    max_len = cache.k.shape[2]
    slot = jnp.arange(max_len)
    query_slot = cache_index + jnp.arange(new)
    mask = key_valid_bk[:, None, :] & (slot[None, None, :] <= query_slot[None, :, None])

    in_kernel = new == 1 and _attention_kernel_applies(params["layers"], x, cache, rt)
    if in_kernel:  # the kernel takes the one query's row of the mask, per batch row, as int32: once, not per layer
        key_valid_b1k = jnp.broadcast_to(mask, (x.shape[0], 1, max_len)).astype(jnp.int32)

    def body(i, lp, x, extra):
        cache_k, cache_v, captured = extra
        if in_kernel:
            y, ck, cv = _attention_in_kernel(lp, x, cos, sin, key_valid_b1k, cache_k, cache_v, cache_index, i, d)
            h = rms_norm(y, lp["post_attention_layernorm"]["weight"], d.rms_norm_eps)
            m, _ = _mlp(lp, h, d, rt, i)
            y = constrain(y + m, RESIDUAL_AXES)
        else:
            holder = {}

            def attend(q, k, v):
                ck = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype)[None], (i, 0, cache_index, 0, 0))
                cv = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype)[None], (i, 0, cache_index, 0, 0))
                ck, cv = constrain(ck, CACHE_AXES), constrain(cv, CACHE_AXES)
                holder["k"], holder["v"] = ck, cv
                return attn_lib.cached_attention(q, ck[i], cv[i], mask)

            y, _ = _layer(lp, x, cos, sin, d, rt, attend, i)
            ck, cv = holder["k"], holder["v"]
        if capture_layer is not None:
            captured = jnp.where(i + 1 == capture_layer, y, captured)
        return y, (ck, cv, captured), None

    captured0 = x if capture_layer == 0 else (jnp.zeros_like(x) if capture_layer is not None else None)
    x, (ck, cv, captured), _ = _stack(
        params["layers"], x, body, d, rt, (cache.k, cache.v, captured0), attention_in_place=in_kernel)
    hidden = rms_norm(x, params["norm"]["weight"], d.rms_norm_eps)
    return DecoderOutput(hidden, None, KVCache(ck, cv), captured, None)
