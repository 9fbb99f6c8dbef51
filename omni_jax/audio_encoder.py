"""The AuT audio encoder (`Qwen3OmniMoeAudioEncoder`): log-mel -> audio embeddings for the thinker.

Reference pipeline (transformers 5.23 `modeling_qwen3_omni_moe.py`), reproduced exactly:

  1. Each audio's frames are cut into chunks of `2 * n_window` (100) frames, the last one holding the
     remainder; every chunk of the batch is zero-padded to the batch's *longest* chunk (normally
     100 frames; shorter when every audio is under one chunk).
  2. Three Conv2d(k=3, s=2, p=1) + exact GELU over (mel, time) per chunk, flatten (channels, mel) and
     `conv_out`: 100 frames -> 13 tokens. Sinusoidal positions restart at 0 in every chunk.
  3. Only each chunk's valid tokens are kept (`audio_output_lengths` of the chunk length).
  4. Encoder layers (pre-LN, bidirectional attention with biases, exact-GELU MLP) attend
     block-diagonally over windows: each audio's token stream is cut into windows of
     `m * (n_window_infer // (2 * n_window))` tokens, where `m` is the longest post-CNN chunk of the
     batch (13 whenever some chunk is full, so 104 tokens = 8 s for the published config; smaller
     for a batch of short audios only), plus a remainder window.
  5. `ln_post -> proj1 -> GELU -> proj2`; tokens come out audio by audio, in time order.

How we keep shapes static and memory linear in audio length
-----------------------------------------------------------
All bookkeeping is host-side numpy (`plan_audio`): it lists the chunks, the windows, and where each
token goes. The jitted core (`encode_padded`) sees only fixed-size arrays:

  * `chunks_cmf` (C_pad, mel, 2*n_window): the chunks, zero padded to 2*n_window frames. The
    reference pads to the batch's longest chunk L; padding further is exact because after every
    conv we zero the time steps at and beyond the reference's own length (ceil(L/2), ceil(L/4)),
    which is what the next conv's zero padding sees in the reference (a short chunk's CNN output
    depends on that padding: reference doc §3 quirk). L is a traced scalar, so short-only batches
    do not recompile.
  * Tokens (C_pad * 13) are gathered into rows of W = 13 * (n_window_infer // (2 * n_window))
    slots; a window occupies consecutive slots of one row and several short windows share a row
    (sequential packing). `segment_ids` (rows, W) give each window of a row its own id (0 = empty
    slot), so attention is `self_attention(..., segment_ids=...)` over (rows, W): block-diagonal and
    bidirectional, O(tokens * W) time and memory, never an O(N^2) mask over the whole audio.
  * Convolutions run `lax.map` over slices of `conv_batch` chunks so their (channels, mel, time)
    activations never exist for the whole audio at once (the reference's `conv_chunksize` idea).
    On CPU conv2d2/conv2d3 are nine matrix products (one per kernel tap), which XLA:CPU runs ~4x
    faster than its convolution inside the loop; elsewhere `lax.conv` (cuDNN).

Bucketing: the chunk count C and the row count G are each rounded up by `bucket_size`: exact up to 8,
then to a multiple of 2^(bit_length(n-1) - 3), i.e. four sizes per octave (<= 25% padding, a few
dozen programs from one second to hours of audio). Padding chunks and rows are never read into
valid tokens. The token output has T_pad = G_pad * W rows, valid ones first.

Parameter tree (paths mirror `thinker.audio_tower.*` checkpoint keys; Conv2d weights in PyTorch
OIHW layout, Linear weights as `kernel` (in, out), layers stacked on a leading `layers` axis):

    conv2d{1,2,3}/{weight (C, C_in, 3, 3), bias (C,)}
    conv_out/kernel                       (C * mel/8, d_model)        (no bias)
    layers/self_attn/{q,k,v,out}_proj/{kernel, bias}
    layers/{self_attn_layer_norm, final_layer_norm}/{weight, bias}
    layers/fc1/{kernel (d, ffn), bias}, layers/fc2/{kernel (ffn, d), bias}
    ln_post/{weight, bias}, proj1/{kernel, bias}, proj2/{kernel (d, output_dim), bias}

The sinusoidal position table is a non-persistent buffer in the reference (not in the checkpoint):
we compute it (`sinusoid_positions`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import AudioEncoderConfig, Runtime
from omni_jax.nn import attention as attn_lib
from omni_jax.nn.norms import layer_norm
from omni_jax.nn.params import ParamSpec, stack_layers

__all__ = [
    "audio_encoder_specs",
    "audio_output_lengths",
    "sinusoid_positions",
    "bucket_size",
    "AudioPlan",
    "plan_audio",
    "pack_batched_features",
    "encode_padded",
    "encode",
    "encode_batched",
    "TOKENS_PER_CHUNK",
]

# Post-CNN tokens of one full chunk. The reference hard-codes 13 in `_get_feat_extract_output_lengths`
# (ceil(ceil(ceil(100/2)/2)/2)); only chunk sizes whose conv output is 13 are self-consistent there.
TOKENS_PER_CHUNK = 13
_LN_EPS = 1e-5  # torch nn.LayerNorm default; the reference sets no eps


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def _conv_out_features(cfg: AudioEncoderConfig) -> int:
    mel = cfg.num_mel_bins
    return cfg.downsample_hidden_size * ((((mel + 1) // 2 + 1) // 2 + 1) // 2)


def _linear(n_in: int, n_out: int, axes: tuple, std: float, bias_axis) -> dict:
    return {
        "kernel": ParamSpec((n_in, n_out), axes, std=std),
        "bias": ParamSpec((n_out,), (bias_axis,), init="zeros"),
    }


def _layer_norm_spec(dim: int) -> dict:
    return {"weight": ParamSpec((dim,), ("embed",), init="ones"), "bias": ParamSpec((dim,), ("embed",), init="zeros")}


def audio_encoder_specs(cfg: AudioEncoderConfig) -> dict:
    """ParamSpec tree of the audio tower (the caller nests it as `{"audio_tower": ...}`)."""
    _check_config(cfg)
    std = cfg.initializer_range
    d, ffn, ch = cfg.d_model, cfg.encoder_ffn_dim, cfg.downsample_hidden_size
    conv_axes = ("conv_out_channels", "conv_in_channels", None, None)

    def conv(c_in):
        return {
            "weight": ParamSpec((ch, c_in, 3, 3), conv_axes, std=std),
            "bias": ParamSpec((ch,), ("conv_out_channels",), init="zeros"),
        }

    layer = {
        "self_attn": {
            "q_proj": _linear(d, d, ("embed", "q_heads"), std, "q_heads"),
            "k_proj": _linear(d, d, ("embed", "kv_heads"), std, "kv_heads"),
            "v_proj": _linear(d, d, ("embed", "kv_heads"), std, "kv_heads"),
            "out_proj": _linear(d, d, ("q_heads", "embed"), std, "embed"),
        },
        "self_attn_layer_norm": _layer_norm_spec(d),
        "fc1": _linear(d, ffn, ("embed", "mlp"), std, "mlp"),
        "fc2": _linear(ffn, d, ("mlp", "embed"), std, "embed"),
        "final_layer_norm": _layer_norm_spec(d),
    }
    return {
        "conv2d1": conv(1),
        "conv2d2": conv(ch),
        "conv2d3": conv(ch),
        "conv_out": {"kernel": ParamSpec((_conv_out_features(cfg), d), ("conv_features", "embed"), std=std)},
        "layers": stack_layers(layer, cfg.encoder_layers),
        "ln_post": _layer_norm_spec(d),
        "proj1": _linear(d, d, ("embed", "mlp"), std, "mlp"),
        "proj2": _linear(d, cfg.output_dim, ("mlp", "embed"), std, "embed"),
    }


def _check_config(cfg: AudioEncoderConfig) -> None:
    chunk = 2 * cfg.n_window
    if (((chunk + 1) // 2 + 1) // 2 + 1) // 2 != TOKENS_PER_CHUNK:  # three k=3, s=2, p=1 convs
        raise ValueError(
            f"audio n_window={cfg.n_window}: a {chunk}-frame chunk does not give {TOKENS_PER_CHUNK} tokens after "
            "the three stride-2 convs, which the reference's length formula assumes (n_window must be 49..52)"
        )
    if cfg.n_window_infer // chunk < 1:
        raise ValueError(
            f"audio n_window_infer={cfg.n_window_infer} is shorter than one chunk ({chunk} frames); the "
            "reference's attention window would be 0 tokens"
        )
    if cfg.activation_function != "gelu":
        raise ValueError(f"audio activation_function={cfg.activation_function!r}; the AuT uses exact 'gelu'")
    if cfg.d_model % cfg.encoder_attention_heads:
        raise ValueError(f"audio d_model={cfg.d_model} is not divisible by {cfg.encoder_attention_heads} heads")


# --------------------------------------------------------------------------------------------------
# Host-side layout (numpy)
# --------------------------------------------------------------------------------------------------


def audio_output_lengths(feature_lens, n_window: int = 50) -> np.ndarray:
    """Audio tokens per audio for `feature_lens` mel frames: the reference's
    `_get_feat_extract_output_lengths` (= 13 * (L // 100) + ceil((L % 100) / 8) for n_window 50)."""
    lens = np.asarray(feature_lens, dtype=np.int64)
    chunk = 2 * n_window
    leave = lens % chunk
    feat = (leave - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (lens // chunk) * TOKENS_PER_CHUNK


@functools.lru_cache(maxsize=8)
def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """(length, channels) float32 `SinusoidsPositionEmbedding` table: [sin | cos] halves.

    Rounded like torch's fp32 computation (fp32 products; exp, sin, cos correctly rounded from
    float64): agrees with the reference buffer to 1 ulp where torch's vectorised exp rounds the
    timescale correctly; where it is 1 ulp off (which timescales depends on the CPU), position p
    multiplies that ulp (up to 1.2e-4 at p < 1500, measured on an AVX-512 Xeon).
    """
    if channels % 2:
        raise ValueError("sinusoidal positions need an even channel count")
    increment = np.log(max_timescale) / (channels // 2 - 1)
    exponent = np.float32(-increment) * np.arange(channels // 2, dtype=np.float32)
    inv_timescales = np.exp(exponent.astype(np.float64)).astype(np.float32)
    scaled = (np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]).astype(np.float64)
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def bucket_size(n: int) -> int:
    """Rounds a count up to one of four sizes per octave (exact up to 8), bounding recompilations."""
    if n <= 8:
        return max(int(n), 1)
    step = 1 << ((int(n) - 1).bit_length() - 3)
    return -(-int(n) // step) * step


class AudioPlan(NamedTuple):
    """Host-side layout of one batch of audios; every array is a static-shape input of `encode_padded`.

    chunks_cmf: (C_pad, mel, 2*n_window) float32 chunks, zero padded.
    pad_len: () int32, the batch's longest chunk in frames (what the reference pads to).
    row_src: (G_pad * W,) int32, for each attention slot the flat index into the (C_pad * 13)
      post-CNN tokens (0 for empty slots).
    segment_ids: (G_pad, W) int32, window id within its row (1, 2, ...), 0 for empty slots.
    out_src: (G_pad * W,) int32, for output token p (reference order) its attention slot; the first
      `num_tokens` entries are real.
    token_counts: (A,) int64 audio tokens per audio (host only).
    """

    chunks_cmf: np.ndarray
    pad_len: np.ndarray
    row_src: np.ndarray
    segment_ids: np.ndarray
    out_src: np.ndarray
    token_counts: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.token_counts.sum())

    def device_inputs(self) -> tuple:
        return self.chunks_cmf, self.pad_len, self.row_src, self.segment_ids, self.out_src


def plan_audio(
    input_features_mt: np.ndarray, feature_lens, cfg: AudioEncoderConfig, *, bucket: bool = True
) -> AudioPlan:
    """Chunks, windows and token routing for audios packed as the reference's audio tower takes them.

    input_features_mt: (num_mel_bins, sum(feature_lens)) the audios' valid frames, concatenated.
    feature_lens: (A,) frames per audio (each >= 1).
    bucket: round chunk and row counts up with `bucket_size` (False: exact sizes).
    """
    _check_config(cfg)
    feats = np.asarray(input_features_mt, dtype=np.float32)
    lens = np.asarray(feature_lens, dtype=np.int64).reshape(-1)
    if feats.ndim != 2 or feats.shape[0] != cfg.num_mel_bins:
        raise ValueError(f"input_features must be (num_mel_bins={cfg.num_mel_bins}, frames); got {feats.shape}")
    if lens.size == 0:
        raise ValueError("no audio given (feature_lens is empty)")
    if np.any(lens <= 0):
        raise ValueError(f"every audio needs at least one mel frame; feature_lens={lens.tolist()}")
    if int(lens.sum()) != feats.shape[1]:
        raise ValueError(f"feature_lens sum to {int(lens.sum())} frames but input_features has {feats.shape[1]}")

    chunk = 2 * cfg.n_window
    ratio = cfg.n_window_infer // chunk
    width = TOKENS_PER_CHUNK * ratio  # attention row: the largest possible window

    # Chunks (reference `chunk_and_pad_features`): full chunks then the remainder.
    n_chunks = -(-lens // chunk)
    chunk_lens = np.full(int(n_chunks.sum()), chunk, np.int64)
    last = np.cumsum(n_chunks) - 1
    tail = lens % chunk
    chunk_lens[last] = np.where(tail == 0, chunk, tail)
    num_chunks = len(chunk_lens)
    c_pad = bucket_size(num_chunks) if bucket else num_chunks
    chunks = np.zeros((c_pad, cfg.num_mel_bins, chunk), np.float32)
    start, c0 = 0, 0
    for length, k in zip(lens.tolist(), n_chunks.tolist()):
        full = length // chunk
        if full:
            block = feats[:, start:start + full * chunk].reshape(cfg.num_mel_bins, full, chunk)
            chunks[c0:c0 + full] = block.transpose(1, 0, 2)
        if length % chunk:
            chunks[c0 + full, :, : length % chunk] = feats[:, start + full * chunk:start + length]
        start += length
        c0 += k

    # Valid post-CNN tokens, in the reference's order (`get_valid_indices`).
    valid_per_chunk = audio_output_lengths(chunk_lens, cfg.n_window)
    max_valid = int(valid_per_chunk.max())
    conv_token = (np.repeat(np.arange(num_chunks) * TOKENS_PER_CHUNK, valid_per_chunk)
                  + _ranges(valid_per_chunk))
    token_counts = audio_output_lengths(lens, cfg.n_window)
    assert conv_token.size == token_counts.sum()

    # Windows (`get_audio_cu_seqlens`): per audio, windows of max_valid * ratio tokens + remainder.
    window = max_valid * ratio
    win_lens = []
    for n in token_counts.tolist():
        win_lens += [window] * (n // window) + ([n % window] if n % window else [])
    win_lens = np.asarray(win_lens, np.int64)

    # Sequential packing of windows into rows of `width` slots.
    win_row = np.empty(len(win_lens), np.int64)
    win_off = np.empty(len(win_lens), np.int64)
    win_seg = np.empty(len(win_lens), np.int64)
    row, fill, seg = 0, 0, 0
    for i, n in enumerate(win_lens.tolist()):
        if fill + n > width:
            row, fill, seg = row + 1, 0, 0
        win_row[i], win_off[i], win_seg[i] = row, fill, seg + 1
        fill, seg = fill + n, seg + 1
    num_rows = row + 1
    g_pad = bucket_size(num_rows) if bucket else num_rows

    slot = np.repeat(win_row * width + win_off, win_lens) + _ranges(win_lens)  # (T,) slot of token p
    row_src = np.zeros(g_pad * width, np.int32)
    row_src[slot] = conv_token
    segment_ids = np.zeros(g_pad * width, np.int32)
    segment_ids[slot] = np.repeat(win_seg, win_lens)
    out_src = np.zeros(g_pad * width, np.int32)
    out_src[: slot.size] = slot
    return AudioPlan(
        chunks_cmf=chunks,
        pad_len=np.asarray(int(chunk_lens.max()), np.int32),
        row_src=row_src,
        segment_ids=segment_ids.reshape(g_pad, width),
        out_src=out_src,
        token_counts=token_counts,
    )


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """concatenate(arange(n) for n in lengths), vectorised."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts


def pack_batched_features(input_features_bmt: np.ndarray, feature_attention_mask_bt: np.ndarray):
    """The processor's batched layout -> the packed one, as the reference's `get_audio_features` does.

    input_features_bmt: (B, mel, frames); feature_attention_mask_bt: (B, frames), 1 for valid frames.
    Returns (input_features (mel, sum of valid frames), feature_lens (B,)).
    """
    feats = np.asarray(input_features_bmt, dtype=np.float32)
    mask = np.asarray(feature_attention_mask_bt).astype(bool)
    if feats.ndim != 3 or mask.shape != (feats.shape[0], feats.shape[2]):
        raise ValueError(
            f"input_features (B, mel, frames) and feature_attention_mask (B, frames) disagree: {feats.shape} vs "
            f"{mask.shape}"
        )
    packed = feats.transpose(0, 2, 1)[mask].T  # frames where the mask is set, row by row
    return np.ascontiguousarray(packed), mask.sum(-1).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Device computation
# --------------------------------------------------------------------------------------------------


def _dense(x, p, dtype):
    y = jnp.dot(x, p["kernel"].astype(dtype))
    return y + p["bias"].astype(dtype) if "bias" in p else y


def _gelu(x):
    # Exact erf GELU (pitfall P6), in the reference's own form x/2 (1 + erf(x/sqrt 2)). jax.nn.gelu's
    # erfc form is equally exact (<= 3e-7 apart) but XLA:CPU computes erf faster: after the first
    # convolution this runs on 64x the mel frames (measured 0.43 -> 0.37 s of the 5 min clip's CNN).
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1 / np.sqrt(2))))


def _conv_taps_s2(x_nhwc: jax.Array, w_hwio: jax.Array) -> jax.Array:
    """k=3, s=2, p=1 convolution (no bias), one term per kernel tap, each reading a contiguous slice of
    one of the four stride-2 phases of the padded input. With several input channels a term is a
    (rows, c_in) x (c_in, c_out) product; with one input channel (the mel spectrogram) it is a
    broadcast multiply-add, which XLA:CPU fuses into one pass (measured 0.12 -> ~0.03 s for the
    5 min clip, where its own convolution and a 9-deep product are memory bound)."""
    n, h, w, c = x_nhwc.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    xp = jnp.pad(x_nhwc, ((0, 0), (1, 2 * ho + 1 - h), (1, 2 * wo + 1 - w), (0, 0)))
    phases = xp.reshape(n, ho + 1, 2, wo + 1, 2, c)
    y = None
    for i in range(3):
        for j in range(3):
            tap = phases[:, i // 2:i // 2 + ho, i % 2, j // 2:j // 2 + wo, j % 2, :]
            term = tap * w_hwio[i, j, 0] if c == 1 else jnp.dot(tap, w_hwio[i, j])
            y = term if y is None else y + term
    return y


def _conv(x_nhwc, w_hwio, bias, impl: str):
    """Conv2d(k=3, s=2, p=1) + bias + exact GELU on (n, mel, time, channels).

    w_hwio: (3, 3, in, out), arranged once outside the per-chunk loop (XLA re-slices a loop-invariant
    (out, in, kh, kw) weight on every trip; measured ~10% of the CNN). impl "gemm": one term per
    kernel tap (`_conv_taps_s2`; XLA:CPU runs these ~4x faster than its own convolution inside the
    `lax.map` loop, measured); "xla": `lax.conv_general_dilated` (cuDNN on GPU).
    """
    if impl == "gemm":
        y = _conv_taps_s2(x_nhwc, w_hwio)
    else:
        y = jax.lax.conv_general_dilated(
            x_nhwc, w_hwio, window_strides=(2, 2), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    return _gelu(y + bias)


def _conv_tokens(params, chunks_cmf, pad_len, cfg: AudioEncoderConfig, dtype, conv_batch: int, conv_impl: str):
    """(C, mel, 2*n_window) chunks -> (C, 13, d_model) post-CNN tokens with per-chunk positions."""
    len1 = (pad_len + 1) // 2  # the reference's conv output lengths for chunks padded to pad_len
    len2 = (len1 + 1) // 2

    convs = [
        (params[name]["weight"].astype(dtype).transpose(2, 3, 1, 0), params[name]["bias"].astype(dtype))
        for name in ("conv2d1", "conv2d2", "conv2d3")
    ]
    conv_out = params["conv_out"]["kernel"].astype(dtype)

    def one_chunk(x_mf):  # lax.map vmaps this over `conv_batch` chunks at a time
        x = x_mf.astype(dtype)[None, :, :, None]  # (1, mel, t, 1)
        x = _conv(x, *convs[0], conv_impl)
        # Zero what lies beyond the reference's padded length: its next conv sees zero padding there.
        x = jnp.where(jnp.arange(x.shape[2])[:, None] < len1, x, 0)
        x = _conv(x, *convs[1], conv_impl)
        x = jnp.where(jnp.arange(x.shape[2])[:, None] < len2, x, 0)
        x = _conv(x, *convs[2], conv_impl)[0]  # (mel/8, 13, ch)
        f, t, ch = x.shape
        x = x.transpose(1, 2, 0).reshape(t, ch * f)  # the reference's (b, c, f, t) -> (b, t, c*f)
        return jnp.dot(x, conv_out)

    tokens = jax.lax.map(one_chunk, chunks_cmf, batch_size=min(conv_batch, chunks_cmf.shape[0]))
    pos = sinusoid_positions(cfg.max_source_positions, cfg.d_model)[: tokens.shape[1]]
    return tokens + jnp.asarray(pos).astype(dtype)[None]


def _encoder_layer(lp, x_gwd, segment_ids_gw, cfg: AudioEncoderConfig, rt: Runtime):
    dtype = x_gwd.dtype
    g, w, d = x_gwd.shape
    heads = cfg.encoder_attention_heads
    h = layer_norm(x_gwd, lp["self_attn_layer_norm"]["weight"], lp["self_attn_layer_norm"]["bias"], _LN_EPS)
    p = lp["self_attn"]
    q = _dense(h, p["q_proj"], dtype).reshape(g, w, heads, d // heads)
    k = _dense(h, p["k_proj"], dtype).reshape(g, w, heads, d // heads)
    v = _dense(h, p["v_proj"], dtype).reshape(g, w, heads, d // heads)
    a = attn_lib.self_attention(q, k, v, segment_ids=segment_ids_gw, impl=rt.attention_impl)
    x_gwd = x_gwd + _dense(a.reshape(g, w, d), p["out_proj"], dtype)
    h = layer_norm(x_gwd, lp["final_layer_norm"]["weight"], lp["final_layer_norm"]["bias"], _LN_EPS)
    h = _dense(_gelu(_dense(h, lp["fc1"], dtype)), lp["fc2"], dtype)
    x_gwd = x_gwd + h
    if dtype == jnp.float16:  # the reference clamps fp16 activations after every layer
        limit = float(jnp.finfo(jnp.float16).max) - 1000
        x_gwd = jnp.clip(x_gwd, -limit, limit)
    return x_gwd


def encode_padded(params, chunks_cmf, pad_len, row_src, segment_ids_gw, out_src, cfg: AudioEncoderConfig,
                  rt: Runtime, *, conv_batch: int | None = None, conv_impl: str | None = None,
                  return_all_hidden: bool = False):
    """The jittable core: `AudioPlan.device_inputs()` -> (G_pad * W, output_dim) audio embeddings.

    The first `plan.num_tokens` rows are the reference's output, audio by audio; the rest is padding
    (finite values, to be ignored). Shapes: see `AudioPlan`.
    conv_batch: chunks per convolution slice (default: 4 on CPU, `cfg.conv_chunksize` elsewhere).
    conv_impl: "gemm" (a matrix product per kernel tap; the CPU default) or "xla" (`lax.conv`; elsewhere).
    return_all_hidden: also return (encoder_layers + 1, G_pad * W, d_model) hidden states in the same
      token order: the encoder input (post-CNN + positions), then every layer's output (the
      reference's `output_hidden_states`).
    """
    dtype = jnp.dtype(rt.dtype)
    on_cpu = jax.default_backend() == "cpu"
    if conv_batch is None:  # small slices stay in cache on CPU; accelerators want big batches
        conv_batch = 4 if on_cpu else cfg.conv_chunksize
    if conv_impl is None:
        conv_impl = "gemm" if on_cpu else "xla"
    if conv_impl not in ("gemm", "xla"):
        raise ValueError(f"conv_impl={conv_impl!r}; expected 'gemm' or 'xla'")
    tokens = _conv_tokens(params, chunks_cmf, pad_len, cfg, dtype, conv_batch, conv_impl)
    g, w = segment_ids_gw.shape
    x = jnp.take(tokens.reshape(-1, cfg.d_model), row_src, axis=0).reshape(g, w, cfg.d_model)

    def to_output_order(x_gwd):
        return jnp.take(x_gwd.reshape(-1, cfg.d_model), out_src, axis=0)

    layer = functools.partial(_encoder_layer, segment_ids_gw=segment_ids_gw, cfg=cfg, rt=rt)
    if rt.remat == "full":
        layer = jax.checkpoint(layer)
    elif rt.remat == "dots":
        layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)

    def body(h, lp):
        h = layer(lp, h)
        return h, (to_output_order(h) if return_all_hidden else None)

    x0 = x
    if rt.scan_layers:
        x, per_layer = jax.lax.scan(body, x, params["layers"])
    else:
        outs = []
        for i in range(cfg.encoder_layers):
            x, out = body(x, jax.tree.map(lambda a, i=i: a[i], params["layers"]))
            outs.append(out)
        per_layer = jnp.stack(outs) if return_all_hidden else None

    x = to_output_order(x)
    y = layer_norm(x, params["ln_post"]["weight"], params["ln_post"]["bias"], _LN_EPS)
    y = _gelu(_dense(y, params["proj1"], dtype))
    y = _dense(y, params["proj2"], dtype)
    if return_all_hidden:
        return y, jnp.concatenate([to_output_order(x0)[None], per_layer], axis=0)
    return y


_encode_padded_jit = jax.jit(
    encode_padded, static_argnames=("cfg", "rt", "conv_batch", "conv_impl", "return_all_hidden")
)


def encode(params, input_features_mt, feature_lens, cfg: AudioEncoderConfig, rt: Runtime):
    """Encodes audios packed as the reference's audio tower takes them (host in, device out).

    input_features_mt: (num_mel_bins, sum(feature_lens)) numpy, the audios' frames concatenated.
    feature_lens: (A,) frames per audio.
    Returns (embeddings (sum(token_counts), output_dim) jax array in the reference's order,
    token_counts (A,) numpy int64 = `audio_output_lengths(feature_lens)`).
    Compiles once per (bucketed chunk count, bucketed row count); see the module docstring.
    """
    plan = plan_audio(input_features_mt, feature_lens, cfg)
    out = _encode_padded_jit(params, *plan.device_inputs(), cfg=cfg, rt=rt)
    return out[: plan.num_tokens], plan.token_counts


def encode_batched(params, input_features_bmt, feature_attention_mask_bt, cfg: AudioEncoderConfig, rt: Runtime):
    """`encode` on the processor's layout: input_features (B, mel, frames) + feature_attention_mask (B, frames)."""
    packed, lens = pack_batched_features(input_features_bmt, feature_attention_mask_bt)
    return encode(params, packed, lens, cfg, rt)
