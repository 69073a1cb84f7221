"""The CLIP family: a recipe -> CLIPConfig, the contrastive loss over the global batch, and the
batch its train step reads.

On a dataset of clips the image tower sees a few frames of each clip stacked on the channel
axis (`frames_on_channels`): the text tower must learn the motion words of the captions ("moves
up", "grows", "quickly"), which no single frame shows. The embedded clips move along a straight
line at a constant speed, or grow or shrink steadily, so the first and last frames already fix
the direction, the speed and the growth; stacked on channels they cost the tower only a wider
patch projection (the same tokens), where frames as extra tokens would multiply its attention.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion import contrastive, models, sharding
from diffusion.errors import UserError
from diffusion.families.base import (
    DataFacts,
    ModelBuild,
    abstract_array,
    model_config_error,
)

NAME = "clip"
TAKES_CLIPS = True  # a dataset of clips: the tower sees frames stacked on channels
DEFAULT_VIDEO_FRAMES = 2  # the first and the last frame (a recipe without video_frames)


def frame_indices(clip_frames: int, frames_seen: int) -> np.ndarray:
    """`frames_seen` evenly spaced frame indices of a clip of `clip_frames`, the first and (for
    two or more) the last included."""
    return np.round(np.linspace(0, clip_frames - 1, frames_seen)).astype(np.int32)


def frames_on_channels(video, frames_seen: int):
    """(B, T, H, W, C) clips -> (B, H, W, frames_seen * C): the frames of `frame_indices`, frame
    after frame on the channel axis (numpy in, numpy out; jax in, jax out)."""
    batch, clip_frames, height, width, channels = video.shape
    picked = video[:, frame_indices(clip_frames, frames_seen)]  # (B, k, H, W, C)
    picked = picked.transpose(0, 2, 3, 1, 4)  # (B, H, W, k, C)
    return picked.reshape(batch, height, width, frames_seen * channels)


def image_tower_input(batch, model_config: models.CLIPConfig):
    """What the image tower reads of a batch: its images, or its clips' frames on channels (as
    many frames as the tower's in_channels hold RGB triples)."""
    if "video" in batch:
        return frames_on_channels(batch["video"], model_config.in_channels // 3)
    return batch["image"]  # (B, H, W, C)


def frames_seen_of(config, data: DataFacts) -> int:
    """Frames of a clip the image tower sees (config.model.video_frames); 1 for images."""
    if not data.frames:
        return 1
    frames_seen = config.model.get("video_frames")
    frames_seen = DEFAULT_VIDEO_FRAMES if frames_seen is None else int(frames_seen)
    if not 1 <= frames_seen <= data.frames:
        raise UserError(
            f"config.model.video_frames={frames_seen}, but the clips of {config.data.name!r} "
            f"have {data.frames} frames; pass a value from 1 to {data.frames} (2: the first and "
            "the last frame)."
        )
    return frames_seen


def model_config(config, data: DataFacts, **overrides) -> models.CLIPConfig:
    """The CLIP of a recipe: its variant, the fields config.model sets, the data's image size and
    the tokenizer's vocabulary and context; on clips, an image tower whose input holds
    `frames_seen_of` RGB frames."""
    fields = dict(
        image_size=data.image_size,
        vocab_size=data.vocab_size,
        context_length=data.context_length,
        **models.recipe_fields(config, "clip"),
    )
    frames_seen = frames_seen_of(config, data)
    try:
        clip_config = models.clip_config(config.model.variant, **{**fields, **overrides})
        if frames_seen == 1:
            return clip_config
        return dataclasses.replace(  # each frame normalised as the variant normalises an image
            clip_config,
            in_channels=clip_config.in_channels * frames_seen,
            pixel_mean=tuple(clip_config.pixel_mean) * frames_seen,
            pixel_std=tuple(clip_config.pixel_std) * frames_seen,
        )
    except ValueError as error:
        raise model_config_error(error, config.model) from error


def clip_loss(
    model,
    frozen,
    batch,
    key,
    *,
    kind: str = "softmax",
    mesh: Mesh | None = None,
    chunked: bool = False,
    multi_positive: bool = False,
):
    """Contrastive loss over the GLOBAL batch (every image against every caption).

    Under jit with the batch sharded over devices the plain formula already is global; the chunked
    variant (a ring of ppermutes) gives the same loss and gradients without the B x B matrix.
    A batch with 'negative_caption_tokens' / 'negative_caption_mask' (each caption with one word
    swapped, data.input_pipeline) also scores every image against its own swapped caption.
    `multi_positive`: pairs whose captions have identical token ids are positives of each other
    (a labelled dataset's captions made from class names); unique captions give the same loss.
    """
    del frozen, key
    image_emb = model.encode_image(image_tower_input(batch, model.config))  # (B, E), normalised
    text_emb = model.encode_text(batch["tokens"], batch["mask"])  # (B, E)
    negative_emb = None
    if "negative_caption_tokens" in batch:
        negative_emb = model.encode_text(
            batch["negative_caption_tokens"], batch["negative_caption_mask"]
        )
    log_scale = model.logit_scale[...]  # clamped at ln(100) inside the losses
    bias = model.logit_bias[...] if kind == "sigmoid" else None
    caption_tokens = None
    if multi_positive:  # the ids the text tower reads; padding made unlike any token
        caption_tokens = jnp.where(batch["mask"] > 0, batch["tokens"], -1)  # (B, L)
    if chunked:
        loss = contrastive.ring_contrastive_loss(
            kind, image_emb, text_emb, log_scale, bias, negative_emb, caption_tokens, mesh=mesh
        )
    else:
        loss = contrastive.contrastive_loss(
            kind, image_emb, text_emb, log_scale, bias, negative_emb, caption_tokens
        )
    scale = jnp.exp(contrastive.clamp_logit_scale(log_scale))
    return loss, {"logit_scale": scale}


def build(config, data: DataFacts, mesh: Mesh, **model_overrides) -> ModelBuild:
    """The recipe's CLIP and its contrastive loss on `mesh`."""
    loss = config.loss
    # A run directory written before the option existed resumes with the loss it was trained on.
    multi_positive = bool(loss.get("multi_positive", False))
    loss_fn = lambda model, frozen, batch, key: clip_loss(
        model,
        frozen,
        batch,
        key,
        kind=loss.kind,
        mesh=mesh,
        chunked=loss.chunked,
        multi_positive=multi_positive,
    )
    return ModelBuild(
        NAME, model_config(config, data, **model_overrides), models.CLIP, loss_fn, config.seed
    )


def abstract_batch(config, mesh: Mesh, build_: ModelBuild, data: DataFacts) -> dict:
    """The global batch the train step reads, as ShapeDtypeStructs sharded over the batch axes."""
    rows = sharding.batch_sharding(mesh)
    batch = int(config.training.global_batch_size)
    m = build_.model_config
    length = m.context_length
    side = m.image_size
    if data.frames:
        key, shape = "video", (batch, data.frames, side, side, data.image_channels)
    else:
        key, shape = "image", (batch, side, side, m.in_channels)
    out = {
        key: abstract_array(shape, jnp.float32, rows),
        "tokens": abstract_array((batch, length), jnp.int32, rows),
        "mask": abstract_array((batch, length), jnp.int32, rows),
    }
    if config.loss.get("negative_caption_attributes"):
        out["negative_caption_tokens"] = abstract_array((batch, length), jnp.int32, rows)
        out["negative_caption_mask"] = abstract_array((batch, length), jnp.int32, rows)
    return out


def input_options(config) -> dict:
    """The input pipeline's options this family's loss needs (NegCLIP captions, twins)."""
    return dict(
        hard_negative_attributes=tuple(config.loss.get("hard_negative_attributes", ())),
        negative_caption_attributes=tuple(config.loss.get("negative_caption_attributes", ())),
    )
