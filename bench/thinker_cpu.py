"""Thinker text generation on CPU: the PyTorch reference and omni_jax side by side, same random model.

    python bench/thinker_cpu.py [--threads 2] [--repeats 3] [--dtype float32]

Model: hidden 512, 8 layers, 8 heads / 2 KV heads, head_dim 32, 32 experts top-4 (expert size 256),
vocab 8192. Work: batch 4 x 256 prompt tokens, then 64 new tokens (greedy, no early stop).
Prints prefill and decode tokens/s for both and the ratios (targets: prefill >= 1.5x, decode >= 5x).
Timings exclude compilation (omni_jax) and a warm-up run (both); the best of `--repeats` runs counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_config():
    from omni_jax.config import preset

    base = preset("tiny").replace(talker_config=None, code2wav_config=None, enable_audio_output=False)
    text = dataclasses.replace(
        base.thinker_config.text_config, vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, mrope_section=(8, 4, 4), num_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=256,
    )
    thinker = dataclasses.replace(
        base.thinker_config, text_config=text, audio_token_id=8100, image_token_id=8101, video_token_id=8102,
        audio_start_token_id=8103, audio_end_token_id=8104, vision_start_token_id=8105, vision_end_token_id=8106,
    )
    return base.replace(thinker_config=thinker)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import jax

    import omni_jax
    from convert.hf_to_jax import convert_tensors
    from convert.reference import reference_model, state_dict_tensors
    from omni_jax.model import model_specs
    from omni_jax.nn.params import unflatten

    config = bench_config()
    ref = reference_model(config, attn_implementation="sdpa")
    params = unflatten(convert_tensors(state_dict_tensors(ref), model_specs(config), dtype=args.dtype,
                                       skip_unimplemented=True))
    model = omni_jax.OmniModel(config, jax.device_put(params), omni_jax.Runtime(dtype=args.dtype, param_dtype=args.dtype))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8000, (args.batch, args.prompt))
    mask = np.ones_like(ids)
    never = config.text.vocab_size - 1  # an EOS id that is masked out below, so all rows run to the end
    tokens_in, tokens_out = args.batch * args.prompt, args.batch * args.new

    def best(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    # Prefill = time to the first new token (generate with max_new_tokens=1); decode = the remaining
    # new - 1 steps of a full generate. Both sides compute only last-position logits in generate.
    tids, tmask = torch.tensor(ids), torch.tensor(mask)

    def ref_generate(new):
        with torch.no_grad():
            return ref.thinker.generate(input_ids=tids, attention_mask=tmask, max_new_tokens=new, min_new_tokens=new,
                                        do_sample=False, eos_token_id=never, pad_token_id=0)

    def ours_generate(new):
        return model.generate(ids, mask, max_new_tokens=new, eos_token_id=never, pad_token_id=0)

    ref_prefill = best(lambda: ref_generate(1))
    ref_total = best(lambda: ref_generate(args.new))
    ours_prefill = best(lambda: ours_generate(1))
    ours_total = best(lambda: ours_generate(args.new))
    assert ours_generate(args.new).sequences.shape[1] == args.prompt + args.new

    def decode_rate(total, prefill):
        return args.batch * (args.new - 1) / max(total - prefill, 1e-9)

    rows = [
        ("prefill tok/s", tokens_in / ref_prefill, tokens_in / ours_prefill),
        ("decode tok/s", decode_rate(ref_total, ref_prefill), decode_rate(ours_total, ours_prefill)),
        ("end-to-end tok/s (new tokens)", tokens_out / ref_total, tokens_out / ours_total),
    ]
    print(f"thinker CPU benchmark: batch {args.batch} x {args.prompt} prompt + {args.new} new, {args.dtype}, "
          f"{args.threads} threads, jax {jax.__version__}, torch {torch.__version__}")
    print(f"{'':32s}{'reference':>12s}{'omni_jax':>12s}{'ratio':>9s}")
    for name, r, o in rows:
        print(f"{name:32s}{r:12.1f}{o:12.1f}{o / r:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
