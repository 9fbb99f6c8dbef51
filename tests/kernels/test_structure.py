"""Kernel plumbing without running kernels: block skipping, dispatch, tile choice, reference.

Cheap tests, so hypothesis gets more examples here than in the kernel tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pallas_kernels
from pallas_kernels import _common
from pallas_kernels.grouped_matmul.tiling import GPU_DEFAULT, default_tiling, fit_tile
from pallas_kernels.windowed_attention.blocks import AttentionBlockSizes
from pallas_kernels.windowed_attention.masks import block_ranges

_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- block skipping


@st.composite
def range_problems(draw):
  seq = draw(st.integers(1, 200))
  block_q = draw(st.sampled_from([8, 16, 32]))
  block_k = draw(st.sampled_from([8, 16, 32]))
  padded = -(-seq // max(block_q, block_k)) * max(block_q, block_k)
  causal = draw(st.booleans())
  extent = st.one_of(st.none(), st.integers(-3, 80))
  window = draw(st.one_of(st.none(), st.tuples(extent, extent)))
  seg = None
  kind = draw(st.sampled_from(["none", "sorted", "unsorted", "windows"]))
  rng = np.random.default_rng(draw(st.integers(0, 999)))
  if kind == "sorted":
    seg = np.sort(rng.integers(0, 5, size=(2, seq)), axis=1)
  elif kind == "unsorted":
    seg = rng.integers(0, 3, size=(2, seq))
  elif kind == "windows":
    seg = np.broadcast_to(np.arange(seq) // draw(st.integers(1, 40)), (2, seq))
  return dict(seq=seq, padded=padded, block_q=block_q, block_k=block_k, causal=causal,
              window=window, seg=seg)


def _numpy_mask(seq, seg, causal, window, batch=2):
  """(batch, seq, seq) may query i see key j, written independently of the library."""
  i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
  allowed = np.ones((seq, seq), bool)
  left, right = window if window is not None else (None, None)
  if causal:
    right = 0 if right is None else min(right, 0)
  if left is not None:
    allowed &= j >= i - left
  if right is not None:
    allowed &= j <= i + right
  allowed = np.broadcast_to(allowed, (batch, seq, seq))
  if seg is not None:
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])
  return allowed


def _block_visits(p, transpose):
  seg = p["seg"]
  segp = None
  if seg is not None:  # numpy in, numpy out: no compilation per drawn shape
    segp = np.pad(seg, ((0, 0), (0, p["padded"] - p["seq"])), mode="edge").astype(np.int32)
  lo, hi, trips = block_ranges(segp, causal=p["causal"], window=p["window"],
                               padded_len=p["padded"], q_len=p["seq"], kv_len=p["seq"],
                               block_q=p["block_q"], block_k=p["block_k"], transpose=transpose)
  return np.asarray(lo), np.asarray(hi), trips


@settings(max_examples=100, **_SETTINGS)
@given(p=range_problems())
def test_block_ranges_cover_every_unmasked_entry(p):
  """No block holding an unmasked (query, key) pair may be skipped, in either direction."""
  seq, bq, bk = p["seq"], p["block_q"], p["block_k"]
  allowed = _numpy_mask(seq, p["seg"], p["causal"], p["window"])
  lo, hi, trips = _block_visits(p, transpose=False)
  lo_t, hi_t, trips_t = _block_visits(p, transpose=True)
  lo, hi = np.broadcast_to(lo, (2, lo.shape[-1])), np.broadcast_to(hi, (2, hi.shape[-1]))
  lo_t = np.broadcast_to(lo_t, (2, lo_t.shape[-1]))
  hi_t = np.broadcast_to(hi_t, (2, hi_t.shape[-1]))
  b, i, j = np.nonzero(allowed)
  assert np.all((lo[b, i // bq] <= j // bk) & (j // bk < hi[b, i // bq]))
  assert np.all((lo_t[b, j // bk] <= i // bq) & (i // bq < hi_t[b, j // bk]))
  assert np.all(hi - lo <= trips) and np.all(hi_t - lo_t <= trips_t)
  assert np.all(lo <= hi) and np.all(lo_t <= hi_t)


def test_block_ranges_skip_masked_blocks():
  """Cost follows the unmasked area: causal ~ half, windows ~ band, segments ~ diagonal."""
  n, blk = 1024, 64

  def visited(seg=None, **mask):
    segp = None if seg is None else seg[None].astype(np.int32)
    lo, hi, _ = block_ranges(segp, padded_len=n, q_len=n, kv_len=n, block_q=blk, block_k=blk,
                             **mask)
    return int(np.sum(hi - lo))

  def needed(seg=None, causal=False, window=None):
    """Block pairs holding at least one unmasked entry: the least any kernel must visit."""
    allowed = _numpy_mask(n, None if seg is None else seg[None], causal, window, batch=1)[0]
    return int(allowed.reshape(n // blk, blk, n // blk, blk).any(axis=(1, 3)).sum())

  assert visited(causal=False, window=None) == 16 * 16
  assert visited(causal=True, window=None) == needed(causal=True) == 16 * 17 // 2
  assert visited(causal=True, window=(71, 0)) == needed(causal=True, window=(71, 0))
  assert visited(causal=False, window=(52, 51)) == needed(window=(52, 51))
  # Audio-style windows of 104 tokens (sorted ids): exactly the blocks a window touches.
  audio = np.arange(n) // 104
  assert visited(audio, causal=False, window=None) == needed(audio) < 16 * 4


# ----------------------------------------------------------------------------- dispatch, tiles


def test_choose_implementation():
  assert _common.choose_implementation("tpu", False) == "tpu"
  assert _common.choose_implementation("reference", True) == "reference"
  with pytest.raises(ValueError):
    _common.choose_implementation("cuda", False)
  backend = jax.default_backend()
  expected = {"tpu": "tpu", "gpu": "gpu"}.get(backend)
  if expected is None:  # CPU: reference unless interpreting the Triton kernels
    assert _common.choose_implementation(None, False) == "reference"
    assert _common.choose_implementation(None, True) == "gpu"
  else:
    assert _common.choose_implementation(None, False) == expected


def test_device_kind_lookup_prefers_longest_match():
  table = {"TPU v5": 1, "TPU v5 lite": 2, "H100": 3}
  assert _common.lookup_by_device_kind(table, 0, "TPU v5 lite") == 2
  assert _common.lookup_by_device_kind(table, 0, "TPU v5p") == 1
  assert _common.lookup_by_device_kind(table, 0, "NVIDIA H100 80GB HBM3") == 3
  assert _common.lookup_by_device_kind(table, 0, "cpu") == 0
  assert default_tiling("gpu", "cpu") == GPU_DEFAULT
  assert default_tiling("gpu", "NVIDIA H200").tm == 128


def test_fit_tile():
  assert fit_tile(768, 512, "tpu") == 384  # no padding rather than 768 -> 1024
  assert fit_tile(2048, 512, "tpu") == 512
  assert fit_tile(32, 512, "tpu") == 128
  assert fit_tile(768, 128, "gpu") == 128
  assert fit_tile(20, 128, "gpu") == 32  # small dims: one power-of-two tile
  for dim in range(1, 300, 7):
    t = fit_tile(dim, 64, "gpu")
    assert t >= 16 and t & (t - 1) == 0


def test_attention_blocks_fit_short_sequences():
  b = AttentionBlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64).fitted(20)
  assert (b.block_q, b.block_k, b.block_q_bwd, b.block_k_bwd) == (32, 32, 32, 32)


# ----------------------------------------------------------------------------- reference oracle


def _numpy_attention(q, k, v, allowed, scale):
  rep = q.shape[2] // k.shape[2]
  k = np.repeat(k, rep, axis=2)
  v = np.repeat(v, rep, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  s = np.where(allowed[:, None], s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  p = np.exp(s - m)
  denom = p.sum(-1, keepdims=True)
  p = p / np.where(denom == 0, 1, denom)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("mask", [
    {}, {"causal": True}, {"window": (3, 2)}, {"causal": True, "window": (4, None)},
    {"segments": True}, {"window": (None, -1)},
])
def test_reference_matches_numpy(mask):
  rng = np.random.default_rng(0)
  b, s, hq, hkv, d = 2, 13, 4, 2, 8
  q = rng.standard_normal((b, s, hq, d))
  k = rng.standard_normal((b, s, hkv, d))
  v = rng.standard_normal((b, s, hkv, d))
  mask = dict(mask)
  seg = None
  if mask.pop("segments", False):
    seg = np.sort(rng.integers(0, 3, (b, s)), axis=1)
    mask["segment_ids"] = jnp.asarray(seg, jnp.int32)
  i, j = np.arange(s)[:, None], np.arange(s)[None, :]
  allowed = np.ones((s, s), bool)
  left, right = mask.get("window") or (None, None)
  if mask.get("causal"):
    right = 0 if right is None else min(right, 0)
  if left is not None:
    allowed &= j >= i - left
  if right is not None:
    allowed &= j <= i + right
  allowed = np.broadcast_to(allowed, (b, s, s))
  if seg is not None:
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])
  want = _numpy_attention(q, k, v, allowed, d ** -0.5)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got = jax.jit(lambda q, k, v: pallas_kernels.windowed_attention_reference(q, k, v, **mask))(
      f32(q), f32(k), f32(v))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
