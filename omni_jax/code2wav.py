"""Code2Wav: the vocoder that turns the talker's codec frames (B, 16, T) into 24 kHz audio.

Mirrors `Qwen3OmniMoeCode2Wav` of transformers 5.23.0. Parameter tree (paths are the checkpoint's
`code2wav.*` keys; Linear weights are `kernel` (in, out), conv weights stay in PyTorch layout):

    code_embedding/weight                       (num_quantizers * codebook_size, hidden)
    pre_transformer/layers/...                  stacked: self_attn/{q,k,v,o}_proj, mlp/{gate,up,down}_proj,
                                                input_layernorm, post_attention_layernorm,
                                                self_attn_layer_scale/scale, mlp_layer_scale/scale
    pre_transformer/norm/weight
    upsample/{i}/0/conv/{weight,bias}           ConvTranspose1d(hidden, hidden, r, r), r = upsampling_ratios[i]
    upsample/{i}/1/...                          ConvNeXt block
    decoder/0/conv                              causal Conv1d(hidden -> decoder_dim, k7)
    decoder/{1..n}/block/0                      SnakeBeta; block/1/conv: ConvTranspose1d(d, d/2, 2r, r);
                                                block/{2,3,4}: residual units (dilation 1, 3, 9)
    decoder/{n+1}                               SnakeBeta;  decoder/{n+2}/conv: Conv1d(-> 1, k7)

Forward (`decode`): embedding mean over the quantizers (quantizer q reads rows q * codebook_size + code),
the pre-transformer (RMSNorm, 1-D RoPE from position 0, causal sliding window `sliding_window`,
LayerScale on both residual branches, final RMSNorm), the upsampling stages, the decoder, clamp to
[-1, 1]. T frames give `output_length(cfg, T) = total_upsample * T - lost_samples(cfg)` samples
(1920 T - 555 for the published model): the trimmed transposed convolutions drop their last block.

Decoding entry points:
  * `decode`: one jittable causal decode of all frames (pure function, static shapes).
  * `decode_bucketed`: the same, frame count padded to a bucket (causality makes end padding exact).
  * `chunked_decode`: the reference's `chunked_decode(chunk_size=300, left_context_size=25)`,
    seams included (what `generate` returns).
  * `decode_batch`: rows of different lengths decoded together, each trimmed to its own length.
  * `StreamingDecoder` / `stream_decode`: audio as frames arrive, seamless (see below).

Streaming vs the reference's chunked decode. The reference re-decodes each 300-frame chunk from
scratch with 25 frames of left context. That is not the full decode: (1) the pre-transformer restarts
at position 0 and sees only 25 frames of history, while its receptive field is
num_layers * (sliding_window - 1) frames (568 for the published model); (2) each call drops its last
`lost_samples` samples (555), so every seam loses ~23 ms of audio and the output has
`total_upsample * T - lost_samples * num_chunks` samples. `StreamingDecoder` instead carries the
pre-transformer's KV cache (the last sliding_window - 1 keys/values per layer, absolute positions) and
re-runs only the convolutional part over `receptive_field_frames(cfg)` frames of stored
pre-transformer output before the new frames: exactly the convolutions' receptive field, so every
emitted sample equals the full decode's. After T frames it has emitted the first
`output_length(cfg, T)` samples of the full decode; the concatenation is the full decode.
"""

from __future__ import annotations

import functools
from typing import Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import Code2WavConfig, Runtime
from omni_jax.nn import attention as attn_lib
from omni_jax.nn import conv
from omni_jax.nn.norms import rms_norm
from omni_jax.nn.params import ParamSpec, stack_layers
from omni_jax.nn.rope import apply_rotary, rope_cos_sin

__all__ = [
    "code2wav_specs", "total_upsample", "output_length", "lost_samples", "receptive_field_frames",
    "embed_codes", "pre_transformer", "vocode", "decode", "decode_bucketed", "chunked_decode",
    "chunked_output_length", "decode_batch", "StreamState", "init_stream_state", "stream_step",
    "StreamingDecoder", "stream_decode",
]

_RESIDUAL_DILATIONS = (1, 3, 9)


# ------------------------------------------------------------------------------------------- shapes
def _head_dim(cfg: Code2WavConfig) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def total_upsample(cfg: Code2WavConfig) -> int:
    """Samples per codec frame: prod(upsample_rates + upsampling_ratios) (1920 = 24 kHz / 12.5 Hz)."""
    return int(np.prod(tuple(cfg.upsample_rates) + tuple(cfg.upsampling_ratios)))


def output_length(cfg: Code2WavConfig, num_frames: int) -> int:
    """Samples that one decode of `num_frames` frames returns (1920 T - 555 for the published model)."""
    n = num_frames
    for r in cfg.upsampling_ratios:  # kernel == stride: nothing trimmed
        n *= r
    for r in cfg.upsample_rates:  # kernel 2r, stride r, r trimmed on each side
        n = (n - 1) * r
    return n


def lost_samples(cfg: Code2WavConfig) -> int:
    """Samples a decode call falls short of total_upsample * T (independent of T): 555 for (8,5,4,3,2,2)."""
    return total_upsample(cfg) * 1 - output_length(cfg, 1)


def chunked_output_length(cfg: Code2WavConfig, num_frames: int, chunk_size: int = 300) -> int:
    """Samples of the reference's `chunked_decode`: each chunk loses `lost_samples`."""
    return total_upsample(cfg) * num_frames - lost_samples(cfg) * (-(-num_frames // chunk_size))


def _conv_stack_ops(cfg: Code2WavConfig) -> list[tuple[str, int, int]]:
    """The convolutional part in forward order as (kind, kernel, dilation or stride)."""
    ops: list[tuple[str, int, int]] = []
    for r in cfg.upsampling_ratios:
        ops += [("tconv", r, r), ("conv", 7, 1)]  # ConvNeXt: its depthwise k7 conv
    ops.append(("conv", 7, 1))
    for r in cfg.upsample_rates:
        ops.append(("tconv", 2 * r, r))
        for d in _RESIDUAL_DILATIONS:
            ops += [("conv", 7, d), ("conv", 1, 1)]
    ops.append(("conv", 7, 1))
    return ops


def receptive_field_frames(cfg: Code2WavConfig) -> int:
    """Frames of left context the convolutional part needs so that the first sample a stream emits
    after frame s (sample total_upsample * s - lost_samples) is exact.

    Walks the ops backwards from that sample to the earliest input frame it depends on: a causal
    conv reaches (k-1)*d samples back, a trimmed transposed conv's output j starts at input
    ceil((j + trim - k + 1) / stride).
    """
    frame = 1 << 20  # far from the start, so the zero padding never clips the walk
    t = total_upsample(cfg) * frame - lost_samples(cfg)
    for kind, k, n in reversed(_conv_stack_ops(cfg)):
        if kind == "conv":
            t -= (k - 1) * n
        else:
            trim = conv.conv_transpose_trim(k, n)
            t = -((-(t + trim - k + 1)) // n)
    return frame - t


# -------------------------------------------------------------------------------------------- specs
def _transformer_layer_specs(cfg: Code2WavConfig) -> dict:
    h, std = cfg.hidden_size, cfg.initializer_range
    q_out = cfg.num_attention_heads * _head_dim(cfg)
    kv_out = cfg.num_key_value_heads * _head_dim(cfg)

    def linear(n_in, n_out, axes, bias):
        spec = {"kernel": ParamSpec((n_in, n_out), axes, std=std)}
        if bias:
            spec["bias"] = ParamSpec((n_out,), (axes[1],), init="zeros")
        return spec

    scale = lambda: {"scale": ParamSpec((h,), ("embed",), init="constant", value=cfg.layer_scale_initial_scale)}  # noqa: E731
    return {
        "self_attn": {
            "q_proj": linear(h, q_out, ("embed", "q_heads"), cfg.attention_bias),
            "k_proj": linear(h, kv_out, ("embed", "kv_heads"), cfg.attention_bias),
            "v_proj": linear(h, kv_out, ("embed", "kv_heads"), cfg.attention_bias),
            "o_proj": linear(q_out, h, ("q_heads", "embed"), cfg.attention_bias),
        },
        "mlp": {
            "gate_proj": linear(h, cfg.intermediate_size, ("embed", "mlp"), False),
            "up_proj": linear(h, cfg.intermediate_size, ("embed", "mlp"), False),
            "down_proj": linear(cfg.intermediate_size, h, ("mlp", "embed"), False),
        },
        "input_layernorm": {"weight": ParamSpec((h,), ("embed",), init="ones")},
        "post_attention_layernorm": {"weight": ParamSpec((h,), ("embed",), init="ones")},
        "self_attn_layer_scale": scale(),
        "mlp_layer_scale": scale(),
    }


def code2wav_specs(cfg: Code2WavConfig) -> dict:
    """ParamSpec tree of `Qwen3OmniMoeCode2Wav` (mount it under the top-level key "code2wav")."""
    h, std = cfg.hidden_size, cfg.initializer_range
    upsample = {
        str(i): {"0": {"conv": conv.conv_transpose_specs(h, h, r, std)}, "1": conv.convnext_specs(h, std)}
        for i, r in enumerate(cfg.upsampling_ratios)
    }
    decoder = {"0": {"conv": conv.conv_specs(h, cfg.decoder_dim, 7, std=std)}}
    for i, r in enumerate(cfg.upsample_rates):
        d_in, d_out = cfg.decoder_dim // 2**i, cfg.decoder_dim // 2 ** (i + 1)
        block = {"0": conv.snake_specs(d_in), "1": {"conv": conv.conv_transpose_specs(d_in, d_out, 2 * r, std)}}
        for j in range(len(_RESIDUAL_DILATIONS)):
            block[str(2 + j)] = conv.residual_unit_specs(d_out, std)
        decoder[str(1 + i)] = {"block": block}
    n = len(cfg.upsample_rates)
    d_last = cfg.decoder_dim // 2**n
    decoder[str(n + 1)] = conv.snake_specs(d_last)
    decoder[str(n + 2)] = {"conv": conv.conv_specs(d_last, 1, 7, std=std)}
    return {
        "code_embedding": {
            "weight": ParamSpec((cfg.codebook_size * cfg.num_quantizers, h), ("vocab", "embed"), std=std)
        },
        "pre_transformer": {
            "layers": stack_layers(_transformer_layer_specs(cfg), cfg.num_hidden_layers),
            "norm": {"weight": ParamSpec((h,), ("embed",), init="ones")},
        },
        "upsample": upsample,
        "decoder": decoder,
    }


# ------------------------------------------------------------------------------------------ forward
def embed_codes(params: dict, codes_bqt: jax.Array, cfg: Code2WavConfig, dtype) -> jax.Array:
    """(B, Q, T) codes -> (B, T, hidden): mean over quantizers of rows q * codebook_size + code."""
    if codes_bqt.shape[1] != cfg.num_quantizers:
        raise ValueError(f"Expected {cfg.num_quantizers} layer of codes, got {codes_bqt.shape[1]}")
    offsets = (jnp.arange(cfg.num_quantizers, dtype=jnp.int32) * cfg.codebook_size)[None, :, None]
    table = params["code_embedding"]["weight"].astype(dtype)
    emb_bqtd = jnp.take(table, codes_bqt.astype(jnp.int32) + offsets, axis=0)
    return jnp.mean(emb_bqtd, axis=1)


def _linear(x, p):
    y = jnp.dot(x, p["kernel"].astype(x.dtype))
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


def _act(name: str):
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu", "gelu_pytorch_tanh"):
        return functools.partial(jax.nn.gelu, approximate=name != "gelu")
    raise NotImplementedError(f"code2wav hidden_act={name!r}")


def _layer(lp: dict, x_bsd: jax.Array, cos, sin, cfg: Code2WavConfig, attend):
    """One pre-transformer layer; `attend(q, k, v) -> (B, S, H, D)` carries the mask / cache logic."""
    b, s, _ = x_bsd.shape
    hd = _head_dim(cfg)
    p = lp["self_attn"]
    h = rms_norm(x_bsd, lp["input_layernorm"]["weight"], cfg.rms_norm_eps)
    q = _linear(h, p["q_proj"]).reshape(b, s, cfg.num_attention_heads, hd)
    k = _linear(h, p["k_proj"]).reshape(b, s, cfg.num_key_value_heads, hd)
    v = _linear(h, p["v_proj"]).reshape(b, s, cfg.num_key_value_heads, hd)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    a = _linear(attend(q, k, v).reshape(b, s, -1), p["o_proj"])
    x_bsd = x_bsd + lp["self_attn_layer_scale"]["scale"].astype(x_bsd.dtype) * a
    h = rms_norm(x_bsd, lp["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
    m = lp["mlp"]
    h = _linear(_act(cfg.hidden_act)(_linear(h, m["gate_proj"])) * _linear(h, m["up_proj"]), m["down_proj"])
    return x_bsd + lp["mlp_layer_scale"]["scale"].astype(x_bsd.dtype) * h


def _over_layers(layers: dict, carry, xs, body, cfg: Code2WavConfig, rt: Runtime):
    """Runs `body(lp, carry, x_i) -> (carry, y_i)` over the stacked layers (scanned or unrolled)."""
    if rt.scan_layers:
        return jax.lax.scan(lambda c, inp: body(inp[0], c, inp[1]), carry, (layers, xs))
    ys = []
    for i in range(cfg.num_hidden_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], layers)
        carry, y = body(lp, carry, jax.tree.map(lambda a, i=i: a[i], xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def pre_transformer(params: dict, x_btd: jax.Array, cfg: Code2WavConfig, rt: Runtime) -> jax.Array:
    """`Qwen3OmniMoeCode2WavTransformerModel` on (B, T, D) embeddings, positions 0..T-1 -> (B, T, D)."""
    b, t, _ = x_btd.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    cos, sin = rope_cos_sin(positions, _head_dim(cfg), cfg.rope_theta, x_btd.dtype)
    # The reference's sliding_window_overlay keeps keys j > i - window: `window - 1` keys back.
    window = (cfg.sliding_window - 1, 0)

    def attend(q, k, v):
        return attn_lib.self_attention(q, k, v, causal=True, window=window, impl=rt.attention_impl)

    def body(lp, x, _):
        return _layer(lp, x, cos, sin, cfg, attend), None

    x, _ = _over_layers(params["layers"], x_btd, jnp.zeros((cfg.num_hidden_layers,)), body, cfg, rt)
    return rms_norm(x, params["norm"]["weight"], cfg.rms_norm_eps)


def vocode(params: dict, hidden_btd: jax.Array, cfg: Code2WavConfig) -> jax.Array:
    """The convolutional part: upsampling stages, decoder, clamp. (B, T, hidden) -> (B, output_length(T))."""
    x = hidden_btd
    for i, r in enumerate(cfg.upsampling_ratios):
        stage = params["upsample"][str(i)]
        x = conv.causal_conv_transpose1d(x, stage["0"]["conv"], stride=r)
        x = conv.convnext_block(x, stage["1"])
    dec = params["decoder"]
    x = conv.causal_conv1d(x, dec["0"]["conv"])
    for i, r in enumerate(cfg.upsample_rates):
        block = dec[str(1 + i)]["block"]
        x = conv.snake_beta(x, block["0"])
        x = conv.causal_conv_transpose1d(x, block["1"]["conv"], stride=r)
        for j, d in enumerate(_RESIDUAL_DILATIONS):
            x = conv.residual_unit(x, block[str(2 + j)], dilation=d)
    n = len(cfg.upsample_rates)
    x = conv.snake_beta(x, dec[str(n + 1)])
    x = conv.causal_conv1d(x, dec[str(n + 2)]["conv"])
    return jnp.clip(x[..., 0], -1.0, 1.0)


def decode(params: dict, codes_bqt: jax.Array, cfg: Code2WavConfig, rt: Runtime) -> jax.Array:
    """`Qwen3OmniMoeCode2Wav.forward`: codes (B, Q, T) int -> waveform (B, output_length(cfg, T)) in [-1, 1].

    Causal: decoding a prefix of the frames yields a prefix of this output.
    """
    x = embed_codes(params, codes_bqt, cfg, jnp.dtype(rt.dtype))
    x = pre_transformer(params["pre_transformer"], x, cfg, rt)
    return vocode(params, x, cfg)


# -------------------------------------------------------------------------------- host entry points
def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _bucket_frames(num_frames: int, multiple: int | None) -> int:
    """Frames a decode of `num_frames` is padded to: a multiple of `multiple`; by default (None) of 8
    up to 128 frames and of 16 beyond.

    Padding frames go through the whole conv stack, whose cost is linear in frames, so the bucket
    width is time: 100 frames padded to 112 decoded 12% slower than unpadded, padded to 104 6% slower
    (measured on bench/code2wav_cpu.py's "small" vocoder, 2 CPU threads). The finer buckets for short utterances cost more compilations (about 2 s each
    there): at most 29 programs up to 325 frames (the reference's 300-frame chunks + 25 of context)
    instead of 21 with 16 throughout.
    """
    if multiple is None:
        multiple = 8 if num_frames <= 128 else 16
    return _round_up(num_frames, multiple)


@functools.lru_cache(maxsize=None)
def _jitted_decode(cfg: Code2WavConfig, rt: Runtime):
    return jax.jit(functools.partial(decode, cfg=cfg, rt=rt))


def decode_bucketed(
    params: dict, codes_bqt, cfg: Code2WavConfig, rt: Runtime, *, multiple: int | None = None
) -> np.ndarray:
    """`decode` with T padded up to a bucket (one compilation per bucket): a multiple of `multiple`, or
    by default of 8 frames up to 128 frames and of 16 beyond (see `_bucket_frames`).

    Frames appended at the end cannot change earlier samples (causality), so the padded decode cut to
    `output_length(cfg, T)` is the unpadded one. Returns float32 numpy (B, output_length(cfg, T)).
    Off GPU/TPU the attention mask is materialised (T x T per head): for long utterances prefer
    `chunked_decode` (the reference's audio) or `StreamingDecoder` (the exact full decode).
    """
    codes = np.asarray(codes_bqt)
    t = codes.shape[-1]
    padded = np.zeros((*codes.shape[:2], _bucket_frames(t, multiple)), np.int32)
    padded[..., :t] = codes
    wav = _jitted_decode(cfg, rt)(params, jnp.asarray(padded))
    return np.asarray(wav[:, : output_length(cfg, t)], np.float32)


def chunked_decode(
    params: dict,
    codes_bqt,
    cfg: Code2WavConfig,
    rt: Runtime,
    *,
    chunk_size: int = 300,
    left_context_size: int = 25,
    multiple: int | None = None,
) -> np.ndarray:
    """The reference's `Qwen3OmniMoeCode2Wav.chunked_decode`, seams included.

    Windows [start - ctx, end) with ctx = left_context_size if start - left_context_size > 0 else
    start; each window is decoded from scratch and its first ctx * total_upsample samples dropped.
    Output (B, chunked_output_length(cfg, T, chunk_size)) float32 numpy.
    """
    codes = np.asarray(codes_bqt)
    t = codes.shape[-1]
    hop = total_upsample(cfg)
    wavs = []
    start = 0
    while start < t:
        end = min(start + chunk_size, t)
        ctx = left_context_size if start - left_context_size > 0 else start
        wav = decode_bucketed(params, codes[..., start - ctx : end], cfg, rt, multiple=multiple)
        wavs.append(wav[:, ctx * hop :])
        start = end
    return np.concatenate(wavs, axis=-1) if wavs else np.zeros((codes.shape[0], 0), np.float32)


def decode_batch(
    params: dict,
    codes_bqt,
    lengths_b,
    cfg: Code2WavConfig,
    rt: Runtime,
    *,
    chunked: bool = True,
    chunk_size: int = 300,
    left_context_size: int = 25,
    multiple: int | None = None,
) -> list[np.ndarray]:
    """Decodes rows of different lengths together; returns one float32 waveform per row.

    codes_bqt: (B, Q, T_max); row b's frames are [0, lengths_b[b]); later codes are ignored (zeroed,
    as the reference zeroes codes after a row's EOS). chunked=True gives the reference's batched
    `generate` audio (chunked_decode, row b cut to chunked_output_length(cfg, L_b, chunk_size));
    chunked=False the seamless full decode, row b cut to output_length(cfg, L_b). Either way a row
    equals decoding it alone: every op is causal and chunk boundaries do not depend on T_max.
    """
    codes = np.asarray(codes_bqt)
    lengths = np.asarray(lengths_b, np.int64)
    if lengths.shape != (codes.shape[0],) or (lengths < 0).any() or (lengths > codes.shape[-1]).any():
        raise ValueError(f"lengths {lengths.tolist()} must give one length in [0, {codes.shape[-1]}] per row")
    codes = np.where(np.arange(codes.shape[-1])[None, None, :] >= lengths[:, None, None], 0, codes)
    if chunked:
        wav = chunked_decode(params, codes, cfg, rt, chunk_size=chunk_size, left_context_size=left_context_size,
                             multiple=multiple)
        keep = [chunked_output_length(cfg, int(n), chunk_size) for n in lengths]
    else:
        wav = decode_bucketed(params, codes, cfg, rt, multiple=multiple)
        keep = [max(0, output_length(cfg, int(n))) if n else 0 for n in lengths]
    return [wav[b, :n].copy() for b, n in enumerate(keep)]


# ---------------------------------------------------------------------------------------- streaming
class StreamState(NamedTuple):
    """What a stream carries between chunks (shapes for L layers, W = sliding_window, C = context)."""

    k: jax.Array  # (L, B, W-1, Hkv, D) rotated keys of the last W-1 frames (frame seen-W+1+i at slot i)
    v: jax.Array  # (L, B, W-1, Hkv, D)
    hidden: jax.Array  # (B, C, hidden) pre-transformer output of frames [seen - C, seen)
    seen: jax.Array  # () int32 frames consumed so far


def init_stream_state(cfg: Code2WavConfig, batch: int, dtype, context: int | None = None) -> StreamState:
    context = receptive_field_frames(cfg) if context is None else context
    kv = (cfg.num_hidden_layers, batch, cfg.sliding_window - 1, cfg.num_key_value_heads, _head_dim(cfg))
    return StreamState(
        jnp.zeros(kv, dtype), jnp.zeros(kv, dtype), jnp.zeros((batch, context, cfg.hidden_size), dtype),
        jnp.zeros((), jnp.int32),
    )


def _pre_transformer_step(params, x_bcd, state: StreamState, n_real, cfg: Code2WavConfig, rt: Runtime):
    """Pre-transformer on C new frames (the first n_real real) over the cached last W-1 frames."""
    b, c, _ = x_bcd.shape
    w = cfg.sliding_window
    seen = state.seen
    q_pos = seen + jnp.arange(c, dtype=jnp.int32)
    k_pos = seen - (w - 1) + jnp.arange(w - 1 + c, dtype=jnp.int32)  # cache slots, then the new frames
    mask_qk = (k_pos[None] <= q_pos[:, None]) & (k_pos[None] > q_pos[:, None] - w) & (k_pos[None] >= 0)
    mask_bqk = jnp.broadcast_to(mask_qk[None], (b, c, w - 1 + c))
    cos, sin = rope_cos_sin(jnp.broadcast_to(q_pos[None], (b, c)), _head_dim(cfg), cfg.rope_theta, x_bcd.dtype)

    def body(lp, x, cache):
        k_cache, v_cache = cache
        kept = {}

        def attend(q, k, v):
            k_all = jnp.concatenate([k_cache, k.astype(k_cache.dtype)], axis=1)
            v_all = jnp.concatenate([v_cache, v.astype(v_cache.dtype)], axis=1)
            # The next chunk needs the W-1 frames ending at the last *real* one.
            kept["k"] = jax.lax.dynamic_slice_in_dim(k_all, n_real, w - 1, axis=1)
            kept["v"] = jax.lax.dynamic_slice_in_dim(v_all, n_real, w - 1, axis=1)
            return attn_lib.masked_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask_bqk,
                                             q.shape[-1] ** -0.5)

        x = _layer(lp, x, cos, sin, cfg, attend)
        return x, (kept["k"], kept["v"])

    x, (k_new, v_new) = _over_layers(params["layers"], x_bcd, (state.k, state.v), body, cfg, rt)
    return rms_norm(x, params["norm"]["weight"], cfg.rms_norm_eps), k_new, v_new


def stream_step(
    params: dict, state: StreamState, codes_bqc: jax.Array, n_real: jax.Array, cfg: Code2WavConfig, rt: Runtime
) -> tuple[StreamState, jax.Array, jax.Array]:
    """Consumes C frames (the first `n_real` real, the rest padding) -> (state, wav (B, total_upsample*C), count).

    The first `count` samples of wav are the next samples of the full causal decode.
    """
    hop, lost = total_upsample(cfg), lost_samples(cfg)
    ctx = state.hidden.shape[1]
    c = codes_bqc.shape[-1]
    x = embed_codes(params, codes_bqc, cfg, jnp.dtype(rt.dtype))
    x, k_new, v_new = _pre_transformer_step(params["pre_transformer"], x, state, n_real, cfg, rt)
    seen = state.seen
    have = jnp.minimum(seen, ctx)
    # Frames [seen - have, seen - have + ctx + C): stored history, the new frames, then unused slots.
    # Near the start the window begins at frame 0, so the convs' zero padding is the full decode's.
    buf = jnp.concatenate([state.hidden, x, jnp.zeros_like(state.hidden)], axis=1)
    window = jax.lax.dynamic_slice_in_dim(buf, ctx - have, ctx + c, axis=1)
    wav = vocode(params, window, cfg)  # sample i is global sample hop * (seen - have) + i
    emitted = jnp.maximum(hop * seen - lost, 0)
    total = jnp.where(seen + n_real > 0, hop * (seen + n_real) - lost, 0)
    out = jax.lax.dynamic_slice_in_dim(wav, emitted - hop * (seen - have), hop * c, axis=1)
    hidden = jax.lax.dynamic_slice_in_dim(jnp.concatenate([state.hidden, x], axis=1), n_real, ctx, axis=1)
    return StreamState(k_new, v_new, hidden, seen + n_real), out, total - emitted


@functools.lru_cache(maxsize=None)
def _jitted_stream_step(cfg: Code2WavConfig, rt: Runtime):
    return jax.jit(functools.partial(stream_step, cfg=cfg, rt=rt), donate_argnums=(1,))


class StreamingDecoder:
    """Seamless streaming Code2Wav: `push` frames as they arrive, get the new audio back.

        dec = StreamingDecoder(params, cfg, rt, batch=B)
        for codes_bqn in frames:          # any n >= 0 per push
            audio_bn = dec.push(codes_bqn)  # float32 numpy (B, samples newly final)

    After T frames the concatenated pushes equal `decode` of all T frames (output_length(cfg, T)
    samples); nothing is held back that a later frame could still change, and nothing is dropped
    at a push boundary. Each push runs one jitted step per piece: `buckets` are the compiled chunk
    sizes; a push longer than the largest bucket is split, the last piece padded up to the smallest
    bucket that holds it. The pre-transformer reads its KV cache; the convolutional part is re-run
    over `context` stored frames (default and minimum: `receptive_field_frames(cfg)`, 10 for the
    published model) plus the new ones, so a push of n frames costs about ctx + n frames of
    convolution.
    """

    def __init__(self, params: dict, cfg: Code2WavConfig, rt: Runtime, *, batch: int = 1,
                 buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128), context: int | None = None):
        self.params, self.cfg, self.rt = params, cfg, rt
        self.buckets = tuple(sorted(set(buckets)))
        self.context = receptive_field_frames(cfg) if context is None else context
        if self.context < receptive_field_frames(cfg):
            raise ValueError(f"context {self.context} < receptive_field_frames = {receptive_field_frames(cfg)}: "
                             "the stream would no longer equal the full decode")
        self.state = init_stream_state(cfg, batch, jnp.dtype(rt.dtype), self.context)
        self.batch = batch
        self.frames = 0
        self.samples = 0
        self._step = _jitted_stream_step(cfg, rt)

    def _pieces(self, n: int) -> Iterator[tuple[int, int]]:
        """(real frames, bucket) pieces covering n frames: full largest buckets, then the remainder
        padded up to the smallest bucket that holds it."""
        largest = self.buckets[-1]
        while n > 0:
            real = min(n, largest)
            yield real, next(b for b in self.buckets if b >= real)
            n -= real

    def push(self, codes_bqn) -> np.ndarray:
        codes = np.asarray(codes_bqn)
        if codes.ndim != 3 or codes.shape[0] != self.batch or codes.shape[1] != self.cfg.num_quantizers:
            raise ValueError(f"expected codes ({self.batch}, {self.cfg.num_quantizers}, n), got {codes.shape}")
        out = []
        offset = 0
        for real, size in self._pieces(codes.shape[-1]):
            piece = np.zeros((self.batch, self.cfg.num_quantizers, size), np.int32)
            piece[..., :real] = codes[..., offset : offset + real]
            self.state, wav, count = self._step(self.params, self.state, jnp.asarray(piece), jnp.int32(real))
            out.append(np.asarray(wav[:, : int(count)], np.float32))
            offset += real
            self.frames += real
        audio = np.concatenate(out, axis=-1) if out else np.zeros((self.batch, 0), np.float32)
        self.samples += audio.shape[-1]
        return audio


def stream_decode(
    params: dict, codes_iter: Iterable, cfg: Code2WavConfig, rt: Runtime, *, batch: int = 1, **kwargs
) -> Iterator[np.ndarray]:
    """Generator form of `StreamingDecoder`: yields (B, samples) audio for each (B, Q, n) codes chunk."""
    dec = StreamingDecoder(params, cfg, rt, batch=batch, **kwargs)
    for codes in codes_iter:
        yield dec.push(codes)
