"""Vision encoder on CPU: the PyTorch reference and omni_jax side by side, same random weights.

    python bench/vision_cpu.py [--threads N] [--repeats 5] [--attn sdpa|eager]

Model: a small random vision encoder (hidden 256, 8 blocks, 4 heads of 64, MLP 1024, DeepStack
after blocks 1, 3, 5, output 512, the real 48 x 48 position grid and 16-pixel patches), fp32.
Inputs, made by omni_jax's processors: a 448 x 448 image (grid 1 x 28 x 28, 196 tokens) and an 8 s
video sampled at 2 fps (16 frames of 640 x 360 -> grid 8 x 22 x 40, 1760 tokens), each alone and
both in one batch. omni_jax's time includes the host-side plan and packing, not compilation; both
sides get a warm-up run, then they alternate and the best of `--repeats` runs counts. Outputs are
checked against each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_vision_config():
    from omni_jax.config import preset

    return dataclasses.replace(
        preset("tiny").thinker_config.vision_config, depth=8, hidden_size=256, num_heads=4, intermediate_size=1024,
        out_hidden_size=512, num_position_embeddings=2304, deepstack_visual_indexes=(1, 3, 5),
    )


def inputs():
    """(name, pixel_values, grid_thw) for the image, the video, and both together."""
    import numpy as np

    from omni_jax.processing.image import process_images
    from omni_jax.processing.video import process_videos

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, (16, 360, 640, 3), dtype=np.uint8)  # 8 s at 2 fps
    img = process_images([image])
    vid = process_videos([(frames, 2.0)])
    both_pixels = np.concatenate([img["pixel_values"], vid["pixel_values_videos"]])
    both_grid = np.concatenate([img["image_grid_thw"], vid["video_grid_thw"]])
    return [
        ("image 448x448", img["pixel_values"], img["image_grid_thw"]),
        ("video 8 s @ 2 fps", vid["pixel_values_videos"], vid["video_grid_thw"]),
        ("image + video batch", both_pixels, both_grid),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="reference attention backend")
    args = parser.parse_args()

    if args.threads == 1:  # before jax is imported: XLA's CPU thread pool is sized at start-up
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import jax

    from convert.hf_to_jax import convert_tensors
    from convert.reference import hf_config, randomize_, state_dict_tensors
    from omni_jax import vision_encoder as ve
    from omni_jax.config import Runtime, preset
    from omni_jax.nn.params import unflatten
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    cfg = bench_vision_config()
    base = preset("tiny")
    hv = hf_config(base.replace(thinker_config=dataclasses.replace(base.thinker_config, vision_config=cfg))
                   ).thinker_config.vision_config
    hv._attn_implementation = args.attn
    torch.manual_seed(0)
    ref = modeling.Qwen3OmniMoeVisionEncoder(hv).eval().float()
    randomize_(ref, 0)
    tensors = (("thinker.visual." + key, load, shape) for key, load, shape in state_dict_tensors(ref))
    flat = convert_tensors(tensors, {"thinker": {"visual": ve.vision_encoder_specs(cfg)}}, dtype="float32")
    params = jax.device_put(unflatten(flat)["thinker"]["visual"])
    rt = Runtime(dtype="float32", param_dtype="float32")

    def interleaved(fn_ref, fn_ours):
        """Best of `repeats` runs each, reference and omni_jax alternating, after one warm-up each
        (the machine is shared: alternating exposes both to the same load)."""
        fn_ref(), fn_ours()
        t_ref, t_ours = [], []
        for _ in range(args.repeats):
            for fn, times in ((fn_ref, t_ref), (fn_ours, t_ours)):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return min(t_ref), min(t_ours)

    print(f"vision encoder CPU benchmark: hidden {cfg.hidden_size}, {cfg.depth} blocks, {cfg.num_heads} heads, "
          f"MLP {cfg.intermediate_size}, fp32, {args.threads} threads, reference attention {args.attn}, "
          f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"{'input':24s}{'grid_thw':>22s}{'patches':>9s}{'reference s':>13s}{'omni_jax s':>12s}{'ratio':>8s}"
          f"{'max rel diff':>14s}")
    for name, pixels, grid in inputs():
        tp, tg = torch.tensor(pixels), torch.tensor(grid)

        def run_ref():
            with torch.no_grad():
                return ref(tp, tg)

        def run_ours():
            merged, deepstack = ve.encode(params, pixels, grid, cfg, rt)
            return jax.block_until_ready((merged, deepstack))

        t_ref, t_ours = interleaved(run_ref, run_ours)
        expected = run_ref().pooler_output.numpy()
        got = np.asarray(run_ours()[0])
        diff = np.abs(got - expected).max() / np.abs(expected).max()
        grid_text = " ".join("x".join(str(v) for v in row) for row in grid.tolist())
        print(f"{name:24s}{grid_text:>22s}{len(pixels):9d}{t_ref:13.3f}{t_ours:12.3f}{t_ref / t_ours:7.2f}x"
              f"{diff:14.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
