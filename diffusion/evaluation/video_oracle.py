"""The moving-shapes oracle: shape, colour, size, background, motion and speed read back from
uint8 clips (N, T, H, W, 3), so generated videos are scored attribute by attribute, motion
included, plus how constant the shape, colour and background stay over the frames.

Each frame is read by the still-image oracle (`shapes_oracle`); the clip's shape, colour and
background are the most frequent per-frame reading. The shape's path comes from its per-frame
centroid and area: with the clip's shape, the centroid gives the bounding-box centre and the
area the radius, the two quantities `moving_shapes.trajectory` moves. A least-squares line
through each over the clip's progress (0 at the first frame, 1 at the last) gives the
displacement and the relative radius change over the clip, whose sizes name the motion and the
speed with thresholds derived from the dataset's own TRAVEL and GROWTH.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffusion.data import moving_shapes
from diffusion.data import shapes as shapes_lib
from diffusion.errors import UserError
from diffusion.evaluation import shapes_oracle

# Clip-level attributes, in the order of the dataset's ClassLabels.
ATTRIBUTES = ("shape", "color", "size", "motion", "speed", "background")
VOCABULARIES = {
    "shape": shapes_lib.SHAPES,
    "color": shapes_lib.COLOR_NAMES,
    "size": shapes_lib.SIZES,
    "motion": moving_shapes.MOTIONS,
    "speed": moving_shapes.SPEEDS,
    "background": shapes_lib.BACKGROUND_NAMES,
}
# Attributes read in every frame: "all" asks them right in each frame, the rest per clip.
FRAME_ATTRIBUTES = ("shape", "color", "background")

# Radius at the middle frame that separates small from large: the geometric mean of the nominal
# radii, far from both jittered ranges. Over a clip the mean radius is the middle frame's
# (constant for a translation, linear in time and symmetric about it for grow / shrink).
SIZE_THRESHOLD = float(
    np.sqrt(moving_shapes.SIZE_RADIUS["small"] * moving_shapes.SIZE_RADIUS["large"])
)
# A translation moves the centre by TRAVEL[speed]; grow / shrink change the radius from
# r (1 - g) to r (1 + g), a change of 2 g relative to the mean radius, with g = GROWTH[speed].
# Each speed threshold is the geometric mean of the slow and the fast value.
TRAVEL_THRESHOLD = float(np.sqrt(moving_shapes.TRAVEL["slow"] * moving_shapes.TRAVEL["fast"]))
GROWTH_THRESHOLD = float(2 * np.sqrt(moving_shapes.GROWTH["slow"] * moving_shapes.GROWTH["fast"]))
# Which kind of motion a clip shows: its displacement and its relative radius change, each in
# units of the slow speed's value; the larger one wins.
_TRAVEL_UNIT = moving_shapes.TRAVEL["slow"]
_GROWTH_UNIT = 2 * moving_shapes.GROWTH["slow"]

_TRANSLATIONS = tuple(m for m, d in moving_shapes.MOTION_DIRECTIONS.items() if d is not None)
_DIRECTIONS = np.array([moving_shapes.MOTION_DIRECTIONS[m] for m in _TRANSLATIONS])  # (6, 2)


@dataclasses.dataclass(frozen=True)
class VideoReading:
    """What the oracle read from N clips of T frames: label indices into VOCABULARIES per clip,
    the per-frame readings, and the path they were read from."""

    shape: np.ndarray  # (N,) int, the most frequent per-frame shape
    color: np.ndarray  # (N,) int
    size: np.ndarray  # (N,) int
    motion: np.ndarray  # (N,) int
    speed: np.ndarray  # (N,) int
    background: np.ndarray  # (N,) int
    frame_shape: np.ndarray  # (N, T) int
    frame_color: np.ndarray  # (N, T) int
    frame_background: np.ndarray  # (N, T) int
    center: np.ndarray  # (N, T, 2) (x, y) bounding-box centre of the clip's shape, image units
    radius: np.ndarray  # (N, T) radius of the clip's shape, image units
    displacement: np.ndarray  # (N, 2) fitted centre motion over the clip, image units
    growth: np.ndarray  # (N,) fitted radius change over the clip / mean radius
    background_change: np.ndarray  # (N,) mean RGB distance between consecutive backgrounds

    @property
    def consistent(self) -> np.ndarray:
        """(N,) bool: the shape and the colour read the same in every frame."""
        return _constant(self.frame_shape) & _constant(self.frame_color)

    def labels(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def names(self, index: int) -> dict[str, str]:
        """The attribute names read from clip `index`."""
        return {a: VOCABULARIES[a][int(getattr(self, a)[index])] for a in ATTRIBUTES}


def _constant(values: np.ndarray) -> np.ndarray:
    return np.all(values == values[:, :1], axis=1)


def most_frequent(values: np.ndarray, classes: int) -> np.ndarray:
    """Per row of (N, T) class indices, the most frequent one (the lowest index on a tie)."""
    counts = (values[..., None] == np.arange(classes)).sum(axis=1)  # (N, classes)
    return np.argmax(counts, axis=1)


def fitted_change(values: np.ndarray) -> np.ndarray:
    """Slope of the least-squares line through (N, T, ...) values against the clip's progress
    (0 at the first frame, 1 at the last): their change over the whole clip, noise averaged."""
    frames = values.shape[1]
    progress = np.linspace(0.0, 1.0, frames) - 0.5  # centred, so the slope needs no intercept
    progress = progress.reshape((1, frames) + (1,) * (values.ndim - 2))
    return (progress * values).sum(axis=1) / (progress**2).sum()


def classify_motion(displacement: np.ndarray, growth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Motion and speed indices (into MOTIONS, SPEEDS) of N clips from their displacement (N, 2)
    over the clip (x right, y down, image units) and relative radius change (N,)."""
    travel = np.linalg.norm(displacement, axis=1)
    scales = np.abs(growth) / _GROWTH_UNIT > travel / _TRAVEL_UNIT
    direction = np.argmax(displacement @ _DIRECTIONS.T, axis=1)  # the nearest unit direction
    translation = np.array([moving_shapes.MOTIONS.index(m) for m in _TRANSLATIONS])[direction]
    scaling = np.where(
        growth > 0, moving_shapes.MOTIONS.index("grow"), moving_shapes.MOTIONS.index("shrink")
    )
    motion = np.where(scales, scaling, translation)
    fast = np.where(scales, np.abs(growth) >= GROWTH_THRESHOLD, travel >= TRAVEL_THRESHOLD)
    return motion, fast.astype(np.int64)  # SPEEDS = ("slow", "fast")


def check_clips(clips: np.ndarray) -> np.ndarray:
    clips = np.asarray(clips)
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise UserError(
            f"clips must be uint8 (count, frames, height, width, 3), got shape {clips.shape}"
        )
    if clips.shape[1] < 2:
        raise UserError(
            f"reading motion needs clips of at least 2 frames, got {clips.shape[1]}; read single "
            "images with shapes_oracle.read_attributes"
        )
    if clips.shape[2] != clips.shape[3]:
        raise UserError(f"the oracle reads square frames, got {clips.shape[2]}x{clips.shape[3]}")
    if clips.dtype != np.uint8:
        raise UserError(
            f"clips must be uint8 in [0, 255], got dtype {clips.dtype}; convert [-1, 1] floats "
            "with np.clip(np.rint((clips + 1) * 127.5), 0, 255).astype(np.uint8)"
        )
    return clips


def read_clips(clips: np.ndarray) -> VideoReading:
    """Reads the six attributes of each moving-shapes clip: uint8 (N, T, S, S, 3) -> VideoReading.

    1. every frame through `shapes_oracle.read_attributes` (shape, colour, background, area,
       and the centroid its template placement came from);
    2. the clip's shape, colour and background: the most frequent per-frame reading;
    3. per frame, the radius that the area implies for the clip's shape and the bounding-box
       centre that the centroid implies (`shapes_oracle.unit_shape_moments`);
    4. size from the mean radius; motion and speed from the fitted displacement and relative
       radius change (`classify_motion`).
    """
    clips = check_clips(clips)
    count, frames = clips.shape[:2]
    if count == 0:
        empty = np.zeros(0, np.int64)
        empty_frames = np.zeros((0, frames), np.int64)
        return VideoReading(
            *(empty,) * 6,
            *(empty_frames,) * 3,
            np.zeros((0, frames, 2)),
            np.zeros((0, frames)),
            np.zeros((0, 2)),
            np.zeros(0),
            np.zeros(0),
        )
    flat = clips.reshape(count * frames, *clips.shape[2:])
    read = shapes_oracle.read_attributes(flat)
    per_frame = lambda values: values.reshape(count, frames, *values.shape[1:])
    frame_shape, frame_color = per_frame(read.shape), per_frame(read.color)
    frame_background = per_frame(read.background)

    unit_areas, unit_offsets = shapes_oracle.unit_shape_moments()
    centroid = per_frame(read.center + unit_offsets[read.shape] * read.radius[:, None])
    area = per_frame(read.area)
    shape = most_frequent(frame_shape, len(shapes_lib.SHAPES))
    radius = np.sqrt(area / unit_areas[shape][:, None])  # (N, T)
    center = centroid - unit_offsets[shape][:, None, :] * radius[..., None]  # (N, T, 2)
    mean_radius = radius.mean(axis=1)
    displacement = fitted_change(center)
    growth = fitted_change(radius) / np.maximum(mean_radius, 1e-6)
    motion, speed = classify_motion(displacement, growth)

    backgrounds = per_frame(shapes_oracle.estimate_background(flat))  # (N, T, 3)
    background_change = np.linalg.norm(np.diff(backgrounds, axis=1), axis=-1).mean(axis=1)
    return VideoReading(
        shape=shape,
        color=most_frequent(frame_color, len(shapes_lib.COLOR_NAMES)),
        size=(mean_radius >= SIZE_THRESHOLD).astype(np.int64),
        motion=motion,
        speed=speed,
        background=most_frequent(frame_background, len(shapes_lib.BACKGROUND_NAMES)),
        frame_shape=frame_shape,
        frame_color=frame_color,
        frame_background=frame_background,
        center=center,
        radius=radius,
        displacement=displacement,
        growth=growth,
        background_change=background_change,
    )


def label_indices(attribute: str, values) -> np.ndarray:
    """Labels of one attribute as indices into VOCABULARIES[attribute]: (N,) names or indices."""
    if attribute not in VOCABULARIES:
        raise UserError(f"unknown clip attribute {attribute!r}; valid: {list(ATTRIBUTES)}")
    vocabulary = VOCABULARIES[attribute]
    names = [shapes_lib.lookup(vocabulary, v, attribute) for v in np.asarray(values).tolist()]
    return np.array([vocabulary.index(name) for name in names], np.int64)


def video_accuracy(reading: VideoReading, labels: dict) -> dict[str, float]:
    """Fraction of clips read as labelled, per attribute in `labels` ((N,) names or indices),
    plus "all" when all six are given: shape, colour and background right in every frame and
    size, motion and speed right for the clip."""
    labels = {a: label_indices(a, v) for a, v in labels.items()}
    for attribute, values in labels.items():
        if values.shape != reading.shape.shape:
            raise UserError(
                f"{attribute} labels have shape {values.shape}, the reading has "
                f"{reading.shape.shape[0]} clips; give one label per clip"
            )
    result = {a: float(np.mean(getattr(reading, a) == v)) for a, v in labels.items()}
    if all(a in labels for a in ATTRIBUTES):
        result["all"] = float(np.mean(all_right(reading, labels)))
    return result


def all_right(reading: VideoReading, labels: dict) -> np.ndarray:
    """(N,) bool: each clip read as labelled in all six attributes (`labels`: (N,) names or
    indices of each), shape, colour and background in every frame."""
    labels = {a: label_indices(a, labels[a]) for a in ATTRIBUTES}
    every_frame = [
        np.all(getattr(reading, f"frame_{a}") == labels[a][:, None], axis=1)
        for a in FRAME_ATTRIBUTES
    ]
    per_clip = [getattr(reading, a) == labels[a] for a in ATTRIBUTES if a not in FRAME_ATTRIBUTES]
    return np.all(every_frame + per_clip, axis=0)


def temporal_consistency(reading: VideoReading) -> dict[str, float]:
    """Label-free: the fraction of clips whose shape and colour read the same in every frame,
    and the mean RGB distance (0..441) between the backgrounds of consecutive frames."""
    return {
        "consistency": float(np.mean(reading.consistent)),
        "background_change": float(np.mean(reading.background_change)),
    }
