"""CPU floors for the thinker benchmark (`thinker_cpu.py`): matmul rate and streaming read bandwidth.

    flock /tmp/omni_bench.lock python bench/roofline_cpu.py [--threads 2]

Measures, with `--threads` threads (torch `set_num_threads`; XLA:CPU uses its own pool, one thread per
core, so run it on a machine with that many cores):
  * fp32 matmul GFLOP/s at the shapes the benchmark model runs (an expert's gate/up (rows x 512 x 256)
    and down (rows x 256 x 512), the attention projections, the lm_head at decode (4 x 512 x 8192)),
    torch (MKL/oneDNN) and XLA. XLA is timed two ways: one jitted call per product (includes the
    dispatch) and a `lax.scan` over 32 distinct weight matrices picked by a dynamic index (how the
    MoE reads experts), per product.
  * streaming read bandwidth: a sum over a 256 MB fp32 array (numpy, torch, XLA) and fp32 matvecs of
    4 rows against a 128 MB matrix (torch, XLA), plus the scan form of 13 expert matvec triples x 8
    layers out of a 400 MB expert stack (the decode step's expert reads).
Then prints the benchmark model's prefill FLOPs and decode bytes per step and the floors they imply.
Figures are machine- and load-dependent; see bench/RESULTS.md for the ones recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Benchmark model (thinker_cpu.bench_config) and work.
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 512, 8, 8, 2, 32
EXPERTS, TOP_K, EXPERT_F, VOCAB = 32, 4, 256, 8192
BATCH, PROMPT, NEW = 4, 256, 64


def best_time(fn, repeats: int = 20, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 4]  # lower quartile: robust to a busy neighbour, not the lucky best


def model_counts() -> dict:
    """Prefill FLOPs and decode bytes per step of the benchmark model (fp32)."""
    d, f, q_out, kv_out = HIDDEN, EXPERT_F, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    tokens = BATCH * PROMPT
    attn_proj = 2 * d * (q_out + 2 * kv_out) + 2 * q_out * d  # q, k, v, o
    router = 2 * d * EXPERTS
    experts = TOP_K * 3 * 2 * d * f
    # Scores and probs x V over all 256 keys (the reference's SDPA and our masked attention both
    # compute the full square and mask it).
    scores_full = 2 * 2 * HEADS * HEAD_DIM * PROMPT
    per_token_layer = attn_proj + router + experts + scores_full
    prefill = {
        "attn_proj": tokens * LAYERS * attn_proj,
        "router": tokens * LAYERS * router,
        "experts": tokens * LAYERS * experts,
        "attention (full square)": tokens * LAYERS * scores_full,
        "lm_head (last position only)": BATCH * 2 * d * VOCAB,
    }
    prefill_total = sum(prefill.values())
    # Decode: B tokens each pick TOP_K distinct experts of EXPERTS; with independent routing the
    # expected number of distinct experts per layer is E * (1 - (1 - k/E)^B).
    distinct = EXPERTS * (1 - (1 - TOP_K / EXPERTS) ** BATCH)
    expert_bytes = 3 * d * f * 4
    max_len = PROMPT + NEW
    decode = {
        "routed experts": LAYERS * distinct * expert_bytes,
        "attention weights": LAYERS * 4 * (d * (q_out + 2 * kv_out) + q_out * d),
        "router + norms": LAYERS * 4 * (d * EXPERTS + 2 * d + 2 * HEAD_DIM),
        "KV cache (all slots)": LAYERS * 2 * BATCH * max_len * kv_out * 4,
        "lm_head": 4 * d * VOCAB,
    }
    return {"prefill": prefill, "prefill_total": prefill_total, "per_token_layer": per_token_layer,
            "distinct": distinct, "decode": decode, "decode_total": sum(decode.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import jax
    import jax.numpy as jnp

    print(f"threads {args.threads}, cores {os.cpu_count()}, jax {jax.__version__}, torch {torch.__version__}")
    rng = np.random.default_rng(0)

    # ---------------------------------------------------------------- matmul rate
    print("\nfp32 matmul GFLOP/s            torch   xla-call  xla-scan(dyn W)")
    shapes = [
        ("expert gate/up 128x512x256", 128, 512, 256),
        ("expert gate/up 256x512x256", 256, 512, 256),
        ("expert gate/up 512x512x256", 512, 512, 256),
        ("expert down 128x256x512", 128, 256, 512),
        ("q_proj 1024x512x256", 1024, 512, 256),
        ("k/v_proj 1024x512x64", 1024, 512, 64),
        ("o_proj 1024x256x512", 1024, 256, 512),
        ("lm_head 4x512x8192", 4, 512, 8192),
        ("square 1024x1024x1024", 1024, 1024, 1024),
    ]
    rates = {}
    for name, m, k, n in shapes:
        flops = 2 * m * k * n
        x = rng.standard_normal((m, k), np.float32)
        stack = 32 if k * n * 4 * 32 <= 64 << 20 else 4
        w = rng.standard_normal((stack, k, n), np.float32)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w[0])
        t_torch = best_time(lambda: torch.mm(tx, tw))
        jx, jw = jnp.asarray(x), jnp.asarray(w)
        one = jax.jit(lambda a, b: a @ b)
        w0 = jw[0]
        t_call = best_time(lambda: one(jx, w0).block_until_ready())

        def scan_fn(a, ws):
            def body(c, i):
                wi = jax.lax.dynamic_index_in_dim(ws, i, 0, keepdims=False)
                return c, a @ wi
            return jax.lax.scan(body, 0, jnp.arange(ws.shape[0]))[1]

        sc = jax.jit(scan_fn)
        t_scan = best_time(lambda: sc(jx, jw).block_until_ready(), repeats=10) / stack
        rates[name] = (flops / t_torch / 1e9, flops / t_call / 1e9, flops / t_scan / 1e9)
        print(f"{name:30s}{rates[name][0]:8.1f}{rates[name][1]:10.1f}{rates[name][2]:12.1f}")

    # ---------------------------------------------------------------- bandwidth
    print("\nstreaming read GB/s (fp32)")
    big = rng.standard_normal((64 << 20,), np.float32)  # 256 MB
    tb, jb = torch.from_numpy(big), jnp.asarray(big)
    jsum = jax.jit(jnp.sum)
    bw = {
        "numpy sum 256 MB": big.nbytes / best_time(lambda: big.sum(), repeats=10),
        "torch sum 256 MB": big.nbytes / best_time(lambda: tb.sum(), repeats=10),
        "xla sum 256 MB": big.nbytes / best_time(lambda: jsum(jb).block_until_ready(), repeats=10),
    }
    wmv = rng.standard_normal((HIDDEN, 64 << 10), np.float32)  # 128 MB, (in, out) as our kernels
    x4 = rng.standard_normal((BATCH, HIDDEN), np.float32)
    twmv_t = torch.from_numpy(np.ascontiguousarray(wmv.T))  # (out, in) as torch Linear weights
    tx4 = torch.from_numpy(x4)
    jwmv, jx4 = jnp.asarray(wmv), jnp.asarray(x4)
    mv = jax.jit(lambda a, b: a @ b)
    bw["torch 4x512 @ (512x65536)^T linear"] = wmv.nbytes / best_time(
        lambda: torch.nn.functional.linear(tx4, twmv_t), repeats=10)
    bw["xla 4x512 @ 512x65536"] = wmv.nbytes / best_time(lambda: mv(jx4, jwmv).block_until_ready(), repeats=10)
    del big, tb, jb, wmv, twmv_t, jwmv

    # The decode step's expert reads: per layer 13 experts x (gate, up, down), a 4-row product each,
    # out of the whole (L, E, D, F) stack, indexed [layer, expert] inside a scan over layers.
    distinct = 13
    gate = jnp.asarray(rng.standard_normal((LAYERS, EXPERTS, HIDDEN, EXPERT_F), np.float32) * 0.02)
    up = jnp.asarray(rng.standard_normal((LAYERS, EXPERTS, HIDDEN, EXPERT_F), np.float32) * 0.02)
    down = jnp.asarray(rng.standard_normal((LAYERS, EXPERTS, EXPERT_F, HIDDEN), np.float32) * 0.02)
    chosen = jnp.asarray(np.stack([rng.choice(EXPERTS, distinct, replace=False) for _ in range(LAYERS)]))

    def experts_step(x, gate, up, down, chosen):
        def layer(x, inputs):
            layer_i, ids = inputs

            def expert(acc, e):
                def mat(w):
                    k, n = w.shape[-2:]
                    return jax.lax.dynamic_slice(w, (layer_i, e, 0, 0), (1, 1, k, n))[0, 0]
                h = jax.nn.silu(x @ mat(gate)) * (x @ mat(up))
                return acc + h @ mat(down), None

            y, _ = jax.lax.scan(expert, jnp.zeros_like(x), ids)
            return x + 1e-3 * y, None

        return jax.lax.scan(layer, x, (jnp.arange(LAYERS), chosen))[0]

    es = jax.jit(experts_step)
    expert_bytes = LAYERS * distinct * 3 * HIDDEN * EXPERT_F * 4
    t_es = best_time(lambda: es(jx4, gate, up, down, chosen).block_until_ready(), repeats=20)
    bw[f"xla expert scan ({LAYERS}x{distinct} SwiGLU, 4 rows)"] = expert_bytes / t_es
    tg, tu, td = (torch.from_numpy(np.array(w)).transpose(-1, -2).contiguous() for w in (gate, up, down))
    tchosen = np.asarray(chosen)

    def torch_experts():
        x = tx4
        for li in range(LAYERS):
            y = torch.zeros_like(x)
            for e in tchosen[li]:
                h = torch.nn.functional.silu(torch.nn.functional.linear(x, tg[li, e])) * torch.nn.functional.linear(
                    x, tu[li, e])
                y += torch.nn.functional.linear(h, td[li, e])
            x = x + 1e-3 * y
        return x

    with torch.no_grad():
        t_torch_experts = best_time(torch_experts, repeats=20)
    bw[f"torch expert loop ({LAYERS}x{distinct} SwiGLU, 4 rows)"] = expert_bytes / t_torch_experts
    for name, value in bw.items():
        print(f"  {name:48s}{value / 1e9:7.1f}")

    # ---------------------------------------------------------------- floors
    c = model_counts()
    print(f"\nprefill FLOPs ({BATCH}x{PROMPT} tokens): {c['prefill_total'] / 1e9:.2f} G")
    for name, value in c["prefill"].items():
        print(f"  {name:32s}{value / 1e9:7.2f} G")
    print(f"decode bytes per step: {c['decode_total'] / 1e6:.1f} MB "
          f"({c['distinct']:.2f} distinct experts per layer expected)")
    for name, value in c["decode"].items():
        print(f"  {name:32s}{value / 1e6:7.1f} MB")
    best_rate = max(r[0] for r in rates.values()) * 1e9
    best_xla = max(max(r[1], r[2]) for r in rates.values()) * 1e9
    best_bw = max(bw.values())
    print(f"\nprefill at the best measured matmul rate (torch {best_rate / 1e9:.0f}, "
          f"xla {best_xla / 1e9:.0f} GFLOP/s): {c['prefill_total'] / best_rate * 1e3:.0f} ms torch-rate, "
          f"{c['prefill_total'] / best_xla * 1e3:.0f} ms xla-rate")
    print(f"decode step at the best measured read bandwidth ({best_bw / 1e9:.1f} GB/s): "
          f"{c['decode_total'] / best_bw * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
