"""A latent dataset (written by encode.py) as training reads it: each record holds the posterior
of one image under a frozen autoencoder (`latent_mean`, `latent_std`), and the dataset's
`encoding.json` names that autoencoder and the normalisation its latents get.

Training draws z = mean + std * eps afresh for every batch (the posterior, not one fixed sample,
as the DiT and Stable Diffusion trainers do) and feeds the DiT (z - shift) * scale, so that its
inputs have about unit variance; sampling inverts that before the autoencoder decodes.

A dataset encoded with `encode.py --text_encoder=DIR` also holds each caption's features under
that frozen CLIP text tower (TEXT_KEYS), and EMPTY_TEXT_FILE the empty caption's (what condition
dropout puts in their place): a text-conditional DiT then trains without running the tower.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diffusion.errors import UserError

ENCODING_FILE = "encoding.json"
MEAN_KEY = "latent_mean"
STD_KEY = "latent_std"
# A caption's text features: token states (L, D), token mask (L,) int32, pooled embedding (E,) and
# the tower's input-layer word embeddings (L, W), float32 but the mask (int32 as tokenize makes it).
TEXT_CONTEXT_KEY = "text_context"
TEXT_MASK_KEY = "text_mask"
TEXT_POOLED_KEY = "text_pooled"
TEXT_WORDS_KEY = "text_words"
EMPTY_TEXT_FILE = "empty_caption.npz"  # the empty caption's features, keyed as its records'


def text_keys(words: bool) -> tuple[str, ...]:
    """The text features of a record; the word embeddings only where encode.py was asked for
    them (--text_words: only a DiT with word_conditioning reads them, and they are as large as
    the token states)."""
    return (TEXT_CONTEXT_KEY, TEXT_MASK_KEY, TEXT_POOLED_KEY) + ((TEXT_WORDS_KEY,) if words else ())


def text_feature_shapes(
    context_length: int, width: int, embed_dim: int, words: bool
) -> dict[str, tuple[tuple[int, ...], type]]:
    """{key: (shape, dtype)} of one record's text features (`text_keys(words)`), as encode.py
    stores them and the input pipeline stacks them into a batch: from a CLIP text tower of token
    width `width` and pooled size `embed_dim`, captions cut to `context_length` tokens."""
    shapes = {
        TEXT_CONTEXT_KEY: ((context_length, width), np.float32),
        TEXT_MASK_KEY: ((context_length,), np.int32),
        TEXT_POOLED_KEY: ((embed_dim,), np.float32),
        TEXT_WORDS_KEY: ((context_length, width), np.float32),
    }
    return {key: shapes[key] for key in text_keys(words)}


@dataclasses.dataclass(frozen=True)
class LatentEncoding:
    """How the latents of a dataset were made and are normalised."""

    autoencoder: str  # the autoencoder's directory (a run of ours or a diffusers AutoencoderKL)
    scaling_factor: float  # model input = (z - shift_factor) * scaling_factor
    shift_factor: float
    latent_shape: tuple[int, ...]  # (h, w, c) of an image, (T, h, w, c) of a clip
    downsampling_factor: int  # image side / latent side
    # The image dataset encoded (its TFDS name, data_dir and image feature), record for record:
    # evaluation compares samples with its images.
    source: str | None = None
    source_data_dir: str | None = None
    source_image_key: str = "image"
    # With cached text features: the CLIP run (absolute path) that made them, its tokenizer and
    # the context length its captions were cut to; None: the dataset holds no text features.
    text_encoder: str | None = None
    text_tokenizer: str | None = None
    text_context_length: int | None = None
    text_words: bool = False  # whether records hold TEXT_WORDS_KEY
    text_vocabulary: str | None = None  # `tokenizer.vocabulary_digest` of text_tokenizer
    # The CLIP run's newest checkpoint step when it made them (None: a Hugging Face directory,
    # whose weights do not move, or a dataset encoded before the step was recorded).
    text_encoder_step: int | None = None

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> LatentEncoding:
        return cls(
            autoencoder=str(values["autoencoder"]),
            scaling_factor=float(values["scaling_factor"]),
            shift_factor=float(values["shift_factor"]),
            latent_shape=tuple(int(n) for n in values["latent_shape"]),
            downsampling_factor=int(values["downsampling_factor"]),
            source=values.get("source"),
            source_data_dir=values.get("source_data_dir"),
            source_image_key=values.get("source_image_key", "image"),
            text_encoder=values.get("text_encoder"),
            text_tokenizer=values.get("text_tokenizer"),
            text_context_length=values.get("text_context_length"),
            text_words=bool(values.get("text_words", False)),
            text_vocabulary=values.get("text_vocabulary"),
            text_encoder_step=values.get("text_encoder_step"),
        )

    @property
    def frames(self) -> int:
        """Frames per clip of a dataset of latent clips; 0 for one of latent images."""
        return self.latent_shape[0] if len(self.latent_shape) == 4 else 0

    @property
    def text_keys(self) -> tuple[str, ...]:
        """The cached text features of each record (none without a text encoder)."""
        return () if self.text_encoder is None else text_keys(self.text_words)

    def to_json(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), latent_shape=list(self.latent_shape))

    def normalise(self, latents: np.ndarray) -> np.ndarray:
        return (latents - self.shift_factor) * self.scaling_factor

    def model_inputs(self, means: np.ndarray, stds: np.ndarray, rng: np.random.Generator):
        """A draw from each posterior, normalised: (B, [T,] h, w, c) float32."""
        eps = rng.standard_normal(means.shape, dtype=np.float32)
        return self.normalise(means + stds * eps).astype(np.float32)


def read_empty_text(dataset_dir: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The empty caption's text features (`keys`) of a dataset with cached ones."""
    path = os.path.join(dataset_dir, EMPTY_TEXT_FILE)
    try:
        with np.load(path) as stored:
            return {key: np.asarray(stored[key]) for key in keys}
    except (OSError, KeyError, ValueError) as error:
        raise UserError(
            f"{path} is missing or unreadable ({error}); encode the dataset again with "
            "encode.py --text_encoder."
        ) from error


def read_encoding(dataset_dir: str) -> dict[str, Any] | None:
    """encoding.json of a latent dataset's directory (OUTPUT_DIR/NAME/VERSION); None if absent."""
    path = os.path.join(dataset_dir, ENCODING_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is unreadable ({error}); rerun the encode.py command.") from error


def encoding_of(dataset_dir: str, feature_keys: Sequence[str]) -> LatentEncoding | None:
    """The encoding of a dataset whose features hold posteriors; None for any other dataset."""
    if MEAN_KEY not in feature_keys or STD_KEY not in feature_keys:
        return None
    values = read_encoding(dataset_dir)
    if values is None:
        raise UserError(
            f"{dataset_dir} holds latents ({MEAN_KEY}, {STD_KEY}) but no {ENCODING_FILE}: the "
            "encoding did not finish; rerun the same encode.py command to finish it."
        )
    try:
        return LatentEncoding.from_json(values)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(
            f"{os.path.join(dataset_dir, ENCODING_FILE)} lacks {error}: it was written by an "
            "older encode.py; encode the dataset again."
        ) from error


def normalisation(
    statistics: Mapping[str, float], scaling_factor: float | None, shift_factor: float | None
) -> tuple[float, float, str]:
    """(scaling_factor, shift_factor, where they come from): the autoencoder's own factors when
    its config sets them (a pretrained SD or Flux autoencoder), else those that give the train
    split's latents mean 0 and variance 1 (what Rombach et al. did to find SD's 0.18215)."""
    scaling_factor = 1.0 if scaling_factor is None else float(scaling_factor)
    shift_factor = 0.0 if shift_factor is None else float(shift_factor)
    if scaling_factor != 1.0 or shift_factor != 0.0:
        return scaling_factor, shift_factor, "autoencoder config"
    return 1.0 / statistics["std"], statistics["mean"], "train split statistics"


class LatentStatistics:
    """The mean and standard deviation of z = mean + std * eps over every element, from
    per-batch sums (Var z = E[mean^2] + E[std^2] - E[z]^2): no sample is drawn."""

    def __init__(self):
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def add(self, means: np.ndarray, stds: np.ndarray) -> None:
        means, stds = np.asarray(means, np.float64), np.asarray(stds, np.float64)
        self.count += means.size
        self.total += float(means.sum())
        self.squares += float(np.square(means).sum() + np.square(stds).sum())

    def result(self) -> dict[str, float]:
        mean = self.total / self.count
        return {"mean": mean, "std": float(np.sqrt(self.squares / self.count - mean * mean))}
