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


# --------------------------------------------------------------------------------------------------
# The Pallas attention kernel (interpret mode on CPU) inside its shard_map equals the XLA path.
ATTENTION_MESHES = [(2, 2, 2), (8, 1, 1), (1, 4, 2), (1, 1, 8)]

ATTENTION_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from omni_jax import sharding
from omni_jax.nn import attention as attn

B, S, HQ, HKV, D = 8, 32, 4, 2, 16
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((B, S, h, D)), jnp.float32) for h in (HQ, HKV, HKV))
seg = np.ones((B, S), np.int32)
seg[1, :5] = 0
seg[6, :11] = 0
seg = jnp.asarray(seg)
probe = jnp.asarray(rng.standard_normal((B, S, HQ, D)), jnp.float32)
CASES = {"causal_segments": dict(segment_ids=seg, causal=True), "window": dict(window=(5, 3))}

def loss(q, k, v, impl, kw):
    return jnp.sum(attn.self_attention(q, k, v, impl=impl, **kw) * probe)

def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())

out = {}
for shape in __MESHES__:
    mesh = sharding.make_mesh(*shape)
    put = lambda x, axes: jax.device_put(x, NamedSharding(mesh, sharding.logical_to_pspec(
        axes, None, x.shape, dict(mesh.shape))))
    qs = put(q, ("batch", "seq", "q_heads", "head_dim"))
    ks, vs = (put(x, ("batch", "seq", "kv_heads", "head_dim")) for x in (k, v))
    for name, kw in CASES.items():
        ref = attn.self_attention(q, k, v, impl="xla", **kw)
        ref_g = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "xla", kw)
        with jax.set_mesh(mesh):
            f = jax.jit(lambda q, k, v: attn.self_attention(q, k, v, impl="pallas_interpret", **kw))
            y = f(qs, ks, vs)
            jaxpr = str(jax.make_jaxpr(f)(qs, ks, vs))
            g = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, "pallas_interpret", kw), argnums=(0, 1, 2)))(qs, ks, vs)
        spec = [list(a) if isinstance(a, tuple) else a for a in y.sharding.spec]
        out[f"{shape} {name}"] = {"y": rel(y, ref), "grad": max(rel(a, b) for a, b in zip(g, ref_g)),
                                  "spec": spec + [None] * (4 - len(spec)), "shard_map": "shard_map" in jaxpr}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def attention_results():
    return run_on_devices(ATTENTION_SCRIPT.replace("__MESHES__", repr(ATTENTION_MESHES)), num_devices=8)


@pytest.mark.parametrize("mesh", ATTENTION_MESHES)
def test_pallas_attention_sharded_equals_xla(attention_results, mesh):
    """Batch rows over (data, expert) and heads over tensor, as far as they divide (B=8, Hkv=2)."""
    for case in ("causal_segments", "window"):
        r = attention_results[f"{mesh} {case}"]
        assert r["shard_map"], f"{mesh} {case}: the kernel is not inside a shard_map"
        assert r["y"] <= 1e-5 and r["grad"] <= 1e-5, f"{mesh} {case}: {r}"
        # Size-1 mesh axes stay named in the spec; a tensor axis of 8 does not divide the 2 KV heads.
        want_heads = None if mesh[2] == 8 else "tensor"
        assert r["spec"] == [["data", "expert"], None, want_heads, None], f"{mesh} {case}: {r['spec']}"
