"""encode.py's offline job: a TFDS image dataset -> a TFDS dataset of autoencoder latents."""

from diffusion.encoding.job import EncodeOptions, EncodingStopped, check_images, encode_dataset
from diffusion.encoding.latent_dataset import (
    LatentDatasetWriter,
    PlanChanged,
    latent_features,
    read_encoding,
)

__all__ = [
    "EncodeOptions",
    "EncodingStopped",
    "LatentDatasetWriter",
    "PlanChanged",
    "check_images",
    "encode_dataset",
    "latent_features",
    "read_encoding",
]
