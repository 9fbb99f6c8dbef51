"""Pallas kernels for omni_jax: windowed flash attention and grouped (expert) matmul.

    import pallas_kernels
    out = pallas_kernels.grouped_matmul(lhs, rhs, group_sizes, *, interpret=False)
    #   lhs (rows, k) sorted by group; rhs (groups, k, n); group_sizes (groups,) int32 summing to
    #   <= rows (rows past the sum are padding and give 0) -> (rows, n)
    out = pallas_kernels.windowed_attention(q, k, v, *, segment_ids=None, causal=False,
                                            window=None, scale=None, interpret=False)
    #   q (batch, seq, q_heads, head_dim); k, v (batch, seq, kv_heads, head_dim), GQA;
    #   segment_ids (batch, seq) int32; window (left, right) -> (batch, seq, q_heads, head_dim)

Each entry point has a pure-JAX reference with the same signature (minus `interpret`),
`grouped_matmul_reference` and `windowed_attention_reference`, and two kernel variants:
Triton (`gpu.py`) and Mosaic (`tpu.py`). Which runs is chosen by `jax.default_backend()`
(tpu -> Mosaic, gpu -> Triton, cpu -> reference, or Triton interpreted when interpret=True),
or forced with `implementation='gpu' | 'tpu' | 'reference'`. Both are differentiable
(custom VJPs whose backward passes are kernels too).
"""

from pallas_kernels.grouped_matmul import (
    GroupedMatmulTiling,
    default_tiling,
    grouped_matmul,
    grouped_matmul_reference,
)
from pallas_kernels.windowed_attention import (
    AttentionBlockSizes,
    attention_mask,
    default_block_sizes,
    windowed_attention,
    windowed_attention_reference,
)

__all__ = [
    "AttentionBlockSizes",
    "GroupedMatmulTiling",
    "attention_mask",
    "default_block_sizes",
    "default_tiling",
    "grouped_matmul",
    "grouped_matmul_reference",
    "windowed_attention",
    "windowed_attention_reference",
]
