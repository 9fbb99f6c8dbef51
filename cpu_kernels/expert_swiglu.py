"""SwiGLU experts on rows sorted by expert, each used expert's matrices read in place from the stack.

    y[r] = down_g(silu(x[r] @ gate_g) * (x[r] @ up_g))      g = the group (expert) of sorted row r

Two loops, by row count:

Few rows (decode, at most `STREAM_MAX_ROWS`): a handful of rows (batch x top_k) against a few of the experts. There
the arithmetic is nothing and the time is memory: the used experts' matrices must be read from the
stacked weights. XLA:CPU reads each of them about three times (a dynamic-slice copy out of the
stack, YNNPACK's repacking of the product's right-hand side, the product), and a loop fusion that
would read it in place lowers the reduction poorly (all measured, see `bench/RESULTS.md`). This
kernel streams every used matrix once, straight from the stack, with the rows of its group
accumulated together (loop order d, then rows, then f: one weight row is loaded and used for every
row of the group), and spreads the groups over the CPU's cores.

More rows (prefill), when the expert width and the output width are multiples of
`_tiles.TILE_WIDTH` (64): the products are the arithmetic, and XLA:CPU's for an expert's ~100-row
tiles ran at ~185 GFLOP/s on a 2-core Xeon where torch's ran ~1.6x faster. Here each group's rows
are cut into tasks of 48-192 rows (`_task_rows`), spread over the cores, and each task's three products run in
register tiles (`_tiles.product_into`); SiLU uses a vectorisable exponential (`_loops.exp_nonpositive`).

Numerics: float32 throughout, each output a sequential float32 sum over the contraction (d for
gate/up, f for down; fused multiply-adds in the tiled loop), so results differ from a blocked
matmul's only in summation order and rounding. SiLU is a * sigmoid(a), as `jax.nn.silu`.

Gradients: a custom VJP whose forward and backward passes, under differentiation, are the pure-JAX
grouped SwiGLU's (`omni_jax.nn.grouped_matmul`), so the kernel speeds up undifferentiated calls
(inference) and costs training nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numba
import numpy as np
from numba import cfunc, njit, prange

from cpu_kernels import ffi
from cpu_kernels._loops import exp_nonpositive
from cpu_kernels._tiles import TARGET_FEATURES, TILE_ROWS, TILE_WIDTH, WIDE_VECTORS, product_into

__all__ = ["expert_swiglu", "expert_swiglu_supported", "expert_swiglu_tiles_fit", "expert_swiglu_prefill_faster",
           "STREAM_MAX_ROWS"]

_TARGET = "omni_jax_cpu_expert_swiglu"

# Rows up to which the streaming loop runs (the decode case; `omni_jax.nn.dense.CPU_KERNEL_MAX_ROWS`
# is the same bound). Above, the tiled loop, where the shapes allow it.
STREAM_MAX_ROWS = 64

# Rows per task of the tiled loop: between 8 and 32 register tiles, as large as leaves each thread
# about `_TASKS_PER_THREAD` tasks. A task reads (and on AVX2 copies: `_tiles.PACK_COLUMN_BLOCKS`) its
# expert's three matrices once for all its rows, so larger tasks read less; several tasks per thread
# keep the cores even when the groups are not. On a 2-core Zen 3 the copy paid only with large tasks:
# 48-row tasks with it were ~12% slower than without, 192-row tasks with it ~4% faster (benchmark
# experts, in-process A/B, median of 40 rounds; session 12). On an AVX-512 Xeon (no copy), 48- and
# 192-row tasks measured the same.
_TASK_MIN_ROWS = 8 * TILE_ROWS
_TASK_MAX_ROWS = 32 * TILE_ROWS
_TASKS_PER_THREAD = 4


def _task_rows(rows: int) -> int:
    """The tiled loop's rows per task for `rows` rows on numba's current thread count."""
    share = rows // (_TASKS_PER_THREAD * numba.get_num_threads())
    return min(max(share - share % TILE_ROWS, _TASK_MIN_ROWS), _TASK_MAX_ROWS)


@njit(cache=True, inline="always")
def _group_starts(sizes, rows):
    """(G + 1,) first row of each group and the end, sizes clamped to >= 0 and to the rows left."""
    starts = np.empty(sizes.shape[0] + 1, np.int64)
    starts[0] = 0
    for g in range(sizes.shape[0]):
        starts[g + 1] = min(starts[g] + max(sizes[g], 0), rows)
    return starts


@njit(parallel=True, cache=True)
def _swiglu_groups(x, sizes, gate, up, down, layer, gate_rows, up_rows, out):
    """In place: out (R, Do); gate_rows, up_rows (R, F) are scratch. Bounds are enforced here:
    this runs on raw buffers, so a bad group size or layer must not write out of bounds."""
    rows, hidden = x.shape
    num_groups = sizes.shape[0]
    inter = gate.shape[3]
    hidden_out = down.shape[3]
    layer = min(max(layer, 0), gate.shape[0] - 1)  # XLA's clamping of dynamic indices
    starts = _group_starts(sizes, rows)
    # The cores split the *used* groups evenly: a group costs about one read of its matrices
    # whatever its row count, and splitting all groups instead left one core with most of the
    # used ones whenever routing was uneven.
    used = np.empty(num_groups, np.int64)
    num_used = 0
    for g in range(num_groups):
        if starts[g + 1] > starts[g]:
            used[num_used] = g
            num_used += 1
    for r in range(rows):
        for j in range(hidden_out):
            out[r, j] = 0.0
    for i in prange(num_used):
        g = used[i]
        first = starts[g]
        count = starts[g + 1] - first
        w_gate = gate[layer, g]
        w_up = up[layer, g]
        w_down = down[layer, g]
        for t in range(first, first + count):
            for f in range(inter):
                gate_rows[t, f] = 0.0
                up_rows[t, f] = 0.0
        for d in range(hidden):
            for t in range(first, first + count):
                xv = x[t, d]
                for f in range(inter):
                    gate_rows[t, f] += xv * w_gate[d, f]
                    up_rows[t, f] += xv * w_up[d, f]
        for t in range(first, first + count):
            for f in range(inter):
                a = gate_rows[t, f]
                gate_rows[t, f] = a / (np.float32(1.0) + np.exp(-a)) * up_rows[t, f]
        for f in range(inter):
            for t in range(first, first + count):
                h = gate_rows[t, f]
                for j in range(hidden_out):
                    out[t, j] += h * w_down[f, j]


@njit(parallel=True, cache=True)
def _swiglu_groups_tiled(x, sizes, gate, up, down, layer, task_size, gate_rows, up_rows, out):
    """As `_swiglu_groups`, in register tiles, groups cut into tasks of at most `task_size` rows;
    gate, up widths and down's a multiple of TILE_WIDTH (the caller's to check). Bounds on sizes and
    layer are enforced here (raw buffers)."""
    task_size = max(task_size, 1)
    rows = x.shape[0]
    num_groups = sizes.shape[0]
    inter = gate.shape[3]
    layer = min(max(layer, 0), gate.shape[0] - 1)
    starts = _group_starts(sizes, rows)
    task_group = np.empty(rows // task_size + num_groups + 1, np.int64)
    task_first = np.empty_like(task_group)
    task_rows = np.empty_like(task_group)
    num_tasks = 0
    for g in range(num_groups):
        first = starts[g]
        while first < starts[g + 1]:
            take = min(task_size, starts[g + 1] - first)
            task_group[num_tasks], task_first[num_tasks], task_rows[num_tasks] = g, first, take
            num_tasks += 1
            first += take
    for r in range(starts[num_groups], rows):  # rows past the groups: zeros
        out[r, :] = 0.0
    for i in prange(num_tasks):
        g, first, count = task_group[i], task_first[i], task_rows[i]
        product_into(x, gate[layer, g], gate_rows, first, count)
        product_into(x, up[layer, g], up_rows, first, count)
        # silu(a) = a * sigmoid(a), with e = exp(-|a|) <= 1: sigmoid is 1 / (1 + e) for a >= 0 and
        # e / (1 + e) below (no overflow either way).
        decay = np.empty(inter, np.float32)
        bits = np.empty(inter, np.int32)
        for t in range(first, first + count):
            a_row, u_row = gate_rows[t], up_rows[t]
            for f in range(inter):
                decay[f] = -abs(a_row[f])
            exp_nonpositive(decay, inter, bits)
            for f in range(inter):
                a, e = a_row[f], decay[f]
                a_row[f] = (a if a >= 0 else a * e) / (np.float32(1.0) + e) * u_row[f]
        product_into(gate_rows, down[layer, g], out, first, count)


@cfunc(ffi.HANDLER_SIGNATURE, cache=True)
def _handler(frame_address):
    frame = ffi.call_frame(frame_address)
    if frame.size == 0:
        return ffi.null()
    # Arguments: indices (2,) int32 [layer, rows per task of the tiled loop (0: the streaming loop)],
    # x (R, D), sizes (G,) int32, gate (L, G, D, F), up (L, G, D, F), down (L, G, F, Do). Results:
    # out (R, Do), gate scratch (R, F), up scratch (R, F).
    indices = ffi.int32_1d(frame, 0)
    x = ffi.float32_2d(frame, 1)
    sizes = ffi.int32_1d(frame, 2)
    gate, up, down = ffi.float32_4d(frame, 3), ffi.float32_4d(frame, 4), ffi.float32_4d(frame, 5)
    out, gate_rows, up_rows = ffi.float32_2d(frame, 0, True), ffi.float32_2d(frame, 1, True), ffi.float32_2d(frame, 2, True)
    if indices[1] != 0 and gate.shape[3] % TILE_WIDTH == 0 and down.shape[3] % TILE_WIDTH == 0:
        _swiglu_groups_tiled(x, sizes, gate, up, down, indices[0], indices[1], gate_rows, up_rows, out)
    else:
        _swiglu_groups(x, sizes, gate, up, down, indices[0], gate_rows, up_rows, out)
    return ffi.null()


@functools.cache
def _registered() -> str:
    ffi.register(_TARGET, _handler.address)
    return _TARGET


def expert_swiglu_supported(x, gate_w, up_w, down_w) -> bool:
    """Whether `expert_swiglu` takes these operands (float32 everywhere). It is correct for any row
    count; `omni_jax.nn.grouped_matmul` decides where it runs."""
    return all(a.dtype == jnp.float32 for a in (x, gate_w, up_w, down_w))


def expert_swiglu_tiles_fit(gate_w, down_w) -> bool:
    """Whether `expert_swiglu` runs many rows (more than STREAM_MAX_ROWS) in its tiled loop: the
    expert width (gate_w's last axis) and the output width (down_w's) multiples of 64. Otherwise it
    runs them in the streaming loop, correct but slow for many rows."""
    return gate_w.shape[-1] % TILE_WIDTH == 0 and down_w.shape[-1] % TILE_WIDTH == 0


def expert_swiglu_prefill_faster(gate_w, down_w) -> bool:
    """Whether many rows (prefill) should run here rather than in XLA:CPU's products: the tiles fit,
    and numba compiles for one of the two targets where the tiled loop was measured faster than
    XLA:CPU on the benchmark model's experts: AVX-512 (~1.6x, a 2-core Xeon) and AVX2 with FMA
    (~1.3-1.5x, a 2-core Zen 3, where XLA also had AVX2 only). Elsewhere (other instruction sets,
    unmeasured) XLA keeps prefill."""
    measured_target = WIDE_VECTORS or {"+avx2", "+fma"} <= TARGET_FEATURES
    return measured_target and expert_swiglu_tiles_fit(gate_w, down_w)


def _check(x, gate_w, up_w, down_w, group_sizes, layer):
    stacked = layer is not None
    rank = 3 + stacked
    ok = (x.ndim == 2 and gate_w.ndim == rank and up_w.shape == gate_w.shape and down_w.ndim == rank
          and gate_w.shape[-2] == x.shape[1] and down_w.shape[-2] == gate_w.shape[-1]
          and down_w.shape[:-2] == gate_w.shape[:-2] and group_sizes.shape == (gate_w.shape[-3],))
    if not ok:
        raise ValueError(
            f"expert_swiglu expects x (R, D), gate/up ({'L, ' if stacked else ''}G, D, F), down "
            f"({'L, ' if stacked else ''}G, F, D'), group_sizes (G,); got x {x.shape}, gate {gate_w.shape}, "
            f"up {up_w.shape}, down {down_w.shape}, group_sizes {group_sizes.shape}")
    if not expert_swiglu_supported(x, gate_w, up_w, down_w):
        raise ValueError(
            f"expert_swiglu takes float32 operands; got x {x.dtype} with weights "
            f"{gate_w.dtype}/{up_w.dtype}/{down_w.dtype}: cast them, or use "
            "omni_jax.nn.grouped_matmul.grouped_swiglu(impl='tiled') for these")


def _forward(x, gate_w, up_w, down_w, group_sizes, layer):
    if layer is None:  # one stack: a leading layers axis of 1 (a bitcast, no copy)
        gate_w, up_w, down_w = (w[None] for w in (gate_w, up_w, down_w))
        layer = 0
    rows, inter, hidden_out = x.shape[0], gate_w.shape[-1], down_w.shape[-1]
    call = jax.ffi.ffi_call(
        _registered(),
        (jax.ShapeDtypeStruct((rows, hidden_out), jnp.float32),
         jax.ShapeDtypeStruct((rows, inter), jnp.float32),
         jax.ShapeDtypeStruct((rows, inter), jnp.float32)),
        vmap_method="sequential",
    )
    tiled = rows > STREAM_MAX_ROWS and expert_swiglu_tiles_fit(gate_w, down_w)
    task_rows = _task_rows(rows) if tiled else 0
    indices = jnp.stack([jnp.asarray(layer, jnp.int32).reshape(()), jnp.int32(task_rows)])
    return call(indices, x, group_sizes.astype(jnp.int32), gate_w, up_w, down_w)[0]


def _reference(x, gate_w, up_w, down_w, group_sizes, layer):
    from omni_jax.nn.grouped_matmul import grouped_swiglu  # noqa: PLC0415  (it imports this module)

    return grouped_swiglu(x, gate_w, up_w, down_w, group_sizes, impl="tiled", layer=layer)


def expert_swiglu(x, gate_w, up_w, down_w, group_sizes, layer=None):
    """SwiGLU experts per group on rows sorted by group, on CPU.

    x (R, D) float32 sorted by group (any row count: see the module docstring for the two loops and
    `expert_swiglu_tiles_fit`); gate_w, up_w ([L,] G, D, F); down_w
    ([L,] G, F, D'); group_sizes (G,) int. With `layer` (an int or int32 scalar), the weights carry a
    leading layers axis and `layer` selects one, read in place. Rows past sum(group_sizes) come out
    as zeros. Returns (R, D') float32. Differentiable (the backward pass is pure JAX).
    """
    _check(x, gate_w, up_w, down_w, group_sizes, layer)
    return _differentiable(x, gate_w, up_w, down_w, group_sizes, layer)


@jax.custom_vjp
def _differentiable(x, gate_w, up_w, down_w, group_sizes, layer):
    return _forward(x, gate_w, up_w, down_w, group_sizes, layer)


def _fwd(x, gate_w, up_w, down_w, group_sizes, layer):
    # Differentiated, the forward pass is the pure-JAX path's, keeping its residuals for the backward
    # pass: running the kernel here as well would only add a forward pass (the backward needs the
    # pure-JAX path's intermediates either way). The kernel serves undifferentiated calls.
    return jax.vjp(lambda *w: _reference(*w, group_sizes, layer), x, gate_w, up_w, down_w)


def _bwd(pullback, dy):
    return (*pullback(dy), None, None)


_differentiable.defvjp(_fwd, _bwd)
