"""Files of sampled clips: an MP4 (H.264) and an animated GIF per clip, and a frame-strip PNG per
batch (a row per clip, a column per frame, the row's label on the left as in `grids`).

Every file is written atomically (a temporary file renamed into place, as `batch_io` does, with
the same ".NAME.tmp-PID" names, so its stale-temporary clean-up covers them) and byte for byte
deterministically: the same clip gives the same bytes on every run, so a resumed or re-sharded
sampling job reproduces its files exactly.

Clips are uint8 (T, H, W, 3). Both the MP4 and the GIF show them scaled up by a whole, even
factor with nearest neighbour (`display_scale`): a 32x32 clip is too small for a player to show
and for H.264's 16x16 macroblocks, and with an even factor every source pixel covers whole 2x2
chroma blocks of yuv420p, so subsampling never mixes two source pixels' colours.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from diffusion.errors import UserError
from diffusion.inference import grids

# Least side of the MP4 / GIF picture: most players show smaller video as a postage stamp.
MIN_DISPLAY_SIDE = 128
# x264's constant rate factor: 0 is lossless (which most browsers cannot play), 23 its default;
# at 18 flat shapes on flat backgrounds come back within a few grey levels.
H264_CRF = 18
# Arguments that make ffmpeg's output a function of the frames alone: no creation time or encoder
# version string in the container, no metadata carried over, one encoding thread (x264's
# multi-threaded rate control depends on the thread count, and so do its bytes).
_DETERMINISTIC_FFMPEG_ARGS = [
    "-fflags",
    "+bitexact",
    "-flags:v",
    "+bitexact",
    "-map_metadata",
    "-1",
    "-threads",
    "1",
]
GIF_COLORS = 256  # the GIF palette's size


# ---------------------------------------------------------------------------------------------
# Checks and geometry
# ---------------------------------------------------------------------------------------------


def check_clip(clip: np.ndarray, what: str = "clip") -> np.ndarray:
    """The clip as a uint8 (T, H, W, 3) array, or a UserError that says what it should be."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3 or min(clip.shape[:3], default=0) < 1:
        raise UserError(
            f"a {what} must be (frames, height, width, 3) with at least one frame and pixel, "
            f"got shape {clip.shape}"
        )
    if clip.dtype != np.uint8:
        raise UserError(
            f"a {what} must be uint8 in [0, 255], got dtype {clip.dtype}; convert [-1, 1] floats "
            "with np.clip(np.rint((clip + 1) * 127.5), 0, 255).astype(np.uint8)"
        )
    return clip


def check_fps(fps: float) -> float:
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps <= 240:
        raise UserError(f"fps must be a number in (0, 240], got {fps!r}")
    return float(fps)


def display_scale(height: int, width: int, min_side: int = MIN_DISPLAY_SIDE) -> int:
    """The least even whole factor that brings the shorter side to at least `min_side` pixels
    (2 when it already is): even, so both scaled sides are even as yuv420p requires."""
    factor = max(1, math.ceil(min_side / min(height, width)))
    return factor + factor % 2


def upscale(clip: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour scaling of (..., H, W, 3) by a whole factor: a pixel becomes a block."""
    return clip.repeat(factor, axis=-3).repeat(factor, axis=-2)


def write_atomically(path: str, write: Callable[[str], None]) -> str:
    """write(temporary path), then rename it onto `path`: a reader (or a kill) never sees half a
    file. The temporary's name ends in ".tmp-PID", so writers must name their format explicitly."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


# ---------------------------------------------------------------------------------------------
# MP4
# ---------------------------------------------------------------------------------------------


def write_mp4(path: str, clip: np.ndarray, fps: float) -> str:
    """H.264 (libx264, yuv420p, CRF H264_CRF) in MP4 of the clip scaled by `display_scale`;
    the moov atom first (faststart) so that a browser starts playing before the end arrives."""
    import imageio_ffmpeg

    clip = check_clip(clip)
    fps = check_fps(fps)
    big = upscale(clip, display_scale(*clip.shape[1:3]))
    height, width = big.shape[1:3]

    def write(temporary: str) -> None:
        writer = imageio_ffmpeg.write_frames(
            temporary,
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,  # the CRF below instead of imageio-ffmpeg's quality scale
            macro_block_size=2,  # sides are even already; no resizing by ffmpeg
            output_params=[
                "-crf",
                str(H264_CRF),
                *_DETERMINISTIC_FFMPEG_ARGS,
                "-movflags",
                "+faststart",
                "-f",
                "mp4",
            ],
        )
        writer.send(None)  # starts ffmpeg
        for frame in big:
            writer.send(np.ascontiguousarray(frame))
        writer.close()

    return write_atomically(path, write)


def read_mp4(path: str, height: int, width: int) -> np.ndarray:
    """The frames of an MP4 this module wrote, back at the clip's size (height, width): uint8
    (T, height, width, 3), each pixel the centre of its upscaled block (H.264 is lossy: close to
    the clip, not equal; for display, such as frame strips of clips written earlier)."""
    import imageio.v3 as iio

    frames = np.asarray(iio.imread(path, plugin="FFMPEG"))  # (T, H * f, W * f, 3)
    factor = display_scale(height, width)
    if frames.shape[1:3] != (height * factor, width * factor):
        raise UserError(
            f"{path} holds {frames.shape[2]}x{frames.shape[1]} frames, not a {width}x{height} clip "
            f"scaled by {factor}; it was not written by write_mp4 for clips of this size"
        )
    return frames[:, factor // 2 :: factor, factor // 2 :: factor]


# ---------------------------------------------------------------------------------------------
# GIF
# ---------------------------------------------------------------------------------------------


def palette_frames(clip: np.ndarray) -> list[Image.Image]:
    """The clip's frames as palette images sharing one palette: exact when the clip has at most
    GIF_COLORS colours (a shapes clip has far fewer), else Pillow's median cut over all frames at
    once, without dithering (dither noise would flicker from frame to frame)."""
    frames, height, width, _ = clip.shape
    colors, indices = np.unique(clip.reshape(-1, 3), axis=0, return_inverse=True)
    if len(colors) <= GIF_COLORS:
        palette = colors.astype(np.uint8).reshape(-1).tolist()
        indices = indices.reshape(frames, height, width).astype(np.uint8)
        images = [Image.fromarray(index_map, mode="L").convert("P") for index_map in indices]
        for image in images:
            image.putpalette(palette)
        return images
    mosaic = Image.fromarray(clip.reshape(frames * height, width, 3))
    reference = mosaic.quantize(
        GIF_COLORS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    return [
        Image.fromarray(frame).quantize(palette=reference, dither=Image.Dither.NONE)
        for frame in clip
    ]


def write_gif(path: str, clip: np.ndarray, fps: float) -> str:
    """An animated GIF, looping forever, of the clip scaled by `display_scale`. GIF stores
    delays in hundredths of a second, so the frame time is 1/fps rounded to 10 ms; identical
    consecutive frames become one frame shown for their summed time (Pillow's GIF writer)."""
    clip = check_clip(clip)
    fps = check_fps(fps)
    images = palette_frames(upscale(clip, display_scale(*clip.shape[1:3])))
    # Milliseconds, a whole number of centiseconds, halves rounded up (8 fps: 12.5 -> 13 cs).
    duration = 10 * max(1, math.floor(100 / fps + 0.5))

    def write(temporary: str) -> None:
        images[0].save(
            temporary,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=duration,
            loop=0,
        )

    return write_atomically(path, write)


# ---------------------------------------------------------------------------------------------
# Frame strips and the files of one clip
# ---------------------------------------------------------------------------------------------


def frame_strip(
    clips: np.ndarray, labels: Sequence[str], tile: int = 64, label_width: int = 360
) -> np.ndarray:
    """uint8 (N, T, H, W, 3) clips -> one uint8 RGB image: a row per clip, its label on the left
    and its frames left to right, as `grids.labelled_rows_image` lays out image rows."""
    clips = np.asarray(clips)
    if clips.ndim != 5:
        raise UserError(f"clips must be (count, frames, height, width, 3), got shape {clips.shape}")
    for clip in clips:
        check_clip(clip)
    if len(labels) != len(clips):
        raise UserError(
            f"frame_strip got {len(clips)} clips but {len(labels)} labels; give one each"
        )
    rows = list(zip(labels, clips, strict=True))
    return np.asarray(grids.labelled_rows_image(rows, tile=tile, label_width=label_width))


def write_frame_strip(
    path: str, clips: np.ndarray, labels: Sequence[str], tile: int = 64, label_width: int = 360
) -> str:
    """`frame_strip` saved as a PNG at `path`, atomically."""
    image = Image.fromarray(frame_strip(clips, labels, tile=tile, label_width=label_width))
    return write_atomically(path, lambda temporary: image.save(temporary, format="PNG"))


def write_clip_files(directory: str, name: str, clip: np.ndarray, fps: float) -> dict[str, str]:
    """DIRECTORY/NAME.mp4 and DIRECTORY/NAME.gif of one clip; returns {"mp4": path, "gif": path}."""
    if not name or os.sep in name or name.startswith("."):
        raise UserError(
            f"clip file name {name!r} must be a plain file name without extension, such as "
            "'00001_000'"
        )
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, name)
    return {"mp4": write_mp4(f"{stem}.mp4", clip, fps), "gif": write_gif(f"{stem}.gif", clip, fps)}
