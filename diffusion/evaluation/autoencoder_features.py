"""Image features from an autoencoder trained here: the flattened posterior mean of its encoder,
the feature space of a Frechet distance beside the CLIP-space one.

CLIP features are trained to keep what captions say and drop the rest; the autoencoder's latents
keep everything the decoder needs to redraw the image (background, exact placement, edges), so a
Frechet distance there also sees what captions leave open. A latent DiT is measured in the space
of the autoencoder it was trained on (its latents.json); a pixel DiT in the space of the one
evaluate.py's --feature_autoencoder names. Flattened, not pooled: where a shape sits is what
pooling would average away. With fewer samples than dimensions (e.g. 512 samples of 64x64 images
through an f = 4 autoencoder: 1024 dimensions) the fitted covariances are rank-deficient and the
distance is biased upwards; compare values measured with the same number of samples.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import rundir
from diffusion.errors import UserError
from diffusion.models.autoencoder import Autoencoder


@dataclasses.dataclass(frozen=True)
class AutoencoderFeatures:
    """An autoencoder's encoder as a feature extractor: uint8 images -> (N, h * w * c)."""

    path: str  # the autoencoder's directory (a run of ours or a diffusers AutoencoderKL)
    source: str  # where the path came from, as errors name it
    model: Autoencoder
    batch_size: int = 64

    @classmethod
    def load(cls, path: str, source: str, batch_size: int = 64) -> AutoencoderFeatures:
        """The autoencoder at `path`; `source` says where the path came from, for errors."""
        try:
            model, _ = rundir.load_autoencoder(path)
        except UserError as error:
            raise UserError(f"{source} is not a usable autoencoder: {error}") from error
        return cls(path, source, model, batch_size)

    def check_resolution(self, resolution: int) -> None:
        """Refuses images this encoder cannot take, before any sampling."""
        config = self.model.config
        factor = config.downsampling_factor
        if config.in_channels != 3 or resolution % factor:
            raise UserError(
                f"{self.source} encodes {config.in_channels}-channel images whose side is "
                f"a multiple of {factor}; the DiT draws {resolution}x{resolution} RGB images. "
                "Pass an autoencoder trained on images of this resolution."
            )

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, S / f * S / f * latent_channels): posterior means."""
        graphdef, state = nnx.split(self.model)
        features = []
        for start in range(0, len(images), self.batch_size):
            chunk = np.asarray(images[start : start + self.batch_size])
            features.append(np.asarray(_posterior_mean(graphdef, state, chunk)))
        return np.concatenate(features).reshape(len(images), -1)


@functools.partial(jax.jit, static_argnums=0)
def _posterior_mean(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    mean, _ = model.encode(images.astype(jnp.float32) / 127.5 - 1.0)  # (B, h, w, c)
    return mean


def feature_autoencoder_path(run_dir: str, flag_value: str | None) -> tuple[str, str] | None:
    """(path, where it came from, for errors) of the autoencoder a DiT run is measured with:
    the flag's, else a latent run's own (latents.json); None for a pixel run without the flag."""
    if flag_value:
        return flag_value, f"--feature_autoencoder={flag_value!r}"
    encoding = rundir.load_latents(run_dir)
    if encoding is None:
        return None
    path = encoding.autoencoder
    return path, f"the autoencoder {path!r} named by {run_dir!r}'s {rundir.LATENTS_FILE}"
