"""Attention: masks, the scaled dot-product core, and the multi-head projection module.

Softmax statistics are computed in float32 whatever the compute dtype; projection kernels are
(embed, heads, kv) so tensor parallelism can split the heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models.layers import make_param, matmul, zeros

ATTENTION_IMPLEMENTATIONS = (
    "xla",  # explicit einsum + float32 softmax
    "fused",  # jax.nn.dot_product_attention (XLA or cuDNN flash attention, chosen by JAX)
)


def make_attention_mask(
    query_length: int,
    key_mask: jax.Array | None = None,
    causal: bool = False,
    key_length: int | None = None,
) -> jax.Array | None:
    """Boolean mask (B or 1, 1, T, S), True where a query may attend to a key.

    key_mask: (B, S), truthy for real (non-padded) keys. causal: key j is visible to query i only
    if j <= i (requires T == S).
    """
    mask = None
    if key_mask is not None:
        mask = key_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, S)
    if causal:
        key_length = key_length if key_length is not None else query_length
        causal_mask = jnp.tril(jnp.ones((query_length, key_length), bool))[None, None]
        mask = causal_mask if mask is None else jnp.logical_and(mask, causal_mask)
    return mask


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(d)) in float32 (Vaswani et al. 2017, eq. 1), masked keys get 0.

    q: (B, T, H, D), k: (B, S, H, D), mask broadcastable to (B, H, T, S) -> weights (B, H, T, S).
    A finite large negative (not -inf) keeps fully masked rows finite instead of NaN.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)  # exact zeros on padded keys
    return weights


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Multi-head attention core: (B, T, H, D) x (B, S, H, D) -> (B, T, H, D).

    'xla' is the explicit einsum + float32 softmax; 'fused' calls `jax.nn.dot_product_attention`
    (XLA or cuDNN flash attention chosen by JAX).
    """
    if implementation == "fused":
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    if implementation != "xla":
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"valid: {ATTENTION_IMPLEMENTATIONS}"
        )
    weights = attention_weights(q, k, mask).astype(v.dtype)  # (B, H, T, S)
    return jnp.einsum("bhts,bshd->bthd", weights, v)


class Attention(nnx.Module):
    """Multi-head self- or cross-attention with separate query/key/value/output projections.

    Kernels are (embed, heads, kv) so tensor parallelism can split heads. `zero_output=True`
    zero-initialises the output projection (a residual branch that starts as the identity).
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        context_width: int | None = None,
        use_bias: bool = True,
        zero_output: bool = False,
        implementation: str = "xla",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention implementation {implementation!r}; "
                f"valid: {ATTENTION_IMPLEMENTATIONS}"
            )
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.implementation = implementation
        self.dtype = dtype
        context_width = context_width or width
        heads, head_dim = num_heads, self.head_dim
        # Xavier-uniform over the whole (in, heads * head_dim) matrix, as nn.Linear in DiT.
        in_init = nnx.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2)
        )
        out_init = (
            zeros
            if zero_output
            else nnx.initializers.variance_scaling(
                1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2
            )
        )
        p = lambda init, shape, axes: make_param(rngs, init, shape, axes, param_dtype)
        in_axes, bias_axes = ("embed", "heads", "kv"), ("heads", "kv")
        self.query_kernel = p(in_init, (width, heads, head_dim), in_axes)
        self.key_kernel = p(in_init, (context_width, heads, head_dim), in_axes)
        self.value_kernel = p(in_init, (context_width, heads, head_dim), in_axes)
        self.out_kernel = p(out_init, (heads, head_dim, width), ("heads", "kv", "embed"))
        self.use_bias = use_bias
        if use_bias:
            self.query_bias = p(zeros, (heads, head_dim), bias_axes)
            self.key_bias = p(zeros, (heads, head_dim), bias_axes)
            self.value_bias = p(zeros, (heads, head_dim), bias_axes)
            self.out_bias = p(zeros, (width,), ("embed",))

    def _project(self, x, kernel, bias):
        y = matmul(x.astype(self.dtype), kernel[...].astype(self.dtype))  # (B, T, H, K)
        if self.use_bias:
            y = y + bias[...].astype(self.dtype)
        return y

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        key_mask: jax.Array | None = None,
        causal: bool = False,
    ) -> jax.Array:
        """x: (B, T, width); context: (B, S, context_width) or None for self-attention;
        key_mask: (B, S) truthy for real keys; causal: each query sees only keys j <= i."""
        context = x if context is None else context
        q = self._project(x, self.query_kernel, getattr(self, "query_bias", None))  # (B,T,H,D)
        k = self._project(context, self.key_kernel, getattr(self, "key_bias", None))  # (B,S,H,D)
        v = self._project(context, self.value_kernel, getattr(self, "value_bias", None))
        mask = make_attention_mask(x.shape[1], key_mask, causal, key_length=context.shape[1])
        out = dot_product_attention(q, k, v, mask, self.implementation)  # (B, T, H, D)
        y = matmul(out, self.out_kernel[...].astype(self.dtype), contracting=2)  # (B, T, D)
        if self.use_bias:
            y = y + self.out_bias[...].astype(self.dtype)
        return y  # (B, T, width)
