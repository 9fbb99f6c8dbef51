"""omni_jax checkpoint -> Hugging Face hub layout (config.json + sharded *.safetensors).

    python -m convert.jax_to_hf --src CKPT_DIR --dst HF_DIR [--shard-gb 4]

The inverse of `convert.hf_to_jax`, derived from the same name map (`convert/layout.py`): every
parameter of every component (thinker with audio tower and vision encoder, talker with code
predictor, Code2Wav) is written under its hub key (one tensor per expert, PyTorch (out, in)
orientation), in shards of at most `--shard-gb`; the reference's `from_pretrained` loads the result
with no missing or unexpected key. The host holds the shard being filled and one parameter.
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
    from safetensors.numpy import save_file  # noqa: PLC0415 - writes bf16 (ml_dtypes) too

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _to_host(value) -> np.ndarray:
    """A parameter on this host, gathered from every process when it is sharded across processes."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(value)


def export_params(params: dict, spec_tree: dict, dst: str, *, shard_bytes: int = 4 << 30) -> list[str]:
    """Writes `params` as hub-layout safetensors shards in `dst`; returns the file names.

    Every parameter of `spec_tree` is written (thinker with audio tower and vision encoder, talker with
    code predictor, Code2Wav), under the keys the reference's `from_pretrained` expects, one tensor per
    expert in PyTorch (out, in) orientation. Parameters are fetched to the host one at a time and
    the shard being filled is the only other host copy. With several processes every process must
    call this (sharded parameters are gathered); only process 0 writes.
    """
    flat = flatten(params)
    layout = hub_layout(spec_tree)
    missing = sorted({slot.path for slot in layout.values()} - set(flat))
    extra = sorted(set(flat) - {slot.path for slot in layout.values()})
    if missing or extra:
        raise ValueError(f"parameters do not match the model: missing {missing[:10]}, unexpected {extra[:10]}")
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(dst, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    names: list[str] = []
    weight_map: dict[str, int] = {}
    current_path, current = None, None

    def flush():
        names.append(f"part-{len(names)}")
        if writer:
            _save_shard(shards[-1], os.path.join(dst, names[-1] + ".tmp"))
        weight_map.update({k: len(names) - 1 for k in shards[-1]})
        shards[-1] = {}

    for key, slot in layout.items():
        if slot.path != current_path:  # hub_layout lists a parameter's keys together
            current_path, current = slot.path, _to_host(flat[slot.path])
        value = current[slot.index]
        value = value.T if slot.transpose else value
        if sizes[-1] and sizes[-1] + value.nbytes > shard_bytes:
            flush()
            sizes.append(0)
        # A copy (not a view), so that the parameter's host array goes once its keys are done.
        shards[-1][key] = np.array(value, order="C", copy=True) if writer else None
        sizes[-1] += value.nbytes
    flush()
    current = None
    final = (["model.safetensors"] if len(names) == 1
             else [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))])
    if writer:
        for tmp, name in zip(names, final):
            os.replace(os.path.join(dst, tmp + ".tmp"), os.path.join(dst, name))
        if len(final) > 1:
            with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": sum(sizes)},
                           "weight_map": {k: final[i] for k, i in weight_map.items()}}, f, indent=2)
    return final


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
