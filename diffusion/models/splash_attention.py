"""The attention core by JAX's Pallas TPU splash attention kernel (a flash kernel: logits are
computed and softmaxed block by block in VMEM, never materialised as a (T, S) array in HBM).

:func:`splash_attention_core` has the contract of the einsum core
(``attention.dot_product_attention(..., 'xla')``) for a key padding mask: (B, T, H, D) queries,
(B, S, H, D) keys and values, an optional (B or 1, S) key mask, scale 1/sqrt(D), rows whose keys
are all masked give zeros. It runs on one device's arrays; splitting them over a mesh is
``attention.py``'s business (a Pallas call is opaque to XLA's partitioner).

The kernel's own interface is per example, (heads, length, head_dim); masks that vary by example
are its segment ids (a query attends to keys of its own id), so a real key has id 1, a padded key
0, and every query 1. Lengths are padded up to a multiple of the block size with keys of id 0, so
any length works (75,600 tokens become 75,776 with 512-token blocks).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

# The kernel's tiles must be multiples of the TPU's 128 lanes; 512 keeps the MXU busy at Wan's
# 128-wide heads while a (512, 512) float32 tile stays a small part of VMEM.
LANES = 128
MAX_BLOCK = 512


def block_size(length: int) -> int:
    """The kernel's tile along a sequence of `length` tokens: 512, or the length rounded up to a
    multiple of 128 when shorter (a short text is not padded to 512)."""
    return min(MAX_BLOCK, LANES * math.ceil(length / LANES))


def padded_length(length: int) -> int:
    """`length` rounded up to a multiple of its block size."""
    block = block_size(length)
    return block * math.ceil(length / block)


@functools.lru_cache(maxsize=16)
def make_kernel(heads: int, query_length: int, key_length: int, interpret: bool):
    """The splash kernel for every head seeing every key of padded lengths (a full mask: padding
    and key masks are segment ids). Cached: building it scans the mask block by block."""
    block_q, block_kv = block_size(query_length), block_size(key_length)
    blocks = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    full = splash.FullMask((query_length, key_length))
    return splash.make_splash_mha(
        splash.MultiHeadMask([full] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def pad_axis(x: jax.Array, axis: int, length: int) -> jax.Array:
    """Zero-pads `x` along `axis` up to `length`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def key_segment_ids(
    key_mask: jax.Array | None, batch: int, key_length: int, padded: int
) -> jax.Array:
    """(B, padded) int32: 1 for a real key, 0 for a masked or padding key."""
    real = jnp.arange(padded) < key_length
    if key_mask is not None:
        real = real & pad_axis(key_mask.astype(bool), 1, padded)
    return jnp.broadcast_to(real, (batch, padded)).astype(jnp.int32)


def splash_attention_core(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    *,
    interpret: bool = False,
) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v by the splash kernel: (B, T, H, D) x (B, S, H, D) -> (B, T, H, D).

    key_mask: (B or 1, S), truthy for real keys. interpret: run the kernel in Pallas interpret
    mode (plain XLA ops, for CPU tests); on TPU it must be False. The scale is applied to q in
    its dtype before the kernel (which has none), the kernel's softmax is float32 as the einsum
    core's. Differentiable (the kernel's custom VJP).
    """
    batch, query_length, heads, head_dim = q.shape
    key_length = k.shape[1]
    padded_q, padded_k = padded_length(query_length), padded_length(key_length)
    kernel = make_kernel(heads, padded_q, padded_k, interpret)

    def per_head_layout(x, padded):  # (B, L, H, D) -> (B, H, padded, D)
        return pad_axis(x, 1, padded).transpose(0, 2, 1, 3)

    q = per_head_layout(q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype), padded_q)
    k, v = per_head_layout(k, padded_k), per_head_layout(v, padded_k)
    kv_ids = key_segment_ids(key_mask, batch, key_length, padded_k)
    q_ids = jnp.ones((batch, padded_q), jnp.int32)

    def per_example(q, k, v, q_ids, kv_ids):
        return kernel(q, k, v, splash.SegmentIds(q=q_ids, kv=kv_ids))

    out = jax.vmap(per_example)(q, k, v, q_ids, kv_ids)  # (B, H, padded_q, D)
    out = out[:, :, :query_length].transpose(0, 2, 1, 3)  # (B, T, H, D)
    if key_mask is None:
        return out
    # A row with no real key is a uniform average over masked ones in the kernel; the einsum core
    # gives zeros there.
    has_keys = jnp.any(kv_ids, axis=1)[:, None, None, None]
    return jnp.where(has_keys, out, jnp.zeros((), out.dtype))
