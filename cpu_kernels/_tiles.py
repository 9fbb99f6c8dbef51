"""Register-blocked float32 matrix products for the kernels: c[rows] = a[rows] @ b, b's width a
multiple of `TILE_WIDTH`.

numba's loops keep a product's accumulators in memory (a load and a store per multiply-add), which
held row-blocked products at 48-113 GFLOP/s on two cores of a Xeon where XLA reaches ~180-230 and
torch ~300-400 (`bench/RESULTS.md`). Here the innermost loop is written in LLVM IR (a numba
intrinsic): a tile of up to `TILE_ROWS` rows x 64 columns of c lives in vector registers
(6 x 4 vectors of 16 floats: 24 of AVX-512's 32 registers) while the loop runs down the contraction,
each step loading one 64-wide row of b once for all the tile's rows and broadcasting one element of
a per row: 24 fused multiply-adds per 4 vector loads and 6 broadcasts. On that machine it ran a
(132 or 264) x 512 x 256 product at 368-376 GFLOP/s on two cores (85% of their peak).

Numerics: float32, each output a sequential sum over the contraction in order, with fused
multiply-adds (one rounding per step).

Without AVX-512 the tile is 6 x 16 in 8-float vectors (the AVX2 register file); the compiled code
follows numba's target, so its cache is per CPU as well.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.extending import intrinsic


def _target_features() -> frozenset[str]:
    """The CPU features numba compiles for (its NUMBA_CPU_FEATURES if set, else the host's), as
    LLVM spells them ("+avx2", "-avx512f", ...)."""
    return frozenset((numba_config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()).split(","))


TARGET_FEATURES = _target_features()


# A tile: TILE_ROWS rows x _VECTORS vectors of _LANES floats in registers. AVX-512 (32 registers of
# 16 floats): 6 x 4 vectors, 24 accumulators. AVX2 (16 registers of 8): 6 x 2, 12 accumulators; the
# AVX-512 shape there spilled (158 GFLOP/s on two cores, compiled for AVX2 on the Xeon).
TILE_ROWS = 6
WIDE_VECTORS = "+avx512f" in TARGET_FEATURES
_LANES, _VECTORS = (16, 4) if WIDE_VECTORS else (8, 2)
_BLOCK_COLUMNS = _LANES * _VECTORS
# Widths `product_into` takes: a multiple of every machine's block, so that which products run here
# does not depend on the CPU.
TILE_WIDTH = 64


def _tile_intrinsic(tile_rows: int):
    """An intrinsic tile(a_at, lda, b_at, ldb, c_at, ldc, depth): c[0:tile_rows, 0:_BLOCK_COLUMNS] =
    a[0:tile_rows, 0:depth] @ b[0:depth, 0:_BLOCK_COLUMNS], operands given as byte addresses (int64) and
    row strides in floats (int64), row-major float32."""

    @intrinsic
    def tile(typingctx, a_at, lda, b_at, ldb, c_at, ldc, depth):
        sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            a_int, lda_v, b_int, ldb_v, c_int, ldc_v, depth_v = args
            f32, i64 = ir.FloatType(), ir.IntType(64)
            vec = ir.VectorType(f32, _LANES)
            vec_ptr = vec.as_pointer()
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 f"llvm.fma.v{_LANES}f32")
            a_p = builder.inttoptr(a_int, f32.as_pointer())
            b_p = builder.inttoptr(b_int, f32.as_pointer())
            c_p = builder.inttoptr(c_int, f32.as_pointer())
            # Accumulators as stack slots: LLVM promotes them to registers (checked in the assembly:
            # the loop body is 4 loads, `tile_rows` broadcasts and 4 * tile_rows vfmadd231ps).
            accumulators = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(_VECTORS)]
                            for _ in range(tile_rows)]
            splat = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES)
            with cgutils.for_range(builder, depth_v) as loop:
                k = loop.index
                b_row = builder.gep(b_p, [builder.mul(k, ldb_v)])
                b_vectors = [builder.load(builder.bitcast(builder.gep(b_row, [ir.Constant(i64, j * _LANES)]), vec_ptr),
                                          align=4) for j in range(_VECTORS)]
                for t in range(tile_rows):
                    a_value = builder.load(builder.gep(a_p, [builder.add(builder.mul(ir.Constant(i64, t), lda_v), k)]))
                    a_vector = builder.insert_element(ir.Constant(vec, ir.Undefined), a_value, ir.Constant(ir.IntType(32), 0))
                    a_vector = builder.shuffle_vector(a_vector, ir.Constant(vec, ir.Undefined), splat)
                    for j in range(_VECTORS):
                        slot = accumulators[t][j]
                        builder.store(builder.call(fma, [a_vector, b_vectors[j], builder.load(slot)]), slot)
            for t in range(tile_rows):
                c_row = builder.gep(c_p, [builder.mul(ir.Constant(i64, t), ldc_v)])
                for j in range(_VECTORS):
                    at = builder.bitcast(builder.gep(c_row, [ir.Constant(i64, j * _LANES)]), vec_ptr)
                    builder.store(builder.load(accumulators[t][j]), at, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile6, _tile5, _tile4 = _tile_intrinsic(6), _tile_intrinsic(5), _tile_intrinsic(4)
_tile3, _tile2, _tile1 = _tile_intrinsic(3), _tile_intrinsic(2), _tile_intrinsic(1)


# AVX2 tiles load b as one 64-byte line per contraction step, at b's row stride: for the experts'
# widths (256 and 512 floats, 1-2 KiB strides) those lines fall in a few of L1's sets and evict each
# other, so every tile re-reads its block from L2 or beyond. Copying the block once into contiguous
# scratch (K x 16 floats) for all of a task's row tiles took a 264 x 512 x 256 product in 132-row
# halves from 90-111 to 119-143 GFLOP/s on a 2-core Zen 3 (session 12; the tiles reach 155-175 with
# everything in L1). The AVX-512 tile reads 4 adjacent lines a step and was measured (Xeon) without
# the copy, which is kept there.
PACK_COLUMN_BLOCKS = not WIDE_VECTORS
# Packing costs one pass over the block; below this many rows the tiles would read it about as
# often as the copy does.
_PACK_MIN_ROWS = 2 * TILE_ROWS


@njit(cache=True, inline="always")
def _tiles_down(a_at, lda, b_block, ldb, c_at, ldc, rows, depth):
    """c[0:rows, 0:_BLOCK_COLUMNS] = a[0:rows] @ b_block, TILE_ROWS rows at a time then the remainder
    (byte addresses and strides in floats, as the tile intrinsics)."""
    r = 0
    while r + TILE_ROWS <= rows:
        _tile6(a_at + r * lda * 4, lda, b_block, ldb, c_at + r * ldc * 4, ldc, depth)
        r += TILE_ROWS
    left = rows - r
    a_tile, c_tile = a_at + r * lda * 4, c_at + r * ldc * 4
    if left == 5:
        _tile5(a_tile, lda, b_block, ldb, c_tile, ldc, depth)
    elif left == 4:
        _tile4(a_tile, lda, b_block, ldb, c_tile, ldc, depth)
    elif left == 3:
        _tile3(a_tile, lda, b_block, ldb, c_tile, ldc, depth)
    elif left == 2:
        _tile2(a_tile, lda, b_block, ldb, c_tile, ldc, depth)
    elif left == 1:
        _tile1(a_tile, lda, b_block, ldb, c_tile, ldc, depth)


@njit(cache=True, inline="always")
def product_into(a, b, c, row0, rows):
    """c[row0:row0 + rows] = a[row0:row0 + rows] @ b, in tiles held in registers.

    a (R, K), b (K, N), c (R, N): C-contiguous float32, N a multiple of TILE_WIDTH, rows in bounds
    (the caller's to check: this reads raw addresses). Column blocks outermost, so a block of b
    (K x _BLOCK_COLUMNS) stays in cache for all the rows; on AVX2, copied first into contiguous
    scratch (`PACK_COLUMN_BLOCKS`). The copy changes no result: each output is the same sequence of
    fused multiply-adds."""
    depth = np.int64(a.shape[1])
    width = np.int64(b.shape[1])
    a_at = np.int64(a.ctypes.data) + np.int64(row0) * depth * 4
    b_at = np.int64(b.ctypes.data)
    c_at = np.int64(c.ctypes.data) + np.int64(row0) * width * 4
    if PACK_COLUMN_BLOCKS and rows >= _PACK_MIN_ROWS:
        block = np.empty((depth, _BLOCK_COLUMNS), np.float32)
        block_at = np.int64(block.ctypes.data)
        for column in range(0, width, _BLOCK_COLUMNS):
            block[:, :] = b[:, column:column + _BLOCK_COLUMNS]
            _tiles_down(a_at, depth, block_at, np.int64(_BLOCK_COLUMNS), c_at + column * 4, width, rows, depth)
    else:
        for column in range(0, width, _BLOCK_COLUMNS):
            _tiles_down(a_at, depth, b_at + column * 4, width, c_at + column * 4, width, rows, depth)
