"""Thinker train step on CPU: omni_jax and the PyTorch reference side by side, same model and batch.

    python bench/train_cpu.py [--threads 2] [--steps 5] [--batch 4] [--seq 256]
    python bench/train_cpu.py --mfu [--layers 4] [--batch 8] [--seq 2048]     # accelerator: MFU

Default (CPU): the "small" model of `bench/thinker_cpu.py` (hidden 512, 8 layers, 32 experts top-4,
vocab 8192), fp32, batch 4 x 256 tokens with labels on the second half of every row. One step is
forward + backward + AdamW (+ global-norm clipping) with the thinker's loss: next-token
cross-entropy + 0.001 x the MoE load-balancing loss. omni_jax: the jitted `TrainStep` (donated
state); reference: `Qwen3OmniMoeThinkerForConditionalGeneration(labels=..., output_router_logits=True)`,
`loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()`. omni_jax's MoE runs `--moe-impl` (default on CPU: dense, every expert
on every token: the tiled grouped loop's autodiff re-writes the whole expert stack per tile, ~9x
slower than dense at this size; see the README). Both start from the same weights;
the first step's losses are printed side by side as a check. Timings exclude compilation and a
warm-up step; the mean over `--steps` steps counts. Prints tokens/s for both and the ratio.

`--mfu`: a reduced-depth, full-width Qwen3-Omni thinker (the published 30B-A3B text decoder's widths:
hidden 2048, 32 heads / 4 KV heads, 128 experts top-8, vocab 152064, `--layers` layers), bf16
compute with fp32 master weights, on the default JAX device; prints tokens/s and the MFU estimate
(6 x active parameters x tokens / time / the device's peak bf16 FLOP/s, `omni_jax.training.metrics`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _batch(rng, batch: int, seq: int, vocab: int):
    import numpy as np

    ids = rng.integers(0, vocab - 200, (batch, seq)).astype(np.int32)
    hf_labels = np.full_like(ids, -100)
    hf_labels[:, seq // 2:] = ids[:, seq // 2:]
    labels = np.concatenate([hf_labels[:, 1:], np.full((batch, 1), -100, np.int32)], axis=1)
    return ids, np.ones_like(ids), hf_labels, labels


def _train_config(args, extra=()):
    from omni_jax.training.config import TrainConfig

    return TrainConfig.load(None, [
        f"runtime.dtype={args.dtype}", f"runtime.param_dtype={args.param_dtype}", f"runtime.remat={args.remat}",
        f"runtime.moe_impl={args.moe_impl}",
        "stage=thinker", "optim.lr=1e-4", "optim.weight_decay=0.1", "optim.grad_clip_norm=1.0",
        f"max_steps={args.steps + 2}", *extra,
    ])


def _time_ours(step, state, batch, steps: int):
    import jax

    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    first = float(metrics["loss"])
    state, metrics = step(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    device_batch = step.prepare(batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps, first


def cpu_bench(args) -> int:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import jax

    from bench.thinker_cpu import bench_config
    from convert.hf_to_jax import convert_tensors
    from convert.reference import reference_model, state_dict_tensors
    from omni_jax.model import model_specs
    from omni_jax.nn.params import unflatten
    from omni_jax.training.step import make_train_step

    config = bench_config()
    ref = reference_model(config, attn_implementation="sdpa")
    params = unflatten(convert_tensors(state_dict_tensors(ref), model_specs(config), dtype="float32",
                                       skip_absent_components=True))
    rng = np.random.default_rng(0)
    ids, mask, hf_labels, labels = _batch(rng, args.batch, args.seq, config.text.vocab_size)
    tokens = args.batch * args.seq

    # omni_jax
    step = make_train_step(config, _train_config(args))
    state = step.init_state(jax.device_put(params))
    ours, our_first = _time_ours(step, state, {"input_ids": ids, "attention_mask": mask, "labels": labels}, args.steps)

    # reference
    thinker = ref.thinker.train()
    opt = torch.optim.AdamW(thinker.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  labels=torch.tensor(hf_labels, dtype=torch.long), output_router_logits=True)

    def ref_step():
        opt.zero_grad(set_to_none=True)
        out = thinker(**inputs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(thinker.parameters(), 1.0)
        opt.step()
        return out.loss.item()

    ref_first = ref_step()
    ref_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        ref_step()
    theirs = (time.perf_counter() - t0) / args.steps

    experts = getattr(thinker.config.text_config, "_experts_implementation", None)
    print(f"# bench/train_cpu.py  {datetime.date.today()}  {jax.devices()[0].device_kind}, {args.threads} threads, "
          f"torch {torch.__version__} (experts: {experts}), jax {jax.__version__}")
    print(f"model: hidden {config.text.hidden_size}, {config.text.num_hidden_layers} layers, {config.text.num_experts} "
          f"experts top-{config.text.num_experts_per_tok}, vocab {config.text.vocab_size}; batch {args.batch} x "
          f"{args.seq} tokens, {args.dtype} compute, {args.param_dtype} weights, remat {args.remat}, "
          f"omni_jax moe_impl {args.moe_impl}")
    print(f"first-step loss: omni_jax {our_first:.6f}  reference {ref_first:.6f}")
    print(f"omni_jax : {ours * 1e3:8.1f} ms/step  {tokens / ours:10.0f} tokens/s")
    print(f"reference: {theirs * 1e3:8.1f} ms/step  {tokens / theirs:10.0f} tokens/s")
    print(f"ratio (omni_jax / reference tokens/s): {theirs / ours:.2f}x")
    return 0


def mfu_bench(args) -> int:
    import jax
    import numpy as np

    from omni_jax.config import preset
    from omni_jax.training import metrics as metrics_lib
    from omni_jax.training.step import init_params_for_training, make_train_step

    base = preset("qwen3-omni-30b-a3b-thinking")
    text = dataclasses.replace(base.thinker_config.text_config, num_hidden_layers=args.layers)
    vision = dataclasses.replace(base.thinker_config.vision_config, depth=1, deepstack_visual_indexes=(0,))
    audio = dataclasses.replace(base.thinker_config.audio_config, encoder_layers=1)
    config = base.replace(thinker_config=dataclasses.replace(base.thinker_config, text_config=text,
                                                             vision_config=vision, audio_config=audio))
    cfg = _train_config(args, ["freeze_patterns=[^thinker/(audio_tower|visual)/]"])
    step = make_train_step(config, cfg)
    params = init_params_for_training(config, cfg.runtime, step.mesh)
    state = step.init_state(params)
    del params
    rng = np.random.default_rng(0)
    ids, mask, _, labels = _batch(rng, args.batch, args.seq, config.text.vocab_size)
    seconds, first = _time_ours(step, state, {"input_ids": ids, "attention_mask": mask, "labels": labels}, args.steps)
    tokens = args.batch * args.seq
    peak = args.peak_flops or metrics_lib.peak_flops_per_device()
    flops = metrics_lib.train_flops_per_token(config)
    util = metrics_lib.mfu(flops, tokens, seconds, len(jax.devices()), peak)
    print(f"# bench/train_cpu.py --mfu  {datetime.date.today()}  {jax.devices()[0].device_kind} x {len(jax.devices())}, "
          f"jax {jax.__version__}")
    print(f"model: 30B-A3B thinker widths, {args.layers} layers ({metrics_lib.active_params(config) / 1e9:.2f}B active "
          f"params/token); batch {args.batch} x {args.seq}; {args.dtype} compute, {args.param_dtype} weights, "
          f"remat {args.remat}; first loss {first:.4f}")
    print(f"{seconds * 1e3:.1f} ms/step, {tokens / seconds:,.0f} tokens/s, "
          f"MFU {'n/a (unknown peak)' if util is None else f'{100 * util:.1f}%'} (peak {peak})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--mfu", action="store_true", help="reduced-depth full-width thinker on the accelerator")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--remat", default=None, choices=["none", "full", "dots"])
    parser.add_argument("--moe-impl", default=None, choices=["grouped", "dense"],
                        help="omni_jax MoE path (default: dense on CPU, whose tiled grouped loop has no efficient "
                             "backward yet: ~9x slower than dense here; grouped elsewhere)")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s per device (default: by kind)")
    args = parser.parse_args()
    import jax

    if args.moe_impl is None:
        args.moe_impl = "dense" if jax.default_backend() == "cpu" else "grouped"
    if args.mfu:
        args.batch, args.seq = args.batch or 8, args.seq or 2048
        args.dtype, args.remat = args.dtype or "bfloat16", args.remat or "dots"
        return mfu_bench(args)
    args.batch, args.seq = args.batch or 4, args.seq or 256
    args.dtype, args.remat = args.dtype or "float32", args.remat or "none"
    return cpu_bench(args)


if __name__ == "__main__":
    sys.exit(main())
