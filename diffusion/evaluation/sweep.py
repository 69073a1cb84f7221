"""The guidance x sampler sweep of a DiT evaluation: its default sampler and how its settings are
named in metrics.json (text- and class-conditional runs alike)."""

from __future__ import annotations

DEFAULT_SAMPLER = {"flow": ("euler", 20), "ddpm": ("ddim", 20)}


def scale_key(scale: float) -> str:
    """How a guidance scale names its entry in metrics.json: 4.0 -> "4", 1.5 -> "1.5"."""
    return f"{scale:g}"


def sampler_key(sampler: str, steps: int) -> str:
    return f"{sampler}:{steps}"
