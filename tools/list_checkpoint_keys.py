"""List a Qwen3-Omni checkpoint's tensor keys and shapes without its weights, and account for them.

    python tools/list_checkpoint_keys.py [--preset qwen3-omni-30b-a3b-instruct] [--layout hub|memory]
    python tools/list_checkpoint_keys.py --check HF_DIR     # a downloaded checkpoint, headers only

The listing comes from the transformers reference (`Qwen3OmniMoeForConditionalGeneration`) built for
the preset on PyTorch's meta device: parameters have shapes but no storage, so the 35 B-parameter
model costs a few hundred MB of Python objects. Two layouts:

  * `memory`: the transformers-5 in-memory state dict (`thinker.model.language_model.*`, fused
    `mlp.experts.gate_up_proj` (E, 2I, H) and `mlp.experts.down_proj` (E, H, I));
  * `hub`: the published safetensors (`thinker.model.*`, `thinker.audio_tower.*`, `thinker.visual.*`,
    one `mlp.experts.{e}.{gate,up,down}_proj.weight` per expert), derived here by renaming and
    splitting (`hub_keys`), and independently by transformers' own save-time conversion
    (`transformers_hub_keys`).

Each key is then accounted against the converter's layout (`convert.layout`) over the full-size
omni_jax ParamSpec tree (`account`): the slot it fills, and which keys match nothing, have the wrong
shape, belong to a component the configuration leaves out, or fill a slot twice; and which parameter
elements stay unfilled. `--check` runs the same accounting on a real checkpoint's safetensors
headers (no tensor is read) and prints any difference from the reference listing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convert.layout import (  # noqa: E402
    FusedSlot, absent_component, absent_prefixes, fused_layout, hub_layout, normalize_key,
)
from omni_jax.config import OmniConfig, preset  # noqa: E402
from omni_jax.nn.params import flatten  # noqa: E402

__all__ = [
    "ParamsOnMeta", "reference_on_meta", "memory_keys", "hub_keys", "transformers_hub_keys", "buffers",
    "Accounting", "account", "checkpoint_keys", "main",
]

# The published checkpoint spells the thinker's parts without transformers 5's nesting.
HUB_RENAMES = (
    ("thinker.model.language_model.", "thinker.model."),
    ("thinker.model.audio_tower.", "thinker.audio_tower."),
    ("thinker.model.visual.", "thinker.visual."),
)
_FUSED = re.compile(r"^(?P<base>.*\.mlp\.experts)\.(?P<name>gate_up_proj|down_proj)$")


class ParamsOnMeta(TorchFunctionMode):
    """Tensor factories default to the meta device, except `torch.arange`.

    Parameters (`torch.empty`/`ones`/`zeros`/`full`) then take no memory, while the non-persistent
    buffers, which the reference derives from `arange` (rotary `inv_freq`, the audio sinusoid table,
    Code2Wav's `code_offset`), are computed for real on the CPU and can be compared with omni_jax's.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not torch.arange and func in _device_constructors() and kwargs.get("device") is None:
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def reference_on_meta(config: OmniConfig):
    """The whole transformers reference for `config`, parameters on the meta device."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling  # noqa: PLC0415

    from convert.reference import hf_config  # noqa: PLC0415

    with ParamsOnMeta():
        model = modeling.Qwen3OmniMoeForConditionalGeneration(hf_config(config))
    not_meta = [name for name, p in model.named_parameters() if p.device.type != "meta"]
    if not_meta:
        raise RuntimeError(f"parameters were allocated for real: {not_meta[:5]}")
    return model


def memory_keys(model) -> dict[str, tuple[int, ...]]:
    """The reference's state dict (transformers-5 in-memory layout): key -> shape."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def hub_keys(memory: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The published (hub) layout of an in-memory listing: thinker renames, one tensor per expert."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in memory.items():
        for old, new in HUB_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        m = _FUSED.match(key)
        if m is None:
            out[key] = shape
        elif m["name"] == "gate_up_proj":  # (E, 2I, H), gate rows first
            experts, two_inter, hidden = shape
            for e in range(experts):
                out[f"{m['base']}.{e}.gate_proj.weight"] = (two_inter // 2, hidden)
                out[f"{m['base']}.{e}.up_proj.weight"] = (two_inter // 2, hidden)
        else:  # down_proj (E, H, I)
            experts, hidden, inter = shape
            for e in range(experts):
                out[f"{m['base']}.{e}.down_proj.weight"] = (hidden, inter)
    return out


def transformers_hub_keys(model) -> dict[str, tuple[int, ...]]:
    """The hub layout as transformers' `save_pretrained` writes it (its reverse weight conversion)."""
    from transformers.core_model_loading import revert_weight_conversion  # noqa: PLC0415

    return {k: tuple(v.shape) for k, v in revert_weight_conversion(model, model.state_dict()).items()}


def buffers(model) -> dict[str, torch.Tensor]:
    """Every registered buffer of the reference, by state-dict-style name."""
    return dict(model.named_buffers())


@dataclasses.dataclass
class Accounting:
    """Where each checkpoint key goes in the full-size parameter tree, and what is left over."""

    filled: dict[tuple[str, tuple[int, ...]], str]  # (param path, leading index) -> checkpoint key
    unmapped: list[str]  # keys that match no slot and no left-out component
    misshaped: list[str]  # "key: checkpoint (..) vs expected (..)"
    absent: dict[str, list[str]]  # component name -> its keys, for components the specs leave out
    duplicates: list[str]  # keys (or spellings) that fill a slot some other key already filled
    unfilled: dict[str, int]  # param path -> number of its elements no key fills
    checkpoint_elements: int  # elements of the keys that fill a slot
    model_elements: int  # elements of the spec tree

    @property
    def complete(self) -> bool:
        return not (self.unmapped or self.misshaped or self.absent or self.duplicates or self.unfilled)


def account(keys: dict[str, tuple[int, ...]], spec_tree: dict) -> Accounting:
    """Accounts `keys` (either layout, any spelling `normalize_key` accepts) against `spec_tree`.

    Independently of the layout's own `source_shape`, each slot's shape is checked against the
    ParamSpec: the tensor, transposed when the slot says so, must be the parameter with its leading
    (layer, expert) indices removed. Coverage is counted in elements per parameter.
    """
    specs = flatten(spec_tree)
    hub = hub_layout(spec_tree)
    fused = fused_layout(spec_tree)
    absent_by_prefix = absent_prefixes(list(hub) + list(fused))
    filled: dict[tuple[str, tuple[int, ...]], str] = {}
    unmapped, misshaped, duplicates = [], [], []
    absent: dict[str, list[str]] = collections.defaultdict(list)

    def fill(path: str, index: tuple[int, ...], tensor_shape: tuple[int, ...], key: str) -> bool:
        spec_shape = tuple(specs[path].shape)
        if len(index) > len(spec_shape) or any(not 0 <= i < n for i, n in zip(index, spec_shape)):
            misshaped.append(f"{key}: index {index} outside parameter {path} {spec_shape}")
            return False
        if tuple(tensor_shape) != spec_shape[len(index):]:
            misshaped.append(f"{key}: lands as {tuple(tensor_shape)} in {path}{list(index)}, parameter is {spec_shape}")
            return False
        if (path, index) in filled:
            duplicates.append(f"{key} (slot {path}{list(index)} already filled by {filled[path, index]})")
            return False
        filled[path, index] = key
        return True

    for raw, shape in keys.items():
        key = normalize_key(raw)
        slot = hub.get(key) or fused.get(key)
        if slot is None:
            component = absent_component(key, absent_by_prefix)
            (absent[component] if component else unmapped).append(raw)
            continue
        if tuple(shape) != tuple(slot.source_shape):
            misshaped.append(f"{raw}: checkpoint {tuple(shape)}, layout expects {tuple(slot.source_shape)}")
            continue
        if isinstance(slot, FusedSlot):
            experts = shape[0]
            if slot.kind == "gate_up":  # (E, 2I, H) -> gate_proj/up_proj (L, E, H, I)
                inter, hidden = shape[1] // 2, shape[2]
                for e in range(experts):
                    fill(f"{slot.prefix}/gate_proj", (slot.layer, e), (hidden, inter), raw)
                    fill(f"{slot.prefix}/up_proj", (slot.layer, e), (hidden, inter), raw)
            else:  # (E, H, I) -> down_proj (L, E, I, H)
                for e in range(experts):
                    fill(f"{slot.prefix}/down_proj", (slot.layer, e), (shape[2], shape[1]), raw)
        else:
            fill(slot.path, slot.index, tuple(reversed(shape)) if slot.transpose else tuple(shape), raw)

    covered: dict[str, int] = collections.Counter()
    for path, index in filled:
        covered[path] += math.prod(specs[path].shape[len(index):])
    unfilled = {p: math.prod(s.shape) - covered[p] for p, s in specs.items() if covered[p] != math.prod(s.shape)}
    return Accounting(
        filled=filled, unmapped=unmapped, misshaped=misshaped, absent=dict(absent), duplicates=duplicates,
        unfilled=unfilled, checkpoint_elements=sum(covered.values()),
        model_elements=sum(math.prod(s.shape) for s in specs.values()),
    )


def checkpoint_keys(folder: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a Hugging Face checkpoint folder, from the safetensors headers alone."""
    from safetensors import safe_open  # noqa: PLC0415

    from convert.hf_to_jax import list_safetensors  # noqa: PLC0415

    out = {}
    for path in list_safetensors(folder):
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                out[key] = tuple(f.get_slice(key).get_shape())
    return out


def _summary(acc: Accounting) -> str:
    lines = [f"model elements {acc.model_elements:,}; filled by the checkpoint {acc.checkpoint_elements:,}"]
    for name, items in (("unmapped", acc.unmapped), ("misshaped", acc.misshaped), ("duplicates", acc.duplicates)):
        lines.append(f"{name}: {len(items)}" + "".join(f"\n    {x}" for x in items[:20]))
    for component, items in acc.absent.items():
        lines.append(f"left-out component {component}: {len(items)} keys")
    lines.append(f"unfilled parameters: {len(acc.unfilled)}" + "".join(
        f"\n    {p}: {n:,} elements" for p, n in list(acc.unfilled.items())[:20]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3-omni-30b-a3b-instruct")
    parser.add_argument("--layout", choices=["hub", "memory"], default="hub")
    parser.add_argument("--check", metavar="HF_DIR", help="account a downloaded checkpoint (headers only)")
    parser.add_argument("--json", action="store_true", help="print the listing as JSON {key: shape}")
    args = parser.parse_args(argv)

    from omni_jax.model import model_specs  # noqa: PLC0415

    if args.check:
        from omni_jax.config import load_config  # noqa: PLC0415

        config = load_config(args.check)
        keys = checkpoint_keys(args.check)
        model = reference_on_meta(config)
        reference = hub_keys(memory_keys(model))
        only_ckpt = sorted(set(keys) - set(reference))
        only_ref = sorted(set(reference) - set(keys))
        shape_diff = sorted(k for k in set(keys) & set(reference) if keys[k] != reference[k])
        print(f"{args.check}: {len(keys)} tensors, {sum(math.prod(s) for s in keys.values()):,} elements")
        print(f"reference listing: {len(reference)} keys; only in the checkpoint {len(only_ckpt)}, "
              f"only in the reference {len(only_ref)}, different shapes {len(shape_diff)}")
        for k in (only_ckpt + only_ref + shape_diff)[:20]:
            print(f"    {k}: checkpoint {keys.get(k)}, reference {reference.get(k)}")
        acc = account(keys, model_specs(config))
        print(_summary(acc))
        return 0 if acc.complete and not (only_ckpt or only_ref or shape_diff) else 1

    config = preset(args.preset)
    model = reference_on_meta(config)
    keys = memory_keys(model)
    if args.layout == "hub":
        keys = hub_keys(keys)
    if args.json:
        print(json.dumps({k: list(v) for k, v in keys.items()}, indent=0))
    else:
        for k, v in keys.items():
            print(f"{k}\t{list(v)}")
    acc = account(keys, model_specs(config))
    print(f"{len(keys)} keys ({args.layout} layout)\n{_summary(acc)}", file=sys.stderr)
    return 0 if acc.complete else 1


if __name__ == "__main__":
    sys.exit(main())
