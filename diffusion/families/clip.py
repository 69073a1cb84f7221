"""The CLIP family: a recipe -> CLIPConfig, the contrastive loss over the global batch, and the
batch its train step reads."""

from __future__ import annotations

import jax.numpy as jnp
from jax.sharding import Mesh

from diffusion import contrastive, models, sharding
from diffusion.families.base import (
    DataFacts,
    ModelBuild,
    abstract_array,
    model_config_error,
)

NAME = "clip"


def model_config(config, data: DataFacts, **overrides) -> models.CLIPConfig:
    """The CLIP of a recipe: its variant, the fields config.model sets, the data's image size and
    the tokenizer's vocabulary and context."""
    fields = dict(
        image_size=data.image_size,
        vocab_size=data.vocab_size,
        context_length=data.context_length,
        **models.recipe_fields(config, "clip"),
    )
    try:
        return models.clip_config(config.model.variant, **{**fields, **overrides})
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
    image_emb = model.encode_image(batch["image"])  # (B, E), L2-normalised
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
    del data  # the model config holds the image size and context
    rows = sharding.batch_sharding(mesh)
    batch = int(config.training.global_batch_size)
    m = build_.model_config
    length = m.context_length
    out = {
        "image": abstract_array(
            (batch, m.image_size, m.image_size, m.in_channels), jnp.float32, rows
        ),
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
