"""How fast can an encoder on this CPU be, relative to the reference? Bounds from the reference's profile.

    flock /tmp/omni_bench.lock python bench/perception_roofline.py [--threads 2] [--repeats 3]

Runs the PyTorch reference encoders of the perception benchmarks (`vision_cpu.py`: 448x448 image and
8 s video; `audio_long.py`: 30 s and 5 min clips; same random models) under `torch.profiler` and
prints, per input:

  * products: the reference's time in matrix products, convolutions and the fused attention kernel
    (the outermost aten mm / addmm / linear / conv / scaled-dot-product-attention calls), and their
    floating-point operations (the profiler's count for products and convolutions; 4·B·H·Lq·Lk·D for
    attention, from the recorded shapes);
  * the floor: those FLOPs at this machine's peak fp32 matmul rate, measured here as the best of
    torch and XLA on a 2048^3 product (both reach ~165-180 GFLOP/s on the 2-core AVX2 box);
  * `bound = reference time / floor`: the speed-up an implementation would reach doing every product
    at the peak rate and everything else (norms, activations, copies, the host) in zero time.

A ratio above the bound would need products faster than the machine's peak, so a target above it
cannot be met on this CPU in fp32. Where the reference's products run well below the peak (its
convolutions), the gap between "products" and "floor" is what an implementation can win there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Top-level aten ops whose time counts as products (their children are not counted again).
PRODUCT_OPS = (
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
    "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution", "aten::_convolution",
    "aten::mkldnn_convolution", "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
)


def _outermost_products(prof) -> list:
    """The product events not nested in another product event (one thread issues them in order)."""
    events = sorted((e for e in prof.events() if e.name in PRODUCT_OPS),
                    key=lambda e: (e.time_range.start, -e.time_range.end))
    outer, covered_until = [], -1.0
    for e in events:
        if e.time_range.start >= covered_until:
            outer.append(e)
            covered_until = e.time_range.end
    return outer


def _flops(prof) -> float:
    """The profiler counts FLOPs on one level of each product (addmm under linear, conv2d above its
    kernels) and not for attention, which is counted from its shapes."""
    total = 0.0
    for e in prof.events():
        if e.name == "aten::scaled_dot_product_attention":  # q, k, v: (B, H, L, D)
            (b, h, lq, d), (_, _, lk, _) = e.input_shapes[0], e.input_shapes[1]
            total += 4.0 * b * h * lq * lk * d
        elif e.name in PRODUCT_OPS:
            total += float(e.flops or 0)
    return total


def profile(fn, repeats: int):
    """(best wall seconds without the profiler, products seconds, product FLOPs)."""
    import torch

    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                with_flops=True) as prof:
        fn()
    outer = _outermost_products(prof)
    seconds = sum((e.time_range.end - e.time_range.start) * 1e-6 for e in outer)
    return best, seconds, _flops(prof)


def peak_gflops(repeats: int = 5) -> float:
    """Best fp32 rate of torch and XLA on a 2048^3 product, GFLOP/s."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    ta, ja = torch.from_numpy(a), jnp.asarray(a)
    mm = jax.jit(jnp.dot)
    best = float("inf")
    for fn in (lambda: ta @ ta, lambda: mm(ja, ja).block_until_ready()):
        fn()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e9


def vision_cases():
    import torch

    from bench.vision_cpu import bench_vision_config, inputs
    from convert.reference import hf_config, randomize_
    from omni_jax.config import preset
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    cfg = bench_vision_config()
    base = preset("tiny")
    hv = hf_config(base.replace(thinker_config=dataclasses.replace(base.thinker_config, vision_config=cfg))
                   ).thinker_config.vision_config
    hv._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = modeling.Qwen3OmniMoeVisionEncoder(hv).eval().float()
    randomize_(ref, 0)
    for name, pixels, grid in inputs()[:2]:
        tp, tg = torch.tensor(pixels), torch.tensor(grid)

        def run(tp=tp, tg=tg):
            with torch.no_grad():
                return ref(tp, tg)

        yield f"vision: {name}", run


def audio_cases():
    import torch

    from bench.audio_long import _features, small_audio_config
    from convert.reference import hf_config, randomize_
    from omni_jax.config import preset
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    omni = preset("tiny")
    omni = omni.replace(thinker_config=dataclasses.replace(omni.thinker_config, audio_config=small_audio_config()))
    torch.manual_seed(0)
    ref = modeling.Qwen3OmniMoeAudioEncoder(hf_config(omni).thinker_config.audio_config).eval().float()
    randomize_(ref, seed=0)
    for seconds in (30, 300):
        feats = torch.tensor(_features(seconds * 100, seed=1))
        lens = torch.tensor([seconds * 100])

        def run(feats=feats, lens=lens):
            with torch.no_grad():
                return ref(feats, feature_lens=lens)

        yield f"audio: {seconds} s clip", run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    peak = peak_gflops()
    print(f"torch {torch.__version__}, {args.threads} threads; load average {os.getloadavg()}")
    print(f"peak fp32 matmul (best of torch and XLA, 2048^3): {peak:.0f} GFLOP/s")
    print("| reference run | best s | products s | product GFLOP | their rate GFLOP/s | floor s | bound on ours/ref |")
    print("|---|---|---|---|---|---|---|")
    for cases in (vision_cases, audio_cases):
        for name, run in cases():
            best, seconds, flops = profile(run, args.repeats)
            floor = flops / (peak * 1e9)
            print(f"| {name} | {best:.3f} | {seconds:.3f} | {flops / 1e9:.1f} | {flops / seconds / 1e9:.0f} | "
                  f"{floor:.3f} | {best / floor:.2f}x |")
    print(f"load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
