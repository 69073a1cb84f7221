"""Low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on
the projections of the video DiT, and their merging into the base weights.

A projection y = x W (+ b) with W (*in, *out) gains y += scale * (x A) B, A (*in, r), B (r, *out),
scale = alpha / r (eq. 3 of the paper; PEFT's `LoraLayer.scaling` without rsLoRA). As PEFT does,
A starts Kaiming-uniform (torch's `kaiming_uniform_(a=sqrt(5))`: U(+-1/sqrt(fan_in))) and B zero,
so a fresh adapter leaves the model exactly unchanged and only B moves at the first step.

The adapter of a parameter `<prefix>kernel` is the module `<prefix>adapter` beside it (a Dense's
`kernel` -> `adapter`, an attention's `query_kernel` -> `query_adapter`), with parameters `a` and
`b`; so the base parameters keep their paths (imports, exports and checkpoints of the base are
unchanged) and `is_adapter_path` tells trained from frozen parameters by path alone.

Which projections carry one is a tuple of target names (TARGETS, diffusers' names beside them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models import layers

# Our target name -> the module diffusers names inside `blocks.{i}` (for the export).
TARGETS = {
    "self_attn.query": "attn1.to_q",
    "self_attn.key": "attn1.to_k",
    "self_attn.value": "attn1.to_v",
    "self_attn.out": "attn1.to_out.0",
    "cross_attn.query": "attn2.to_q",
    "cross_attn.key": "attn2.to_k",
    "cross_attn.value": "attn2.to_v",
    "cross_attn.out": "attn2.to_out.0",
    "ffn.fc1": "ffn.net.0.proj",
    "ffn.fc2": "ffn.net.2",
}
ADAPTER_SUFFIX = "adapter"  # the attribute `<prefix>adapter` adapts the parameter `<prefix>kernel`


def scale_of(rank: int, alpha: float | None) -> float:
    """alpha / rank; alpha None means alpha = rank (scale 1, diffusers' reading of a file that
    states no alpha)."""
    return 1.0 if alpha is None else float(alpha) / rank


# PEFT's `nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))`: gain^2 = 2 / (1 + 5) = 1/3,
# bound sqrt(3 gain^2 / fan_in) = 1 / sqrt(fan_in); variance_scaling(1/3, uniform) has that bound.
def a_init(in_ndim: int):
    return nnx.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(in_ndim)), out_axis=-1
    )


class LoRA(nnx.Module):
    """x (..., *in) -> scale * (x A) B (..., *out): the low-rank update of one projection."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Sequence[str],
        out_axes: Sequence[str],
        *,
        rank: int,
        alpha: float | None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = scale_of(rank, alpha)
        self.dtype = dtype
        self.contracting = len(in_shape)
        self.a = layers.make_param(
            rngs, a_init(len(in_shape)), (*in_shape, rank), (*in_axes, "lora_rank"), param_dtype
        )
        self.b = layers.make_param(
            rngs, layers.zeros, (rank, *out_shape), ("lora_rank", *out_axes), param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.matmul(x.astype(self.dtype), self.a[...].astype(self.dtype), self.contracting)
        return self.scale * layers.matmul(h, self.b[...].astype(self.dtype))  # (..., *out)


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """The targets as a tuple, or ValueError naming an unknown one and the valid ones."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(
            f"unknown LoRA target(s) {unknown or targets!r}; valid (at least one): "
            f"{', '.join(TARGETS)}"
        )
    return targets


def adapter(
    target: str,
    config,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    in_axes: Sequence[str],
    out_axes: Sequence[str],
    *,
    rngs: nnx.Rngs,
) -> LoRA | None:
    """The LoRA of projection `target` if `config` (lora_rank, lora_alpha, lora_targets, dtype,
    param_dtype) adapts it, else None."""
    if config.lora_rank == 0 or target not in config.lora_targets:
        return None
    return LoRA(
        in_shape,
        out_shape,
        in_axes,
        out_axes,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        dtype=layers.resolve_dtype(config.dtype),
        param_dtype=layers.resolve_dtype(config.param_dtype),
        rngs=rngs,
    )


def is_adapter_path(path: Sequence) -> bool:
    """Whether a parameter path (as nnx flat states spell it) is an adapter's A or B."""
    return len(path) >= 2 and str(path[-2]).endswith(ADAPTER_SUFFIX) and path[-1] in ("a", "b")


def adapters_of(model: nnx.Module) -> dict[tuple, LoRA]:
    """{path of the adapter module: module} of every LoRA in `model`."""
    return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, LoRA)}


def kernel_path(adapter_path: Sequence) -> tuple:
    """(..., '<prefix>adapter') -> (..., '<prefix>kernel'): the parameter an adapter updates."""
    *parent, name = adapter_path
    return (*parent, name[: -len(ADAPTER_SUFFIX)] + "kernel")


def low_rank_update(lora: LoRA, stacked: bool) -> jax.Array:
    """scale * A B in float32, shaped like the adapted kernel ((layers, ...) when `stacked`)."""
    a = lora.a[...].astype(jnp.float32)
    b = lora.b[...].astype(jnp.float32)
    product = lambda a, b: jnp.tensordot(a, b, axes=1)  # (*in, r) x (r, *out) -> (*in, *out)
    return lora.scale * (jax.vmap(product)(a, b) if stacked else product(a, b))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """The same model without adapters, each adapted kernel W replaced by W + scale * A B, so
    sampling runs at the base model's speed. `model.config` must have `lora_rank`; the model
    class is rebuilt with lora_rank=0 (shapes only, nothing initialised)."""
    config = model.config
    values = {
        path: variable.get_value()
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    stacked = getattr(config, "scan_layers", False)
    for path, lora in adapters_of(model).items():
        kernel = kernel_path(path)
        in_blocks = stacked and path[:2] == ("blocks", "blocks")
        merged = values[kernel].astype(jnp.float32) + low_rank_update(lora, in_blocks)
        values[kernel] = merged.astype(values[kernel].dtype)
    plain_config = dataclasses.replace(config, lora_rank=0)
    abstract = nnx.eval_shape(lambda: type(model)(plain_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    filled = [(path, variable.replace(values[path])) for path, variable in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def with_adapters(
    model: nnx.Module,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = tuple(TARGETS),
    seed: int = 0,
) -> nnx.Module:
    """`model` (without adapters) with fresh adapters of rank `rank` on `targets`: the same
    function until they are trained (B = 0). The model class is rebuilt from
    `dataclasses.replace(model.config, lora_rank=rank, ...)`, its base parameters copied in."""
    config = dataclasses.replace(
        model.config, lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets)
    )
    adapted = type(model)(config, rngs=nnx.Rngs(seed))
    nnx.update(adapted, nnx.state(model, nnx.Param))
    return adapted


def parameter_count(model: nnx.Module) -> int:
    """Number of adapter parameters (what a LoRA fine-tune trains)."""
    return sum(lora.a.size + lora.b.size for lora in adapters_of(model).values())
