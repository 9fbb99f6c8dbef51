"""Block sizes for the attention kernels and their per-device defaults.

As for the grouped matmul, the defaults are untuned starting points (no GPU/TPU was available
when they were written); `bench/kernels.py` is the tool to tune them.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels._common import lookup_by_device_kind, next_power_of_2


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
  """Tile sizes of the forward (block_q x block_k) and backward (dq and dk/dv) kernels.

  All must be powers of two (Triton); on TPU block_k should be a multiple of 128 (it is the lane
  dimension of the key segment ids and of the scores). num_warps None = 4 for head_dim <= 64,
  else 8. num_warps/num_stages are ignored on TPU.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int | None = None
  num_stages: int = 2

  def fitted(self, seq_len: int) -> "AttentionBlockSizes":
    """Shrinks blocks longer than the (power-of-two-rounded) sequence, minimum 16."""
    cap = max(16, next_power_of_2(seq_len))
    return dataclasses.replace(
        self, block_q=min(self.block_q, cap), block_k=min(self.block_k, cap),
        block_q_bwd=min(self.block_q_bwd, cap), block_k_bwd=min(self.block_k_bwd, cap))

  @property
  def max_block(self) -> int:
    return max(self.block_q, self.block_k, self.block_q_bwd, self.block_k_bwd)


GPU_BLOCKS: dict[str, AttentionBlockSizes] = {
    "H100": AttentionBlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64,
                                num_stages=3),
    "H200": AttentionBlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64,
                                num_stages=3),
}
GPU_DEFAULT = AttentionBlockSizes(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=32)

TPU_BLOCKS: dict[str, AttentionBlockSizes] = {
    "TPU v5": AttentionBlockSizes(block_q=256, block_k=256, block_q_bwd=256, block_k_bwd=256),
    "TPU v6": AttentionBlockSizes(block_q=256, block_k=512, block_q_bwd=256, block_k_bwd=256),
}
TPU_DEFAULT = AttentionBlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)


def default_block_sizes(implementation: str, kind: str | None = None) -> AttentionBlockSizes:
  if implementation == "tpu":
    return lookup_by_device_kind(TPU_BLOCKS, TPU_DEFAULT, kind)
  return lookup_by_device_kind(GPU_BLOCKS, GPU_DEFAULT, kind)
