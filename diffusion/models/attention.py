"""Attention: masks, the scaled dot-product core, sequence-parallel attention, and the
multi-head projection module.

Softmax statistics are computed in float32 whatever the compute dtype; projection kernels are
(embed, heads, kv) so tensor parallelism can split the heads.

Sequence parallelism: when the active rules split the token axis (``activation_length``) over
mesh axes of size > 1 (``config.mesh.sequence``), ``implementation='ulysses'`` runs attention as
DeepSpeed-Ulysses does: all-to-all from token-sharded to head-sharded, the plain core over the
whole sequence for the local heads, all-to-all back.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from diffusion import sharding
from diffusion.errors import UserError
from diffusion.models.layers import make_param, matmul, zeros

ATTENTION_IMPLEMENTATIONS = (
    "xla",  # explicit einsum + float32 softmax
    "fused",  # jax.nn.dot_product_attention (XLA or cuDNN flash attention, chosen by JAX)
    "ulysses",  # sequence parallel: all-to-all tokens <-> heads around the 'xla' core
)

# Logical names of a (B, T, H, D) query, key or value: the heads follow the projection kernels'
# 'heads' rule, where the projections leave them.
QKV_AXES = ("activation_batch", "activation_length", "heads", "kv")


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
    (XLA or cuDNN flash attention chosen by JAX); 'ulysses' is :func:`ulysses_attention`.
    """
    if implementation == "ulysses":
        return ulysses_attention(q, k, v, mask)
    if implementation == "fused":
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    if implementation != "xla":
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"valid: {ATTENTION_IMPLEMENTATIONS}"
        )
    weights = attention_weights(q, k, mask).astype(v.dtype)  # (B, H, T, S)
    return jnp.einsum("bhts,bshd->bthd", weights, v)


# ------------------------------------------------------------------------------------------------
# Sequence parallelism
# ------------------------------------------------------------------------------------------------


def _mesh_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _check_sequence_split(q_shape, sequence_axes, sequence_size, head_axes, head_size, self_attn):
    tokens, heads = q_shape[1], q_shape[2]
    if tokens % sequence_size:
        raise UserError(
            f"ulysses attention: {tokens} tokens cannot be split over the sequence mesh axes "
            f"{sequence_axes} ({sequence_size} devices); use a token count that is a multiple of "
            f"{sequence_size} or a config.mesh.sequence that divides {tokens}"
        )
    local_heads = heads // head_size
    if self_attn and local_heads % sequence_size:
        raise UserError(
            f"ulysses attention: {heads} heads ({local_heads} per device after the head axes "
            f"{head_axes or '()'} of {head_size} devices) are not divisible by the "
            f"{sequence_size} devices of the sequence mesh axes {sequence_axes}: after the "
            f"all-to-all each device needs whole heads. Use a num_heads that is a multiple of "
            f"{sequence_size * head_size}, a config.mesh.sequence that divides {local_heads}, or "
            "attention_impl='xla'"
        )


def _mask_spec(mask, batch, heads, queries) -> PartitionSpec:
    """Spec of a (B or 1, H or 1, T or 1, S) mask: a size-1 (broadcast) dimension is whole."""
    if mask is None:
        return PartitionSpec()
    entries = (batch, heads, queries, None)
    return PartitionSpec(*(None if n == 1 else e for n, e in zip(mask.shape, entries, strict=True)))


def ulysses_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Sequence-parallel attention of DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509).

    q: (B, T, H, D), k and v: (B, S, H, D), mask broadcastable to (B, H, T, S) -> (B, T, H, D),
    equal to ``dot_product_attention(q, k, v, mask)``. The mesh axes come from the active rules
    (:func:`diffusion.sharding.activate`) for :data:`QKV_AXES`: B over the batch axes, T over the
    token axis's (``sequence``), H over the heads' (``tensor``).

    Self-attention (S == T): inside ``jax.shard_map`` each device turns its (b, T/s, h, D) slice
    into (b, T, h/s, D) with an all-to-all over the s sequence devices, runs the plain core on whole
    sequences of its h/s heads, and turns the result back with a second all-to-all; the local
    heads h must be divisible by s. Cross-attention (S != T, e.g. to a short text): only the
    queries are split over the sequence axes; keys and values are whole on every sequence device
    (replicated, which costs S tokens per device), so the core runs locally with no collective and
    the heads need no divisibility.

    Falls back to the plain core without active rules and mesh, inside another ``shard_map``
    (per-device code, such as the sampling program), and when the token axis is not split
    (the sequence axes are absent or of size 1).

    Raises:
      UserError: when T is not divisible by the sequence axes' size, or (self-attention) the heads
        per device are not, naming the numbers and the fix.
    """
    active = sharding.active_mesh_and_rules()
    if active is None:
        return dot_product_attention(q, k, v, mask)
    mesh, rules = active
    batch, _, heads, _ = sharding.logical_to_spec(QKV_AXES, rules, shape=q.shape, mesh=mesh)
    # The token axis unfitted to the shape: a length the axes do not divide is an error here,
    # not a silent replication.
    sequence_axes = _mesh_axes(sharding.logical_to_spec(QKV_AXES, rules, mesh=mesh)[1])
    sequence_size = math.prod(mesh.shape[a] for a in sequence_axes)
    if sequence_size == 1:
        return dot_product_attention(q, k, v, mask)
    head_axes = _mesh_axes(heads)
    head_size = math.prod(mesh.shape[a] for a in head_axes)
    self_attn = k.shape[1] == q.shape[1]
    _check_sequence_split(q.shape, sequence_axes, sequence_size, head_axes, head_size, self_attn)
    sequence = _spec_entry(sequence_axes)
    query_spec = PartitionSpec(batch, sequence, heads, None)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # (B|1, H|1, T|1, S)

    if self_attn:
        # After the all-to-all a device's heads are its tensor share's s-th part: in the mask
        # they are the block (tensor index, sequence index), tensor major.
        mask_spec = _mask_spec(mask, batch, _spec_entry(head_axes + sequence_axes), None)

        def per_device(q, k, v, mask):
            to_heads = lambda x: jax.lax.all_to_all(
                x, sequence_axes, split_axis=2, concat_axis=1, tiled=True
            )  # (b, T/s, h, D) -> (b, T, h/s, D)
            out = dot_product_attention(to_heads(q), to_heads(k), to_heads(v), mask)
            return jax.lax.all_to_all(
                out, sequence_axes, split_axis=1, concat_axis=2, tiled=True
            )  # (b, T, h/s, D) -> (b, T/s, h, D)

        key_spec = query_spec
    else:
        mask_spec = _mask_spec(mask, batch, heads, sequence)
        per_device = dot_product_attention
        key_spec = PartitionSpec(batch, None, heads, None)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(query_spec, key_spec, key_spec, mask_spec),
        out_specs=query_spec,
    )(q, k, v, mask)


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
