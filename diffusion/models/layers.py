"""The basic layers shared by the CLIP towers and the DiT: parameters with logical axis names,
dtypes, the matmul, Dense, LayerNorm and the transformer MLP.

The other building blocks live beside this module, one concept each: `attention`, `patches`
(pixels to tokens and back), `embeddings` (positions, lookup tables, timesteps) and `blocks`
(stacks of blocks, scan and remat).

Conventions used by every layer of diffusion.models:
  * parameters are stored in `param_dtype` (float32) and cast to the compute `dtype` (bfloat16 on
    TPU) at use; softmax and LayerNorm statistics are always computed in float32;
  * every parameter carries logical axis names (`sharding.PARAMETER_AXIS_NAMES`) in its
    `out_sharding` metadata, never a mesh axis: `diffusion/sharding.py` maps names to mesh axes
    with the rules of `config.mesh.rules`;
  * activations are constrained with logical names (`sharding.ACTIVATION_AXIS_NAMES`) at block
    boundaries through `sharding.with_logical_constraint`, a no-op unless a mesh and rules are
    active.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion import sharding

# Re-exported: training, AOT and sampling code reach these as layers.<name>.
from diffusion.models.blocks import copy_params_into_scanned, merge_here  # noqa: F401

# The logical names of a (B, T, D) residual stream of tokens.
TOKEN_AXES = ("activation_batch", "activation_length", "activation_embed")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# --------------------------------------------------------------------------------------------
# Parameters and dtypes
# --------------------------------------------------------------------------------------------


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
    unknown = [name for name in logical_axes if name not in sharding.PARAMETER_AXIS_NAMES]
    if unknown:
        raise ValueError(
            f"unknown logical axis names {unknown}; valid: {sharding.PARAMETER_AXIS_NAMES}"
        )
    key = rngs.params() if rngs is not None else jax.random.key(0)
    value = initializer(key, tuple(shape), param_dtype)
    # Placement is left to the caller (sharding.create_sharded_state: jit with out_shardings);
    # eager sharding at creation would bypass its divisibility fallback.
    return nnx.Param(value, out_sharding=tuple(logical_axes), eager_sharding=False)


def logical_axes_of(module: nnx.Module) -> dict[str, tuple | None]:
    """{'path/to/param': logical axis names or None} for every nnx.Param of `module`."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {
        "/".join(map(str, path)): variable.get_metadata().get("out_sharding")
        for path, variable in flat
    }


def resolve_dtype(name: str):
    """Map a config dtype string to a jnp dtype, with a clear error."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


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
    fused elementwise backward pass into a (D, B * T) copy, a large share of a CPU train step
    (docs/performance.md); the flattened form needs no such copy. On TPU and GPU as the plain
    contraction: on TPU the flattened form adds HBM traffic (docs/performance.md); GPU, not
    measured, keeps the plain contraction.
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
    """y = x W + b with logical axis names `(in_axis, out_axis)` on W, plus `adapter(x)` when a
    model attaches one (a low-rank adapter, diffusion/models/lora.py)."""

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
        self.adapter = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.adapter is not None:
            y = y + self.adapter(x)
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
        h = sharding.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )
        return self.fc2(h)  # (B, T, width)
