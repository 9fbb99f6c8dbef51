"""Mesh configuration, the logical-axis rule table, and `constrain` (single process, one device).

Multi-device numerics are in tests/distributed/ (8 simulated devices in a subprocess); here the
rules are checked on their own, and programs are *traced* under an abstract 8-device mesh to see
the constraints and the expert-parallel exchange they contain.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from omni_jax import sharding
from omni_jax.config import ConfigError, Runtime
from omni_jax.nn import expert_parallel as ep
from omni_jax.nn.moe import moe_forward
from omni_jax.nn.params import ParamSpec

SIZES_222 = {"data": 2, "expert": 2, "tensor": 2}


def abstract_mesh(data=2, expert=2, tensor=2):
    return AbstractMesh((data, expert, tensor), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_mesh_config():
    cfg = sharding.MeshConfig.from_dict({"data": 4, "tensor": 2, "fsdp": True, "dcn_data": 2})
    assert (cfg.data, cfg.expert, cfg.tensor, cfg.fsdp, cfg.dcn_data, cfg.num_devices) == (4, 1, 2, True, 2, 8)
    assert sharding.MeshConfig.from_dict(cfg.to_dict()) == cfg
    assert sharding.MeshConfig.from_dict(None) == sharding.MeshConfig()
    with pytest.raises(ValueError, match="unknown mesh keys"):
        sharding.MeshConfig.from_dict({"model": 2})
    with pytest.raises(ValueError, match="dcn_data"):
        sharding.MeshConfig(data=3, dcn_data=2)
    with pytest.raises(ValueError, match=">= 1"):
        sharding.MeshConfig(tensor=0)


def test_make_mesh_one_device_and_errors():
    mesh = sharding.mesh_from_config(sharding.MeshConfig())
    assert dict(mesh.shape) == {"data": 1, "expert": 1, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="2 devices, but 1"):
        sharding.make_mesh(data=2)
    m, r = sharding.mesh_and_rules(sharding.MeshConfig(fsdp=True))
    assert m.size == 1 and r["embed"] == "data"
    m, r = sharding.mesh_and_rules(None)
    assert m.size == 1 and r == sharding.LOGICAL_RULES


def test_rules():
    assert sharding.rules()["embed"] is None and sharding.rules(fsdp=True)["embed"] == "data"
    assert sharding.LOGICAL_RULES["embed"] is None  # the default table is not modified
    assert sharding.rules()["batch"] == ("data", "expert")
    assert sharding.rules()["vocab"] == sharding.rules()["q_heads"] == sharding.rules()["mlp"] == "tensor"


def test_logical_to_pspec_one_dim_per_mesh_axis_and_divisibility():
    fsdp = sharding.rules(fsdp=True)
    expert_stack = (("layers", "expert", "embed", "mlp"), (3, 8, 64, 32))
    assert sharding.logical_to_pspec(*expert_stack[:1], fsdp, expert_stack[1], SIZES_222) == P(
        None, "expert", "data", "tensor")
    # A mesh axis shards only the first dimension that asks for it.
    assert sharding.logical_to_pspec(("batch", "seq", "embed"), fsdp, (4, 8, 64), SIZES_222) == P(
        ("data", "expert"), None, None)
    # The batch keeps the longest prefix of (data, expert) that divides it.
    assert sharding.logical_to_pspec(("batch", None), None, (2, 3), SIZES_222) == P("data", None)
    assert sharding.logical_to_pspec(("batch", None), None, (3, 3), SIZES_222) == P(None, None)
    # Indivisible dims replicate; axes the mesh lacks are dropped.
    assert sharding.logical_to_pspec(("kv_heads",), None, (3,), SIZES_222) == P(None)
    assert sharding.logical_to_pspec(("batch", "vocab"), None, (4, 8), {"data": 4}) == P("data", None)
    # Without shapes: the plain table.
    assert sharding.logical_to_pspec(("vocab", "embed")) == P("tensor", None)


def test_param_shardings_one_device():
    specs = {"w": ParamSpec((8, 6), ("embed", "vocab")), "n": ParamSpec((6,), (None,))}
    mesh = sharding.default_mesh()
    out = sharding.param_shardings(specs, mesh, sharding.rules(fsdp=True))
    assert out["w"].mesh == mesh and out["n"].spec == P(None)
    assert out["w"].spec == P("data", "tensor")  # size-1 axes divide everything: harmless


def test_batch_and_cache_shardings():
    mesh = sharding.default_mesh()
    assert sharding.batch_sharding(mesh, 3, batch_dim=1).spec == P(None, ("data", "expert"), None)
    x = sharding.shard_batch(np.arange(6).reshape(2, 3), mesh)
    assert isinstance(x, jax.Array) and x.sharding.mesh == mesh
    from omni_jax.nn.decoder import CACHE_AXES

    assert sharding.logical_to_pspec(CACHE_AXES, None, (3, 4, 48, 2, 16), SIZES_222) == P(
        None, ("data", "expert"), None, "tensor", None)
    assert sharding.logical_to_pspec(CACHE_AXES, None, (3, 1, 48, 3, 16), SIZES_222) == P(None, None, None, None, None)
    assert sharding.cache_sharding(mesh, (3, 4, 48, 2, 16)).mesh == mesh


def test_constrain_is_a_no_op_without_a_multi_device_mesh():
    x = jnp.ones((4, 3, 8))
    assert sharding.constrain(x, ("batch", None, "vocab")) is x
    with jax.set_mesh(sharding.default_mesh()):
        assert sharding.constrain(x, ("batch", None, "vocab")) is x
    jaxpr = jax.make_jaxpr(lambda x: sharding.constrain(x, ("batch", None, "vocab")))(x)
    assert "sharding_constraint" not in str(jaxpr)
    assert sharding.use_mesh(sharding.default_mesh()).__class__.__name__ == "nullcontext"


def test_constrain_under_an_abstract_mesh():
    with jax.sharding.use_abstract_mesh(abstract_mesh()):
        assert sharding.ambient_mesh() is not None and sharding.mesh_axis_size("expert") == 2
        jaxpr = str(jax.make_jaxpr(lambda x: sharding.constrain(x, ("batch", None, "vocab")))(jnp.ones((4, 3, 8))))
        # Odd batch: the batch dim replicates, the vocab dim still splits.
        odd = str(jax.make_jaxpr(lambda x: sharding.constrain(x, ("batch", None, "vocab")))(jnp.ones((3, 3, 8))))
        with pytest.raises(ValueError, match="logical axes"):
            sharding.constrain(jnp.ones((4, 3)), ("batch",))
    assert "spec=P(('data', 'expert'), None, 'tensor')" in jaxpr
    assert "spec=P(None, None, 'tensor')" in odd
    assert sharding.ambient_mesh() is None and sharding.mesh_axis_size("expert") == 1


def _moe_params(num_experts=8, layers=None):
    rng = np.random.default_rng(0)
    lead = () if layers is None else (layers,)
    n = lambda *s: jnp.asarray(0.2 * rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {"gate": {"kernel": n(16, num_experts)},
            "experts": {"gate_proj": n(*lead, num_experts, 16, 8), "up_proj": n(*lead, num_experts, 16, 8),
                        "down_proj": n(*lead, num_experts, 8, 16)}}


def test_moe_traces_expert_parallel_under_a_mesh():
    params = _moe_params(layers=2)
    x = jnp.ones((2, 5, 16))
    fn = lambda p, x: moe_forward(x, p, top_k=2, norm_topk_prob=True, layer=1)  # noqa: E731
    assert "all_to_all" not in str(jax.make_jaxpr(fn)(params, x))
    with jax.sharding.use_abstract_mesh(abstract_mesh()):
        jaxpr = str(jax.make_jaxpr(fn)(params, x))
        none = str(jax.make_jaxpr(lambda p, x: moe_forward(x, p, top_k=2, norm_topk_prob=True, layer=1,
                                                           expert_parallel="none"))(params, x))
        # 6 experts do not divide over expert=4: the XLA-partitioned path.
        with jax.sharding.use_abstract_mesh(abstract_mesh(1, 4, 2)):
            assert not ep.can_expert_parallel(6)
            assert ep.can_expert_parallel(8)
    assert "shard_map" in jaxpr and "all_to_all" in jaxpr and "psum" in jaxpr  # psum: mlp split over tensor
    assert "shard_map" not in none


def test_moe_auto_without_mesh_is_the_grouped_path():
    params = _moe_params()
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    auto = moe_forward(x, params, top_k=2, norm_topk_prob=True)
    none = moe_forward(x, params, top_k=2, norm_topk_prob=True, expert_parallel="none")
    np.testing.assert_array_equal(np.asarray(auto[0]), np.asarray(none[0]))
    with pytest.raises(ValueError, match="expert_parallel"):
        moe_forward(x, params, top_k=2, norm_topk_prob=True, expert_parallel="all")
    with pytest.raises(ValueError, match="ambient mesh"):
        ep.expert_parallel_moe(x.reshape(14, 16), params, top_k=2, norm_topk_prob=True)


def test_expert_capacity():
    assert ep.expert_capacity(28, 2, 8, None) == 28  # dropless: a token picks an expert at most once
    assert ep.expert_capacity(28, 2, 8, 1.0) == 7
    assert ep.expert_capacity(28, 2, 8, 0.5) == 4  # ceil(3.5)
    assert ep.expert_capacity(28, 2, 8, 100.0) == 28
    assert ep.expert_capacity(1, 2, 128, 0.01) == 1
    assert ep.resolve_exchange("auto") == ("ragged" if jax.default_backend() in ("gpu", "tpu") else "dense")
    with pytest.raises(ValueError, match="exchange"):
        ep.resolve_exchange("allgather")


def test_runtime_fields():
    rt = Runtime()
    assert rt.expert_parallel == "auto" and rt.expert_capacity_factor is None
    assert Runtime(expert_capacity_factor=1.25).expert_capacity_factor == 1.25
    with pytest.raises(ConfigError, match="expert_parallel"):
        Runtime(expert_parallel="always")
    with pytest.raises(ConfigError, match="expert_capacity_factor"):
        Runtime(expert_capacity_factor=0.0)
