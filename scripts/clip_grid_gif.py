"""An animated grid of sampled clips for the README: the clips of a sample.py (or samples stage)
output directory, read back from their MP4s, tiled a row per prompt and a column per seed, with a
gap between clips, written as one looping GIF.

    PYTHONPATH=. python scripts/clip_grid_gif.py runs/moving_shapes/samples \
        docs/figures/moving_shapes_samples.gif
"""

from __future__ import annotations

import argparse

import numpy as np

from diffusion.inference import batch_io, video_files

GAP = 2  # pixels between clips, at the clips' size
PAGE = 215  # the gap's gray, as the labelled grids' page


def tile(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Rows of clips (T, H, W, 3) -> one clip (T, rows * (H + GAP) - GAP, ...)."""
    frames, height, width, _ = rows[0][0].shape
    columns = max(len(row) for row in rows)
    out = np.full(
        (frames, len(rows) * (height + GAP) - GAP, columns * (width + GAP) - GAP, 3),
        PAGE,
        np.uint8,
    )
    for r, row in enumerate(rows):
        for c, clip in enumerate(row):
            top, left = r * (height + GAP), c * (width + GAP)
            out[:, top : top + height, left : left + width] = clip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("samples", help="a sample.py output directory of clips")
    parser.add_argument("output", help="the GIF to write")
    parser.add_argument("--size", type=int, default=32, help="side of the clips")
    parser.add_argument("--fps", type=float, default=batch_io.DEFAULT_FPS)
    args = parser.parse_args()
    records = batch_io.read_manifest(args.samples)
    by_line: dict[int, list[np.ndarray]] = {}
    for name in sorted(records):
        clip = video_files.read_mp4(f"{args.samples}/{name}", args.size, args.size)
        by_line.setdefault(records[name]["line"], []).append(clip)
    grid = tile([by_line[line] for line in sorted(by_line)])
    print(video_files.write_gif(args.output, grid, args.fps))


if __name__ == "__main__":
    main()
