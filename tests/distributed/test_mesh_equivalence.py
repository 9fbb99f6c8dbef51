"""Thinker logits and greedy generation on 8 simulated CPU devices equal the single-device result.

One subprocess (the pytest process already holds a 1-device JAX) builds the tiny thinker once with
host-side random parameters, runs it on one device, then places the same parameters on each mesh
(`param_shardings`, FSDP included) and runs `OmniModel.thinker_logits` and `generate` there: the
attention, MLP and vocabulary are split over `tensor`, the batch over (data, expert), and the MoE is
expert-parallel (shard_map + all-to-all) whenever the expert axis is > 1.
"""

import numpy as np
import pytest

from tests.distributed._multidevice import run_on_devices

MESHES = {
    "dp8": dict(data=8),
    "dp2_ep2_tp2": dict(data=2, expert=2, tensor=2),
    "ep4_tp2": dict(expert=4, tensor=2),
    "ep8": dict(expert=8),
    "fsdp8": dict(data=8, fsdp=True),
}

SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from omni_jax import sharding, thinker
from omni_jax.config import Runtime, preset
from omni_jax.model import OmniModel, model_specs
from omni_jax.nn import decoder
from omni_jax.nn.params import ParamSpec

MESHES = __MESHES__
config = preset("tiny").replace(talker_config=None, code2wav_config=None, enable_audio_output=False)
rt = Runtime(dtype="float32", param_dtype="float32")
rng = np.random.default_rng(0)

def host_init(spec):
    if spec.init == "normal":
        return (spec.std * 5 * rng.standard_normal(spec.shape)).astype(np.float32)
    return np.full(spec.shape, {"ones": 1.0, "zeros": 0.0}.get(spec.init, spec.value), np.float32)

specs = model_specs(config)
host = jax.tree.map(host_init, specs, is_leaf=lambda s: isinstance(s, ParamSpec))
ids = rng.integers(0, 500, (4, 37))
mask = np.ones_like(ids)
mask[1, :5] = 0
mask[3, :11] = 0

def run(mesh_cfg):
    if mesh_cfg is None:
        mesh, rules = sharding.make_mesh(devices=jax.devices()[:1]), sharding.rules()
    else:
        mesh, rules = sharding.mesh_and_rules(sharding.MeshConfig(**mesh_cfg))
    params = jax.device_put(host, sharding.param_shardings(specs, mesh, rules))
    model = OmniModel(config, params, rt, mesh)
    logits = model.thinker_logits(ids, mask)
    sequences = model.generate(ids, mask, max_new_tokens=6).sequences
    return model, logits, sequences

_, ref_logits, ref_seq = run(None)
scale = float(np.abs(ref_logits).max())
out = {"scale": scale, "ref_seq": ref_seq.tolist(), "meshes": {}}
for name, cfg in MESHES.items():
    model, logits, seq = run(cfg)
    diff = np.abs(logits - ref_logits)
    entry = {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale), "seq": seq.tolist()}
    if name == "dp2_ep2_tp2":
        # The constraints take effect: logits split over vocab, caches over batch and KV heads.
        with jax.set_mesh(model.mesh):
            p = model.params["thinker"]
            def forward(p, i, m):
                pos = jnp.zeros((3, *i.shape), jnp.float32)
                return thinker.forward(p, i, m, pos, config.thinker_config, rt).logits
            lg = jax.jit(forward)(p, ids[:, :32], mask[:, :32])
            dims = thinker.text_dims(config.thinker_config)
            def prefill(p, i, m):
                cache = decoder.init_cache(dims, i.shape[0], 48, jnp.float32)
                x = thinker.embed_tokens(p, i, jnp.float32)
                return decoder.prefill(p["model"], x, jnp.zeros((3, *i.shape), jnp.float32), m, dims, rt,
                                       cache=cache).cache
            cache = jax.jit(prefill)(p, ids[:, :32], mask[:, :32])
        def as_list(x):
            spec = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
            return spec + [None] * (x.ndim - len(spec))
        entry["logits_spec"] = as_list(lg)
        entry["cache_spec"] = as_list(cache.k)
        entry["cache_shard_shape"] = list(cache.k.addressable_shards[0].data.shape)
    out["meshes"][name] = entry
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    return run_on_devices(SCRIPT.replace("__MESHES__", repr(MESHES)), num_devices=8)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_logits_equal_single_device(results, mesh):
    entry = results["meshes"][mesh]
    assert entry["max_rel"] <= 1e-5, f"{mesh}: max |diff| {entry['max_abs']:.3g} of scale {results['scale']:.3g}"


@pytest.mark.parametrize("mesh", list(MESHES))
def test_greedy_generation_equal_single_device(results, mesh):
    ref = np.asarray(results["ref_seq"])
    assert ref.shape == (4, 37 + 6)
    np.testing.assert_array_equal(np.asarray(results["meshes"][mesh]["seq"]), ref)


def test_logits_vocab_parallel_and_cache_sharded(results):
    entry = results["meshes"]["dp2_ep2_tp2"]
    assert entry["logits_spec"] == [["data", "expert"], None, "tensor"]
    assert entry["cache_spec"] == [None, ["data", "expert"], None, "tensor", None]
    # (L, B, S_max, Hkv, D) = (3, 4, 48, 2, 16): B over 4 devices, the 2 KV heads over 2.
    assert entry["cache_shard_shape"] == [3, 1, 48, 1, 16]
