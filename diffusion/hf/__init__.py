"""Imports of pretrained checkpoints saved with `save_pretrained` (safetensors only).

`files` checks directories and reads config.json and safetensors weights; `clip` imports
transformers' CLIPModel into diffusion.models.clip.CLIP (`load_hf_clip`); `autoencoder` imports
diffusers' AutoencoderKL into diffusion.models.autoencoder.Autoencoder
(`load_diffusers_autoencoder`); `wan_transformer` imports diffusers' WanTransformer3DModel into
diffusion.models.video_dit.VideoDiT (`load_diffusers_wan_transformer`).
"""

from diffusion.hf.autoencoder import load_diffusers_autoencoder
from diffusion.hf.clip import (
    HF_ACTIVATIONS,
    OPENAI_PIXEL_MEAN,
    OPENAI_PIXEL_STD,
    clip_config_from_hf,
    convert_weights,
    load_hf_clip,
    text_context_length,
    weight_entries,
)
from diffusion.hf.files import (
    CONFIG_FILE,
    PICKLED_WEIGHTS,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    CheckpointError,
    read_safetensors,
)
from diffusion.hf.wan_transformer import load_diffusers_wan_transformer

__all__ = [
    "CONFIG_FILE",
    "HF_ACTIVATIONS",
    "OPENAI_PIXEL_MEAN",
    "OPENAI_PIXEL_STD",
    "PICKLED_WEIGHTS",
    "WEIGHTS_FILE",
    "WEIGHTS_INDEX_FILE",
    "CheckpointError",
    "clip_config_from_hf",
    "convert_weights",
    "load_diffusers_autoencoder",
    "load_diffusers_wan_transformer",
    "load_hf_clip",
    "text_context_length",
    "read_safetensors",
    "weight_entries",
]
