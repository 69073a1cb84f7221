"""Sampler settings: the user-facing sampler names, and the checks that turn a call's options into
the static `SamplerSettings` of a sampling program (on the host, before anything is traced).

Sample.py, TextToImage, evaluate.py and the ahead-of-time compiler all resolve sampler names and
options here, so a recipe's `config.sampling` means the same program everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

from diffusion import guidance
from diffusion.errors import UserError

# User-facing sampler name -> samplers.SAMPLERS name, per training objective.
SAMPLERS_BY_OBJECTIVE = {
    "flow": {
        "euler": "flow_euler",
        "heun": "flow_heun",
        "euler_stochastic": "flow_euler_stochastic",
        "ddim": "ddim",  # the DDIM(eta) update on the flow path; eta = 0 is exactly Euler
        "dpmpp_2m": "dpmpp_2m",
        "unipc": "unipc",  # Wan 2.1's sampler
    },
    "ddpm": {"ddpm": "ddpm", "ddim": "ddim", "dpmpp_2m": "dpmpp_2m", "unipc": "unipc"},
}
SAMPLERS_WITH_ETA = ("ddim", "flow_euler_stochastic")
DEFAULT_BATCH_SIZE = 16  # samples per program call when generate() is not given batch_size
DEFAULT_MICRO_BATCH = 4  # samples each device computes together (the program's per-device shape)
MAX_SEED = 2**32  # seeds are uint32: jax.random.key(seed) for 0 <= seed < 2**32


class SamplingError(UserError):
    """A checkpoint, prompt or sampling setting that cannot be used."""


# ---------------------------------------------------------------------------------------------
# Settings of one call: validated on the host, before anything is traced
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The static part of a sampling program (hashable: it keys the cache of compiled programs)."""

    name: str  # what the user called it (a key of SAMPLERS_BY_OBJECTIVE[objective])
    sampler: str  # name in samplers.SAMPLERS
    steps: int
    eta: float
    shift: float | None  # flow time shift (None for DDPM models)
    guidance_rescale: float
    guidance_interval: tuple[float, float] | None


def resolve_sampler(name: str, objective: str) -> str:
    """User-facing sampler name -> the samplers.SAMPLERS entry valid for `objective`."""
    valid = SAMPLERS_BY_OBJECTIVE[objective]
    if name not in valid:
        every = {n for names in SAMPLERS_BY_OBJECTIVE.values() for n in names}
        what = (
            f"sampler {name!r} does not apply to a {objective}-trained model"
            if name in every
            else f"unknown sampler {name!r}"
        )
        raise SamplingError(
            f"{what}; valid samplers for this {objective} model: {', '.join(valid)}"
        )
    return valid[name]


def check_sampler_name(name: str) -> None:
    """Fails early (before loading a model) on a name that no objective knows."""
    every = sorted({n for names in SAMPLERS_BY_OBJECTIVE.values() for n in names})
    if name not in every:
        raise SamplingError(f"unknown sampler {name!r}; valid samplers: {', '.join(every)}")


# Samplers converge in tens to hundreds of steps; far more is a typo that would run for hours.
MAX_STEPS = 10_000


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise SamplingError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > MAX_STEPS:
        raise SamplingError(
            f"steps={steps} is more than {MAX_STEPS}; the samplers converge within a few hundred "
            "steps (20-50 is usual), so pass a smaller --steps"
        )
    return int(steps)


def check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def per_sample(value, count: int, name: str) -> list:
    """A scalar for every sample, or a sequence with one entry per prompt."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise SamplingError(f"{name} has {len(values)} entries for {count} prompts; give one each")
    return values


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < MAX_SEED:
        raise SamplingError(f"seeds must be integers in [0, 2**32), got {seed!r}")
    return int(seed)


def parse_guidance_interval(text: str | None) -> tuple[float, float] | None:
    """A flag's guidance interval: "T_LO,T_HI" -> (t_lo, t_hi); "" or None -> None (guidance at
    every step). Whether the two times lie in [0, 1] is `make_settings`' check."""
    if not text or not text.strip():
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        interval = tuple(float(part) for part in parts)
    except ValueError:
        interval = ()
    if len(interval) != 2 or not all(math.isfinite(v) for v in interval):
        raise SamplingError(
            f"guidance interval {text!r} is not two numbers T_LO,T_HI; give the flow times "
            "between which guidance applies, e.g. 0.1,0.7 (1 is pure noise)"
        )
    return interval


def make_settings(
    objective: str,
    *,
    sampler: str = "euler",
    steps: int = 20,
    eta: float = 0.0,
    shift: float | None = None,
    guidance_rescale: float = 0.0,
    guidance_interval=None,
    default_shift: float = 1.0,
    num_timesteps: int | None = None,
) -> SamplerSettings:
    """Validates a call's sampler options for a model trained with `objective` ("flow" or
    "ddpm") -> the static settings of its program.

    default_shift: the flow time shift used when `shift` is None (the training shift).
    num_timesteps: a DDPM model's training timesteps (steps may not exceed them).
    """
    if objective not in SAMPLERS_BY_OBJECTIVE:
        raise SamplingError(f"unknown diffusion objective {objective!r}; valid: flow, ddpm")
    resolved = resolve_sampler(sampler, objective)
    steps = check_steps(steps)
    eta = check_number(eta, "eta")
    if eta < 0:
        raise SamplingError(f"eta must be >= 0, got {eta}")
    if eta and resolved not in SAMPLERS_WITH_ETA:
        raise SamplingError(
            f"eta={eta} has no effect on sampler {sampler!r}; it applies to ddim"
            + (" and euler_stochastic" if objective == "flow" else "")
        )
    if objective == "flow":
        shift = default_shift if shift is None else check_number(shift, "shift")
        if shift <= 0:
            raise SamplingError(f"shift must be positive, got {shift}")
    elif shift is not None:
        raise SamplingError("shift applies to flow-matching models only; this one is ddpm")
    rescale = check_number(guidance_rescale, "guidance_rescale")
    interval = None if guidance_interval is None else tuple(float(v) for v in guidance_interval)
    # Validates the rescale strength and the interval (GuidanceError is a UserError).
    guidance.guided_model_fn(lambda *a: None, rescale_phi=rescale, interval=interval)
    if objective == "ddpm" and num_timesteps is not None and steps > num_timesteps:
        raise SamplingError(f"steps={steps} exceeds the {num_timesteps} training timesteps")
    return SamplerSettings(sampler, resolved, steps, eta, shift, rescale, interval)
