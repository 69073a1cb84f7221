"""The DiT family: a recipe -> DiTConfig (text- or class-conditional), the denoising objective of
config.diffusion (flow matching or DDPM) with condition dropout for guidance, and the batch its
train step reads.

A text-conditional DiT reads a frozen CLIP text tower's token states and pooled embedding (and,
with `word_conditioning`, its word embeddings); a class-conditional one reads integer labels, the
null class `num_classes` standing for "no label" (DiT's LabelEmbedder).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion import models, objectives, sharding
from diffusion.data import latents
from diffusion.data.classes import class_features_of
from diffusion.errors import UserError
from diffusion.families.base import (
    DataFacts,
    ModelBuild,
    abstract_array,
    model_config_error,
)
from diffusion.schedules import DiscreteSchedule

NAME = "dit"
TAKES_CLIPS = False  # images (or their latents) only


# ---------------------------------------------------------------------------------------------
# The objective and the losses
# ---------------------------------------------------------------------------------------------


def prediction_type_of(diffusion_config) -> str:
    """What the DiT of a recipe's config.diffusion predicts (objectives.PREDICTION_TYPES).

    Flow models predict config.diffusion.flow_prediction_type (runs written before that field
    existed predict the velocity); DDPM models config.diffusion.prediction_type.
    """
    d = diffusion_config
    if d.objective == "flow":
        return d.get("flow_prediction_type", "flow_velocity")
    return d.prediction_type


@dataclasses.dataclass(frozen=True)
class DiffusionObjective:
    """How the DiT is trained: flow matching or a DDPM-style loss, from config.diffusion."""

    objective: str = "flow"
    prediction_type: str = "flow_velocity"  # see objectives.PREDICTION_TYPES
    schedule: DiscreteSchedule | None = None
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    flow_loss_space: str = "prediction"  # see objectives.FLOW_LOSS_SPACES
    min_snr_gamma: float | None = None

    @classmethod
    def from_config(cls, diffusion_config) -> DiffusionObjective:
        """The objective of a recipe's config.diffusion section."""
        d = diffusion_config
        if d.objective not in ("flow", "ddpm"):
            raise UserError(f"config.diffusion.objective={d.objective!r}; valid: 'flow', 'ddpm'.")
        prediction_type = prediction_type_of(d)
        if d.objective == "flow" and prediction_type not in objectives.FLOW_PREDICTION_TYPES:
            raise UserError(
                f"config.diffusion.flow_prediction_type={prediction_type!r}; valid: "
                f"{', '.join(objectives.FLOW_PREDICTION_TYPES)}."
            )
        flow_loss_space = d.get("flow_loss_space", "prediction")
        if d.objective == "flow" and flow_loss_space not in objectives.FLOW_LOSS_SPACES:
            raise UserError(
                f"config.diffusion.flow_loss_space={flow_loss_space!r}; valid: "
                f"{', '.join(objectives.FLOW_LOSS_SPACES)}."
            )
        schedule = None
        if d.objective == "ddpm":
            schedule = DiscreteSchedule.from_name(
                d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr
            )
        return cls(
            objective=d.objective,
            prediction_type=prediction_type,
            schedule=schedule,
            time_sampling=d.time_sampling,
            logit_mean=d.logit_normal_mean,
            logit_std=d.logit_normal_std,
            shift=d.shift,
            flow_loss_space=flow_loss_space,
            min_snr_gamma=d.get("min_snr_gamma") or None,  # DDPM only: a flow recipe may lack it
        )

    def loss(self, model_fn, x0, cond, key):
        if self.objective == "flow":
            return objectives.flow_matching_loss(
                model_fn,
                x0,
                cond,
                key,
                time_sampling=self.time_sampling,
                logit_mean=self.logit_mean,
                logit_std=self.logit_std,
                shift=self.shift,
                prediction_type=self.prediction_type,
                loss_space=self.flow_loss_space,
            )
        return objectives.diffusion_loss(
            model_fn,
            x0,
            cond,
            key,
            schedule=self.schedule,
            prediction_type=self.prediction_type,
            min_snr_gamma=self.min_snr_gamma,
        )


def text_condition(text_encoder, tokens, mask, *, words: bool = False) -> dict[str, jax.Array]:
    """What the DiT sees of a caption: token states for cross-attention, the pooled embedding
    and, with `words` (a DiT with `word_conditioning`), the tower's input-layer word embeddings."""
    states, pooled = text_encoder.text_states(tokens, mask)
    cond = {
        "context": jax.lax.stop_gradient(states),
        "context_mask": mask,
        "pooled": jax.lax.stop_gradient(pooled),
    }
    if words:
        cond["words"] = jax.lax.stop_gradient(text_encoder.word_embeddings(tokens))
    return cond


def drop_captions(tokens, mask, key, cond_dropout: float, empty_tokens, empty_mask):
    """(tokens, mask) (B, L) with each caption replaced by the empty one with probability
    `cond_dropout`, which teaches the unconditional model that guidance needs (Ho & Salimans)."""
    drop = jax.random.bernoulli(key, cond_dropout, (tokens.shape[0], 1))  # (B, 1)
    tokens = jnp.where(drop, jnp.asarray(empty_tokens, tokens.dtype), tokens)  # (B, L)
    mask = jnp.where(drop, jnp.asarray(empty_mask, mask.dtype), mask)  # (B, L)
    return tokens, mask


def dit_model_fn(model):
    """`model_fn(x_t, t, cond)` of the diffusion core, over a text-conditioned DiT."""

    def model_fn(x, t, cond):
        return model(
            x,
            t,
            context=cond["context"],
            context_mask=cond["context_mask"],
            pooled=cond["pooled"],
            words=cond.get("words"),  # the DiT names a missing or unexpected one
        )

    return model_fn


def text_conditional_loss(
    model,
    text_encoder,
    batch,
    key,
    *,
    objective: DiffusionObjective,
    empty_tokens: np.ndarray,
    empty_mask: np.ndarray,
    cond_dropout: float,
):
    """Denoising loss with condition dropout: a caption becomes the empty prompt with probability
    `cond_dropout`, which teaches the unconditional model that guidance needs (Ho & Salimans)."""
    drop_key, loss_key = jax.random.split(key)
    tokens, mask = drop_captions(
        batch["tokens"], batch["mask"], drop_key, cond_dropout, empty_tokens, empty_mask
    )
    cond = text_condition(text_encoder, tokens, mask, words=model.config.word_conditioning)
    loss, aux = objective.loss(dit_model_fn(model), batch["image"], cond, loss_key)
    return loss, {"mean_t": jnp.mean(aux["t"])}


def cached_text_conditional_loss(
    model,
    frozen,
    batch,
    key,
    *,
    objective: DiffusionObjective,
    empty_text: dict[str, np.ndarray],
    cond_dropout: float,
):
    """`text_conditional_loss` over text features cached in the batch (encode.py
    --text_encoder): no text tower runs. A dropped caption takes the empty caption's cached
    features, with the same draw as there, so both give the same loss."""
    del frozen
    drop_key, loss_key = jax.random.split(key)
    mask = batch[latents.TEXT_MASK_KEY]  # (B, L)
    drop = jax.random.bernoulli(drop_key, cond_dropout, (mask.shape[0], 1))  # (B, 1)

    def feature(name, batch_key):
        value, empty = batch[batch_key], jnp.asarray(empty_text[batch_key], batch[batch_key].dtype)
        where = drop.reshape(drop.shape + (1,) * (value.ndim - 2))  # (B, 1[, 1])
        return name, jnp.where(where, empty, value)

    cond = dict(
        [
            feature("context", latents.TEXT_CONTEXT_KEY),  # (B, L, D)
            feature("context_mask", latents.TEXT_MASK_KEY),  # (B, L)
            feature("pooled", latents.TEXT_POOLED_KEY),  # (B, E)
        ]
    )
    if model.config.word_conditioning:
        cond.update([feature("words", latents.TEXT_WORDS_KEY)])  # (B, L, W)
    loss, aux = objective.loss(dit_model_fn(model), batch["image"], cond, loss_key)
    return loss, {"mean_t": jnp.mean(aux["t"])}


def class_conditional_loss(
    model,
    frozen,
    batch,
    key,
    *,
    objective: DiffusionObjective,
    num_classes: int,
    cond_dropout: float,
):
    """Denoising loss of a class-conditional DiT: a label becomes the null class `num_classes`
    with probability `cond_dropout` (DiT's LabelEmbedder token drop, for guidance)."""
    del frozen
    drop_key, loss_key = jax.random.split(key)
    labels = batch["label"]  # (B,)
    drop = jax.random.bernoulli(drop_key, cond_dropout, labels.shape)
    labels = jnp.where(drop, num_classes, labels)  # (B,)
    model_fn = lambda x, t, cond: model(x, t, labels=cond)
    loss, aux = objective.loss(model_fn, batch["image"], labels, loss_key)
    return loss, {"mean_t": jnp.mean(aux["t"])}


# ---------------------------------------------------------------------------------------------
# The recipe's model and loss
# ---------------------------------------------------------------------------------------------


def is_text_conditional(config) -> bool:
    return int(config.model.num_classes) == 0


def stated_cached_text(config) -> bool | None:
    """config.data.cached_text of a DiT recipe: True where it states that its dataset's records
    carry each caption's cached text features (encode.py --text_encoder; the train step then runs
    no text tower), False where they do not, None where it leaves that to the dataset (as runs
    written before the field existed do)."""
    stated = config.data.get("cached_text")
    if stated is None:
        return None
    if stated and not is_text_conditional(config):
        raise UserError(
            f"config.data.cached_text=True states that the dataset carries cached text features, "
            f"but config.model.num_classes={config.model.num_classes} makes a class-conditional "
            "DiT, which reads no text. Pass --config.data.cached_text=false, or "
            "--config.model.num_classes=0 for a text-conditional DiT."
        )
    return bool(stated)


def model_config(
    config, data: DataFacts, text_config: models.CLIPConfig | None, **overrides
) -> models.DiTConfig:
    """The DiT of a recipe: its variant and the fields config.model sets, conditioned on the text
    tower of `text_config` (a text-conditional recipe) or on config.model.num_classes labels."""
    m = config.model
    if text_config is not None:
        conditioning = dict(
            conditioning="text",
            context_dim=text_config.text_width,
            pooled_dim=text_config.embed_dim,
            word_conditioning=bool(m.get("word_conditioning", False)),
        )
    else:
        conditioning = dict(conditioning="class", num_classes=int(m.num_classes))
    fields = dict(
        in_channels=int(m.get("in_channels") or data.image_channels),
        learn_sigma=bool(m.get("learn_sigma", False)),
        output_conv=bool(m.get("output_conv", False)),
        **models.recipe_fields(config, "dit"),
        **conditioning,
    )
    try:
        model_config_ = models.dit_config(m.variant, **{**fields, **overrides})
    except ValueError as error:
        raise model_config_error(error, m) from error
    if data.image_size % model_config_.patch_size:
        raise UserError(
            f"config.model.patch_size={model_config_.patch_size} does not tile the "
            f"{data.image_size}x{data.image_size} inputs of {config.data.name!r}; pass a patch "
            f"size that divides {data.image_size}, e.g. --config.model.patch_size=2."
        )
    return model_config_


def build(
    config,
    data: DataFacts,
    mesh: Mesh,
    text_config: models.CLIPConfig | None,
    **model_overrides,
) -> ModelBuild:
    """The recipe's DiT and its denoising loss. `text_config`: the frozen text tower's config (a
    text-conditional recipe) or None (class-conditional). With `data.empty_text` (a dataset of
    cached text features) the loss reads those and the build has no frozen model."""
    del mesh  # the DiT's loss is per example: no collective of its own
    if is_text_conditional(config) != (text_config is not None):
        raise ValueError("a text-conditional DiT needs text_config, a class-conditional one not")
    model_config_ = model_config(config, data, text_config, **model_overrides)
    objective = DiffusionObjective.from_config(config.diffusion)
    cond_dropout = float(config.diffusion.cond_dropout)
    # loss_fn(model, frozen, batch, key), as the train step calls it.
    if text_config is None:
        loss_fn = functools.partial(
            class_conditional_loss,
            objective=objective,
            num_classes=model_config_.num_classes,
            cond_dropout=cond_dropout,
        )
    elif data.empty_text is not None:  # cached text features: the tower is not in the step
        loss_fn = functools.partial(
            cached_text_conditional_loss,
            objective=objective,
            empty_text=data.empty_text,
            cond_dropout=cond_dropout,
        )
    else:
        loss_fn = functools.partial(
            text_conditional_loss,
            objective=objective,
            empty_tokens=data.empty_tokens,
            empty_mask=data.empty_mask,
            cond_dropout=cond_dropout,
        )
    frozen_config = text_config if data.empty_text is None else None  # what the step runs
    return ModelBuild(
        NAME,
        model_config_,
        models.DiT,
        loss_fn,
        config.seed,
        frozen_config=frozen_config,
        frozen_class=models.CLIP if frozen_config is not None else None,
    )


def abstract_batch(config, mesh: Mesh, build_: ModelBuild, data: DataFacts) -> dict:
    """The global batch the train step reads, as ShapeDtypeStructs sharded over the batch axes."""
    rows = sharding.batch_sharding(mesh)
    batch = int(config.training.global_batch_size)
    m = build_.model_config
    size = data.image_size
    out = {"image": abstract_array((batch, size, size, m.in_channels), jnp.float32, rows)}
    if m.conditioning == "text":
        length = data.context_length
        out["tokens"] = abstract_array((batch, length), jnp.int32, rows)
        out["mask"] = abstract_array((batch, length), jnp.int32, rows)
        for key, empty in (data.empty_text or {}).items():  # cached text features
            out[key] = abstract_array((batch, *empty.shape), empty.dtype, rows)
    else:
        out["label"] = abstract_array((batch,), jnp.int32, rows)
    return out


def input_options(config) -> dict:
    """The input pipeline's options this family's loss needs: images and captions (text), or
    images and class ids without captions (class-conditional: `data.classes.class_features_of`
    names the features a class is made of)."""
    features = class_features_of(config.data)
    if is_text_conditional(config):
        if config.data.get("class_features"):
            raise UserError(
                f"config.data.class_features={tuple(config.data.class_features)} is set but "
                "config.model.num_classes=0 makes a text-conditional DiT, which reads captions. "
                "Set config.model.num_classes to the number of classes to train a "
                "class-conditional DiT, or config.data.class_features=() for text."
            )
        return {}
    return {"captions": False, "class_features": features}
