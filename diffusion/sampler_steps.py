"""The per-step machinery that every walk along a list of noise levels shares.

The samplers (`diffusion/samplers.py`, noise -> images) and DDIM inversion
(`diffusion/inversion.py`, images -> noise) walk `NoiseLevels` in opposite directions with the
same pieces: one model call read as (x0_hat, eps_hat), the checks of their inputs, per-step
coefficients as device arrays, and the `lax.scan` over the steps. They live here, apart from both,
so that neither walk depends on the other and both keep one convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.errors import UserError
from diffusion.objectives import check_prediction_type, x0_eps_from_prediction
from diffusion.schedules import NoiseLevels


class SamplerError(UserError):
    """A sampler name or setting that cannot be used."""


def denoise(model_fn, x, t, alpha, sigma, cond, prediction_type, clip_x0=None):
    """(x0_hat, eps_hat) from one model call at level (t, alpha, sigma)."""
    t_batch = jnp.full((x.shape[0],), t, x.dtype)
    prediction = model_fn(x, t_batch, cond).astype(x.dtype)
    x0, eps = x0_eps_from_prediction(prediction, x, alpha, sigma, prediction_type)
    if clip_x0 is not None:
        # Like diffusers' clip_sample: eps_hat keeps the unclipped model output.
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
    return x0, eps


def check_sampler_inputs(levels, prediction_type, noise):
    """Raises SamplerError unless `levels`, `prediction_type` and `noise` can be walked."""
    if not isinstance(levels, NoiseLevels):
        raise SamplerError(
            f"levels must be a NoiseLevels (from ddpm_levels or flow_levels), got "
            f"{type(levels).__name__}"
        )
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon" and levels.alpha[0] == 0:
        raise SamplerError(
            "epsilon prediction cannot be sampled from a level with zero signal (zero terminal "
            "SNR or t = 1 on the flow path): x0 = (x - sigma eps) / alpha divides by 0; train "
            "and sample with v_prediction or flow_velocity"
        )
    if noise.ndim < 1:
        raise SamplerError(f"noise needs a batch axis, got shape {noise.shape}")


def step_arrays(dtype, **arrays):
    """Per-step coefficients (float64 NumPy) -> device arrays of the sampling dtype."""
    return {name: jnp.asarray(np.asarray(value), dtype) for name, value in arrays.items()}


def scan_steps(step, x, per_step, return_trajectory):
    """Runs `step(x, per_step_slice) -> x` over all steps; optionally stacks every x."""

    def body(x, inputs):
        x = step(x, inputs)
        return x, (x if return_trajectory else None)

    final, history = jax.lax.scan(body, x, per_step)
    if return_trajectory:
        return final, jnp.concatenate([x[None], history], axis=0)
    return final
