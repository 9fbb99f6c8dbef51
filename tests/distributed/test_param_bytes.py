"""Per-device parameter bytes on 8 simulated CPU devices: each tensor's shard holds total / shard count.

The whole tiny model (thinker with its encoders, talker, code predictor, Code2Wav) is placed with
`param_shardings` on several meshes; for every tensor, every device's shard must hold exactly
1 / (product of the mesh axes in its PartitionSpec) of it, and every dimension whose logical axis
maps to a mesh axis that divides it (and that no earlier dimension took) must be split.
"""

import pytest

from tests.distributed._multidevice import run_on_devices

MESHES = {
    "dp2_ep2_tp2": dict(data=2, expert=2, tensor=2),
    "ep4_tp2": dict(expert=4, tensor=2),
    "ep8": dict(expert=8),
    "fsdp8": dict(data=8, fsdp=True),
    "fsdp2_ep2_tp2": dict(data=2, expert=2, tensor=2, fsdp=True),
}

SCRIPT = r"""
import json, math
import jax, numpy as np
from omni_jax import sharding
from omni_jax.config import preset
from omni_jax.model import model_specs
from omni_jax.nn.params import ParamSpec, flatten

MESHES = __MESHES__
specs = model_specs(preset("tiny"))
flat_specs = flatten(specs)
host = {k: np.zeros(s.shape, np.float32) for k, s in flat_specs.items()}
out = {"meshes": {}}
for name, cfg in MESHES.items():
    mesh, rules = sharding.mesh_and_rules(sharding.MeshConfig(**cfg))
    shardings = flatten(sharding.param_shardings(specs, mesh, rules))
    sizes = dict(mesh.shape)
    bad_bytes, unsplit, per_device = [], [], {d.id: 0 for d in mesh.devices.flat}
    text_per_device = {d.id: 0 for d in mesh.devices.flat}
    text_counts = {}
    for key, spec in flat_specs.items():
        arr = jax.device_put(host[key], shardings[key])
        pspec = arr.sharding.spec
        axes = [a for entry in pspec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        count = math.prod(sizes[a] for a in axes)
        is_text = key.startswith(("thinker/model/", "thinker/lm_head/"))
        if is_text:
            text_counts[key] = count
        shards = arr.addressable_shards
        if len(shards) != 8 or any(s.data.nbytes * count != arr.nbytes for s in shards):
            bad_bytes.append((key, str(pspec), [s.data.nbytes for s in shards], arr.nbytes))
        for s in shards:
            per_device[s.device.id] += s.data.nbytes
            if is_text:
                text_per_device[s.device.id] += s.data.nbytes
        used = set(axes)
        for dim, logical in enumerate(spec.axes):
            want = rules.get(logical) if logical else None
            for a in ((want,) if isinstance(want, str) else (want or ())):
                taken = pspec[dim] if dim < len(pspec) else None
                taken = () if taken is None else ((taken,) if isinstance(taken, str) else taken)
                if a in taken:
                    continue
                if a not in used and sizes[a] > 1 and spec.shape[dim] % sizes[a] == 0 and not taken:
                    unsplit.append((key, dim, a, spec.shape))
    out["meshes"][name] = {
        "bad_bytes": bad_bytes, "unsplit": unsplit, "total": sum(a.nbytes for a in host.values()),
        "per_device": sorted(set(per_device.values())),
        "text_total": sum(host[k].nbytes for k in text_counts),
        "text_per_device": sorted(set(text_per_device.values())),
        "text_matrices_count": sorted({c for k, c in text_counts.items() if host[k].ndim >= 3}),
        "expert_stacks_count": sorted({c for k, c in text_counts.items() if "/experts/" in k}),
    }

# Multi-slice on CPU (no slice_index): the data axis's outer part plays the slices, a plain reshape.
m = sharding.mesh_from_config(sharding.MeshConfig(data=4, tensor=2, dcn_data=2))
out["dcn_mesh"] = {"shape": list(m.devices.shape), "ids": [d.id for d in m.devices.flat]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    return run_on_devices(SCRIPT.replace("__MESHES__", repr(MESHES)), num_devices=8)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_shards_hold_total_over_shard_count(results, mesh):
    r = results["meshes"][mesh]
    assert r["bad_bytes"] == [], r["bad_bytes"][:5]
    assert r["unsplit"] == [], r["unsplit"][:5]
    assert len(r["per_device"]) == 1, r["per_device"]  # every device holds the same bytes


def test_fsdp_splits_every_text_decoder_matrix(results):
    # FSDP over 8 data devices: each stacked text-decoder matrix (L, ..., embed, ...) is split 8 ways
    # on `embed` (64 divides by 8); only the 1-D norm scales and the (L, 16) q/k norms stay whole.
    r = results["meshes"]["fsdp8"]
    assert r["text_matrices_count"] == [8], r
    assert r["text_per_device"][0] < r["text_total"] / 8 * 1.02, r
    # On (2, 2, 2) with FSDP the expert stacks are split over all 8 devices: expert x embed x mlp.
    assert results["meshes"]["fsdp2_ep2_tp2"]["expert_stacks_count"] == [8]
    assert results["meshes"]["dp2_ep2_tp2"]["expert_stacks_count"] == [4]  # expert x mlp, no FSDP


def test_dcn_mesh_on_cpu_is_data_major(results):
    assert results["dcn_mesh"] == {"shape": [4, 1, 2], "ids": list(range(8))}
