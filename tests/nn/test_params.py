"""`init_params_host`: host-drawn random parameters, independent of sharding and of the block size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax.nn import params as params_lib
from omni_jax.nn.params import ParamSpec, flatten, init_params_host

SPECS = {
    "embed": {"weight": ParamSpec((37, 8), ("vocab", "embed"), std=0.5)},
    "layers": {"kernel": ParamSpec((3, 8, 6), ("layers", "embed", "mlp"), std=0.02)},
    "norm": {"weight": ParamSpec((8,), ("embed",), init="ones")},
    "bias": {"bias": ParamSpec((6,), ("mlp",), init="constant", value=0.25)},
    "scalar": ParamSpec((), (), std=1.0),
}


def test_draws_have_the_declared_scale_and_constants():
    p = flatten(init_params_host(SPECS, seed=0))
    assert p["embed/weight"].shape == (37, 8) and p["embed/weight"].dtype == jnp.float32
    assert 0.35 < float(jnp.std(p["embed/weight"])) < 0.65
    np.testing.assert_array_equal(p["norm/weight"], np.ones(8, np.float32))
    np.testing.assert_array_equal(p["bias/bias"], np.full(6, 0.25, np.float32))
    assert p["scalar"].shape == ()


def test_seeds_and_paths_give_different_values_and_a_seed_repeats():
    a = flatten(init_params_host(SPECS, seed=0))
    b = flatten(init_params_host(SPECS, seed=0))
    c = flatten(init_params_host(SPECS, seed=1))
    np.testing.assert_array_equal(a["embed/weight"], b["embed/weight"])
    assert not np.array_equal(a["embed/weight"], c["embed/weight"])
    assert not np.allclose(a["layers/kernel"][0], a["layers/kernel"][1])


def test_values_do_not_depend_on_the_block_size(monkeypatch):
    """A shard is drawn block by block; the block size must only change which rows share a seed,
    so pin the property that matters: drawing rows [s, t) equals slicing the whole leaf."""
    spec = SPECS["embed"]["weight"]
    monkeypatch.setattr(params_lib, "_HOST_INIT_BLOCK_ELEMENTS", 8 * 5)  # 5-row blocks
    whole = params_lib._host_rows(spec, 0, "embed/weight", 0, 37)
    for start, stop in ((0, 37), (3, 11), (10, 15), (36, 37)):
        np.testing.assert_array_equal(params_lib._host_rows(spec, 0, "embed/weight", start, stop), whole[start:stop])


def test_sharded_leaves_equal_unsharded_ones():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("x", "y"))
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, PartitionSpec(*([None] * len(s.shape)))), SPECS,
        is_leaf=lambda s: isinstance(s, ParamSpec),
    )
    plain = flatten(init_params_host(SPECS, seed=4, dtype=jnp.bfloat16))
    sharded = flatten(init_params_host(SPECS, seed=4, dtype=jnp.bfloat16, shardings=shardings))
    for path in plain:
        assert sharded[path].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(sharded[path]), np.asarray(plain[path]))


@pytest.mark.parametrize("bad", ["uniform"])
def test_unknown_initialiser_is_an_error(bad):
    with pytest.raises(ValueError, match="uniform"):
        init_params_host({"w": ParamSpec((2,), ("embed",), init=bad)}, seed=0)
