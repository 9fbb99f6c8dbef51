"""Sharded checkpoint loading reads only the slices each process's devices own (issue 5, items 2 and 6).

The tiny preset with talker and Code2Wav, saved by the reference twice: `save_pretrained` (hub layout,
one tensor per expert, fp32) and its transformers-5 state dict (fused `gate_up_proj`, cast to bf16 so
that the load also casts). Multi-device checks run in subprocesses on simulated CPU devices (the
pytest process already has one device): this file is also the subprocess's script.

  * one process, 8 devices, mesh (data 2, expert 2, tensor 2): experts over `expert`, heads and MLP
    columns over `tensor`, replicated over `data`. Every array equals the one-device load exactly and
    has the requested sharding; the bytes read equal the bytes of the distinct shards (a shard that
    two data-parallel devices share is read once), each device's reads are its shards' bytes only,
    and each device read only its own experts' keys.
  * two processes joined with `jax.distributed`, 4 devices each, mesh (1, 4, 2): each process reads
    the bytes of its own devices' distinct shards, the two together read the model exactly once
    (disjoint halves of every expert tensor), and each process's shards equal the one-device load.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERT_PARAMS = ("thinker/model/layers/mlp/experts/", "talker/model/layers/mlp/experts/")


# ------------------------------------------------------------------------------ subprocess side
def _source_itemsize(folder: str) -> int:
    from convert.hf_to_jax import list_safetensors, read_headers

    sizes = {info.dtype.itemsize for info in read_headers(list_safetensors(folder)).values()}
    assert len(sizes) == 1, sizes
    return sizes.pop()


def _expected_bytes(specs_flat, shardings_flat, itemsize, device_ids=None):
    """Independently of the loader: (bytes of the distinct shards the given devices hold, per device bytes)."""
    distinct, per_device = 0, {}
    for path, spec in specs_flat.items():
        seen = set()
        for device, index in shardings_flat[path].devices_indices_map(spec.shape).items():
            if device_ids is not None and device.id not in device_ids:
                continue
            bounds = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, spec.shape))
            nbytes = int(np.prod([s.stop - s.start for s in bounds], dtype=np.int64)) * itemsize
            per_device[device.id] = per_device.get(device.id, 0) + nbytes
            key = tuple((s.start, s.stop) for s in bounds)
            if key not in seen:
                seen.add(key)
                distinct += nbytes
    return distinct, per_device


def _owned_experts(sharding, shape, device_id):
    for device, index in sharding.devices_indices_map(shape).items():
        if device.id == device_id:
            return set(range(*index[1].indices(shape[1])[:2]))
    raise AssertionError(device_id)


def _load_everywhere(folder: str, mesh_shape, devices=None) -> dict:
    """Loads `folder` sharded over `mesh_shape` and on one local device; checks and accounts them."""
    import jax

    from convert.hf_to_jax import ReadLog, convert_checkpoint
    from omni_jax import sharding
    from omni_jax.config import load_config
    from omni_jax.model import model_specs
    from omni_jax.nn.params import flatten

    config = load_config(folder)
    specs = flatten(model_specs(config))
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    shardings = sharding.param_shardings(model_specs(config), mesh)
    flat_shardings = flatten(shardings)
    # The layout under test: experts over `expert`, attention heads over `tensor`.
    for prefix in EXPERT_PARAMS:
        assert flat_shardings[prefix + "gate_proj"].spec[1] == "expert", flat_shardings[prefix + "gate_proj"]
    assert "tensor" in flat_shardings["thinker/model/layers/self_attn/q_proj/kernel"].spec

    one_log = ReadLog()
    single = flatten(convert_checkpoint(folder, config, dtype="float32", read_log=one_log,
                                        shardings=sharding.param_shardings(
                                            model_specs(config), sharding.make_mesh(devices=jax.local_devices()[:1]))))
    log = ReadLog()
    sharded = flatten(convert_checkpoint(folder, config, dtype="float32", shardings=shardings, read_log=log))

    itemsize = _source_itemsize(folder)
    local_ids = {d.id for d in jax.local_devices()}
    model_bytes = sum(int(np.prod(s.shape)) * itemsize for s in specs.values())
    distinct, per_device = _expected_bytes(specs, flat_shardings, itemsize, local_ids)
    assert one_log.total_bytes == model_bytes
    assert log.total_bytes == distinct, (log.total_bytes, distinct)
    by_device = log.bytes_by_device()
    assert by_device == per_device, (by_device, per_device)

    # Values and shardings: each addressable shard equals the one-device load's slice, exactly.
    compared = 0
    for path, array in sharded.items():
        assert array.sharding == flat_shardings[path], path
        assert array.shape == specs[path].shape and array.dtype == np.float32
        whole = np.asarray(single[path])
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index], err_msg=path)
            compared += 1

    # Experts: a device read the keys (hub) or expert rows (fused) of its own experts only.
    for prefix in EXPERT_PARAMS:
        for name in ("gate_proj", "up_proj", "down_proj"):
            path = prefix + name
            for d in local_ids:
                owned = _owned_experts(flat_shardings[path], specs[path].shape, d)
                read = set()
                for r in log.reads:
                    if r.path == path and d in r.devices:
                        parts = r.key.split(".")
                        if parts[-1] == "weight":  # hub: ...experts.{e}.{name}.weight
                            read.add(int(parts[-3]))
                        else:  # fused: ...experts.gate_up_proj / down_proj, index (e, e + 1) first
                            assert r.index[0][1] - r.index[0][0] == 1, r
                            read.add(r.index[0][0])
                assert read == owned, (path, d, read, owned)

    expert_bytes = sum(n for p, n in log.bytes_by_param().items() if p.startswith(EXPERT_PARAMS))
    return {
        "model_bytes": model_bytes, "bytes_read": log.total_bytes, "reads": len(log.reads),
        "per_device": {str(k): v for k, v in sorted(by_device.items())}, "shards_compared": compared,
        "expert_bytes_read": expert_bytes, "peak_rss_mib": _peak_rss_mib(),
        "expert_model_bytes": sum(int(np.prod(s.shape)) * itemsize for p, s in specs.items()
                                  if p.startswith(EXPERT_PARAMS)),
    }


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(argv: list[str]) -> None:
    mode, *folders = argv
    if mode == "single":
        out = {f: _load_everywhere(f, (2, 2, 2)) for f in folders}
    else:  # "multi PORT PROCESS_ID folders...": 2 processes x 4 devices
        import jax

        port, pid, *folders = folders
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=int(pid))
        assert len(jax.devices()) == 8 and len(jax.local_devices()) == 4
        out = {f: _load_everywhere(f, (1, 4, 2), jax.devices()) for f in folders}
        out["process"] = jax.process_index()
        jax.distributed.shutdown()
    print(json.dumps(out))


# ---------------------------------------------------------------------------------- pytest side
def _env(num_devices: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env


def _spawn(args: list[str], num_devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.convert.test_sharded_loading", *args], cwd=REPO_ROOT,
                            env=_env(num_devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: int = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n--- stderr ---\n{err[-6000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(config, reference, {layout: folder}) for the tiny preset with talker and Code2Wav."""
    import safetensors.torch
    import torch

    from convert.reference import randomize_, reference_model
    from omni_jax.config import preset

    config = preset("tiny")
    assert config.talker_config is not None and config.code2wav_config is not None
    ref = reference_model(config)
    randomize_(ref, seed=1)
    hub = tmp_path_factory.mktemp("hub")
    ref.save_pretrained(hub)
    fused = tmp_path_factory.mktemp("fused")
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    safetensors.torch.save_file(state, fused / "model.safetensors")
    (fused / "config.json").write_text((hub / "config.json").read_text())
    return config, ref, {"hub": str(hub), "fused": str(fused)}


def test_one_device_load_equals_the_state_dict(checkpoints):
    """The sharded reader on one device is the host converter on the reference's tensors, exactly."""
    import torch

    from convert.hf_to_jax import ReadLog, convert_checkpoint, convert_tensors, list_safetensors, read_headers
    from omni_jax.model import model_specs
    from omni_jax.nn.params import flatten

    config, ref, folders = checkpoints
    for layout, cast in (("hub", torch.float32), ("fused", torch.bfloat16)):
        triples = [(k, (lambda v=v: v.detach().to(cast).float().numpy()), tuple(v.shape))
                   for k, v in ref.state_dict().items()]
        expected = convert_tensors(triples, model_specs(config), dtype="float32")
        log = ReadLog()
        loaded = flatten(convert_checkpoint(folders[layout], config, dtype="float32", read_log=log))
        assert set(loaded) == set(expected)
        for path, value in expected.items():
            np.testing.assert_array_equal(np.asarray(loaded[path]), value, err_msg=f"{layout}: {path}")
        assert {r.key for r in log.reads} == set(read_headers(list_safetensors(folders[layout])))


def test_strict_checks_come_from_the_headers_before_any_read(checkpoints, tmp_path):
    import safetensors.torch
    import torch

    from convert.hf_to_jax import CheckpointError, ReadLog, convert_checkpoint
    from tests.conftest import thinker_only

    config, ref, folders = checkpoints
    state = {k: v.detach().contiguous() for k, v in ref.state_dict().items()}
    state["thinker.lm_head.weight"] = state["thinker.lm_head.weight"][:, :-1].contiguous()
    state["talker.model.extra.weight"] = torch.zeros(3)
    del state["code2wav.pre_transformer.norm.weight"]
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    log = ReadLog()
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(str(tmp_path), config, dtype="float32", read_log=log)
    message = str(err.value)
    assert "thinker.lm_head.weight: checkpoint shape (512, 63), model expects (512, 64)" in message
    assert "unused):\n    talker.model.extra.weight" in message
    missing = message.split("missing from the checkpoint:\n")[1].split()
    assert missing == ["thinker.lm_head.weight", "code2wav.pre_transformer.norm.weight"]  # the mis-shaped one too
    assert log.reads == []

    # A full checkpoint under a text-only configuration: listed by component, no tensor read ...
    with pytest.raises(CheckpointError, match="leaves out") as err:
        convert_checkpoint(folders["hub"], thinker_only(config), dtype="float32", read_log=log)
    for component in ("talker", "code2wav"):
        count = sum(k.startswith(component + ".") for k in ref.state_dict() if "experts." not in k)
        assert f"  {component}: " in str(err.value) and count > 10
    assert log.reads == []
    # ... and skipped on request, without reading a byte of them.
    params = convert_checkpoint(folders["hub"], thinker_only(config), dtype="float32", read_log=log,
                                skip_absent_components=True)
    assert set(params) == {"thinker"}
    assert log.reads and not any(r.key.startswith(("talker.", "code2wav.")) for r in log.reads)


def test_eight_devices_read_only_their_shards(checkpoints):
    _, _, folders = checkpoints
    result = _result(_spawn(["single", folders["hub"], folders["fused"]], 8))
    for layout, itemsize in (("hub", 4), ("fused", 2)):
        r = result[folders[layout]]
        # One process holds every device: each element is read once (not once per data replica) ...
        assert r["bytes_read"] == r["model_bytes"], r
        # ... and each device's reads are its own shards: experts halved, heads halved, never the model.
        per_device = list(r["per_device"].values())
        assert len(per_device) == 8 and max(per_device) < r["model_bytes"], r
        assert r["shards_compared"] > 0
    print(json.dumps({k: {kk: v for kk, v in result[f].items() if kk != "per_device"} | {
        "per_device_max": max(result[f]["per_device"].values())} for k, f in folders.items()}))


def test_two_processes_read_disjoint_halves(checkpoints):
    _, _, folders = checkpoints
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [_spawn(["multi", str(port), str(i), folders["hub"], folders["fused"]], 4) for i in range(2)]
    results = [_result(p) for p in procs]
    assert sorted(r["process"] for r in results) == [0, 1]
    for layout in ("hub", "fused"):
        a, b = (r[folders[layout]] for r in results)
        # Each process read its distinct shards (checked inside) and so strictly less than the model;
        # replicated parameters are read by both, sharded ones split between them.
        assert a["bytes_read"] < a["model_bytes"] and b["bytes_read"] < b["model_bytes"], (a, b)
        # Expert tensors are split over the processes (half of the experts each): together they read
        # each expert byte exactly once.
        assert a["expert_bytes_read"] == b["expert_bytes_read"] == a["expert_model_bytes"] // 2, (a, b)
        assert set(a["per_device"]).isdisjoint(b["per_device"])
    print(json.dumps([{layout: {k: v for k, v in r[f].items() if k != "per_device"} for layout, f in folders.items()}
                      for r in results]))


if __name__ == "__main__":
    _worker(sys.argv[1:])
