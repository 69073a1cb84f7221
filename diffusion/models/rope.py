"""Rotary position embedding (RoFormer, Su et al. 2021) over a (frames, rows, columns) token grid,
split over the head dimension as Wan 2.1 splits it.

Each pair of features (2i, 2i + 1) of a query or key is rotated by the angle p * w_i (RoFormer
eq. 34), with w_i = theta^(-2i / d) inside the slice of d features that encodes one axis. Wan gives
the rows and the columns 2 * (head_dim // 6) features each and the frames the rest, frames first:
head_dim 128 splits as (44, 42, 42). Rotations preserve norms and make q . k depend on the
position difference only, along each axis.

Angles are computed once per axis in float64 numpy (a small constant: (axis length, d / 2)) and
broadcast over the grid inside the program, so a 21 x 60 x 104 grid adds no large constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Features of each head given to (frames, rows, columns): Wan's split, rows and columns
    2 * (head_dim // 6) each, frames the remainder."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(
            f"3-D rotary positions need an even head dimension of at least 6, got {head_dim}; "
            "choose width and num_heads so that width / num_heads is even and >= 6"
        )
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def axis_frequencies(dim: int, theta: float) -> np.ndarray:
    """w_i = theta^(-2i / dim), i < dim / 2 (RoFormer eq. 15), float64."""
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def axis_angles(length: int, dim: int, theta: float) -> np.ndarray:
    """(length, dim / 2) angles p * w_i for positions p = 0 .. length - 1, float64."""
    return np.outer(np.arange(length, dtype=np.float64), axis_frequencies(dim, theta))


def grid_cos_sin(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of every token's angles: two float32 (T * H * W, head_dim / 2) arrays, tokens
    in row-major (frame, row, column) order, features (frames | rows | columns)."""
    frames, rows, columns = grid
    per_axis = [
        axis_angles(length, dim, theta)
        for length, dim in zip(grid, axis_dims(head_dim), strict=True)
    ]
    shapes = ((frames, 1, 1, -1), (1, rows, 1, -1), (1, 1, columns, -1))

    def table(fn):
        parts = [
            jnp.broadcast_to(
                jnp.asarray(fn(angles), jnp.float32).reshape(shape),
                (frames, rows, columns, angles.shape[1]),
            )
            for angles, shape in zip(per_axis, shapes, strict=True)
        ]
        return jnp.concatenate(parts, axis=-1).reshape(frames * rows * columns, head_dim // 2)

    return table(np.cos), table(np.sin)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the feature pairs (2i, 2i + 1) of x (B, S, H, D) by the angles whose cos and sin
    are (S, D / 2); computed in float32, returned in x's dtype."""
    b, s, h, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, s, h, d // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]  # (B, S, H, D/2) each
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, S, 1, D/2)
    rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)  # (B, S, H, D/2, 2)
    return rotated.reshape(b, s, h, d).astype(x.dtype)
