"""Flax NNX models: CLIP towers, the text-conditioned DiT and the video DiT (Wan 2.1's shape),
with their size variants.

`clip_config('B/16', dtype='bfloat16')` and `dit_config('DiT-XL/2', conditioning='class')` build
configs from the variant tables; unknown names or fields raise ValueError listing valid ones.
"""

from __future__ import annotations

import dataclasses

from diffusion.models.blocks import REMAT_POLICIES
from diffusion.models.clip import CLIP, CLIP_VARIANTS, CLIPConfig
from diffusion.models.dit import DIT_VARIANTS, DiT, DiTConfig
from diffusion.models.video_dit import (
    VIDEO_DIT_VARIANTS,
    VideoDiT,
    VideoDiTConfig,
    video_dit_config,
)

__all__ = [
    "CLIP",
    "CLIP_VARIANTS",
    "CLIPConfig",
    "DIT_VARIANTS",
    "DiT",
    "DiTConfig",
    "REMAT_POLICIES",
    "VIDEO_DIT_VARIANTS",
    "VideoDiT",
    "VideoDiTConfig",
    "clip_config",
    "dit_config",
    "recipe_fields",
    "video_dit_config",
]


def _config_from_table(config_cls, table: dict, kind: str, variant: str, overrides: dict):
    if variant not in table:
        raise ValueError(f"unknown {kind} variant {variant!r}; valid: {sorted(table)}")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {config_cls.__name__} field(s) {unknown}; valid: {sorted(fields)}"
        )
    return config_cls(**{**table[variant], **overrides})


def clip_config(variant: str = "tiny", **overrides) -> CLIPConfig:
    """The CLIPConfig of a CLIP_VARIANTS entry, with field overrides."""
    return _config_from_table(CLIPConfig, CLIP_VARIANTS, "CLIP", variant, overrides)


def dit_config(variant: str = "tiny", **overrides) -> DiTConfig:
    """The DiTConfig of a DIT_VARIANTS entry ('tiny', 'DiT-S/2' ... 'DiT-XL/8'), with overrides."""
    return _config_from_table(DiTConfig, DIT_VARIANTS, "DiT", variant, overrides)


# Size and stem fields a recipe's config.model may set on top of its variant (None keeps the
# variant's).
SIZE_FIELDS = {
    "clip": (
        "patch_size",
        "vision_width",
        "vision_depth",
        "vision_stem",
        "text_width",
        "text_depth",
    ),
    "dit": ("patch_size", "width", "depth", "num_heads", "input_stem"),
    "video_dit": (
        "patch_size",
        "width",
        "depth",
        "num_heads",
        "ffn_dim",
        "word_conditioning",
        "input_stem",
    ),
}


def recipe_fields(config, family: str) -> dict:
    """The CLIPConfig / DiTConfig / VideoDiTConfig fields that a recipe sets: how the model runs
    (dtype, remat, scan, attention), the size fields its config.model overrides, and for CLIP
    the SigLIP bias its loss needs. train.py and the AOT compiler both build their model from
    these, so `--config.model.depth=...` changes both."""
    model_section = config.model
    fields = dict(
        dtype=model_section.dtype,
        remat_policy=model_section.remat,
        scan_layers=model_section.scan_layers,
        attention_impl=model_section.get("attention_impl", "xla"),
    )
    for name in SIZE_FIELDS[family]:  # recipes written before a field existed simply lack it
        if model_section.get(name) is not None:
            fields[name] = model_section.get(name)
    if family == "clip":
        # SigLIP learns a bias b in sigmoid(t x.y + b), initialised at -10 (Zhai et al. 2023).
        sigmoid = config.get("loss") is not None and config.loss.get("kind") == "sigmoid"
        fields["logit_bias_init"] = -10.0 if sigmoid else None
    return fields
