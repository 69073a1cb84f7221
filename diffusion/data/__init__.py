"""Data: the embedded captioned-shapes TFDS dataset, the tokenizer and the grain input pipeline.

Importing this package registers the `shapes` builder with TFDS.
"""

from diffusion.data import shapes  # noqa: F401  (registers the "shapes" TFDS builder)
