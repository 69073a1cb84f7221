"""Writes the README's frame strips of the moving-shapes clips: one clip per motion, its frames
left to right, its caption beside it.

    .venv/bin/python scripts/moving_shapes_strip.py [--out=docs/figures/moving_shapes.png]

The clips are the first of each motion in the generator's `train` stream (seed 0, 32x32, 8
frames), drawn upscaled with nearest-neighbour sampling: the pixels shown are the data's.
"""

from __future__ import annotations

import argparse

import numpy as np

from diffusion.data import moving_shapes
from diffusion.inference.grids import save_labelled_rows


def first_clip_of_each_motion(count: int = 2000) -> list[tuple[str, np.ndarray]]:
    rows = {}
    for _, example in moving_shapes.generate_examples("train", count, 32, 8, seed=0):
        rows.setdefault(example["motion"], (example["caption"], example["video"]))
        if len(rows) == len(moving_shapes.MOTIONS):
            break
    return [rows[motion] for motion in moving_shapes.MOTIONS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/figures/moving_shapes.png")
    args = parser.parse_args()
    path = save_labelled_rows(first_clip_of_each_motion(), args.out, tile=64, label_width=440)
    print(path)


if __name__ == "__main__":
    main()
