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
