"""numba's on-disk cache must not serve handlers compiled for another jaxlib's FFI API version, nor
kernels compiled with other versions of the helper modules they inline.

Each case runs fresh processes against a private numba cache (NUMBA_CACHE_DIR), so the checkout's
own cache is not touched.
"""

import glob
import os
import subprocess
import sys

import pytest

from cpu_kernels import ffi

# Runs the three kernels (so their handlers are compiled or loaded) and checks their results.
_RUN_KERNELS = """
import jax.numpy as jnp, numpy as np
import cpu_kernels
y = cpu_kernels.rows_matmul(jnp.ones((2, 3), jnp.float32), jnp.ones((3, 4), jnp.float32))
assert np.allclose(np.asarray(y), 3.0), y
w = jnp.ones((2, 3, 4), jnp.float32)
z = cpu_kernels.expert_swiglu(jnp.ones((2, 3), jnp.float32), w, w, jnp.ones((2, 4, 3), jnp.float32),
                              jnp.array([1, 1], jnp.int32))
assert z.shape == (2, 3) and np.isfinite(np.asarray(z)).all()
names = ("input_norm", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "o_proj")
shapes = ((1, 4), (1, 4, 4), (1, 4, 2), (1, 4, 2), (1, 2), (1, 2), (1, 4, 4))
weights = {n: jnp.ones(s, jnp.float32) for n, s in zip(names, shapes)}
cache = jnp.zeros((1, 1, 3, 1, 2), jnp.float32)
out, k, v = cpu_kernels.decode_attention(jnp.ones((1, 4), jnp.float32), jnp.ones((1, 2), jnp.float32),
                                         jnp.zeros((1, 2), jnp.float32), jnp.ones((1, 3), bool), 2, 0, weights,
                                         cache, cache, 1e-6)
assert np.isfinite(np.asarray(out)).all() and k.shape == v.shape == (1, 1, 2)
"""


def _run(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", _RUN_KERNELS], env=env, cwd=root, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _stamp(cache_dir, name=ffi.VERSION_STAMP):
    (stamp,) = glob.glob(os.path.join(cache_dir, "**", name), recursive=True)
    return stamp


def _handler_files(cache_dir):
    files = glob.glob(os.path.join(cache_dir, "**", "*._handler-*.nb[ic]"), recursive=True)
    return {path: os.stat(path).st_mtime_ns for path in files}


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("numba_cache")
    _run(cache_dir)
    return cache_dir


def test_a_fresh_cache_records_the_ffi_version(warm_cache):
    with open(_stamp(warm_cache)) as f:
        assert f.read() == "%d.%d" % ffi.api_version()
    names = {os.path.basename(p).split("-")[0] for p in _handler_files(warm_cache)}
    assert names == {"decode_attention._handler", "expert_swiglu._handler", "rows_matmul._handler"}


def test_handlers_cached_for_another_version_are_compiled_again(warm_cache):
    before = _handler_files(warm_cache)
    kernels_before = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(warm_cache, "**", "*.nbi"),
                                                                       recursive=True) if p not in before}
    with open(_stamp(warm_cache), "w") as f:
        f.write("0.0")  # as if the cache had been built against a jaxlib of FFI version 0.0
    _run(warm_cache)
    after = _handler_files(warm_cache)
    assert set(after) == set(before)  # the same handlers, written again ...
    assert all(after[p] > before[p] for p in before), (before, after)
    for path, mtime in kernels_before.items():  # ... while the kernels' own cache entries stay
        assert os.stat(path).st_mtime_ns == mtime, path
    with open(_stamp(warm_cache)) as f:
        assert f.read() == "%d.%d" % ffi.api_version()


def test_a_missing_stamp_is_written_without_touching_the_cache(warm_cache):
    os.remove(_stamp(warm_cache))
    before = _handler_files(warm_cache)
    _run(warm_cache)
    assert _handler_files(warm_cache) == before
    with open(_stamp(warm_cache)) as f:
        assert f.read() == "%d.%d" % ffi.api_version()


def _cache_files(cache_dir):
    files = glob.glob(os.path.join(cache_dir, "**", "*.nb[ic]"), recursive=True)
    return {path: os.stat(path).st_mtime_ns for path in files}


def test_kernels_cached_with_other_helpers_are_compiled_again(warm_cache):
    """After an edit to an inlined helper alone (`_loops`, `_tiles`, `ffi`), every kernel is compiled
    again: numba itself checks only each function's own source file."""
    with open(_stamp(warm_cache, ffi.HELPERS_STAMP)) as f:
        assert f.read() == ffi.helpers_digest()
    before = _cache_files(warm_cache)
    assert any("expert_swiglu._swiglu_groups" in path for path in before)
    with open(_stamp(warm_cache, ffi.HELPERS_STAMP), "w") as f:
        f.write("0" * 64)  # as if the cache had been built with other helpers
    _run(warm_cache)
    after = _cache_files(warm_cache)
    assert set(after) >= set(before)
    assert all(after[p] > before[p] for p in before), [p for p in before if after[p] <= before[p]]
    with open(_stamp(warm_cache, ffi.HELPERS_STAMP)) as f:
        assert f.read() == ffi.helpers_digest()
