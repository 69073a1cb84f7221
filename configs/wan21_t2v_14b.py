"""Wan 2.1 text-to-video 14B (Wan-AI/Wan2.1-T2V-14B-Diffusers, downloaded by you) at 720p:
81 frames of 720 x 1280, shift 5.0 (Wan's generate.py and diffusers' example); the base's values.
For 480p pass --config.sampling.height=480 --config.sampling.width=832.

    python sample.py --config=configs/wan21_t2v_14b.py --config.weights=DIR \
        --prompts=prompts.txt --output_dir=samples
"""

import ml_collections

from configs import base_wan21


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return base_wan21.get_config(arg)
