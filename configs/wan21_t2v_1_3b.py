"""Wan 2.1 text-to-video 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, downloaded by you) at 480p:
81 frames of 480 x 832, shift 5.0: Wan's own generate.py samples text-to-video with 5.0 at every
size (3.0 is its image-to-video value at 480p; diffusers' example uses 3.0 for 480P).

    python sample.py --config=configs/wan21_t2v_1_3b.py --config.weights=DIR \
        --prompts=prompts.txt --output_dir=samples
"""

import ml_collections

from configs import base_wan21


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_wan21.get_config(arg)
    config.sampling.height = 480  # The 1.3B model's resolution.
    config.sampling.width = 832
    return config
