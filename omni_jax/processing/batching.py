"""Joining per-request processor outputs into one batch's media arrays."""

from __future__ import annotations

import numpy as np

__all__ = ["concat_media"]

_CONCATENATED_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid")


def concat_media(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The media keys of several `process_messages` results as one batch would have them.

    Audio features (n, mel, frames) are right-padded to the longest clip, with their
    `feature_attention_mask` (n, frames); images and videos are concatenated along their first axis.
    `use_audio_in_video` is the caller's to set.
    """
    media: dict[str, np.ndarray] = {}
    audio = [m for m in parts if "input_features" in m]
    if audio:
        # Frames past a clip's own mask are never read by the encoder: zero padding is exact.
        frames = max(m["input_features"].shape[-1] for m in audio)
        media["input_features"] = np.concatenate(
            [np.pad(m["input_features"], ((0, 0), (0, 0), (0, frames - m["input_features"].shape[-1]))) for m in audio])
        media["feature_attention_mask"] = np.concatenate(
            [np.pad(m["feature_attention_mask"], ((0, 0), (0, frames - m["feature_attention_mask"].shape[-1])))
             for m in audio])
    for key in _CONCATENATED_KEYS:
        arrays = [m[key] for m in parts if key in m]
        if arrays:
            media[key] = np.concatenate(arrays)
    return media
