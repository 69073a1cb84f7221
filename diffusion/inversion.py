"""DDIM inversion: images -> the noise that deterministic DDIM would turn back into them.

It runs a list of noise levels backwards (images at the cleanest level, noise at the noisiest),
the opposite direction of every sampler in `diffusion/samplers.py`, and it is not a sampler: it
takes no noise or key and is not in `SAMPLERS`. It shares the samplers' per-step machinery
(`diffusion/sampler_steps.py`), so both stay in one convention.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from diffusion.sampler_steps import (
    SamplerError,
    check_sampler_inputs,
    denoise,
    scan_steps,
    step_arrays,
)
from diffusion.schedules import NoiseLevels


@functools.partial(
    jax.jit,
    static_argnames=("model_fn", "prediction_type", "fixed_point_iterations", "return_trajectory"),
)
def _ddim_inversion_loop(
    model_fn, images, per_step, cond, prediction_type, fixed_point_iterations, return_trajectory
):
    def step(x, c):
        def noisier(x_guess):
            # The model sees the guess of the noisier x with the noisier level's t; the first guess
            # is x itself, as in diffusers' DDIMInverseScheduler.
            x0, eps = denoise(
                model_fn, x_guess, c["t"], c["alpha"], c["sigma"], cond, prediction_type
            )
            return c["x_coefficient"] * x + c["eps_coefficient"] * eps + c["x0_coefficient"] * x0

        # Fixed-point iterations (Pan et al. 2023, AIDI): at the fixed point the DDIM step maps
        # the result back onto x exactly.
        x_noisy = noisier(x)
        return jax.lax.fori_loop(0, fixed_point_iterations, lambda _, y: noisier(y), x_noisy)

    return scan_steps(step, images, per_step, return_trajectory)


def ddim_inversion_coefficients(levels: NoiseLevels):
    """Per inversion step (noisy level i <- cleaner level i + 1): the DDIM step solved for x_i.

    The DDIM step x_{i+1} = alpha_{i+1} x0_hat(x_i) + sigma_{i+1} eps_hat(x_i), with x_i = alpha_i
    x0_hat + sigma_i eps_hat, solved for x_i keeping eps_hat (x_coefficient x_{i+1} +
    eps_coefficient eps_hat) or keeping x0_hat (x_coefficient x_{i+1} + x0_coefficient x0_hat).
    Keeping eps_hat is the usual choice and the only one from clean data (sigma_{i+1} = 0); keeping
    x0_hat is used where the signal is weaker than the noise (alpha_i alpha_{i+1} < sigma_i
    sigma_{i+1}), where x0_hat varies less with x and the fixed-point iteration contracts faster
    (it is exact in one step from a zero-signal level, whose x0_hat is a constant).
    """
    alpha, sigma = levels.alpha[:-1], levels.sigma[:-1]
    alpha_here, sigma_here = levels.alpha[1:], levels.sigma[1:]
    keep_x0 = alpha * alpha_here < sigma * sigma_here
    with np.errstate(divide="ignore", invalid="ignore"):
        x_coefficient = np.where(keep_x0, sigma / sigma_here, alpha / alpha_here)
        eps_coefficient = np.where(keep_x0, 0.0, sigma - alpha * sigma_here / alpha_here)
        x0_coefficient = np.where(keep_x0, alpha - sigma * alpha_here / sigma_here, 0.0)
    return x_coefficient, eps_coefficient, x0_coefficient


def invert_ddim(
    model_fn,
    images,
    levels: NoiseLevels,
    cond=None,
    *,
    prediction_type: str = "epsilon",
    fixed_point_iterations: int = 0,
    return_trajectory: bool = False,
):
    """DDIM inversion (eta = 0): runs `levels` backwards, from images at the last level to noise.

    Song et al. 2021 sec. 4.3 / Mokady et al. 2023: the deterministic DDIM map is nearly
    invertible, so `sample_ddim(model_fn, invert_ddim(model_fn, x, levels), levels)` ~ x. The plain
    inversion (0 iterations) has a first-order error in the step size; each fixed-point iteration
    costs one more model call per step and shrinks it (exact at convergence). The trajectory, if
    asked for, runs from images to noise.
    """
    check_sampler_inputs(levels, prediction_type, images)
    if int(fixed_point_iterations) != fixed_point_iterations or fixed_point_iterations < 0:
        raise SamplerError(
            f"fixed_point_iterations must be an integer >= 0, got {fixed_point_iterations}"
        )
    x_coefficient, eps_coefficient, x0_coefficient = ddim_inversion_coefficients(levels)
    reverse = slice(None, None, -1)
    per_step = step_arrays(
        images.dtype,
        t=levels.t[:-1][reverse],
        alpha=levels.alpha[:-1][reverse],
        sigma=levels.sigma[:-1][reverse],
        x_coefficient=x_coefficient[reverse],
        eps_coefficient=eps_coefficient[reverse],
        x0_coefficient=x0_coefficient[reverse],
    )
    return _ddim_inversion_loop(
        model_fn,
        images,
        per_step,
        cond,
        prediction_type,
        int(fixed_point_iterations),
        return_trajectory,
    )
