"""The autoencoder family: a recipe -> AutoencoderConfig, the first-stage loss of latent diffusion
(a reconstruction term + kl_weight x KL(q(z|x) || N(0, I)), Rombach et al. 2022, sec. 3 and
appendix G, without its perceptual and adversarial terms), and the batch its train step reads.

It reads images, or the frames of clips (a clip's T frames are T images: the per-frame
autoencoder of a latent video DiT). `input_options` says it reads no text, and train.py then
prepares no tokenizer and reads no captions for it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from diffusion import sharding
from diffusion.errors import UserError
from diffusion.families.base import (
    DataFacts,
    ModelBuild,
    abstract_array,
    model_config_error,
)
from diffusion.models.autoencoder import Autoencoder, AutoencoderConfig, autoencoder_config

NAME = "autoencoder"
TAKES_CLIPS = True  # each frame of a clip as an image
RECONSTRUCTION_LOSSES = ("l1", "l2")
# AutoencoderConfig fields a recipe's config.model may set (None keeps the variant's); the image
# size and channels come from the data.
MODEL_FIELDS = (
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "mid_block_add_attention",
    "use_quant_conv",
    "use_post_quant_conv",
    "dtype",
    "attention_impl",
)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def images_of(batch, key: jax.Array, frames_per_clip: int = 0) -> tuple[jax.Array, jax.Array]:
    """(the batch's images (B, H, W, C), the key left for the loss). A batch of clips
    (B, T, H, W, C) gives its B*T frames, or `frames_per_clip` frames of each clip drawn without
    replacement with a key split from `key` (the frames of one clip are nearly alike, so a step
    of few frames from many clips sees more scenes for its cost)."""
    if "video" not in batch:
        return batch["image"], key
    clips = batch["video"]
    count, frames = clips.shape[:2]
    if 0 < frames_per_clip < frames:
        frames_key, key = jax.random.split(key)
        keys = jax.random.split(frames_key, count)
        chosen = jax.vmap(lambda k: jax.random.permutation(k, frames)[:frames_per_clip])(keys)
        clips = jnp.take_along_axis(clips, chosen[:, :, None, None, None], axis=1)
    return clips.reshape((-1,) + clips.shape[2:]), key


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) of each example, summed over its latent elements:
    0.5 * sum(mean^2 + exp(logvar) - 1 - logvar) (Kingma & Welling 2014, appendix B). -> (B,)"""
    terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar  # (B, h, w, latent)
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, mean.ndim)))


def autoencoder_loss(
    model: Autoencoder,
    frozen,
    batch,
    key,
    *,
    reconstruction: str = "l1",
    kl_weight: float = 1e-6,
    frames_per_clip: int = 0,
):
    """The KL autoencoder's loss on a batch of images in [-1, 1] (or of clips: their frames, all
    or `frames_per_clip` of each, `images_of`).

    z = mean + exp(logvar / 2) * eps with eps ~ N(0, I) drawn from the step's key (the
    reparameterisation trick, Kingma & Welling 2014, eq. 10), decoded back to pixels.

    LDM weighs the reconstruction error SUMMED over an image's pixels against kl_weight x the KL
    summed over its latent elements (taming's LPIPSWithDiscriminator; kl_weight = 1e-6 for its
    f=4/8 KL models). This loss is that objective divided by the number of pixel values H*W*C:
    the same optimum and the same meaning of kl_weight, in the units of a per-pixel mean, so the
    learning rate and gradient clipping behave as for any mean loss.

    metrics: reconstruction_loss (per-pixel mean of |x - x_hat| or (x - x_hat)^2) and kl (per
    image, summed over latent elements, LDM's kl_loss); the train step adds the total as loss.
    """
    del frozen
    images, key = images_of(batch, key, frames_per_clip)  # (B, H, W, C) in [-1, 1]
    mean, logvar = model.encode(images)  # (B, h, w, latent) each, float32
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    latents = mean + jnp.exp(0.5 * logvar) * noise  # (B, h, w, latent)
    error = model.decode(latents).astype(jnp.float32) - images  # (B, H, W, C)
    per_pixel = jnp.abs(error) if reconstruction == "l1" else jnp.square(error)
    reconstruction_loss = jnp.mean(per_pixel)
    kl = jnp.mean(kl_divergence(mean, logvar))
    pixel_values = math.prod(images.shape[1:])
    loss = reconstruction_loss + kl_weight * kl / pixel_values
    return loss, {"reconstruction_loss": reconstruction_loss, "kl": kl}


# ---------------------------------------------------------------------------------------------
# The recipe's model and loss
# ---------------------------------------------------------------------------------------------


def model_config(config, data: DataFacts, **overrides) -> AutoencoderConfig:
    """The autoencoder of a recipe: its variant, the fields config.model sets, and the data's
    image size and channels."""
    m = config.model
    fields = {name: m.get(name) for name in MODEL_FIELDS if m.get(name) is not None}
    if "block_out_channels" in fields:  # `--config.model.block_out_channels=32,64` gives strings
        try:
            fields["block_out_channels"] = tuple(int(w) for w in fields["block_out_channels"])
        except ValueError as error:
            raise model_config_error(error, m) from error
    fields.update(
        in_channels=data.image_channels,
        out_channels=data.image_channels,
        sample_size=data.image_size,
    )
    try:
        result = autoencoder_config(m.variant, **{**fields, **overrides})
    except ValueError as error:
        raise model_config_error(error, m) from error
    factor = result.downsampling_factor
    if data.image_size % factor:
        raise UserError(
            f"config.model.block_out_channels={result.block_out_channels} downsamples "
            f"{factor}x, which does not divide the data's image size {data.image_size}; use "
            f"fewer levels (at most {int(math.log2(data.image_size & -data.image_size)) + 1})."
        )
    return result


def loss_options(config) -> dict:
    """The loss's options from config.loss, checked."""
    loss = config.loss
    if loss.reconstruction not in RECONSTRUCTION_LOSSES:
        raise UserError(
            f"config.loss.reconstruction={loss.reconstruction!r}; valid: "
            f"{', '.join(RECONSTRUCTION_LOSSES)}."
        )
    kl_weight = float(loss.kl_weight)
    if not math.isfinite(kl_weight) or kl_weight < 0:
        raise UserError(
            f"config.loss.kl_weight={loss.kl_weight!r} must be a finite number >= 0 (LDM: 1e-6)."
        )
    frames_per_clip = loss.get("frames_per_clip", 0)
    if not isinstance(frames_per_clip, int) or frames_per_clip < 0:
        raise UserError(
            f"config.loss.frames_per_clip={frames_per_clip!r} must be an integer >= 0 (0: every "
            "frame of each clip)."
        )
    return dict(
        reconstruction=loss.reconstruction, kl_weight=kl_weight, frames_per_clip=frames_per_clip
    )


def build(config, data: DataFacts, mesh: Mesh, **model_overrides) -> ModelBuild:
    """The recipe's autoencoder and its loss."""
    del mesh  # the loss is per example: no collective of its own
    options = loss_options(config)
    loss_fn = lambda model, frozen, batch, key: autoencoder_loss(
        model, frozen, batch, key, **options
    )
    return ModelBuild(
        NAME, model_config(config, data, **model_overrides), Autoencoder, loss_fn, config.seed
    )


def abstract_batch(config, mesh: Mesh, build_: ModelBuild, data: DataFacts) -> dict:
    """The global batch the train step reads, as ShapeDtypeStructs sharded over the batch axes."""
    rows = sharding.batch_sharding(mesh)
    batch = int(config.training.global_batch_size)
    size, channels = data.image_size, build_.model_config.in_channels
    if data.frames:
        shape = (batch, data.frames, size, size, channels)
        return {"video": abstract_array(shape, jnp.float32, rows)}
    return {"image": abstract_array((batch, size, size, channels), jnp.float32, rows)}


def input_options(config) -> dict:
    """Pixels only: the input pipeline reads no captions and train.py prepares no tokenizer."""
    del config
    return {"captions": False}
