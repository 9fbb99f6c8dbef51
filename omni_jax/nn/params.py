"""Parameter declarations: shapes, logical axes and initialisers, as a pytree of `ParamSpec`s.

A component declares its parameters once, as a nested dict of `ParamSpec` whose key paths mirror
the PyTorch checkpoint's module names (`model/layers/self_attn/q_proj/kernel`). From that one tree
we get real parameters (`init_params`), abstract ones for compile-only checks (`abstract_params`),
the logical axis names that `sharding.py` maps onto the mesh (`logical_axes`), and the key list that
the converter checks a checkpoint against. Decoder layers are stacked on a leading `layers` axis so
that they can be scanned.

Naming convention (the only transforms the converter applies):
  * `kernel`: a PyTorch `nn.Linear.weight` transposed to (in, out).
  * `weight`, `bias`: as in PyTorch (norm scales, embeddings, biases).
  * expert tensors `experts/{gate_proj,up_proj,down_proj}`: the per-expert PyTorch weights stacked
    on a leading expert axis and transposed to (expert, in, out).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ParamSpec", "init_params", "init_params_host", "abstract_params", "logical_axes", "flatten", "unflatten", "stack_layers"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: shape, one logical axis name per dimension, and how to initialise it.

    init: "normal" (std `std`), "ones", "zeros", or "constant" (filled with `value`).
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"
    std: float = 0.02
    value: float = 0.0

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ParamSpec shape {self.shape} and axes {self.axes} differ in rank")


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def flatten(tree: dict, sep: str = "/") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out: dict[str, Any] = {}

    def rec(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                rec(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            out[prefix] = node

    rec(tree, "")
    return out


def unflatten(flat: dict[str, Any], sep: str = "/") -> dict:
    """{"a/b/c": leaf} -> nested dict."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def stack_layers(spec_tree: dict, num_layers: int) -> dict:
    """Adds a leading `layers` axis of size `num_layers` to every spec in the tree."""
    return jax.tree.map(
        lambda s: dataclasses.replace(s, shape=(num_layers, *s.shape), axes=("layers", *s.axes)),
        spec_tree,
        is_leaf=_is_spec,
    )


def _init_leaf(spec: ParamSpec, key, dtype) -> jax.Array:
    if spec.init == "normal":
        return (spec.std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    if spec.init == "constant":
        return jnp.full(spec.shape, spec.value, dtype)
    raise ValueError(f"unknown initialiser {spec.init!r}")


def init_params(spec_tree: dict, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters for `spec_tree`. Each leaf's key is derived from its path, so adding a
    parameter elsewhere does not change the others."""
    flat = flatten(spec_tree)
    out = {}
    for path, spec in flat.items():
        leaf_key = jax.random.fold_in(key, np.uint32(hash_path(path)))
        out[path] = _init_leaf(spec, leaf_key, dtype)
    return unflatten(out)


# Rows of a leaf drawn per seed: fixed by the leaf's shape alone, so the values do not depend on
# how the leaf is sharded, and a shard is drawn without drawing the whole leaf.
_HOST_INIT_BLOCK_ELEMENTS = 1 << 22


def _host_block_rows(shape: tuple[int, ...]) -> int:
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return max(1, _HOST_INIT_BLOCK_ELEMENTS // max(row, 1))


def _host_rows(spec: ParamSpec, seed: int, path: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) along axis 0 of the leaf `path` as float32 (the whole leaf for rank 0)."""
    if spec.init != "normal":
        value = {"ones": 1.0, "zeros": 0.0, "constant": spec.value}.get(spec.init)
        if value is None:
            raise ValueError(f"unknown initialiser {spec.init!r} for {path}")
        shape = (stop - start, *spec.shape[1:]) if spec.shape else ()
        return np.full(shape, value, np.float32)
    if not spec.shape:
        return np.float32(spec.std) * np.random.default_rng([seed, hash_path(path)]).standard_normal((), np.float32)
    block = _host_block_rows(spec.shape)
    parts = []
    for b in range(start // block, -(-stop // block)):
        lo, hi = b * block, min((b + 1) * block, spec.shape[0])
        rng = np.random.default_rng([seed, hash_path(path), b])
        rows = rng.standard_normal((hi - lo, *spec.shape[1:]), np.float32)
        parts.append(rows[max(start, lo) - lo: min(stop, hi) - lo])
    return np.float32(spec.std) * np.concatenate(parts, axis=0)


def init_params_host(spec_tree: dict, seed: int, dtype=jnp.float32, shardings: dict | None = None) -> dict:
    """Random parameters for `spec_tree` drawn with numpy on the host, one shard at a time.

    The same values whatever `shardings` is (a tree of `jax.sharding.Sharding` matching
    `spec_tree`, or None for the default device): each leaf is drawn in fixed blocks of rows, seeded
    by (seed, path, block). Unlike `init_params` this compiles nothing: jitting hundreds of
    threefry draws took minutes on a small CPU for the tiny preset. Values differ from `init_params`.
    """
    flat = flatten(spec_tree)
    flat_shardings = flatten(shardings) if shardings is not None else {}
    np_dtype = np.dtype(jnp.dtype(dtype))
    out = {}
    for path, spec in flat.items():
        sharding = flat_shardings.get(path)

        def shard(index, spec=spec, path=path):
            if not spec.shape:
                return _host_rows(spec, seed, path, 0, 1).astype(np_dtype)
            first = index[0] if index else slice(None)
            start, stop, _ = first.indices(spec.shape[0])
            rows = _host_rows(spec, seed, path, start, stop)
            return rows[(slice(None), *index[1:])].astype(np_dtype)

        if sharding is None:
            out[path] = jnp.asarray(shard(tuple(slice(None) for _ in spec.shape)))
        else:
            out[path] = jax.make_array_from_callback(spec.shape, sharding, shard)
    return unflatten(out)


def hash_path(path: str) -> int:
    """A stable 31-bit hash of a parameter path (Python's `hash` is salted per process)."""
    h = 2166136261
    for ch in path.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h & 0x7FFFFFFF


def abstract_params(spec_tree: dict, dtype=jnp.bfloat16, sharding_fn: Callable | None = None) -> dict:
    """`jax.ShapeDtypeStruct`s for `spec_tree` (optionally with shardings), for compile-only checks."""

    def leaf(spec):
        sharding = sharding_fn(spec.axes) if sharding_fn else None
        return jax.ShapeDtypeStruct(spec.shape, dtype, sharding=sharding)

    return jax.tree.map(leaf, spec_tree, is_leaf=_is_spec)


def logical_axes(spec_tree: dict) -> dict:
    """The logical axis names of every parameter, as a pytree of tuples matching the params."""
    return jax.tree.map(lambda s: s.axes, spec_tree, is_leaf=_is_spec)


def param_count(spec_tree: dict) -> int:
    return sum(int(np.prod(s.shape)) for s in flatten(spec_tree).values())
