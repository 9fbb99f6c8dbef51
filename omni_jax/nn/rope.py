"""Rotary position embeddings: 1-D, and the interleaved multimodal M-RoPE of Qwen3-Omni.

Frequencies, angles, cos and sin are computed in fp32 and cast to the activation dtype only at the
end, as the reference does (pitfall P2). Rotation uses `rotate_half` pairing (dim i with i + d/2),
not adjacent pairs (pitfall P1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["inverse_frequencies", "mrope_section_index", "mrope_cos_sin", "rope_cos_sin", "apply_rotary"]


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """(head_dim // 2,) fp32 inverse frequencies `1 / theta^(2i / head_dim)`, as torch computes them.

    Like the reference: fp32 exponents, an fp32 power, then an fp32 reciprocal. The power is taken in
    float64 and rounded once to fp32 (the correctly rounded fp32 power), not with numpy's fp32 `**`,
    whose result depends on the CPU: on AVX-512 machines numpy's vectorised fp32 pow is 2 ulp off at
    some entries (theta 1e6, head_dim 128: entry 52), which moves cos/sin at position 600 by 6e-5.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    power = (np.float64(np.float32(theta)) ** exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def mrope_section_index(mrope_section: tuple[int, ...]) -> np.ndarray:
    """Which position row (0=T, 1=H, 2=W) drives each of the head_dim/2 frequency slots.

    Qwen3-Omni interleaves: slots start as T; slots 1, 4, 7, ... below 3*section[1] become H and
    slots 2, 5, 8, ... below 3*section[2] become W. For [24, 20, 20] that is THW x 20 then TTTT.
    """
    num_slots = int(sum(mrope_section))
    index = np.zeros(num_slots, dtype=np.int32)
    for row, offset in ((1, 1), (2, 2)):
        index[offset : mrope_section[row] * 3 : 3] = row
    return index


def mrope_cos_sin(
    position_ids_3bs: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, ...], dtype
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (B, S, head_dim) for (T, H, W) position rows `position_ids_3bs` (3, B, S).

    Positions may be fractional (video temporal ids are), so they are taken as fp32.
    """
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))  # (head_dim/2,)
    rows = jnp.asarray(mrope_section_index(mrope_section))  # (head_dim/2,)
    positions = position_ids_3bs.astype(jnp.float32)  # (3, B, S)
    # Pick, for every frequency slot, the position row that drives it: (B, S, head_dim/2).
    per_slot = jnp.take(jnp.moveaxis(positions, 0, -1), rows, axis=-1)
    angles = per_slot * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rope_cos_sin(position_ids_bs: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (B, S, head_dim) for plain 1-D positions (B, S)."""
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))
    angles = position_ids_bs.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x_bshd: jax.Array, cos_bsd: jax.Array, sin_bsd: jax.Array) -> jax.Array:
    """Rotates x (B, S, heads, head_dim) by cos/sin (B, S, head_dim), broadcast over heads."""
    cos = cos_bsd[:, :, None, :]
    sin = sin_bsd[:, :, None, :]
    return x_bshd * cos + _rotate_half(x_bshd) * sin
