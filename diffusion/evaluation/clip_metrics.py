"""CLIP metrics: zero-shot attribute classification with prompt ensembling (Radford et al. 2021,
sec. 3.1.4), zero-shot top-k over a labelled dataset's class names, CLIP score (Hessel et al.
2021, with torchmetrics' 100 * max(cos, 0)), linear probes, the Frechet distance (Heusel et al.
2017) in CLIP image-embedding space, and `ClipEncoder`, a CLIP as an embedding function.
Retrieval recall@k is `diffusion.contrastive.retrieval_metrics`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import rundir
from diffusion.data import load_tokenizer, sources, tokenize
from diffusion.data import shapes as shapes_lib
from diffusion.data.classes import ClassSpace
from diffusion.evaluation.shapes_oracle import VOCABULARIES, check_uint8
from diffusion.families import clip as clip_family


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


def zero_shot_top_k_accuracy(
    image_embeddings: np.ndarray,
    class_embeddings: np.ndarray,
    labels: np.ndarray,
    ks: tuple[int, ...] = (1, 5),
) -> dict[int, float]:
    """{k: fraction of images whose class is among the k classes of largest cosine}. A tie with a
    wrong class counts against the image (as in retrieval), so constant embeddings score 0."""
    scores = l2_normalize(image_embeddings) @ l2_normalize(class_embeddings).T  # (N, K)
    labels = np.asarray(labels, np.int64)
    if labels.shape != (scores.shape[0],) or not np.all((0 <= labels) & (labels < len(scores.T))):
        raise ValueError(
            f"labels must be (N,) = ({scores.shape[0]},) class indices in [0, "
            f"{scores.shape[1]}); got shape {labels.shape}"
        )
    own = np.take_along_axis(scores, labels[:, None], axis=1)  # (N, 1)
    wrong = np.arange(scores.shape[1])[None, :] != labels[:, None]
    rank = np.sum((scores >= own) & wrong, axis=1)  # (N,) 0-based rank of the true class
    return {k: float(np.mean(rank < k)) for k in ks}


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
POSITION_PHRASES = dict(shapes_lib.POSITION_PHRASES)


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
                class_list.append(
                    shapes_lib.with_articles(template.format(a="{a}", value=words, **combo))
                )
        prompts.append(class_list)
    return prompts


def label_class_prompts(classes: ClassSpace, data_config) -> tuple[str, list[str]]:
    """(template, one prompt per class) for zero-shot classification over a labelled dataset's
    classes. When the captions are made from a template over exactly the class features (e.g.
    label_key with the default "a photo of a {label}"), each class is captioned as its training
    captions are; otherwise "a photo of a {label}" with the class's name."""
    template = data_config.get("caption_template")
    label_key = data_config.get("label_key")
    if template is None and label_key is not None:
        template = sources.DEFAULT_CAPTION_TEMPLATE
    if template is not None:
        fields = sources.template_fields(template)
        feature_of = {f: label_key if f == "label" and label_key else f for f in fields}
        if fields and set(feature_of.values()) == set(classes.features):
            prompts = []
            for class_id in range(classes.num_classes):
                labels = classes.feature_labels([class_id])
                value = {
                    f: classes.values[i][int(labels[f][0])] for i, f in enumerate(classes.features)
                }
                prompts.append(template.format(**{f: value[feature_of[f]] for f in fields}))
            return template, prompts
    template = sources.DEFAULT_CAPTION_TEMPLATE
    return template, [template.format(label=name) for name in classes.names()]


# ---------------------------------------------------------------------------------------------
# A CLIP model as an embedding function
# ---------------------------------------------------------------------------------------------


class ClipEncoder:
    """A CLIP (our run directory or a Hugging Face CLIP directory) with its tokenizer, turning
    uint8 images and strings into L2-normalised numpy embeddings. Fixed-size jitted batches
    (the last one padded), so any number of inputs compiles one program per input kind."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
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
        model = rundir.load_text_encoder(checkpoint, {"dtype": "float32"})
        tokenizer_dir, _ = rundir.text_encoder_tokenizer(checkpoint)
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
        """uint8 (N, H, W, 3) -> (N, E) normalised image embeddings (resized if H differs); a
        tower trained on clips takes clips (N, T, H, W, 3), their frames on the channel axis as
        in training (`families.clip.frames_on_channels`), and images as still clips."""
        images = np.asarray(images)
        frames_seen = self.model.config.in_channels // 3
        if images.ndim not in ((4, 5) if frames_seen > 1 else (4,)) or images.shape[-1] != 3:
            what = "images must be"
            if frames_seen > 1:
                what = "clips must be (N, T, H, W, 3) or images"
            raise ValueError(f"{what} (N, H, W, 3) uint8, got shape {images.shape}")
        check_uint8(images.reshape(-1, *images.shape[-3:]))
        if frames_seen > 1:
            clips = images if images.ndim == 5 else images[:, None]  # an image: a one-frame clip
            images = clip_family.frames_on_channels(clips, frames_seen)
        return self._batched(self._encode_image, [images])

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """N strings -> (N, E) normalised text embeddings (truncated to the context)."""
        if isinstance(texts, str):  # list("a cat") would embed each character
            raise ValueError(f"texts must be a list of strings, got one string; pass [{texts!r}]")
        tokens, mask = tokenize(self.tokenizer, list(texts), self.context_length)
        return self._batched(self._encode_text, [tokens, mask])

    def zero_shot_classifier(self, attribute: str) -> np.ndarray:
        """(K, E) class embeddings of a shapes attribute (prompt ensembles of class_prompts)."""
        return ensemble_class_embeddings([self.encode_texts(p) for p in class_prompts(attribute)])
