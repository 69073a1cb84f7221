"""Fidelity and diversity beyond the prompted attributes: does a text-to-image model draw what a
caption leaves open (the background it does not name, the jitter of the shape inside its grid
cell and of its size) as the data does, and do several samples of one caption differ as much as
several real images of it?

Attribute accuracy scores each sample against its caption alone, so a model that draws every
sample of a caption on the same gray background in the same pose scores perfectly. These
functions compare distributions instead:
- `total_variation_distance` of an attribute's histogram over samples and over real images
  (0.5 * sum |p - q|: 0 for the same distribution, 1 for disjoint supports);
- `spread_ratio` of a continuous quantity (std in samples / std in real images);
- `diversity_ratio`: mean pairwise distance between samples of one caption over the same for
  real images of that caption (1 = as diverse as the data, 0 = one image repeated).

The shapes-specific part: which attributes a caption leaves open (`caption_names_background`),
the geometry the oracle reads relative to the caption's cell (`open_attribute_metrics`), and the
real images of one caption (`reference_images`), drawn from the dataset's own generator.
"""

from __future__ import annotations

import numpy as np

from diffusion.data import shapes as shapes_lib
from diffusion.evaluation.shapes_oracle import OracleReading, read_attributes

# The diversity a user asks of a model: at least this fraction of the data's, caption by caption.
DIVERSITY_TARGET = 0.8
# Side the images are averaged down to before pixel distances (`pixel_features`).
FEATURE_SIDE = 8


# ---------------------------------------------------------------------------------------------
# Distances between distributions
# ---------------------------------------------------------------------------------------------


def histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of `labels` (N,) ints in [0, num_classes) equal to each class: (num_classes,)."""
    labels = np.asarray(labels, np.int64)
    if labels.size == 0:
        raise ValueError("histogram of no labels is undefined")
    return np.bincount(labels, minlength=num_classes)[:num_classes] / labels.size


def total_variation_distance(p: np.ndarray, q: np.ndarray) -> float:
    """0.5 * sum_k |p_k - q_k| of two histograms (each normalised to sum 1): the largest
    difference in probability the two distributions give one event, in [0, 1]."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError(f"need two non-empty histograms of one shape, got {p.shape}, {q.shape}")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def label_total_variation(samples: np.ndarray, real: np.ndarray, num_classes: int) -> float:
    """Total variation distance between the histograms of two sets of class labels."""
    return total_variation_distance(histogram(samples, num_classes), histogram(real, num_classes))


def spread(values: np.ndarray) -> float:
    """Root mean squared distance of (N,) or (N, D) values from their mean: the std of a scalar,
    sqrt(trace of the covariance) of a vector (population normalisation)."""
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    return float(np.sqrt(((values - values.mean(axis=0)) ** 2).sum(axis=1).mean()))


def spread_ratio(samples: np.ndarray, real: np.ndarray) -> float | None:
    """spread(samples) / spread(real): 1 when samples vary as much as the data, 0 when they do
    not vary; None when the real values do not vary (or either set has fewer than 2)."""
    if len(samples) < 2 or len(real) < 2:
        return None
    denominator = spread(real)
    return spread(samples) / denominator if denominator > 0 else None


# ---------------------------------------------------------------------------------------------
# Diversity within one caption
# ---------------------------------------------------------------------------------------------


def pixel_features(images: np.ndarray, side: int = FEATURE_SIDE) -> np.ndarray:
    """uint8 (N, S, S, C) images -> (N, side * side * C) floats in [0, 1]: each image averaged
    over (S / side)^2 blocks (S must be a multiple of side), then flattened.

    Why this distance: what a shapes caption leaves open is the background colour and where
    exactly the shape sits and how large it is; pixel L2 sees all three in proportion to the
    area they change, with no learned invariance to them (a CLIP image tower is trained to
    ignore what captions do not say, so it would under-count exactly this diversity). Averaging
    down first keeps sample noise and edge aliasing, high-frequency differences that are not
    diversity, from inflating the distance; at 8x8 a jitter of a fraction of a cell still moves
    the block averages.
    """
    images = np.asarray(images, np.float64) / 255.0
    n, height, width, channels = images.shape
    if height % side or width % side:
        raise ValueError(f"images of {height}x{width} do not average down to {side}x{side}")
    blocks = images.reshape(n, side, height // side, side, width // side, channels)
    return blocks.mean(axis=(2, 4)).reshape(n, -1)


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs i < j of (N, D) features (N >= 2)."""
    features = np.asarray(features, np.float64)
    if len(features) < 2:
        raise ValueError(f"mean pairwise distance needs >= 2 points, got {len(features)}")
    squared = (features**2).sum(axis=1)
    gram = squared[:, None] + squared[None, :] - 2.0 * features @ features.T
    upper = np.triu_indices(len(features), k=1)
    return float(np.sqrt(np.maximum(gram[upper], 0.0)).mean())


def diversity_ratio(samples: np.ndarray, real: np.ndarray) -> float | None:
    """mean_pairwise_distance(samples) / mean_pairwise_distance(real), of (N, D) features of one
    caption; None when the real ones are all identical."""
    denominator = mean_pairwise_distance(real)
    return mean_pairwise_distance(samples) / denominator if denominator > 0 else None


# ---------------------------------------------------------------------------------------------
# The shapes dataset: what a caption leaves open, and real images of one caption
# ---------------------------------------------------------------------------------------------


def caption_names_background(caption: str) -> bool:
    """Whether a shapes caption names its background: half of the caption templates do
    ("... on a gray background"); the others leave it to the data's distribution."""
    return " background" in caption


def _cell_offsets(reading: OracleReading, labels: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 2) read centre minus the nominal centre of the caption's cell, in cell spacings."""
    sizes = [shapes_lib.SIZES[i] for i in labels["size"]]
    cells = np.array(
        [
            shapes_lib.position_center(shapes_lib.POSITIONS[p], s)
            for p, s in zip(labels["position"], sizes, strict=True)
        ]
    )
    spacing = np.array([shapes_lib.cell_spacing(s) for s in sizes])
    return (reading.center - cells) / spacing[:, None]


def open_attribute_metrics(
    samples: OracleReading,
    real: OracleReading,
    labels: dict[str, np.ndarray],
    captions: list[str],
) -> dict:
    """What the captions leave open, samples against the real images of the same captions
    (sample i and real image i share caption i), pooled over the captions that leave it open:

    background: {total_variation, num_captions} over the captions that name no background;
    position_spread_ratio: spread of the shape's centre around its caption's cell centre;
    size_spread_ratio: spread of its radius relative to its size's nominal radius.
    The two spreads count only images whose size and position the oracle reads as the caption
    says (on both sides): a misplaced shape is an accuracy error, not placement diversity.
    """
    result = {}
    open_background = np.array([not caption_names_background(c) for c in captions], bool)
    if open_background.any():
        result["background"] = {
            "total_variation": label_total_variation(
                samples.background[open_background],
                real.background[open_background],
                len(shapes_lib.BACKGROUND_NAMES),
            ),
            "num_captions": int(open_background.sum()),
        }
    nominal = np.array([shapes_lib.SIZE_RADIUS[shapes_lib.SIZES[i]] for i in labels["size"]])

    def placed_right(reading):
        return (reading.size == labels["size"]) & (reading.position == labels["position"])

    sample_ok, real_ok = placed_right(samples), placed_right(real)
    result["position_spread_ratio"] = spread_ratio(
        _cell_offsets(samples, labels)[sample_ok], _cell_offsets(real, labels)[real_ok]
    )
    result["size_spread_ratio"] = spread_ratio(
        (samples.radius / nominal)[sample_ok], (real.radius / nominal)[real_ok]
    )
    return result


def reference_images(
    labels: dict[str, int],
    names_background: bool,
    count: int,
    rng: np.random.Generator,
    resolution: int,
) -> np.ndarray:
    """`count` real images of one caption, uint8 (count, S, S, 3): its shape, colour, size and
    position, fresh position and size jitter, and its background if the caption names it, else
    a uniform pick among the backgrounds that differ from the colour (`shapes.sample_attributes`).

    Why generate: a caption string (attributes, template and prefix) occurs about once in a
    held-out split, and even its attribute tuple only a few times, too few to measure spread;
    the dataset's own renderer draws exactly its conditional distribution given the caption.
    """
    if names_background:
        background = np.full(count, labels["background"])
    else:
        color = shapes_lib.COLOR_NAMES[labels["color"]]
        allowed = [i for i, b in enumerate(shapes_lib.BACKGROUND_NAMES) if b != color]
        background = np.array(allowed)[rng.integers(len(allowed), size=count)]
    batch = shapes_lib.AttributeBatch(
        shape=np.full(count, labels["shape"]),
        color=np.full(count, labels["color"]),
        size=np.full(count, labels["size"]),
        position=np.full(count, labels["position"]),
        background=background,
        jitter=rng.uniform(-1.0, 1.0, size=(count, 3)),
        template=np.zeros(count, np.int64),
        prefix=np.zeros(count, np.int64),
    )
    return shapes_lib.render_attributes(batch, resolution)


def caption_diversity(
    samples: np.ndarray, references: np.ndarray, names_background: np.ndarray
) -> dict:
    """Diversity caption by caption. samples: uint8 (C, K, S, S, 3), K samples of each of C
    captions; references: (C, 2K, S, S, 3) real images of them (`reference_images`);
    names_background: (C,) whether each caption names its background.

    ratio: mean over captions of `diversity_ratio` (samples against all 2K real images);
    ratio_min, fraction_at_target (captions with ratio >= DIVERSITY_TARGET);
    real_ratio: the same for the second K real images against the first K, the value a model
    as diverse as the data would get with this many images (about 1, with its noise);
    background_total_variation: mean over the captions that name no background of the total
    variation between the backgrounds read in K samples and in the first K real images, and
    background_total_variation_real: the same between the two halves of the real images (not 0:
    two sets of K draws of one distribution differ; the samples' value is read against it).
    """
    count = samples.shape[1]
    num_backgrounds = len(shapes_lib.BACKGROUND_NAMES)
    ratios, real_ratios, distances, real_distances = [], [], [], []
    for caption_samples, caption_references, named in zip(
        samples, references, names_background, strict=True
    ):
        sample_features = pixel_features(caption_samples)
        real_features = pixel_features(caption_references)
        ratios.append(diversity_ratio(sample_features, real_features))
        real_ratios.append(diversity_ratio(real_features[count:], real_features[:count]))
        if not named:
            sample_read = read_attributes(caption_samples).background
            real_read = read_attributes(caption_references).background
            first, second = real_read[:count], real_read[count:]
            distances.append(label_total_variation(sample_read, first, num_backgrounds))
            real_distances.append(label_total_variation(second, first, num_backgrounds))
    defined = np.array([r for r in ratios if r is not None])
    real_defined = np.array([r for r in real_ratios if r is not None])
    result = {
        "num_captions": len(samples),
        "samples_per_caption": count,
        "ratio": float(defined.mean()) if defined.size else None,
        "ratio_min": float(defined.min()) if defined.size else None,
        "fraction_at_target": float((defined >= DIVERSITY_TARGET).mean()) if defined.size else None,
        "real_ratio": float(real_defined.mean()) if real_defined.size else None,
    }
    if distances:
        result["background_total_variation"] = float(np.mean(distances))
        result["background_total_variation_real"] = float(np.mean(real_distances))
        result["num_open_background_captions"] = len(distances)
    return result
