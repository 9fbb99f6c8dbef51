"""Which (row tile, group) pairs a grouped matmul kernel visits, as int32 arrays.

lhs rows are sorted by group, so group g owns the contiguous rows [offsets[g], offsets[g+1]).
Rows are cut into tiles of `tm`; a tile that straddles a group boundary has to be computed once
per group it touches, each visit using that group's weights and keeping only that group's rows.
The kernels get a flat list of visits ("visit v works on tile visit_tile[v] for group
visit_group[v]") so that their grid is one dimension of visits instead of (tiles x groups).

The list is ordered by group and, because groups are sorted by row, by tile too: revisits of a
tile are consecutive, which lets the TPU kernel keep the output tile resident across them.

Grids must have a static size, but the number of visits depends on the group sizes. It is at
most `num_tiles + num_groups - 1` (every extra visit comes from a group boundary inside a tile,
or an empty group visited on purpose), so kernels use `num_tiles + num_groups` slots and treat
slots past `num_visits` as no-ops that repeat the last real visit (repeating keeps the TPU
pipeline from fetching new blocks for them).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class GroupMetadata(NamedTuple):
  """Metadata arrays (all int32).

  offsets: (num_groups_total + 1,) first row of each group; last entry = padded row count.
  visit_group: (num_slots,) group of each visit slot.
  visit_tile: (num_slots,) row tile of each visit slot.
  num_visits: (1,) number of real visits; slots at and past it are no-ops.
  """

  offsets: jax.Array
  visit_group: jax.Array
  visit_tile: jax.Array
  num_visits: jax.Array


def num_visit_slots(num_tiles: int, num_groups_total: int) -> int:
  """Static upper bound on the number of visits (see module docstring)."""
  return num_tiles + num_groups_total


def make_group_metadata(
    group_sizes: jax.Array,
    *,
    num_rows: int,
    tm: int,
    padding_group: bool,
    visit_empty_groups: bool,
) -> GroupMetadata:
  """Builds the visit list for `group_sizes` over `num_rows` rows (a multiple of `tm`).

  Args:
    group_sizes: (num_groups,) int32, rows per group; their sum may be below `num_rows`
      (trailing rows are padding) and is clipped to it if above.
    num_rows: total (padded) rows.
    tm: row tile.
    padding_group: add a group `num_groups` owning the rows past the sum, so that every row
      belongs to exactly one group. The forward kernel writes zeros for it, so every output row
      is written exactly once without a separate zero fill.
    visit_empty_groups: give each empty group one visit (on the tile where it would start). The
      transposed product needs this to write the zero gradient of an expert that got no rows.

  Returns:
    GroupMetadata; num_groups_total = num_groups + padding_group.
  """
  if num_rows % tm:
    raise ValueError(f"num_rows={num_rows} must be a multiple of tm={tm}")
  # numpy in -> numpy out (host-side planning, cheap tests); jax arrays use jnp.
  xp = np if isinstance(group_sizes, np.ndarray) else jnp
  num_tiles = num_rows // tm
  sizes = group_sizes.astype(np.int32)
  ends = xp.minimum(xp.cumsum(sizes), num_rows).astype(np.int32)
  starts = xp.concatenate([xp.zeros((1,), np.int32), ends[:-1]])
  if padding_group:
    starts = xp.concatenate([starts, ends[-1:]])
    ends = xp.concatenate([ends, xp.full((1,), num_rows, np.int32)])
  offsets = xp.concatenate([starts, ends[-1:]])
  sizes = ends - starts
  num_groups_total = starts.shape[0]

  first_tile = xp.minimum(starts // tm, num_tiles - 1)
  last_tile = (xp.maximum(ends, 1) - 1) // tm
  empty_visits = 1 if visit_empty_groups else 0
  tiles_per_group = xp.where(sizes > 0, last_tile - first_tile + 1, empty_visits)
  visits_end = xp.cumsum(tiles_per_group)  # exclusive end of each group's visits
  num_visits = visits_end[-1]

  num_slots = num_visit_slots(num_tiles, num_groups_total)
  slot = xp.arange(num_slots, dtype=np.int32)
  # Slots past the last real visit repeat it (no-ops; see module docstring).
  slot = xp.maximum(xp.minimum(slot, num_visits - 1), 0)
  group = xp.searchsorted(visits_end, slot, side="right").astype(np.int32)
  group = xp.minimum(group, num_groups_total - 1)
  visits_start = visits_end - tiles_per_group
  tile = xp.clip(first_tile[group] + (slot - visits_start[group]), 0, num_tiles - 1)
  return GroupMetadata(
      offsets=offsets.astype(np.int32),
      visit_group=group,
      visit_tile=tile.astype(np.int32),
      num_visits=xp.asarray(num_visits).reshape(1).astype(np.int32),
  )
