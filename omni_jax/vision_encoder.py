"""The Qwen3-Omni vision encoder: ViT blocks, the 2x2 patch merger and the DeepStack mergers.

Reference: `Qwen3OmniMoeVisionEncoder` (transformers 5.23.0, `modeling_qwen3_omni_moe.py`) with the
grid helpers of `transformers/vision_utils.py`. Computation, in the reference's order:

  1. patch embedding: a Conv3d whose kernel equals its stride and its input extent
     (3 x temporal_patch x patch x patch), i.e. one matmul per patch;
  2. + the learned (side x side) position grid resampled bilinearly with aligned corners to each
     image's (h, w) patch grid (`get_vision_interpolation_indices_and_weights`: 4 taps per patch,
     weights built in fp32; the tap sum runs in fp32 and is cast to the activation dtype);
  3. `depth` pre-LayerNorm blocks: x + proj(attn(LN1(x))), x + fc2(gelu_tanh(fc1(LN2(x)))), the
     attention bidirectional *within each frame* (segments of h*w patches, `cu_seqlens` with
     merge_temporal=False) and rotated by the 2-D axial RoPE in fp32: per patch
     cat[h * inv_freq, w * inv_freq] duplicated over the head dim, `rotate_half` pairing;
  4. DeepStack: the outputs of blocks `deepstack_visual_indexes` go through `merger_list[j]`
     (2x2 shuffle, then LayerNorm over 4*hidden, Linear, exact GELU, Linear), in ascending block order;
  5. `merger`: LayerNorm over hidden per patch, 2x2 shuffle, Linear, exact GELU, Linear.

Patches arrive in 2x2 merge-block order (the processor's `patchify`), so 4 consecutive rows form one
LLM token.

**Packed layout.** Attention never crosses a frame, so instead of one (N, N) masked attention over
all patches of a batch (quadratic in the batch's total patch count) the frames are packed, in order,
into `rows` rows of `row_len` slots (next fit; a row holds as many whole frames as fit, the rest of
the row is padding with segment id 0) and the whole encoder runs on (rows * row_len) slots:
attention costs rows * row_len^2 instead of N^2, and the other layers act per patch. Frames are
multiples of 4 patches and start at multiples of 4, so 2x2 merge groups never straddle rows and the
mergers run on the packed layout too; the output tokens are gathered back to the reference's order
at the end. `row_len` and `rows` are rounded up to buckets with at most ~12.5% waste (see
`bucket`), so that jit compiles once per bucket pair rather than once per image size. All of this
(the plan) is computed on the host with numpy from `grid_thw`.

Parameter tree (paths mirror the checkpoint's `thinker.visual.*` keys; the caller nests it under
"visual"):

    patch_embed/proj/weight          (hidden, in_channels, temporal_patch, patch, patch)   Conv3d layout
    patch_embed/proj/bias            (hidden,)
    pos_embed/weight                 (num_position_embeddings, hidden)
    blocks/{norm1,norm2}/{weight,bias}                    stacked on a leading `layers` axis
    blocks/attn/qkv/{kernel (hidden, 3*hidden), bias}
    blocks/attn/proj/{kernel (hidden, hidden), bias}
    blocks/mlp/linear_fc1/{kernel (hidden, intermediate), bias}
    blocks/mlp/linear_fc2/{kernel (intermediate, hidden), bias}
    merger/ln_q/{weight,bias}        (hidden,)
    merger/mlp/0/{kernel (4*hidden, 4*hidden), bias};  merger/mlp/2/{kernel (4*hidden, out), bias}
    merger_list/{j}/ln_q/{weight,bias} (4*hidden,);  merger_list/{j}/mlp/{0,2}/...  as `merger`

The stacked blocks live under the name `blocks` (the reference's), not `layers`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import Runtime, VisionEncoderConfig
from omni_jax.nn import attention as attn_lib
from omni_jax.nn.norms import layer_norm
from omni_jax.nn.params import ParamSpec, stack_layers
from omni_jax.nn.rope import inverse_frequencies

__all__ = [
    "vision_encoder_specs",
    "VisionPlan",
    "vision_plan",
    "pack_pixels",
    "interpolation_indices_and_weights",
    "merge_block_positions",
    "position_embeddings",
    "rope_cos_sin",
    "encode_packed",
    "encode",
    "bucket",
    "LN_EPS",
]

LN_EPS = 1e-6  # every LayerNorm of the vision encoder (blocks and mergers)
_CPU_QUERY_BLOCKS = 4  # query blocks per (row, head) on the CPU attention path
MIN_ROW_LEN = 128  # packed rows are at least this long when the batch has this many patches

# The reference's ACT2FN names for the block MLP; the mergers always use exact (erf) GELU.
_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
}


# ----------------------------------------------------------------------------------------------
# Parameters


def _linear(n_in: int, n_out: int, axes: tuple[str | None, str | None], std: float) -> dict:
    return {
        "kernel": ParamSpec((n_in, n_out), axes, std=std),
        "bias": ParamSpec((n_out,), (axes[1],), init="zeros"),
    }


def _norm(n: int, axis: str | None) -> dict:
    return {"weight": ParamSpec((n,), (axis,), init="ones"), "bias": ParamSpec((n,), (axis,), init="zeros")}


def _merger_specs(cfg: VisionEncoderConfig, postshuffle: bool) -> dict:
    merged = cfg.hidden_size * cfg.spatial_merge_size**2
    std = cfg.initializer_range
    return {
        "ln_q": _norm(merged, "vision_merged") if postshuffle else _norm(cfg.hidden_size, "embed"),
        # `mlp` is an nn.ModuleList [Linear, GELU, Linear] in the reference: its Linears are "0" and "2".
        "mlp": {
            "0": _linear(merged, merged, ("vision_merged", "mlp"), std),
            "2": _linear(merged, cfg.out_hidden_size, ("mlp", "embed"), std),
        },
    }


def vision_encoder_specs(cfg: VisionEncoderConfig) -> dict:
    """The ParamSpec tree of the vision encoder (see the module docstring for the paths)."""
    d, std = cfg.hidden_size, cfg.initializer_range
    if d % cfg.num_heads:
        raise ValueError(f"vision hidden_size={d} is not a multiple of num_heads={cfg.num_heads}")
    block = {
        "norm1": _norm(d, "embed"),
        "norm2": _norm(d, "embed"),
        # qkv's output is (3, heads, head_dim) fused: a name of its own keeps it replicated.
        "attn": {
            "qkv": _linear(d, 3 * d, ("embed", "vision_qkv"), std),
            "proj": _linear(d, d, ("q_heads", "embed"), std),
        },
        "mlp": {
            "linear_fc1": _linear(d, cfg.intermediate_size, ("embed", "mlp"), std),
            "linear_fc2": _linear(cfg.intermediate_size, d, ("mlp", "embed"), std),
        },
    }
    patch = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    return {
        "patch_embed": {
            "proj": {
                "weight": ParamSpec((d, *patch), ("embed", None, None, None, None), std=std),
                "bias": ParamSpec((d,), ("embed",), init="zeros"),
            }
        },
        "pos_embed": {"weight": ParamSpec((cfg.num_position_embeddings, d), ("vision_pos", "embed"), std=std)},
        "blocks": stack_layers(block, cfg.depth),
        "merger": _merger_specs(cfg, postshuffle=False),
        "merger_list": {str(j): _merger_specs(cfg, postshuffle=True) for j in range(len(cfg.deepstack_visual_indexes))},
    }


# ----------------------------------------------------------------------------------------------
# Host-side plan: everything that depends only on grid_thw


def bucket(n: int, granule: int = 1) -> int:
    """Rounds `n` up to a multiple of max(granule, 2^(floor(log2 n) - 3)): at most 12.5% padding and
    about 8 distinct buckets per octave, so that jit sees few distinct shapes."""
    n = max(int(n), 1)
    step = max(granule, 1 << max(n.bit_length() - 4, 0))
    step = math.lcm(step, granule)
    return -(-n // step) * step


def merge_block_positions(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the h*w patches of one frame in 2x2 merge-block order (`get_vision_position_ids`)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return (rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1),
            cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1))


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear, align_corners=True taps and weights along one axis, with the reference's fp32 ops
    (`_interpolation_axis_taps_weights`): src = i * (side - 1) / max(size - 1, 1)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    weights = np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)
    return taps, weights


def interpolation_indices_and_weights(h: int, w: int, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather indices (h*w, 4) into the flattened (side*side) position table and fp32 weights (h*w, 4)
    that resample it bilinearly (align_corners=True) to an (h, w) patch grid, in merge-block order.

    Tap order (h0 w0, h0 w1, h1 w0, h1 w1) as in the reference; equals
    `F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)` read in merge-block order.
    """
    row, col = merge_block_positions(h, w, merge)
    h_taps, h_w = _axis_taps(row, h, side)
    w_taps, w_w = _axis_taps(col, w, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return indices.astype(np.int32), weights.astype(np.float32)


class VisionPlan(NamedTuple):
    """Host-computed (numpy) layout of one batch of images/videos; P = rows * row_len slots.

    slot_of_patch: (N,) int64 packed slot of each input patch (reference order).
    segment_ids:   (rows, row_len) int32 one id per frame, 0 on padding slots.
    positions_hw:  (P, 2) int32 (row, col) patch coordinates for the 2-D RoPE.
    interp_index:  (P, 4) int32 position-table taps; interp_weight (P, 4) fp32 (0 on padding).
    token_index:   (P // 4,) int32 packed merge group of each output token, reference order first,
                   then padding (index 0) up to P // 4.
    num_tokens:    N // 4, the number of real output tokens.
    """

    slot_of_patch: np.ndarray
    segment_ids: np.ndarray
    positions_hw: np.ndarray
    interp_index: np.ndarray
    interp_weight: np.ndarray
    token_index: np.ndarray
    num_tokens: int

    @property
    def num_slots(self) -> int:
        return int(self.segment_ids.size)

    def device_arrays(self) -> "PlanArrays":
        return PlanArrays(self.segment_ids, self.positions_hw, self.interp_index, self.interp_weight, self.token_index)


class PlanArrays(NamedTuple):
    """The arrays of a `VisionPlan` that the jitted encoder consumes (shapes give its static sizes)."""

    segment_ids: jax.Array  # (rows, row_len)
    positions_hw: jax.Array  # (P, 2)
    interp_index: jax.Array  # (P, 4)
    interp_weight: jax.Array  # (P, 4)
    token_index: jax.Array  # (P // 4,)


def _check_grid(grid: np.ndarray, merge: int) -> None:
    if grid.ndim != 2 or grid.shape[1] != 3 or len(grid) == 0:
        raise ValueError(f"grid_thw must be (num_images_or_videos, 3) with at least one row, got shape {grid.shape}")
    if (grid <= 0).any():
        raise ValueError(f"grid_thw has a non-positive entry: {grid.tolist()}")
    bad = (grid[:, 1] % merge != 0) | (grid[:, 2] % merge != 0)
    if bad.any():
        raise ValueError(
            f"grid_thw rows {grid[bad].tolist()}: h and w must be multiples of spatial_merge_size={merge}"
        )


def vision_plan(
    grid_thw, cfg: VisionEncoderConfig, *, row_len: int | None = None, rows: int | None = None
) -> VisionPlan:
    """The packed layout for `grid_thw` (num_images_or_videos, 3) = (t, h, w) in patches.

    row_len / rows: force the packed shape (each at least what the batch needs); by default the
    longest frame (at least MIN_ROW_LEN, or all patches if fewer) and the row count are rounded up
    with `bucket`.
    """
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3) if np.size(grid_thw) else np.zeros((0, 3), np.int64)
    merge = cfg.spatial_merge_size
    unit = merge * merge
    _check_grid(grid, merge)
    side = int(cfg.num_position_embeddings**0.5)

    frame_len = grid[:, 1] * grid[:, 2]
    longest = int(frame_len.max())
    total = int((grid[:, 0] * frame_len).sum())
    granule = math.lcm(16, unit)
    # Rows of at least MIN_ROW_LEN slots (when the batch has that many patches): many small frames
    # then share rows instead of each costing a row (and, on CPU, a trip of the per-head loop).
    need_len = max(bucket(longest, granule), min(bucket(MIN_ROW_LEN, granule), bucket(total, granule)))
    if row_len is not None:
        if row_len < longest or row_len % unit:
            raise ValueError(f"row_len={row_len} must be >= the longest frame ({longest}) and a multiple of {unit}")
        need_len = row_len
    row_len = need_len

    # Next-fit packing of the frames, in order.
    frame_start = []  # packed slot of each frame's first patch
    row, fill = 0, 0
    for length in np.repeat(frame_len, grid[:, 0]).tolist():
        if fill + length > row_len:
            row, fill = row + 1, 0
        frame_start.append(row * row_len + fill)
        fill += length
    used_rows = row + 1
    num_rows = bucket(used_rows) if rows is None else rows
    if num_rows < used_rows:
        raise ValueError(f"rows={rows} is fewer than the {used_rows} rows this batch needs")
    num_slots = num_rows * row_len

    slot_of_patch = np.empty(total, np.int64)
    segment_ids = np.zeros(num_slots, np.int32)
    positions_hw = np.zeros((num_slots, 2), np.int32)
    interp_index = np.zeros((num_slots, 4), np.int32)
    interp_weight = np.zeros((num_slots, 4), np.float32)
    frame, patch = 0, 0
    for t, h, w in grid.tolist():
        row_pos, col_pos = merge_block_positions(h, w, merge)
        hw = np.stack([row_pos, col_pos], -1).astype(np.int32)
        idx, wts = interpolation_indices_and_weights(h, w, side, merge)
        length = h * w
        for _ in range(t):
            start = frame_start[frame]
            span = slice(start, start + length)
            slot_of_patch[patch : patch + length] = np.arange(start, start + length)
            segment_ids[span] = frame + 1
            positions_hw[span] = hw
            interp_index[span] = idx
            interp_weight[span] = wts
            frame, patch = frame + 1, patch + length

    num_tokens = total // unit
    token_index = np.zeros(num_slots // unit, np.int32)
    token_index[:num_tokens] = slot_of_patch[::unit] // unit
    return VisionPlan(
        slot_of_patch, segment_ids.reshape(num_rows, row_len), positions_hw, interp_index, interp_weight,
        token_index, num_tokens,
    )


def pack_pixels(pixel_values, plan: VisionPlan) -> np.ndarray:
    """(N, C*T*p*p) patches in reference order -> (P, C*T*p*p) packed, zeros on padding slots (host)."""
    pixel_values = np.asarray(pixel_values)
    if pixel_values.shape[0] != plan.slot_of_patch.shape[0]:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes {plan.slot_of_patch.shape[0]}"
        )
    packed = np.zeros((plan.num_slots, pixel_values.shape[1]), pixel_values.dtype)
    packed[plan.slot_of_patch] = pixel_values
    return packed


# ----------------------------------------------------------------------------------------------
# Forward (pure, jittable)


def _dense(p: dict, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    return jnp.dot(x, p["kernel"].astype(dtype)) + p["bias"].astype(dtype)


def patch_embed(p: dict, pixels_pc: jax.Array, dtype) -> jax.Array:
    """(P, C*T*p*p) -> (P, hidden). The Conv3d's kernel equals its stride and its input, so it is
    one matmul with the (out, C, T, p, p) weight flattened to (out, C*T*p*p), the patch layout."""
    w = p["proj"]["weight"]
    kernel = w.reshape(w.shape[0], -1).astype(dtype)
    x = pixels_pc.astype(dtype)
    return jnp.einsum("pk,ok->po", x, kernel) + p["proj"]["bias"].astype(dtype)


def position_embeddings(pos_table: jax.Array, interp_index_p4: jax.Array, interp_weight_p4: jax.Array) -> jax.Array:
    """(P, hidden) fp32 learned positions: the 4-tap bilinear sum over the (side*side, hidden) table."""
    taps = jnp.take(pos_table, interp_index_p4, axis=0).astype(jnp.float32)  # (P, 4, hidden)
    return jnp.sum(taps * interp_weight_p4[:, :, None].astype(jnp.float32), axis=1)


def rope_cos_sin(positions_p2: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """fp32 cos, sin (P, head_dim) of the axial 2-D RoPE: angles cat[h * inv, w * inv] twice, with
    inv = 1 / theta^(arange(0, head_dim/2, 2) / (head_dim/2))."""
    inv_freq = jnp.asarray(inverse_frequencies(head_dim // 2, theta))  # (head_dim / 4,)
    angles = positions_p2.astype(jnp.float32)[:, :, None] * inv_freq  # (P, 2, head_dim / 4)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    cos = jnp.concatenate([cos[:, 0], cos[:, 1]], -1)
    sin = jnp.concatenate([sin[:, 0], sin[:, 1]], -1)
    return jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)


def _rotate(x_phd: jax.Array, cos_pd: jax.Array, sin_pd: jax.Array) -> jax.Array:
    """`apply_rotary_pos_emb_vision`: rotate in fp32, cast back."""
    x = x_phd.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos_pd[:, None, :] + rotated * sin_pd[:, None, :]).astype(x_phd.dtype)


def _one_head_at_a_time(rt: Runtime) -> bool:
    """Whether attention takes the XLA (not Pallas) path on CPU, where it is looped per head."""
    return rt.attention_impl in ("auto", "xla") and jax.default_backend() == "cpu"


def _attend(q_phd: jax.Array, k_phd: jax.Array, v_phd: jax.Array, segment_ids: jax.Array, rt: Runtime) -> jax.Array:
    """Bidirectional attention within segments on the packed (rows, row_len) layout -> (P, heads, head_dim).

    The Pallas kernel takes the whole (rows, row_len) batch and skips masked blocks itself. On the
    XLA path the (rows * heads, row_len, row_len) score tensor of a whole batch would be written to
    and read from memory several times (masking, softmax); looping over (row, head) pairs keeps each
    score matrix in cache and measured ~2x faster on CPU (and bounds the memory to one matrix).
    """
    num_slots, heads, head_dim = q_phd.shape
    rows, row_len = segment_ids.shape
    shape = (rows, row_len, heads, head_dim)
    scale = head_dim**-0.5
    if not _one_head_at_a_time(rt):
        out = attn_lib.self_attention(
            q_phd.reshape(shape), k_phd.reshape(shape), v_phd.reshape(shape), segment_ids=segment_ids, scale=scale,
            impl=rt.attention_impl,
        )
        return out.reshape(num_slots, heads, head_dim)

    def heads_major(x):  # (P, H, D) -> (rows * H, row_len, D)
        return x.reshape(shape).transpose(0, 2, 1, 3).reshape(rows * heads, row_len, head_dim)

    # Query blocks within each (row, head): 81 -> 71 ms per layer of the benchmark video's attention
    # (8 rows x 4 heads x 896) against one masked square per (row, head).
    query_blocks = _CPU_QUERY_BLOCKS if row_len % _CPU_QUERY_BLOCKS == 0 else 1

    def one(args):  # (L, D), (L, D), (L, D), (L,)
        return attn_lib.segment_attention_in_blocks(*args, scale=scale, num_blocks=query_blocks)

    seg = jnp.repeat(segment_ids, heads, axis=0)
    out = jax.lax.map(one, (heads_major(q_phd), heads_major(k_phd), heads_major(v_phd), seg))
    return out.reshape(rows, heads, row_len, head_dim).transpose(0, 2, 1, 3).reshape(num_slots, heads, head_dim)


def _block(bp: dict, x_pd: jax.Array, cos, sin, segment_ids, cfg: VisionEncoderConfig, rt: Runtime) -> jax.Array:
    num_slots, d = x_pd.shape
    heads = cfg.num_heads
    head_dim = d // heads
    h = layer_norm(x_pd, bp["norm1"]["weight"], bp["norm1"]["bias"], LN_EPS)
    qkv = _dense(bp["attn"]["qkv"], h).reshape(num_slots, 3, heads, head_dim)
    q, k = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin)
    a = _attend(q, k, qkv[:, 2], segment_ids, rt)
    x_pd = x_pd + _dense(bp["attn"]["proj"], a.reshape(num_slots, d))
    h = layer_norm(x_pd, bp["norm2"]["weight"], bp["norm2"]["bias"], LN_EPS)
    act = _ACTIVATIONS[cfg.hidden_act]
    return x_pd + _dense(bp["mlp"]["linear_fc2"], act(_dense(bp["mlp"]["linear_fc1"], h)))


def merger(p: dict, x_pd: jax.Array, unit: int, postshuffle: bool) -> jax.Array:
    """`Qwen3OmniMoeVisionPatchMerger`: (P, hidden) -> (P / unit, out). LayerNorm before the 2x2
    shuffle (final merger) or after it (DeepStack mergers), then Linear, exact GELU, Linear."""
    ln = p["ln_q"]
    if postshuffle:
        h = layer_norm(x_pd.reshape(-1, x_pd.shape[-1] * unit), ln["weight"], ln["bias"], LN_EPS)
    else:
        h = layer_norm(x_pd, ln["weight"], ln["bias"], LN_EPS).reshape(-1, x_pd.shape[-1] * unit)
    h = jax.nn.gelu(_dense(p["mlp"]["0"], h), approximate=False)
    return _dense(p["mlp"]["2"], h)


def _deepstack_layers(cfg: VisionEncoderConfig) -> list[tuple[int, int]]:
    """(block, merger_list index) pairs in the reference's order: ascending block, merger chosen by
    the block's first position in `deepstack_visual_indexes`; blocks beyond `depth` never fire."""
    indexes = list(cfg.deepstack_visual_indexes)
    return [(layer, indexes.index(layer)) for layer in range(cfg.depth) if layer in indexes]


def _remat(fn, rt: Runtime):
    if rt.remat == "full":
        return jax.checkpoint(fn)
    if rt.remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
    return fn


def encode_packed(
    params: dict, pixels_pc: jax.Array, plan: PlanArrays, cfg: VisionEncoderConfig, rt: Runtime
) -> tuple[jax.Array, jax.Array]:
    """The encoder on the packed layout (pure; jit with cfg and rt static).

    pixels_pc: (P, C*T*p*p) packed patches (`pack_pixels`); plan: `VisionPlan.device_arrays()`.
    Returns (merged (P/4, out_hidden), deepstack (num_deepstack, P/4, out_hidden)) in the
    reference's token order; rows past `VisionPlan.num_tokens` are padding.
    """
    dtype = jnp.dtype(rt.dtype)
    unit = cfg.spatial_merge_size**2
    head_dim = cfg.hidden_size // cfg.num_heads
    x = patch_embed(params["patch_embed"], pixels_pc, dtype)
    pos = position_embeddings(params["pos_embed"]["weight"], plan.interp_index, plan.interp_weight)
    x = x + pos.astype(dtype)
    cos, sin = rope_cos_sin(plan.positions_hw, head_dim, cfg.rope_theta)
    segment_ids = plan.segment_ids.astype(jnp.int32)

    deepstack = _deepstack_layers(cfg)
    # The scan writes the output of each DeepStack block into its slot of a carried buffer; other
    # blocks write into a scratch slot (the last one), so one scan body serves every block.
    slot_of_layer = np.full(cfg.depth, len(deepstack), np.int32)
    for j, (layer, _) in enumerate(deepstack):
        slot_of_layer[layer] = j
    captured = jnp.zeros((len(deepstack) + 1, *x.shape), dtype)

    def body(x, captured, lp, slot):
        x = _block(lp, x, cos, sin, segment_ids, cfg, rt)
        captured = jax.lax.dynamic_update_slice(captured, x[None], (slot, 0, 0))
        return x, captured

    body = _remat(body, rt)
    blocks = params["blocks"]
    if rt.scan_layers:
        def scan_body(carry, inputs):
            lp, slot = inputs
            return body(*carry, lp, slot), None

        (x, captured), _ = jax.lax.scan(scan_body, (x, captured), (blocks, jnp.asarray(slot_of_layer)))
    else:
        for i in range(cfg.depth):
            x, captured = body(x, captured, jax.tree.map(lambda a, i=i: a[i], blocks), int(slot_of_layer[i]))

    token_index = plan.token_index
    merged = jnp.take(merger(params["merger"], x, unit, postshuffle=False), token_index, axis=0)
    features = [
        jnp.take(merger(params["merger_list"][str(m)], captured[j], unit, postshuffle=True), token_index, axis=0)
        for j, (_, m) in enumerate(deepstack)
    ]
    if features:
        deepstack_out = jnp.stack(features)
    else:
        deepstack_out = jnp.zeros((0, *merged.shape), merged.dtype)
    return merged, deepstack_out


_encode_packed_jit = jax.jit(encode_packed, static_argnames=("cfg", "rt"))


def encode(
    params: dict, pixel_values, grid_thw, cfg: VisionEncoderConfig, rt: Runtime
) -> tuple[jax.Array, jax.Array]:
    """Encodes images and videos (any mix of sizes) as the reference `Qwen3OmniMoeVisionEncoder`.

    params: the `vision_encoder_specs` tree (the thinker's `visual` subtree).
    pixel_values: (N, C*T*p*p) patches of all inputs concatenated in order, merge-block order
      (the processor's `pixel_values` / `pixel_values_videos`); host array.
    grid_thw: (num_images_or_videos, 3) host ints (t, h, w) in patches; N = sum t*h*w.
    Returns (merged (N/4, out_hidden), deepstack (num_deepstack, N/4, out_hidden)) in the
    activation dtype, in the reference's order (`pooler_output`, `deepstack_features`).

    The plan and packing run on the host; the jitted core compiles once per (rows, row_len) bucket.
    """
    plan = vision_plan(grid_thw, cfg)
    packed = pack_pixels(pixel_values, plan)
    merged, deepstack = _encode_packed_jit(params, packed, plan.device_arrays(), cfg=cfg, rt=rt)
    n = plan.num_tokens
    return merged[:n], deepstack[:, :n]
