"""Noise schedules: how much signal and noise the noised image x_t holds at each time.

The one time convention of the project, stated once here and used by every objective and sampler:

    x_t = alpha(t) * x0 + sigma(t) * eps,   t in [0, 1],   t = 0 is clean data, t = 1 is pure noise.

Two paths give (alpha, sigma) (SiT's `transport/path.py` idea, with the time direction fixed):

- `DiscreteSchedule` (DDPM family, variance preserving): alpha = sqrt(alpha_bar), sigma =
  sqrt(1 - alpha_bar). Discrete training step k in 0..T-1 is continuous time t = (k + 1) / T, so
  k = T - 1 is t = 1 and the clean level alpha_bar = 1 (the empty product, "k = -1") is t = 0.
- `FlowPath` (rectified flow, SD3 / Wan 2.1): alpha = 1 - t, sigma = t.

Table of names, code -> paper (Ho et al. 2020; Song et al. 2021, DDIM):

    betas[k]        beta_{k+1}          per-step noise variance
    alpha_bar[k]    bar(alpha)_{k+1}    prod_{j <= k} (1 - betas[j]); signal power at step k
    alpha, sigma    sqrt(alpha_bar), sqrt(1 - alpha_bar)
    snr             alpha^2 / sigma^2

A sampler walks down a list of noise levels (`NoiseLevels`): built once, in float64 NumPy, outside
any jitted loop, by `ddpm_levels` (a timestep spacing over a `DiscreteSchedule`) or `flow_levels`
(a shifted time grid).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from diffusion.errors import UserError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class ScheduleError(UserError):
    """A schedule, spacing, step count or time grid that cannot be used."""


# ----------------------------------------------------------------------------------------------
# DDPM betas (float64 NumPy)
# ----------------------------------------------------------------------------------------------


def cosine_alpha_bar(t: np.ndarray, offset: float = 0.008) -> np.ndarray:
    """alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2), Nichol & Dhariwal (2021) eq. 17.

    Not divided by alpha_bar(0): the betas use a ratio of two values, so the factor cancels.
    """
    return np.cos((np.asarray(t, np.float64) + offset) / (1 + offset) * math.pi / 2) ** 2


def make_betas(
    name: str,
    num_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> np.ndarray:
    """Betas of a named DDPM schedule, float64, shape (num_timesteps,).

    - linear (Ho et al. 2020): linspace(beta_start, beta_end); defaults 1e-4 .. 0.02.
    - scaled_linear (Stable Diffusion): linspace(sqrt(beta_start), sqrt(beta_end))^2; defaults
      0.00085 .. 0.012.
    - cosine ("squaredcos_cap_v2", Nichol & Dhariwal 2021 eq. 17): beta_i = min(1 - alpha_bar(
      (i + 1) / T) / alpha_bar(i / T), 0.999); beta_start / beta_end are not used.
    """
    if name not in BETA_SCHEDULES:
        raise ScheduleError(
            f"unknown beta schedule {name!r}; valid schedules: {', '.join(BETA_SCHEDULES)}"
        )
    if int(num_timesteps) < 1:
        raise ScheduleError(f"num_timesteps must be at least 1, got {num_timesteps}")
    if name == "linear":
        start = 1e-4 if beta_start is None else beta_start
        end = 0.02 if beta_end is None else beta_end
        return np.linspace(start, end, num_timesteps, dtype=np.float64)
    if name == "scaled_linear":
        start = 0.00085 if beta_start is None else beta_start
        end = 0.012 if beta_end is None else beta_end
        return np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2
    if beta_start is not None or beta_end is not None:
        raise ScheduleError("the cosine schedule has no beta_start / beta_end; leave them unset")
    steps = np.arange(num_timesteps, dtype=np.float64)
    ratio = cosine_alpha_bar((steps + 1) / num_timesteps) / cosine_alpha_bar(steps / num_timesteps)
    return np.minimum(1 - ratio, 0.999)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha_bar) so the last step is pure noise (Lin et al. 2023, Alg. 1).

    s = sqrt(alpha_bar); s <- (s - s_T) * s_0 / (s_0 - s_T); betas back from the new alpha_bar.
    The last beta becomes 1: epsilon prediction is undefined there, so train with v prediction.
    """
    root_alpha_bar = np.sqrt(np.cumprod(1 - np.asarray(betas, np.float64)))
    first, last = root_alpha_bar[0], root_alpha_bar[-1]
    root_alpha_bar = (root_alpha_bar - last) * first / (first - last)
    alpha_bar = root_alpha_bar**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """A DDPM schedule: alpha_bar (float64, shape (T,)) and its continuous-time view.

    Step k is time t = (k + 1) / T (module docstring). Between steps, alpha_bar is interpolated
    linearly in t over [1, alpha_bar_0, ..., alpha_bar_{T-1}] at t = 0, 1/T, ..., 1.
    """

    alpha_bar: np.ndarray

    @classmethod
    def from_name(
        cls,
        name: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        zero_terminal_snr: bool = False,
    ) -> DiscreteSchedule:
        betas = make_betas(name, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(alpha_bar=np.cumprod(1 - betas))

    @property
    def num_timesteps(self) -> int:
        return int(self.alpha_bar.shape[0])

    def time_of_step(self, step):
        """Continuous t in (0, 1] of integer step k in 0..T-1: t = (k + 1) / T."""
        return (step + 1) / self.num_timesteps

    def step_of_time(self, t):
        """Nearest integer step k of time t (inverse of `time_of_step`, clipped to 0..T-1)."""
        step = jnp.round(jnp.asarray(t) * self.num_timesteps - 1).astype(jnp.int32)
        return jnp.clip(step, 0, self.num_timesteps - 1)

    def alpha_sigma(self, t):
        """(alpha, sigma) at continuous t (any shape), as jnp arrays of t's float dtype."""
        t = jnp.asarray(t)
        dtype = t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32
        grid = jnp.asarray(np.concatenate([[1.0], self.alpha_bar]), dtype)
        position = jnp.clip(t.astype(dtype) * self.num_timesteps, 0, self.num_timesteps)
        alpha_bar = jnp.interp(position, jnp.arange(self.num_timesteps + 1, dtype=dtype), grid)
        return jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)


@dataclasses.dataclass(frozen=True)
class FlowPath:
    """Rectified-flow path x_t = (1 - t) x0 + t eps; velocity dx_t/dt = eps - x0."""

    def alpha_sigma(self, t):
        t = jnp.asarray(t)
        return 1 - t, t


def signal_to_noise_ratio(alpha, sigma):
    """snr = alpha^2 / sigma^2 (Kingma et al. 2021, VDM)."""
    return alpha**2 / sigma**2


# ----------------------------------------------------------------------------------------------
# Sampling timesteps and noise levels
# ----------------------------------------------------------------------------------------------


def _check_num_steps(num_steps: int, num_timesteps: int | None = None) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ScheduleError(f"number of sampling steps must be an integer >= 1, got {num_steps}")
    if num_timesteps is not None and num_steps > num_timesteps:
        raise ScheduleError(
            f"number of sampling steps ({num_steps}) exceeds the schedule's {num_timesteps} "
            f"training timesteps; use at most {num_timesteps}"
        )


def sampling_timesteps(
    num_steps: int, num_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
    """Decreasing integer training steps a sampler visits, as diffusers' schedulers define them.

    - leading: arange(N) * (T // N), reversed, + steps_offset (T=1000, N=5, offset 1 ->
      801, 601, 401, 201, 1).
    - trailing: round(arange(T, 0, -T / N)) - 1 (N=10 -> 999, 899, ..., 99).
    - linspace: round(linspace(0, T - 1, N)), reversed (N=10 -> 999, 888, ..., 0).
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ScheduleError(
            f"unknown timestep spacing {spacing!r}; valid spacings: {', '.join(TIMESTEP_SPACINGS)}"
        )
    _check_num_steps(num_steps, num_timesteps)
    if spacing == "leading":
        steps = np.arange(num_steps)[::-1] * (num_timesteps // num_steps) + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)) - 1
    else:
        steps = np.round(np.linspace(0, num_timesteps - 1, num_steps))[::-1]
    steps = steps.astype(np.int64)
    if steps.max() > num_timesteps - 1 or steps.min() < 0:
        raise ScheduleError(
            f"steps_offset={steps_offset} moves timesteps {steps.tolist()} outside "
            f"0..{num_timesteps - 1}; lower steps_offset or the number of steps"
        )
    return steps


def shift_time(t, shift: float):
    """Resolution / sequence shift t' = s t / (1 + (s - 1) t) (SD3 eq. 23; Wan 2.1 uses s = 5)."""
    return shift * t / (1 + (shift - 1) * t)


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseLevels:
    """The noise levels a sampler visits, noisiest first; float64 NumPy arrays of shape (N + 1,).

    `t[i]` is what the model receives at level i; `alpha[i]`, `sigma[i]` are the path coefficients
    there. The last entry is where sampling ends (usually clean: alpha = 1, sigma = 0); the model
    is evaluated at levels 0..N-1 only.
    """

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray

    def __post_init__(self):
        for name in ("t", "alpha", "sigma"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), np.float64))
        shapes = {self.t.shape, self.alpha.shape, self.sigma.shape}
        if len(shapes) != 1 or self.t.ndim != 1 or self.t.shape[0] < 2:
            raise ScheduleError(
                f"noise levels need 1-D t, alpha, sigma of one length >= 2, got shapes {shapes}"
            )
        if np.any(np.diff(self.sigma) > 0) or not self.sigma[-1] < self.sigma[0]:
            raise ScheduleError(
                "noise levels must go from noisy to clean (sigma non-increasing, last below "
                f"first); got sigma = {np.round(self.sigma, 6).tolist()}"
            )

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0] - 1)

    @property
    def is_flow_path(self) -> bool:
        return bool(np.allclose(self.alpha + self.sigma, 1.0) and np.allclose(self.t, self.sigma))


def ddpm_levels(
    schedule: DiscreteSchedule,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> NoiseLevels:
    """Levels of a DDPM/DDIM sampler: the spaced timesteps, then the final level.

    The previous level of each step is the NEXT entry of the timestep list (not k - T // N, which
    is wrong for linspace and for trailing when T % N != 0; diffusers issue #11347). The final
    level is clean (alpha_bar = 1, t = 0) with `set_alpha_to_one`, else alpha_bar[0] (DDIM paper).
    """
    steps = sampling_timesteps(num_steps, schedule.num_timesteps, spacing, steps_offset)
    alpha_bar = schedule.alpha_bar[steps]
    if set_alpha_to_one:
        final_alpha_bar, final_t = 1.0, 0.0
    else:
        final_alpha_bar, final_t = schedule.alpha_bar[0], schedule.time_of_step(0)
    alpha_bar = np.append(alpha_bar, final_alpha_bar)
    t = np.append(schedule.time_of_step(steps.astype(np.float64)), final_t)
    return NoiseLevels(t=t, alpha=np.sqrt(alpha_bar), sigma=np.sqrt(1 - alpha_bar))


def flow_levels_from_times(times) -> NoiseLevels:
    """Levels of the flow path at a given time grid, which must decrease strictly within [0, 1]."""
    times = np.asarray(times, np.float64)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ScheduleError(f"a time grid needs at least 2 times, got shape {times.shape}")
    if np.any(np.diff(times) >= 0):
        raise ScheduleError(
            f"a time grid must decrease strictly from noise (t = 1) to data (t = 0); got "
            f"{np.round(times, 6).tolist()}"
        )
    if times.min() < 0 or times.max() > 1:
        raise ScheduleError(f"times must lie in [0, 1], got {np.round(times, 6).tolist()}")
    return NoiseLevels(t=times, alpha=1 - times, sigma=times)


def flow_time_grid(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """linspace(1, 0, N + 1), shifted once (diffusers #13243 applied the shift twice)."""
    _check_num_steps(num_steps)
    if not shift > 0:
        raise ScheduleError(f"time shift must be positive, got {shift}")
    return shift_time(np.linspace(1.0, 0.0, num_steps + 1), shift)


def flow_levels(num_steps: int, shift: float = 1.0) -> NoiseLevels:
    """Levels of a flow-matching sampler: N uniform steps from t = 1 to t = 0, shifted once."""
    return flow_levels_from_times(flow_time_grid(num_steps, shift))
