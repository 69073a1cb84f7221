"""CLIP ViT-L/14 at batch 32k (TPU pod): OpenAI's recipe with the chunked contrastive loss.

As configs/clip_b16.py, with the ViT-L/14 image tower (24 layers, width 1024) and a 768-wide text
tower (Radford et al. 2021, tables 20 and 21: learning rate 4e-4).
"""

import ml_collections

from configs import clip_b16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = clip_b16.get_config(arg)
    config.tokenizer.path = "openai/clip-vit-large-patch14"  # CLIP's BPE (a local copy offline).
    config.model.variant = "L/14"  # ViT-L/14 image tower, 12-layer 768-wide text tower.
    config.optimizer.learning_rate = 4e-4  # Table 21, ViT-L/14.
    return config
