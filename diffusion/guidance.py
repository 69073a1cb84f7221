"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a model function.

    guided = uncond + w (cond - uncond)          (diffusers' w; the paper's w is w - 1 here)

Usage with any sampler:

    guided_model = guided_model_fn(model_fn, rescale_phi=0.7, interval=(0.0, 0.8))
    guidance = GuidanceCondition(cond=text, uncond=empty_or_negative_text, scale=jnp.float32(4.0))
    images = sample_flow_euler(guided_model, noise, levels, key, guidance)

Why the scale travels inside the condition: samplers are jitted with the model function static,
so a scale baked into the wrapper would compile once per value (MaxDiffusion's pitfall). Inside
`GuidanceCondition` it is a traced array: changing it, or the prompts, reuses the compilation.
A negative prompt is simply passed as `uncond`. Conditioning may be any pytree (token states,
mask, pooled embedding); cond and uncond go through the model in one batched forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffusion.errors import UserError


class GuidanceError(UserError):
    """A guidance setting that cannot be used."""


class GuidanceCondition(NamedTuple):
    """The traced inputs of guidance. `uncond` leaves may have batch 1 (broadcast to cond's).

    scale: a scalar or shape (batch,) array; 1 gives the conditional model exactly.
    """

    cond: Any
    uncond: Any
    scale: Any


def concatenate_conditions(cond, uncond):
    """Stacks cond and uncond pytrees along the batch axis: [cond; uncond] (2 * batch, ...)."""

    def stack(c, u):
        u = jnp.broadcast_to(u, c.shape) if u.shape[0] == 1 else u
        if u.shape != c.shape:
            raise GuidanceError(
                f"unconditional conditioning of shape {u.shape} does not match the condition's "
                f"{c.shape}; give it the same shape, or batch size 1 to broadcast"
            )
        return jnp.concatenate([c, u.astype(c.dtype)], axis=0)

    return jax.tree.map(stack, cond, uncond)


def rescale_guidance(guided, cond_prediction, phi):
    """Guidance rescale (Lin et al. 2023, sec. 3.4, eq. 15-16).

    x_r = guided * std(cond) / std(guided) over non-batch axes; out = phi x_r + (1 - phi) guided.
    """
    axes = tuple(range(1, guided.ndim))
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    std_cond = jnp.std(cond_prediction, axis=axes, keepdims=True)
    # A constant prediction (std 0) has nothing to rescale.
    factor = jnp.where(std_guided > 0, std_cond / jnp.where(std_guided > 0, std_guided, 1), 1)
    return phi * guided * factor + (1 - phi) * guided


@dataclasses.dataclass(frozen=True)
class GuidedModel:
    """`model_fn` under classifier-free guidance; call it as model_fn(x, t, GuidanceCondition).

    Frozen and hashable: two wrappers with equal settings share the samplers' compilations.
    """

    model_fn: Callable
    rescale_phi: float = 0.0
    interval: tuple[float, float] | None = None

    def __call__(self, x, t, guidance: GuidanceCondition):
        if not isinstance(guidance, GuidanceCondition):
            raise GuidanceError(
                "a guided model takes GuidanceCondition(cond, uncond, scale) as its condition, "
                f"got {type(guidance).__name__}"
            )
        batch = x.shape[0]
        both = self.model_fn(
            jnp.concatenate([x, x], axis=0),  # (2B, ...)
            jnp.concatenate([t, t], axis=0),  # (2B,)
            concatenate_conditions(guidance.cond, guidance.uncond),
        )
        cond_prediction, uncond_prediction = both[:batch], both[batch:]
        scale = jnp.asarray(guidance.scale, cond_prediction.dtype)
        scale = jnp.broadcast_to(scale, (batch,)) if scale.ndim == 0 else scale
        if self.interval is not None:
            low, high = self.interval
            scale = jnp.where((t >= low) & (t <= high), scale, 1)
        scale = scale.reshape((batch,) + (1,) * (x.ndim - 1))
        # cond + (w - 1)(cond - uncond) equals the usual uncond + w (cond - uncond), and is
        # bit-for-bit the conditional prediction at w = 1.
        guided = cond_prediction + (scale - 1) * (cond_prediction - uncond_prediction)
        if self.rescale_phi:
            guided = rescale_guidance(guided, cond_prediction, self.rescale_phi)
        return guided


def guided_model_fn(
    model_fn: Callable,
    *,
    rescale_phi: float = 0.0,
    interval: tuple[float, float] | None = None,
) -> GuidedModel:
    """Wraps `model_fn(x, t, cond)` for classifier-free guidance (see the module docstring).

    rescale_phi: guidance rescale strength (Lin et al. 2023 recommend 0.7; 0 turns it off).
    interval: (t_lo, t_hi); guidance applies only where t_lo <= t <= t_hi, elsewhere the model is
      conditional (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval").
    All output channels are guided.
    """
    if not 0 <= rescale_phi <= 1:
        raise GuidanceError(f"rescale_phi must be in [0, 1], got {rescale_phi}")
    if interval is not None:
        low, high = (float(v) for v in interval)
        if not 0 <= low <= high <= 1:
            raise GuidanceError(
                f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got {tuple(interval)}"
            )
        interval = (low, high)
    return GuidedModel(model_fn=model_fn, rescale_phi=float(rescale_phi), interval=interval)
