"""Mask structure of windowed attention, shared by the GPU and TPU kernels.

Two levels:

* `block_ranges`: for every block of rows (q blocks in the forward and dq passes, kv blocks in
  the dk/dv pass), the contiguous range [lo, hi) of column blocks that may hold an unmasked
  entry. The kernels loop (GPU) or step (TPU) over that range only, so their cost follows the
  unmasked area: a causal kernel does about half the blocks, a window of w tokens about
  (w + block) / block per row block. Segment ids narrow the range further with per-block
  min/max ids: blocks whose id ranges do not overlap cannot share a segment. For sorted
  (packed) segment ids this leaves exactly the blocks a segment touches; for unsorted ids it is
  still correct, just less tight (blocks inside the range are computed and masked).

* `element_mask`: the exact (block_q, block_k) mask inside a block, from positions, window and
  segment ids, plus the key-padding mask when the sequence was padded to the block size.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax


def effective_window(causal: bool, window) -> tuple[int | None, int | None]:
  """(left, right) extents in tokens, None = unlimited; causal caps right at 0."""
  left, right = (None, None) if window is None else tuple(window)
  if left is not None:
    left = int(left)
  if right is not None:
    right = int(right)
  if causal:
    right = 0 if right is None else min(right, 0)
  return left, right


def _structural_ranges(num_rows: int, row_block: int, num_cols: int, col_block: int,
                       before: int | None, after: int | None, row_len: int, col_len: int):
  """Column-block range per row block from the window alone (numpy, static).

  Row r (a position) may see columns [r - before, r + after] intersected with [0, col_len).
  Row blocks made only of padding (r >= row_len) get an empty range: nothing reads them.
  """
  r0 = np.arange(num_rows, dtype=np.int64) * row_block
  r1 = r0 + row_block - 1
  c0 = np.maximum(r0 - before, 0) if before is not None else np.zeros_like(r0)
  c1 = np.minimum(r1 + after, col_len - 1) if after is not None else np.full_like(r0, col_len - 1)
  empty = (c1 < c0) | (r0 >= row_len)
  lo = np.where(empty, 0, c0 // col_block)
  hi = np.where(empty, 0, np.minimum(c1 // col_block + 1, num_cols))
  return lo.astype(np.int32), hi.astype(np.int32)


def block_ranges(segment_ids, *, causal: bool, window, padded_len: int, q_len: int,
                 kv_len: int, block_q: int, block_k: int, transpose: bool = False):
  """Per row block, the range of column blocks that can hold unmasked entries.

  Args:
    segment_ids: None or (batch, padded_len) int32 (padding positions must carry some id of
      the same sequence, e.g. edge padding, so that per-block min/max stay meaningful).
    padded_len: sequence length after padding to the blocks.
    q_len, kv_len: real (unpadded) lengths; padded queries/keys are never needed.
    transpose: False -> rows are q blocks, columns kv blocks (forward, dq). True -> rows are kv
      blocks, columns q blocks (dk/dv).

  Returns:
    (lo, hi, max_trips): lo, hi (batch or 1, num_rows) int32 arrays (numpy without segment ids
    or with numpy segment ids, else jax); column blocks lo <= c < hi;
    an empty range has lo == hi. max_trips is a static bound on hi - lo (TPU grid size).
  """
  left, right = effective_window(causal, window)
  nq, nk = padded_len // block_q, padded_len // block_k
  if transpose:
    # kv position j is seen by queries [j - right, j + left].
    lo, hi = _structural_ranges(nk, block_k, nq, block_q, right, left, kv_len, q_len)
    rows_block, cols_block, num_cols = block_k, block_q, nq
  else:
    lo, hi = _structural_ranges(nq, block_q, nk, block_k, left, right, q_len, kv_len)
    rows_block, cols_block, num_cols = block_q, block_k, nk
  max_trips = max(int(np.max(hi - lo)), 1)
  if segment_ids is None:
    return lo[None], hi[None], max_trips

  # numpy in -> numpy out (host-side planning and cheap tests); traced/jax arrays use jnp.
  xp = np if isinstance(segment_ids, np.ndarray) else jnp
  batch = segment_ids.shape[0]
  seg = segment_ids.astype(np.int32)
  rmin = seg.reshape(batch, -1, rows_block).min(-1)
  rmax = seg.reshape(batch, -1, rows_block).max(-1)
  cmin = seg.reshape(batch, -1, cols_block).min(-1)
  cmax = seg.reshape(batch, -1, cols_block).max(-1)
  cols = np.arange(num_cols)
  in_window = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])  # (rows, cols)
  overlap = ((cmin[:, None, :] <= rmax[:, :, None]) & (cmax[:, None, :] >= rmin[:, :, None])
             & xp.asarray(in_window)[None])
  any_overlap = overlap.any(-1)
  seg_lo = xp.argmax(overlap, axis=-1)
  seg_hi = num_cols - xp.argmax(overlap[..., ::-1], axis=-1)
  seg_lo = xp.where(any_overlap, seg_lo, 0).astype(np.int32)
  seg_hi = xp.where(any_overlap, seg_hi, 0).astype(np.int32)
  return seg_lo, seg_hi, max_trips


def element_mask(q_start, k_start, shape, *, causal: bool, window, kv_len: int | None,
                 q_segment_ids=None, k_segment_ids=None):
  """(block_q, block_k) bool mask of a block, or None when nothing needs masking.

  q_start, k_start: first query / key position of the block (traced scalars).
  kv_len: real key count when keys were padded (keys >= kv_len masked), else None.
  q_segment_ids, k_segment_ids: (block_q, 1) and (1, block_k) ids, or None.
  Uses 2-D iotas only (Mosaic does not like 1-D -> 2-D reshapes).
  """
  left, right = effective_window(causal, window)
  mask = None

  def conj(a, b):
    return b if a is None else a & b

  if left is not None or right is not None or kv_len is not None:
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    if left is not None:
      mask = conj(mask, k_pos >= q_pos - left)
    if right is not None:
      mask = conj(mask, k_pos <= q_pos + right)
    if kv_len is not None:
      mask = conj(mask, k_pos < kv_len)
  if q_segment_ids is not None:
    mask = conj(mask, q_segment_ids == k_segment_ids)
  return mask
