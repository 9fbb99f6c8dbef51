"""Multi-host start-up: `jax.distributed` initialisation, per-process data and global arrays.

Every process of a multi-host job runs the same program (one process per host on TPU pods, one
per host or per GPU on GPU clusters). `initialize` joins them into one JAX runtime, so that
`jax.devices()` lists every device of the job and a mesh built over them spans hosts. Call it
first thing in `main()`, before anything touches a JAX device.

How the job is found, first match wins:

  1. explicit arguments (`--coordinator-address`, `--num-processes`, `--process-id`,
     `--local-device-ids`), each falling back to its environment variable `JAX_COORDINATOR_ADDRESS`,
     `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, `JAX_LOCAL_DEVICE_IDS`;
  2. SLURM with more than one task (`srun`): coordinator = the first node of the step, port from the
     job id (or `JAX_COORDINATOR_PORT`); one GPU per task when a node runs several tasks, all of a
     node's devices when it runs one;
  3. Open MPI with more than one rank (`mpirun`): JAX's own Open MPI detection;
  4. a Cloud TPU VM: `jax.distributed.initialize()` with no arguments (TPU pod slices and
     multi-slice jobs describe themselves through the TPU metadata); a TPU VM whose metadata cannot
     be read runs as one process, with a warning;
  5. otherwise: one process, nothing to do.

A job of one process is a no-op in every case, so single-host scripts need no flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any, Sequence

import numpy as np

__all__ = [
    "add_distributed_args", "initialize_from_args", "initialize", "resolve", "Plan", "is_initialized",
    "describe", "process_share", "process_rows", "global_batch", "allgather_objects",
]

logger = logging.getLogger(__name__)

_initialized_here = False


class Plan:
    """What `initialize` will do: `method` ("explicit", "env", "slurm", "ompi", "tpu" or "single") and the
    keyword arguments for `jax.distributed.initialize` (None for "single", and for "ompi"/"tpu", where
    JAX detects everything itself)."""

    def __init__(self, method: str, kwargs: dict | None = None, note: str = ""):
        self.method = method
        self.kwargs = kwargs
        self.note = note

    def __repr__(self) -> str:
        return f"Plan({self.method!r}, {self.kwargs!r})"


# ------------------------------------------------------------------------------------------- flags
def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the multi-host flags (all optional; see the module docstring for the automatic cases)."""
    g = parser.add_argument_group(
        "multi-host", "Join several processes into one JAX job (automatic on TPU pods, SLURM and Open MPI; "
        "these flags otherwise, given identically to every process except --process-id)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="address of process 0, reachable from every process (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None,
                   help="number of processes in the job (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process's rank, 0 .. num-processes-1 (env JAX_PROCESS_ID)")
    g.add_argument("--local-device-ids", default=None, metavar="I,J,...",
                   help="the local accelerators this process uses, e.g. 0 or 0,1,2,3 (env JAX_LOCAL_DEVICE_IDS; "
                        "default: all of the host's)")
    return parser


def initialize_from_args(args: argparse.Namespace) -> None:
    """`initialize` with the values of `add_distributed_args`'s flags."""
    initialize(
        coordinator_address=getattr(args, "coordinator_address", None),
        num_processes=getattr(args, "num_processes", None),
        process_id=getattr(args, "process_id", None),
        local_device_ids=getattr(args, "local_device_ids", None),
    )


# ------------------------------------------------------------------------------------------- resolution
def _parse_ids(value: str | int | Sequence[int] | None, what: str) -> list[int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{what}={value!r}: expected comma-separated device numbers such as 0,1,2,3") from None
    return [int(v) for v in value]


def _env_int(env: dict, name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _expand_tasks_per_node(value: str) -> list[int]:
    """SLURM's compressed per-node task counts, "2(x3),1" -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot parse SLURM tasks per node {value!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _first_slurm_host(node_list: str) -> str:
    """The first host of a SLURM node list: "node[001-004,010],gpu7" -> "node001"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", node_list.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {node_list!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]


def _slurm_plan(env: dict) -> Plan | None:
    ntasks = _env_int(env, "SLURM_NTASKS") or _env_int(env, "SLURM_NPROCS")
    if ntasks is None or ntasks <= 1 or "SLURM_PROCID" not in env:
        return None
    node_list = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_id = _env_int(env, "SLURM_JOB_ID") or _env_int(env, "SLURM_JOBID")
    if not node_list or job_id is None:
        raise ValueError("SLURM job of several tasks without SLURM_STEP_NODELIST/SLURM_JOB_ID: start it with srun, or "
                         "pass --coordinator-address, --num-processes and --process-id")
    port = _env_int(env, "JAX_COORDINATOR_PORT") or (job_id % 4096 + 61440)  # JAX's choice: the top 4096 ports
    per_node_raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node_id = _env_int(env, "SLURM_NODEID") or 0
    if per_node_raw:
        per_node = _expand_tasks_per_node(per_node_raw)
        tasks_here = per_node[min(node_id, len(per_node) - 1)]
    else:
        nodes = _env_int(env, "SLURM_STEP_NUM_NODES") or _env_int(env, "SLURM_JOB_NUM_NODES") or 1
        tasks_here = max(1, ntasks // nodes)
    local_ids = None
    if tasks_here > 1:
        # Several tasks on a node: one accelerator each (CUDA numbering, by local rank).
        local_ids = [_env_int(env, "SLURM_LOCALID") or 0]
    kwargs = dict(coordinator_address=f"{_first_slurm_host(node_list)}:{port}", num_processes=ntasks,
                  process_id=_env_int(env, "SLURM_PROCID"), local_device_ids=local_ids)
    return Plan("slurm", kwargs, note=f"{tasks_here} task(s) on this node")


def _on_cloud_tpu_vm() -> bool:
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # noqa: PLC0415
    except ImportError:  # a JAX that moved it: fall back to the libtpu device files
        return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
    return bool(running_in_cloud_tpu_vm)


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: str | int | Sequence[int] | None = None,
            env: dict | None = None, on_tpu_vm: bool | None = None) -> Plan:
    """Works out how to join the job (see the module docstring), without touching JAX.

    `env` defaults to `os.environ`; `on_tpu_vm` to JAX's Cloud TPU VM check. Raises ValueError naming
    what is missing when explicit values are incomplete or inconsistent.
    """
    env = dict(os.environ) if env is None else env
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int(env, "JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int(env, "JAX_PROCESS_ID")
    ids = _parse_ids(local_device_ids, "--local-device-ids")
    if ids is None:
        ids = _parse_ids(env.get("JAX_LOCAL_DEVICE_IDS"), "JAX_LOCAL_DEVICE_IDS")
    slurm = _slurm_plan(env)

    if any(v is not None for v in (coordinator_address, num_processes, process_id)):
        method = "explicit" if explicit else "env"
        if slurm is not None:  # explicit values override SLURM's, SLURM fills in the rest
            method += "+slurm"
            coordinator_address = coordinator_address or slurm.kwargs["coordinator_address"]
            num_processes = num_processes if num_processes is not None else slurm.kwargs["num_processes"]
            process_id = process_id if process_id is not None else slurm.kwargs["process_id"]
            ids = ids if ids is not None else slurm.kwargs["local_device_ids"]
        if num_processes is not None and num_processes < 1:
            raise ValueError(f"--num-processes {num_processes}: must be >= 1")
        if num_processes == 1 and process_id in (None, 0):
            return Plan("single", {"local_device_ids": ids} if ids else None, note="one process")
        missing = [flag for flag, value in (("--coordinator-address (or JAX_COORDINATOR_ADDRESS)", coordinator_address),
                                            ("--num-processes (or JAX_NUM_PROCESSES)", num_processes),
                                            ("--process-id (or JAX_PROCESS_ID)", process_id)) if value is None]
        if missing:
            raise ValueError(
                "a multi-host job needs, on every process, --coordinator-address HOST:PORT (process 0's address, the "
                "same on all), --num-processes N and --process-id I (0..N-1, different on each); missing: "
                + ", ".join(missing))
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} must be in 0..{num_processes - 1} (--num-processes "
                             f"{num_processes})")
        if ":" not in coordinator_address:
            raise ValueError(f"--coordinator-address {coordinator_address!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
        return Plan(method, dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id, local_device_ids=ids))
    if slurm is not None:
        if ids is not None:
            slurm.kwargs["local_device_ids"] = ids
        return slurm
    extra = {"local_device_ids": ids} if ids else {}
    if (_env_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return Plan("ompi", extra)
    if on_tpu_vm is None:
        on_tpu_vm = _on_cloud_tpu_vm()
    if on_tpu_vm:
        return Plan("tpu")  # JAX never restricts TPU chips by local_device_ids
    return Plan("single", extra or None)


# ------------------------------------------------------------------------------------------- start-up
def is_initialized() -> bool:
    """Whether `jax.distributed` has been initialised in this process (by us or anyone)."""
    import jax  # noqa: PLC0415

    fn = getattr(jax.distributed, "is_initialized", None)
    if fn is not None:
        return bool(fn())
    from jax._src import distributed as _d  # noqa: PLC0415

    return _d.global_state.client is not None


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge  # noqa: PLC0415

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: str | int | Sequence[int] | None = None) -> None:
    """Joins this process to a multi-process JAX job; a no-op for a single process (see module docstring).

    Must run before anything uses a JAX device. Calling it again is a no-op.
    """
    global _initialized_here
    if _initialized_here or is_initialized():
        return
    plan = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    import jax  # noqa: PLC0415

    if plan.method == "single":
        if plan.kwargs and plan.kwargs.get("local_device_ids"):
            # One process restricted to some GPUs, as jax.distributed.initialize would do.
            visible = ",".join(str(i) for i in plan.kwargs["local_device_ids"])
            for option in ("jax_cuda_visible_devices", "jax_rocm_visible_devices"):
                try:
                    jax.config.update(option, visible)
                except (AttributeError, KeyError):
                    pass
        return
    if _backends_started():
        raise RuntimeError(
            f"omni_jax.distributed.initialize ({plan.method}): JAX already started its devices; call it first thing "
            "in main(), before any jax.devices(), array creation or jit")
    # Cross-process collectives on CPU (tests, CPU clusters) need an implementation; gloo ships with jaxlib.
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "none", ""):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:
        pass
    if plan.method == "tpu":
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            logger.warning("Cloud TPU VM without readable pod metadata (%s): running as a single process; pass "
                           "--coordinator-address/--num-processes/--process-id for a multi-host job", e)
            return
    elif plan.method == "ompi":
        try:
            jax.distributed.initialize(**plan.kwargs)
        except ValueError as e:
            raise ValueError(f"Open MPI job of several ranks, but JAX could not read its layout ({e}); pass "
                             "--coordinator-address HOST:PORT --num-processes N --process-id I") from None
    else:
        kwargs = dict(plan.kwargs)
        try:  # all given: JAX's own detection must not override them (it pins one GPU per SLURM task)
            jax.distributed.initialize(**kwargs, cluster_detection_method="deactivate")
        except TypeError:  # a JAX without that argument
            jax.distributed.initialize(**kwargs)
    _initialized_here = True
    logger.info("omni_jax.distributed: %s", describe())


def describe() -> str:
    """One line for logs: 'process 1 of 2, 4 local of 8 devices (cpu)'."""
    import jax  # noqa: PLC0415

    return (f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local of "
            f"{jax.device_count()} devices ({jax.devices()[0].platform})")


# ------------------------------------------------------------------------------------------- data
def process_share(items: Sequence[Any], process_index: int | None = None, process_count: int | None = None) -> list:
    """This process's items, round-robin (item i goes to process i mod count): the same split on every process."""
    import jax  # noqa: PLC0415

    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return list(items[index::count])


def _batch_sharding(mesh, ndim: int, batch_dim: int):
    from omni_jax.sharding import batch_sharding  # noqa: PLC0415

    return batch_sharding(mesh, ndim, batch_dim)


def process_rows(mesh, global_batch_size: int) -> slice:
    """The rows of a global batch that this process supplies to `global_batch`: the contiguous block its
    devices hold under the batch sharding (over the mesh's (data, expert) axes).

    With the usual process-major device order and data x expert a multiple of the process count this is
    block `jax.process_index()` of `process_count` equal blocks; when the batch axes do not span the
    processes (e.g. a pure tensor-parallel mesh across hosts) every process supplies the whole batch.
    """
    sharding = _batch_sharding(mesh, 1, 0)
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        block = index[0]
        starts.append(block.start or 0)
        stops.append(global_batch_size if block.stop is None else block.stop)
    start, stop = min(starts), max(stops)
    covered = np.zeros(global_batch_size, bool)
    for a, b in zip(starts, stops):
        covered[a:b] = True
    if not covered[start:stop].all():
        raise ValueError(f"this process's devices hold non-contiguous rows of the batch on mesh {dict(mesh.shape)}; "
                         "order the devices process-major (sharding.make_mesh does)")
    return slice(start, stop)


def global_batch(local: Any, mesh, batch_dims: dict[str, int] | int = 0) -> Any:
    """Per-process host data -> global `jax.Array`s with the batch sharding (batch over (data, expert)).

    local: an array or a dict of arrays holding this process's rows, `process_rows(mesh, B)` of the global
      batch of B rows (every process the same number); `batch_dims` gives the batch dimension, per key
      for a dict (default 0; e.g. {"position_ids": 1} for (3, B, S) position ids).
    No process ever holds another's rows: each array is assembled from the processes' local data by
    `jax.make_array_from_process_local_data`. With one process this is a sharded `device_put`.
    """
    import jax  # noqa: PLC0415

    batch_axes = ("data", "expert")
    shape = dict(mesh.shape)
    num_shards = int(np.prod([shape.get(a, 1) for a in batch_axes]))
    names = [a for a in mesh.axis_names]
    coords = {d: c for c, d in np.ndenumerate(mesh.devices)}
    local_shards = {tuple(coords[d][names.index(a)] for a in batch_axes if a in names)
                    for d in mesh.devices.flat if d.process_index == jax.process_index()}
    if not local_shards:
        raise ValueError(f"mesh {shape} holds none of this process's devices")

    def one(key, value):
        value = np.asarray(value)
        dim = batch_dims.get(key, 0) if isinstance(batch_dims, dict) else batch_dims
        global_shape = list(value.shape)
        if value.shape[dim] * num_shards % len(local_shards):
            raise ValueError(f"{key or 'batch'}: {value.shape[dim]} local rows do not split over this process's "
                             f"{len(local_shards)} batch shards")
        global_shape[dim] = value.shape[dim] * num_shards // len(local_shards)
        return jax.make_array_from_process_local_data(_batch_sharding(mesh, value.ndim, dim), value,
                                                      tuple(global_shape))

    if isinstance(local, dict):
        return {k: one(k, v) for k, v in local.items()}
    return one(None, local)


_gather_calls = 0
_KV_CHUNK = 1 << 20  # bytes per key-value entry, well under the coordination service's message limit


def _kv_client():
    try:
        from jax._src import distributed as _d  # noqa: PLC0415
    except ImportError:
        return None
    client = getattr(_d.global_state, "client", None)
    needed = ("key_value_set", "blocking_key_value_get")
    return client if client is not None and all(hasattr(client, m) for m in needed) else None


def allgather_objects(obj: Any, timeout_s: float = 24 * 3600.0) -> list:
    """Every process's JSON-serialisable `obj`, in process order. All processes must call it, in the same order.

    Goes through the `jax.distributed` coordination service's key-value store (no device collective, so
    processes that finish their work at very different times just wait, up to `timeout_s`); falls back to
    `multihost_utils.process_allgather` when that store is not reachable.
    """
    import json  # noqa: PLC0415

    import jax  # noqa: PLC0415

    global _gather_calls
    if jax.process_count() == 1:
        return [obj]
    _gather_calls += 1
    data = json.dumps(obj)
    client = _kv_client()
    if client is not None:
        prefix = f"omni_jax/allgather/{_gather_calls}"
        me = jax.process_index()
        chunks = [data[i : i + _KV_CHUNK] for i in range(0, len(data), _KV_CHUNK)] or [""]
        for i, chunk in enumerate(chunks):
            client.key_value_set(f"{prefix}/{me}/{i}", chunk)
        client.key_value_set(f"{prefix}/{me}/n", str(len(chunks)))
        timeout_ms = int(timeout_s * 1000)
        out = []
        for p in range(jax.process_count()):
            n = int(client.blocking_key_value_get(f"{prefix}/{p}/n", timeout_ms))
            out.append(json.loads("".join(client.blocking_key_value_get(f"{prefix}/{p}/{i}", timeout_ms)
                                          for i in range(n))))
        return out
    from jax.experimental import multihost_utils  # noqa: PLC0415

    raw = np.frombuffer(data.encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(rows[i, : sizes[i]].tobytes().decode()) for i in range(len(sizes))]
