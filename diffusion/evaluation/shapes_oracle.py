"""The shapes attribute oracle: shape, color, size, position and background read back from uint8
images with plain numpy, by fitting the dataset's own shape templates to a soft coverage map
(`diffusion.data.shapes.coverage`), so generated images are scored attribute by attribute.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np

from diffusion.data import shapes as shapes_lib

ATTRIBUTES = ("shape", "color", "size", "position", "background")
# The four attributes a prompt asks for; "all four right" is the headline accuracy.
PROMPTED_ATTRIBUTES = ("shape", "color", "size", "position")
VOCABULARIES = {
    "shape": shapes_lib.SHAPES,
    "color": shapes_lib.COLOR_NAMES,
    "size": shapes_lib.SIZES,
    "position": shapes_lib.POSITIONS,
    "background": shapes_lib.BACKGROUND_NAMES,
}

# A pixel belongs to the shape's core when its distance from the background colour is at least
# this fraction of the largest distance in the image: mostly fully covered pixels, whose mean
# is the foreground colour.
_CORE_FRACTION = 0.75
# Below this RGB distance between the brightest foreground pixel and the background there is no
# visible shape; the reading is then meaningless (but still defined).
_MIN_CONTRAST = 16.0
# Radius that separates "small" from "large": the geometric mean of the two nominal radii, far
# from both jittered ranges ([0.152, 0.168] and [0.266, 0.294]).
SIZE_THRESHOLD = float(np.sqrt(shapes_lib.SIZE_RADIUS["small"] * shapes_lib.SIZE_RADIUS["large"]))


@dataclasses.dataclass(frozen=True)
class OracleReading:
    """What the oracle read from N images: label indices into VOCABULARIES plus the geometry."""

    shape: np.ndarray  # (N,) int
    color: np.ndarray  # (N,) int
    size: np.ndarray  # (N,) int
    position: np.ndarray  # (N,) int
    background: np.ndarray  # (N,) int
    area: np.ndarray  # (N,) shape area as a fraction of the image
    center: np.ndarray  # (N, 2) (x, y) bounding-box centre of the best template, image units
    radius: np.ndarray  # (N,) radius of the best template, image units
    fit_error: np.ndarray  # (N,) mean |template - coverage| per pixel of the best template

    def labels(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def names(self, index: int) -> dict[str, str]:
        """The attribute names read from image `index`."""
        return {a: VOCABULARIES[a][int(getattr(self, a)[index])] for a in ATTRIBUTES}


@functools.cache
def unit_shape_moments(resolution: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Area (in radius^2 units) and centroid offset from the bounding-box centre (in radius
    units, x right, y down) of every shape in SHAPES, measured on a fine render.

    The centroid is what an image's coverage map gives directly; the templates are placed by
    their bounding-box centre, so the offset (e.g. +0.3 r for the apex-up triangle) converts one
    into the other.
    """
    radius = 0.4
    ids = np.arange(len(shapes_lib.SHAPES))
    centers = np.full((len(ids), 2), 0.5)
    cover = shapes_lib.coverage(ids, centers, np.full(len(ids), radius), resolution)
    cover = cover.astype(np.float64)  # (S, R, R)
    pixel = (np.arange(resolution) + 0.5) / resolution
    mass = cover.sum(axis=(1, 2))
    centroid_x = (cover.sum(axis=1) * pixel).sum(axis=1) / mass
    centroid_y = (cover.sum(axis=2) * pixel).sum(axis=1) / mass
    areas = mass / resolution**2 / radius**2
    offsets = np.stack([centroid_x - 0.5, centroid_y - 0.5], axis=1) / radius
    return areas, offsets


def _nearest(palette: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Index of the nearest palette row (K, 3) for each colour (N, 3), Euclidean in RGB."""
    return np.argmin(((colors[:, None, :] - palette[None, :, :]) ** 2).sum(-1), axis=1)


def _border(images: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels: (N, 4 (S - 1), 3)."""
    top, bottom = images[:, 0, :-1], images[:, -1, 1:]
    left, right = images[:, 1:, 0], images[:, :-1, -1]
    return np.concatenate([top, right, bottom, left], axis=1)


def estimate_background(images: np.ndarray) -> np.ndarray:
    """Background colour (N, 3) float: the mean of the border pixels near their median.

    Shapes keep a margin from the border, and the median ignores the few pixels an edge may
    still touch. The mean of the inliers, rather than the median itself, keeps the estimate
    unbiased for noise clipped at 0 or 255 (black and white backgrounds): the same clipped
    noise sits on every background pixel, so the coverage of the background then averages 0.
    """
    border = _border(images.astype(np.float32))  # (N, B, 3)
    median = np.median(border, axis=1, keepdims=True)
    distance = np.linalg.norm(border - median, axis=-1)  # (N, B)
    inlier = distance <= 3.0 * np.median(distance, axis=1, keepdims=True) + 8.0
    return (border * inlier[..., None]).sum(axis=1) / inlier.sum(axis=1)[:, None]


def foreground_color(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Mean colour (N, 3) of the core pixels (farthest from the background); pixels (N, P, 3)."""
    distance = np.linalg.norm(pixels - background[:, None, :], axis=-1)  # (N, P)
    core = distance >= _CORE_FRACTION * distance.max(axis=1, keepdims=True)
    return (pixels * core[..., None]).sum(axis=1) / np.maximum(core.sum(axis=1), 1)[:, None]


def soft_coverage(pixels: np.ndarray, background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Per-pixel coverage a (N, P), unclipped, from image = a * foreground + (1 - a) * background:
    the projection of (pixel - background) on (foreground - background). Unclipped, so that
    pixel noise averages out in the area and the centroid instead of biasing them upwards."""
    direction = foreground - background  # (N, 3)
    norm2 = np.maximum((direction**2).sum(axis=1), 1.0)
    return np.einsum("npc,nc->np", pixels - background[:, None, :], direction) / norm2[:, None]


def _nearest_position(centers: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Index into POSITIONS of the grid cell nearest to each (x, y) centre, with the cell
    geometry of the read size (cells of large shapes sit closer together)."""
    cells = np.array(
        [
            [shapes_lib.position_center(p, size) for p in shapes_lib.POSITIONS]
            for size in shapes_lib.SIZES
        ]
    )  # (sizes, positions, 2)
    difference = centers[:, None, :] - cells[sizes]  # (N, positions, 2)
    return np.argmin((difference**2).sum(-1), axis=1)


def _read_chunk(images: np.ndarray) -> OracleReading:
    n, height, width, _ = images.shape
    if height != width:
        raise ValueError(f"the oracle reads square images; got {height}x{width}")
    resolution = height
    pixels = images.reshape(n, -1, 3).astype(np.float32)  # (N, P, 3)
    color_table = np.array(list(shapes_lib.COLORS.values()), np.float32)
    background_table = np.array(list(shapes_lib.BACKGROUNDS.values()), np.float32)

    background = estimate_background(images)  # (N, 3)
    mean_color = foreground_color(pixels, background)
    color = _nearest(color_table, mean_color)
    # The palette colour, not the measured mean, sets the coverage scale: the mean of the core
    # still mixes in some anti-aliased edge pixels.
    palette_color = color_table[color]
    visible = np.linalg.norm(palette_color - background, axis=1) >= _MIN_CONTRAST
    foreground = np.where(visible[:, None], palette_color, mean_color)
    alpha = soft_coverage(pixels, background, foreground)  # (N, P)

    pixel = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    grid_y, grid_x = np.meshgrid(pixel, pixel, indexing="ij")
    grid = np.stack([grid_x.reshape(-1), grid_y.reshape(-1)], axis=1)  # (P, 2)
    # Moments over a window around the shape only: far pixels carry nothing but noise, and
    # their lever arm would make the centroid noisy. The window comes from the pixels more than
    # half covered: their centre, and 2x the radius of a disc of their area (enough for the
    # triangle's apex and the star's tips) plus a pixel and a half.
    half_covered = alpha > 0.5  # (N, P)
    count = half_covered.sum(axis=1)
    rough_center = (half_covered @ grid) / np.maximum(count, 1)[:, None]
    rough_center = np.where(count[:, None] > 0, rough_center, 0.5)
    reach = 2.0 * np.sqrt(count / resolution**2 / np.pi) + 1.5 / resolution
    window = ((grid[None] - rough_center[:, None]) ** 2).sum(-1) <= reach[:, None] ** 2
    windowed = alpha * window
    mass = windowed.sum(axis=1)
    safe_mass = np.where(mass > 1e-6, mass, 1.0)
    centroid = np.where(mass[:, None] > 1e-6, (windowed @ grid) / safe_mass[:, None], 0.5)
    area = np.maximum(mass, 0.0) / resolution**2

    # Fit each shape's template at the radius its area implies and the centre its centroid
    # implies; the best fit (least L1 distance between coverage maps) names the shape.
    unit_areas, unit_offsets = unit_shape_moments()
    errors, radii, centers = [], [], []
    for shape_index in range(len(shapes_lib.SHAPES)):
        radius = np.sqrt(area / unit_areas[shape_index]) + 1e-6  # (N,)
        center = centroid - unit_offsets[shape_index] * radius[:, None]
        template = shapes_lib.coverage(np.full(n, shape_index), center, radius, resolution).reshape(
            n, -1
        )
        errors.append(((template - alpha) ** 2).mean(axis=1))
        radii.append(radius)
        centers.append(center)
    errors, radii, centers = np.stack(errors), np.stack(radii), np.stack(centers)  # (S, N, ...)
    shape = np.argmin(errors, axis=0)
    rows = np.arange(n)
    radius, center = radii[shape, rows], centers[shape, rows]
    size = (radius >= SIZE_THRESHOLD).astype(np.int64)
    return OracleReading(
        shape=shape,
        color=color,
        size=size,
        position=_nearest_position(center, size),
        background=_nearest(background_table, background),
        area=area,
        center=center,
        radius=radius,
        fit_error=errors[shape, rows],
    )


def check_uint8(images: np.ndarray) -> None:
    if images.dtype != np.uint8:  # a float image would be read as nearly black, silently
        raise ValueError(
            f"images must be uint8 in [0, 255], got dtype {images.dtype}; convert [-1, 1] floats "
            "with np.clip(np.rint((images + 1) * 127.5), 0, 255).astype(np.uint8)"
        )


def read_attributes(images: np.ndarray, chunk_size: int = 256) -> OracleReading:
    """Reads the five attributes of each shapes image: uint8 (N, S, S, 3) -> OracleReading.

    1. background: the median border colour, snapped to the nearest BACKGROUNDS entry;
    2. colour: mean of the pixels farthest from the background, nearest COLORS entry;
    3. soft coverage of each pixel by projecting it on the background -> colour segment;
    4. area and centroid of that coverage; for each shape, the template
       (`shapes.coverage`) with that area and centroid; the least-L1 template is the shape,
       and its radius gives the size (threshold SIZE_THRESHOLD) and its centre the 3x3 cell
       (the dataset's own `position_center` geometry).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got shape {images.shape}")
    check_uint8(images)
    if images.shape[0] == 0:
        empty = np.zeros(0, np.int64)
        return OracleReading(*(empty,) * 5, np.zeros(0), np.zeros((0, 2)), np.zeros(0), np.zeros(0))
    chunks = [
        _read_chunk(images[start : start + chunk_size])
        for start in range(0, images.shape[0], chunk_size)
    ]
    return OracleReading(
        **{
            field.name: np.concatenate([getattr(c, field.name) for c in chunks])
            for field in dataclasses.fields(OracleReading)
        }
    )


def attribute_accuracy(reading: OracleReading, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of images whose read attribute equals the label, per attribute in `labels`,
    plus "all" (every prompted attribute - shape, color, size, position - right at once)."""
    correct = {a: np.asarray(getattr(reading, a)) == np.asarray(labels[a]) for a in labels}
    result = {a: float(np.mean(c)) for a, c in correct.items()}
    if all(a in correct for a in PROMPTED_ATTRIBUTES):
        result["all"] = float(np.mean(np.all([correct[a] for a in PROMPTED_ATTRIBUTES], axis=0)))
    return result


def misreads(reading: OracleReading, labels: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Which values the oracle read instead of the label, per attribute in `labels`: {attribute:
    {"<label> as <read>": count}}, most frequent first, misread pairs only. Says what an accuracy
    below 1 is made of (e.g. small stars drawn with rounded points, read as circles)."""
    result = {}
    for attribute, expected in labels.items():
        names = VOCABULARIES[attribute]
        pairs = zip(np.asarray(expected), np.asarray(getattr(reading, attribute)), strict=True)
        counts = collections.Counter(f"{names[a]} as {names[b]}" for a, b in pairs if a != b)
        result[attribute] = dict(counts.most_common())
    return result
