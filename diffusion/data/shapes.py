"""Captioned shapes: an embedded TFDS dataset of one filled shape on a solid background.

Every example is drawn from five attributes (shape, color, size, position on a 3x3 grid,
background) that are stored both as ClassLabels and inside a caption, so a text-to-image model
can be scored attribute by attribute. The `test_unseen` split holds (color, shape) pairs that
never occur in `train`, to measure compositional generalisation.

The builder is generated offline and deterministically from a seed, written as array_record and
read back with `builder.as_data_source()`; nothing here needs TensorFlow. Images are stored as a
raw uint8 tensor (zstd-compressed by array_record): smaller on disk than PNG for these flat
images, and decoding is a `np.frombuffer` instead of a PNG decode.

Drawing is vectorised numpy over a batch of images. Each shape is a signed distance field (SDF)
in image units and the coverage of a pixel is `clip(0.5 - sdf / pixel, 0, 1)`: the standard
analytic anti-aliasing of a box-filtered edge, 16x cheaper than 4x4 supersampling at the same
edge quality. `render` is the pure single-image entry point the evaluation oracle uses.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffusion.errors import UserError

# ---------------------------------------------------------------------------------------------
# Attribute vocabularies (the ClassLabel names; their words appear verbatim in every caption)
# ---------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
    "cyan": (30, 205, 225),
    "white": (255, 255, 255),
}
SIZES = ("small", "large")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
# (color, shape) pairs held out of train and test; they make up the whole `test_unseen` split.
# One pair per shape (plus one) so every shape and every color still appears in train.
UNSEEN_PAIRS = (
    ("red", "star"),
    ("green", "triangle"),
    ("blue", "heart"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "triangle"),
)
RESOLUTIONS = (16, 32, 64)
SPLITS = ("train", "test", "test_unseen")

COLOR_NAMES = tuple(COLORS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)

# ---------------------------------------------------------------------------------------------
# Geometry, in units of the image side (the image spans [0, 1] x [0, 1], y downwards)
# ---------------------------------------------------------------------------------------------

# Half-extent of a shape's bounding box. Large is 1.75x small (area ratio > 2.4 even after size
# jitter), so an oracle separates the two from the area alone.
SIZE_RADIUS = {"small": 0.16, "large": 0.28}
SIZE_JITTER = 0.05  # relative radius jitter, uniform in [1 - j, 1 + j]
EDGE_MARGIN = 0.02  # least gap between a shape's bounding box and the image border
POSITION_JITTER = 0.2  # uniform centre jitter, as a fraction of the distance between cells
# Grid cell of each position as (row, column) offsets from the centre, in {-1, 0, 1}.
POSITION_OFFSETS = {name: (i // 3 - 1, i % 3 - 1) for i, name in enumerate(POSITIONS)}


def cell_spacing(size: str) -> float:
    """Distance between neighbouring grid-cell centres for a shape of this size: the largest
    that keeps the biggest jittered shape in the outermost jittered cell inside the margin."""
    largest_radius = SIZE_RADIUS[size] * (1 + SIZE_JITTER)
    return (0.5 - EDGE_MARGIN - largest_radius) / (1 + POSITION_JITTER)


def position_center(position: str, size: str) -> tuple[float, float]:
    """Nominal (x, y) centre of a grid cell for a shape of this size (before jitter)."""
    row, col = POSITION_OFFSETS[position]
    spacing = cell_spacing(size)
    return 0.5 + col * spacing, 0.5 + row * spacing


# ---------------------------------------------------------------------------------------------
# Signed distance fields. Arguments: local coordinates (x right, y UP) divided by the radius,
# shape (N, P) for N images and P pixels; the result is in the same units (negative inside).
# ---------------------------------------------------------------------------------------------


def _sdf_circle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y) - 1.0


def _sdf_box(x: np.ndarray, y: np.ndarray, half_side: float) -> np.ndarray:
    """Exact SDF of an axis-aligned square (Quilez, "2D distance functions")."""
    qx, qy = np.abs(x) - half_side, np.abs(y) - half_side
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _sdf_square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # 0.8 keeps the square's area (2.56 r^2) close to the circle's and the heart's.
    return _sdf_box(x, y, 0.8)


def _sdf_segment(x, y, ax, ay, bx, by) -> np.ndarray:
    """Unsigned distance from (x, y) to the segment from (ax, ay) to (bx, by)."""
    ex, ey = bx - ax, by - ay
    t = np.clip(((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    return np.sqrt((x - ax - t * ex) ** 2 + (y - ay - t * ey) ** 2)


_TRIANGLE = ((0.0, 0.9), (1.0, -0.9), (-1.0, -0.9))  # clockwise: apex up, base y = -0.9


def _sdf_triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Isosceles triangle, apex up: exact SDF (distance to the nearest edge, negative inside).

    The max of the edge-line distances alone would be exact only inside; outside it overshoots
    by up to a pixel past the acute corners, which would leak coverage beyond the shape.
    """
    distance, outside = None, None
    for (ax, ay), (bx, by) in zip(_TRIANGLE, _TRIANGLE[1:] + _TRIANGLE[:1], strict=True):
        edge = _sdf_segment(x, y, ax, ay, bx, by)
        # Clockwise vertices: the interior lies to the right of each edge (cross product < 0).
        right_of_edge = (bx - ax) * (y - ay) - (by - ay) * (x - ax) < 0.0
        distance = edge if distance is None else np.minimum(distance, edge)
        outside = ~right_of_edge if outside is None else outside | ~right_of_edge
    return np.where(outside, distance, -distance)


_STAR_POINTS = 5
_STAR_INNER = 0.5  # inner / outer radius: a fat star stays recognisable at 32x32
_STAR_SHIFT = (1.0 - np.cos(np.pi / _STAR_POINTS)) / 2  # centres the bounding box vertically


def _sdf_star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Regular five-pointed star, one tip up: fold into one wedge, distance to one edge."""
    y = y + _STAR_SHIFT
    wedge = np.pi / _STAR_POINTS  # half the angle between tips
    angle = np.arctan2(x, y)  # 0 = up
    angle = np.abs(np.mod(angle + wedge, 2 * wedge) - wedge)  # fold into [0, wedge]
    radius = np.sqrt(x * x + y * y)
    px, py = radius * np.sin(angle), radius * np.cos(angle)
    # Edge from the tip A = (0, 1) to the inner vertex B = r_in * (sin w, cos w).
    bx, by = _STAR_INNER * np.sin(wedge), _STAR_INNER * np.cos(wedge)
    distance = _sdf_segment(px, py, 0.0, 1.0, bx, by)
    # Inside when on the centre's side of line AB (the cross products have equal signs).
    cross = bx * (py - 1.0) - (by - 1.0) * px
    return np.where(cross < 0.0, -distance, distance)


# Heart = a square turned 45 degrees plus two discs on its upper edges (a classic construction).
_HEART_HALF_DIAGONAL = 1.0 / (0.5 + np.sqrt(0.5))  # widest half-extent (1.207 h) = 1
_HEART_DROP = 0.5 * (0.5 + np.sqrt(0.5) - 1.0) * _HEART_HALF_DIAGONAL  # centres the box


def _sdf_heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    h = _HEART_HALF_DIAGONAL
    y = y + _HEART_DROP
    # Rotate by 45 degrees so the diamond becomes an axis-aligned square of half-side h / sqrt 2.
    u, v = (x + y) * np.sqrt(0.5), (y - x) * np.sqrt(0.5)
    diamond = _sdf_box(u, v, h * np.sqrt(0.5))
    disc_radius = h * np.sqrt(0.5)
    left = np.sqrt((x + h / 2) ** 2 + (y - h / 2) ** 2) - disc_radius
    right = np.sqrt((x - h / 2) ** 2 + (y - h / 2) ** 2) - disc_radius
    return np.minimum(diamond, np.minimum(left, right))


SHAPE_SDFS = {
    "circle": _sdf_circle,
    "square": _sdf_square,
    "triangle": _sdf_triangle,
    "star": _sdf_star,
    "heart": _sdf_heart,
}


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def coverage(
    shape_ids: np.ndarray, centers: np.ndarray, radii: np.ndarray, resolution: int
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a batch of shapes, shape (N, res, res).

    shape_ids: (N,) indices into SHAPES; centers: (N, 2) as (x, y) in image units; radii: (N,).
    """
    pixel = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    grid_y, grid_x = np.meshgrid(pixel, pixel, indexing="ij")
    grid_x, grid_y = grid_x.reshape(1, -1), grid_y.reshape(1, -1)  # (1, P)
    out = np.zeros((len(shape_ids), resolution * resolution), np.float32)
    for shape_index, shape in enumerate(SHAPES):
        rows = np.flatnonzero(shape_ids == shape_index)
        if rows.size == 0:
            continue
        radius = radii[rows, None].astype(np.float32)  # (n, 1)
        x = (grid_x - centers[rows, 0:1]) / radius  # (n, P)
        y = (centers[rows, 1:2] - grid_y) / radius  # (n, P), y up
        distance_in_pixels = SHAPE_SDFS[shape](x, y) * radius * resolution
        out[rows] = np.clip(0.5 - distance_in_pixels, 0.0, 1.0)
    return out.reshape(-1, resolution, resolution)


def composite(alpha: np.ndarray, colors: np.ndarray, backgrounds: np.ndarray) -> np.ndarray:
    """Blend (N, H, W) coverage of (N, 3) colors over (N, 3) backgrounds -> uint8 (N, H, W, 3)."""
    alpha = alpha[..., None]
    image = colors[:, None, None, :] * alpha + backgrounds[:, None, None, :] * (1.0 - alpha)
    return np.rint(image).astype(np.uint8)


def _jittered_geometry(
    sizes: Sequence[str], positions: Sequence[str], uniforms: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Centres (N, 2) and radii (N,) from attributes and (N, 3) uniforms in [-1, 1]."""
    base_radius = np.array([SIZE_RADIUS[s] for s in sizes])
    spacing = np.array([cell_spacing(s) for s in sizes])
    offsets = np.array([POSITION_OFFSETS[p] for p in positions], dtype=np.float64)  # (row, col)
    centers = 0.5 + (offsets[:, ::-1] + POSITION_JITTER * uniforms[:, :2]) * spacing[:, None]
    radii = base_radius * (1.0 + SIZE_JITTER * uniforms[:, 2])
    return centers, radii


def lookup(vocabulary: Sequence[str], value: str | int, attribute: str) -> str:
    """The name of `value` (a name or an index) in `vocabulary`; a UserError names a bad one."""
    if isinstance(value, (int, np.integer)):
        if not 0 <= value < len(vocabulary):
            raise UserError(f"{attribute} index {value} out of range 0..{len(vocabulary) - 1}")
        return vocabulary[int(value)]
    if value not in vocabulary:
        raise UserError(f"Unknown {attribute} {value!r}; valid: {list(vocabulary)}")
    return value


def render(
    shape: str | int,
    color: str | int,
    size: str | int,
    position: str | int,
    background: str | int,
    rng: np.random.Generator,
    resolution: int = 32,
) -> np.ndarray:
    """Draws one example: a (resolution, resolution, 3) uint8 image.

    Attributes are names (or indices) from SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS; `rng`
    draws the position and size jitter (three uniforms), so the same generator state gives the
    same image. This is the evaluation oracle's reference renderer.
    """
    shape = lookup(SHAPES, shape, "shape")
    color = lookup(COLOR_NAMES, color, "color")
    size = lookup(SIZES, size, "size")
    position = lookup(POSITIONS, position, "position")
    background = lookup(BACKGROUND_NAMES, background, "background")
    centers, radii = _jittered_geometry([size], [position], rng.uniform(-1.0, 1.0, size=(1, 3)))
    alpha = coverage(np.array([SHAPES.index(shape)]), centers, radii, resolution)
    colors = np.array([COLORS[color]], np.float32)
    backgrounds = np.array([BACKGROUNDS[background]], np.float32)
    return composite(alpha, colors, backgrounds)[0]


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

_PREFIXES = ("", "a photo of ", "an image of ", "a picture of ", "a drawing of ", "a render of ")
POSITION_PHRASES = {
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
}
# Placeholders: {a} article for the next word, {prefix}, {size}, {color}, {shape}, {bg},
# {where} (a phrase that contains the position words), {pos} (the bare position words).
_TEMPLATES = (
    "{prefix}{a} {size} {color} {shape} {where}",
    "{size} {color} {shape}, {pos}, {bg} background",
    "{prefix}{a} {size} {color} {shape} on a {bg} background, {where}",
    "{where}, {a} {size} {color} {shape}",
    "{prefix}{a} {color} {shape} that is {size}, {where}",
    "{prefix}{a} {size} {shape} in {color} {where} on a {bg} background",
    "{color} {shape}, {size}, {pos} of the image",
    "{prefix}{a} {size} {color} {shape} placed {where} against a {bg} background",
)


def with_articles(text: str) -> str:
    """Replaces each '{a}' marker by 'a' or 'an' to agree with the following word."""
    words = text.split(" ")
    for i, word in enumerate(words[:-1]):
        if word == "{a}":
            words[i] = "an" if words[i + 1][:1] in tuple("aeiou") else "a"
    return " ".join(words)


def make_caption(
    shape: str, color: str, size: str, position: str, background: str, template: int, prefix: int
) -> str:
    """The caption of one example; template / prefix index _TEMPLATES / _PREFIXES (mod len)."""
    text = _TEMPLATES[template % len(_TEMPLATES)].format(
        prefix=_PREFIXES[prefix % len(_PREFIXES)],
        a="{a}",
        size=size,
        color=color,
        shape=shape,
        bg=background,
        where=POSITION_PHRASES[position],
        pos=position,
    )
    return with_articles(text)


# ---------------------------------------------------------------------------------------------
# Sampling attributes
# ---------------------------------------------------------------------------------------------


def split_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """The (color, shape) pairs a split draws from."""
    if split not in SPLITS:
        raise UserError(f"Unknown shapes split {split!r}; valid: {list(SPLITS)}")
    if split == "test_unseen":
        return UNSEEN_PAIRS
    unseen = set(UNSEEN_PAIRS)
    return tuple((c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in unseen)


def _allowed_backgrounds(color: str) -> tuple[int, ...]:
    return tuple(i for i, b in enumerate(BACKGROUND_NAMES) if b != color)


@dataclasses.dataclass(frozen=True)
class AttributeBatch:
    """Indices into the vocabularies for N examples, plus jitter uniforms and caption choices."""

    shape: np.ndarray
    color: np.ndarray
    size: np.ndarray
    position: np.ndarray
    background: np.ndarray
    jitter: np.ndarray  # (N, 3) uniforms in [-1, 1]: x, y, radius
    template: np.ndarray
    prefix: np.ndarray


def sample_attributes(split: str, count: int, rng: np.random.Generator) -> AttributeBatch:
    """Draws `count` examples' attributes: a uniform allowed (color, shape) pair, uniform size
    and position, a uniform background among those that differ from the color."""
    pairs = split_pairs(split)
    pair = rng.integers(len(pairs), size=count)
    color = np.array([COLOR_NAMES.index(pairs[i][0]) for i in range(len(pairs))])[pair]
    shape = np.array([SHAPES.index(pairs[i][1]) for i in range(len(pairs))])[pair]
    # Background: a uniform pick among the allowed ones of each color.
    allowed = [_allowed_backgrounds(c) for c in COLOR_NAMES]
    counts = np.array([len(a) for a in allowed])[color]
    pick = np.floor(rng.random(count) * counts).astype(np.int64)
    table = np.array([a + (a[0],) * (len(BACKGROUND_NAMES) - len(a)) for a in allowed])
    background = table[color, pick]
    return AttributeBatch(
        shape=shape,
        color=color,
        size=rng.integers(len(SIZES), size=count),
        position=rng.integers(len(POSITIONS), size=count),
        background=background,
        jitter=rng.uniform(-1.0, 1.0, size=(count, 3)),
        template=rng.integers(len(_TEMPLATES), size=count),
        prefix=rng.integers(len(_PREFIXES), size=count),
    )


def render_attributes(attributes: AttributeBatch, resolution: int) -> np.ndarray:
    """Draws a batch of examples: uint8 (N, resolution, resolution, 3)."""
    sizes = [SIZES[i] for i in attributes.size]
    positions = [POSITIONS[i] for i in attributes.position]
    centers, radii = _jittered_geometry(sizes, positions, attributes.jitter)
    alpha = coverage(attributes.shape, centers, radii, resolution)
    color_table = np.array(list(COLORS.values()), np.float32)
    background_table = np.array(list(BACKGROUNDS.values()), np.float32)
    return composite(alpha, color_table[attributes.color], background_table[attributes.background])


def generate_examples(
    split: str, count: int, resolution: int, seed: int, chunk_size: int = 1024
) -> Iterator[tuple[int, dict]]:
    """Yields (index, example) for one split; chunk c is drawn from rng([seed, split, c]),
    so the result depends only on (seed, split, count, resolution)."""
    split_id = SPLITS.index(split)
    for start in range(0, count, chunk_size):
        rng = np.random.default_rng([seed, split_id, start // chunk_size])
        attributes = sample_attributes(split, min(chunk_size, count - start), rng)
        images = render_attributes(attributes, resolution)
        for i, image in enumerate(images):
            names = {
                "shape": SHAPES[attributes.shape[i]],
                "color": COLOR_NAMES[attributes.color[i]],
                "size": SIZES[attributes.size[i]],
                "position": POSITIONS[attributes.position[i]],
                "background": BACKGROUND_NAMES[attributes.background[i]],
            }
            caption = make_caption(
                **names, template=int(attributes.template[i]), prefix=int(attributes.prefix[i])
            )
            yield start + i, {"image": image, "caption": caption, **names}


# ---------------------------------------------------------------------------------------------
# The TFDS builder
# ---------------------------------------------------------------------------------------------

DEFAULT_NUM_EXAMPLES = {"train": 100_000, "test": 2_000, "test_unseen": 2_000}


@dataclasses.dataclass(kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
    """Resolution, split sizes and seed of one version of the dataset."""

    resolution: int = 32
    num_train: int = DEFAULT_NUM_EXAMPLES["train"]
    num_test: int = DEFAULT_NUM_EXAMPLES["test"]
    num_test_unseen: int = DEFAULT_NUM_EXAMPLES["test_unseen"]
    seed: int = 0

    def num_examples(self, split: str) -> int:
        return {"train": self.num_train, "test": self.num_test}.get(split, self.num_test_unseen)


def shapes_config(
    resolution: int = 32,
    *,
    num_train: int = DEFAULT_NUM_EXAMPLES["train"],
    num_test: int = DEFAULT_NUM_EXAMPLES["test"],
    num_test_unseen: int = DEFAULT_NUM_EXAMPLES["test_unseen"],
    seed: int = 0,
) -> ShapesConfig:
    """A builder config; its name is the resolution for the defaults, else it spells out every
    field, so differently sized versions live side by side under one data_dir."""
    if resolution not in RESOLUTIONS:
        raise UserError(f"Unsupported shapes resolution {resolution}; valid: {RESOLUTIONS}")
    for field, value in [("num_train", num_train), ("num_test", num_test)]:
        if value < 1:
            raise UserError(f"{field} must be >= 1, got {value}")
    if num_test_unseen < 1:
        raise UserError(f"num_test_unseen must be >= 1, got {num_test_unseen}")
    sizes = (num_train, num_test, num_test_unseen)
    is_default = sizes == tuple(DEFAULT_NUM_EXAMPLES.values()) and seed == 0
    name = str(resolution) if is_default else f"{resolution}_n{'-'.join(map(str, sizes))}_s{seed}"
    return ShapesConfig(
        name=name,
        description=f"{resolution}x{resolution} RGB, {sizes} examples, seed {seed}",
        resolution=resolution,
        num_train=num_train,
        num_test=num_test,
        num_test_unseen=num_test_unseen,
        seed=seed,
    )


_CONFIG_NAME = re.compile(r"(?P<resolution>\d+)(_n(?P<sizes>\d+-\d+-\d+)_s(?P<seed>\d+))?")


def config_from_name(name: str) -> ShapesConfig:
    """Inverse of `shapes_config(...).name`, so "shapes/32_n300-50-50_s0" is a valid TFDS name."""
    match = _CONFIG_NAME.fullmatch(name)
    if match is None:
        raise UserError(
            f"Bad shapes config name {name!r}; expected '<resolution>' such as '32' or "
            "'<resolution>_n<train>-<test>-<test_unseen>_s<seed>' such as '32_n300-50-50_s0'"
        )
    if match["sizes"] is None:
        return shapes_config(int(match["resolution"]))
    num_train, num_test, num_test_unseen = map(int, match["sizes"].split("-"))
    return shapes_config(
        int(match["resolution"]),
        num_train=num_train,
        num_test=num_test,
        num_test_unseen=num_test_unseen,
        seed=int(match["seed"]),
    )


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Captioned shapes (registered with TFDS as "shapes")."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [shapes_config(r) for r in RESOLUTIONS]
    DEFAULT_BUILDER_CONFIG_NAME = "32"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9's default probes the `importlib_resources` backport (needed only on
        # Python < 3.9, so not installed) for any builder that lives in a package.
        return epath.Path(__file__)

    def __init__(self, *, config: str | ShapesConfig | None = None, file_format=None, **kwargs):
        if isinstance(config, ShapesConfig) and config.name in self.builder_configs:
            config = config.name  # TFDS refuses a new object named like a built-in config
        if isinstance(config, str) and config not in self.builder_configs:
            config = config_from_name(config)  # any resolution / size / seed by name
        # array_record gives random access through `as_data_source`, without TensorFlow.
        super().__init__(config=config, file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        resolution = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(resolution, resolution, 3),
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.BYTES,
                    ),
                    "caption": tfds.features.Text(),
                    "shape": tfds.features.ClassLabel(names=SHAPES),
                    "color": tfds.features.ClassLabel(names=COLOR_NAMES),
                    "size": tfds.features.ClassLabel(names=SIZES),
                    "position": tfds.features.ClassLabel(names=POSITIONS),
                    "background": tfds.features.ClassLabel(names=BACKGROUND_NAMES),
                }
            ),
            supervised_keys=("image", "caption"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated offline
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        yield from generate_examples(
            split, config.num_examples(split), config.resolution, config.seed
        )
