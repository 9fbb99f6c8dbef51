"""Meshes and the one table that maps logical axis names onto mesh axes.

Every parameter and cache declares logical axes (`nn/params.py`); `LOGICAL_RULES` maps them onto
the mesh axes `data`, `expert`, `tensor`. A single device is the mesh (1, 1, 1): the same code path
runs everywhere.

    mesh = mesh_from_config(MeshConfig(data=2, expert=2, tensor=2))
    shardings = param_shardings(specs, mesh, rules(fsdp=False))
    with jax.set_mesh(mesh):          # model code sees the mesh: `constrain`, expert parallelism
        logits = jitted_forward(params, batch)

Activations: the batch is split over `data` *and* `expert` (outside the MoE the expert axis is
just more data parallelism; inside it, tokens travel to their experts by all-to-all, see
`nn/expert_parallel.py`); attention heads, MLP hidden units and the vocabulary over `tensor`.
FSDP (`rules(fsdp=True)`) additionally shards every parameter's `embed` dimension over `data`.
A mesh axis shards at most one dimension of a tensor, and a dimension that the axis size does not
divide is replicated rather than refused (tiny test models on big meshes, odd head counts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "MESH_AXES", "LOGICAL_RULES", "MeshConfig", "make_mesh", "mesh_from_config", "default_mesh", "rules",
    "logical_to_pspec", "param_shardings", "batch_sharding", "shard_batch", "cache_sharding", "constrain",
    "ambient_mesh", "use_mesh", "mesh_axis_size", "mesh_and_rules", "varying_axes",
]

MESH_AXES = ("data", "expert", "tensor")

# Batch-like dimensions are split over these mesh axes, in this order.
BATCH_AXES = ("data", "expert")

# logical axis -> mesh axis, a tuple of mesh axes (the dimension is split over their product), or
# None (replicated). FSDP adds `data` to `embed` for parameters (see `rules`).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "layers": None,
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "seq": None,
    "cache_seq": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. `data` is the whole data axis; with `dcn_data` > 1 it spans `dcn_data` slices
    (TPU multi-slice, or hosts joined over the data-centre network), each holding `data / dcn_data`
    of it, so only data-parallel traffic crosses the slow network. `fsdp` shards parameters over `data`."""

    data: int = 1
    expert: int = 1
    tensor: int = 1
    fsdp: bool = False
    dcn_data: int = 1

    def __post_init__(self):
        for name in ("data", "expert", "tensor", "dcn_data"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MeshConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.data % self.dcn_data:
            raise ValueError(
                f"MeshConfig.dcn_data={self.dcn_data} must divide data={self.data} (data spans the slices)"
            )

    @property
    def num_devices(self) -> int:
        return self.data * self.expert * self.tensor

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "MeshConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown mesh keys {sorted(unknown)}; expected data, expert, tensor, fsdp, dcn_data")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _has_slices(devices) -> bool:
    return any(getattr(d, "slice_index", None) is not None for d in devices) and (
        len({getattr(d, "slice_index", 0) for d in devices}) > 1
    )


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, devices=None, *, dcn_data: int = 1) -> Mesh:
    """A (data, expert, tensor) mesh over `devices` (default: all devices, whose count must match).

    dcn_data > 1: the data axis spans `dcn_data` slices (granules). On TPU multi-slice (devices carry
    `slice_index`) and multi-process runs the device order comes from
    `mesh_utils.create_hybrid_device_mesh` (ICI inside a slice, DCN across); otherwise (CPU, tests) a
    plain data-major reshape, whose outer part of `data` plays the role of the slices.
    """
    devices = jax.devices() if devices is None else list(devices)
    need = data * expert * tensor
    if need != len(devices):
        raise ValueError(
            f"mesh data={data} x expert={expert} x tensor={tensor} = {need} devices, but {len(devices)} "
            "are available; choose axis sizes whose product is the device count"
        )
    if dcn_data < 1 or data % dcn_data:
        raise ValueError(f"dcn_data={dcn_data} must divide data={data}")
    arranged = None
    if dcn_data > 1 and need > 1:
        from jax.experimental import mesh_utils  # noqa: PLC0415

        by_process = not _has_slices(devices) and len({d.process_index for d in devices}) > 1
        if _has_slices(devices) or by_process:
            arranged = mesh_utils.create_hybrid_device_mesh(
                (data // dcn_data, expert, tensor), (dcn_data, 1, 1), devices, process_is_granule=by_process
            )
    elif need > 1 and devices[0].platform == "tpu":
        from jax.experimental import mesh_utils  # noqa: PLC0415

        try:  # topology-aware order on one slice; any shape it cannot place falls back to the reshape
            arranged = mesh_utils.create_device_mesh((data, expert, tensor), devices)
        except (ValueError, NotImplementedError, AssertionError):
            arranged = None
    if arranged is None:
        arranged = np.asarray(devices, dtype=object).reshape(data, expert, tensor)
    return Mesh(arranged, MESH_AXES)


def mesh_from_config(cfg: MeshConfig, devices=None) -> Mesh:
    """`make_mesh` for a `MeshConfig`."""
    return make_mesh(cfg.data, cfg.expert, cfg.tensor, devices, dcn_data=cfg.dcn_data)


def default_mesh() -> Mesh:
    return make_mesh(devices=jax.devices()[:1])


def rules(fsdp: bool = False) -> dict:
    """The logical-axis -> mesh-axis table; FSDP also shards parameters' `embed` dimension over `data`."""
    table = dict(LOGICAL_RULES)
    if fsdp:
        table["embed"] = "data"
    return table


def mesh_and_rules(mesh: "Mesh | MeshConfig | None") -> tuple[Mesh, dict]:
    """A `Mesh` (default rules), a `MeshConfig` (its mesh and FSDP setting) or None (one device)."""
    if mesh is None:
        return default_mesh(), rules()
    if isinstance(mesh, MeshConfig):
        return mesh_from_config(mesh), rules(mesh.fsdp)
    return mesh, rules()


def _as_tuple(mesh_axis) -> tuple[str, ...]:
    if mesh_axis is None:
        return ()
    return (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis)


def _pspec_entry(axes: tuple[str, ...]):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def logical_to_pspec(
    axes: tuple[str | None, ...], rules: dict | None = None, shape: tuple[int, ...] | None = None, mesh_shape=None
) -> PartitionSpec:
    """PartitionSpec for logical `axes`. A mesh axis shards at most one dimension (the first that asks).

    With `shape` and `mesh_shape` (axis name -> size), each dimension keeps the longest prefix of its
    mesh axes whose product divides it (so the batch falls back from (data, expert) to data, then to
    replicated); mesh axes the mesh lacks are dropped.
    """
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for dim, name in enumerate(axes):
        wanted = [a for a in _as_tuple(rules.get(name) if name is not None else None) if a not in used]
        if mesh_shape is not None:
            wanted = [a for a in wanted if a in mesh_shape]
        if shape is not None and mesh_shape is not None:
            kept: list[str] = []
            for a in wanted:
                if shape[dim] % (math.prod(mesh_shape[b] for b in kept) * mesh_shape[a]):
                    break
                kept.append(a)
            wanted = kept
        used.update(wanted)
        out.append(_pspec_entry(tuple(wanted)))
    return PartitionSpec(*out)


def param_shardings(spec_tree: dict, mesh: Mesh, rules: dict | None = None) -> dict:
    """NamedShardings for a ParamSpec tree, dimension sizes permitting (indivisible dims replicate)."""
    from omni_jax.nn.params import ParamSpec  # noqa: PLC0415

    def leaf(spec: ParamSpec):
        return NamedSharding(mesh, logical_to_pspec(spec.axes, rules, spec.shape, dict(mesh.shape)))

    return jax.tree.map(leaf, spec_tree, is_leaf=lambda x: isinstance(x, ParamSpec))


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Data batches: dimension `batch_dim` over (data, expert), the rest replicated.

    The batch must divide by data x expert; `shard_batch` falls back for batches that do not.
    """
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_batch(x, mesh: Mesh, batch_dim: int = 0) -> jax.Array:
    """`jax.device_put` of a host array with its batch dimension split as far as it divides
    (over (data, expert), else data, else replicated). A one-device mesh puts it on that device."""
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    axes = [None] * x.ndim
    axes[batch_dim] = "batch"
    return jax.device_put(x, NamedSharding(mesh, logical_to_pspec(tuple(axes), None, x.shape, dict(mesh.shape))))


def cache_sharding(mesh: Mesh, shape: tuple[int, ...], axes: tuple[str | None, ...] | None = None) -> NamedSharding:
    """KV cache (L, B, S_max, Hkv, D) sharding: batch over (data, expert), KV heads over tensor, as
    far as the sizes divide (a decode batch of 1 stays replicated)."""
    if axes is None:
        from omni_jax.nn.decoder import CACHE_AXES as axes  # noqa: PLC0415
    return NamedSharding(mesh, logical_to_pspec(tuple(axes), None, tuple(shape), dict(mesh.shape)))


# ----------------------------------------------------------------------------------- ambient mesh
def ambient_mesh():
    """The mesh set by `jax.set_mesh` (an AbstractMesh while tracing), or None when none is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def mesh_axis_size(axis: str, mesh=None) -> int:
    """Size of `axis` in `mesh` (default: the ambient mesh); 1 without a mesh or such an axis."""
    mesh = ambient_mesh() if mesh is None else mesh
    if mesh is None:
        return 1
    return dict(mesh.shape).get(axis, 1)


def use_mesh(mesh: Mesh | None):
    """`jax.set_mesh(mesh)` for a multi-device mesh; nothing for one device (or None), so that the
    single-device programs are traced exactly as without a mesh."""
    if mesh is None or mesh.size == 1:
        return contextlib.nullcontext()
    return jax.set_mesh(mesh)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` of an activation by logical axis names under the ambient mesh.

    Returns `x` itself (no op in the program) when no mesh is set or the mesh has one device.
    Dimensions the mesh axes do not divide are left replicated.
    """
    mesh = ambient_mesh()
    if mesh is None or mesh.size == 1:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} logical axes {logical_axes} for an array of shape {x.shape}")
    pspec = logical_to_pspec(tuple(logical_axes), LOGICAL_RULES, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, pspec)


def varying_axes(*arrays) -> tuple[str, ...]:
    """The manual mesh axes (inside `shard_map`) any of `arrays` varies over; () outside one.

    JAX 0.10 exposes them as `typeof(x).manual_axis_type.varying`, earlier releases as `typeof(x).vma`.
    """
    axes: set[str] = set()
    for a in arrays:
        aval = jax.typeof(a)
        mat = getattr(aval, "manual_axis_type", None)
        axes.update(mat.varying if mat is not None else getattr(aval, "vma", ()))
    return tuple(sorted(axes))
