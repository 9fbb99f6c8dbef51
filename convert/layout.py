"""The name map between PyTorch checkpoint keys and omni_jax parameter paths.

The map is *derived* from the ParamSpec tree, never written by hand, so that a parameter declared in
the model is automatically expected in the checkpoint (and vice versa). Rules:

  * path components join with "."; a stacked `layers` axis becomes `{container}.{i}`, where the
    container is the path component that names the repeated module (`layers` in the decoders and
    the audio tower, `blocks` in the vision encoder: `STACK_CONTAINERS`);
  * `kernel` leaves are `weight` in PyTorch, transposed (Linear stores (out, in));
  * expert tensors `.../experts/{gate_proj,up_proj,down_proj}` (layers, experts, in, out) are
    `experts.{e}.{name}.weight` of shape (out, in) in the hub layout (one tensor per expert), or,
    in the transformers-5 in-memory layout, `experts.gate_up_proj` (experts, 2*inter, hidden;
    gate rows first) and `experts.down_proj` (experts, hidden, inter).

Key spellings are normalised first: transformers 5 nests the thinker's parts
(`thinker.model.language_model.*`, `thinker.model.audio_tower.*`, `thinker.model.visual.*`); the hub
files use `thinker.model.*`, `thinker.audio_tower.*`, `thinker.visual.*`. A thinker-only state dict
(`model.*`, `lm_head.*`) gets the `thinker.` prefix.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from omni_jax.nn.params import ParamSpec, flatten

__all__ = ["Slot", "FusedSlot", "hub_layout", "fused_layout", "normalize_key", "COMPONENT_PREFIXES", "absent_prefixes", "absent_component"]

# Checkpoint key prefixes of the components a configuration may leave out, by component name: a
# Thinking or Captioner configuration has no talker and no Code2Wav, while the Instruct checkpoint
# carries them. Their keys are then reported by component, and dropped only on request.
COMPONENT_PREFIXES = {
    "audio tower": "thinker.audio_tower.",
    "vision encoder": "thinker.visual.",
    "talker": "talker.",
    "code2wav": "code2wav.",
}


def absent_prefixes(expected_keys) -> dict[str, str]:
    """{component name: key prefix} of the components the model has no parameter of (computed once)."""
    present = {name for name, prefix in COMPONENT_PREFIXES.items() if any(k.startswith(prefix) for k in expected_keys)}
    return {name: prefix for name, prefix in COMPONENT_PREFIXES.items() if name not in present}


def absent_component(key: str, absent: dict[str, str]) -> str | None:
    """The name of the absent component (`absent_prefixes`) that `key` belongs to, else None."""
    return next((name for name, prefix in absent.items() if key.startswith(prefix)), None)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor goes: `params[path][index] = transform(tensor)`."""

    path: str  # "/"-joined parameter path
    index: tuple[int, ...]  # leading stacked indices (layer, expert)
    transpose: bool  # the tensor is (out, in) and the parameter (in, out)
    source_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FusedSlot:
    """A transformers-5 fused expert tensor covering every expert of one layer."""

    kind: str  # "gate_up" or "down"
    layer: int
    prefix: str  # "/"-joined path of the experts node
    source_shape: tuple[int, ...]


def normalize_key(key: str) -> str:
    if key.startswith(("model.", "lm_head.")):
        key = "thinker." + key
    for old, new in (
        ("thinker.model.language_model.", "thinker.model."),
        ("thinker.model.audio_tower.", "thinker.audio_tower."),
        ("thinker.model.visual.", "thinker.visual."),
    ):
        if key.startswith(old):
            return new + key[len(old):]
    return key


# Path components under which a stacked (`layers`-axis) parameter's layer index is inserted.
STACK_CONTAINERS = ("layers", "blocks")


def _stacked_dims(spec: ParamSpec) -> int:
    return 1 if spec.axes and spec.axes[0] == "layers" else 0


def hub_layout(spec_tree: dict) -> dict[str, Slot]:
    """Every hub-layout checkpoint key the spec tree expects, with its destination."""
    out: dict[str, Slot] = {}
    for path, spec in flatten(spec_tree).items():
        parts = path.split("/")
        stacked = _stacked_dims(spec)
        is_expert = len(parts) >= 2 and parts[-2] == "experts"
        inner_shape = spec.shape[stacked + (1 if is_expert else 0):]
        leaf = parts[-1]
        transpose = leaf == "kernel" or is_expert
        source_shape = tuple(reversed(inner_shape)) if transpose else tuple(inner_shape)
        index_ranges = [range(spec.shape[0])] if stacked else [range(1)]
        for layer in index_ranges[0]:
            names = []
            inserted = False
            for p in parts:
                names.append(p)
                if stacked and not inserted and p in STACK_CONTAINERS:
                    names.append(str(layer))
                    inserted = True
            if stacked and not inserted:
                raise ValueError(f"stacked parameter {path!r} has no container component in {STACK_CONTAINERS}")
            if is_expert:
                base = ".".join(names[:-1])
                for e in range(spec.shape[stacked]):
                    key = f"{base}.{e}.{leaf}.weight"
                    out[key] = Slot(path, ((layer,) if stacked else ()) + (e,), True, source_shape)
            else:
                names[-1] = "weight" if leaf == "kernel" else leaf
                out[".".join(names)] = Slot(path, (layer,) if stacked else (), transpose, source_shape)
    return out


def fused_layout(spec_tree: dict) -> dict[str, FusedSlot]:
    """The transformers-5 fused expert keys, `...layers.{i}.mlp.experts.{gate_up_proj,down_proj}`."""
    out: dict[str, FusedSlot] = {}
    flat = flatten(spec_tree)
    for path, spec in flat.items():
        parts = path.split("/")
        if len(parts) < 2 or parts[-2] != "experts" or parts[-1] != "gate_proj":
            continue
        prefix = "/".join(parts[:-1])
        num_layers, num_experts, hidden, inter = spec.shape
        for layer in range(num_layers):
            names = []
            inserted = False
            for p in parts[:-1]:
                names.append(p)
                if not inserted and p in STACK_CONTAINERS:
                    names.append(str(layer))
                    inserted = True
            base = ".".join(names)
            out[f"{base}.gate_up_proj"] = FusedSlot("gate_up", layer, prefix, (num_experts, 2 * inter, hidden))
            out[f"{base}.down_proj"] = FusedSlot("down", layer, prefix, (num_experts, hidden, inter))
    return out


def expected_source_shape(slot: Slot | FusedSlot) -> tuple[int, ...]:
    return tuple(slot.source_shape)


def to_param(slot: Slot, tensor: np.ndarray) -> np.ndarray:
    return tensor.T if slot.transpose else tensor
