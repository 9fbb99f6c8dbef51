"""Benchmark of the Pallas kernels against their XLA counterparts (a script, not a test).

    python bench/kernels.py                 # on a GPU/TPU: the model's real shapes
    python bench/kernels.py --smoke         # anywhere (CPU): tiny shapes, kernels interpreted
    python bench/kernels.py --only gmm --tokens 4096 16384 --json out.json

Grouped matmul, at the thinker's expert shapes (128 experts, hidden 2048 -> 768, top-8 routing,
4k..64k tokens, so 32k..512k rows), against `jax.lax.ragged_dot` and a dense matmul with the
same FLOPs (the roofline a grouped matmul should approach). Forward and forward+backward.

Windowed attention, against the XLA reference with the same mask (materialised scores) at the
model's mask structures: audio encoder (bidirectional windows of 104 tokens, 20 heads, head_dim
64), vision encoder (per-frame segments, 16 heads, head_dim 72 -> padded to 128 for Triton),
Code2Wav (causal window of 72, 16 heads, head_dim 64) and the decoder (causal, 32 q / 4 kv
heads, head_dim 128). TFLOP/s count only the unmasked (query, key) pairs ("useful" FLOPs):
forward 4 * d * pairs, forward+backward 14 * d * pairs (per head).

Times are the median of --iters runs after a warm-up, each synchronised with
block_until_ready. Output: a Markdown table (paste into bench/RESULTS.md) and optionally JSON.
In --smoke mode the numbers are meaningless (interpret mode on CPU); it only proves the script
and the kernels run end to end and agree with the references.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels  # noqa: E402


@dataclasses.dataclass
class Row:
  bench: str
  case: str
  impl: str
  pass_: str  # 'fwd' or 'fwd+bwd'
  ms: float
  tflops: float
  max_rel_err: float | None = None

  def __str__(self):
    err = "" if self.max_rel_err is None else f"  (max rel err vs XLA {self.max_rel_err:.1e})"
    return (f"{self.bench:15s} {self.case:45s} {self.impl:18s} {self.pass_:8s} "
            f"{self.ms:10.3f} ms {self.tflops:8.2f} TFLOP/s{err}")


def _time(fn, *args, iters: int) -> float:
  """Median wall time in ms of fn(*args) (compiled and warmed up first)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _rel_err(a, b) -> float:
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  scale = float(np.max(np.abs(b))) or 1.0
  return float(np.max(np.abs(a - b))) / scale


def _fwd_bwd(fn):
  """fn(*xs) -> out  ==>  (*xs, ct) -> grads of <out, ct> (forward + backward)."""
  def run(*args):
    *xs, ct = args
    out, vjp = jax.vjp(fn, *xs)
    return vjp(ct.astype(out.dtype))
  return run


# ----------------------------------------------------------------------------- grouped matmul


def route(tokens: int, experts: int, top_k: int, seed: int = 0) -> np.ndarray:
  """Rows per expert for `tokens` tokens routed top-k over skewed expert popularity."""
  rng = np.random.default_rng(seed)
  popularity = rng.dirichlet(np.full(experts, 2.0))
  gumbel = -np.log(-np.log(rng.uniform(size=(tokens, experts))))
  choice = np.argpartition(-(np.log(popularity) + gumbel), top_k, axis=1)[:, :top_k]
  return np.bincount(choice.ravel(), minlength=experts).astype(np.int32)


def _per_group_product(lhs, rhs, sizes):
  """The grouped product as one dense matmul per group (fp32 accumulation): the error reference.
  Not `ragged_dot`: on GPU (JAX 0.11) it lowers to a dense masked product that runs out of memory
  at 16k tokens."""
  ends = np.cumsum(np.asarray(sizes))
  parts = [jnp.dot(lhs[e - n:e], rhs[g], preferred_element_type=jnp.float32)
           for g, (n, e) in enumerate(zip(np.asarray(sizes), ends)) if n]
  return jnp.concatenate(parts + [jnp.zeros((lhs.shape[0] - ends[-1], rhs.shape[2]), jnp.float32)])


def bench_grouped_matmul(args, interpret: bool) -> list[Row]:
  rows_out = []
  dtype = jnp.dtype(args.dtype)
  experts, hidden, inter, top_k = args.experts, args.hidden, args.intermediate, args.top_k
  gmm = jax.jit(functools.partial(pallas_kernels.grouped_matmul, interpret=interpret))
  ragged = jax.jit(functools.partial(jax.lax.ragged_dot, preferred_element_type=jnp.float32))
  dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
  for tokens in args.tokens:
    sizes = jnp.asarray(route(tokens, experts, top_k))
    m = tokens * top_k
    key = jax.random.split(jax.random.key(tokens), 3)
    lhs = jax.random.normal(key[0], (m, hidden), dtype)
    rhs = (jax.random.normal(key[1], (experts, hidden, inter), jnp.float32)
           * hidden ** -0.5).astype(dtype)
    ct = jax.random.normal(key[2], (m, inter), dtype)
    flops = 2.0 * m * hidden * inter
    case = f"{tokens} tok ({m} rows) x {experts}e {hidden}->{inter}"
    err = _rel_err(gmm(lhs, rhs, sizes), _per_group_product(lhs, rhs, sizes))
    impls = {
        "pallas": lambda l, r: gmm(l, r, sizes),
        "ragged_dot": lambda l, r: ragged(l, r, sizes),
        "dense (same FLOPs)": lambda l, r: dense(l, r[0]),
    }
    for name, fn in impls.items():
      try:  # ragged_dot may fall back to a dense path that does not fit in memory
        ms = _time(jax.jit(fn), lhs, rhs, iters=args.iters)
        rows_out.append(Row("grouped_matmul", case, name, "fwd", ms, flops / ms / 1e9,
                            err if name == "pallas" else None))
        print(rows_out[-1], flush=True)
        ms = _time(jax.jit(_fwd_bwd(fn)), lhs, rhs, ct, iters=args.iters)
        rows_out.append(Row("grouped_matmul", case, name, "fwd+bwd", ms, 3 * flops / ms / 1e9))
        print(rows_out[-1], flush=True)
      except Exception as e:
        print(f"{case} {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
  return rows_out


# ----------------------------------------------------------------------------- attention


def attention_cases(smoke: bool):
  """name -> (batch, seq, q_heads, kv_heads, head_dim, mask kwargs builder)."""
  if smoke:
    return {
        "audio (windows of 13)": (1, 40, 2, 2, 16, lambda s: {
            "segment_ids": (np.arange(s) // 13)[None]}),
        "vision (frames)": (1, 48, 2, 2, 24, lambda s: {
            "segment_ids": (np.arange(s) // 16)[None]}),
        "code2wav (causal window 9)": (1, 48, 2, 2, 16, lambda s: {
            "causal": True, "window": (8, 0)}),
        "decoder (causal GQA)": (1, 32, 4, 1, 32, lambda s: {"causal": True}),
    }
  return {
      # AuT: bidirectional attention within windows of 104 tokens (13 * n_window_infer // 100).
      "audio (windows of 104)": (1, 8192, 20, 20, 64, lambda s: {
          "segment_ids": (np.arange(s) // 104)[None]}),
      # ViT on a video: attention within each frame; 8 frames of 1024 patches.
      "vision (8 frames x 1024)": (1, 8192, 16, 16, 72, lambda s: {
          "segment_ids": (np.arange(s) // 1024)[None]}),
      # Code2Wav transformer: causal sliding window of 72 frames.
      "code2wav (causal window 72)": (1, 8192, 16, 16, 64, lambda s: {
          "causal": True, "window": (71, 0)}),
      # Thinker decoder prefill: causal GQA 32 q / 4 kv heads.
      "decoder (causal, 32q/4kv)": (1, 8192, 32, 4, 128, lambda s: {"causal": True}),
  }


def _unmasked_pairs(seq, mask) -> int:
  seg = mask.get("segment_ids")
  mask = dict(mask)
  if seg is not None:
    mask["segment_ids"] = jnp.asarray(seg, jnp.int32)
  allowed = pallas_kernels.attention_mask(seq, **mask)
  return int(jnp.sum(allowed[0]))


def bench_attention(args, interpret: bool) -> list[Row]:
  rows_out = []
  dtype = jnp.dtype(args.dtype)
  for case, (batch, seq, hq, hkv, d, make_mask) in attention_cases(args.smoke).items():
    mask = make_mask(seq)
    if "segment_ids" in mask:
      mask["segment_ids"] = jnp.asarray(
          np.broadcast_to(mask["segment_ids"], (batch, seq)), jnp.int32)
    key = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(key[0], (batch, seq, hq, d), dtype)
    k = jax.random.normal(key[1], (batch, seq, hkv, d), dtype)
    v = jax.random.normal(key[2], (batch, seq, hkv, d), dtype)
    ct = jax.random.normal(key[3], (batch, seq, hq, d), dtype)
    flops = 4.0 * d * _unmasked_pairs(seq, mask) * hq * batch
    impls = {
        "pallas": functools.partial(pallas_kernels.windowed_attention, interpret=interpret,
                                    **mask),
        "xla reference": functools.partial(pallas_kernels.windowed_attention_reference, **mask),
    }
    err = _rel_err(jax.jit(impls["pallas"])(q, k, v), jax.jit(impls["xla reference"])(q, k, v))
    label = f"{case}: B{batch} S{seq} H{hq}/{hkv} D{d}"
    for name, fn in impls.items():
      try:  # the materialised reference may run out of memory
        ms = _time(jax.jit(fn), q, k, v, iters=args.iters)
        rows_out.append(Row("attention", label, name, "fwd", ms, flops / ms / 1e9,
                            err if name == "pallas" else None))
        print(rows_out[-1], flush=True)
        ms = _time(jax.jit(_fwd_bwd(fn)), q, k, v, ct, iters=args.iters)
        rows_out.append(Row("attention", label, name, "fwd+bwd", ms, 3.5 * flops / ms / 1e9))
        print(rows_out[-1], flush=True)
      except Exception as e:
        print(f"{label} {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
  return rows_out


# ----------------------------------------------------------------------------- main


def markdown(rows: list[Row]) -> str:
  lines = ["| bench | case | impl | pass | ms | TFLOP/s | max rel err vs XLA |",
           "|---|---|---|---|---:|---:|---:|"]
  for r in rows:
    err = "" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"
    lines.append(f"| {r.bench} | {r.case} | {r.impl} | {r.pass_} | {r.ms:.3f} | "
                 f"{r.tflops:.2f} | {err} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes, kernels in interpret mode (runs on CPU)")
  p.add_argument("--only", choices=["gmm", "attention"], default=None)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--iters", type=int, default=None)
  p.add_argument("--tokens", type=int, nargs="*", default=None,
                 help="token counts for the grouped matmul (rows = tokens * top_k)")
  p.add_argument("--json", default=None, help="also write the rows as JSON here")
  args = p.parse_args(argv)
  if args.smoke:
    args.experts, args.hidden, args.intermediate, args.top_k = 8, 64, 32, 2
    args.tokens = args.tokens or [64]
    args.iters = args.iters or 2
  else:
    args.experts, args.hidden, args.intermediate, args.top_k = 128, 2048, 768, 8
    args.tokens = args.tokens or [4096, 16384, 65536]
    args.iters = args.iters or 20
  backend = jax.default_backend()
  interpret = args.smoke or backend == "cpu"
  if backend == "cpu" and not args.smoke:
    p.error("no GPU/TPU here: use --smoke (interpret mode, tiny shapes)")
  device = jax.devices()[0]
  header = (f"device: {device.device_kind} ({backend}), jax {jax.__version__}, "
            f"dtype {args.dtype}, iters {args.iters}, interpret={interpret}")
  print(header, flush=True)
  rows = []
  if args.only in (None, "gmm"):
    rows += bench_grouped_matmul(args, interpret)
  if args.only in (None, "attention"):
    rows += bench_attention(args, interpret)
  print()
  print(header)
  print(markdown(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  bad = [r for r in rows if r.max_rel_err is not None and r.max_rel_err > 5e-2]
  if bad:
    print("WARNING: kernel disagrees with the XLA reference:", bad)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
