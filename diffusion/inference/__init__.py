"""Inference: sampler settings, the one sampling program, TextToImage, and batch sampling to a
directory (prompt files, PNGs, manifest, grid)."""

from diffusion.inference.batch_io import PromptItem, read_prompt_file, sample_to_directory
from diffusion.inference.settings import (
    SAMPLERS_BY_OBJECTIVE,
    SamplerSettings,
    SamplingError,
    check_sampler_name,
    check_steps,
    make_settings,
)
from diffusion.inference.text2image import TextToImage

__all__ = [
    "SAMPLERS_BY_OBJECTIVE",
    "PromptItem",
    "SamplerSettings",
    "SamplingError",
    "TextToImage",
    "check_sampler_name",
    "check_steps",
    "make_settings",
    "read_prompt_file",
    "sample_to_directory",
]
