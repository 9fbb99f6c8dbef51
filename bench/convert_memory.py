"""Peak host memory of `convert.hf_to_jax` on a randomly initialised checkpoint of >= 1 GB.

    python bench/convert_memory.py [--layers 5] [--workdir /tmp/omni_convert_bench]

Writes a random hub-layout bf16 checkpoint (one tensor per expert), then runs the converter command
in a fresh process and reports its peak resident memory against the model's size. The converter's
safetensors reads are memory-mapped: the file pages it touches count in the resident size while it
runs, so the figure is an upper bound on anonymous memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/omni_convert_bench")
    args = parser.parse_args()

    import numpy as np
    import ml_dtypes

    from convert.jax_to_hf import export_params
    from omni_jax.config import preset
    from omni_jax.model import model_specs
    from omni_jax.nn.params import flatten, unflatten

    base = preset("tiny").replace(talker_config=None, code2wav_config=None, enable_audio_output=False)
    text = dataclasses.replace(base.text, vocab_size=32768, hidden_size=1024, num_hidden_layers=args.layers,
                               num_attention_heads=16, num_key_value_heads=4, head_dim=64, mrope_section=(16, 8, 8),
                               num_experts=64, num_experts_per_tok=4, moe_intermediate_size=512)
    config = base.replace(thinker_config=dataclasses.replace(base.thinker_config, text_config=text))
    specs = model_specs(config)
    rng = np.random.default_rng(0)
    params = unflatten({p: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(ml_dtypes.bfloat16)
                        for p, s in flatten(specs).items()})
    model_bytes = sum(v.nbytes for v in flatten(params).values())
    src, dst = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "jax")
    shutil.rmtree(args.workdir, ignore_errors=True)
    export_params(params, specs, src, shard_bytes=256 << 20)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f)
    del params
    proc = subprocess.run(
        [sys.executable, "-m", "convert.hf_to_jax", "--src", src, "--dst", dst],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if proc.returncode:
        print(proc.stderr[-3000:])
        return 1
    import resource

    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"model: {model_bytes / 2**30:.2f} GiB of bf16 parameters in {len(os.listdir(src)) - 2} shards")
    print(f"converter peak resident memory: {peak_kb / 2**20:.2f} GiB = {peak_kb * 1024 / model_bytes:.2f} x the model")
    print([line for line in proc.stderr.splitlines() if line.startswith("converted")][0])
    if not os.environ.get("KEEP"):
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
