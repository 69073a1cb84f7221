"""The model families, one module each, in one registry.

    family = families.get(config.family)     # diffusion.families.clip, .dit or .autoencoder
    build = family.build(config, data, mesh, ...)   # model config, model class, loss

Each family module has: NAME, `model_config(config, data, ...)`, `build(config, data, mesh,
...) -> ModelBuild`, `abstract_batch(...)` (the batch its train step reads, for ahead-of-time
compilation) and `input_options(config)` (what it asks of the input pipeline; `captions: False`
for a family that reads no text). A new family (video DiT) is one module here and one
entry in FAMILIES.
"""

from __future__ import annotations

from types import ModuleType

from diffusion.errors import UserError
from diffusion.families import autoencoder, clip, dit
from diffusion.families.base import DataFacts, ModelBuild, check_global_batch

FAMILIES: dict[str, ModuleType] = {clip.NAME: clip, dit.NAME: dit, autoencoder.NAME: autoencoder}

__all__ = ["FAMILIES", "DataFacts", "ModelBuild", "check_global_batch", "get"]


def get(name: str) -> ModuleType:
    """The family module registered as `name` (config.family)."""
    if name not in FAMILIES:
        raise UserError(f"config.family={name!r} is not one of {sorted(FAMILIES)}.")
    return FAMILIES[name]
