"""Sampling a released Wan 2.1 text-to-video model from a local diffusers-format directory with
sample.py (`diffusion.inference.wan_pipeline`); the two size recipes override it.

    python sample.py --config=configs/wan21_t2v_1_3b.py --config.weights=DIR \
        --prompts=prompts.txt --output_dir=samples

Sources of the settings: diffusers' WanPipeline (installed package, pipelines/wan/pipeline_wan.py):
81 frames, guidance 5.0, 50 steps, max_sequence_length 512, its example's negative prompt; UniPC
is the scheduler of Wan's diffusers repositories and of Wan's own code. The shift is that of Wan's
own generate.py (Wan-Video/Wan2.1): 5.0 for text-to-video at every size, 3.0 only for
image-to-video at 480p (diffusers' example instead suggests "5.0 for 720P, 3.0 for 480P").
Wan generates 16 frames per second.
"""

import ml_collections
from ml_collections.config_dict import placeholder

# WanPipeline's example negative prompt (diffusers, pipelines/wan/pipeline_wan.py): the English
# form of the default negative prompt of Wan's own code.
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.family = "sampling"  # A sample.py recipe: no training stage (train.py refuses it).
    # The local diffusers-format Wan 2.1 directory (model_index.json, transformer/, vae/,
    # text_encoder/, tokenizer/, scheduler/); required: --config.weights=DIR.
    config.weights = placeholder(str)
    config.dtype = "bfloat16"  # Compute dtype of the DiT and umT5 (the VAE runs in float32).
    config.param_dtype = "bfloat16"  # Storage dtype of the DiT's and umT5's weights.
    # Devices: clips split over data x fsdp; the DiT's and umT5's weights sharded over fsdp /
    # tensor; each clip's DiT tokens split over sequence (a long clip on several devices).
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1})
    # The DiT's self-attention: "ulysses" (all-to-alls; heads per tensor device divisible by
    # mesh.sequence) or "ring" (any heads) split the tokens over mesh.sequence; with sequence 1
    # both are the plain core. "xla" or "fused" need sequence 1.
    config.attention_impl = "ulysses"
    config.micro_batch = 1  # Clips each device computes together.
    s = config.sampling = ml_collections.ConfigDict()
    s.sampler = "unipc"  # Flow UniPC, order 2 (diffusers' UniPCMultistepScheduler, flow sigmas).
    s.steps = 50  # Denoising steps (WanPipeline's default).
    s.shift = 5.0  # Flow time shift: Wan's generate.py uses 5.0 for text-to-video at every size.
    s.guidance_scale = 5.0  # Classifier-free guidance scale (WanPipeline's default).
    s.negative_prompt = NEGATIVE_PROMPT  # Guidance pushes away from it; "" for none.
    s.num_frames = 81  # Frames per clip: 1 + 4k (the VAE's temporal factor is 4).
    s.height = 720  # Frame height: a multiple of 16 (VAE factor 8 x patch 2).
    s.width = 1280  # Frame width: a multiple of 16.
    s.fps = 16.0  # Frames per second of the written MP4s and GIFs.
    return config
