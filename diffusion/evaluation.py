"""Checkpoint evaluation: the shapes attribute oracle, CLIP metrics, and the evaluate.py driver.

* The oracle (`read_attributes`) reads shape, color, size, position and background back from
  uint8 images with plain numpy, by fitting the dataset's own shape templates to a soft coverage
  map (`diffusion.data.shapes.coverage`), so generated images are scored attribute by attribute.
* CLIP metrics: zero-shot attribute classification with prompt ensembling (Radford et al. 2021,
  sec. 3.1.4), image-text retrieval recall@k (`diffusion.contrastive.retrieval_metrics`), CLIP
  score (Hessel et al. 2021, with torchmetrics' 100 * max(cos, 0)) and the Frechet distance
  (Heusel et al. 2017) between real and generated images in CLIP image-embedding space.
* `evaluate_checkpoint(run_dir, output_dir, options)` runs all that for a CLIP or a DiT run and
  writes metrics.json, TensorBoard scalars and an HTML report (`diffusion.report`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.data import shapes as shapes_lib

ATTRIBUTES = ("shape", "color", "size", "position", "background")
# The four attributes a prompt asks for; "all four right" is the headline accuracy (issue 7).
PROMPTED_ATTRIBUTES = ("shape", "color", "size", "position")
VOCABULARIES = {
    "shape": shapes_lib.SHAPES,
    "color": shapes_lib.COLOR_NAMES,
    "size": shapes_lib.SIZES,
    "position": shapes_lib.POSITIONS,
    "background": shapes_lib.BACKGROUND_NAMES,
}

# =============================================================================================
# The shapes attribute oracle
# =============================================================================================

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


def _check_uint8(images: np.ndarray) -> None:
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
    _check_uint8(images)
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


# =============================================================================================
# CLIP metrics (pure numpy over embeddings)
# =============================================================================================


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def ensemble_class_embeddings(prompt_embeddings: list[np.ndarray]) -> np.ndarray:
    """Prompt ensembling (Radford et al. 2021, sec. 3.1.4): the embedding of class k is the
    re-normalised mean of the normalised embeddings of its prompts. prompt_embeddings[k] is
    (T_k, E); returns (K, E)."""
    return l2_normalize(np.stack([l2_normalize(e).mean(axis=0) for e in prompt_embeddings]))


def zero_shot_predictions(image_embeddings: np.ndarray, class_embeddings: np.ndarray) -> np.ndarray:
    """Index of the class whose embedding has the largest cosine with each image (N,)."""
    return np.argmax(l2_normalize(image_embeddings) @ l2_normalize(class_embeddings).T, axis=1)


def zero_shot_accuracy(
    image_embeddings: np.ndarray, class_embeddings: np.ndarray, labels: np.ndarray
) -> float:
    predictions = zero_shot_predictions(image_embeddings, class_embeddings)
    return float(np.mean(predictions == np.asarray(labels)))


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    ridge: float = 1.0,
) -> float:
    """Test accuracy of a ridge-regression classifier (one-hot targets, closed form) fitted on
    standardised train features: is an attribute *linearly* readable from an embedding?"""
    train_features = np.asarray(train_features, np.float64)
    mean, std = train_features.mean(axis=0), train_features.std(axis=0) + 1e-6

    def design(features):
        standardised = (np.asarray(features, np.float64) - mean) / std
        return np.concatenate([standardised, np.ones((len(standardised), 1))], axis=1)

    a = design(train_features)
    targets = np.eye(int(np.max(train_labels)) + 1)[np.asarray(train_labels)]
    weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ targets)
    predictions = np.argmax(design(test_features) @ weights, axis=1)
    return float(np.mean(predictions == np.asarray(test_labels)))


def between_class_variance_share(features: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of the features' total variance explained by their class means (the R^2 of
    predicting each feature vector by the mean of its class)."""
    centred = np.asarray(features, np.float64) - np.mean(features, axis=0)
    labels = np.asarray(labels)
    between = sum(
        np.sum(labels == c) * np.sum(centred[labels == c].mean(axis=0) ** 2)
        for c in np.unique(labels)
    )
    return float(between / np.sum(centred**2))


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """CLIP score of matched (image, text) rows: mean of 100 * max(cos, 0) (Hessel et al. 2021
    with w = 100, as torchmetrics' CLIPScore)."""
    cosine = (l2_normalize(image_embeddings) * l2_normalize(text_embeddings)).sum(axis=1)
    return float(np.mean(100.0 * np.maximum(cosine, 0.0)))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (E,) and unbiased covariance (E, E) of (N, E) features, in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, E) features for a covariance, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Frechet distance between N(mean_a, cov_a) and N(mean_b, cov_b) (Heusel et al. 2017, eq. 6;
    Dowson & Landau 1982): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64."""
    import scipy.linalg

    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        # A singular product (fewer samples than dimensions): offset both diagonals slightly,
        # as pytorch-fid does.
        offset = np.eye(cov_a.shape[0]) * 1e-6
        root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    # Rounding can leave tiny imaginary parts in the square root of a PSD product.
    root = np.real(root)
    difference = mean_a - mean_b
    return float(difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def frechet_distance_of_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, E) feature sets."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# Zero-shot class prompts per attribute. {value} is the class; the other placeholders are filled
# with every value of their attribute, and all of a class's prompts are ensembled, so a class
# embedding is marginalised over the attributes it does not name. {a} becomes "a" or "an".
ZERO_SHOT_TEMPLATES = {
    "shape": ("{a} {value}", "a photo of {a} {value}", "{a} {color} {value}", "{a} {size} {value}"),
    "color": ("{a} {value} shape", "{a} {value} {shape}", "a photo of {a} {value} {shape}"),
    "size": ("{a} {value} shape", "{a} {value} {shape}", "{a} {value} {color} {shape}"),
    "position": ("a shape {value}", "{a} {shape} {value}", "{a} {color} {shape} {value}"),
    "background": (
        "a shape on a {value} background",
        "{a} {shape} on a {value} background",
        "{a} {color} {shape} on a {value} background",
    ),
}
# How a position value reads in a caption (the dataset's own phrases).
POSITION_PHRASES = dict(shapes_lib._POSITION_PHRASES)


def _with_articles(text: str) -> str:
    words = text.split(" ")
    for i, word in enumerate(words[:-1]):
        if word == "{a}":
            words[i] = "an" if words[i + 1][:1] in tuple("aeiou") else "a"
    return " ".join(words)


def class_prompts(attribute: str, templates: tuple[str, ...] | None = None) -> list[list[str]]:
    """The prompts of every class of a shapes attribute: one list per value of VOCABULARIES."""
    if attribute not in ZERO_SHOT_TEMPLATES:
        raise ValueError(f"unknown attribute {attribute!r}; valid: {list(ZERO_SHOT_TEMPLATES)}")
    templates = ZERO_SHOT_TEMPLATES[attribute] if templates is None else templates
    fillers = {"shape": shapes_lib.SHAPES, "color": shapes_lib.COLOR_NAMES}
    fillers["size"] = shapes_lib.SIZES
    prompts = []
    for value in VOCABULARIES[attribute]:
        words = POSITION_PHRASES[value] if attribute == "position" else value
        class_list = []
        for template in templates:
            names = [n for n in fillers if "{" + n + "}" in template]
            combos = [{}]
            for name in names:
                combos = [dict(c, **{name: v}) for c in combos for v in fillers[name]]
            for combo in combos:
                class_list.append(_with_articles(template.format(a="{a}", value=words, **combo)))
        prompts.append(class_list)
    return prompts


# =============================================================================================
# A CLIP model as an embedding function
# =============================================================================================


class ClipEncoder:
    """A CLIP (our run directory or a Hugging Face CLIP directory) with its tokenizer, turning
    uint8 images and strings into L2-normalised numpy embeddings. Fixed-size jitted batches
    (the last one padded), so any number of inputs compiles one program per input kind."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
        from flax import nnx

        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.image_size = model.config.image_size
        self.context_length = model.config.context_length
        graphdef, state = nnx.split(model)
        self._state = state
        self._encode_image = jax.jit(
            lambda s, images: nnx.merge(graphdef, s).encode_image(self._prepare(images))
        )
        self._encode_text = jax.jit(
            lambda s, tokens, mask: nnx.merge(graphdef, s).encode_text(tokens, mask)
        )

    @classmethod
    def load(cls, checkpoint: str, batch_size: int = 256) -> ClipEncoder:
        """From a CLIP run directory of train.py or a Hugging Face CLIP directory."""
        from diffusion import trainer
        from diffusion.data import load_tokenizer

        model = trainer.load_text_encoder(checkpoint, {"dtype": "float32"})
        own_tokenizer = os.path.join(checkpoint, trainer.TOKENIZER_DIR)
        tokenizer_dir = own_tokenizer if os.path.isdir(own_tokenizer) else checkpoint
        return cls(model, load_tokenizer(tokenizer_dir), batch_size)

    def _prepare(self, images):
        images = images.astype(jnp.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            shape = (images.shape[0], self.image_size, self.image_size, images.shape[3])
            images = jax.image.resize(images, shape, "bilinear")
        return images

    def _batched(self, fn, arrays: list[np.ndarray]) -> np.ndarray:
        count = arrays[0].shape[0]
        size = min(self.batch_size, max(count, 1))
        out = []
        for start in range(0, count, size):
            chunk = [a[start : start + size] for a in arrays]
            rows = chunk[0].shape[0]
            if rows < size:  # pad so that every call has the compiled shape
                chunk = [np.concatenate([c, np.repeat(c[-1:], size - rows, 0)]) for c in chunk]
            out.append(np.asarray(fn(self._state, *chunk))[:rows])
        return np.concatenate(out) if out else np.zeros((0, self.model.config.embed_dim))

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> (N, E) normalised image embeddings (resized if H differs)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got shape {images.shape}")
        _check_uint8(images)
        return self._batched(self._encode_image, [images])

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """N strings -> (N, E) normalised text embeddings (truncated to the context)."""
        from diffusion.data import tokenize

        if isinstance(texts, str):  # list("a cat") would embed each character
            raise ValueError(f"texts must be a list of strings, got one string; pass [{texts!r}]")
        tokens, mask = tokenize(self.tokenizer, list(texts), self.context_length)
        return self._batched(self._encode_text, [tokens, mask])

    def zero_shot_classifier(self, attribute: str) -> np.ndarray:
        """(K, E) class embeddings of a shapes attribute (prompt ensembles of class_prompts)."""
        return ensemble_class_embeddings([self.encode_texts(p) for p in class_prompts(attribute)])


# =============================================================================================
# Held-out examples of a run's dataset
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class SplitExamples:
    """The first N examples of a split: images, captions and (for shapes) attribute labels."""

    images: np.ndarray  # (N, S, S, 3) uint8
    captions: list[str]
    labels: dict[str, np.ndarray]  # attribute -> (N,) int; empty when the dataset has none


def load_split_examples(data_config, seed: int, split: str, count: int) -> SplitExamples:
    """Reads `count` examples (fewer if the split is smaller) in record order, building the
    shapes dataset first if it is missing (the same call as training)."""
    from diffusion import trainer
    from diffusion.data import pipeline

    source, _ = trainer.prepare_source(data_config, seed)
    reader = pipeline.open_source(source, split)
    decoder = pipeline._BatchDecoder(reader, source, tokenizer=None, context_length=2)
    records = reader.read(list(range(min(count, len(reader)))))
    images = np.stack([np.asarray(r[source.image_key], np.uint8) for r in records])
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    labels = {}
    if all(a in reader.features for a in ATTRIBUTES):
        labels = {a: np.array([int(r[a]) for r in records]) for a in ATTRIBUTES if a in records[0]}
    return SplitExamples(images, [decoder.caption(r) for r in records], labels)


# =============================================================================================
# evaluate.py: options
# =============================================================================================

DEFAULT_SAMPLER = {"flow": ("euler", 20), "ddpm": ("ddim", 20)}


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
    """What evaluate.py measures; the defaults are the flags' defaults."""

    num_samples: int = 512  # examples (captions) per split
    splits: tuple[str, ...] = ("test", "test_unseen")
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0)
    samplers: tuple[tuple[str, int], ...] = ()  # (name, steps); () = euler:20 or ddim:20 (ddpm)
    clip_checkpoint: str | None = None  # None: the DiT's own text encoder run
    batch_size: int = 64  # samples per sampling program / embedding call
    grid_size: int = 16  # samples shown per grid in the report
    negative_prompt: str = "a large circle in the center"  # the negative-prompt check ...
    negative_color: str = "red"  # ... with this color as the negative prompt ("" skips it)
    data_dir: str | None = None  # overrides the run's config.data.data_dir


def _user_error(message: str):
    from diffusion.errors import UserError

    return UserError(message)


def parse_guidance_scales(text: str) -> tuple[float, ...]:
    """ "1,2,4.5" -> (1.0, 2.0, 4.5); every scale a finite number >= 0."""
    scales = []
    for item in (text or "").split(","):
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value) or value < 0:
            raise _user_error(
                f"--guidance_scales={text!r}: {item.strip()!r} is not a finite number >= 0; give "
                "comma-separated scales such as 1,2,4,6"
            )
        scales.append(value)
    return tuple(dict.fromkeys(scales))


def parse_samplers(text: str) -> tuple[tuple[str, int], ...]:
    """ "euler:20,ddim:50" -> (("euler", 20), ("ddim", 50)); "" -> () (the objective's default)."""
    from diffusion.text2image import SAMPLERS_BY_OBJECTIVE

    known = sorted({name for names in SAMPLERS_BY_OBJECTIVE.values() for name in names})
    result = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, _, steps = item.partition(":")
        if name not in known:
            raise _user_error(
                f"--samplers={text!r}: unknown sampler {name!r}; valid: {', '.join(known)} "
                "(each as NAME:STEPS, e.g. euler:20)"
            )
        if not steps.isdigit() or int(steps) < 1:
            raise _user_error(
                f"--samplers={text!r}: {item!r} needs a step count >= 1 after the colon, "
                "e.g. euler:20"
            )
        result.append((name, int(steps)))
    return tuple(dict.fromkeys(result))


def scale_key(scale: float) -> str:
    """How a guidance scale names its entry in metrics.json: 4.0 -> "4", 1.5 -> "1.5"."""
    return f"{scale:g}"


def sampler_key(sampler: str, steps: int) -> str:
    return f"{sampler}:{steps}"


# =============================================================================================
# evaluate.py: the two families
# =============================================================================================


def _latest_step(run_dir: str) -> int | None:
    directory = os.path.join(run_dir, "checkpoints")
    steps = (
        [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    )
    return max(steps) if steps else None


def _data_config(config, options: EvaluationOptions):
    data = config.data
    if options.data_dir:
        data = data.copy_and_resolve_references()
        data.data_dir = options.data_dir
    return data


def evaluate_clip_run(run_dir: str, config, options: EvaluationOptions) -> dict:
    """Zero-shot attribute accuracy and retrieval recall@1/5/10 on each split."""
    from diffusion.contrastive import retrieval_metrics

    encoder = ClipEncoder.load(run_dir, options.batch_size)
    classifiers = {}
    result = {"splits": {}}
    for split in options.splits:
        examples = load_split_examples(
            _data_config(config, options), config.seed, split, options.num_samples
        )
        image_embeddings = encoder.encode_images(examples.images)
        text_embeddings = encoder.encode_texts(examples.captions)
        entry = {
            "num_examples": len(examples.captions),
            "clip_score": clip_score(image_embeddings, text_embeddings),
            "retrieval": {
                k: float(v)
                for k, v in retrieval_metrics(
                    image_embeddings, text_embeddings, ks=(1, 5, 10)
                ).items()
            },
        }
        if examples.labels:
            zero_shot = {}
            for attribute in ATTRIBUTES:
                if attribute not in classifiers:
                    classifiers[attribute] = encoder.zero_shot_classifier(attribute)
                zero_shot[attribute] = zero_shot_accuracy(
                    image_embeddings, classifiers[attribute], examples.labels[attribute]
                )
            zero_shot["mean"] = float(np.mean([zero_shot[a] for a in PROMPTED_ATTRIBUTES]))
            entry["zero_shot"] = zero_shot
        result["splits"][split] = entry
    return result


def _gallery(title, grid_path, captions, reading, labels, count) -> dict:
    """What the report shows under a grid: each prompt and, with an oracle, what it read."""
    items = []
    for i in range(min(count, len(captions))):
        item = {"prompt": captions[i]}
        if reading is not None:
            item["read"] = reading.names(i)
            item["correct"] = {
                a: bool(getattr(reading, a)[i] == labels[a][i]) for a in PROMPTED_ATTRIBUTES
            }
        items.append(item)
    return {"title": title, "image": grid_path, "items": items}


def _frame_colors(reading, labels, count):
    if reading is None:
        return None
    right = np.all([getattr(reading, a) == labels[a] for a in PROMPTED_ATTRIBUTES], axis=0)
    return [(40, 170, 60) if ok else (210, 40, 40) for ok in right[:count]]


def evaluate_dit_run(checkpoint: str, config, options: EvaluationOptions, output_dir: str):
    """Samples for each split's captions over the sweep; scores them. -> (metrics, galleries)."""
    import time

    import tqdm

    from diffusion import report
    from diffusion.text2image import TextToImage

    pipe = TextToImage.from_run(checkpoint)
    samplers = options.samplers or (DEFAULT_SAMPLER[pipe.objective],)
    for name, steps in samplers:  # unknown names for this objective fail before any work
        pipe.settings(name, steps)
    clip_checkpoint = options.clip_checkpoint or config.text_encoder.checkpoint
    encoder = ClipEncoder.load(clip_checkpoint, options.batch_size)
    metrics = {
        "checkpoint_step": pipe.checkpoint_step,
        "resolution": pipe.resolution,
        "objective": pipe.objective,
        "clip_checkpoint": os.path.abspath(clip_checkpoint),
        "guidance_scales": list(options.guidance_scales),
        "samplers": [sampler_key(*s) for s in samplers],
        "splits": {},
    }
    galleries = []
    os.makedirs(os.path.join(output_dir, "grids"), exist_ok=True)
    progress = tqdm.tqdm(
        total=len(options.splits) * len(samplers) * len(options.guidance_scales),
        desc="evaluate",
        unit="setting",
        dynamic_ncols=True,
    )
    for split in options.splits:
        examples = load_split_examples(
            _data_config(config, options), config.seed, split, options.num_samples
        )
        labels, captions = examples.labels, examples.captions
        seeds = list(range(len(captions)))  # sample i always uses seed i: paired comparisons
        real_embeddings = encoder.encode_images(examples.images)
        text_embeddings = encoder.encode_texts(captions)
        real = {"clip_score": clip_score(real_embeddings, text_embeddings)}
        if labels:
            real["oracle_accuracy"] = attribute_accuracy(read_attributes(examples.images), labels)
        entry = {"num_samples": len(captions), "real": real, "samples": {}}
        for sampler, steps in samplers:
            by_scale = entry["samples"].setdefault(sampler_key(sampler, steps), {})
            for scale in options.guidance_scales:
                start = time.perf_counter()
                images = pipe.generate(
                    captions,
                    seeds=seeds,
                    sampler=sampler,
                    steps=steps,
                    guidance_scale=scale,
                    batch_size=options.batch_size,
                )
                seconds = time.perf_counter() - start
                embeddings = encoder.encode_images(images)
                result = {
                    "clip_score": clip_score(embeddings, text_embeddings),
                    "frechet_distance": (
                        frechet_distance_of_features(real_embeddings, embeddings)
                        if len(captions) >= 2
                        else None
                    ),
                    "seconds": seconds,
                }
                reading = read_attributes(images) if labels else None
                if reading is not None:
                    result["accuracy"] = attribute_accuracy(reading, labels)
                name = f"{split}_{sampler}-{steps}_cfg{scale_key(scale)}.png"
                count = min(options.grid_size, len(captions))
                report.save_grid(
                    images[:count],
                    os.path.join(output_dir, "grids", name),
                    frame_colors=_frame_colors(reading, labels, count),
                )
                result["grid"] = f"grids/{name}"
                by_scale[scale_key(scale)] = result
                title = f"{split}: {sampler} {steps} steps, guidance {scale_key(scale)}"
                galleries.append(
                    _gallery(title, result["grid"], captions, reading, labels, count)
                    | {"split": split, "sampler": sampler_key(sampler, steps), "scale": scale}
                )
                progress.update(1)
        entry["best"] = _best_setting(entry["samples"])
        metrics["splits"][split] = entry
    progress.close()
    if options.negative_color and all("accuracy" in s["best"] for s in metrics["splits"].values()):
        first = metrics["splits"][options.splits[0]]["best"]
        metrics["negative_prompt"], extra = negative_prompt_check(
            pipe,
            options,
            first["sampler"],
            negative_check_scale(first["guidance_scale"], options.guidance_scales),
            output_dir,
        )
        galleries.extend(extra)
    return metrics, galleries


def _best_setting(samples: dict) -> dict:
    """The (sampler, scale) with the highest all-four accuracy; ties go to the higher mean
    attribute accuracy, then the higher CLIP score (the CLIP score alone without an oracle)."""
    candidates = []
    for sampler, by_scale in samples.items():
        for scale, result in by_scale.items():
            accuracy = result.get("accuracy")
            score = (
                (accuracy["all"], np.mean([accuracy[a] for a in PROMPTED_ATTRIBUTES]))
                if accuracy
                else ()
            )
            candidates.append((score + (result["clip_score"],), sampler, float(scale), result))
    _, sampler, scale, result = max(candidates, key=lambda c: c[0])
    best = {"sampler": sampler, "guidance_scale": scale}
    best.update({k: v for k, v in result.items() if k != "grid"})
    return best


def negative_check_scale(best_scale: float, scales: tuple[float, ...]) -> float:
    """Guidance scale of the negative-prompt check: the sweep's best, unless that is <= 1, where
    the negative prompt (the unconditional branch) has no effect; then the sweep's largest scale,
    or 3 if none is above 1."""
    if best_scale > 1:
        return best_scale
    return max((s for s in scales if s > 1), default=3.0)


def negative_prompt_check(pipe, options, sampler_name: str, scale: float, output_dir: str):
    """The same prompt sampled with and without a colour as negative prompt (same seeds): the
    fraction of images the oracle reads in that colour, each way. -> (metrics, galleries)."""
    from diffusion import report

    sampler, steps = sampler_name.split(":")
    count = options.num_samples
    prompts = [options.negative_prompt] * count
    result = {
        "prompt": options.negative_prompt,
        "negative_prompt": options.negative_color,
        "sampler": sampler_name,
        "guidance_scale": scale,
        "num_samples": count,
    }
    galleries = []
    for name, negatives in (("without", None), ("with", [options.negative_color] * count)):
        images = pipe.generate(
            prompts,
            negative_prompts=negatives,
            seeds=list(range(count)),
            sampler=sampler,
            steps=int(steps),
            guidance_scale=scale,
            batch_size=options.batch_size,
        )
        reading = read_attributes(images)
        colors = np.bincount(reading.color, minlength=len(shapes_lib.COLOR_NAMES)) / count
        result[f"{name}_negative"] = {
            "color_fraction": float(colors[shapes_lib.COLOR_NAMES.index(options.negative_color)]),
            "color_histogram": dict(zip(shapes_lib.COLOR_NAMES, map(float, colors), strict=True)),
        }
        shown = min(options.grid_size, count)
        path = f"grids/negative_{name}.png"
        report.save_grid(images[:shown], os.path.join(output_dir, path))
        title = f'"{options.negative_prompt}" {name} negative prompt "{options.negative_color}"'
        items = [
            {"prompt": options.negative_prompt, "read": reading.names(i)} for i in range(shown)
        ]
        galleries.append({"title": title, "image": path, "items": items, "split": "negative"})
    return result, galleries


# =============================================================================================
# evaluate.py: the entry point's library function
# =============================================================================================


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def evaluate_checkpoint(checkpoint: str, output_dir: str, options: EvaluationOptions) -> dict:
    """Evaluates a CLIP or DiT run directory; writes OUTPUT_DIR/metrics.json, TensorBoard
    scalars (OUTPUT_DIR/tensorboard, step = the checkpoint step) and OUTPUT_DIR/index.html.

    metrics.json, common keys: family ("clip" | "dit"), checkpoint (absolute path),
    checkpoint_step, splits: {split: ...}.
      CLIP:  splits[split] = {num_examples, clip_score (real pairs),
               zero_shot: {shape, color, size, position, background, mean (of the first four)},
               retrieval: {image_to_text_recall@1|5|10, text_to_image_recall@1|5|10}}
      DiT:   resolution, objective, clip_checkpoint, guidance_scales, samplers ["euler:20", ...],
             splits[split] = {num_samples,
               real: {clip_score, oracle_accuracy: {<attribute>..., all}},
               samples: {"<sampler>:<steps>": {"<scale>": {accuracy: {shape, color, size,
                   position, background, all}, clip_score, frechet_distance, seconds, grid}}},
               best: {sampler, guidance_scale, accuracy, clip_score, frechet_distance, seconds}},
             negative_prompt: {prompt, negative_prompt, sampler, guidance_scale, num_samples,
               without_negative: {color_fraction, color_histogram}, with_negative: {...}}
    Fractions are in [0, 1]; "all" = shape, color, size and position all right.
    """
    from diffusion import metrics as metrics_lib
    from diffusion import report, trainer
    from diffusion.text2image import load_run_config, locate_run

    if not os.path.exists(checkpoint):
        raise _user_error(
            f"--checkpoint={checkpoint!r} does not exist; pass a CLIP or DiT run directory "
            "(the --workdir of train.py)"
        )
    if options.num_samples < 1:
        raise _user_error(f"--num_samples must be >= 1, got {options.num_samples}")
    if not options.guidance_scales:
        raise _user_error("--guidance_scales is empty; give at least one scale, e.g. 1,2,4,6")
    if options.negative_color and options.negative_color not in shapes_lib.COLORS:
        raise _user_error(
            f"--negative_color={options.negative_color!r} is not a shapes color; valid: "
            f"{', '.join(shapes_lib.COLOR_NAMES)} (or '' to skip the check)"
        )
    run_dir = locate_run(checkpoint).run_dir if os.path.isdir(checkpoint) else checkpoint
    family, _ = trainer.load_model_config(run_dir)
    config = load_run_config(run_dir)
    os.makedirs(output_dir, exist_ok=True)
    galleries = []
    if family == "clip":
        metrics = {"family": "clip", "checkpoint": os.path.abspath(checkpoint)}
        metrics["checkpoint_step"] = _latest_step(run_dir)
        metrics.update(evaluate_clip_run(run_dir, config, options))
    else:
        metrics = {"family": "dit", "checkpoint": os.path.abspath(checkpoint)}
        dit_metrics, galleries = evaluate_dit_run(checkpoint, config, options, output_dir)
        metrics.update(dit_metrics)
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    writer = metrics_lib.MetricWriter(output_dir, enabled=True)
    scalars = {
        k: v
        for k, v in _flatten(
            metrics["splits"] | {"negative": metrics.get("negative_prompt", {})}
        ).items()
        if not k.endswith("checkpoint_step")
    }
    writer.write_scalars(metrics.get("checkpoint_step") or 0, scalars)
    writer.close()
    report.write_report(metrics, galleries, output_dir)
    return metrics
