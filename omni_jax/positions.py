"""Position ids for the thinker's M-RoPE (the reference `get_rope_index`).

This module holds the text-only rule; the multimodal TM-RoPE rules (images, videos, audio,
audio-in-video) extend it. Positions are computed on the host in numpy, as the reference processor
path does, and handed to the jitted model as fp32 (video temporal ids are fractional).
"""

from __future__ import annotations

import numpy as np

__all__ = ["text_position_ids"]


def text_position_ids(attention_mask_bs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Text-only M-RoPE ids, exactly as the reference.

    Returns (position_ids (3, B, S) fp32, rope_deltas (B,) fp32): real tokens count 0, 1, 2, ... from
    each row's first real token (left padding is skipped); padding gets 1, as in the reference; the
    delta is `max_position + 1 - num_real_tokens` (0 for text).
    """
    mask = np.asarray(attention_mask_bs)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {mask.shape}")
    positions = np.cumsum(mask, axis=-1).astype(np.float32) - 1.0
    positions = np.where(mask == 0, 1.0, positions).astype(np.float32)
    deltas = positions.max(axis=-1) + 1.0 - mask.sum(axis=-1)
    return np.broadcast_to(positions[None], (3, *positions.shape)).copy(), deltas.astype(np.float32)
