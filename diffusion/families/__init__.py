"""The model families, one module each, in one registry.

    family = families.get(config.family)     # diffusion.families.clip, .dit, .video_dit, ...
    build = family.build(config, data, mesh, ...)   # model config, model class, loss

Each family module has: NAME, `model_config(config, data, ...)`, `build(config, data, mesh,
...) -> ModelBuild`, `abstract_batch(...)` (the batch its train step reads, for ahead-of-time
compilation), `input_options(config)` (what it asks of the input pipeline; `captions: False`
for a family that reads no text) and TAKES_CLIPS (whether it trains on a dataset of clips).
A new family is one module here and one entry in FAMILIES.
"""

from __future__ import annotations

from types import ModuleType

from diffusion.errors import UserError
from diffusion.families import autoencoder, clip, dit, video_dit
from diffusion.families.base import DataFacts, ModelBuild, check_global_batch

FAMILIES: dict[str, ModuleType] = {
    clip.NAME: clip,
    dit.NAME: dit,
    video_dit.NAME: video_dit,
    autoencoder.NAME: autoencoder,
}

__all__ = ["FAMILIES", "DataFacts", "ModelBuild", "check_global_batch", "check_inputs", "get"]


def check_inputs(name: str, frames: int, dataset: str) -> None:
    """Refuses a dataset of clips (`frames` > 0) for a family that trains on images; every family
    that takes clips also takes images (as one-frame clips, or as they are)."""
    if frames and not get(name).TAKES_CLIPS:
        takes_clips = sorted(n for n, family in FAMILIES.items() if family.TAKES_CLIPS)
        raise UserError(
            f"config.data.name={dataset!r} holds clips of {frames} frames, but the {name!r} "
            f"family trains on images. Train one of {takes_clips} on it, or choose a dataset of "
            "images (e.g. config.data.name='shapes')."
        )


def get(name: str) -> ModuleType:
    """The family module registered as `name` (config.family)."""
    if name not in FAMILIES:
        raise UserError(f"config.family={name!r} is not one of {sorted(FAMILIES)}.")
    return FAMILIES[name]
