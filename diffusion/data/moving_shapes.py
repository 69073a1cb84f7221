"""Moving shapes: an embedded TFDS dataset of short clips, one shape moving on a solid background.

The video counterpart of `diffusion.data.shapes` (the same shapes, colours, backgrounds and
anti-aliased drawing): each clip of T frames (8, or 16) shows one shape that moves left to right,
right to left, up, down or diagonally, or grows or shrinks, slowly or fast. Six attributes are
stored as ClassLabels and spelled in the caption ("a small red circle moves from left to right
slowly on a black background"), so a text-to-video model is scored attribute by attribute, motion
included. `test_unseen` holds (shape, motion) pairs that never occur in `train` or `test`.

Generated offline and deterministically from a seed, written as array_record; a clip is a raw
uint8 tensor (T, H, W, 3). `render_clip` is the pure single-clip entry point for evaluation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffusion.data.shapes import (
    BACKGROUND_NAMES,
    BACKGROUNDS,
    COLOR_NAMES,
    COLORS,
    SHAPES,
    SIZES,
    composite,
    coverage,
    lookup,
    with_articles,
)
from diffusion.errors import UserError

# ---------------------------------------------------------------------------------------------
# Attributes (ClassLabel names; their words appear in every caption)
# ---------------------------------------------------------------------------------------------

# Unit direction (x right, y down) of each translation; None: the shape grows or shrinks.
_DIAGONAL = float(np.sqrt(0.5))
MOTION_DIRECTIONS = {
    "left to right": (1.0, 0.0),
    "right to left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up and right": (_DIAGONAL, -_DIAGONAL),
    "down and left": (-_DIAGONAL, _DIAGONAL),
    "grow": None,
    "shrink": None,
}
MOTIONS = tuple(MOTION_DIRECTIONS)
SPEEDS = ("slow", "fast")
# (shape, motion) pairs held out of train and test; they make up the whole `test_unseen` split.
# One per shape, five different motions, so every shape and every motion still appears in train.
UNSEEN_PAIRS = (
    ("circle", "up"),
    ("square", "right to left"),
    ("triangle", "grow"),
    ("star", "left to right"),
    ("heart", "down and left"),
)
RESOLUTIONS = (32, 64)
FRAME_COUNTS = (8, 16)
SPLITS = ("train", "test", "test_unseen")

# ---------------------------------------------------------------------------------------------
# Geometry, in units of the image side (the image spans [0, 1] x [0, 1], y downwards)
# ---------------------------------------------------------------------------------------------

# Radius at the clip's middle frame: smaller than the still dataset's, to leave room to move.
SIZE_RADIUS = {"small": 0.09, "large": 0.15}
SIZE_JITTER = 0.05  # relative radius jitter, uniform in [1 - j, 1 + j]
EDGE_MARGIN = 0.02  # least gap between a shape's bounding box and the image border, every frame
# Distance a translation covers over the clip, and the relative radius change of grow / shrink
# (radius from r (1 - g) to r (1 + g), or back).
TRAVEL = {"slow": 0.25, "fast": 0.5}
GROWTH = {"slow": 0.25, "fast": 0.5}


def _largest_radius(size: str, motion: str, speed: str) -> float:
    growth = GROWTH[speed] if MOTION_DIRECTIONS[motion] is None else 0.0
    return SIZE_RADIUS[size] * (1 + SIZE_JITTER) * (1 + growth)


def trajectory(
    size: str, motion: str, speed: str, uniforms: np.ndarray, frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """Centres (T, 2) as (x, y) and radii (T,) of one clip; `uniforms` (3,) in [0, 1) place the
    path (x, y) and jitter the radius. Every frame's bounding box stays EDGE_MARGIN inside."""
    direction = MOTION_DIRECTIONS[motion]
    radius = SIZE_RADIUS[size] * (1 + SIZE_JITTER * (2 * uniforms[2] - 1))
    low = EDGE_MARGIN + _largest_radius(size, motion, speed)
    high = 1.0 - low
    progress = np.linspace(0.0, 1.0, frames)  # (T,)
    if direction is None:  # grow / shrink in place
        start = low + uniforms[:2] * (high - low)
        centers = np.repeat(start[None], frames, axis=0)
        growth = GROWTH[speed] * (2 * progress - 1)  # -g .. g
        radii = radius * (1 + (growth if motion == "grow" else -growth))
        return centers, radii
    step = TRAVEL[speed] * np.asarray(direction)  # (2,) displacement over the clip
    lowest = low + np.maximum(-step, 0.0)  # where the path may start on each axis
    highest = high - np.maximum(step, 0.0)
    start = lowest + uniforms[:2] * (highest - lowest)
    centers = start[None] + progress[:, None] * step[None]
    return centers, np.full(frames, radius)


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def render_clips(
    shape: np.ndarray,
    color: np.ndarray,
    background: np.ndarray,
    centers: np.ndarray,
    radii: np.ndarray,
    resolution: int,
) -> np.ndarray:
    """N clips of T frames: shape / color / background (N,) indices, centers (N, T, 2), radii
    (N, T) -> uint8 (N, T, resolution, resolution, 3)."""
    count, frames = radii.shape
    alpha = coverage(
        np.repeat(shape, frames), centers.reshape(-1, 2), radii.reshape(-1), resolution
    )
    color_table = np.array(list(COLORS.values()), np.float32)
    background_table = np.array(list(BACKGROUNDS.values()), np.float32)
    images = composite(
        alpha,
        np.repeat(color_table[color], frames, axis=0),
        np.repeat(background_table[background], frames, axis=0),
    )
    return images.reshape(count, frames, resolution, resolution, 3)


def render_clip(
    shape: str | int,
    color: str | int,
    size: str | int,
    motion: str | int,
    speed: str | int,
    background: str | int,
    rng: np.random.Generator,
    resolution: int = 32,
    frames: int = 8,
) -> np.ndarray:
    """One clip, uint8 (frames, resolution, resolution, 3), of attributes given by name (or index)
    as in `shapes.render`; `rng` draws its 3 placement uniforms."""
    shape, color, size = (
        lookup(SHAPES, shape, "shape"),
        lookup(COLOR_NAMES, color, "color"),
        lookup(SIZES, size, "size"),
    )
    motion, speed = lookup(MOTIONS, motion, "motion"), lookup(SPEEDS, speed, "speed")
    background = lookup(BACKGROUND_NAMES, background, "background")
    centers, radii = trajectory(size, motion, speed, rng.random(3), frames)
    index = lambda vocabulary, value: np.array([vocabulary.index(value)])
    return render_clips(
        index(SHAPES, shape),
        index(COLOR_NAMES, color),
        index(BACKGROUND_NAMES, background),
        centers[None],
        radii[None],
        resolution,
    )[0]


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

_PREFIXES = ("", "a video of ", "a clip of ", "an animation of ")
_ADVERBS = {"slow": ("slowly",), "fast": ("quickly", "fast")}
_MOTION_PHRASES = {
    "left to right": "moves from left to right {adverb}",
    "right to left": "moves from right to left {adverb}",
    "up": "moves up {adverb}",
    "down": "moves down {adverb}",
    "up and right": "moves diagonally up and to the right {adverb}",
    "down and left": "moves diagonally down and to the left {adverb}",
    "grow": "grows {adverb}",
    "shrink": "shrinks {adverb}",
}
# Templates 0, 2 and 4 name the background; 1 and 3 leave it open. A prefix ("a video of")
# only where a relative clause follows.
_TEMPLATES = (
    "{a} {size} {color} {shape} {motion} on a {bg} background",
    "{a} {size} {color} {shape} {motion}",
    "on a {bg} background, {a} {size} {color} {shape} {motion}",
    "{prefix}{a} {color} {shape} of {size} size that {motion}",
    "{prefix}{a} {size} {color} {shape} that {motion} on a {bg} background",
)
_NAMES_BACKGROUND = (0, 2, 4)


def make_caption(
    shape: str,
    color: str,
    size: str,
    motion: str,
    speed: str,
    background: str,
    template: int,
    prefix: int,
) -> str:
    """The caption of one clip; template / prefix index _TEMPLATES / _PREFIXES (mod len), and
    the template index also picks the speed's adverb."""
    adverbs = _ADVERBS[speed]
    phrase = _MOTION_PHRASES[motion].format(adverb=adverbs[template % len(adverbs)])
    text = _TEMPLATES[template % len(_TEMPLATES)].format(
        prefix=_PREFIXES[prefix % len(_PREFIXES)],
        a="{a}",
        size=size,
        color=color,
        shape=shape,
        motion=phrase,
        bg=background,
    )
    return with_articles(text)


def caption_names_background(template: int) -> bool:
    return template % len(_TEMPLATES) in _NAMES_BACKGROUND


# ---------------------------------------------------------------------------------------------
# Sampling attributes
# ---------------------------------------------------------------------------------------------


# Per colour, the backgrounds that differ from it (a white shape never sits on white).
_ALLOWED_BACKGROUNDS = [
    tuple(b for b, name in enumerate(BACKGROUND_NAMES) if name != color) for color in COLOR_NAMES
]


def split_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """The (shape, motion) pairs a split draws from."""
    if split not in SPLITS:
        raise UserError(f"Unknown moving_shapes split {split!r}; valid: {list(SPLITS)}")
    if split == "test_unseen":
        return UNSEEN_PAIRS
    unseen = set(UNSEEN_PAIRS)
    return tuple((s, m) for s in SHAPES for m in MOTIONS if (s, m) not in unseen)


def generate_examples(
    split: str, count: int, resolution: int, frames: int, seed: int, chunk_size: int = 256
) -> Iterator[tuple[int, dict]]:
    """Yields (index, example) for one split; chunk c is drawn from rng([seed, split, c]), so
    the result depends only on (seed, split, count, resolution, frames)."""
    split_id = SPLITS.index(split)
    pairs = split_pairs(split)
    for first in range(0, count, chunk_size):
        rng = np.random.default_rng([seed, split_id, first // chunk_size])
        n = min(chunk_size, count - first)
        pair = rng.integers(len(pairs), size=n)
        color = rng.integers(len(COLOR_NAMES), size=n)
        size = rng.integers(len(SIZES), size=n)
        speed = rng.integers(len(SPEEDS), size=n)
        allowed = [_ALLOWED_BACKGROUNDS[c] for c in color]  # a uniform one of those allowed
        picks = zip(allowed, rng.random(n), strict=True)
        background = np.array([a[int(u * len(a))] for a, u in picks])
        uniforms = rng.random((n, 3))
        template = rng.integers(len(_TEMPLATES), size=n)
        prefix = rng.integers(len(_PREFIXES), size=n)
        names = [
            dict(
                shape=pairs[pair[i]][0],
                color=COLOR_NAMES[color[i]],
                size=SIZES[size[i]],
                motion=pairs[pair[i]][1],
                speed=SPEEDS[speed[i]],
                background=BACKGROUND_NAMES[background[i]],
            )
            for i in range(n)
        ]
        paths = [
            trajectory(e["size"], e["motion"], e["speed"], uniforms[i], frames)
            for i, e in enumerate(names)
        ]
        clips = render_clips(
            np.array([SHAPES.index(e["shape"]) for e in names]),
            color,
            background,
            np.stack([centers for centers, _ in paths]),
            np.stack([radii for _, radii in paths]),
            resolution,
        )
        for i, example in enumerate(names):
            caption = make_caption(**example, template=int(template[i]), prefix=int(prefix[i]))
            yield first + i, {"video": clips[i], "caption": caption, **example}


# ---------------------------------------------------------------------------------------------
# The TFDS builder
# ---------------------------------------------------------------------------------------------

DEFAULT_NUM_EXAMPLES = {"train": 20_000, "test": 1_000, "test_unseen": 1_000}


@dataclasses.dataclass(kw_only=True)
class MovingShapesConfig(tfds.core.BuilderConfig):
    """Resolution, frames per clip, split sizes and seed of one version of the dataset."""

    resolution: int = 32
    frames: int = 8
    num_train: int = DEFAULT_NUM_EXAMPLES["train"]
    num_test: int = DEFAULT_NUM_EXAMPLES["test"]
    num_test_unseen: int = DEFAULT_NUM_EXAMPLES["test_unseen"]
    seed: int = 0

    def num_examples(self, split: str) -> int:
        return {"train": self.num_train, "test": self.num_test}.get(split, self.num_test_unseen)


def moving_shapes_config(
    resolution: int = 32,
    frames: int = 8,
    *,
    num_train: int = DEFAULT_NUM_EXAMPLES["train"],
    num_test: int = DEFAULT_NUM_EXAMPLES["test"],
    num_test_unseen: int = DEFAULT_NUM_EXAMPLES["test_unseen"],
    seed: int = 0,
) -> MovingShapesConfig:
    """A builder config named "<resolution>_<frames>" for the defaults, else with every field
    spelled out ("32_8_n300-50-50_s0"), so versions live side by side under one data_dir."""
    if resolution not in RESOLUTIONS:
        raise UserError(f"Unsupported moving_shapes resolution {resolution}; valid: {RESOLUTIONS}")
    if frames not in FRAME_COUNTS:
        raise UserError(f"Unsupported moving_shapes frames {frames}; valid: {FRAME_COUNTS}")
    sizes = (num_train, num_test, num_test_unseen)
    if min(sizes) < 1:
        raise UserError(f"every split needs >= 1 example, got (train, test, test_unseen) {sizes}")
    name = f"{resolution}_{frames}"
    if sizes != tuple(DEFAULT_NUM_EXAMPLES.values()) or seed != 0:
        name += f"_n{'-'.join(map(str, sizes))}_s{seed}"
    return MovingShapesConfig(
        name=name,
        description=f"{frames} frames of {resolution}x{resolution} RGB, {sizes} clips, seed {seed}",
        resolution=resolution,
        frames=frames,
        num_train=num_train,
        num_test=num_test,
        num_test_unseen=num_test_unseen,
        seed=seed,
    )


_CONFIG_NAME = re.compile(
    r"(?P<resolution>\d+)_(?P<frames>\d+)(_n(?P<sizes>\d+-\d+-\d+)_s(?P<seed>\d+))?"
)


def config_from_name(name: str) -> MovingShapesConfig:
    """Inverse of `moving_shapes_config(...).name`."""
    match = _CONFIG_NAME.fullmatch(name)
    if match is None:
        raise UserError(
            f"Bad moving_shapes config name {name!r}; expected '<resolution>_<frames>' such as "
            "'32_8', or '32_8_n<train>-<test>-<test_unseen>_s<seed>'"
        )
    resolution, frames = int(match["resolution"]), int(match["frames"])
    if match["sizes"] is None:
        return moving_shapes_config(resolution, frames)
    num_train, num_test, num_test_unseen = map(int, match["sizes"].split("-"))
    return moving_shapes_config(
        resolution,
        frames,
        num_train=num_train,
        num_test=num_test,
        num_test_unseen=num_test_unseen,
        seed=int(match["seed"]),
    )


class MovingShapes(tfds.core.GeneratorBasedBuilder):
    """Captioned clips of moving shapes (registered with TFDS as "moving_shapes")."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [moving_shapes_config(r, f) for r in RESOLUTIONS for f in FRAME_COUNTS]
    DEFAULT_BUILDER_CONFIG_NAME = "32_8"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)  # as in shapes.Shapes: no importlib_resources probe

    def __init__(self, *, config=None, file_format=None, **kwargs):
        if isinstance(config, MovingShapesConfig) and config.name in self.builder_configs:
            config = config.name  # TFDS refuses a new object named like a built-in config
        if isinstance(config, str) and config not in self.builder_configs:
            config = config_from_name(config)
        super().__init__(config=config, file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Tensor(
                        shape=(c.frames, c.resolution, c.resolution, 3),
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.BYTES,
                    ),
                    "caption": tfds.features.Text(),
                    "shape": tfds.features.ClassLabel(names=SHAPES),
                    "color": tfds.features.ClassLabel(names=COLOR_NAMES),
                    "size": tfds.features.ClassLabel(names=SIZES),
                    "motion": tfds.features.ClassLabel(names=MOTIONS),
                    "speed": tfds.features.ClassLabel(names=SPEEDS),
                    "background": tfds.features.ClassLabel(names=BACKGROUND_NAMES),
                }
            ),
            supervised_keys=("video", "caption"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated offline
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        c = self.builder_config
        yield from generate_examples(split, c.num_examples(split), c.resolution, c.frames, c.seed)
