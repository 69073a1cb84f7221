"""Inference: sampler settings, the one sampling program, TextToImage and ClassToImage (on the
shared DiTPipeline), and batch sampling to a directory (prompt files or class labels, PNGs,
manifest, grid)."""

from diffusion.inference.batch_io import (
    GRID,
    PromptItem,
    class_label_items,
    load_pipeline,
    read_prompt_file,
    sample_to_directory,
)
from diffusion.inference.class2image import ClassToImage
from diffusion.inference.settings import (
    SAMPLERS_BY_OBJECTIVE,
    SamplerSettings,
    SamplingError,
    check_sampler_name,
    check_steps,
    make_settings,
    parse_guidance_interval,
)
from diffusion.inference.text2image import TextToImage

__all__ = [
    "GRID",
    "SAMPLERS_BY_OBJECTIVE",
    "ClassToImage",
    "PromptItem",
    "SamplerSettings",
    "SamplingError",
    "TextToImage",
    "check_sampler_name",
    "check_steps",
    "class_label_items",
    "load_pipeline",
    "make_settings",
    "parse_guidance_interval",
    "read_prompt_file",
    "sample_to_directory",
]
