"""The kernels' shared inline loops (`cpu_kernels._loops`)."""

import numpy as np

from cpu_kernels._loops import exp_nonpositive


def test_exponential_within_one_ulp_of_float64():
    from numba import njit  # noqa: PLC0415

    @njit
    def run(row, bits):
        exp_nonpositive(row, row.shape[0], bits)

    x = -np.concatenate([np.linspace(0, 87, 200_001), np.random.default_rng(0).exponential(4, 50_000) % 87])
    x = x.astype(np.float32)
    got = x.copy()
    run(got, np.zeros(got.shape, np.int32))
    want = np.exp(x.astype(np.float64))
    ulps = np.abs(got - want) / np.spacing(want.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 1.0, f"{ulps.max():.2f} ulp at x = {x[ulps.argmax()]}"
    below = np.array([-87.5, -100.0, -np.inf], np.float32)
    run(below, np.zeros(3, np.int32))
    assert np.all((below > 0) & (below < 2e-38))  # the caller zeroes masked slots itself
