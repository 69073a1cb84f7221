"""How well an autoencoder reconstructs held-out images, and the scale of its latents.

    result = reconstruction_metrics(model, images, batch_size=64, labels=labels)

- PSNR and SSIM (Wang et al. 2004) of each image against its reconstruction through the
  posterior mean (no sampling), both in [0, 1] (dm-pix, 11x11 Gaussian window of sigma 1.5 for
  SSIM), averaged over images;
- the shapes oracle on the reconstructions (given the labels): the attributes a latent diffusion
  model trained on these latents could at best get right; of clips (a per-frame autoencoder's),
  the moving-shapes oracle, motion included, on the reconstructed clips;
- the statistics of the latents z ~ q(z | x) over the images (the aggregate posterior, exactly,
  from the posterior means and variances: no sampling): per-channel mean and standard deviation,
  and the `scaling_factor` 1 / std over all channels that LDM multiplies latents by so that a
  diffusion model sees about unit variance (Rombach et al. 2022, sec. 4.3.2), with Flux's
  `shift_factor` (the mean) subtracted first.
"""

from __future__ import annotations

import dataclasses
import os

import dm_pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from diffusion import rundir
from diffusion.data import shapes as shapes_lib
from diffusion.errors import UserError
from diffusion.evaluation import report, video_oracle
from diffusion.evaluation.held_out import load_split_examples
from diffusion.evaluation.shapes_oracle import (
    PROMPTED_ATTRIBUTES,
    attribute_accuracy,
    misreads,
    read_attributes,
)
from diffusion.models.autoencoder import Autoencoder

# An exact copy has an infinite PSNR; the per-image MSE is floored here (100 dB) so that means
# and metrics.json stay finite.
MIN_MSE = 1e-10


def _psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    mse = jnp.maximum(dm_pix.mse(a, b), MIN_MSE)  # (N,)
    return -10.0 * jnp.log10(mse)


def psnr(a, b) -> np.ndarray:
    """Peak signal-to-noise ratio of each image pair (N, H, W, C) in [0, 1]: 10 log10(1 / MSE),
    in dB, capped at 100 dB (an exact copy). -> (N,)"""
    return np.asarray(jax.jit(_psnr)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))


def ssim(a, b) -> np.ndarray:
    """Structural similarity of each image pair (N, H, W, C) in [0, 1] (Wang et al. 2004, eq. 13,
    mean over the valid positions of an 11x11 Gaussian window and over channels). -> (N,)"""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return np.asarray(jax.jit(dm_pix.ssim)(a, b))


@dataclasses.dataclass
class LatentMoments:
    """Running sums over latent positions of the posterior's moments, per channel (float64)."""

    count: int = 0  # latent positions (images x h x w)
    mean_sum: np.ndarray | float = 0.0  # sum of mu, (C,)
    second_moment_sum: np.ndarray | float = 0.0  # sum of E[z^2] = mu^2 + sigma^2, (C,)
    posterior_std_sum: np.ndarray | float = 0.0  # sum of sigma, (C,)

    def add(self, mean: np.ndarray, logvar: np.ndarray) -> None:
        """Posterior means and log-variances (B, h, w, C) of a batch."""
        mean, variance = np.asarray(mean, np.float64), np.exp(np.asarray(logvar, np.float64))
        channels = mean.shape[-1]
        self.count += mean.size // channels
        self.mean_sum = self.mean_sum + mean.reshape(-1, channels).sum(0)
        second = np.square(mean) + variance
        self.second_moment_sum = self.second_moment_sum + second.reshape(-1, channels).sum(0)
        self.posterior_std_sum = self.posterior_std_sum + np.sqrt(variance).reshape(
            -1, channels
        ).sum(0)

    def statistics(self) -> dict:
        """Mean and standard deviation of z ~ q(z | x) over the images, per channel and over all
        channels (law of total variance: Var z = E[mu^2 + sigma^2] - (E z)^2), the implied
        scaling_factor = 1 / std and shift_factor = mean, and the mean posterior sigma."""
        mean = self.mean_sum / self.count  # (C,)
        second = self.second_moment_sum / self.count  # (C,)
        std = np.sqrt(np.maximum(second - np.square(mean), 0.0))
        overall_mean = float(np.mean(mean))
        overall_std = float(np.sqrt(max(float(np.mean(second)) - overall_mean**2, 0.0)))
        return {
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "overall_mean": overall_mean,
            "overall_std": overall_std,
            "scaling_factor": 1.0 / overall_std if overall_std > 0 else None,
            "shift_factor": overall_mean,
            "posterior_std": [float(s) for s in self.posterior_std_sum / self.count],
        }


def _reconstruction_fn(model: Autoencoder):
    """One jitted program: uint8 images -> (posterior mean, logvar, uint8 reconstructions of the
    mean, PSNR, SSIM), the reconstructions rounded as a PNG of them stores them."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images):
        autoencoder = nnx.merge(graphdef, state)
        mean, logvar = autoencoder.encode(images.astype(jnp.float32) / 127.5 - 1.0)
        decoded = autoencoder.decode(mean).astype(jnp.float32)  # (B, H, W, C), about [-1, 1]
        decoded = jnp.clip(jnp.round((decoded + 1.0) * 127.5), 0, 255)
        a, b = images.astype(jnp.float32) / 255.0, decoded / 255.0
        return mean, logvar, decoded.astype(jnp.uint8), _psnr(a, b), dm_pix.ssim(a, b)

    return lambda images: run(state, images)


@dataclasses.dataclass(frozen=True)
class Reconstructions:
    """An autoencoder's reconstructions of N images and what they measure."""

    images: np.ndarray  # (N, H, W, C) uint8 reconstructions
    psnr: np.ndarray  # (N,) dB
    ssim: np.ndarray  # (N,)
    latents: dict  # LatentMoments.statistics()
    latent_shape: tuple[int, ...]  # (h, w, latent_channels)


def reconstruct(model: Autoencoder, images: np.ndarray, batch_size: int = 64) -> Reconstructions:
    """Encodes uint8 images (N, H, W, C) batch by batch, decodes the posterior means and
    measures each reconstruction (as uint8, what a PNG of it holds) against its image."""
    run = _reconstruction_fn(model)
    moments = LatentMoments()
    outputs, psnrs, ssims, latent_shape = [], [], [], None
    for start in range(0, len(images), batch_size):
        mean, logvar, decoded, psnr_, ssim_ = run(np.asarray(images[start : start + batch_size]))
        moments.add(mean, logvar)
        latent_shape = tuple(mean.shape[1:])
        outputs.append(np.asarray(decoded))  # (B, H, W, C) uint8
        psnrs.append(np.asarray(psnr_))
        ssims.append(np.asarray(ssim_))
    return Reconstructions(
        np.concatenate(outputs),
        np.concatenate(psnrs),
        np.concatenate(ssims),
        moments.statistics(),
        latent_shape,
    )


def reconstruction_metrics(
    model: Autoencoder,
    images: np.ndarray,
    batch_size: int = 64,
    labels: dict[str, np.ndarray] | None = None,
) -> tuple[dict, Reconstructions]:
    """(metrics, reconstructions) of uint8 images (N, H, W, C): num_examples, psnr and ssim
    (means over images), psnr_min, latents (`LatentMoments.statistics`) and, with the shapes
    labels, oracle_accuracy {attribute: fraction, all} of the reconstructions, their
    oracle_misreads (`shapes_oracle.misreads`) and real_oracle_accuracy of the images themselves.

    Clips (N, T, H, W, C) are reconstructed frame by frame (the reconstructions come back as
    clips, PSNR and SSIM are means over frames) and read with the moving-shapes oracle given
    its labels (`video_oracle.ATTRIBUTES`); num_examples counts clips."""
    frames = images.shape[1] if images.ndim == 5 else 0
    result = reconstruct(model, images.reshape((-1,) + images.shape[-3:]), batch_size)
    if frames:
        clips = result.images.reshape(images.shape)
        result = dataclasses.replace(result, images=clips)
    metrics = {
        "num_examples": len(images),
        "psnr": float(np.mean(result.psnr)),
        "psnr_min": float(np.min(result.psnr)),
        "ssim": float(np.mean(result.ssim)),
        "latent_shape": list(result.latent_shape),
        "latents": result.latents,
    }
    if labels and frames:
        reading = video_oracle.read_clips(result.images)
        metrics["oracle_accuracy"] = video_oracle.video_accuracy(reading, labels)
        real = video_oracle.read_clips(images)
        metrics["real_oracle_accuracy"] = video_oracle.video_accuracy(real, labels)
    elif labels:
        reading = read_attributes(result.images)
        metrics["oracle_accuracy"] = attribute_accuracy(reading, labels)
        metrics["oracle_misreads"] = misreads(reading, labels)
        metrics["real_oracle_accuracy"] = attribute_accuracy(read_attributes(images), labels)
    return metrics, result


# ---------------------------------------------------------------------------------------------
# evaluate.py on an autoencoder
# ---------------------------------------------------------------------------------------------


def shapes_data_config(resolution: int, data_dir: str) -> ml_collections.ConfigDict:
    """The embedded shapes dataset at `resolution` with the default sizes and seed of a recipe,
    for an autoencoder that comes without a recipe (a diffusers directory)."""
    return ml_collections.ConfigDict(
        dict(
            name="shapes",
            builder_config=str(resolution),
            data_dir=data_dir,
            image_key="image",
            caption_key="caption",
            label_key=None,
            caption_template=None,
            num_train_examples=shapes_lib.DEFAULT_NUM_EXAMPLES["train"],
            num_eval_examples=shapes_lib.DEFAULT_NUM_EXAMPLES["test"],
            where="",
        )
    )


def autoencoder_data(checkpoint: str, run_config, model_config, options):
    """(data config, seed) of the images to reconstruct: the run's dataset, or for a diffusers
    directory (`run_config` None) the shapes dataset at options.resolution (default: its
    sample_size); options.resolution also picks another shapes resolution for a run."""
    resolution = options.resolution
    if run_config is None:
        resolution = resolution or model_config.sample_size
        if resolution not in shapes_lib.RESOLUTIONS:
            given = (
                f"--resolution={resolution}"
                if options.resolution
                else f"its config.json's sample_size {resolution}"
            )
            sizes = ", ".join(map(str, shapes_lib.RESOLUTIONS))
            raise UserError(
                f"{checkpoint!r} is a diffusers autoencoder, evaluated on the shapes dataset, "
                f"whose images are {sizes} px, not {resolution} ({given}); pass "
                "--resolution=16, 32 or 64."
            )
        data = shapes_data_config(resolution, options.data_dir or "data")
        data.where = options.where or ""
        return data, 0
    data = run_config.data.copy_and_resolve_references()
    if options.data_dir:
        data.data_dir = options.data_dir
    if resolution:
        if data.name != "shapes" or resolution not in shapes_lib.RESOLUTIONS:
            raise UserError(
                f"--resolution={resolution} picks a resolution of the shapes dataset "
                f"({', '.join(map(str, shapes_lib.RESOLUTIONS))}); this run's dataset is "
                f"{data.name!r}. Leave --resolution out to use the run's own images."
            )
        data.builder_config = str(resolution)
    return data, int(run_config.seed)


def _pairs_grid(images, reconstructions, right, path: str, columns: int = 8) -> str:
    """Rows of `columns` images, each followed by the row of their reconstructions, framed green
    where `right[i]` (the oracle read reconstruction i right; None: no oracle ran)."""
    tiles, frames = [], []
    for start in range(0, len(images), columns):
        stop = min(start + columns, len(images))
        tiles += [*images[start:stop], *reconstructions[start:stop]]
        frames += [report.NEUTRAL] * (stop - start)
        for i in range(start, stop):
            if right is None:
                frames.append(report.NEUTRAL)
            else:
                frames.append(report.GOOD if right[i] else report.BAD)
    return report.save_grid(np.stack(tiles), path, columns=columns, frame_colors=frames)


def _clip_pairs_grid(clips, reconstructions, right, path: str) -> str:
    """Each clip's frames in a row, followed by the row of its reconstruction's frames, framed
    green where `right[i]` (the oracle read reconstructed clip i right; None: no oracle ran)."""
    frames_per_clip = clips.shape[1]
    tiles, colors = [], []
    for i, (clip, reconstruction) in enumerate(zip(clips, reconstructions, strict=True)):
        tiles += [*clip, *reconstruction]
        verdict = report.NEUTRAL if right is None else (report.GOOD if right[i] else report.BAD)
        colors += [report.NEUTRAL] * frames_per_clip + [verdict] * frames_per_clip
    return report.save_grid(np.stack(tiles), path, columns=frames_per_clip, frame_colors=colors)


def _read_right(reconstructions: np.ndarray, labels) -> np.ndarray | None:
    """(N,) bool: the oracle reads every prompted attribute of each reconstruction as labelled
    (every attribute in every frame, for clips); None without labels."""
    if not labels:
        return None
    if reconstructions.ndim == 5:
        return video_oracle.all_right(video_oracle.read_clips(reconstructions), labels)
    reading = read_attributes(reconstructions)
    return np.all([getattr(reading, a) == labels[a] for a in PROMPTED_ATTRIBUTES], axis=0)


def evaluate_autoencoder_run(checkpoint: str, run_config, options, output_dir: str):
    """PSNR, SSIM, latent statistics and the oracle on reconstructions of each split's first
    options.num_samples images. `run_config`: the run's config.json, None for a diffusers
    directory. -> (metrics, galleries)"""
    if run_config is not None:
        location = rundir.locate_run(checkpoint, "autoencoder run")
        if location.step is not None:
            raise UserError(
                f"evaluate.py measures an autoencoder run's exported weights (params/), not "
                f"checkpoint {location.step}; pass the run directory {location.run_dir!r}."
            )
        checkpoint = location.run_dir
    model, model_config = rundir.load_autoencoder(checkpoint)
    data, seed = autoencoder_data(checkpoint, run_config, model_config, options)
    metrics = {
        "checkpoint_step": None if run_config is None else rundir.latest_step(checkpoint),
        "source": "diffusers" if run_config is None else "run",
        "latent_channels": model_config.latent_channels,
        "downsampling_factor": model_config.downsampling_factor,
        # What the autoencoder's config says; each split's latents give the measured ones.
        "configured_scaling_factor": model_config.scaling_factor,
        "configured_shift_factor": model_config.shift_factor,
        "splits": {},
    }
    galleries = []
    for split in options.splits:
        examples = load_split_examples(data, seed, split, options.num_samples)
        size = examples.images.shape[-3]  # images (N, H, W, C) or clips (N, T, H, W, C)
        if size % model_config.downsampling_factor:
            raise UserError(
                f"{size}x{size} images of {data.name!r} cannot be encoded by this autoencoder, "
                f"which downsamples {model_config.downsampling_factor}x; pass --resolution="
                "a multiple of it."
            )
        metrics["resolution"] = size
        entry, result = reconstruction_metrics(
            model, examples.images, options.batch_size, examples.labels or None
        )
        count = min(options.grid_size, len(examples.images))
        labels = {a: v[:count] for a, v in (examples.labels or {}).items()}
        right = _read_right(result.images[:count], labels)
        name = f"grids/{split}_reconstructions.png"
        draw = _clip_pairs_grid if examples.images.ndim == 5 else _pairs_grid
        draw(examples.images[:count], result.images[:count], right, os.path.join(output_dir, name))
        entry["grid"] = name
        metrics["splits"][split] = entry
        galleries.append({"title": f"{split}: images and reconstructions", "image": name})
    return metrics, galleries
