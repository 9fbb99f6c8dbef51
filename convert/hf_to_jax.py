"""Hugging Face (PyTorch) checkpoint -> omni_jax parameters, strictly and sharded.

    python -m convert.hf_to_jax --src HF_DIR --dst CKPT_DIR [--dtype bfloat16] [--skip-absent-components]

Reads both the hub layout (one tensor per expert) and the transformers-5 in-memory layout (fused
`gate_up_proj`, gate rows first). Strict: a missing, unused, duplicated or mis-shaped key is an error
naming the key, found from the safetensors headers before any tensor data is read. Keys of components
the configuration leaves out (a talker in a text-only configuration) are listed by component in one
message and skipped only with `--skip-absent-components`.

Sharded loading (`convert_checkpoint`): every parameter is built directly in its sharding. For each
distinct shard index among the process's addressable devices, only the slices of the checkpoint
tensors that this shard covers are copied out of the memory-mapped safetensors files (located from
their headers; the pages read are dropped from the mapping afterwards), transformed (Linear
kernels transposed, per-expert keys stacked on (layers, experts), the fused `gate_up_proj` split,
cast), put on the devices that hold that shard, and freed before the next shard is read. A process
never reads what its devices do not own, a shard replicated over a mesh axis is read once per
process, and the host holds at most one shard-sized buffer at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import json
import mmap
import os
import resource
import sys
import time
from collections import defaultdict
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from convert.layout import FusedSlot, Slot, absent_component, absent_prefixes, fused_layout, hub_layout, normalize_key
from omni_jax.config import OmniConfig, load_config
from omni_jax.nn.params import flatten, unflatten

__all__ = [
    "CheckpointError", "Piece", "ParamPlan", "Read", "ReadLog", "SafetensorsReader", "TensorInfo",
    "plan_checkpoint", "load_param", "read_shard",
    "convert_checkpoint", "convert_tensors", "list_safetensors", "read_headers", "main",
]


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


# ---------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Piece:
    """The checkpoint tensor that fills `param[lead]` (lead = the stacked layer/expert indices).

    `param[lead][inner] = T(tensor[select + src])`, where `src` is `inner` reversed when `transpose`
    (PyTorch (out, in) -> (in, out)), its first slice shifted by `offset` (the up half of a fused
    `gate_up_proj`), and `select` picks the expert of a fused tensor.
    """

    key: str  # the raw checkpoint key
    transpose: bool
    select: tuple[int, ...] = ()
    offset: int = 0

    def source_index(self, inner: tuple[slice, ...]) -> tuple[slice, ...]:
        src = tuple(reversed(inner)) if self.transpose else tuple(inner)
        if self.offset and src:
            src = (slice(src[0].start + self.offset, src[0].stop + self.offset),) + src[1:]
        return tuple(slice(i, i + 1) for i in self.select) + src

    def to_param(self, block: np.ndarray) -> np.ndarray:
        """`block` (read at `source_index`) in the parameter's orientation."""
        block = block.reshape(block.shape[len(self.select):])
        return block.T if self.transpose else block


@dataclasses.dataclass
class ParamPlan:
    """Where every part of one parameter comes from: {lead index tuple: Piece}."""

    path: str
    shape: tuple[int, ...]
    lead: int  # number of leading (layer, expert) dimensions the pieces are stacked on
    pieces: dict[tuple[int, ...], Piece]


def _full_slices(shape) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def plan_checkpoint(
    entries: Iterable[tuple[str, tuple[int, ...]]],
    spec_tree: dict,
    *,
    skip_absent_components: bool = False,
) -> dict[str, ParamPlan]:
    """Strictly maps (raw key, shape) pairs onto `spec_tree`: {parameter path: ParamPlan}.

    Works from names and shapes only (no tensor is read); every problem is gathered and raised together
    as one CheckpointError naming the keys: unused, missing, mis-shaped, filling a slot twice, or
    belonging to a component the configuration leaves out (unless `skip_absent_components`).
    """
    specs = flatten(spec_tree)
    hub = hub_layout(spec_tree)
    fused = fused_layout(spec_tree)
    absent = absent_prefixes(list(hub) + list(fused))
    leads = {slot.path: len(slot.index) for slot in hub.values()}
    plans = {path: ParamPlan(path, tuple(spec.shape), leads[path], {}) for path, spec in specs.items() if path in leads}
    unused: list[str] = []
    misshaped: list[str] = []
    duplicate: list[str] = []
    skipped: dict[str, list[str]] = defaultdict(list)
    seen: dict[str, str] = {}

    def fill(path: str, lead: tuple[int, ...], piece: Piece) -> None:
        plan = plans[path]
        if lead in plan.pieces:
            duplicate.append(f"{piece.key} (also filled by {plan.pieces[lead].key})")
        else:
            plan.pieces[lead] = piece

    for raw_key, shape in entries:
        key = normalize_key(raw_key)
        if key in seen:
            duplicate.append(f"{raw_key} (same tensor as {seen[key]})")
            continue
        seen[key] = raw_key
        slot = hub.get(key) or fused.get(key)
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
        if isinstance(slot, Slot):
            fill(slot.path, slot.index, Piece(raw_key, slot.transpose))
            continue
        num_experts, rows = slot.source_shape[0], slot.source_shape[1]
        halves = (("gate_proj", 0), ("up_proj", rows // 2)) if slot.kind == "gate_up" else (("down_proj", 0),)
        for name, offset in halves:
            for e in range(num_experts):
                fill(f"{slot.prefix}/{name}", (slot.layer, e), Piece(raw_key, True, (e,), offset))

    missing = [k for k, slot in hub.items() if slot.index not in plans[slot.path].pieces]
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
    if missing:
        problems.append(f"{len(missing)} model parameters are missing from the checkpoint:\n{_format_keys(missing)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n" + "\n".join(problems))
    return plans


# ------------------------------------------------------------------------------ host conversion
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

    For in-memory state dicts (tests, tools). The whole key set is checked (`plan_checkpoint`) before
    any `load()` is called; then each tensor is loaded once and scattered into its parameters' buffers.
    """
    triples = list(tensors)
    plans = plan_checkpoint(((k, s) for k, _, s in triples), spec_tree, skip_absent_components=skip_absent_components)
    np_dtype = np.dtype(jnp.dtype(dtype))
    users: dict[str, list[tuple[str, tuple[int, ...], Piece]]] = defaultdict(list)
    for plan in plans.values():
        for lead, piece in plan.pieces.items():
            users[piece.key].append((plan.path, lead, piece))
    buffers: dict[str, np.ndarray] = {}
    iterator = triples
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        iterator = tqdm(triples, total=total, unit="tensor", desc="converting", file=sys.stderr)
    for key, load, _ in iterator:
        if key not in users:
            continue  # a skipped component's key
        tensor = np.asarray(load())
        for path, lead, piece in users[key]:
            if path not in buffers:
                buffers[path] = np.empty(plans[path].shape, np_dtype)
            inner = _full_slices(plans[path].shape[len(lead):])
            buffers[path][lead] = piece.to_param(tensor[piece.source_index(inner)])
        del tensor
    return {path: buffers[path] for path in plans}


# ----------------------------------------------------------------------------- sharded loading
@dataclasses.dataclass(frozen=True)
class Read:
    """One slice read from a safetensors file (bytes in the file's dtype)."""

    key: str
    index: tuple[tuple[int, int], ...]  # (start, stop) per source dimension
    nbytes: int
    path: str  # the parameter it went into
    shard: tuple[tuple[int, int], ...]  # the parameter shard it belongs to
    devices: tuple[int, ...]  # ids of the (addressable) devices holding that shard


class ReadLog:
    """Accounts every slice `convert_checkpoint(read_log=...)` reads, for checks and reports."""

    def __init__(self):
        self.reads: list[Read] = []

    def record(self, read: Read) -> None:
        self.reads.append(read)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.reads)

    def bytes_by_device(self) -> dict[int, int]:
        """Bytes read for the shards each device holds (a shared read counts for each of its devices)."""
        out: dict[int, int] = defaultdict(int)
        for r in self.reads:
            for d in r.devices:
                out[d] += r.nbytes
        return dict(out)

    def bytes_by_param(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.reads:
            out[r.path] += r.nbytes
        return dict(out)


# safetensors dtype names -> numpy (little-endian, as the format stores them).
_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes  # noqa: PLC0415

    extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    if name in _DTYPES:
        return np.dtype(_DTYPES[name])
    if name in extra:
        return np.dtype(extra[name])
    raise CheckpointError(f"unsupported safetensors dtype {name}")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its header: where its bytes are."""

    file: str
    shape: tuple[int, ...]
    dtype: np.dtype
    start: int  # absolute byte offset in the file
    nbytes: int


def _header(path: str) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype, shape = _np_dtype(meta["dtype"]), tuple(meta["shape"])
        begin, end = meta["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{path}: {key} has {end - begin} bytes for shape {shape} of {meta['dtype']}")
        out[key] = TensorInfo(path, shape, dtype, 8 + size + begin, end - begin)
    return out


def read_headers(files: list[str]) -> dict[str, TensorInfo]:
    """{raw key: TensorInfo} from the safetensors headers only; a key in two files is an error."""
    out: dict[str, TensorInfo] = {}
    twice: list[str] = []
    for path in files:
        for key, info in _header(path).items():
            if key in out:
                twice.append(f"{key} (in {os.path.basename(out[key].file)} and {os.path.basename(path)})")
            else:
                out[key] = info
    if twice:
        raise CheckpointError(f"{len(twice)} keys appear in two files:\n{_format_keys(twice)}")
    return out


class SafetensorsReader:
    """Copies slices of checkpoint tensors out of the memory-mapped files: only the requested elements.

    After each read the tensor's pages are dropped from the mapping (`MADV_DONTNEED`; the file stays
    in the page cache), so the pages read do not pile up in the process's resident memory.
    """

    def __init__(self, headers: dict[str, TensorInfo], read_log: ReadLog | None = None):
        self.headers = headers
        self.read_log = read_log
        self._maps: dict[str, mmap.mmap] = {}

    def _map(self, path: str) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def read(self, key: str, index: tuple[slice, ...], *, path: str = "", shard=(), devices=()) -> np.ndarray:
        """`tensor[index]` (concrete slices, one per dimension) as a new array."""
        info = self.headers[key]
        mm = self._map(info.file)
        view = np.frombuffer(mm, info.dtype, count=info.nbytes // info.dtype.itemsize, offset=info.start)
        block = np.array(view.reshape(info.shape)[index])
        del view
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED") and info.nbytes:
            first = info.start - info.start % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, first, info.start + info.nbytes - first)
        if self.read_log is not None:
            self.read_log.record(Read(key, tuple((s.start, s.stop) for s in index), int(block.nbytes), path,
                                      shard, tuple(devices)))
        return block

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()


def read_shard(
    plan: ParamPlan, shard: tuple[slice, ...], reader: SafetensorsReader, dtype, *, devices=()
) -> np.ndarray:
    """The parameter block `param[shard]` (concrete slices), read from the checkpoint slice by slice."""
    out = np.empty(tuple(s.stop - s.start for s in shard), np.dtype(dtype))
    lead, inner = shard[:plan.lead], shard[plan.lead:]
    where = tuple((s.start, s.stop) for s in shard)
    for idx in itertools.product(*(range(s.start, s.stop) for s in lead)):
        piece = plan.pieces[idx]
        block = reader.read(piece.key, piece.source_index(inner), path=plan.path, shard=where, devices=devices)
        out[tuple(i - s.start for i, s in zip(idx, lead))] = piece.to_param(block)
        del block
    return out


def _concrete(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def load_param(plan: ParamPlan, sharding, reader: SafetensorsReader, dtype) -> jax.Array:
    """One parameter as a global array in `sharding` (None: the default device), reading only the
    shards of this process's devices, each distinct shard once."""
    if sharding is None:
        return jax.device_put(read_shard(plan, _full_slices(plan.shape), reader, dtype))
    groups: dict[tuple[slice, ...], list] = {}
    for device, index in sharding.addressable_devices_indices_map(plan.shape).items():
        concrete = _concrete(index, plan.shape)
        groups.setdefault(tuple((s.start, s.stop) for s in concrete), []).append(device)
    arrays = []
    for bounds, devices in groups.items():
        host = read_shard(plan, tuple(slice(a, b) for a, b in bounds), reader, dtype,
                          devices=tuple(d.id for d in devices))
        arrays.extend(jax.device_put(host, d) for d in devices)
        del host  # one shard-sized host buffer at a time
    return jax.make_array_from_single_device_arrays(plan.shape, sharding, arrays)


def convert_checkpoint(
    folder: str,
    config: OmniConfig,
    *,
    dtype="bfloat16",
    skip_absent_components: bool = False,
    shardings: dict | None = None,
    progress: bool = False,
    read_log: ReadLog | None = None,
) -> dict:
    """Reads a Hugging Face checkpoint folder into a parameter pytree of (sharded) device arrays.

    shardings: a tree of `jax.sharding.Sharding` like the parameters (`sharding.param_shardings`);
      each process then reads only the slices its devices own. None: whole arrays on the default device.
    read_log: a `ReadLog` that records every slice read (key, source index, bytes, devices).
    The checkpoint's keys and shapes are checked against the model from the file headers before any
    tensor data is read.
    """
    from omni_jax.model import model_specs  # noqa: PLC0415

    specs = model_specs(config)
    headers = read_headers(list_safetensors(folder))
    plans = plan_checkpoint(((k, info.shape) for k, info in headers.items()), specs,
                            skip_absent_components=skip_absent_components)
    flat_shardings = flatten(shardings) if shardings is not None else {}
    np_dtype = np.dtype(jnp.dtype(dtype))
    reader = SafetensorsReader(headers, read_log)
    items = list(plans.items())
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        items = tqdm(items, unit="param", desc="loading", file=sys.stderr)
    try:
        out = {path: load_param(plan, flat_shardings.get(path), reader, np_dtype) for path, plan in items}
    finally:
        reader.close()
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

    from jax.sharding import PartitionSpec, NamedSharding  # noqa: PLC0415

    from omni_jax import checkpoint  # noqa: PLC0415
    from omni_jax.model import model_specs  # noqa: PLC0415
    from omni_jax.sharding import make_mesh  # noqa: PLC0415

    start = time.perf_counter()
    log = ReadLog()
    try:
        config = load_config(args.src)
        # A one-device CPU mesh: the converted parameters go straight from the files into their arrays.
        mesh = make_mesh(devices=jax.devices("cpu")[:1])
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), model_specs(config),
                                 is_leaf=lambda x: not isinstance(x, dict))
        params = convert_checkpoint(args.src, config, dtype=args.dtype, shardings=shardings, progress=True,
                                    skip_absent_components=args.skip_absent_components, read_log=log)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    checkpoint.save_params(args.dst, params, config, args.dtype, copy_from=args.src)
    print(
        f"converted {len({r.key for r in log.reads})} tensors ({log.total_bytes / 2**20:.1f} MiB read; "
        f"{model_bytes / 2**20:.1f} MiB as {args.dtype}) to {args.dst} in {time.perf_counter() - start:.1f}s; "
        f"peak host memory {_peak_rss_bytes() / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
