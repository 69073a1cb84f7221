"""Diffusion training losses and conversions between what a denoiser can predict.

Time and path conventions are in `diffusion/schedules.py`: x_t = alpha x0 + sigma eps, t = 1 noise.

A model predicts one of `PREDICTION_TYPES`; every sampler and loss goes through the two pure
conversions below, which hold for any (alpha, sigma), not only variance preserving ones:

    epsilon         eps
    sample          x0
    v_prediction    v = alpha eps - sigma x0          (Salimans & Ho 2022, eq. in sec. 4)
    flow_velocity   u = eps - x0 = d x_t / dt on the flow path (Liu et al. 2022; SD3 eq. 3)

The losses are pure functions `(model_fn, x0, cond, key, *, settings) -> (loss, aux)` where
`model_fn(x_t, t, cond)` is the model with its parameters bound; a train step binds the settings
with `functools.partial` and calls `loss, aux = objective(apply_fn, x0, cond, key)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion.errors import UserError
from diffusion.schedules import DiscreteSchedule, shift_time, signal_to_noise_ratio

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_velocity")
TIME_SAMPLINGS = ("uniform", "logit_normal")


class ObjectiveError(UserError):
    """A prediction type or loss setting that cannot be used."""


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ObjectiveError(
            f"unknown prediction type {prediction_type!r}; valid prediction types: "
            f"{', '.join(PREDICTION_TYPES)}"
        )


def expand_like(values, x):
    """(batch,) -> (batch, 1, ..., 1) so per-example values broadcast over x; scalars unchanged."""
    values = jnp.asarray(values)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


# ----------------------------------------------------------------------------------------------
# Conversions between prediction types (alpha, sigma broadcast against x)
# ----------------------------------------------------------------------------------------------


def x0_eps_from_prediction(prediction, x_t, alpha, sigma, prediction_type: str):
    """(x0, eps) implied by a model prediction at the level (alpha, sigma).

    Solves x_t = alpha x0 + sigma eps together with the prediction's definition. For
    variance-preserving paths (alpha^2 + sigma^2 = 1) the v case reduces to x0 = alpha x - sigma v,
    eps = sigma x + alpha v; for the flow path the velocity case to x0 = x - t u, eps = x + (1-t) u.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        eps = prediction
        return (x_t - sigma * eps) / alpha, eps
    if prediction_type == "sample":
        x0 = prediction
        return x0, (x_t - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        norm = alpha**2 + sigma**2
        return (alpha * x_t - sigma * prediction) / norm, (sigma * x_t + alpha * prediction) / norm
    norm = alpha + sigma
    return (x_t - sigma * prediction) / norm, (x_t + alpha * prediction) / norm


def prediction_from_x0_eps(x0, eps, alpha, sigma, prediction_type: str):
    """What a perfect model of `prediction_type` outputs for clean x0 and noise eps."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    return eps - x0


def convert_prediction(prediction, x_t, alpha, sigma, from_type: str, to_type: str):
    """Re-expresses a prediction of one type as another at the same level."""
    x0, eps = x0_eps_from_prediction(prediction, x_t, alpha, sigma, from_type)
    return prediction_from_x0_eps(x0, eps, alpha, sigma, to_type)


# ----------------------------------------------------------------------------------------------
# Loss weighting and training-time sampling
# ----------------------------------------------------------------------------------------------


def min_snr_weight(snr, gamma: float, prediction_type: str):
    """Min-SNR-gamma weight (Hang et al. 2023, eq. 8 and sec. 3.4) for an MSE on the prediction.

    The x0-space weight min(snr, gamma) expressed in the prediction's space: epsilon
    min(snr, gamma) / snr (-> 1 as snr -> 0), v_prediction min(snr, gamma) / (snr + 1), sample
    min(snr, gamma).
    """
    if prediction_type == "epsilon":
        return jnp.where(snr < gamma, 1.0, gamma / jnp.maximum(snr, gamma))
    if prediction_type == "v_prediction":
        return jnp.minimum(snr, gamma) / (snr + 1)
    if prediction_type == "sample":
        return jnp.minimum(snr, gamma)
    raise ObjectiveError(
        "min-SNR weighting is defined for epsilon, v_prediction and sample, "
        f"not {prediction_type!r}"
    )


def sample_flow_time(
    key,
    batch_size: int,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
):
    """Training times t in (0, 1), shape (batch_size,): uniform or logit-normal, then shifted once.

    logit_normal (SD3 sec. 3.1, eq. 19): t = sigmoid(m + s n), n ~ N(0, 1); (0, 1) worked best.
    """
    if time_sampling not in TIME_SAMPLINGS:
        raise ObjectiveError(
            f"unknown time sampling {time_sampling!r}; valid: {', '.join(TIME_SAMPLINGS)}"
        )
    if not logit_std > 0:
        raise ObjectiveError(f"logit_std must be positive, got {logit_std}")
    if not shift > 0:
        raise ObjectiveError(f"time shift must be positive, got {shift}")
    if time_sampling == "uniform":
        t = jax.random.uniform(key, (batch_size,))
    else:
        t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch_size,)))
    return shift_time(t, shift)


def _per_example_mse(prediction, target):
    return jnp.mean(jnp.square(prediction - target).reshape(prediction.shape[0], -1), axis=1)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def diffusion_loss(
    model_fn,
    x0,
    cond,
    key,
    *,
    schedule: DiscreteSchedule,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
):
    """DDPM loss (Ho et al. 2020, eq. 14; "simple" when unweighted) for any prediction type.

    Draws a step k ~ U{0..T-1} and noise per example, noises x0 to x_k, and regresses the model
    output at t = (k + 1) / T on the prediction type's target. Returns (loss, aux) with aux holding
    't' and the unweighted 'per_example_loss', both shape (batch,).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "flow_velocity":
        raise ObjectiveError(
            "flow_velocity targets belong to flow_matching_loss, not diffusion_loss"
        )
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ObjectiveError(f"min_snr_gamma must be positive or None, got {min_snr_gamma}")
    step_key, noise_key = jax.random.split(key)
    batch_size = x0.shape[0]
    step = jax.random.randint(step_key, (batch_size,), 0, schedule.num_timesteps)
    alpha_bar = jnp.asarray(schedule.alpha_bar, x0.dtype)[step]  # (batch,)
    alpha, sigma = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
    t = schedule.time_of_step(step.astype(x0.dtype))
    eps = jax.random.normal(noise_key, x0.shape, x0.dtype)
    x_t = expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * eps
    prediction = model_fn(x_t, t, cond)
    target = prediction_from_x0_eps(
        x0, eps, expand_like(alpha, x0), expand_like(sigma, x0), prediction_type
    )
    per_example = _per_example_mse(prediction, target)
    weight = jnp.ones_like(per_example)
    if min_snr_gamma is not None:
        weight = min_snr_weight(signal_to_noise_ratio(alpha, sigma), min_snr_gamma, prediction_type)
    return jnp.mean(weight * per_example), {"t": t, "per_example_loss": per_example}


FLOW_PREDICTION_TYPES = ("flow_velocity", "sample")
FLOW_LOSS_SPACES = ("prediction", "velocity")
# JiT's floor on t when an x0 prediction is turned into a velocity, u_hat = (x_t - x0_hat) / t:
# it bounds the velocity loss's weight 1 / t^2 on nearly clean inputs (Li & He 2025).
VELOCITY_MIN_T = 0.05


def flow_matching_loss(
    model_fn,
    x0,
    cond,
    key,
    *,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    prediction_type: str = "flow_velocity",
    loss_space: str = "prediction",
):
    """Conditional flow matching loss (Lipman et al. 2023; SD3 eq. 3): E |u(x_t, t) - (eps - x0)|^2.

    x_t = (1 - t) x0 + t eps with t from `sample_flow_time`. With prediction_type "sample" the
    model predicts x0 instead. With loss_space "prediction" the loss is E |x0_hat - x0|^2: the
    same minimiser, but each time weighs t^2 as much as in the velocity loss (|u_hat - u| =
    |x0_hat - x0| / t), which moves the weight from nearly clean inputs to noisy ones. With
    loss_space "velocity" the x0 prediction is turned into a velocity, u_hat = (x_t - x0_hat) /
    max(t, 0.05), and the loss is the velocity loss (JiT: x-prediction, v-loss; Li & He 2025):
    the velocity loss's weighting, while the network outputs an image, which is low-dimensional
    where the velocity (holding every pixel's noise) is not, so a patch of more values than
    the token's width can still be predicted. Returns (loss, aux) like `diffusion_loss`.
    """
    if prediction_type not in FLOW_PREDICTION_TYPES:
        raise ObjectiveError(
            f"flow matching predicts one of {', '.join(FLOW_PREDICTION_TYPES)}, "
            f"not {prediction_type!r}"
        )
    if loss_space not in FLOW_LOSS_SPACES:
        raise ObjectiveError(
            f"the flow matching loss is taken in one of {', '.join(FLOW_LOSS_SPACES)}, "
            f"not {loss_space!r}"
        )
    time_key, noise_key = jax.random.split(key)
    t = sample_flow_time(time_key, x0.shape[0], time_sampling, logit_mean, logit_std, shift).astype(
        x0.dtype
    )
    eps = jax.random.normal(noise_key, x0.shape, x0.dtype)
    t_b = expand_like(t, x0)
    x_t = (1 - t_b) * x0 + t_b * eps
    prediction = model_fn(x_t, t, cond)
    target = prediction_from_x0_eps(x0, eps, 1 - t_b, t_b, prediction_type)
    if loss_space == "velocity" and prediction_type == "sample":
        # (x_t - x0_hat) / t - (x_t - x0) / t = (x0 - x0_hat) / t, t floored as in JiT.
        floor = jnp.maximum(t_b, VELOCITY_MIN_T)
        prediction, target = prediction / floor, target / floor
    per_example = _per_example_mse(prediction, target)
    return jnp.mean(per_example), {"t": t, "per_example_loss": per_example}
