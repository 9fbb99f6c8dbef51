"""The thinker's training forward: a batch dict (text + media) -> logits, router logits, talker inputs.

Pure and differentiable in every parameter it reads, the audio tower and vision encoder included:
the encoders' host-side layout plans (chunks, windows, packed frames; numpy from the media
metadata) become array inputs of the jitted step, and the differentiable cores
(`audio_encoder.encode_padded`, `vision_encoder.encode_packed`) take the parameters as traced
arguments. The encoder outputs are scattered into the placeholder tokens (`thinker.merge_media`)
and the decoder runs with DeepStack (`decoder.prefill`), exactly as inference does.

Host side (`plan_batch`): the data pipeline's batch, rows (B, S), becomes

    input_ids, attention_mask, labels   (k, b, S) int32      k micro-batches of b = B / k rows
    position_ids                        (k, 3, b, S) float32
    codec_ids (k, b, F, G), codec_mask (k, b, F)             when the batch has speech targets
    speaker (k, b) int32                                     talker speaker ids, when given
    audio: {chunks (k, g, C, mel, 2*n_window), pad_len (k, g), row_src (k, g, G*W),
            segment_ids (k, g, G, W), out_src (k, g, G*W)}
    image / video: {pixels (k, g, P, C*T*p*p), segment_ids (k, g, rows, row_len),
            positions_hw (k, g, P, 2), interp_index (k, g, P, 4), interp_weight (k, g, P, 4),
            token_index (k, g, P/4)}

Media are planned per *row group*: each micro-batch's rows are split into g groups of b/g
consecutive rows and a group's encoders see only its own media. With g = the number of batch shards
of the mesh (data x expert), every device encodes its own rows' media (data-parallel encoders) and
the groups shard like the rows. Shapes are equalised over groups and micro-batches (the encoders'
buckets, then the maximum), so the step compiles once per (sequence bucket, media bucket).
A group without some media kind that another group has gets a one-item dummy (no placeholder
reads it, so it gets no gradient).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import audio_encoder, positions, thinker, vision_encoder
from omni_jax.config import OmniConfig, Runtime, ThinkerConfig
from omni_jax.nn import decoder
from omni_jax.training.losses import IGNORE_INDEX

__all__ = ["MediaSizes", "plan_batch", "media_sizes", "encode_media", "ForwardOutput", "thinker_forward",
           "micro_batch", "ROW_KEYS"]

# Per-row arrays and their batch dimension in the data pipeline's batch.
ROW_KEYS = {"input_ids": 0, "attention_mask": 0, "labels": 0, "position_ids": 1, "codec_ids": 0, "codec_mask": 0,
            "speaker": 0}
_VISION_FIELDS = ("pixels", "segment_ids", "positions_hw", "interp_index", "interp_weight", "token_index")
_AUDIO_FIELDS = ("chunks", "pad_len", "row_src", "segment_ids", "out_src")


class MediaSizes(NamedTuple):
    """Padded media shapes of a planned batch (processes of a multi-host job agree on the maxima):
    audio (chunks, attention rows), image / video (packed rows, row length); None when absent."""

    audio: tuple[int, int] | None = None
    image: tuple[int, int] | None = None
    video: tuple[int, int] | None = None

    def merge(self, other: "MediaSizes") -> "MediaSizes":
        def one(a, b):
            if a is None or b is None:
                return a if b is None else b
            return tuple(max(x, y) for x, y in zip(a, b))

        return MediaSizes(*(one(a, b) for a, b in zip(self, other)))


# ------------------------------------------------------------------------------------------- host
def _assign_items(item_tokens: np.ndarray, ids: np.ndarray, token_id: int, rows_per_group: int, what: str):
    """Items (audios, images, videos) of each row group, from their token counts and the placeholder
    counts per row (items appear in row-major token order)."""
    row_counts = np.sum(ids == token_id, axis=1)
    bounds = np.concatenate([[0], np.cumsum(row_counts)])[::rows_per_group]
    cum = np.concatenate([[0], np.cumsum(item_tokens)]).astype(np.int64)
    if cum[-1] != bounds[-1]:
        raise ValueError(
            f"{what}: input_ids hold {int(bounds[-1])} placeholder tokens (id {token_id}) but the {what} inputs "
            f"make {int(cum[-1])} embeddings; build input_ids and the media with the same processor call"
        )
    idx = np.searchsorted(cum, bounds)
    if np.any(cum[np.minimum(idx, len(cum) - 1)] != bounds):
        raise ValueError(f"{what}: an item's placeholder tokens span two row groups (rows are split between "
                         "micro-batches/devices at row boundaries; check the placeholder counts)")
    return [np.arange(idx[j], idx[j + 1]) for j in range(len(bounds) - 1)]


def _audio_plans(batch, ids, cfg: ThinkerConfig, rows_per_group: int):
    feats = np.asarray(batch["input_features"], np.float32)
    fam = np.asarray(batch["feature_attention_mask"]).astype(bool)
    lens = fam.sum(-1).astype(np.int64)
    tokens = audio_encoder.audio_output_lengths(lens)
    groups = _assign_items(tokens, ids, cfg.audio_token_id, rows_per_group, "audio")
    plans = []
    for items in groups:
        items = items[lens[items] > 0]
        if len(items) == 0:
            plans.append(None)
            continue
        packed, group_lens = audio_encoder.pack_batched_features(feats[items], fam[items])
        plans.append(audio_encoder.plan_audio(packed, group_lens, cfg.audio_config))
    return plans


def _dummy_audio_plan(cfg: ThinkerConfig):
    return audio_encoder.plan_audio(np.zeros((cfg.audio_config.num_mel_bins, 1), np.float32), [1], cfg.audio_config)


def _pad_audio(plan, chunks: int, rows: int) -> dict:
    w = plan.segment_ids.shape[1]
    c0, g0 = plan.chunks_cmf.shape[0], plan.segment_ids.shape[0]
    # Extra chunks are zeros no slot reads; extra rows are empty slots (segment 0) no output reads.
    return {
        "chunks": np.pad(plan.chunks_cmf, ((0, chunks - c0), (0, 0), (0, 0))),
        "pad_len": np.asarray(plan.pad_len, np.int32),
        "row_src": np.pad(plan.row_src, (0, (rows - g0) * w)).astype(np.int32),
        "segment_ids": np.pad(plan.segment_ids, ((0, rows - g0), (0, 0))).astype(np.int32),
        "out_src": np.pad(plan.out_src, (0, (rows - g0) * w)).astype(np.int32),
    }


def _vision_items(batch, ids, cfg: ThinkerConfig, kind: str, rows_per_group: int):
    pixel_key, grid_key, token_id = (
        ("pixel_values", "image_grid_thw", cfg.image_token_id) if kind == "image"
        else ("pixel_values_videos", "video_grid_thw", cfg.video_token_id)
    )
    pixels = np.asarray(batch[pixel_key], np.float32)
    grid = np.asarray(batch[grid_key], np.int64).reshape(-1, 3)
    patches = np.prod(grid, axis=1)
    unit = cfg.vision_config.spatial_merge_size ** 2
    if patches.sum() != pixels.shape[0]:
        raise ValueError(f"{pixel_key} has {pixels.shape[0]} patches but {grid_key} describes {int(patches.sum())}")
    starts = np.concatenate([[0], np.cumsum(patches)])
    groups = _assign_items(patches // unit, ids, token_id, rows_per_group, f"{kind}s")
    out = []
    for items in groups:
        if len(items) == 0:
            out.append(None)
            continue
        px = np.concatenate([pixels[starts[i]:starts[i + 1]] for i in items])
        out.append((grid[items], px))
    return out


def _dummy_vision(cfg: ThinkerConfig, patch_dim: int):
    m = cfg.vision_config.spatial_merge_size
    return np.array([[1, m, m]], np.int64), np.zeros((m * m, patch_dim), np.float32)


def _vision_arrays(grid, px, cfg: ThinkerConfig, rows: int, row_len: int) -> dict:
    plan = vision_encoder.vision_plan(grid, cfg.vision_config, rows=rows, row_len=row_len)
    a = plan.device_arrays()
    return {
        "pixels": vision_encoder.pack_pixels(px, plan).astype(np.float32),
        "segment_ids": np.asarray(a.segment_ids, np.int32),
        "positions_hw": np.asarray(a.positions_hw, np.int32),
        "interp_index": np.asarray(a.interp_index, np.int32),
        "interp_weight": np.asarray(a.interp_weight, np.float32),
        "token_index": np.asarray(a.token_index, np.int32),
    }


def _stack_groups(dicts: list[dict], k: int, g: int) -> dict:
    return {key: np.stack([d[key] for d in dicts]).reshape(k, g, *dicts[0][key].shape) for key in dicts[0]}


def plan_batch(
    batch: Mapping[str, Any],
    config: OmniConfig,
    *,
    micro_batches: int = 1,
    groups: int = 1,
    sizes: MediaSizes | None = None,
) -> tuple[dict, MediaSizes]:
    """The data pipeline's numpy batch -> the step's arrays (see the module docstring) and their media sizes.

    micro_batches: k, rows split into k consecutive micro-batches (gradient accumulation).
    groups: g, each micro-batch's rows split into g media groups (the batch shards of the mesh).
    sizes: lower bounds for the padded media shapes (from other processes, or the largest seen so far:
      `MediaSizes.merge`); a kind present there but absent from the batch gets dummy inputs, so the
      batch keeps the program's structure.
    Checks the placeholder counts against the media (an error names the kind).
    """
    cfg = config.thinker_config
    if "input_ids" not in batch:
        raise ValueError(f"a training batch needs input_ids; got keys {sorted(batch)}")
    ids = np.asarray(batch["input_ids"]).astype(np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}")
    num_rows, seq = ids.shape
    k, g = int(micro_batches), int(groups)
    if num_rows % (k * g):
        raise ValueError(f"the batch's {num_rows} rows do not split into {k} micro-batches x {g} row groups "
                         "(batch_size must be a multiple of grad_accum_steps x the mesh's data x expert size)")
    rows_per_group = num_rows // (k * g)
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(np.int32).reshape(ids.shape)
    labels = batch.get("labels")
    labels = np.full_like(ids, IGNORE_INDEX) if labels is None else np.asarray(labels).astype(np.int32)
    if labels.shape != ids.shape:
        raise ValueError(f"labels {labels.shape} and input_ids {ids.shape} differ in shape")
    has_media = any(batch.get(key) is not None for key in ("input_features", "pixel_values", "pixel_values_videos"))
    pos = batch.get("position_ids")
    if pos is None:
        multimodal = {key: batch[key] for key in ("feature_attention_mask", "image_grid_thw", "video_grid_thw",
                                                  "video_second_per_grid", "use_audio_in_video") if key in batch}
        pos = (positions.position_ids_for_inputs(ids, mask, cfg, **multimodal)[0] if has_media
               else positions.text_position_ids(mask)[0])
    pos = np.asarray(pos, np.float32)
    if pos.shape != (3, num_rows, seq):
        raise ValueError(f"position_ids must be (3, batch, seq) = (3, {num_rows}, {seq}), got {pos.shape}")

    def rows(x, batch_dim=0):
        x = np.moveaxis(np.asarray(x), batch_dim, 0)
        x = x.reshape(k, num_rows // k, *x.shape[1:])
        return np.moveaxis(x, 1, batch_dim + 1)

    out: dict[str, Any] = {
        "input_ids": rows(ids), "attention_mask": rows(mask), "labels": rows(labels),
        "position_ids": rows(pos, 1),
    }
    if batch.get("codec_ids") is not None:
        codec = np.asarray(batch["codec_ids"]).astype(np.int32)
        codec_mask = batch.get("codec_mask")
        codec_mask = np.ones(codec.shape[:2], np.int32) if codec_mask is None else np.asarray(codec_mask, np.int32)
        out["codec_ids"], out["codec_mask"] = rows(codec), rows(codec_mask)
        speaker = batch.get("speaker", batch.get("speaker_ids"))  # the data pipeline calls it speaker_ids
        if speaker is not None:
            out["speaker"] = rows(np.asarray(speaker).astype(np.int32).reshape(num_rows))
    sizes = sizes or MediaSizes()
    new_sizes = MediaSizes()

    if batch.get("input_features") is not None or sizes.audio is not None:
        if batch.get("input_features") is not None:
            plans = _audio_plans(batch, ids, cfg, rows_per_group)
        else:  # the floor asks for audio this batch lacks: dummies keep the program's structure
            _check_absent(ids, cfg.audio_token_id, "audio", "input_features")
            plans = [None] * (k * g)
        plans = [p if p is not None else _dummy_audio_plan(cfg) for p in plans]
        chunks = max(p.chunks_cmf.shape[0] for p in plans)
        att_rows = max(p.segment_ids.shape[0] for p in plans)
        if sizes.audio is not None:
            chunks, att_rows = max(chunks, sizes.audio[0]), max(att_rows, sizes.audio[1])
        out["audio"] = _stack_groups([_pad_audio(p, chunks, att_rows) for p in plans], k, g)
        new_sizes = new_sizes._replace(audio=(chunks, att_rows))
    else:
        _check_absent(ids, cfg.audio_token_id, "audio", "input_features")

    for kind, pixel_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        token_id = cfg.image_token_id if kind == "image" else cfg.video_token_id
        floor = getattr(sizes, kind)
        if batch.get(pixel_key) is None:
            _check_absent(ids, token_id, f"{kind}s", pixel_key)
            if floor is None:
                continue
            items = [None] * (k * g)  # dummies for the floor's structure
        else:
            items = _vision_items(batch, ids, cfg, kind, rows_per_group)
        vc = cfg.vision_config
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        items = [it if it is not None else _dummy_vision(cfg, patch_dim) for it in items]
        shapes = [vision_encoder.vision_plan(grid, cfg.vision_config).segment_ids.shape for grid, _ in items]
        vrows, row_len = max(s[0] for s in shapes), max(s[1] for s in shapes)
        if floor is not None:
            vrows, row_len = max(vrows, floor[0]), max(row_len, floor[1])
        # A longer row can hold more frames: rows needed never grow when row_len does.
        out[kind] = _stack_groups([_vision_arrays(grid, px, cfg, vrows, row_len) for grid, px in items], k, g)
        new_sizes = new_sizes._replace(**{kind: (vrows, row_len)})
    return out, new_sizes


def media_sizes(planned: Mapping[str, Any]) -> MediaSizes:
    """The padded media shapes of a planned batch."""
    audio = planned.get("audio")
    return MediaSizes(
        audio=None if audio is None else (audio["chunks"].shape[2], audio["segment_ids"].shape[2]),
        image=None if planned.get("image") is None else tuple(planned["image"]["segment_ids"].shape[2:4]),
        video=None if planned.get("video") is None else tuple(planned["video"]["segment_ids"].shape[2:4]),
    )


def _check_absent(ids, token_id: int, what: str, key: str) -> None:
    count = int(np.sum(ids == token_id))
    if count:
        raise ValueError(f"input_ids hold {count} {what} placeholder tokens (id {token_id}) but the batch has no {key}")


def micro_batch(planned: Mapping[str, Any], index) -> dict:
    """Micro-batch `index` of a planned batch (every array's leading axis)."""
    return jax.tree.map(lambda x: x[index], dict(planned))


# ------------------------------------------------------------------------------------------ device
def _per_group(fn, *args):
    """fn over the leading group axis: a plain call for one group (the inference path, no batching
    rule needed by any kernel), vmap otherwise."""
    if jax.tree.leaves(args)[0].shape[0] == 1:
        out = fn(*jax.tree.map(lambda x: x[0], args))
        return jax.tree.map(lambda x: x[None], out)
    return jax.vmap(fn)(*args)


def encode_media(params: dict, media: Mapping[str, Any], cfg: ThinkerConfig, rt: Runtime) -> thinker.MediaEmbeds | None:
    """Encoder outputs per row group: MediaEmbeds whose arrays carry a leading group axis g
    (audio (g, G*W, D), image/video (g, P/4, D), deepstack (g, n, P/4, D)); None without media."""
    audio = image = video = image_ds = video_ds = None
    if media.get("audio") is not None:
        a = media["audio"]

        def run_audio(chunks, pad_len, row_src, segment_ids, out_src):
            return audio_encoder.encode_padded(params["audio_tower"], chunks, pad_len, row_src, segment_ids, out_src,
                                               cfg.audio_config, rt)

        audio = _per_group(run_audio, *(a[f] for f in _AUDIO_FIELDS))

    def run_vision(pixels, segment_ids, positions_hw, interp_index, interp_weight, token_index):
        plan = vision_encoder.PlanArrays(segment_ids, positions_hw, interp_index, interp_weight, token_index)
        return vision_encoder.encode_packed(params["visual"], pixels, plan, cfg.vision_config, rt)

    if media.get("image") is not None:
        image, image_ds = _per_group(run_vision, *(media["image"][f] for f in _VISION_FIELDS))
    if media.get("video") is not None:
        video, video_ds = _per_group(run_vision, *(media["video"][f] for f in _VISION_FIELDS))
    if audio is None and image is None and video is None:
        return None
    return thinker.MediaEmbeds(audio=audio, image=image, video=video, image_deepstack=image_ds,
                               video_deepstack=video_ds)


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # (B, S, vocab) in the compute dtype; None when not asked for
    router_logits: jax.Array  # (L, B*S, E)
    embeds: jax.Array  # (B, S, D) input embeddings after the media merge (the talker's text-side input)
    hidden: jax.Array | None  # (B, S, D) hidden_states[capture_layer] (the talker's multimodal-side input)


def thinker_forward(
    params: dict,
    mb: Mapping[str, Any],
    cfg: ThinkerConfig,
    rt: Runtime,
    *,
    capture_layer: int | None = None,
    compute_logits: bool = True,
) -> ForwardOutput:
    """The thinker on one micro-batch of `plan_batch` (no leading k axis): text rows (B, S) with
    `position_ids` (3, B, S) and the media dicts (leading group axis g, B divisible by g).

    params: the thinker's parameter tree. capture_layer: also return that layer's hidden states in the
    reference's numbering (the talker's `accept_hidden_layer`).
    """
    ids, mask = mb["input_ids"], mb["attention_mask"]
    b, s = ids.shape
    x = thinker.embed_tokens(params, ids, jnp.dtype(rt.dtype))
    deepstack = None
    media = encode_media(params, mb, cfg, rt)
    if media is not None:
        g = jax.tree.leaves(media)[0].shape[0]
        d = x.shape[-1]
        x_g, ds_g = jax.vmap(lambda xx, ii, mm: thinker.merge_media(xx, ii, mm, cfg))(
            x.reshape(g, b // g, s, d), ids.reshape(g, b // g, s), media)
        x = x_g.reshape(b, s, d)
        if ds_g is not None:  # (g, n, b/g, s, d) -> (n, b, s, d)
            deepstack = jnp.moveaxis(ds_g, 1, 0).reshape(ds_g.shape[1], b, s, d)
    out = decoder.prefill(params["model"], x, mb["position_ids"], mask, thinker.text_dims(cfg), rt,
                          deepstack_nbsd=deepstack, capture_layer=capture_layer)
    logits = thinker.lm_logits(params, out.hidden) if compute_logits else None
    return ForwardOutput(logits, out.router_logits, x, out.captured)
