"""Windowed attention kernels vs the pure-JAX reference, forward and gradients, interpret mode.

Every kernel test runs the Pallas kernels interpreted on CPU (`interpret=True`): the Triton
variant ('gpu') is the main subject, the Mosaic variant ('tpu') gets fewer examples since the
generic interpreter runs it too. Shapes are tiny (seq <= 64, head_dim 16-32, blocks 16/32) so
that the whole directory stays within its time budget; most of the cost is compilation.

Tolerances (errors are max |kernel - oracle| divided by max |oracle|, per output and gradient):
  fp32: <= 1e-5 against the fp32 reference (observed ~1e-6).
  bf16: against the fp32 reference evaluated on the same bf16-rounded inputs, the kernel may be
        at most 2x as far off as the bf16 reference itself, plus 4e-3 (~1 bf16 ulp at the
        output scale). Observed: kernel and bf16 reference both ~3e-3 .. 6e-3.
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
from pallas_kernels import AttentionBlockSizes

FP32_TOL = 1e-5
BF16_SLACK = 4e-3

_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _rel_err(a, b) -> float:
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  scale = float(np.max(np.abs(b))) if b.size else 0.0
  err = float(np.max(np.abs(a - b))) if b.size else 0.0
  return err / scale if scale > 0 else err


def _compile_fast(jitted, *args):
  """Compiles `jitted` for `args`, on CPU at XLA optimisation level 0.

  Interpret-mode kernels are big while-loops whose XLA compilation dominates test time; level 0
  cuts it by ~2.5x and the run time of these tiny shapes does not matter.
  """
  lowered = jitted.trace(*args).lower()
  if jax.default_backend() == "cpu":
    try:
      return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    except Exception:  # option unknown to this XLA: fall back to the defaults
      pass
  return lowered.compile()


def _vjp_all(fn, q, k, v, cotangent):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out,) + vjp(cotangent.astype(out.dtype))


def _value_and_grads(fns, q, k, v, cotangent):
  """For each fn: fn(q, k, v) and the gradients of <fn(q, k, v), cotangent>.

  `fns` is a tuple of (fn, cast dtype or None); all are compiled together as one program.
  """
  def run(q, k, v, cotangent):
    res = []
    for fn, dtype in fns:
      args = (q, k, v) if dtype is None else tuple(x.astype(dtype) for x in (q, k, v))
      res.append(_vjp_all(fn, *args, cotangent))
    return res
  # Highest matmul precision: on a GPU backend XLA's default fp32 dot is TF32.
  with jax.default_matmul_precision("highest"):
    return _compile_fast(jax.jit(run), q, k, v, cotangent)(q, k, v, cotangent)


def _make_inputs(seed, batch, seq, q_heads, kv_heads, head_dim, dtype):
  # numpy RNG: eager jax.random calls would compile anew for every drawn shape.
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  q = jnp.asarray(normal(batch, seq, q_heads, head_dim), dtype)
  k = jnp.asarray(normal(batch, seq, kv_heads, head_dim), dtype)
  v = jnp.asarray(normal(batch, seq, kv_heads, head_dim), dtype)
  ct = jnp.asarray(normal(batch, seq, q_heads, head_dim))
  return q, k, v, ct


def check_against_reference(q, k, v, ct, *, implementation, blocks, **mask):
  """Asserts kernel output and q/k/v gradients match the reference within the stated tolerance."""
  kernel = functools.partial(pallas_kernels.windowed_attention, interpret=True,
                             implementation=implementation, block_sizes=blocks, **mask)
  reference = functools.partial(pallas_kernels.windowed_attention_reference, **mask)
  fns = [(kernel, None), (reference, jnp.float32)]
  if q.dtype != jnp.float32:
    fns.append((reference, None))
  got, want32, *want16 = _value_and_grads(tuple(fns), q, k, v, ct)
  assert got[0].dtype == q.dtype and got[0].shape == q.shape
  for g, x in zip(got[1:], (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
  names = ("out", "dq", "dk", "dv")
  _assert_close(names, got, want32, want16[0] if want16 else None, q.dtype)
  return got, want32


def _assert_close(names, got, want32, want16, dtype):
  if dtype == jnp.float32:
    for name, g, w in zip(names, got, want32):
      assert np.all(np.isfinite(np.asarray(g))), name
      assert _rel_err(g, w) <= FP32_TOL, (name, _rel_err(g, w))
  else:
    for name, g, w16, w32 in zip(names, got, want16, want32):
      assert np.all(np.isfinite(np.asarray(g, np.float32))), name
      bound = 2 * _rel_err(w16, w32) + BF16_SLACK
      assert _rel_err(g, w32) <= bound, (name, _rel_err(g, w32), bound)


# ----------------------------------------------------------------------------- strategies


@st.composite
def mask_structures(draw, batch: int, seq: int):
  """Keyword arguments of one mask structure the model uses (or a stress variant of it)."""
  kind = draw(st.sampled_from([
      "none", "causal", "window", "causal_window", "segments", "block_diagonal_windows",
      "segments_causal", "unsorted_segments"]))
  extent = st.one_of(st.none(), st.integers(-2, seq))
  if kind == "none":
    return {}
  if kind == "causal":
    return {"causal": True}
  if kind == "window":
    return {"window": (draw(extent), draw(extent))}
  if kind == "causal_window":
    return {"causal": True, "window": (draw(st.integers(0, seq)), 0)}
  if kind == "block_diagonal_windows":  # audio encoder: attention within fixed-size windows
    width = draw(st.integers(3, 24))
    ids = np.broadcast_to(np.arange(seq) // width, (batch, seq))
    return {"segment_ids": jnp.asarray(ids, jnp.int32)}
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  if kind == "unsorted_segments":  # ids need not be sorted; block skipping must stay correct
    ids = rng.integers(0, 3, size=(batch, seq))
    return {"segment_ids": jnp.asarray(ids, jnp.int32)}
  ids = np.sort(rng.integers(0, 4, size=(batch, seq)), axis=1)  # packed sequences / frames
  out = {"segment_ids": jnp.asarray(ids, jnp.int32)}
  if kind == "segments_causal":
    out["causal"] = True
  return out


@st.composite
def attention_problems(draw, max_q_heads=4):
  batch = draw(st.integers(1, 2))
  seq = draw(st.integers(1, 64))
  kv_heads = draw(st.sampled_from([1, 2]))
  rep = draw(st.sampled_from([r for r in (1, 2, 4) if kv_heads * r <= max_q_heads]))
  head_dim = draw(st.sampled_from([16, 24, 32]))  # 24 exercises head-dim padding (Triton)
  blocks = AttentionBlockSizes(
      block_q=draw(st.sampled_from([16, 32])), block_k=draw(st.sampled_from([16, 32])),
      block_q_bwd=draw(st.sampled_from([16, 32])), block_k_bwd=draw(st.sampled_from([16, 32])))
  mask = draw(mask_structures(batch, seq))
  seed = draw(st.integers(0, 1000))
  return dict(batch=batch, seq=seq, q_heads=kv_heads * rep, kv_heads=kv_heads,
              head_dim=head_dim, blocks=blocks, mask=mask, seed=seed)


def _run_problem(p, dtype, implementation):
  q, k, v, ct = _make_inputs(p["seed"], p["batch"], p["seq"], p["q_heads"], p["kv_heads"],
                             p["head_dim"], dtype)
  check_against_reference(q, k, v, ct, implementation=implementation, blocks=p["blocks"],
                          **p["mask"])


# ----------------------------------------------------------------------------- property tests


@settings(max_examples=12, **_SETTINGS)
@given(p=attention_problems())
def test_gpu_kernels_fp32_match_reference(p):
  _run_problem(p, jnp.float32, "gpu")


@settings(max_examples=8, **_SETTINGS)
@given(p=attention_problems())
def test_gpu_kernels_bf16_match_reference(p):
  _run_problem(p, jnp.bfloat16, "gpu")


@settings(max_examples=6, **_SETTINGS)
@given(p=attention_problems(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_tpu_kernels_match_reference(p, dtype):
  _run_problem(p, dtype, "tpu")


# ----------------------------------------------------------------------------- the model's masks

_B16 = AttentionBlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)

# Miniatures of the model's attention layers (window/segment sizes scaled to seq <= 64).
MODEL_CASES = {
    # AuT: bidirectional attention inside windows of 13 tokens (104 in the real model),
    # with a short last window and a sequence that is not a multiple of the block.
    "audio_windows": dict(seq=45, q_heads=2, kv_heads=2, head_dim=16,
                          mask=lambda b, s: {"segment_ids": jnp.broadcast_to(
                              jnp.arange(s, dtype=jnp.int32) // 13, (b, s))}),
    # ViT: bidirectional within each frame/image (uneven frames).
    "vision_frames": dict(seq=50, q_heads=2, kv_heads=2, head_dim=24,
                          mask=lambda b, s: {"segment_ids": jnp.broadcast_to(jnp.asarray(
                              np.repeat(np.arange(3), [20, 12, 18]), jnp.int32), (b, s))}),
    # Code2Wav: causal sliding window of 9 tokens (72 in the real model).
    "code2wav_window": dict(seq=64, q_heads=2, kv_heads=2, head_dim=16,
                            mask=lambda b, s: {"causal": True, "window": (8, 0)}),
    # Thinker/talker decoder: causal GQA (32 q / 4 kv heads in the real model).
    "decoder_gqa": dict(seq=40, q_heads=4, kv_heads=1, head_dim=32,
                        mask=lambda b, s: {"causal": True}),
}


@pytest.mark.parametrize("implementation", ["gpu", "tpu"])
@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_mask_structures(case, implementation):
  c = MODEL_CASES[case]
  batch = 2
  q, k, v, ct = _make_inputs(7, batch, c["seq"], c["q_heads"], c["kv_heads"], c["head_dim"],
                             jnp.float32)
  check_against_reference(q, k, v, ct, implementation=implementation, blocks=_B16,
                          **c["mask"](batch, c["seq"]))


@pytest.mark.parametrize("implementation", ["gpu", "tpu"])
def test_fully_masked_rows_give_zero_and_finite_gradients(implementation):
  # window right = -1: query i sees keys < i only, so query 0 sees nothing; segment id -7 is
  # alone in its segment *and* excluded from itself, so that row is empty too.
  batch, seq = 1, 20
  q, k, v, ct = _make_inputs(3, batch, seq, 2, 2, 16, jnp.float32)
  seg = jnp.zeros((batch, seq), jnp.int32).at[:, 5].set(-7)
  mask = dict(window=(None, -1), segment_ids=seg)
  got, want = check_against_reference(q, k, v, ct, implementation=implementation,
                                      blocks=_B16, **mask)
  for res in (got, want):
    out = np.asarray(res[0])
    assert np.all(out[:, 0] == 0) and np.all(out[:, 5] == 0)
    for x in res:
      assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize("scale", [None, 0.3])
def test_scale(scale):
  q, k, v, ct = _make_inputs(5, 1, 24, 2, 1, 16, jnp.float32)
  check_against_reference(q, k, v, ct, implementation="gpu", blocks=_B16, scale=scale)


def test_default_scale_is_inverse_sqrt_head_dim():
  q, k, v, _ = _make_inputs(5, 1, 8, 2, 1, 16, jnp.float32)
  ref = jax.jit(pallas_kernels.windowed_attention_reference, static_argnames=("scale",))
  np.testing.assert_array_equal(np.asarray(ref(q, k, v)), np.asarray(ref(q, k, v, scale=0.25)))


def test_reference_on_cpu_without_interpret():
  # On CPU without interpret the entry point is the reference (what the model uses on CPU).
  if jax.default_backend() != "cpu":
    pytest.skip("on GPU/TPU the entry point runs the kernel by design; this test checks only the CPU fallback to the reference")
  q, k, v, _ = _make_inputs(1, 1, 10, 2, 2, 16, jnp.float32)
  got = jax.jit(functools.partial(pallas_kernels.windowed_attention, causal=True))(q, k, v)
  want = jax.jit(functools.partial(pallas_kernels.windowed_attention_reference, causal=True))(
      q, k, v)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_rejects_bad_shapes():
  q = jnp.zeros((1, 8, 3, 16))
  k = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match="multiple"):
    pallas_kernels.windowed_attention(q, k, k, interpret=True)
  with pytest.raises(ValueError, match="segment_ids"):
    pallas_kernels.windowed_attention(q, q, q, segment_ids=jnp.zeros((1, 7), jnp.int32),
                                      interpret=True)
