"""CPU kernels for omni_jax: compiled loops that XLA:CPU cannot express fast, called as XLA FFI targets.

    import cpu_kernels
    y = cpu_kernels.expert_swiglu(x, gate_w, up_w, down_w, group_sizes, layer=None)
    #   x (rows, d) sorted by group; gate_w, up_w ([layers,] groups, d, f); down_w ([layers,] groups, f, d_out);
    #   group_sizes (groups,) int32 -> (rows, d_out); float32 only; decode-sized rows streamed, prefill-sized
    #   rows in register tiles where cpu_kernels.expert_swiglu_tiles_fit(gate_w, down_w) (faster than
    #   XLA:CPU's products with AVX-512 or AVX2 + FMA: cpu_kernels.expert_swiglu_prefill_faster)
    y = cpu_kernels.rows_matmul(x, w)
    #   x (rows, k) @ w (k, n) -> (rows, n); float32 only (the decode-time language-model head)
    x, k_new, v_new = cpu_kernels.decode_attention(x, cos, sin, key_valid, cache_index, layer, weights,
                                                   k_cache, v_cache, eps)
    #   x (B, D) -> x + Attn(RMSNorm(x)) for one new token per row, weights and KV cache (L, B, S, Hkv, hd)
    #   read in place at `layer`; float32 only, forward only (the decode-time attention block)

The kernels are written with numba (a librosa dependency already) and registered with XLA through
the typed FFI (`jax.ffi`), so they run inside jitted programs like any other op. Most exist for
decode-sized work, where XLA:CPU's cost is not arithmetic but memory traffic it adds around small
products (see `expert_swiglu`); the experts' prefill products run in register tiles written in
LLVM IR (`_tiles`), faster than XLA:CPU's for an expert's rows. Each has a pure-JAX equivalent in `omni_jax.nn` that is its test
oracle (and, for the two products, its backward pass; decoding is not differentiated).
"""

from cpu_kernels.decode_attention import decode_attention
from cpu_kernels.expert_swiglu import (expert_swiglu, expert_swiglu_prefill_faster, expert_swiglu_supported,
                                      expert_swiglu_tiles_fit)
from cpu_kernels.rows_matmul import rows_matmul

__all__ = ["decode_attention", "expert_swiglu", "expert_swiglu_prefill_faster", "expert_swiglu_supported",
           "expert_swiglu_tiles_fit", "rows_matmul"]
