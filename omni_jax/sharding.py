"""Meshes and the one table that maps logical axis names onto mesh axes.

Every parameter and cache declares logical axes (`nn/params.py`); `LOGICAL_RULES` maps them onto
the mesh axes `data`, `expert`, `tensor`. A single device is the mesh (1, 1, 1): the same code path
runs everywhere.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["MESH_AXES", "LOGICAL_RULES", "make_mesh", "logical_to_pspec", "param_shardings", "default_mesh"]

MESH_AXES = ("data", "expert", "tensor")

# logical axis -> mesh axis (or None: replicated). FSDP adds `data` to `embed` (see `fsdp_rules`).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": "data",
    "layers": None,
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "cache_seq": None,
}


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, expert, tensor) mesh over `devices` (default: all local devices, which must match)."""
    devices = jax.devices() if devices is None else devices
    need = data * expert * tensor
    if need != len(devices):
        raise ValueError(
            f"mesh data={data} x expert={expert} x tensor={tensor} = {need} devices, but {len(devices)} "
            "are available; choose axis sizes whose product is the device count"
        )
    return Mesh(np.asarray(devices).reshape(data, expert, tensor), MESH_AXES)


def default_mesh() -> Mesh:
    return make_mesh(devices=jax.devices()[:1])


def logical_to_pspec(axes: tuple[str | None, ...], rules: dict | None = None) -> PartitionSpec:
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name in axes:
        mesh_axis = rules.get(name) if name is not None else None
        # A mesh axis may shard only one dimension of a tensor.
        if mesh_axis is not None and mesh_axis in used:
            mesh_axis = None
        if mesh_axis is not None:
            used.add(mesh_axis)
        out.append(mesh_axis)
    return PartitionSpec(*out)


def param_shardings(spec_tree: dict, mesh: Mesh, rules: dict | None = None) -> dict:
    """NamedShardings for a ParamSpec tree, dimension sizes permitting (indivisible dims replicate)."""
    from omni_jax.nn.params import ParamSpec  # noqa: PLC0415

    def leaf(spec: ParamSpec):
        pspec = list(logical_to_pspec(spec.axes, rules))
        for i, mesh_axis in enumerate(pspec):
            if mesh_axis is not None and spec.shape[i] % mesh.shape[mesh_axis]:
                pspec[i] = None
        return NamedSharding(mesh, PartitionSpec(*pspec))

    return jax.tree.map(leaf, spec_tree, is_leaf=lambda x: isinstance(x, ParamSpec))
