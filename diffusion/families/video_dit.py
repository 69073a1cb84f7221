"""The video DiT family: a recipe -> VideoDiTConfig, flow matching on clips conditioned on a
frozen CLIP text tower's token states, with caption dropout for guidance, and the batch its
train step reads.

The objective and the text conditioning are the DiT family's (`dit.DiffusionObjective`,
`dit.drop_captions`, `dit.text_condition`): the objectives are rank-generic, so a clip
(B, T, H, W, C) is noised and scored as an image is. The video DiT reads the caption's token
states and mask only (Wan 2.1 has no pooled text input). A dataset of images trains the same
model on one-frame clips (B, 1, H, W, C), so images and clips can share one model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion import models, sharding
from diffusion.errors import UserError
from diffusion.families import dit
from diffusion.families.base import DataFacts, ModelBuild, abstract_array, model_config_error

NAME = "video_dit"
TAKES_CLIPS = True  # and images, as one-frame clips


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def clips_of(batch) -> jax.Array:
    """The batch's clips (B, T, H, W, C); a batch of images as one-frame clips (B, 1, H, W, C)."""
    if "video" in batch:
        return batch["video"]
    return batch["image"][:, None]


def video_model_fn(model):
    """`model_fn(x_t, t, cond)` of the diffusion core, over a text-conditioned video DiT."""

    def model_fn(x, t, cond):
        return model(x, t, context=cond["context"], context_mask=cond["context_mask"])

    return model_fn


def text_conditional_loss(
    model,
    text_encoder,
    batch,
    key,
    *,
    objective: dit.DiffusionObjective,
    empty_tokens: np.ndarray,
    empty_mask: np.ndarray,
    cond_dropout: float,
):
    """The denoising loss of the clips given their captions' token states; a caption becomes the
    empty prompt with probability `cond_dropout` (classifier-free guidance, Ho & Salimans).
    The same keys as the DiT's loss: a one-frame clip is scored as the DiT scores an image."""
    drop_key, loss_key = jax.random.split(key)
    tokens, mask = dit.drop_captions(
        batch["tokens"], batch["mask"], drop_key, cond_dropout, empty_tokens, empty_mask
    )
    cond = dit.text_condition(text_encoder, tokens, mask)  # its pooled embedding goes unread
    loss, aux = objective.loss(video_model_fn(model), clips_of(batch), cond, loss_key)
    return loss, {"mean_t": jnp.mean(aux["t"])}


# ---------------------------------------------------------------------------------------------
# The recipe's model and loss
# ---------------------------------------------------------------------------------------------


def is_text_conditional(config) -> bool:
    """Always: the video DiT is conditioned on text (the training loop asks every DiT family)."""
    del config
    return True


def check_patch_fits(patch_size, data: DataFacts, dataset: str) -> None:
    """The patch's frames must divide the clips' (one for images) and its sides the frame's."""
    pt, ph, pw = patch_size
    frames = data.frames or 1
    side = data.image_size
    if frames % pt or side % ph or side % pw:
        what = f"clips of {frames} frames" if data.frames else "images (one-frame clips)"
        raise UserError(
            f"config.model.patch_size={tuple(patch_size)} (frames, rows, columns) does not tile "
            f"the {what} of {side}x{side} of {dataset!r}; pass a patch whose sizes divide "
            f"({frames}, {side}, {side}), e.g. --config.model.patch_size='(1, 4, 4)'."
        )


def model_config(
    config, data: DataFacts, text_config: models.CLIPConfig, **overrides
) -> models.VideoDiTConfig:
    """The video DiT of a recipe: its variant and the fields config.model sets, on the data's
    channels, reading the token states of the text tower of `text_config`."""
    m = config.model
    fields = dict(
        in_channels=data.image_channels,
        out_channels=data.image_channels,
        text_dim=text_config.text_width,
        **models.recipe_fields(config, NAME),
    )
    if "patch_size" in fields:
        fields["patch_size"] = tuple(int(p) for p in fields["patch_size"])
    try:
        model_config_ = models.video_dit_config(m.variant, **{**fields, **overrides})
    except (ValueError, UserError) as error:
        raise model_config_error(error, m) from error
    check_patch_fits(model_config_.patch_size, data, config.data.name)
    return model_config_


def build(
    config, data: DataFacts, mesh: Mesh, text_config: models.CLIPConfig, **model_overrides
) -> ModelBuild:
    """The recipe's video DiT and its denoising loss on the frozen text tower of `text_config`."""
    del mesh  # the loss is per example: no collective of its own
    if text_config is None:
        raise ValueError("the video DiT is text-conditional: it needs text_config")
    if config.diffusion.objective != "flow":
        raise UserError(
            f"config.diffusion.objective={config.diffusion.objective!r}: the video DiT trains by "
            "flow matching, as Wan 2.1 does; pass --config.diffusion.objective=flow."
        )
    objective = dit.DiffusionObjective.from_config(config.diffusion)
    loss_fn = functools.partial(  # loss_fn(model, frozen, batch, key), as the train step calls it
        text_conditional_loss,
        objective=objective,
        empty_tokens=data.empty_tokens,
        empty_mask=data.empty_mask,
        cond_dropout=float(config.diffusion.cond_dropout),
    )
    return ModelBuild(
        NAME,
        model_config(config, data, text_config, **model_overrides),
        models.VideoDiT,
        loss_fn,
        config.seed,
        frozen_config=text_config,
        frozen_class=models.CLIP,
    )


def abstract_batch(config, mesh: Mesh, build_: ModelBuild, data: DataFacts) -> dict:
    """The global batch the train step reads, as ShapeDtypeStructs sharded over the batch axes."""
    rows = sharding.batch_sharding(mesh)
    batch = int(config.training.global_batch_size)
    side, channels = data.image_size, build_.model_config.in_channels
    if data.frames:
        out = {
            "video": abstract_array((batch, data.frames, side, side, channels), jnp.float32, rows)
        }
    else:
        out = {"image": abstract_array((batch, side, side, channels), jnp.float32, rows)}
    out["tokens"] = abstract_array((batch, data.context_length), jnp.int32, rows)
    out["mask"] = abstract_array((batch, data.context_length), jnp.int32, rows)
    return out


def input_options(config) -> dict:
    """The input pipeline's options: clips (or images) and captions; no class ids."""
    if config.data.get("class_features"):
        raise UserError(
            f"config.data.class_features={tuple(config.data.class_features)} is set, but the "
            "video DiT is conditioned on captions only; pass --config.data.class_features='()'."
        )
    return {}
