"""Attention: masks, the scaled dot-product core, sequence-parallel attention, and the
multi-head projection module.

Softmax statistics are computed in float32 whatever the compute dtype; projection kernels are
(embed, heads, kv) so tensor parallelism can split the heads.

Sequence parallelism: when the active rules split the token axis (``activation_length``) over
mesh axes of size > 1 (``config.mesh.sequence``), ``implementation='ulysses'`` runs attention as
DeepSpeed-Ulysses does (all-to-all from token-sharded to head-sharded, the plain core over the
whole sequence for the local heads, all-to-all back) and ``implementation='ring'`` as ring
attention does (key/value blocks passed from device to device, a streaming softmax).

On TPU, ``implementation='splash'`` runs the core by the Pallas splash attention kernel
(:mod:`diffusion.models.splash_attention`: a flash kernel, no (T, S) logits in HBM) and
``'ulysses_splash'`` is Ulysses with that kernel as its per-device core. On CPU (tests) the
kernel runs in Pallas interpret mode.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from diffusion import sharding
from diffusion.errors import UserError
from diffusion.models.layers import make_param, matmul, zeros
from diffusion.models.splash_attention import splash_attention_core

ATTENTION_IMPLEMENTATIONS = (
    "xla",  # explicit einsum + float32 softmax
    "fused",  # jax.nn.dot_product_attention (XLA or cuDNN flash attention, chosen by JAX)
    "ulysses",  # sequence parallel: all-to-all tokens <-> heads around the 'xla' core
    "ring",  # sequence parallel: key/value blocks passed around a ring, streaming softmax
    "splash",  # Pallas TPU splash attention kernel (flash: logits stay in VMEM)
    "ulysses_splash",  # sequence parallel: Ulysses around the splash kernel
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
    (XLA or cuDNN flash attention chosen by JAX); 'ulysses' and 'ring' are
    :func:`ulysses_attention` and :func:`ring_attention`; 'splash' is :func:`splash_attention` and
    'ulysses_splash' :func:`ulysses_attention` with the splash core.
    """
    if implementation == "splash":
        return splash_attention(q, k, v, mask)
    if implementation in ("ulysses", "ulysses_splash"):
        core = "splash" if implementation == "ulysses_splash" else "xla"
        return ulysses_attention(q, k, v, mask, core=core)
    if implementation == "ring":
        return ring_attention(q, k, v, mask)
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
# The splash kernel on a mesh
# ------------------------------------------------------------------------------------------------


def splash_interpret() -> bool:
    """Whether the splash kernel runs in Pallas interpret mode (plain XLA ops, for tests): on
    CPU, not on TPU. The platform is the active mesh's devices' (a TPU topology compiled ahead
    of time on a CPU host is TPU), else the default backend's.

    Raises:
      UserError: on any other platform (a GPU), where interpret mode would be silently slow.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    if platform not in ("tpu", "cpu"):
        raise UserError(
            f"splash attention is a TPU kernel (interpreted on CPU for tests), not for "
            f"{platform}; use attention_impl='fused' (cuDNN flash attention) or 'ulysses'"
        )
    return platform == "cpu"


def kernel_checks_vma(core: str) -> bool:
    """``check_vma`` of a shard_map around `core`: the splash kernel's Pallas call declares its
    outputs without the mesh axes they vary over, which JAX's check refuses."""
    return core != "splash"


def splash_key_mask(mask: jax.Array | None) -> jax.Array | None:
    """The (B or 1, S) key mask of a mask broadcastable to (B, H, T, S), for the splash kernel.

    Raises:
      UserError: for a mask that varies with the head or the query (causal, per head): the
        kernel's per-example masks are segment ids, which express key padding only.
    """
    mask = _as_4d(mask)
    if mask is None:
        return None
    if mask.shape[1] != 1 or mask.shape[2] != 1:
        raise UserError(
            f"splash attention takes a key padding mask (B, 1, 1, S) only, not a mask of shape "
            f"{mask.shape} that varies with the head or the query (e.g. causal); use "
            "attention_impl='xla' or 'fused' for this model"
        )
    return mask[:, 0, 0, :]


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """The core by the splash kernel: (B, T, H, D) x (B, S, H, D) -> (B, T, H, D), equal to
    ``dot_product_attention(q, k, v, mask)`` for a key padding mask (:func:`splash_key_mask`).

    Under active rules and a mesh it runs in ``jax.shard_map`` (XLA cannot partition a Pallas
    call): batch and heads split as :data:`QKV_AXES` say, queries split over the sequence axes
    when the rules split their tokens, keys and values whole on every device (for self-attention
    over split tokens that gathers them; 'ulysses_splash' moves heads instead).

    Raises:
      UserError: for a mask that is not a key padding mask, or devices that are neither TPUs
        nor CPUs (:func:`splash_interpret`).
    """
    key_mask = splash_key_mask(mask)
    core = functools.partial(splash_attention_core, interpret=splash_interpret())
    active = sharding.active_mesh_and_rules()
    if active is None:
        return core(q, k, v, key_mask)
    mesh, rules = active
    batch, tokens, heads, _ = sharding.logical_to_spec(QKV_AXES, rules, shape=q.shape, mesh=mesh)
    query_spec = PartitionSpec(batch, tokens, heads, None)
    key_spec = PartitionSpec(batch, None, heads, None)
    mask_spec = (
        PartitionSpec()
        if key_mask is None
        else PartitionSpec(None if key_mask.shape[0] == 1 else batch, None)
    )
    return jax.shard_map(
        core,
        mesh=mesh,
        in_specs=(query_spec, key_spec, key_spec, mask_spec),
        out_specs=query_spec,
        check_vma=kernel_checks_vma("splash"),
    )(q, k, v, key_mask)


# ------------------------------------------------------------------------------------------------
# Sequence parallelism
# ------------------------------------------------------------------------------------------------


class SequenceSplit(NamedTuple):
    """How the active rules split a (B, T, H, D) query: PartitionSpec entries of its batch and
    heads, and the mesh axes of its tokens with their total size."""

    mesh: jax.sharding.AbstractMesh
    batch: sharding.MeshAxes
    heads: sharding.MeshAxes
    sequence_axes: tuple[str, ...]
    sequence_size: int

    @property
    def sequence(self) -> sharding.MeshAxes:
        return _spec_entry(self.sequence_axes)

    @property
    def query_spec(self) -> PartitionSpec:
        return PartitionSpec(self.batch, self.sequence, self.heads, None)


def _spec_entry(axes: tuple[str, ...]) -> sharding.MeshAxes:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _axes_size(mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def sequence_split(q_shape: tuple[int, ...], implementation: str) -> SequenceSplit | None:
    """The split of a (B, T, H, D) query under the active mesh and rules; None when its tokens are
    not split (no active rules and mesh, inside a shard_map, or sequence axes of size 1).

    Raises:
      UserError: when T is not divisible by the sequence axes' size (a silent fallback to
        whole sequences would undo what the mesh asked for).
    """
    active = sharding.active_mesh_and_rules()
    if active is None:
        return None
    mesh, rules = active
    batch, _, heads, _ = sharding.logical_to_spec(QKV_AXES, rules, shape=q_shape, mesh=mesh)
    # The token axis unfitted to the shape, so that an indivisible length is seen.
    sequence_axes = sharding.mesh_axes(sharding.logical_to_spec(QKV_AXES, rules, mesh=mesh)[1])
    sequence_size = _axes_size(mesh, sequence_axes)
    if sequence_size == 1:
        return None
    tokens = q_shape[1]
    if tokens % sequence_size:
        raise UserError(
            f"{implementation} attention: {tokens} tokens cannot be split over the sequence mesh "
            f"axes {sequence_axes} ({sequence_size} devices); use a token count that is a "
            f"multiple of {sequence_size} or a config.mesh.sequence that divides {tokens}"
        )
    return SequenceSplit(mesh, batch, heads, sequence_axes, sequence_size)


def _mask_spec(mask, batch, heads, queries) -> PartitionSpec:
    """Spec of a (B or 1, H or 1, T or 1, S) mask: a size-1 (broadcast) dimension is whole."""
    if mask is None:
        return PartitionSpec()
    entries = (batch, heads, queries, None)
    return PartitionSpec(*(None if n == 1 else e for n, e in zip(mask.shape, entries, strict=True)))


def _as_4d(mask: jax.Array | None) -> jax.Array | None:
    return None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def _split_queries_only(q, k, v, mask, split: SequenceSplit, core: str = "xla") -> jax.Array:
    """Cross-attention to keys of another length (a short text): only the queries are split over
    the sequence axes; keys and values are whole on every sequence device, so each device
    attends locally (by the `core` implementation) with no collective."""
    key_spec = PartitionSpec(split.batch, None, split.heads, None)
    return jax.shard_map(
        functools.partial(dot_product_attention, implementation=core),
        mesh=split.mesh,
        in_specs=(
            split.query_spec,
            key_spec,
            key_spec,
            _mask_spec(mask, split.batch, split.heads, split.sequence),
        ),
        out_specs=split.query_spec,
        check_vma=kernel_checks_vma(core),
    )(q, k, v, mask)


def check_ulysses_heads(
    heads: int,
    head_axes: tuple[str, ...],
    head_devices: int,
    sequence_axes: tuple[str, ...],
    sequence_size: int,
) -> None:
    """Ulysses' condition on a mesh: after the all-to-all each of the `sequence_size` devices of
    the token split holds whole heads, so the heads per device of the head split (`head_devices`
    devices of `head_axes`) must be divisible by it. Checked where the attention runs and, before
    any work, by callers that know the mesh (Wan sampling).

    Raises:
      UserError: naming the head count, the split and the fixes.
    """
    local_heads = heads // head_devices
    if local_heads % sequence_size:
        raise UserError(
            f"ulysses attention: {heads} heads ({local_heads} per device after the head axes "
            f"{head_axes or '()'} of {head_devices} devices) are not divisible by the "
            f"{sequence_size} devices of the sequence mesh axes {sequence_axes}: after the "
            f"all-to-all each device needs whole heads. Use a num_heads that is a multiple of "
            f"{sequence_size * head_devices}, a config.mesh.sequence that divides {local_heads}, "
            "a smaller config.mesh.tensor, or attention_impl='ring'"
        )


def ulysses_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, core: str = "xla"
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
    queries are split (:func:`_split_queries_only`), and the heads need no divisibility.

    `core` is the per-device core: 'xla' (the einsum) or 'splash' (the TPU kernel). Falls back to
    that core when the tokens are not split (:func:`sequence_split`).

    Raises:
      UserError: when T is not divisible by the sequence axes' size, or (self-attention) the heads
        per device are not, naming the numbers and the fix.
    """
    split = sequence_split(q.shape, "ulysses")
    mask = _as_4d(mask)
    if split is None:
        return dot_product_attention(q, k, v, mask, core)
    if k.shape[1] != q.shape[1]:
        return _split_queries_only(q, k, v, mask, split, core)
    head_axes = sharding.mesh_axes(split.heads)
    check_ulysses_heads(
        q.shape[2], head_axes, _axes_size(split.mesh, head_axes), split.sequence_axes,
        split.sequence_size,
    )  # fmt: skip
    axes = split.sequence_axes

    def per_device(q, k, v, mask):
        to_heads = lambda x: jax.lax.all_to_all(x, axes, split_axis=2, concat_axis=1, tiled=True)
        # (b, T/s, h, D) -> (b, T, h/s, D)
        out = dot_product_attention(to_heads(q), to_heads(k), to_heads(v), mask, core)
        return jax.lax.all_to_all(out, axes, split_axis=1, concat_axis=2, tiled=True)

    # After the all-to-all a device's heads are its tensor share's s-th part: in a per-head mask
    # they are the block (tensor index, sequence index), tensor major.
    mask_spec = _mask_spec(mask, split.batch, _spec_entry(head_axes + axes), None)
    return jax.shard_map(
        per_device,
        mesh=split.mesh,
        in_specs=(split.query_spec, split.query_spec, split.query_spec, mask_spec),
        out_specs=split.query_spec,
        check_vma=kernel_checks_vma(core),
    )(q, k, v, mask)


def _online_softmax_block(carry, q, k, v, mask):
    """One key block of the streaming softmax (Milakov & Gimelshein 2018; Rabe & Staats 2021):
    rescale the running (max, sum, weighted values) to the new row maximum and add the block.

    carry: row_max, row_sum (b, h, t) and acc (b, h, t, D) in float32; q (b, t, h, D);
    k, v (b, s, h, D); mask broadcastable to (b, h, t, s) or None.
    """
    row_max, row_sum, acc = carry
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # The result does not depend on the shift (it cancels between numerator and denominator),
    # so its gradient is not needed.
    new_max = jax.lax.stop_gradient(jnp.maximum(row_max, jnp.max(logits, axis=-1)))
    correction = jnp.exp(row_max - new_max)
    weights = jnp.exp(logits - new_max[..., None])
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)  # exact zeros on padded keys, as the core
    row_sum = row_sum * correction + jnp.sum(weights, axis=-1)
    block = jnp.einsum("bhts,bshd->bhtd", weights, v.astype(jnp.float32))
    return new_max, row_sum, acc * correction[..., None] + block


def ring_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Ring attention (Liu et al. 2023, arXiv:2310.01889) over the sequence mesh axes.

    Same contract as :func:`ulysses_attention`. Self-attention: each device keeps its T/s
    queries and passes its key/value block around the ring of s sequence devices with
    ``ppermute``, folding each block into a streaming softmax (:func:`_online_softmax_block`);
    no head divisibility is needed and no device ever holds the whole sequence. Rows whose keys
    are all masked give zeros, as the core does. Cross-attention splits only the queries.

    Raises:
      UserError: when T is not divisible by the sequence axes' size.
    """
    split = sequence_split(q.shape, "ring")
    mask = _as_4d(mask)
    if split is None:
        return dot_product_attention(q, k, v, mask)
    if k.shape[1] != q.shape[1]:
        return _split_queries_only(q, k, v, mask, split)
    axes, s = split.sequence_axes, split.sequence_size
    to_next = [(i, (i + 1) % s) for i in range(s)]

    def per_device(q, k, v, mask):
        b, t, h, d = q.shape
        index = jax.lax.axis_index(axes)

        def key_block_mask(step):  # the mask's columns of the block this device holds now
            if mask is None or mask.shape[3] == 1:
                return mask
            start = ((index - step) % s) * t
            return jax.lax.dynamic_slice_in_dim(mask, start, t, axis=3)

        minimum = jnp.finfo(jnp.float32).min
        carry = (jnp.full((b, h, t), minimum), jnp.zeros((b, h, t)), jnp.zeros((b, h, t, d)))
        carry = _online_softmax_block(carry, q, k, v, key_block_mask(0))
        # A Python loop over the s - 1 passes rather than a lax.scan: under a vmap with
        # spmd_axis_name (Wan's per-clip sampler) JAX 0.10 types a scan's carry without the
        # vmapped mesh axes and refuses the body (varying manual axes mismatch).
        for step_index in range(1, s):
            # After step_index passes the block here is the one that started step_index
            # devices back along the ring.
            k, v = (jax.lax.ppermute(x, axes, to_next) for x in (k, v))
            carry = _online_softmax_block(carry, q, k, v, key_block_mask(step_index))
        _, row_sum, acc = carry
        out = acc / jnp.where(row_sum == 0, 1.0, row_sum)[..., None]  # (b, h, t, D)
        return out.transpose(0, 2, 1, 3).astype(v.dtype)  # (b, t, h, D)

    # Each device keeps its queries' rows of the mask and every key column.
    mask_spec = _mask_spec(mask, split.batch, split.heads, split.sequence)
    return jax.shard_map(
        per_device,
        mesh=split.mesh,
        in_specs=(split.query_spec, split.query_spec, split.query_spec, mask_spec),
        out_specs=split.query_spec,
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
