"""Hugging Face (PyTorch) checkpoint -> omni_jax parameters, strictly and streaming.

    python -m convert.hf_to_jax --src HF_DIR --dst CKPT_DIR [--dtype bfloat16] [--skip-absent-components]

Reads both the hub layout (one tensor per expert) and the transformers-5 in-memory layout (fused
`gate_up_proj`, gate rows first). Strict: a missing, unused or mis-shaped key is an error naming the
key. Keys of components the configuration leaves out (a talker in a text-only configuration) are
listed by component in one message
and skipped only with `--skip-absent-components`.

Memory: tensors are read one at a time from the safetensors files (memory-mapped) and copied into
the one preallocated host buffer of the parameter they belong to, so the host holds the model once,
plus one tensor.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import sys
import time
from collections import defaultdict
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from convert.layout import FusedSlot, absent_component, absent_prefixes, Slot, fused_layout, hub_layout, normalize_key
from omni_jax.config import OmniConfig, load_config
from omni_jax.nn.params import flatten, unflatten

__all__ = ["CheckpointError", "convert_checkpoint", "convert_tensors", "list_safetensors", "main"]


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the offending keys."""


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"    {shown}{more}"


def list_safetensors(folder: str) -> list[str]:
    """The checkpoint's safetensors files (from the index when present)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(folder, name) for name in weight_map.values()})
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise CheckpointError(f"{index} names files that do not exist: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}; pass a Hugging Face checkpoint folder")
    return files


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]]:
    """Yields (key, load, shape) for every tensor; `load()` reads that one tensor (on the host CPU)."""
    from safetensors import safe_open  # noqa: PLC0415

    cpu = jax.devices("cpu")[0]

    def read(f, key):
        # The flax reader handles bf16 (numpy's does not); pin it to the host.
        with jax.default_device(cpu):
            return np.asarray(f.get_tensor(key))

    for path in files:
        with safe_open(path, framework="flax") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                yield key, (lambda f=f, key=key: read(f, key)), shape


class _Assembler:
    """Preallocated host buffers, filled slot by slot, with bookkeeping of what was filled."""

    def __init__(self, spec_tree: dict, dtype):
        self.specs = flatten(spec_tree)
        self.dtype = np.dtype(jnp.dtype(dtype))
        self.buffers: dict[str, np.ndarray] = {}
        self.hub = hub_layout(spec_tree)
        self.fused = fused_layout(spec_tree)
        self.filled: set[str] = set()  # hub keys filled (fused keys fill their per-expert keys)

    def _buffer(self, path: str) -> np.ndarray:
        if path not in self.buffers:
            self.buffers[path] = np.empty(self.specs[path].shape, self.dtype)
        return self.buffers[path]

    def put(self, key: str, slot: Slot, tensor: np.ndarray) -> None:
        value = tensor.T if slot.transpose else tensor
        self._buffer(slot.path)[slot.index] = value.astype(self.dtype, copy=False)
        self.filled.add(key)

    def put_fused(self, key: str, slot: FusedSlot, tensor: np.ndarray) -> None:
        base = key.rsplit(".", 1)[0]  # "...mlp.experts"
        num_experts = tensor.shape[0]
        if slot.kind == "gate_up":
            inter = tensor.shape[1] // 2
            gate = np.swapaxes(tensor[:, :inter, :], 1, 2)
            up = np.swapaxes(tensor[:, inter:, :], 1, 2)
            self._buffer(f"{slot.prefix}/gate_proj")[slot.layer] = gate.astype(self.dtype, copy=False)
            self._buffer(f"{slot.prefix}/up_proj")[slot.layer] = up.astype(self.dtype, copy=False)
            names = ("gate_proj", "up_proj")
        else:
            down = np.swapaxes(tensor, 1, 2)
            self._buffer(f"{slot.prefix}/down_proj")[slot.layer] = down.astype(self.dtype, copy=False)
            names = ("down_proj",)
        for e in range(num_experts):
            for name in names:
                self.filled.add(f"{base}.{e}.{name}.weight")

    def missing(self) -> list[str]:
        return [k for k in self.hub if k not in self.filled]


def convert_tensors(
    tensors: Iterable[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]],
    spec_tree: dict,
    *,
    dtype="bfloat16",
    skip_absent_components: bool = False,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """Strictly maps (key, load, shape) triples onto `spec_tree`; returns flat host buffers by path.

    Shapes are checked before a tensor is read; all problems are gathered and raised together.
    """
    asm = _Assembler(spec_tree, dtype)
    absent = absent_prefixes(list(asm.hub) + list(asm.fused))
    unused: list[str] = []
    misshaped: list[str] = []
    duplicate: list[str] = []
    skipped: dict[str, list[str]] = defaultdict(list)
    iterator = tensors
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        iterator = tqdm(tensors, total=total, unit="tensor", desc="converting", file=sys.stderr)
    seen: set[str] = set()
    for raw_key, load, shape in iterator:
        key = normalize_key(raw_key)
        if key in seen:
            duplicate.append(raw_key)
            continue
        seen.add(key)
        slot = asm.hub.get(key) or asm.fused.get(key)
        if slot is None:
            component = absent_component(key, absent)
            if component is not None:
                skipped[component].append(raw_key)
            else:
                unused.append(raw_key)
            continue
        if tuple(shape) != tuple(slot.source_shape):
            misshaped.append(f"{raw_key}: checkpoint shape {tuple(shape)}, model expects {tuple(slot.source_shape)}")
            continue
        tensor = load()
        if isinstance(slot, FusedSlot):
            asm.put_fused(key, slot, tensor)
        else:
            asm.put(key, slot, tensor)
        del tensor

    problems = []
    if skipped and not skip_absent_components:
        lines = "\n".join(
            f"  {name}: {len(keys)} keys, e.g.\n{_format_keys(sorted(keys), 5)}" for name, keys in skipped.items()
        )
        problems.append(
            "the checkpoint holds components that the configuration leaves out (e.g. a talker and Code2Wav "
            "with enable_audio_output=false):\n"
            f"{lines}\nThey would be dropped. Pass skip_absent_components=True (--skip-absent-components) to "
            "load the rest anyway."
        )
    if unused:
        problems.append(f"{len(unused)} checkpoint keys match no model parameter (unused):\n{_format_keys(unused)}")
    if misshaped:
        problems.append(f"{len(misshaped)} checkpoint tensors have the wrong shape:\n{_format_keys(misshaped)}")
    if duplicate:
        problems.append(f"{len(duplicate)} keys appear twice (in two layouts?):\n{_format_keys(duplicate)}")
    missing = asm.missing()
    if missing:
        problems.append(f"{len(missing)} model parameters are missing from the checkpoint:\n{_format_keys(missing)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n" + "\n".join(problems))
    return asm.buffers


def convert_checkpoint(
    folder: str,
    config: OmniConfig,
    *,
    dtype="bfloat16",
    skip_absent_components: bool = False,
    shardings: dict | None = None,
    progress: bool = False,
) -> dict:
    """Reads a Hugging Face checkpoint folder into a parameter pytree of device arrays."""
    from omni_jax.model import model_specs  # noqa: PLC0415

    specs = model_specs(config)
    files = list_safetensors(folder)
    buffers = convert_tensors(
        iter_safetensors(files), specs, dtype=dtype, skip_absent_components=skip_absent_components, progress=progress
    )
    flat_shardings = flatten(shardings) if shardings is not None else {}
    out = {}
    for path in list(buffers):
        host = buffers.pop(path)  # free each host buffer once it is on the device
        out[path] = jax.device_put(host, flat_shardings.get(path))
        del host
    return unflatten(out)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.hf_to_jax", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="Hugging Face checkpoint folder (config.json + *.safetensors)")
    parser.add_argument("--dst", required=True, help="output folder for the omni_jax checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--skip-absent-components", action="store_true",
                        help="skip (with a listing) the keys of components the configuration leaves out")
    args = parser.parse_args(argv)

    from omni_jax import checkpoint  # noqa: PLC0415
    from omni_jax.model import model_specs  # noqa: PLC0415

    start = time.perf_counter()
    try:
        config = load_config(args.src)
        files = list_safetensors(args.src)
        total = sum(1 for _ in iter_safetensors(files))
        specs = model_specs(config)
        buffers = convert_tensors(
            iter_safetensors(files), specs, dtype=args.dtype, skip_absent_components=args.skip_absent_components,
            progress=True, total=total,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_bytes = sum(b.nbytes for b in buffers.values())
    # Hand orbax device arrays, moved one at a time (each host buffer freed as it goes): given numpy
    # buffers it stages a second copy of the whole model while writing.
    cpu = jax.devices("cpu")[0]
    arrays = {}
    for path in list(buffers):
        arrays[path] = jax.device_put(buffers.pop(path), cpu)
    checkpoint.save_params(args.dst, unflatten(arrays), config, args.dtype, copy_from=args.src)
    print(
        f"converted {total} tensors ({model_bytes / 2**20:.1f} MiB as {args.dtype}) to {args.dst} in "
        f"{time.perf_counter() - start:.1f}s; peak host memory {_peak_rss_bytes() / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
