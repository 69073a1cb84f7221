"""DiT-XL/2 conditioned on the frozen text tower of a CLIP ViT-L/14, on 256x256 latents (TPU).

Cross-attention to the 77 CLIP token states in every block, the pooled text embedding joins
the time embedding (PixArt-alpha style); rectified-flow objective with logit-normal times (SD3).
Point config.text_encoder.checkpoint at a CLIP L/14 run directory or Hugging Face CLIP directory
to train; `--aot_topology` builds the tower from config.text_encoder.variant alone. The data is a
captioned image dataset at 256x256 encoded by encode.py with the SD VAE, as in
configs/dit_xl2_imagenet.py (`--config.data.name=NAME_latents`; captions are kept), and with
`--text_encoder=` that same CLIP checkpoint, so that each record also carries its caption's text
features and the train step runs no text tower (config.data.cached_text=True, which training
checks against the dataset and `--aot_topology` compiles; pass --config.data.cached_text=false
to train on latents without them, the tower then running in every step).
"""

import ml_collections

from configs import dit_xl2_imagenet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = dit_xl2_imagenet.get_config(arg)

    config.data.name = "captioned_latents"  # encode.py's output for a dataset named "captioned".
    config.data.caption_key = "caption"  # Feature holding the caption text.
    config.data.label_key = None  # Text-conditional: no class labels.
    config.data.cached_text = True  # Records carry encode.py --text_encoder's text features.

    config.model.num_classes = 0  # 0: text-conditioned (cross-attention + pooled embedding).
    config.model.remat = "none"  # The extra cross-attention still fits at batch 256.

    config.tokenizer.path = "openai/clip-vit-large-patch14"  # CLIP's BPE (a local copy offline).
    config.tokenizer.vocab_size = 49408  # CLIP's vocabulary.
    config.tokenizer.context_length = 77  # CLIP's context.

    config.text_encoder.variant = "L/14"  # Shapes of the frozen tower (AOT without weights).

    config.diffusion.objective = "flow"  # Rectified flow: x_t = (1 - t) x0 + t eps.
    config.diffusion.time_sampling = "logit_normal"  # SD3's logit-normal(0, 1) times.
    config.diffusion.shift = 1.0  # 256x256: no resolution shift.
    config.diffusion.cond_dropout = 0.1  # Empty prompt with probability 0.1 (guidance).

    config.sampling.sampler = "euler"  # Euler steps of the flow ODE.
    config.sampling.steps = 50  # Denoising steps.
    config.sampling.guidance_scale = 4.0  # Classifier-free guidance scale.
    config.sampling.prompts = ("a photo of a red fox in the snow",)  # Sample-grid prompts.
    return config
