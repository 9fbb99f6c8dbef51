"""Grouped matmul kernels vs the reference, forward and both gradients, interpret mode on CPU.

Tolerances (max |kernel - oracle| / max |oracle| per output and gradient):
  fp32: <= 1e-5 against the fp32 reference (observed ~1e-7 .. 1e-6).
  bf16: against the fp32 reference on the same bf16-rounded inputs, at most 2x the bf16
        reference's own error plus 4e-3 (the output is rounded to bf16: 2^-9 relative).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pallas_kernels
from pallas_kernels import GroupedMatmulTiling
from pallas_kernels.grouped_matmul import make_group_metadata

FP32_TOL = 1e-5
BF16_SLACK = 4e-3

_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _rel_err(a, b) -> float:
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  if b.size == 0:
    return 0.0
  scale = float(np.max(np.abs(b)))
  err = float(np.max(np.abs(a - b)))
  return err / scale if scale > 0 else err


def _compile_fast(jitted, *args):
  """Compile on CPU at XLA optimisation level 0 (interpret-mode compile time dominates)."""
  lowered = jitted.trace(*args).lower()
  if jax.default_backend() == "cpu":
    try:
      return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    except Exception:
      pass
  return lowered.compile()


def _values_and_grads(fns, lhs, rhs, group_sizes, cotangent):
  """For each (fn, cast dtype): fn(lhs, rhs, group_sizes) and the vjp of `cotangent`."""
  def run(lhs, rhs, group_sizes, cotangent):
    res = []
    for fn, dtype in fns:
      l, r = (lhs, rhs) if dtype is None else (lhs.astype(dtype), rhs.astype(dtype))
      out, vjp = jax.vjp(lambda l, r: fn(l, r, group_sizes), l, r)
      res.append((out,) + vjp(cotangent.astype(out.dtype)))
    return res
  args = (lhs, rhs, group_sizes, cotangent)
  # Highest matmul precision: on a GPU backend XLA's default fp32 dot is TF32.
  with jax.default_matmul_precision("highest"):
    return _compile_fast(jax.jit(run), *args)(*args)


def check_against_reference(lhs, rhs, group_sizes, cotangent, *, implementation, tiling):
  kernel = functools.partial(pallas_kernels.grouped_matmul, interpret=True,
                             implementation=implementation, tiling=tiling)
  ref = pallas_kernels.grouped_matmul_reference
  fns = [(kernel, None), (ref, jnp.float32)]
  if lhs.dtype != jnp.float32:
    fns.append((ref, None))
  got, want32, *want16 = _values_and_grads(tuple(fns), lhs, rhs, group_sizes, cotangent)
  assert got[0].shape == (lhs.shape[0], rhs.shape[2]) and got[0].dtype == lhs.dtype
  assert got[1].shape == lhs.shape and got[1].dtype == lhs.dtype
  assert got[2].shape == rhs.shape and got[2].dtype == rhs.dtype
  names = ("out", "dlhs", "drhs")
  for i, name in enumerate(names):
    g = np.asarray(got[i], np.float32)
    assert np.all(np.isfinite(g)), name
    if lhs.dtype == jnp.float32:
      assert _rel_err(g, want32[i]) <= FP32_TOL, (name, _rel_err(g, want32[i]))
    else:
      bound = 2 * _rel_err(want16[0][i], want32[i]) + BF16_SLACK
      assert _rel_err(g, want32[i]) <= bound, (name, _rel_err(g, want32[i]), bound)
  # Rows past the groups are padding: exactly zero output and zero gradient.
  used = int(np.sum(np.asarray(group_sizes)))
  assert np.all(np.asarray(got[0], np.float32)[used:] == 0)
  assert np.all(np.asarray(got[1], np.float32)[used:] == 0)
  return got


@st.composite
def gmm_problems(draw):
  rows = draw(st.integers(1, 64))
  groups = draw(st.integers(1, 6))
  k = draw(st.integers(1, 40))
  n = draw(st.integers(1, 40))
  # Group sizes: cut [0, total] at sorted points (repeats -> empty groups); total < rows
  # leaves padding rows.
  total = draw(st.one_of(st.just(rows), st.integers(0, rows)))
  cuts = sorted(draw(st.lists(st.integers(0, total), min_size=groups - 1,
                              max_size=groups - 1)))
  sizes = np.diff(np.array([0] + cuts + [total]))
  tiling = GroupedMatmulTiling(tm=draw(st.sampled_from([16, 32])),
                               tk=draw(st.sampled_from([16, 32])),
                               tn=draw(st.sampled_from([16, 32])))
  return dict(rows=rows, k=k, n=n, sizes=sizes, tiling=tiling, seed=draw(st.integers(0, 999)))


def _make(p, dtype):
  # numpy RNG: eager jax.random calls would compile anew for every drawn shape.
  rng = np.random.default_rng(p["seed"])
  groups = len(p["sizes"])
  lhs = jnp.asarray(rng.standard_normal((p["rows"], p["k"]), np.float32), dtype)
  rhs = jnp.asarray(rng.standard_normal((groups, p["k"], p["n"]), np.float32), dtype)
  ct = jnp.asarray(rng.standard_normal((p["rows"], p["n"]), np.float32))
  return lhs, rhs, jnp.asarray(p["sizes"], jnp.int32), ct


@settings(max_examples=12, **_SETTINGS)
@given(p=gmm_problems())
def test_gpu_kernels_fp32_match_reference(p):
  check_against_reference(*_make(p, jnp.float32), implementation="gpu", tiling=p["tiling"])


@settings(max_examples=8, **_SETTINGS)
@given(p=gmm_problems())
def test_gpu_kernels_bf16_match_reference(p):
  check_against_reference(*_make(p, jnp.bfloat16), implementation="gpu", tiling=p["tiling"])


@settings(max_examples=6, **_SETTINGS)
@given(p=gmm_problems(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_tpu_kernels_match_reference(p, dtype):
  check_against_reference(*_make(p, dtype), implementation="tpu", tiling=p["tiling"])


@pytest.mark.parametrize("implementation", ["gpu", "tpu"])
def test_expert_like_layout(implementation):
  # MoE-style: many groups, several empty, boundaries inside tiles, padding rows at the end.
  sizes = np.array([5, 0, 17, 3, 0, 0, 24, 1])
  p = dict(rows=56, k=32, n=48, sizes=sizes, seed=11,
           tiling=GroupedMatmulTiling(tm=16, tk=16, tn=16))
  got = check_against_reference(*_make(p, jnp.float32), implementation=implementation,
                                tiling=p["tiling"])
  # Empty experts get an exactly zero weight gradient.
  for g in np.flatnonzero(sizes == 0):
    assert np.all(np.asarray(got[2][g]) == 0)


def test_reference_matches_numpy_loop():
  rng = np.random.default_rng(0)
  sizes = np.array([3, 0, 4, 2])
  lhs = rng.standard_normal((11, 5)).astype(np.float32)
  rhs = rng.standard_normal((4, 5, 6)).astype(np.float32)
  want = np.zeros((11, 6), np.float32)
  start = 0
  for g, s in enumerate(sizes):
    want[start:start + s] = lhs[start:start + s] @ rhs[g]
    start += s
  got = jax.jit(pallas_kernels.grouped_matmul_reference)(lhs, rhs, jnp.asarray(sizes, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=100, **_SETTINGS)
@given(p=gmm_problems(), padding_group=st.booleans(), visit_empty=st.booleans())
def test_metadata_covers_every_row_once(p, padding_group, visit_empty):
  tm = p["tiling"].tm
  rows = -(-p["rows"] // tm) * tm
  sizes = p["sizes"]
  meta = make_group_metadata(  # numpy in, numpy out: no compilation per drawn shape
      np.asarray(sizes, np.int32), num_rows=rows, tm=tm, padding_group=padding_group,
      visit_empty_groups=visit_empty)
  n_vis = int(meta.num_visits[0])
  assert n_vis <= len(meta.visit_group)
  groups, tiles = meta.visit_group[:n_vis], meta.visit_tile[:n_vis]
  # Visits are ordered by tile (revisits consecutive) and by group.
  assert np.all(np.diff(tiles) >= 0) and np.all(np.diff(groups) >= 0)
  # Every row that belongs to a group is covered by exactly one visit of that group.
  covered = np.zeros(rows, int)
  for g, t in zip(groups, tiles):
    r = np.arange(t * tm, (t + 1) * tm)
    covered[r] += (r >= meta.offsets[g]) & (r < meta.offsets[g + 1])
  owned = rows if padding_group else int(np.sum(sizes))
  np.testing.assert_array_equal(covered, (np.arange(rows) < owned).astype(int))
  if visit_empty:
    assert set(np.flatnonzero(np.diff(meta.offsets) == 0)) <= set(groups.tolist())
  # No-op slots repeat the last real visit (and stay in bounds when there is none).
  if n_vis:
    assert np.all(meta.visit_group[n_vis:] == groups[-1])
    assert np.all(meta.visit_tile[n_vis:] == tiles[-1])
  assert np.all((meta.visit_tile >= 0) & (meta.visit_tile < rows // tm))


def test_rejects_bad_shapes():
  with pytest.raises(ValueError):
    pallas_kernels.grouped_matmul(jnp.zeros((4, 3)), jnp.zeros((2, 5, 6)),
                                  jnp.array([2, 2], jnp.int32), interpret=True)
