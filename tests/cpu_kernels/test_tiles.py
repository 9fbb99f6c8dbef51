"""The register-tiled product (`cpu_kernels._tiles.product_into`): c[rows] = a[rows] @ b for every
row count's tile remainder, on a block of rows inside larger arrays, with b of several tile widths."""

import numpy as np
import pytest
from numba import njit

from cpu_kernels._tiles import TILE_ROWS, TILE_WIDTH, product_into


@njit
def _product_into(a, b, c, row0, rows):
    product_into(a, b, c, row0, rows)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, TILE_ROWS, TILE_ROWS + 1, 4 * TILE_ROWS + 5])
@pytest.mark.parametrize("depth,width", [(1, TILE_WIDTH), (37, 2 * TILE_WIDTH), (256, 3 * TILE_WIDTH)])
def test_writes_the_float64_product_to_the_rows_and_nothing_else(rows, depth, width):
    rng = np.random.default_rng(rows * 1000 + depth)
    row0 = 3  # a block inside the arrays: rows before and after it stay as they were
    a = rng.standard_normal((row0 + rows + 2, depth)).astype(np.float32)
    b = rng.standard_normal((depth, width)).astype(np.float32)
    c = rng.standard_normal((a.shape[0], width)).astype(np.float32)
    before = c.copy()
    _product_into(a, b, c, row0, rows)
    block = slice(row0, row0 + rows)
    want = a[block].astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(c[block], want, rtol=1e-5, atol=1e-5 * np.sqrt(depth))
    np.testing.assert_array_equal(c[:row0], before[:row0])
    np.testing.assert_array_equal(c[row0 + rows:], before[row0 + rows:])


def test_zero_rows_change_nothing():
    a, b = np.ones((4, 8), np.float32), np.ones((8, TILE_WIDTH), np.float32)
    c = np.full((4, TILE_WIDTH), 2.0, np.float32)
    _product_into(a, b, c, 1, 0)
    assert (c == 2.0).all()
