"""Building blocks shared by the CLIP towers and the DiT.

Conventions used by every layer here:
  * parameters are stored in `param_dtype` (float32) and cast to the compute `dtype` (bfloat16 on
    TPU) at use; softmax and LayerNorm statistics are always computed in float32;
  * every parameter carries logical axis names (`LOGICAL_AXIS_NAMES`) in its `out_sharding`
    metadata, never a mesh axis: `diffusion/sharding.py` maps names to mesh axes with rules;
  * activations are constrained with logical names at block boundaries through `constrain`, which
    is a no-op unless a mesh and logical-axis rules are active.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

# Every logical axis name a parameter of diffusion.models may carry; sharding rules must cover
# all of them (a name without a rule would be read as a mesh axis).
LOGICAL_AXIS_NAMES = (
    "embed",  # model width (residual stream)
    "mlp",  # hidden units of MLPs and other wide intermediate layers
    "heads",  # attention heads
    "kv",  # per-head feature dimension
    "vocab",  # token-embedding rows
    "classes",  # class-label embedding rows
    "length",  # rows of a learned position table
    "patch",  # flattened patch pixels (p * p * channels)
    "projection",  # CLIP's shared image-text embedding space
    "norm",  # LayerNorm scale and bias
    "layers",  # the stacked-block axis added by scan_layers
    "height",  # spatial rows of a convolution kernel
    "width",  # spatial columns of a convolution kernel
    "conv_in",  # input channels of a pixel-space convolution
    "channels",  # image channels (a pixel-space convolution's outputs)
)
# Logical names of activation dimensions (used only in `constrain`).
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

ATTENTION_IMPLEMENTATIONS = (
    "xla",
    "fused",
)  # explicit einsum softmax | jax.nn.dot_product_attention


# --------------------------------------------------------------------------------------------
# Sharding helpers
# --------------------------------------------------------------------------------------------


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation; a no-op without a mesh and axis rules."""
    return linen.with_logical_constraint(x, tuple(logical_axes))


def make_param(
    rngs: nnx.Rngs | None,
    initializer: Callable,
    shape: Sequence[int],
    logical_axes: Sequence[str],
    param_dtype=jnp.float32,
) -> nnx.Param:
    """An `nnx.Param` initialised by `initializer(key, shape, dtype)` with logical axis names."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match parameter shape {shape}")
    unknown = [name for name in logical_axes if name not in LOGICAL_AXIS_NAMES]
    if unknown:
        raise ValueError(f"unknown logical axis names {unknown}; valid: {LOGICAL_AXIS_NAMES}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    value = initializer(key, tuple(shape), param_dtype)
    # Placement is left to the caller (sharding.create_sharded_state: jit with out_shardings);
    # eager sharding at creation would bypass its divisibility fallback.
    return nnx.Param(value, out_sharding=tuple(logical_axes), eager_sharding=False)


def resolve_dtype(name: str):
    """Map a config dtype string to a jnp dtype, with a clear error."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; valid: {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
he_normal = nnx.initializers.he_normal()  # ReLU/GELU convolutions
ones = nnx.initializers.ones_init()


def normal(stddev: float) -> Callable:
    return nnx.initializers.normal(stddev)


# --------------------------------------------------------------------------------------------
# Dense, LayerNorm, MLP
# --------------------------------------------------------------------------------------------


def flatten_rows_here() -> bool:
    """Whether `matmul` flattens its rows in the current trace: only for CPU programs.

    The platform is the active mesh's (so a TPU program compiled ahead of time on a CPU host
    counts as TPU), else jax's default backend.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    return platform == "cpu"


def matmul(
    x: jax.Array, kernel: jax.Array, contracting: int = 1, flatten: bool | None = None
) -> jax.Array:
    """Contracts the last `contracting` dims of x with the first of `kernel`.

    (B, T, D) x (D, N) -> (B, T, N), (B, T, H, K) x (H, K, D) -> (B, T, D). On CPU
    (`flatten=None` -> `flatten_rows_here()`) as one 2-D matmul over the flattened B * T rows:
    XLA:CPU lowers the einsum's weight gradient (a contraction over B and T) by transposing the
    fused elementwise backward pass into a (D, B * T) copy, which cost up to 60 % of the DiT's
    train step at batch 32 (docs/performance.md); the flattened form needs no such copy. On TPU
    and GPU as the plain contraction: on TPU the flattened form made the compiler's count of
    DiT-XL/2's HBM traffic 12.7 % larger (docs/performance.md); GPU, not measured, keeps the
    form it always had.
    """
    inner = x.shape[x.ndim - contracting :]
    if tuple(kernel.shape[:contracting]) != tuple(inner):
        raise ValueError(f"matmul: x {x.shape} and kernel {kernel.shape} do not contract")
    if not (flatten_rows_here() if flatten is None else flatten):
        return jnp.tensordot(x, kernel, axes=contracting)
    size = math.prod(inner)
    y = jnp.dot(x.reshape(-1, size), kernel.reshape(size, -1))
    return y.reshape(*x.shape[: x.ndim - contracting], *kernel.shape[contracting:])


class Dense(nnx.Module):
    """y = x W + b with logical axis names `(in_axis, out_axis)` on W."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        logical_axes: tuple[str, str],
        *,
        use_bias: bool = True,
        kernel_init: Callable = xavier_uniform,
        bias_init: Callable = zeros,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.kernel = make_param(
            rngs, kernel_init, (in_features, out_features), logical_axes, param_dtype
        )
        self.bias = nnx.data(
            make_param(rngs, bias_init, (out_features,), logical_axes[1:], param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics (Ba et al. 2016); `affine=False` is DiT's norm."""

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.data(
            make_param(rngs, ones, (features,), ("norm",), param_dtype) if affine else None
        )
        self.bias = nnx.data(
            make_param(rngs, zeros, (features,), ("norm",), param_dtype) if affine else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(variance + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form (HF "gelu")
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # DiT's approx_gelu
    "quick_gelu": quick_gelu,  # OpenAI CLIP
    "silu": jax.nn.silu,
}


def resolve_activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nnx.Module):
    """Transformer feed-forward: Dense(width -> hidden), activation, Dense(hidden -> width)."""

    def __init__(
        self,
        width: int,
        hidden: int,
        activation: str = "gelu",
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.activation = activation
        resolve_activation(activation)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(width, hidden, ("embed", "mlp"), **kw)
        self.fc2 = Dense(hidden, width, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = resolve_activation(self.activation)(self.fc1(x))  # (B, T, hidden)
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return self.fc2(h)  # (B, T, width)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p * p * C), patches in row-major order, pixels (p, q, c)."""
    b, h, w, c = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"image size {h}x{w} is not divisible by the patch size {patch_size}; "
            f"use a height and width that are multiples of {patch_size}"
        )
    x = images.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, H/p, W/p, p, p, C)
    return x.reshape(b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)


def unpatchify(tokens: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
    """Inverse of `patchify`: (B, T, p * p * C) -> (B, H, W, C)."""
    b, _, d = tokens.shape
    c = d // (patch_size * patch_size)
    gh, gw = height // patch_size, width // patch_size
    x = tokens.reshape(b, gh, gw, patch_size, patch_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, H/p, p, W/p, p, C)
    return x.reshape(b, height, width, c)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> linear tokens (the stride-p convolution of ViT / DiT)."""

    def __init__(
        self,
        patch_size: int,
        in_channels: int,
        width: int,
        *,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.patch_size = patch_size
        self.proj = Dense(
            patch_size * patch_size * in_channels,
            width,
            ("patch", "embed"),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.proj(patchify(images, self.patch_size))  # (B, T, width)


class ConvStem(nnx.Module):
    """Early convolutions in place of a p x p patchify (Xiao et al. 2021, "Early Convolutions
    Help Transformers See Better"): log2(p) 3x3 stride-2 convolutions, each followed by GELU,
    with channels doubling up to width / 2, then a linear projection to the width. The tokens
    are the patchify's (one per p x p cell, row-major), but each sees a 3x3-convolved
    neighbourhood, so edges and outlines that cross patch borders reach the transformer.
    For ViT-B/16 (width 768) the channels are Xiao's 48, 96, 192, 384.
    """

    def __init__(
        self,
        patch_size: int,
        in_channels: int,
        width: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_convs = conv_stem_depth(patch_size, width)
        channels = [in_channels] + [width >> (num_convs - i) for i in range(num_convs)]
        self.dtype = dtype
        axes = ("height", "width", "conv_in", "channels")
        self.kernels = nnx.List(
            [
                make_param(rngs, he_normal, (3, 3, c_in, c_out), axes, param_dtype)
                for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
            ]
        )
        self.biases = nnx.List(
            [make_param(rngs, zeros, (c,), ("channels",), param_dtype) for c in channels[1:]]
        )
        self.proj = Dense(
            channels[-1], width, ("patch", "embed"), dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )  # fmt: skip

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(self.dtype)
        for kernel, bias in zip(self.kernels, self.biases, strict=True):
            x = jax.lax.conv_general_dilated(
                x,
                kernel[...].astype(self.dtype),
                window_strides=(2, 2),
                padding=((1, 1), (1, 1)),  # PyTorch's padding=1: kernels centred on pixels
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            x = jax.nn.gelu(x + bias[...].astype(self.dtype))
        b, h, w, c = x.shape
        return self.proj(x.reshape(b, h * w, c))  # (B, T, width), T = (H/p) * (W/p)


def conv_stem_depth(patch_size: int, width: int) -> int:
    """Stride-2 convolutions of a ConvStem for ``patch_size`` (a power of two, at least 2) and
    a model ``width`` that the stem's channels (width / 2^k ... width / 2) divide."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(
            f"a conv stem needs a patch size that is a power of two (2, 4, 8, ...), got "
            f"{patch_size}; use the 'patch' stem or change the patch size"
        )
    num_convs = patch_size.bit_length() - 1
    if width % 2**num_convs:
        raise ValueError(
            f"a conv stem for patch {patch_size} halves the width {num_convs} times; width "
            f"{width} is not divisible by {2**num_convs}: use a multiple of {2**num_convs}"
        )
    return num_convs


class PixelConv(nnx.Module):
    """A k x k 'SAME' convolution on images (B, H, W, C) -> (B, H, W, C), identity at init.

    U-ViT (Bao et al. 2023) puts a 3x3 convolution after the patch decoder: each output pixel
    then mixes its neighbours across patch borders, which a per-patch linear decoder cannot.
    Initialised to the identity (centre tap 1, the rest 0) so a model starts as it would
    without it.
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, *, dtype=jnp.float32, param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        if kernel_size % 2 != 1:
            raise ValueError(
                f"kernel_size must be odd (a centred 'SAME' kernel), got {kernel_size}"
            )
        centre = kernel_size // 2

        def identity(key, shape, dtype):
            del key
            return jnp.zeros(shape, dtype).at[centre, centre].set(jnp.eye(channels, dtype=dtype))

        self.dtype = dtype
        shape = (kernel_size, kernel_size, channels, channels)
        axes = ("height", "width", "conv_in", "channels")
        self.kernel = make_param(rngs, identity, shape, axes, param_dtype)
        self.bias = make_param(rngs, zeros, (channels,), ("channels",), param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        out = jax.lax.conv_general_dilated(
            images.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return out + self.bias[...].astype(self.dtype)


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
        table = constrain(self.embedding[...], (self.row_axis, None))
        # Out-of-range ids give NaN rows under jit ("fill" mode) instead of a silent clamp.
        rows = jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)
        batch_axes = ("activation_batch",) + ("activation_length",) * (ids.ndim - 1)
        return constrain(rows, (*batch_axes, "activation_embed"))


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


# --------------------------------------------------------------------------------------------
# adaLN modulation (DiT, Peebles & Xie 2023, sec. 3.2)
# --------------------------------------------------------------------------------------------


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x * (1 + scale) + shift, with (B, D) shift/scale broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLNModulation(nnx.Module):
    """SiLU -> Dense(width -> n * width), zero-initialised (adaLN-Zero): returns n (B, width)."""

    def __init__(
        self, width: int, num_chunks: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs
    ):
        self.num_chunks = num_chunks
        self.linear = Dense(
            width,
            num_chunks * width,
            ("embed", "mlp"),
            kernel_init=zeros,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
        chunks = jnp.split(self.linear(jax.nn.silu(c)), self.num_chunks, axis=-1)  # n x (B, D)
        # Each chunk shifts, scales or gates the residual stream, so it takes the stream's layout:
        # batch split, width whole. Left free, it inherits the kernel's 'mlp' (tensor) split of
        # the n * D outputs, and XLA (jax 0.10.2, Shardy and GSPMD alike) then partitions
        # `gate * attn(h)` / `gate * mlp(h)` wrongly on a data x fsdp x tensor mesh: the dot
        # before the gate gets a collective-permute that swaps batch shards between devices.
        # Guarded by tests/test_dit.py::test_gradients_on_a_data_fsdp_tensor_mesh_equal_one_...
        return tuple(constrain(chunk, ("activation_batch", "activation_embed")) for chunk in chunks)


# --------------------------------------------------------------------------------------------
# Stack of blocks: optional nnx.scan (params gain a leading 'layers' axis) and remat
# --------------------------------------------------------------------------------------------


class BlockStack(nnx.Module):
    """`depth` blocks applied in order, `x = block(x, *args)`.

    scan_layers=True creates the blocks with `nnx.vmap` and runs them with `nnx.scan`, so compile
    time does not grow with depth; parameters then have a leading 'layers' axis.
    remat_policy (see REMAT_POLICIES) wraps each block in `nnx.remat`.
    """

    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        depth: int,
        *,
        scan_layers: bool = False,
        remat_policy: str = "none",
        rngs: nnx.Rngs,
    ):
        resolve_remat_policy(remat_policy)
        self.depth = depth
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        if scan_layers:

            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(rngs):
                return make_block(rngs)

            self.blocks = create(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])

    def __call__(self, x: jax.Array, *args) -> jax.Array:
        def apply(block, x):
            return block(x, *args)

        if self.remat_policy != "none":
            apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat_policy])
        if self.scan_layers:

            @nnx.scan(
                in_axes=(0, nnx.Carry),
                out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            def scan_body(block, x):
                return apply(block, x)

            return scan_body(self.blocks, x)
        for block in self.blocks:
            x = apply(block, x)
        return x


def logical_axes_of(module: nnx.Module) -> dict[str, tuple | None]:
    """{'path/to/param': logical axis names or None} for every nnx.Param of `module`."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {
        "/".join(map(str, path)): variable.get_metadata().get("out_sharding")
        for path, variable in flat
    }


def merge_here(graphdef: nnx.GraphDef, state) -> nnx.Module:
    """`nnx.merge` with variables made anew in the current trace. A module whose state comes
    from an outer trace (a closure inside value_and_grad, lax.map or a sampler's lax.scan)
    fails in nnx.scan with "different trace level" when its blocks are scanned; the identity
    map over the state costs nothing in the compiled program."""
    return nnx.merge(graphdef, jax.tree.map(lambda value: value, state))


def copy_params_into_scanned(unscanned: nnx.Module, scanned: nnx.Module) -> None:
    """Copy the parameters of a model built with scan_layers=False into the same model built
    with scan_layers=True, stacking block i's parameters at index i of the 'layers' axis."""
    source = {
        path: variable.get_value()
        for path, variable in nnx.to_flat_state(nnx.state(unscanned, nnx.Param))
    }
    updated = []
    for path, variable in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
        stack_at = next(
            (i + 2 for i in range(len(path) - 1) if path[i : i + 2] == ("blocks", "blocks")), None
        )
        if stack_at is None:
            value = source[path]
        else:
            depth = variable.get_value().shape[0]
            value = jnp.stack(
                [source[(*path[:stack_at], i, *path[stack_at:])] for i in range(depth)]
            )
        updated.append((path, variable.replace(value)))
    nnx.update(scanned, nnx.from_flat_state(updated))
