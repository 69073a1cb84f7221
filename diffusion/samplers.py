"""Samplers: from noise to images by walking down a list of noise levels with a denoiser.

Every sampler has the same shape (k-diffusion's `sampling.py`, as a JAX `lax.scan`):

    sample_x(model_fn, noise, levels, key, cond, *, prediction_type, ..., return_trajectory=False)
        -> images, or (images, trajectory of shape (N + 1, *noise.shape)) with return_trajectory

- `model_fn(x_t, t, cond) -> prediction`, t of shape (batch,), in the convention of
  `diffusion/schedules.py` (x_t = alpha x0 + sigma eps, t = 1 is noise). It must be hashable and
  stable across calls to reuse compilations: a module-level function, a `GuidedModel`, or a
  closure built inside your own `jax.jit` (which is how to pass traced parameters).
- `levels` is a `NoiseLevels` from `ddpm_levels` or `flow_levels`. Every per-step coefficient is
  computed from it once, in float64 NumPy, before the loop; the loop only multiplies and adds.
- At each level the model output becomes (x0_hat, eps_hat) (`objectives.x0_eps_from_prediction`)
  and the sampler applies its own update rule to them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.sampler_steps import (
    SamplerError,
    check_sampler_inputs,
    denoise,
    scan_steps,
    step_arrays,
)
from diffusion.schedules import NoiseLevels

DDPM_VARIANCES = ("fixed_small", "fixed_large")


# ----------------------------------------------------------------------------------------------
# Checks and keys only the samplers need
# ----------------------------------------------------------------------------------------------


def _check_flow_levels(levels, sampler):
    if not levels.is_flow_path:
        raise SamplerError(
            f"{sampler} integrates the flow path x_t = (1 - t) x0 + t eps; build its levels with "
            "flow_levels or flow_levels_from_times (or use ddim / dpmpp_2m for DDPM levels)"
        )


def _check_key(key, sampler):
    if key is None:
        raise SamplerError(f"{sampler} adds noise at every step: pass a PRNG key")


def _step_keys(key, num_steps):
    return jax.random.split(jax.random.PRNGKey(0) if key is None else key, num_steps)


# ----------------------------------------------------------------------------------------------
# DDIM (and the stochastic flow Euler, which is the same update on the flow path)
# ----------------------------------------------------------------------------------------------


def ddim_noise_std(levels: NoiseLevels, eta: float) -> np.ndarray:
    """sigma_t of DDIM (Song et al. 2021, eq. 16) per step, for any (alpha, sigma) path.

    eta * sqrt((1 - a_p) / (1 - a)) * sqrt(1 - a / a_p) in the VP case, written as
    eta * sigma_p * sqrt(1 - (alpha sigma_p / (alpha_p sigma))^2): eta = 1 is the DDPM posterior.
    """
    alpha, sigma = levels.alpha[:-1], levels.sigma[:-1]
    alpha_next, sigma_next = levels.alpha[1:], levels.sigma[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(sigma_next > 0, alpha * sigma_next / (alpha_next * sigma), 0.0)
    return eta * sigma_next * np.sqrt(np.clip(1 - ratio**2, 0.0, None))


@functools.partial(
    jax.jit, static_argnames=("model_fn", "prediction_type", "clip_x0", "return_trajectory")
)
def _ddim_loop(model_fn, noise, per_step, keys, cond, prediction_type, clip_x0, return_trajectory):
    def step(x, inputs):
        c, key = inputs
        x0, eps = denoise(
            model_fn, x, c["t"], c["alpha"], c["sigma"], cond, prediction_type, clip_x0
        )
        fresh = jax.random.normal(key, x.shape, x.dtype)
        return c["alpha_next"] * x0 + c["direction"] * eps + c["noise_std"] * fresh

    return scan_steps(step, noise, (per_step, keys), return_trajectory)


def sample_ddim(
    model_fn,
    noise,
    levels: NoiseLevels,
    key=None,
    cond=None,
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    clip_x0: float | None = None,
    return_trajectory: bool = False,
):
    """DDIM (Song et al. 2021, eq. 12): x_p = alpha_p x0 + sqrt(sigma_p^2 - s^2) eps + s z.

    s = `ddim_noise_std(levels, eta)`; eta = 0 is the deterministic probability-flow sampler, eta
    = 1 the DDPM posterior. The previous level is the next entry of `levels`. `clip_x0` clips
    x0_hat to [-clip_x0, clip_x0] (diffusers' clip_sample). `set_alpha_to_one` is a property of
    the levels (`ddpm_levels`).
    """
    check_sampler_inputs(levels, prediction_type, noise)
    if not eta >= 0:
        raise SamplerError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    if eta > 0:
        _check_key(key, "DDIM with eta > 0")
    noise_std = ddim_noise_std(levels, eta)
    direction = np.sqrt(np.clip(levels.sigma[1:] ** 2 - noise_std**2, 0.0, None))
    per_step = step_arrays(
        noise.dtype,
        t=levels.t[:-1],
        alpha=levels.alpha[:-1],
        sigma=levels.sigma[:-1],
        alpha_next=levels.alpha[1:],
        direction=direction,
        noise_std=noise_std,
    )
    keys = _step_keys(key, levels.num_steps)
    clip = None if clip_x0 is None else float(clip_x0)
    return _ddim_loop(
        model_fn, noise, per_step, keys, cond, prediction_type, clip, return_trajectory
    )


def sample_flow_euler_stochastic(
    model_fn,
    noise,
    levels: NoiseLevels,
    key,
    cond=None,
    *,
    prediction_type: str = "flow_velocity",
    eta: float = 1.0,
    return_trajectory: bool = False,
):
    """Flow Euler with stochastic re-noising: the DDIM(eta) update on the flow path.

    x_next = (1 - t_next) x0_hat + sqrt(t_next^2 - s^2) eps_hat + s z, s from `ddim_noise_std`.
    eta = 0 is exactly the Euler step x + (t_next - t) u; eta = 1 re-noises with the posterior
    q(x_next | x_t, x0_hat), the flow path's ancestral sampler.
    """
    check_sampler_inputs(levels, prediction_type, noise)
    _check_flow_levels(levels, "flow_euler_stochastic")
    return sample_ddim(
        model_fn,
        noise,
        levels,
        key,
        cond,
        prediction_type=prediction_type,
        eta=eta,
        return_trajectory=return_trajectory,
    )


# ----------------------------------------------------------------------------------------------
# DDPM ancestral
# ----------------------------------------------------------------------------------------------


def ddpm_posterior(levels: NoiseLevels, variance: str = "fixed_small"):
    """Coefficients of q(x_p | x_t, x0) per step: (coefficient of x_t, of x0, std).

    General form (Kingma et al. 2021, VDM eq. 33-34) with alpha_{t|p} = alpha / alpha_p and
    sigma^2_{t|p} = sigma^2 - alpha_{t|p}^2 sigma_p^2; in the VP case sigma^2_{t|p} = beta' =
    1 - a / a_p and the mean is sqrt(a_p) beta' / (1 - a) x0 + sqrt(a / a_p) (1 - a_p) / (1 - a)
    x_t (Ho et al. 2020, eq. 7). fixed_small: variance beta' (1 - a_p) / (1 - a) (clamped at 1e-20);
    fixed_large: beta'. No noise on the last step.
    """
    if variance not in DDPM_VARIANCES:
        raise SamplerError(
            f"unknown DDPM variance {variance!r}; valid: {', '.join(DDPM_VARIANCES)}"
        )
    alpha, sigma = levels.alpha[:-1], levels.sigma[:-1]
    alpha_next, sigma_next = levels.alpha[1:], levels.sigma[1:]
    alpha_ratio = alpha / alpha_next
    step_variance = np.clip(sigma**2 - alpha_ratio**2 * sigma_next**2, 0.0, None)
    x_coefficient = alpha_ratio * sigma_next**2 / sigma**2
    x0_coefficient = alpha_next * step_variance / sigma**2
    if variance == "fixed_small":
        noise_variance = np.maximum(step_variance * sigma_next**2 / sigma**2, 1e-20)
    else:
        noise_variance = step_variance
    noise_std = np.sqrt(noise_variance)
    noise_std[-1] = 0.0
    return x_coefficient, x0_coefficient, noise_std


@functools.partial(
    jax.jit, static_argnames=("model_fn", "prediction_type", "clip_x0", "return_trajectory")
)
def _ddpm_loop(model_fn, noise, per_step, keys, cond, prediction_type, clip_x0, return_trajectory):
    def step(x, inputs):
        c, key = inputs
        x0, _ = denoise(model_fn, x, c["t"], c["alpha"], c["sigma"], cond, prediction_type, clip_x0)
        fresh = jax.random.normal(key, x.shape, x.dtype)
        return c["x_coefficient"] * x + c["x0_coefficient"] * x0 + c["noise_std"] * fresh

    return scan_steps(step, noise, (per_step, keys), return_trajectory)


def sample_ddpm(
    model_fn,
    noise,
    levels: NoiseLevels,
    key=None,
    cond=None,
    *,
    prediction_type: str = "epsilon",
    variance: str = "fixed_small",
    reinject_noise: bool = True,
    clip_x0: float | None = None,
    return_trajectory: bool = False,
):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) along `levels`.

    Each step draws x_p from the posterior q(x_p | x_t, x0_hat) (`ddpm_posterior`). With
    `reinject_noise=False` only the posterior mean is taken: the samples collapse toward the
    centre of the data (the mean of x0_hat shrinks at every step), shown in tests and the demo.
    """
    check_sampler_inputs(levels, prediction_type, noise)
    x_coefficient, x0_coefficient, noise_std = ddpm_posterior(levels, variance)
    if reinject_noise:
        _check_key(key, "DDPM")
    else:
        noise_std = np.zeros_like(noise_std)
    per_step = step_arrays(
        noise.dtype,
        t=levels.t[:-1],
        alpha=levels.alpha[:-1],
        sigma=levels.sigma[:-1],
        x_coefficient=x_coefficient,
        x0_coefficient=x0_coefficient,
        noise_std=noise_std,
    )
    keys = _step_keys(key, levels.num_steps)
    clip = None if clip_x0 is None else float(clip_x0)
    return _ddpm_loop(
        model_fn, noise, per_step, keys, cond, prediction_type, clip, return_trajectory
    )


# ----------------------------------------------------------------------------------------------
# Flow matching ODE: Euler and Heun
# ----------------------------------------------------------------------------------------------


def _velocity(model_fn, x, t, cond, prediction_type):
    x0, eps = denoise(model_fn, x, t, 1 - t, t, cond, prediction_type)
    return eps - x0


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction_type", "return_trajectory"))
def _flow_euler_loop(model_fn, noise, per_step, cond, prediction_type, return_trajectory):
    def step(x, c):
        return x + (c["t_next"] - c["t"]) * _velocity(model_fn, x, c["t"], cond, prediction_type)

    return scan_steps(step, noise, per_step, return_trajectory)


def sample_flow_euler(
    model_fn,
    noise,
    levels: NoiseLevels,
    key=None,
    cond=None,
    *,
    prediction_type: str = "flow_velocity",
    return_trajectory: bool = False,
):
    """Euler steps of the flow ODE dx/dt = u(x, t): x <- x + (t_next - t) u (SD3, rectified flow).

    Deterministic; `key` is accepted for the common signature and unused.
    """
    check_sampler_inputs(levels, prediction_type, noise)
    _check_flow_levels(levels, "flow_euler")
    per_step = step_arrays(noise.dtype, t=levels.t[:-1], t_next=levels.t[1:])
    return _flow_euler_loop(model_fn, noise, per_step, cond, prediction_type, return_trajectory)


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction_type", "return_trajectory"))
def _flow_heun_loop(model_fn, noise, per_step, cond, prediction_type, return_trajectory):
    def step(x, c):
        dt = c["t_next"] - c["t"]
        velocity = _velocity(model_fn, x, c["t"], cond, prediction_type)
        x_euler = x + dt * velocity

        def heun(_):
            velocity_next = _velocity(model_fn, x_euler, c["t_next"], cond, prediction_type)
            return x + dt * (velocity + velocity_next) / 2

        return jax.lax.cond(c["t_next"] > 0, heun, lambda _: x_euler, None)

    return scan_steps(step, noise, per_step, return_trajectory)


def sample_flow_heun(
    model_fn,
    noise,
    levels: NoiseLevels,
    key=None,
    cond=None,
    *,
    prediction_type: str = "flow_velocity",
    return_trajectory: bool = False,
):
    """Heun's 2nd-order method on the flow ODE (Karras et al. 2022, Alg. 1 without churn).

    Two model calls per step; the step that ends at t = 0 is a plain Euler step, as in Karras.
    """
    check_sampler_inputs(levels, prediction_type, noise)
    _check_flow_levels(levels, "flow_heun")
    per_step = step_arrays(noise.dtype, t=levels.t[:-1], t_next=levels.t[1:])
    return _flow_heun_loop(model_fn, noise, per_step, cond, prediction_type, return_trajectory)


# ----------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ----------------------------------------------------------------------------------------------


def dpmpp_2m_coefficients(levels: NoiseLevels):
    """Per-step (sigma_next / sigma, alpha_next (1 - e^{-h}), 1 / (2 r)) of DPM-Solver++(2M).

    Lu et al. 2022b, Alg. 2 (data prediction, multistep): lambda = ln(alpha / sigma),
    h = lambda_next - lambda, r = h_prev / h, D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},
    x_next = (sigma_next / sigma) x + alpha_next (1 - e^{-h}) D. The first step and steps to
    sigma = 0 are first order (1/(2r) = 0), as in k-diffusion; so is any step after an infinite
    h (from a zero-signal level) or a zero-length step.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        log_snr = np.log(levels.alpha) - np.log(levels.sigma)  # lambda; -inf / +inf at the ends
        h = log_snr[1:] - log_snr[:-1]
        x_ratio = np.where(levels.sigma[:-1] > 0, levels.sigma[1:] / levels.sigma[:-1], 0.0)
        x0_coefficient = levels.alpha[1:] * -np.expm1(-h)
        second_order_weight = np.zeros_like(h)
        second_order_weight[1:] = h[1:] / (2 * h[:-1])  # 1 / (2 r)
    usable = np.isfinite(second_order_weight) & (levels.sigma[1:] > 0) & (h > 0)
    second_order_weight = np.where(usable, second_order_weight, 0.0)
    x0_coefficient = np.where(h > 0, x0_coefficient, 0.0)
    return x_ratio, x0_coefficient, second_order_weight


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction_type", "return_trajectory"))
def _dpmpp_2m_loop(model_fn, noise, per_step, cond, prediction_type, return_trajectory):
    def step(carry, c):
        x, previous_x0 = carry
        x0, _ = denoise(model_fn, x, c["t"], c["alpha"], c["sigma"], cond, prediction_type)
        w = c["second_order_weight"]
        denoised = (1 + w) * x0 - w * previous_x0
        return c["x_ratio"] * x + c["x0_coefficient"] * denoised, x0

    def step_x_only(carry, c):
        carry = step(carry, c)
        return carry, (carry[0] if return_trajectory else None)

    (final, _), history = jax.lax.scan(step_x_only, (noise, jnp.zeros_like(noise)), per_step)
    if return_trajectory:
        return final, jnp.concatenate([noise[None], history], axis=0)
    return final


def sample_dpmpp_2m(
    model_fn,
    noise,
    levels: NoiseLevels,
    key=None,
    cond=None,
    *,
    prediction_type: str = "epsilon",
    return_trajectory: bool = False,
):
    """DPM-Solver++(2M) (Lu et al. 2022b) for DDPM levels and flow levels alike.

    Deterministic, one model call per step, second order; `key` is unused.
    """
    check_sampler_inputs(levels, prediction_type, noise)
    x_ratio, x0_coefficient, second_order_weight = dpmpp_2m_coefficients(levels)
    per_step = step_arrays(
        noise.dtype,
        t=levels.t[:-1],
        alpha=levels.alpha[:-1],
        sigma=levels.sigma[:-1],
        x_ratio=x_ratio,
        x0_coefficient=x0_coefficient,
        second_order_weight=second_order_weight,
    )
    return _dpmpp_2m_loop(model_fn, noise, per_step, cond, prediction_type, return_trajectory)


# ----------------------------------------------------------------------------------------------
# UniPC (multistep, order 2, with its corrector): the sampler of Wan 2.1
# ----------------------------------------------------------------------------------------------

# Log-SNR needs a non-zero signal: a level of pure noise (t = 1 on the flow path) is read as
# alpha = 1e-6, as diffusers' and Wan's UniPC schedulers start from sigma = 1 - 1e-6.
_UNIPC_MIN_ALPHA = 1e-6


def _unipc_order(step: int, num_steps: int) -> int:
    """Order 1 for the first step (one model output known) and the last (lower_order_final)."""
    return min(2, num_steps - step, step + 1)


def unipc_coefficients(levels: NoiseLevels) -> dict[str, np.ndarray]:
    """Per-step coefficients of UniPC-2 with the B(h) = e^h - 1 variant ("bh2"), data prediction.

    Zhao et al. 2023 (UniPC), Alg. 2 and 3, as diffusers' `UniPCMultistepScheduler` runs it
    (solver_order 2, lower_order_final, corrector on every step). With lambda = ln(alpha / sigma),
    h = lambda_{i+1} - lambda_i, r = (lambda_{i-1} - lambda_i) / h and m the x0 predictions:

      predictor  x~_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} (1 - e^{-h}) m_i
                            + alpha_{i+1} (1 - e^{-h}) / (2 r) (m_{i-1} - m_i)      (order 2)
      corrector  x_{i+1}  = the predictor's first two terms
                            + alpha_{i+1} (1 - e^{-h}) (rho_1 / r (m_{i-1} - m_i)
                                                        + rho_2 (m_{i+1} - m_i))

    where m_{i+1} is the model at the predicted x~_{i+1}, the call the next step makes anyway
    (so the corrector is free), and (rho_1, rho_2) solve [[1, 1], [r, 1]] rho = b(h) (rho = 1/2
    at order 1). Returned per step j (model call j): the corrector of the move into level j
    (`keep` = 1 at j = 0, where nothing is corrected) and the predictor out of it.
    """
    n = len(levels.t) - 1
    alpha, sigma = np.asarray(levels.alpha, np.float64), np.asarray(levels.sigma, np.float64)
    with np.errstate(divide="ignore"):
        log_snr = np.log(np.maximum(alpha, _UNIPC_MIN_ALPHA)) - np.log(sigma)  # +inf at sigma 0
    names = ("keep", "c_x", "c_m", "c_history", "c_new", "p_x", "p_m", "p_history")
    c = {name: np.zeros(n) for name in names}
    c["keep"][0] = 1.0
    for i in range(n):  # the move from level i to level i + 1
        h = log_snr[i + 1] - log_snr[i]
        phi = np.expm1(-h)  # h phi_1 of the data-prediction form, in (-1, 0); B(h) equals it
        x_ratio = sigma[i + 1] / sigma[i]
        order = _unipc_order(i, n)
        r = (log_snr[i - 1] - log_snr[i]) / h if order == 2 else None
        c["p_x"][i], c["p_m"][i] = x_ratio, -alpha[i + 1] * phi
        if order == 2:
            c["p_history"][i] = -alpha[i + 1] * phi * 0.5 / r
        if i + 1 == n:
            break  # the last prediction is the output: no model call corrects it
        rho = _unipc_corrector_weights(h, phi, r)
        j = i + 1
        c["c_x"][j], c["c_m"][j] = x_ratio, -alpha[i + 1] * phi
        c["c_history"][j] = -alpha[i + 1] * phi * rho[0] / r if r is not None else 0.0
        c["c_new"][j] = -alpha[i + 1] * phi * rho[-1]
    return c


def _unipc_corrector_weights(h: float, phi: float, r: float | None) -> np.ndarray:
    """rho of UniC: 1/2 at order 1; at order 2 the solution of R rho = b with R's rows the powers
    0 and 1 of (r, 1) and b_k = k! phi_{k+1}-terms / B(h) (UniPC eq. 8 with B(h) = e^h - 1)."""
    if r is None:
        return np.array([0.5])
    hh = -h
    phi_k = phi / hh - 1  # h phi_2 / h terms, the recursion phi_{k+1} = phi_k / hh - 1 / k!
    b1 = phi_k / phi
    b2 = (phi_k / hh - 0.5) * 2 / phi
    return np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array([b1, b2]))


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction_type", "return_trajectory"))
def _unipc_loop(model_fn, noise, per_step, cond, prediction_type, return_trajectory):
    def step(carry, c):
        predicted, previous_x, m1, m2 = carry  # x~_j, x_{j-1}, m_{j-1}, m_{j-2}
        m, _ = denoise(model_fn, predicted, c["t"], c["alpha"], c["sigma"], cond, prediction_type)
        x = (
            c["keep"] * predicted
            + c["c_x"] * previous_x
            + c["c_m"] * m1
            + c["c_history"] * (m2 - m1)
            + c["c_new"] * (m - m1)
        )
        following = c["p_x"] * x + c["p_m"] * m + c["p_history"] * (m1 - m)
        return (following, x, m, m1), (following if return_trajectory else None)

    zeros = jnp.zeros_like(noise)
    (final, *_), history = jax.lax.scan(step, (noise, zeros, zeros, zeros), per_step)
    if return_trajectory:
        return final, jnp.concatenate([noise[None], history], axis=0)
    return final


def sample_unipc(
    model_fn,
    noise,
    levels: NoiseLevels,
    key=None,
    cond=None,
    *,
    prediction_type: str = "epsilon",
    return_trajectory: bool = False,
):
    """UniPC (Zhao et al. 2023), multistep order 2 with its corrector, for DDPM and flow levels.

    Wan 2.1 samples with it (flow levels, shift 5.0 at 480p). Deterministic, one model call per
    step; `key` is unused. The trajectory holds the predictions x~, the inputs of each call.
    """
    check_sampler_inputs(levels, prediction_type, noise)
    per_step = step_arrays(
        noise.dtype,
        t=levels.t[:-1],
        alpha=levels.alpha[:-1],
        sigma=levels.sigma[:-1],
        **unipc_coefficients(levels),
    )
    return _unipc_loop(model_fn, noise, per_step, cond, prediction_type, return_trajectory)


# ----------------------------------------------------------------------------------------------
# By name
# ----------------------------------------------------------------------------------------------

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "flow_euler": sample_flow_euler,
    "flow_heun": sample_flow_heun,
    "flow_euler_stochastic": sample_flow_euler_stochastic,
    "dpmpp_2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
}


def sample(name: str, model_fn, noise, levels: NoiseLevels, key=None, cond=None, **options):
    """Runs the sampler called `name` (a key of `SAMPLERS`) with its keyword `options`."""
    if name not in SAMPLERS:
        raise SamplerError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](model_fn, noise, levels, key, cond, **options)
