"""Compile time of the full-size thinker (Qwen3-Omni-30B-A3B text decoder), on abstract shapes.

    python bench/compile_thinker.py [--seq 2048] [--batch 1] [--unrolled]

Lowers and compiles the forward (prefill with a KV cache, and one decode step) with
`jax.ShapeDtypeStruct` parameters in bf16: no weights are allocated, so this runs on any machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--unrolled", action="store_true", help="Python loop over layers instead of lax.scan")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from omni_jax import thinker
    from omni_jax.config import Runtime, preset
    from omni_jax.model import model_specs
    from omni_jax.nn import decoder
    from omni_jax.nn.params import abstract_params, param_count

    config = preset("qwen3-omni-30b-a3b-instruct")
    rt = Runtime(dtype="bfloat16", param_dtype="bfloat16", scan_layers=not args.unrolled)
    specs = model_specs(config)["thinker"]
    params = abstract_params(specs, jnp.bfloat16)
    dims = thinker.text_dims(config.thinker_config)
    b, s = args.batch, args.seq
    max_len = s + 128

    def prefill(params, ids, mask, pos):
        cache = decoder.init_cache(dims, b, max_len, jnp.bfloat16)
        x = thinker.embed_tokens(params, ids, jnp.bfloat16)
        out = decoder.prefill(params["model"], x, pos, mask, dims, rt, cache=cache)
        return thinker.lm_logits(params, out.hidden[:, -1:]), out.cache

    def step(params, token, pos, cache, index, valid):
        x = thinker.embed_tokens(params, token, jnp.bfloat16)
        out = decoder.decode(params["model"], x, pos, cache, index, valid, dims, rt)
        return thinker.lm_logits(params, out.hidden), out.cache

    i32, f32 = jnp.int32, jnp.float32
    sds = jax.ShapeDtypeStruct
    cache = jax.eval_shape(lambda: decoder.init_cache(dims, b, max_len, jnp.bfloat16))
    print(f"thinker: {config.text.num_hidden_layers} layers, {param_count(specs) / 1e9:.2f} B parameters (text + "
          f"embeddings + lm_head), {'unrolled' if args.unrolled else 'scanned'}, batch {b} x seq {s}, jax "
          f"{jax.__version__} on {jax.devices()[0].platform}")
    for name, fn, shapes in [
        ("prefill", prefill, (params, sds((b, s), i32), sds((b, s), i32), sds((3, b, s), f32))),
        ("decode step", step, (params, sds((b, 1), i32), sds((3, b, 1), f32), cache, sds((), i32),
                               sds((b, max_len), jnp.bool_))),
    ]:
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(*shapes)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        print(f"{name:12s} lower {t1 - t0:6.1f}s  compile {t2 - t1:6.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
