"""umT5's encoder (Chung et al. 2023, "UniMax"), the text encoder of Wan 2.1.

A T5 v1.1 encoder: token embedding -> blocks of [RMS norm -> self-attention with a learned
relative position bias, residual; RMS norm -> gated-GELU feed-forward, residual] -> RMS norm.
umT5 differs from T5 in giving every block its own relative position bias table (T5 shares the
first block's). T5's attention does not divide the logits by sqrt(head_dim): the scale is folded
into the initialisation of the query projection, so an imported checkpoint is run as it is.

Follows transformers' `UMT5EncoderModel`; `diffusion.hf.umt5` imports its checkpoints.
Parameters carry the project's logical axis names, so the 5.7B encoder of Wan (umt5-xxl) shards
over fsdp (width) and tensor (heads, feed-forward units, vocabulary) like the other models.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import sharding
from diffusion.models import embeddings, layers


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Every size of a umT5 encoder; the defaults are umt5-xxl, Wan 2.1's text encoder."""

    vocab_size: int = 256384
    width: int = 4096  # d_model
    num_heads: int = 64
    head_dim: int = 64  # d_kv: not width / num_heads in general
    ffn_dim: int = 10240  # d_ff
    depth: int = 24  # num_layers
    num_buckets: int = 32  # relative_attention_num_buckets (half per direction)
    max_distance: int = 128  # relative_attention_max_distance
    eps: float = 1e-6  # layer_norm_epsilon
    activation: str = "gelu_tanh"  # transformers' "gelu_new" of "gated-gelu"
    gated: bool = True  # "gated-gelu": act(x W0) * (x W1); False: act(x W)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "width", "num_heads", "head_dim", "ffn_dim", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_buckets < 4 or self.num_buckets % 4:
            raise ValueError(
                f"num_buckets must be a positive multiple of 4, got {self.num_buckets}"
            )
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(
                f"max_distance {self.max_distance} must exceed num_buckets / 4 "
                f"({self.num_buckets // 4}), where the logarithmic buckets start"
            )
        layers.resolve_activation(self.activation)
        layers.resolve_dtype(self.dtype)
        layers.resolve_dtype(self.param_dtype)


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """(T, S) bucket of each key's offset from each query, bidirectional (T5's encoder).

    Half the buckets are for keys after the query. In each half, offsets below a quarter of
    the buckets get one bucket each, larger ones logarithmically wider buckets up to
    `max_distance`, beyond which all share the last. Computed in float32 as mesh-tensorflow and
    transformers do, so that the bucket edges fall on the same offsets.
    """
    offset = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # key - query
    half = num_buckets // 2
    bucket = (offset > 0).astype(np.int64) * half
    distance = np.abs(offset)
    exact = half // 2
    far = np.maximum(distance, exact).astype(np.float32)  # the others take the exact buckets
    scaled = np.log(far / np.float32(exact)) / np.float32(math.log(max_distance / exact))
    logarithmic = exact + (scaled * np.float32(half - exact)).astype(np.int64)
    logarithmic = np.minimum(logarithmic, half - 1)
    return bucket + np.where(distance < exact, distance, logarithmic)


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale in float32 statistics: T5's norm, no mean, no bias."""

    def __init__(self, features: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = layers.make_param(rngs, layers.ones, (features,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class SelfAttention(nnx.Module):
    """T5 self-attention: no bias terms, no 1/sqrt(d) scale, plus a learned (bucket, head) bias."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        width, heads, head_dim = config.width, config.num_heads, config.head_dim
        init = nnx.initializers.normal((width * head_dim) ** -0.5)  # transformers' q init
        p = lambda shape, axes, init=init: layers.make_param(rngs, init, shape, axes, param_dtype)
        self.query = p((width, heads, head_dim), ("embed", "heads", "kv"))
        self.key = p((width, heads, head_dim), ("embed", "heads", "kv"))
        self.value = p((width, heads, head_dim), ("embed", "heads", "kv"))
        self.out = p((heads, head_dim, width), ("heads", "kv", "embed"))
        self.position_bias = p((config.num_buckets, heads), ("length", "heads"))

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x: (B, T, width); key_mask: (B, T) truthy for real tokens -> (B, T, width)."""
        project = lambda kernel: layers.matmul(x, kernel[...].astype(self.dtype))
        q, k, v = project(self.query), project(self.key), project(self.value)  # (B, T, H, K)
        length = x.shape[1]
        buckets = relative_position_buckets(
            length, length, self.config.num_buckets, self.config.max_distance
        )
        bias = jnp.take(self.position_bias[...].astype(jnp.float32), buckets, axis=0)  # (T,T,H)
        logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        logits = logits + jnp.transpose(bias, (2, 0, 1))[None]
        visible = key_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, T)
        logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        attended = jnp.einsum("bhts,bshd->bthd", weights, v)  # (B, T, H, K)
        return layers.matmul(attended, self.out[...].astype(self.dtype), contracting=2)


class FeedForward(nnx.Module):
    """Gated: act(x W0) * (x W1) W_out (T5 v1.1 "gated-gelu"); else act(x W) W_out."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.activation = config.activation
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = layers.Dense(config.width, config.ffn_dim, ("embed", "mlp"), **kw)
        self.up = nnx.data(
            layers.Dense(config.width, config.ffn_dim, ("embed", "mlp"), **kw)
            if config.gated
            else None
        )
        self.down = layers.Dense(config.ffn_dim, config.width, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.resolve_activation(self.activation)(self.gate(x))
        if self.up is not None:
            h = h * self.up(x)
        h = sharding.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )
        return self.down(h)


class UMT5Block(nnx.Module):
    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = RMSNorm(config.width, config.eps, **kw)
        self.attention = SelfAttention(config, **kw)
        self.ffn_norm = RMSNorm(config.width, config.eps, **kw)
        self.ffn = FeedForward(config, **kw)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = sharding.with_logical_constraint(x, layers.TOKEN_AXES)
        x = x + self.attention(self.attention_norm(x), key_mask)
        return x + self.ffn(self.ffn_norm(x))


class UMT5Encoder(nnx.Module):
    """(tokens (B, L) int, mask (B, L)) -> token states (B, L, width), float32.

    States at padded positions are computed (they attend to the real tokens) as transformers
    computes them; Wan's pipeline zeroes them, see `masked_states`.
    """

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        dtype, param_dtype = (layers.resolve_dtype(config.dtype),
                              layers.resolve_dtype(config.param_dtype))  # fmt: skip
        self.config, self.dtype = config, dtype
        self.embed = embeddings.Embed(
            config.vocab_size, config.width, stddev=1.0, param_dtype=param_dtype, rngs=rngs
        )
        self.blocks = nnx.List(
            [UMT5Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for _ in range(config.depth)]
        )  # fmt: skip
        self.final_norm = RMSNorm(
            config.width, config.eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tokens.shape}")
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask
        if mask.shape != tokens.shape:
            raise ValueError(f"mask {mask.shape} must match tokens {tokens.shape}")
        x = self.embed(tokens).astype(self.dtype)  # (B, L, width)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x).astype(jnp.float32)


def masked_states(states: jax.Array, mask: jax.Array) -> jax.Array:
    """Token states with padded positions set to 0, as Wan's pipeline feeds them to its DiT."""
    return jnp.where(mask.astype(bool)[..., None], states, 0.0)
