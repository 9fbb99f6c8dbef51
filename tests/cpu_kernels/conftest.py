"""The CPU kernels are CPU FFI targets: on a host whose default backend is a GPU or TPU, run these
tests on its CPU device (where `omni_jax` would run them)."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _on_cpu():
    with jax.default_device(jax.devices("cpu")[0]):
        yield
