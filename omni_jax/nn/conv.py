"""Causal 1-D convolutions and the vocoder's building blocks (Code2Wav, `nn/conv.py`).

Activations are channels-last, `x_btc` (batch, time, channels); weights stay in PyTorch layout
(`Conv1d`: (out, in/groups, k); `ConvTranspose1d`: (in, out, k)) so that checkpoints load without a
transform. Each function mirrors one reference module of `modeling_qwen3_omni_moe`:

  causal_conv1d            Qwen3OmniMoeCausalConvNet     left pad (k-1)*d + 1 - stride, right pad to ceil(T/stride)
  causal_conv_transpose1d  Qwen3OmniMoeCausalTransConvNet ConvTranspose1d, then drop k - stride samples on *both* sides
  snake_beta               Qwen3OmniMoeSnakeBeta          x + sin^2(x e^alpha) / (e^beta + 1e-9)
  convnext_block           Qwen3OmniMoeConvNeXtBlock      causal depthwise k7 -> LayerNorm -> MLP (GELU) -> gamma, residual
  residual_unit            Qwen3OmniMoeCode2WavDecoderResidualUnit

Every op is causal in the sense that matters for streaming: decoding a prefix of the input gives a
prefix of the output. The trimmed transposed convolution looks one input step ahead (output block j
needs inputs j and j+1), which is why it yields (T-1)*stride samples for T inputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.nn.norms import layer_norm
from omni_jax.nn.params import ParamSpec

__all__ = [
    "causal_conv1d", "causal_conv_transpose1d", "snake_beta", "convnext_block", "residual_unit",
    "conv_specs", "conv_transpose_specs", "snake_specs", "convnext_specs", "residual_unit_specs",
    "causal_conv_padding", "conv_transpose_trim", "sin_squared",
]

_CONV_AXES = ("conv_out", "conv_in", "conv_kernel")
# Input channels up to which `causal_conv1d` convolves in the 2-D (1, T) form (see there).
_CONV2D_MAX_CHANNELS = 64


# ------------------------------------------------------------------------------------------- specs
def conv_specs(c_in: int, c_out: int, kernel: int, groups: int = 1, std: float = 0.02) -> dict:
    """`{"weight": (out, in/groups, k), "bias": (out,)}` of an `nn.Conv1d`."""
    return {
        "weight": ParamSpec((c_out, c_in // groups, kernel), _CONV_AXES, std=std),
        "bias": ParamSpec((c_out,), ("conv_out",), init="zeros"),
    }


def conv_transpose_specs(c_in: int, c_out: int, kernel: int, std: float = 0.02) -> dict:
    """`{"weight": (in, out, k), "bias": (out,)}` of an `nn.ConvTranspose1d`."""
    return {
        "weight": ParamSpec((c_in, c_out, kernel), ("conv_in", "conv_out", "conv_kernel"), std=std),
        "bias": ParamSpec((c_out,), ("conv_out",), init="zeros"),
    }


def snake_specs(channels: int) -> dict:
    """SnakeBeta's log-space `alpha` and `beta` (initialised to 0, i.e. a = b = 1)."""
    return {
        "alpha": ParamSpec((channels,), ("conv_out",), init="zeros"),
        "beta": ParamSpec((channels,), ("conv_out",), init="zeros"),
    }


def convnext_specs(dim: int, std: float = 0.02) -> dict:
    return {
        "dwconv": {"conv": conv_specs(dim, dim, 7, groups=dim, std=std)},
        "norm": {"weight": ParamSpec((dim,), ("embed",), init="ones"),
                 "bias": ParamSpec((dim,), ("embed",), init="zeros")},
        "pwconv1": {"kernel": ParamSpec((dim, 4 * dim), ("embed", "mlp"), std=std),
                    "bias": ParamSpec((4 * dim,), ("mlp",), init="zeros")},
        "pwconv2": {"kernel": ParamSpec((4 * dim, dim), ("mlp", "embed"), std=std),
                    "bias": ParamSpec((dim,), ("embed",), init="zeros")},
        "gamma": ParamSpec((dim,), ("embed",), init="constant", value=1e-6),
    }


def residual_unit_specs(dim: int, std: float = 0.02) -> dict:
    return {
        "act1": snake_specs(dim),
        "conv1": {"conv": conv_specs(dim, dim, 7, std=std)},
        "act2": snake_specs(dim),
        "conv2": {"conv": conv_specs(dim, dim, 1, std=std)},
    }


# ------------------------------------------------------------------------------------------ forward
def causal_conv_padding(length: int, kernel: int, dilation: int = 1, stride: int = 1) -> tuple[int, int]:
    """(left, right) zero padding of `Qwen3OmniMoeCausalConvNet` for an input of `length` samples."""
    k_eff = (kernel - 1) * dilation + 1
    left = k_eff - stride
    n_frames = (length - k_eff + left) / stride + 1
    ideal = (math.ceil(n_frames) - 1) * stride + (k_eff - left)
    return left, ideal - length


def causal_conv1d(
    x_btc: jax.Array, p: dict, *, dilation: int = 1, stride: int = 1, groups: int = 1
) -> jax.Array:
    """Causal `Conv1d` of x (B, T, C_in) with PyTorch weight (C_out, C_in/groups, k) -> (B, ceil(T/stride), C_out)."""
    weight = p["weight"].astype(x_btc.dtype)
    left, right = causal_conv_padding(x_btc.shape[1], weight.shape[-1], dilation, stride)
    if groups > 1 and groups == x_btc.shape[-1] == weight.shape[0] and stride == 1:
        # Depthwise: a sum of k shifted, per-channel-scaled copies fuses into one elementwise loop;
        # XLA:CPU's grouped convolution was measured 20-50x slower (e.g. 835 ms vs 15 ms at 1024 channels).
        xp = jnp.pad(x_btc, ((0, 0), (left, right), (0, 0)))
        t = x_btc.shape[1]
        y = sum(xp[:, j * dilation : j * dilation + t] * weight[:, 0, j] for j in range(weight.shape[-1]))
        return y + p["bias"].astype(y.dtype)
    if groups == 1 and stride == 1 and weight.shape[0] == 1:
        # One output channel (the decoder's last conv): one (C_in, k) matmul, then a k-term shifted sum.
        # XLA:CPU's convolution with a single output channel was measured 2.3x slower (6.0 vs 2.6 ms on
        # 214485 x 24 samples).
        t = x_btc.shape[1]
        z_btk = jnp.dot(x_btc, weight[0])
        z_btk = jnp.pad(z_btk, ((0, 0), (left, right), (0, 0)))
        y = sum(z_btk[:, j * dilation : j * dilation + t, j] for j in range(weight.shape[-1]))
        return (y + p["bias"].astype(y.dtype)[0])[..., None]
    if x_btc.shape[-1] <= _CONV2D_MAX_CHANNELS:
        # Few channels: the same convolution as a 2-D one over a (1, T) image. XLA:CPU runs that form
        # 1.1-1.6x faster than the 1-D one at the decoder's last two blocks (k7 at 214485 x 24:
        # 13.1 / 15.8 / 16.1 ms -> 10.2 / 10.1 / 10.3 ms for dilation 1 / 3 / 9; 71496 x 48:
        # 14.8-16.1 -> 13.2-13.5 ms) and no faster from 96 channels on (measured, 2 threads).
        y = jax.lax.conv_general_dilated(
            x_btc[:, None], weight[:, :, None], window_strides=(1, stride), padding=[(0, 0), (left, right)],
            rhs_dilation=(1, dilation), dimension_numbers=("NHWC", "OIHW", "NHWC"), feature_group_count=groups,
        )[:, 0]
        return y + p["bias"].astype(y.dtype)
    y = jax.lax.conv_general_dilated(
        x_btc, weight, window_strides=(stride,), padding=[(left, right)], rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "OIW", "NWC"), feature_group_count=groups,
    )
    return y + p["bias"].astype(y.dtype)


def conv_transpose_trim(kernel: int, stride: int) -> int:
    """Samples `Qwen3OmniMoeCausalTransConvNet` drops on each side: k - stride."""
    return math.ceil(kernel - stride)


def causal_conv_transpose1d(x_btc: jax.Array, p: dict, *, stride: int) -> jax.Array:
    """Trimmed `ConvTranspose1d` of x (B, T, C_in), weight (C_in, C_out, k) -> (B, (T-1)*s + k - 2(k-s), C_out).

    Computed in polyphase form: output block m (samples m*s .. m*s + s-1) is sum_j x[m-j] @ W_j, with
    W_j the taps j*s .. j*s + s-1, i.e. an ordinary `blocks`-tap convolution with s * C_out output
    channels, whose output reshapes to samples. Only the blocks that survive the trim are computed.
    Why not a matmul per tap block plus an overlap-add (the earlier form, one einsum then padded
    sums): XLA:CPU ran that einsum 1.5-3x below its convolution rate at the decoder's shapes
    (e.g. 71496 x 48 -> 3 x 24: 25 ms vs 8.3 ms) and materialised the padded partial sums; nor a
    convolution over a zero-stuffed input (`lhs_dilation`), which multiplies s x more zeros than data.
    """
    weight = p["weight"].astype(x_btc.dtype)
    c_in, c_out, kernel = weight.shape
    b, t, _ = x_btc.shape
    blocks = -(-kernel // stride)
    full_len = (t - 1) * stride + kernel
    trim = conv_transpose_trim(kernel, stride)
    first, stop = trim // stride, -(-(full_len - trim) // stride)  # output blocks [first, stop) are needed
    if full_len - 2 * trim <= 0:
        return jnp.zeros((b, 0, c_out), x_btc.dtype)
    # Block m reads inputs m - blocks + 1 .. m: left pad so that output index 0 is block `first`.
    left = blocks - 1 - first
    right = (stop - 1) - (t - 1)
    # w_pad[c, o, j*s + u] -> (u*C_out + o, c, blocks-1-j): channel u*C_out + o is sample phase u, and
    # the taps are flipped because the convolution correlates while block m reads x[m - j].
    weight = jnp.pad(weight, ((0, 0), (0, 0), (0, blocks * stride - kernel)))
    w_oik = weight.reshape(c_in, c_out, blocks, stride)[:, :, ::-1].transpose(3, 1, 0, 2)
    w_oik = w_oik.reshape(stride * c_out, c_in, blocks)
    y = jax.lax.conv_general_dilated(
        x_btc, w_oik, window_strides=(1,), padding=[(left, right)], dimension_numbers=("NWC", "OIW", "NWC"),
    )
    y = y.reshape(b, (stop - first) * stride, c_out)
    y = y[:, trim - first * stride : full_len - trim - first * stride]
    return y + p["bias"].astype(y.dtype)


# Cody-Waite split of pi/2: DP1 has 8 significant bits, so j * DP1 is exact for |j| < 2^16 (|y| < 1e5)
# even without FMA contraction.
_TWO_OVER_PI = np.float32(2.0 / np.pi)
_DP1, _DP2, _DP3 = np.float32(1.5703125), np.float32(4.837512969970703125e-4), np.float32(7.549789948768648e-8)


def sin_squared(y: jax.Array) -> jax.Array:
    """sin(y)^2 in fp32 by range reduction to [-pi/4, pi/4] and Cephes' sinf/cosf minimax polynomials.

    Why not `jnp.sin`: XLA:CPU lowers it to a scalar libm call (~20 ns an element, measured), which
    made SnakeBeta the vocoder's largest cost on CPU; this is plain arithmetic that fuses and
    vectorises (~25x faster there, no slower elsewhere). Accuracy: within 1.8e-7 of the exact value
    for |y| up to 1e6 (measured; `jnp.sin` squared: 0.9e-7); the reduction is exact for |y| < 1e5.
    """
    y = y.astype(jnp.float32)
    j = jnp.round(y * _TWO_OVER_PI)
    r = ((y - j * _DP1) - j * _DP2) - j * _DP3
    z = r * r
    s = r + r * z * (np.float32(-1.6666654611e-1) + z * (np.float32(8.3321608736e-3) + z * np.float32(-1.9515295891e-4)))
    c = (np.float32(1.0) - np.float32(0.5) * z
         + z * z * (np.float32(4.166664568298827e-2) + z * (np.float32(-1.388731625493765e-3)
                                                             + z * np.float32(2.443315711809948e-5))))
    # sin(r + j pi/2)^2 is sin(r)^2 for even j and cos(r)^2 for odd j.
    return jnp.where((j.astype(jnp.int32) & 1) == 1, c * c, s * s)


def snake_beta(x_btc: jax.Array, p: dict) -> jax.Array:
    """SnakeBeta over the channel (last) axis: x + sin^2(x e^alpha) / (e^beta + 1e-9).

    The reference computes it in x's dtype; here the sine is taken in fp32 (see `sin_squared`) and
    the result cast back, which equals it in fp32 and is at least as accurate in bf16.
    """
    dtype = x_btc.dtype
    alpha = jnp.exp(p["alpha"].astype(jnp.float32))
    inv_beta = 1.0 / (jnp.exp(p["beta"].astype(jnp.float32)) + 1e-9)
    x32 = x_btc.astype(jnp.float32)
    return (x32 + inv_beta * sin_squared(x32 * alpha)).astype(dtype)


def convnext_block(x_btc: jax.Array, p: dict) -> jax.Array:
    """ConvNeXt block (B, T, D) -> (B, T, D): causal depthwise k7, LayerNorm(1e-6), D->4D GELU 4D->D, gamma, residual."""
    dtype = x_btc.dtype
    dim = x_btc.shape[-1]
    h = causal_conv1d(x_btc, p["dwconv"]["conv"], groups=dim)
    h = layer_norm(h, p["norm"]["weight"], p["norm"]["bias"], 1e-6)
    h = jnp.dot(h, p["pwconv1"]["kernel"].astype(dtype)) + p["pwconv1"]["bias"].astype(dtype)
    h = jax.nn.gelu(h, approximate=False)  # nn.GELU() is the exact erf form
    h = jnp.dot(h, p["pwconv2"]["kernel"].astype(dtype)) + p["pwconv2"]["bias"].astype(dtype)
    return x_btc + p["gamma"].astype(dtype) * h


def residual_unit(x_btc: jax.Array, p: dict, *, dilation: int) -> jax.Array:
    """x + conv_k1(Snake(conv_k7_dilated(Snake(x)))), shape preserved."""
    h = snake_beta(x_btc, p["act1"])
    h = causal_conv1d(h, p["conv1"]["conv"], dilation=dilation)
    h = snake_beta(h, p["act2"])
    h = causal_conv1d(h, p["conv2"]["conv"])
    return h + x_btc
