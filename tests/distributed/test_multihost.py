"""Multi-host: two local processes joined with `jax.distributed`, 4 simulated CPU devices each.

The processes build one global (2 processes x 4 devices) mesh, create the tiny thinker's parameters
directly in their shardings on it, assemble a global batch from each process's own rows
(`distributed.global_batch`) and compute the logits; these must equal the single-process,
single-device logits of `OmniModel.thinker_logits` at fp32 tolerance, on several mesh shapes whose
axes cross the process boundary. Also: `distributed.resolve` (how a job is found: flags, JAX_* env,
SLURM) without starting anything, and `infer.py` run as two processes equal to one process.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from omni_jax import distributed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, (data, expert, tensor), fsdp) over the 8 global devices; process 0 holds devices 0-3, process 1
# 4-7, so the data axis of 2x2x2 and 8x1x1, the expert axis of 1x4x2 and the tensor axis of 1x1x8 cross
# the process boundary.
MESHES = (("2x2x2", (2, 2, 2), False), ("1x4x2", (1, 4, 2), False), ("1x1x8", (1, 1, 8), False),
          ("8x1x1-fsdp", (8, 1, 1), True))
BATCH, SEQ = 8, 16
TOL = 1e-5  # max |difference| / max |logit|


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _config():
    from omni_jax.config import preset  # noqa: PLC0415

    return preset("tiny").replace(talker_config=None, code2wav_config=None, enable_audio_output=False)


def _batch():
    """The global batch: (B, S) ids, left-padded mask, (3, B, S) position ids."""
    from omni_jax.positions import text_position_ids  # noqa: PLC0415

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 400, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int32)
    for row, pad in enumerate((0, 3, 0, 7, 1, 0, 5, 2)):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask, text_position_ids(mask)[0]


@functools.lru_cache(maxsize=None)
def _host_params() -> dict:
    """The text thinker's parameters (embeddings, decoder, lm_head) as numpy, drawn without JAX (no init
    program to compile); the same on every process."""
    from omni_jax.model import model_specs  # noqa: PLC0415
    from omni_jax.nn.params import ParamSpec, flatten, hash_path, unflatten  # noqa: PLC0415

    specs = model_specs(_config())["thinker"]
    out = {}
    for path, spec in flatten({"model": specs["model"], "lm_head": specs["lm_head"]}).items():
        assert isinstance(spec, ParamSpec)
        if spec.init == "normal":
            value = spec.std * np.random.default_rng(hash_path(path)).standard_normal(spec.shape)
        else:
            value = np.full(spec.shape, {"ones": 1.0, "zeros": 0.0}.get(spec.init, spec.value))
        out[path] = value.astype(np.float32)
    return unflatten(out)


def _text_specs():
    from omni_jax.model import model_specs  # noqa: PLC0415

    specs = model_specs(_config())["thinker"]
    return {"model": specs["model"], "lm_head": specs["lm_head"]}


def _worker(process_id: int, port: int, out_dir: str) -> None:
    """One process of the two-process job (run in a subprocess with 4 CPU devices)."""
    from omni_jax import distributed as dist  # noqa: PLC0415

    dist.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    from omni_jax import sharding, thinker  # noqa: PLC0415
    from omni_jax.config import Runtime  # noqa: PLC0415

    assert (jax.process_count(), jax.process_index(), jax.device_count(), jax.local_device_count()) == (
        2, process_id, 8, 4)
    config = _config()
    rt = Runtime(dtype="float32", param_dtype="float32")
    ids, mask, pos = _batch()
    host = _host_params()
    info = {"gathered": dist.allgather_objects({"process": process_id, "word": "abc" * process_id}), "rows": {}}
    for name, shape, fsdp in MESHES:
        mesh = sharding.make_mesh(*shape, devices=jax.devices())
        shardings = sharding.param_shardings(_text_specs(), mesh, sharding.rules(fsdp=fsdp))
        # Each process materialises only the slices its own devices hold.
        params = jax.tree.map(lambda h, s: jax.make_array_from_callback(h.shape, s, lambda index, h=h: h[index]),
                              host, shardings)
        spans = {len({d.process_index for d in leaf.sharding.device_set}) for leaf in jax.tree.leaves(params)}
        assert spans == {2}, f"parameters should live on both processes' devices: {spans}"
        rows = dist.process_rows(mesh, BATCH)
        info["rows"][name] = [rows.start, rows.stop]
        batch = dist.global_batch({"ids": ids[rows], "mask": mask[rows], "pos": pos[:, rows]}, mesh,
                                  batch_dims={"pos": 1})
        assert batch["ids"].shape == (BATCH, SEQ) and batch["pos"].shape == (3, BATCH, SEQ)

        @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
        def logits_fn(params, ids, mask, pos):
            return thinker.forward(params, ids, mask, pos, config.thinker_config, rt).logits

        with jax.set_mesh(mesh):
            logits = logits_fn(params, batch["ids"], batch["mask"], batch["pos"])
        np.save(os.path.join(out_dir, f"logits_{name}_p{process_id}.npy"), np.asarray(logits.addressable_data(0)))
    print(json.dumps(info), flush=True)


def _launch(process_id: int, port: int, out_dir: str) -> subprocess.Popen:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=4"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    for name in [k for k in env if k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))]:
        del env[name]
    code = f"from tests.distributed.test_multihost import _worker; _worker({process_id}, {port}, {out_dir!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("multihost"))
    port = _free_port()
    results = _wait_all([_launch(i, port, out_dir) for i in range(2)], timeout=300)
    for i, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"process {i} failed (exit {code}):\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-6000:]}"
    infos = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in results]
    return out_dir, infos


@pytest.fixture(scope="module")
def single_process_logits():
    """The reference: this (one-device) process, through the public API."""
    import jax  # noqa: PLC0415

    from omni_jax.config import Runtime  # noqa: PLC0415
    from omni_jax.model import OmniModel  # noqa: PLC0415

    ids, mask, _ = _batch()
    model = OmniModel(_config(), {"thinker": jax.device_put(_host_params())},
                      Runtime(dtype="float32", param_dtype="float32"))
    return model.thinker_logits(ids, mask)


@pytest.mark.parametrize("name", [m[0] for m in MESHES])
def test_two_processes_equal_one(two_process_run, single_process_logits, name):
    out_dir, _ = two_process_run
    ref = single_process_logits
    per_process = [np.load(os.path.join(out_dir, f"logits_{name}_p{p}.npy")) for p in range(2)]
    np.testing.assert_array_equal(per_process[0], per_process[1])  # one replicated result on both hosts
    got = per_process[0]
    assert got.shape == ref.shape == (BATCH, SEQ, 512)
    _, mask, _ = _batch()
    real = mask.astype(bool)
    scale = np.abs(ref[real]).max()
    err = np.abs(got[real] - ref[real]).max() / scale
    print(f"{name}: max relative difference {err:.2e}")
    assert err <= TOL, f"mesh {name} over 2 processes: max relative difference {err:.2e} > {TOL}"


def test_process_data(two_process_run):
    _, infos = two_process_run
    expected = [{"process": 0, "word": ""}, {"process": 1, "word": "abc"}]
    assert [info["gathered"] for info in infos] == [expected, expected]
    # Batch over (data, expert) spanning the processes: half each; not spanning them (1x1x8): all rows.
    for name, (a, b) in [("2x2x2", (0, 4)), ("1x4x2", (0, 4)), ("8x1x1-fsdp", (0, 4)), ("1x1x8", (0, 8))]:
        assert infos[0]["rows"][name] == [a, b]
    assert infos[1]["rows"]["2x2x2"] == [4, 8] and infos[1]["rows"]["1x1x8"] == [0, 8]


# ------------------------------------------------------------------------------------------- resolution
SLURM_ENV = {"SLURM_JOB_ID": "12345", "SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
             "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}


def test_resolve_single_process_is_a_no_op():
    assert distributed.resolve(env={}, on_tpu_vm=False).method == "single"
    assert distributed.resolve(num_processes=1, env={}, on_tpu_vm=False).method == "single"
    one_task = {**SLURM_ENV, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"}
    assert distributed.resolve(env=one_task, on_tpu_vm=False).method == "single"


def test_resolve_explicit_and_env():
    plan = distributed.resolve("10.0.0.1:1234", 4, 2, "0,1", env={}, on_tpu_vm=False)
    assert plan.method == "explicit"
    assert plan.kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2,
                               local_device_ids=[0, 1])
    env = {"JAX_COORDINATOR_ADDRESS": "host0:999", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    plan = distributed.resolve(env=env, on_tpu_vm=False)
    assert (plan.method, plan.kwargs["process_id"], plan.kwargs["local_device_ids"]) == ("env", 1, None)
    assert distributed.resolve(process_id=0, env=env, on_tpu_vm=False).kwargs["process_id"] == 0  # flag wins


def test_resolve_slurm():
    plan = distributed.resolve(env=SLURM_ENV, on_tpu_vm=True)  # SLURM before the TPU check
    assert plan.method == "slurm"
    # JAX's own port rule (job id mod 4096 in the top ports); 8 tasks on the node: one GPU per task.
    assert plan.kwargs == dict(coordinator_address="gpu007:61497", num_processes=16, process_id=11,
                               local_device_ids=[3])
    one_per_node = {**SLURM_ENV, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                    "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_NODELIST": "node1,node2",
                    "JAX_COORDINATOR_PORT": "5555"}
    plan = distributed.resolve(env=one_per_node, on_tpu_vm=False)
    assert plan.kwargs == dict(coordinator_address="node1:5555", num_processes=2, process_id=1,
                               local_device_ids=None)  # one task per node: all its GPUs
    # Flags override SLURM's values and SLURM fills in the rest.
    plan = distributed.resolve(coordinator_address="login:1", env=SLURM_ENV, on_tpu_vm=False)
    assert plan.kwargs["coordinator_address"] == "login:1" and plan.kwargs["num_processes"] == 16


def test_resolve_detects_tpu_and_ompi():
    assert distributed.resolve(env={}, on_tpu_vm=True).method == "tpu"
    assert distributed.resolve(env={"OMPI_COMM_WORLD_SIZE": "4"}, on_tpu_vm=False).method == "ompi"


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="h:1", num_processes=2), "missing: --process-id"),
    (dict(num_processes=2, process_id=0), "missing: --coordinator-address"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "must be in 0..1"),
    (dict(coordinator_address="host", num_processes=2, process_id=0), "expected HOST:PORT"),
    (dict(local_device_ids="0,x"), "comma-separated device numbers"),
])
def test_resolve_errors_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve(**kwargs, env={}, on_tpu_vm=False)


def test_initialize_after_jax_started_is_refused():
    import jax  # noqa: PLC0415

    jax.devices()  # this process's JAX is running: joining a job now would be too late
    with pytest.raises(RuntimeError, match="first thing in main"):
        distributed.initialize("localhost:1", num_processes=2, process_id=0)
    if distributed.resolve().method == "single":  # not inside a SLURM/MPI/TPU job
        distributed.initialize()  # nothing to join: a no-op, even after JAX started
    assert jax.process_count() == 1
