"""Inline loops the kernels share. Each is inlined into its caller (numba `inline="always"`), so it is
compiled with the caller's flags (`rows_matmul` strict IEEE, `decode_attention` reassociating)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def rows_block(x, w, first, last, out, column=0):
    """out (R, N) = x[:, first:last] @ w[first:last, column:column + N] (a block of the rows of w (K, M),
    columns from `column`: indexing the whole C-ordered w keeps the inner loop contiguous), each row of w
    streamed once, in order (the prefetchers follow), four per pass over out: the pass's loads and
    stores of out (from L2 for a wide w) then serve four weight rows, not one."""
    rows = x.shape[0]
    width = out.shape[1]
    for t in range(rows):
        acc = out[t]
        for n in range(width):
            acc[n] = 0.0
    k = first
    while k + 4 <= last:
        w0, w1 = w[k, column:column + width], w[k + 1, column:column + width]
        w2, w3 = w[k + 2, column:column + width], w[k + 3, column:column + width]
        for t in range(rows):
            acc = out[t]
            x0, x1, x2, x3 = x[t, k], x[t, k + 1], x[t, k + 2], x[t, k + 3]
            for n in range(width):
                acc[n] += x0 * w0[n] + x1 * w1[n] + x2 * w2[n] + x3 * w3[n]
        k += 4
    while k < last:
        w0 = w[k, column:column + width]
        for t in range(rows):
            acc = out[t]
            x0 = x[t, k]
            for n in range(width):
                acc[n] += x0 * w0[n]
        k += 1


@njit(cache=True, inline="always")
def sum_parts(parts, out):
    """out (R, N) = the sum over p of parts (P, R, N), in order of p."""
    for t in range(out.shape[0]):
        acc = out[t]
        first = parts[0, t]
        for n in range(out.shape[1]):
            acc[n] = first[n]
        for p in range(1, parts.shape[0]):
            other = parts[p, t]
            for n in range(out.shape[1]):
                acc[n] += other[n]


@njit(cache=True, inline="always")
def rms_norm_into(src, weight, eps, dst):
    """dst = weight * (src / sqrt(mean(src^2) + eps)), 1-D; dst may be src."""
    size = src.shape[0]
    total = np.float32(0.0)
    for i in range(size):
        total += src[i] * src[i]
    inv = np.float32(1.0) / np.sqrt(total / np.float32(size) + eps)
    for i in range(size):
        dst[i] = weight[i] * (src[i] * inv)


@njit(cache=True, inline="always")
def exp_nonpositive(row, count, bits):
    """row[:count] = exp(row[:count]) for row <= 0, as a loop LLVM vectorises (numba's np.exp is a
    scalar libm call per element). Cephes' expf: within 1 ulp of the float64 exp for x > -87;
    below (and -inf) it gives ~1.6e-38 (the caller zeroes masked slots). bits: int32 scratch."""
    scale = bits.view(np.float32)
    for s in range(count):
        x = max(row[s], np.float32(-87.0))
        k = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))  # x = k ln2 + r, |r| <= ln2/2
        r = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        p = p * r * r + r + np.float32(1.0)
        bits[s] = (np.int32(k) + np.int32(127)) << 23  # 2^k
        row[s] = p * scale[s]
