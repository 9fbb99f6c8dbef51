"""The kernels lower for CUDA (Triton) and TPU (Mosaic) at the model's shapes, without a device.

`jit(...).trace(...).lower(lowering_platforms=(platform,))` runs the Pallas -> Triton IR and
Pallas -> Mosaic lowering on this CPU-only machine. That catches unsupported primitives,
block-shape and indexing errors in the kernels and their backward passes. It does NOT run the
Triton compiler (TTIR -> PTX) nor Mosaic's layout passes, which happen inside XLA on the device:
a kernel that lowers here can still fail to compile or be slow on real hardware.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels

PLATFORMS = {"gpu": ("cuda", "NVIDIA H100 80GB HBM3"), "tpu": ("tpu", "TPU v5 lite")}

# (batch, seq, q_heads, kv_heads, head_dim, segments?, mask kwargs); seq deliberately not a
# multiple of the blocks where the model's is not either.
ATTENTION_SHAPES = {
    "audio": (2, 1500, 20, 20, 64, True, {}),
    "vision": (1, 2000, 16, 16, 72, True, {}),
    "code2wav": (1, 1000, 16, 16, 64, False, {"causal": True, "window": (71, 0)}),
    "decoder": (1, 2048, 32, 4, 128, False, {"causal": True}),
}


@pytest.fixture(autouse=True)
def verified_triton_modules(monkeypatch):
  """Runs the MLIR verifier on every Triton module a test lowers (XLA does so only on the device:
  a select of two literals typed as i1 once passed lowering here and failed on an H100/H200)."""
  from jax._src.pallas.triton import lowering as triton_lowering  # noqa: PLC0415

  lower = triton_lowering.lower_jaxpr_to_triton_module
  verified = []

  def lower_and_verify(*args, **kwargs):
    result = lower(*args, **kwargs)
    result.module.operation.verify()  # raises MLIRError naming the invalid op
    verified.append(result)
    return result

  monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
  return verified


def _lower(fn, args, platform):
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
  return lowered.as_text()


@pytest.mark.parametrize("implementation", sorted(PLATFORMS))
@pytest.mark.parametrize("name", sorted(ATTENTION_SHAPES))
def test_attention_lowers_forward_and_backward(name, implementation, verified_triton_modules):
  platform, kind = PLATFORMS[implementation]
  batch, seq, hq, hkv, d, has_seg, mask = ATTENTION_SHAPES[name]
  blocks = pallas_kernels.default_block_sizes(implementation, kind)
  q = jax.ShapeDtypeStruct((batch, seq, hq, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, seq, hkv, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((batch, seq), jnp.int32) if has_seg else None

  def loss(q, k, v, seg):
    out = pallas_kernels.windowed_attention(q, k, v, segment_ids=seg, block_sizes=blocks,
                                            implementation=implementation, **mask)
    return jnp.sum(out.astype(jnp.float32) ** 2)  # needs the forward output too

  text = _lower(jax.grad(loss, argnums=(0, 1, 2)), (q, kv, kv, seg), platform)
  marker = "__gpu$xla.gpu.triton" if implementation == "gpu" else "tpu_custom_call"
  assert text.count(marker) == 3  # forward, dq, dk/dv
  assert len(verified_triton_modules) == (3 if implementation == "gpu" else 0)


@pytest.mark.parametrize("implementation", sorted(PLATFORMS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_grouped_matmul_lowers_forward_and_backward(implementation, dtype, verified_triton_modules):
  platform, kind = PLATFORMS[implementation]
  tiling = pallas_kernels.default_tiling(implementation, kind)
  # Thinker experts: 128 experts, hidden 2048 -> 768, 4096 tokens x top-8 rows.
  lhs = jax.ShapeDtypeStruct((4096 * 8, 2048), dtype)
  rhs = jax.ShapeDtypeStruct((128, 2048, 768), dtype)
  sizes = jax.ShapeDtypeStruct((128,), jnp.int32)

  def loss(lhs, rhs, sizes):
    out = pallas_kernels.grouped_matmul(lhs, rhs, sizes, tiling=tiling,
                                        implementation=implementation)
    return jnp.sum(out.astype(jnp.float32) ** 2)  # needs the forward output too

  text = _lower(jax.grad(loss, argnums=(0, 1)), (lhs, rhs, sizes), platform)
  marker = "__gpu$xla.gpu.triton" if implementation == "gpu" else "tpu_custom_call"
  assert text.count(marker) == 3  # forward, dlhs, drhs
  assert len(verified_triton_modules) == (3 if implementation == "gpu" else 0)
