"""Writes a PNG grid of real captioned-shapes examples, each with its caption.

    .venv/bin/python scripts/dataset_grid.py [--data_dir=DIR] [--out=PNG]

Prepares the default dataset if missing (offline, well under a minute), reads the first
examples of a split through the same TFDS data source the pipeline uses, and draws them
upscaled with nearest-neighbour sampling, so the pixels shown are the pixels trained on.
"""

from __future__ import annotations

import argparse
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffusion.data import sources

CELL_WIDTH = 240  # pixels per grid cell; the image is centred above its caption
IMAGE_SIDE = 160
TEXT_LINES = 4
LINE_HEIGHT = 16
FONT_SIZE = 13
MARGIN = 8


def draw_grid(images: np.ndarray, captions: list[str], columns: int) -> Image.Image:
    """(N, H, W, 3) uint8 images and their captions -> one white RGB grid image."""
    rows = -(-len(images) // columns)
    cell_height = IMAGE_SIDE + TEXT_LINES * LINE_HEIGHT + 2 * MARGIN
    grid = Image.new("RGB", (columns * CELL_WIDTH, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=FONT_SIZE)
    characters_per_line = CELL_WIDTH // 7
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        left, top = (index % columns) * CELL_WIDTH, (index // columns) * cell_height
        tile = Image.fromarray(image).resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.NEAREST)
        tile_left = left + (CELL_WIDTH - IMAGE_SIDE) // 2
        grid.paste(tile, (tile_left, top + MARGIN))
        # A frame, so that white backgrounds stand out from the page.
        frame = (tile_left - 1, top + MARGIN - 1, tile_left + IMAGE_SIDE, top + MARGIN + IMAGE_SIDE)
        draw.rectangle(frame, outline="darkgray")
        lines = textwrap.wrap(caption, characters_per_line)[:TEXT_LINES]
        for line_index, line in enumerate(lines):
            y = top + MARGIN + IMAGE_SIDE + 4 + line_index * LINE_HEIGHT
            draw.text((left + MARGIN, y), line, fill="black", font=font)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--split", default="train")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--out", default="docs/figures/shapes_examples.png")
    args = parser.parse_args()

    builder = sources.build_dataset(data_dir=args.data_dir, resolution=args.resolution)
    source = builder.as_data_source(split=args.split)
    records = [source[i] for i in range(args.count)]
    images = np.stack([r["image"] for r in records])
    captions = [r["caption"].decode("utf-8") for r in records]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    draw_grid(images, captions, args.columns).save(args.out)
    print(f"wrote {args.out}: {args.count} examples of {sources.tfds_name(builder)} {args.split}")


if __name__ == "__main__":
    main()
