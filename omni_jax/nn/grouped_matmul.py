"""The one grouped-matmul entry point: rows sorted by group, each group times its own matrix.

    out[r] = lhs[r] @ rhs[group_of(r)]      lhs (R, K) sorted by group, rhs (G, K, N), group_sizes (G,)

Rows past `sum(group_sizes)` are padding and come out as zeros.

Implementations, chosen by `impl`:
  * "pallas" / "pallas_interpret": `pallas_kernels.grouped_matmul` (GPU and TPU kernels).
  * "tiled": pure JAX, for CPU. `jax.lax.ragged_dot` lowers to a dense masked product on CPU
    (measured 26-47x slower than a dense matmul of equal FLOPs here), so we walk the sorted rows in
    tiles instead: a `lax.scan` over (tile, group) *visits*, where a tile that straddles a group
    boundary is visited once per group with the other rows masked (the megablox scheme). There are
    at most `num_tiles + min(G, R) - 1` visits; each is one dense (tile, K) @ (K, N) product.
    Few rows (decode) take a per-row path instead, which reads only the experts that are used.
  * "ragged_dot": `jax.lax.ragged_dot`, for comparison.
  * "auto": Pallas on GPU/TPU, "tiled" elsewhere; for `grouped_swiglu` on CPU with float32 rows,
    `cpu_kernels.expert_swiglu`, a numba kernel: for at most CPU_KERNEL_MAX_ROWS rows (decode; see
    `nn/dense.use_cpu_kernel`) it reads each used expert's matrices once, in place (XLA:CPU copies
    and repacks them, below); for more rows (prefill), where the expert and output widths are
    multiples of 64 and the CPU has AVX-512 or AVX2 with FMA, its products run in register tiles,
    faster than XLA:CPU's there.

`grouped_swiglu` is the expert feed-forward built on the same entry point: three grouped matmuls on
GPU/TPU; on CPU one fused loop over *group-aligned* row tiles that computes gate, up, SiLU and down
per tile (`_swiglu_visits`). Tiles start at their group's first row and come in up to two heights
(4t rows where a group fills them, t rows for the rest), so the masked waste stays under t rows per
group while most rows run in tall products; a group's three matrices are copied out of the stacks
once, at its first tile, and stay in the loop carry for its other tiles; empty groups cost nothing.
XLA:CPU copies every dynamically indexed matrix and YNNPACK repacks a product's right-hand side on
every call, so these copies and repacks, not the FLOPs, are what a visit costs at decode (4 rows).

Weights may carry a leading layers axis together with a `layer` index. Inside a scan over decoder
layers, slicing a layer's expert stack out of the scanned inputs copies the whole (E, K, N) stack
every layer on CPU (measured 4.5x slower at decode on the benchmark model); indexing
`weights[layer, expert]` where the matrix is used copies only the matrices that are read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from omni_jax.nn.dense import CPU_KERNEL_MAX_ROWS, cpu_kernel_allowed
from omni_jax.sharding import varying_axes

__all__ = ["grouped_matmul", "grouped_swiglu", "group_ids_of_rows"]

_PER_ROW_MAX_ROWS = 64


def group_ids_of_rows(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """(num_rows,) int32 group index of each sorted row; padding rows get G (one past the last)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


def _per_row(lhs, rhs, group_sizes):
    """Row r times rhs[group of r], one row at a time: reads only the matrices in use."""
    num_groups = rhs.shape[0]
    gid = group_ids_of_rows(group_sizes, lhs.shape[0])
    valid = gid < num_groups
    gid = jnp.minimum(gid, num_groups - 1)

    def row(carry, inputs):
        x_k, g = inputs
        y = jnp.dot(x_k[None, :], rhs[g], preferred_element_type=jnp.float32)[0]
        return carry, y

    _, out = jax.lax.scan(row, None, (lhs, gid))
    return jnp.where(valid[:, None], out, 0.0).astype(lhs.dtype)


def _tile_rows(num_rows: int) -> int:
    return 128 if num_rows >= 1024 else 64 if num_rows >= 256 else 32


def _tiled(lhs, rhs, group_sizes, tile_rows: int):
    rows, k = lhs.shape
    num_groups, _, n = rhs.shape
    num_tiles = -(-rows // tile_rows)
    padded = num_tiles * tile_rows
    lhs_p = jnp.pad(lhs, ((0, padded - rows), (0, 0)))

    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first_tile = starts // tile_rows
    last_tile = jnp.maximum(ends - 1, 0) // tile_rows
    visits_per_group = jnp.where(group_sizes > 0, last_tile - first_tile + 1, 0)
    visit_offsets = jnp.cumsum(visits_per_group) - visits_per_group
    total_visits = jnp.sum(visits_per_group)

    num_visits = num_tiles + min(num_groups, rows) - 1  # static upper bound
    visit = jnp.arange(num_visits)
    visit_group = jnp.searchsorted(jnp.cumsum(visits_per_group), visit, side="right")
    visit_group = jnp.minimum(visit_group, num_groups - 1).astype(jnp.int32)
    visit_tile = first_tile[visit_group] + visit - visit_offsets[visit_group]
    visit_live = visit < total_visits
    # Dead visits repeat the last live one with an empty mask, so they touch no new memory.
    last_live = jnp.maximum(total_visits - 1, 0)
    visit_group = jnp.where(visit_live, visit_group, visit_group[last_live])
    visit_tile = jnp.clip(jnp.where(visit_live, visit_tile, visit_tile[last_live]), 0, num_tiles - 1)

    def body(out, inputs):
        tile, group, live = inputs
        row0 = tile * tile_rows
        x = jax.lax.dynamic_slice_in_dim(lhs_p, row0, tile_rows, axis=0)
        y = jnp.dot(x, rhs[group], preferred_element_type=jnp.float32)
        row_ids = row0 + jnp.arange(tile_rows)
        keep = live & (row_ids >= starts[group]) & (row_ids < ends[group])
        current = jax.lax.dynamic_slice_in_dim(out, row0, tile_rows, axis=0)
        out = jax.lax.dynamic_update_slice_in_dim(out, current + jnp.where(keep[:, None], y, 0.0), row0, axis=0)
        return out, None

    out0 = jnp.zeros((padded, n), jnp.float32)
    out, _ = jax.lax.scan(body, out0, (visit_tile, visit_group, visit_live))
    return out[:rows].astype(lhs.dtype)


def _resolve(impl: str) -> str:
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "tiled"
    return impl


@functools.partial(jax.jit, static_argnames=("impl",))
def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: str = "auto") -> jax.Array:
    """(R, K) x (G, K, N) grouped by `group_sizes` (G,) -> (R, N) in lhs's dtype (fp32 accumulation)."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(
            f"grouped_matmul expects lhs (R, K), rhs (G, K, N), group_sizes (G,); got "
            f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}"
        )
    impl = _resolve(impl)
    if impl in ("pallas", "pallas_interpret"):
        import pallas_kernels  # noqa: PLC0415

        return pallas_kernels.grouped_matmul(lhs, rhs, group_sizes, interpret=impl == "pallas_interpret")
    if impl == "ragged_dot":
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
        return out.astype(lhs.dtype)
    if impl != "tiled":
        raise ValueError(f"grouped_matmul impl {impl!r}; expected auto, tiled, ragged_dot, pallas, pallas_interpret")
    if lhs.shape[0] <= _PER_ROW_MAX_ROWS:
        return _per_row(lhs, rhs, group_sizes)
    return _tiled(lhs, rhs, group_sizes, _tile_rows(lhs.shape[0]))


def _matrix(weights, layer, group, dtype):
    """weights[layer, group] (or weights[group]) as a (K, N) matrix, copying only that matrix."""
    if layer is None:
        return jax.lax.dynamic_index_in_dim(weights, group, axis=0, keepdims=False).astype(dtype)
    k, n = weights.shape[-2:]
    return jax.lax.dynamic_slice(weights, (layer, group, 0, 0), (1, 1, k, n))[0, 0].astype(dtype)


def _swiglu_visits(out, x, gate_w, up_w, down_w, group_sizes, layer, tiles: tuple[int, ...], max_rows: int):
    """Writes each group's rows of `out` (rows sorted by group) with their SwiGLU, tile by tile.

    `tiles`: one or two tile heights, tallest first. A group's rows are covered by tiles of the
    first height as far as they fill them (a last, partial one taken when it would waste fewer rows
    than the second height), the rest by tiles of the second height, so the masked waste stays under
    the shortest tile per group. A group's visits run back to back and its three matrices are copied
    out of the stacks once, at its first visit (they stay in the loop carry). Rows of `out` that no
    group covers are left as they are. `max_rows` is a static bound on sum(group_sizes).
    """
    if not (len(tiles) == 1 or (len(tiles) == 2 and tiles[0] >= 2 * tiles[1])):
        # Three heights made the visit's `lax.switch` 1.5-1.9x slower on the benchmark prefill.
        # A tall tile at least twice the short one covers more rows per visit than a short one,
        # which the static bound on visits below relies on.
        raise ValueError(f"one or two tile heights (the first at least twice the second), got {tiles}")
    rows = x.shape[0]
    num_groups = gate_w.shape[-3]
    dtype = x.dtype
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    small = tiles[-1]
    # Per group and height: number of visits and the first row they cover.
    counts, firsts = [], []
    left, first, bound_rows, num_visits = sizes, starts, max_rows, 0
    for tile in tiles:
        last = tile == small
        count = -(-left // tile) if last else left // tile + (left % tile > tile - small)
        covered = left if last else jnp.minimum(left, count * tile)
        counts.append(count)
        firsts.append(first)
        # sum_g ceil(n_g / t) <= sum_g n_g / t + (number of non-empty groups): a static bound.
        num_visits += -(-bound_rows // tile) + min(num_groups, bound_rows)
        left, first = left - covered, first + covered
        bound_rows = min(bound_rows, num_groups * (tile - small))  # what a group can leave below
    counts = jnp.stack(counts, axis=1)  # (G, heights)
    per_group = jnp.sum(counts, axis=1)
    visit_ends = jnp.cumsum(per_group)
    total_visits = visit_ends[-1]
    num_visits = min(num_visits, -(-max_rows // small) + min(num_groups, max_rows))
    if num_visits == 0:
        return out
    # Visits run in chunks, each skipped whole when it holds no live visit: the bound is loose (most
    # of it dead when groups are balanced) and a dead visit still costs a loop trip.
    chunk = min(_VISIT_CHUNK, num_visits)
    num_chunks = -(-num_visits // chunk)
    visit = jnp.arange(num_chunks * chunk, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(visit_ends, visit, side="right"), num_groups - 1).astype(jnp.int32)
    j = visit - (visit_ends - per_group)[group]  # visit number within its group
    count_ends = jnp.cumsum(counts, axis=1)[group]  # (V, heights)
    height = jnp.minimum(jnp.sum(j[:, None] >= count_ends, axis=1), len(tiles) - 1).astype(jnp.int32)
    j_in_height = j - jnp.take_along_axis(count_ends - counts[group], height[:, None], axis=1)[:, 0]
    first_row = jnp.take_along_axis(jnp.stack(firsts, axis=1)[group], height[:, None], axis=1)[:, 0]
    row0 = first_row + j_in_height * jnp.asarray(tiles, jnp.int32)[height]
    live = visit < total_visits
    plan = jnp.stack([group, row0, height, live.astype(jnp.int32)], axis=1).reshape(num_chunks, chunk, 4)

    def matrices(group):
        return tuple(_matrix(w, layer, group, dtype) for w in (gate_w, up_w, down_w))

    def tile_swiglu(tile_rows):
        def run(out, weights, group, row0):
            # A tile that would run past the last row is moved back to end there; the rows it then
            # covers in front of its range are masked off like the rows past the group's end.
            tile0 = jnp.clip(row0, 0, rows - tile_rows)
            x_tile = jax.lax.dynamic_slice_in_dim(x, tile0, tile_rows, axis=0)
            w_gate, w_up, w_down = weights
            gate = jnp.dot(x_tile, w_gate, preferred_element_type=jnp.float32).astype(dtype)
            up = jnp.dot(x_tile, w_up, preferred_element_type=jnp.float32).astype(dtype)
            y = jnp.dot(jax.nn.silu(gate) * up, w_down, preferred_element_type=jnp.float32).astype(dtype)
            row = tile0 + jnp.arange(tile_rows)
            keep = (row >= row0) & (row < ends[group])
            current = jax.lax.dynamic_slice_in_dim(out, tile0, tile_rows, axis=0)
            return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep[:, None], y, current), tile0, axis=0)
        return run

    branches = [tile_swiglu(t) for t in tiles]
    # Inside shard_map (check_vma=True) a computed tile varies over the mesh axes its inputs vary
    # over; the carry, and so a skipped visit's pass-through branch, must be typed the same.
    # Outside shard_map there are no such axes and the program is unchanged.
    varying = varying_axes(x, gate_w, up_w, down_w, group_sizes)

    def visit_one(carry, step):
        group, row0, height, live = step[0], step[1], step[2], step[3]

        def compute(carry):
            out, weights, current = carry
            weights = jax.lax.cond(group != current, lambda w: matrices(group), lambda w: w, weights)
            if len(branches) == 1:
                out = branches[0](out, weights, group, row0)
            else:
                out = jax.lax.switch(height, branches, out, weights, group, row0)
            return out, weights, _vary_over(group, varying)

        return jax.lax.cond(live > 0, compute, lambda c: c, carry), None

    def run_chunk(carry, steps):
        def run(carry):
            return jax.lax.scan(visit_one, carry, steps)[0]

        return jax.lax.cond(steps[0, 3] > 0, run, lambda c: c, carry), None

    weights0 = tuple(jnp.zeros(w.shape[-2:], dtype) for w in (gate_w, up_w, down_w))
    carry = jax.tree.map(lambda a: _vary_over(a, varying), (out, weights0, jnp.int32(-1)))
    return jax.lax.scan(run_chunk, carry, plan)[0][0]


_VISIT_CHUNK = 8


def _swiglu_tiled(x, gate_w, up_w, down_w, group_sizes, layer, max_group_size, tiles=None):
    """The CPU path of `grouped_swiglu`: tall tiles where groups are large, short ones for the rest.

    `tiles`: one or two heights, tallest first (default `_swiglu_tile_ladder`), see `_swiglu_visits`;
    the masked waste stays under the shortest tile per group while most rows run in tall products
    (measured on the benchmark prefill: 128-row products ran 1.34x faster than 32-row ones, a visit
    repacking its matrices once per product).
    """
    rows, _ = x.shape
    num_groups = gate_w.shape[-3]
    sizes = group_sizes.astype(jnp.int32)
    if tiles is None:
        tiles = _swiglu_tile_ladder(rows, num_groups, max_group_size)
    bound = rows if max_group_size is None else min(rows, num_groups * max_group_size)
    # Every row in a group gets written; the rest must come out as zeros. Starting from a copy of x
    # (when the shapes allow) and masking at the end lets XLA fuse the mask into the consumer instead
    # of filling a fresh buffer with zeros first.
    reuse_x = down_w.shape[-1] == x.shape[1]
    out = x if reuse_x else jnp.zeros((rows, down_w.shape[-1]), x.dtype)
    out = _swiglu_visits(out, x, gate_w, up_w, down_w, sizes, layer, tuple(tiles), bound)
    if reuse_x:
        out = jnp.where((jnp.arange(rows) < jnp.sum(group_sizes))[:, None], out, jnp.zeros_like(out))
    return out


def _vary_over(a: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """`a` typed as varying over `axes` (inside shard_map; a no-op outside one)."""
    missing = tuple(ax for ax in axes if ax not in varying_axes(a))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


# Below this many rows (decode: tokens x top_k) the accelerator path gathers each row's three expert
# matrices straight from the (stacked) weights instead of running the grouped kernel on a copy of the
# layer's whole (G, D, F) stacks: at full size that copy is 1.2 GB per layer per step, and gathering
# instead halved a 32-token answer on an H200 (1.30 -> 0.60 s, bench/RESULTS.md).
GATHER_MAX_ROWS = 64


def _swiglu_gathered(x, gate_w, up_w, down_w, group_sizes, layer):
    """`grouped_swiglu` by gathering weights[layer, group of row] per row: reads R (D, F) matrices per
    projection, not G. For few rows only (the gather writes an (R, D, F) copy; its gradient is a
    scatter into the whole stack)."""
    num_groups = gate_w.shape[-3]
    dtype = x.dtype
    row_group = group_ids_of_rows(group_sizes.astype(jnp.int32), x.shape[0])
    live = row_group < num_groups  # padding rows past the groups come out as zeros
    row_group = jnp.minimum(row_group, num_groups - 1)

    def per_row(w):  # (R, in, out)
        return (w[row_group] if layer is None else w[layer, row_group]).astype(dtype)

    def apply(h, w):
        return jnp.einsum("rk,rkn->rn", h, per_row(w), preferred_element_type=jnp.float32).astype(dtype)

    y = apply(jax.nn.silu(apply(x, gate_w)) * apply(x, up_w), down_w)
    return jnp.where(live[:, None], y, jnp.zeros_like(y))


def _swiglu_tile_rows(rows: int, num_groups: int, max_group_size: int | None) -> int:
    """Tile height for the group-aligned loop.

    A group of n rows computes ceil(n / tile) * tile rows, so the masked waste is about tile / 2
    rows per group: a tile near a quarter of the mean group size keeps it near 12% while keeping
    tiles tall enough for an efficient matmul (measured on the benchmark prefill: a 256-row tile for
    128-row groups computed 2.25x the useful rows).
    """
    mean_group = max(1, rows // max(1, num_groups))
    tile = 1 << max(0, (mean_group // 4).bit_length() - 1)  # largest power of two <= mean / 4
    tile = min(max(tile, 16), 128)
    if max_group_size is not None:
        tile = min(tile, max_group_size)
    return max(1, min(tile, rows))


def _swiglu_tile_ladder(rows: int, num_groups: int, max_group_size: int | None) -> tuple[int, ...]:
    """Tile heights for `_swiglu_tiled`, tallest first: the `_swiglu_tile_rows` height t and, where
    groups are large enough on average to fill it, 4t above it."""
    small = _swiglu_tile_rows(rows, num_groups, max_group_size)
    big = 4 * small
    if big <= rows and (max_group_size is None or big <= max_group_size) and rows >= num_groups * small:
        return (big, small)
    return (small,)


def _use_cpu_kernel(x, gate_w, up_w, down_w, group_sizes) -> bool:
    """Float32 rows on CPU, outside multi-device meshes, where `cpu_kernels.expert_swiglu` is faster:
    few rows (decode: it reads each used expert once; XLA:CPU copies and repacks each, see the module
    docstring), and more rows (prefill) where its register tiles fit the widths on a CPU where they
    were measured faster (`cpu_kernels.expert_swiglu_prefill_faster`: AVX-512 ~1.6x, AVX2 + FMA
    ~1.3-1.5x XLA:CPU's products on the benchmark model's experts)."""
    if not cpu_kernel_allowed(x, gate_w, up_w, down_w) or varying_axes(group_sizes):
        return False
    if x.shape[0] <= CPU_KERNEL_MAX_ROWS:
        return True
    import cpu_kernels  # noqa: PLC0415  (numba compiles or loads its cache on first import)

    return cpu_kernels.expert_swiglu_prefill_faster(gate_w, down_w)


def grouped_swiglu(
    x: jax.Array,
    gate_w: jax.Array,
    up_w: jax.Array,
    down_w: jax.Array,
    group_sizes: jax.Array,
    *,
    impl: str = "auto",
    layer: jax.Array | int | None = None,
    max_group_size: int | None = None,
) -> jax.Array:
    """SwiGLU experts on rows sorted by group: down(silu(x @ gate) * (x @ up)) per group.

    x (R, D) sorted by group; gate_w, up_w ([L,] G, D, F); down_w ([L,] G, F, D'); group_sizes (G,).
    With `layer`, the weights carry a leading layers axis and `layer` selects one (see the module
    docstring for why). `max_group_size` is a static bound on any group's size (the token count for
    top-k routing, where a token picks an expert at most once); it caps the CPU tile. Rows past
    `sum(group_sizes)` come out as zeros. Returns (R, D') in x's dtype.
    """
    stacked = layer is not None
    if gate_w.ndim != 3 + stacked or up_w.shape != gate_w.shape or down_w.ndim != gate_w.ndim:
        raise ValueError(
            f"grouped_swiglu expects gate/up ({'L, ' if stacked else ''}G, D, F) and down of the same rank; got "
            f"{gate_w.shape}, {up_w.shape}, {down_w.shape} (layer={'given' if stacked else 'None'})"
        )
    dtype = x.dtype
    if impl == "auto" and _use_cpu_kernel(x, gate_w, up_w, down_w, group_sizes):
        import cpu_kernels  # noqa: PLC0415  (numba compiles or loads its cache on first import)

        return cpu_kernels.expert_swiglu(x, gate_w, up_w, down_w, group_sizes, layer)
    impl = _resolve(impl)
    if impl == "pallas" and x.shape[0] <= GATHER_MAX_ROWS:
        return _swiglu_gathered(x, gate_w, up_w, down_w, group_sizes, layer)
    if impl != "tiled":
        if stacked:
            gate_w, up_w, down_w = (jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)
                                    for w in (gate_w, up_w, down_w))
        gate_w, up_w, down_w = (w.astype(dtype) for w in (gate_w, up_w, down_w))
        gate = grouped_matmul(x, gate_w, group_sizes, impl=impl)
        up = grouped_matmul(x, up_w, group_sizes, impl=impl)
        return grouped_matmul(jax.nn.silu(gate) * up, down_w, group_sizes, impl=impl)
    return _swiglu_tiled(x, gate_w, up_w, down_w, group_sizes, layer, max_group_size)
