"""The vocoder's convolutions (`omni_jax/nn/conv.py`) against torch's `nn.ConvTranspose1d` / `nn.Conv1d`,
for the shapes the fast paths take: the polyphase transposed convolution (kernel a multiple of the
stride or not, inputs too short to yield a sample), the causal conv in its 2-D (1, T) form (few
channels) and 1-D form, the single-output-channel causal conv (the decoder's last layer), plus `code2wav`'s default decode buckets. fp32; max error <= 1e-5 x max |ref|
(reached: ~1e-7)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax import code2wav as c2w
from omni_jax.nn import conv

TOLERANCE = 1e-5


def _close(got, expected):
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if expected.size:
        scale = max(float(np.abs(expected).max()), 1e-30)
        err = float(np.abs(got - expected).max())
        assert err <= TOLERANCE * scale, f"max error {err:.3g} > {TOLERANCE} x {scale:.3g}"


@functools.lru_cache(maxsize=None)
def _tconv_jit(stride: int):
    return jax.jit(lambda x, p: conv.causal_conv_transpose1d(x, p, stride=stride))


# (kernel, stride): the vocoder's (2r, r) blocks and (r, r) upsamplers, and kernels that are not a
# multiple of the stride (zero-padded taps) or shorter than two strides.
@pytest.mark.parametrize("kernel,stride", [(16, 8), (6, 3), (2, 2), (3, 3), (7, 3), (5, 2), (4, 1), (9, 4)])
def test_causal_conv_transpose1d_matches_torch_trimmed(kernel, stride):
    rng = np.random.default_rng(kernel * 10 + stride)
    c_in, c_out = 6, 5
    w = rng.standard_normal((c_in, c_out, kernel)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    ref = torch.nn.ConvTranspose1d(c_in, c_out, kernel, stride)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
        ref.bias.copy_(torch.tensor(b))
    trim = conv.conv_transpose_trim(kernel, stride)
    for t in (1, 2, 5, 13):
        x = rng.standard_normal((2, t, c_in)).astype(np.float32)
        with torch.no_grad():
            full = ref(torch.tensor(x).permute(0, 2, 1)).permute(0, 2, 1).numpy()
        expected = full[:, trim : full.shape[1] - trim]  # the reference's CausalTransConvNet trim
        got = np.asarray(_tconv_jit(stride)(jnp.asarray(x), {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}))
        _close(got, expected)


@pytest.mark.parametrize("kernel,dilation", [(7, 1), (7, 3), (3, 2), (1, 1)])
def test_single_output_channel_causal_conv_matches_torch(kernel, dilation):
    rng = np.random.default_rng(kernel + dilation)
    x = rng.standard_normal((2, 50, 6)).astype(np.float32)
    w = rng.standard_normal((1, 6, kernel)).astype(np.float32)
    b = rng.standard_normal(1).astype(np.float32)
    ref = torch.nn.Conv1d(6, 1, kernel, dilation=dilation)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
        ref.bias.copy_(torch.tensor(b))
        padded = torch.nn.functional.pad(torch.tensor(x).permute(0, 2, 1), ((kernel - 1) * dilation, 0))
        expected = ref(padded).permute(0, 2, 1).numpy()
    got = np.asarray(conv.causal_conv1d(jnp.asarray(x), {"weight": jnp.asarray(w), "bias": jnp.asarray(b)},
                                        dilation=dilation))
    _close(got, expected)


# Channel counts on both sides of the 2-D-form threshold (conv._CONV2D_MAX_CHANNELS), the vocoder's
# dilations, and a stride.
@pytest.mark.parametrize("c_in,c_out,kernel,dilation,stride", [
    (24, 24, 7, 1, 1), (24, 24, 7, 9, 1), (48, 40, 7, 3, 1), (72, 72, 7, 3, 1), (72, 72, 1, 1, 1), (16, 8, 5, 1, 2),
])
def test_causal_conv1d_matches_torch(c_in, c_out, kernel, dilation, stride):
    rng = np.random.default_rng(c_in + kernel + dilation)
    t = 61
    x = rng.standard_normal((2, t, c_in)).astype(np.float32)
    w = (rng.standard_normal((c_out, c_in, kernel)) / np.sqrt(c_in * kernel)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    ref = torch.nn.Conv1d(c_in, c_out, kernel, stride=stride, dilation=dilation)
    left, right = conv.causal_conv_padding(t, kernel, dilation, stride)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
        ref.bias.copy_(torch.tensor(b))
        padded = torch.nn.functional.pad(torch.tensor(x).permute(0, 2, 1), (left, right))
        expected = ref(padded).permute(0, 2, 1).numpy()
    got = jax.jit(lambda x, p: conv.causal_conv1d(x, p, dilation=dilation, stride=stride))(
        jnp.asarray(x), {"weight": jnp.asarray(w), "bias": jnp.asarray(b)})
    assert got.shape == (2, -(-t // stride), c_out)
    _close(np.asarray(got), expected)


def test_default_decode_buckets():
    assert [c2w._bucket_frames(t, None) for t in (1, 8, 9, 100, 128, 129, 325)] == [8, 8, 16, 104, 128, 144, 336]
    assert c2w._bucket_frames(100, 16) == 112 and c2w._bucket_frames(3, 80) == 80
    # Every length up to 325 frames (the reference's 300-frame chunks + 25 of context) in 29 programs.
    assert len({c2w._bucket_frames(t, None) for t in range(1, 326)}) == 29
