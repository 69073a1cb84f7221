"""Embeddings: fixed sin-cos positions, learned position tables, lookup tables (tokens, class
labels) and the sinusoidal timestep embedding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import sharding
from diffusion.models.layers import make_param, normal


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """1-D sin-cos embedding [sin(p w_k), cos(p w_k)], w_k = 10000^(-k / (D/2)) (MAE / DiT)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_height: int, grid_width: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE `get_2d_sincos_pos_embed`, used by DiT).

    Half of the channels encode the row, half the column; returns (grid_h * grid_w, embed_dim)
    in row-major token order. Computed in float64 numpy at trace time: a constant, not a param.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width), indexing="ij")
    # DiT/MAE put the column (w) encoding first, then the row (h) encoding.
    return np.concatenate(
        [sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1
    )


class LearnedPositionEmbedding(nnx.Module):
    """A (length, width) table added to the tokens (CLIP)."""

    def __init__(
        self, length: int, width: int, *, stddev: float = 0.01, param_dtype=jnp.float32, rngs
    ):
        self.embedding = make_param(
            rngs, normal(stddev), (length, width), ("length", "embed"), param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        length = x.shape[1]
        if length > self.embedding.shape[0]:
            raise ValueError(
                f"sequence length {length} exceeds the position table ({self.embedding.shape[0]})"
            )
        return x + self.embedding[:length].astype(x.dtype)  # (B, T, width)


class Embed(nnx.Module):
    """Lookup table (num_embeddings, width): token or class embeddings."""

    def __init__(
        self,
        num_embeddings: int,
        width: int,
        *,
        row_axis: str = "vocab",
        stddev: float = 0.02,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.row_axis = row_axis
        self.embedding = make_param(
            rngs, normal(stddev), (num_embeddings, width), (row_axis, "embed"), param_dtype
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather from a table whose width is whole (rows may stay split) into batch-sharded
        # rows: left to itself, XLA's SPMD partitioner keeps the output split like the table's
        # 'embed' (fsdp) axis and then replicates it in full to reach the batch sharding.
        table = sharding.with_logical_constraint(self.embedding[...], (self.row_axis, None))
        # Out-of-range ids give NaN rows under jit ("fill" mode) instead of a silent clamp.
        rows = jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)
        batch_axes = ("activation_batch",) + ("activation_length",) * (ids.ndim - 1)
        return sharding.with_logical_constraint(rows, (*batch_axes, "activation_embed"))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t w_k), sin(t w_k)],
    w_k = max_period^(-k / (dim/2)) (DDPM / DiT `TimestepEmbedder.timestep_embedding`).

    t: (B,) -> (B, dim) float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]  # (B, half)
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding
