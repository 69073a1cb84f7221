"""The guidance x sampler sweep of a DiT evaluation: its default sampler, how its settings are
named in metrics.json (text- and class-conditional runs, images and clips alike) and how a
stopped sweep ends."""

from __future__ import annotations

DEFAULT_SAMPLER = {"flow": ("euler", 20), "ddpm": ("ddim", 20)}


def scale_key(scale: float) -> str:
    """How a guidance scale names its entry in metrics.json: 4.0 -> "4", 1.5 -> "1.5"."""
    return f"{scale:g}"


def sampler_key(sampler: str, steps: int) -> str:
    return f"{sampler}:{steps}"


class EvaluationStopped(Exception):
    """The evaluation's `stop` callback asked it to end (a pipeline's SIGTERM): nothing of it is
    written, the rerun evaluates again."""
