"""Data: the embedded captioned-shapes TFDS dataset, the tokenizer and the grain input pipeline.

Importing this package registers the `shapes` and `moving_shapes` builders with TFDS, so that
`tfds.builder("shapes", data_dir=...)` works.
"""

from diffusion.data import (
    moving_shapes,  # noqa: F401  (registers "moving_shapes" with TFDS)
    shapes,  # noqa: F401  (registers the "shapes" TFDS builder)
)
from diffusion.data.classes import ClassSpace, class_features_of
from diffusion.data.input_pipeline import make_input_pipeline, to_global_batch
from diffusion.data.sources import SourceConfig, build_dataset, tfds_name
from diffusion.data.tokenizer import (
    load_tokenizer,
    longest_caption,
    tokenize,
    train_caption_tokenizer,
    vocabulary_digest,
)

__all__ = [
    "ClassSpace",
    "SourceConfig",
    "build_dataset",
    "class_features_of",
    "load_tokenizer",
    "longest_caption",
    "make_input_pipeline",
    "tfds_name",
    "to_global_batch",
    "tokenize",
    "train_caption_tokenizer",
    "vocabulary_digest",
]
