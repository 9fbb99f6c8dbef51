"""omni_jax checkpoint -> Hugging Face hub layout (config.json + sharded *.safetensors).

    python -m convert.jax_to_hf --src CKPT_DIR --dst HF_DIR [--shard-gb 4]

The inverse of `convert.hf_to_jax`, derived from the same name map (`convert/layout.py`): every
parameter is written under its hub key (one tensor per expert, PyTorch (out, in) orientation), in
shards of at most `--shard-gb`, one shard in memory at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from convert.layout import hub_layout
from omni_jax.nn.params import flatten

__all__ = ["export_params", "main"]


def _save_shard(tensors: dict[str, np.ndarray], path: str) -> None:
    from safetensors.flax import save_file  # noqa: PLC0415 - handles bf16, which numpy's writer does not

    cpu = jax.devices("cpu")[0]
    save_file({k: jax.device_put(np.ascontiguousarray(v), cpu) for k, v in tensors.items()}, path)


def export_params(params: dict, spec_tree: dict, dst: str, *, shard_bytes: int = 4 << 30) -> list[str]:
    """Writes `params` as hub-layout safetensors shards in `dst`; returns the file names."""
    os.makedirs(dst, exist_ok=True)
    flat = {path: np.asarray(value) for path, value in flatten(params).items()}
    layout = hub_layout(spec_tree)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for key, slot in layout.items():
        value = flat[slot.path][slot.index]
        value = value.T if slot.transpose else value
        if sizes[-1] and sizes[-1] + value.nbytes > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = value
        sizes[-1] += value.nbytes
    names = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for name, shard in zip(names, shards):
        _save_shard(shard, os.path.join(dst, name))
        weight_map.update({k: name for k in shard})
        shard.clear()
    if len(names) > 1:
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.jax_to_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="omni_jax checkpoint folder (from convert.hf_to_jax or train.py)")
    parser.add_argument("--dst", required=True, help="output folder in the Hugging Face hub layout")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="maximum size of one safetensors file")
    args = parser.parse_args(argv)

    import shutil  # noqa: PLC0415

    import omni_jax  # noqa: PLC0415
    from omni_jax import checkpoint  # noqa: PLC0415
    from omni_jax.model import model_specs  # noqa: PLC0415

    if not checkpoint.is_omni_jax_checkpoint(args.src):
        print(f"error: {args.src} is not an omni_jax checkpoint (no {checkpoint.MARKER})", file=sys.stderr)
        return 2
    with open(os.path.join(args.src, checkpoint.MARKER)) as f:
        dtype = json.load(f)["dtype"]
    model = omni_jax.load_pretrained(args.src, dtype=dtype)
    names = export_params(model.params, model_specs(model.config), args.dst, shard_bytes=int(args.shard_gb * 2**30))
    with open(os.path.join(args.dst, "config.json"), "w") as f:
        json.dump(model.config.to_hf_dict(), f, indent=2)
    for name in checkpoint.TOKENIZER_FILES:
        if os.path.exists(os.path.join(args.src, name)):
            shutil.copy(os.path.join(args.src, name), os.path.join(args.dst, name))
    print(f"exported {len(names)} safetensors file(s) to {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
