"""Labelled image grids: one row per prompt (or class), its label on the left, its samples
beside it with gaps between them: the grid.png of sample.py and of the pipeline's samples stage."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

GAP = 4  # pixels between tiles and rows
# The page: light gray, so that tiles with a white (or black) background still show their edges.
PAGE_COLOR = (215, 215, 215)
LABEL_MARGIN = 6


def labelled_rows_image(
    rows: Sequence[tuple[str, np.ndarray]], tile: int = 64, label_width: int = 360
) -> Image.Image:
    """One row per (label, uint8 (N, H, W, 3) images): the label on the left (cut with "..." to
    fit `label_width`), the images beside it, each scaled up by a whole factor (nearest
    neighbour, so pixels stay sharp) to about `tile` pixels."""
    if not rows:
        raise ValueError("labelled_rows_image needs at least one row")
    height, width = np.asarray(rows[0][1]).shape[1:3]
    scale = max(1, tile // max(height, width))
    cell_h, cell_w = height * scale, width * scale
    columns = max(len(images) for _, images in rows)
    canvas = Image.new(
        "RGB", (label_width + columns * (cell_w + GAP), len(rows) * (cell_h + GAP)), PAGE_COLOR
    )
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        top = r * (cell_h + GAP)
        text = _fitted(draw, label, label_width - 2 * LABEL_MARGIN)
        draw.text((LABEL_MARGIN, top + cell_h // 2 - 6), text, fill=(0, 0, 0))
        for c, image in enumerate(np.asarray(images, np.uint8)):
            big = image.repeat(scale, axis=0).repeat(scale, axis=1)
            canvas.paste(Image.fromarray(big), (label_width + c * (cell_w + GAP), top))
    return canvas


def save_labelled_rows(
    rows: Sequence[tuple[str, np.ndarray]], path: str, tile: int = 64, label_width: int = 360
) -> str:
    """`labelled_rows_image` saved at `path`. Returns `path`."""
    canvas = labelled_rows_image(rows, tile=tile, label_width=label_width)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def _fitted(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def row_label(prompt: str, negative_prompt: str = "", class_label=None, class_name=None) -> str:
    """What a row shows: the prompt, or the class (its name, or "class 3", or both: "red circle
    (class 0)" where the run's `class_name` of its id is given), and any negative."""
    if class_label is not None:
        label = class_label if isinstance(class_label, str) else f"class {class_label}"
        if class_name is not None and not isinstance(class_label, str):
            label = f"{class_name(class_label)} ({label})"
    else:
        label = prompt
    return label + (f"  (negative: {negative_prompt})" if negative_prompt else "")
