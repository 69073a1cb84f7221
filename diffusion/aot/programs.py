"""A recipe's programs for ahead-of-time compilation: its real train step and the very sampling
program sample.py runs, built on abstract inputs (shapes and shardings, no weights), for any mesh
(a TPU slice's compile-only devices in `diffusion.aot.topology`)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffusion import families, inference, models, optim, rundir, sharding
from diffusion.data import latents
from diffusion.data.latents import LatentEncoding
from diffusion.errors import UserError
from diffusion.inference.program import program_spec, sampling_program
from diffusion.inference.settings import DEFAULT_MICRO_BATCH
from diffusion.models.autoencoder import (
    AUTOENCODER_VARIANTS,
    Autoencoder,
    AutoencoderConfig,
)
from diffusion.models.autoencoder import autoencoder_config as autoencoder_variant
from diffusion.train_step import TrainStep


class AOTError(UserError):
    """A topology that cannot be used, or a recipe that does not fit it."""


# ---------------------------------------------------------------------------------------------
# The programs: abstract train step and sampler of a recipe
# ---------------------------------------------------------------------------------------------


def recipe_image_size(config, default: int) -> int:
    """The image side a recipe trains at: config.data.image_size, a shapes builder config such as
    "32", else `default` (the recipe compiles without its dataset)."""
    size = config.data.get("image_size")
    if size:
        return int(size)
    return rundir.builder_resolution(config.data) or default


def text_encoder_config(config) -> models.CLIPConfig:
    """The frozen text tower's CLIP of a text-conditioned DiT recipe, from shapes alone."""
    te = config.text_encoder
    if te.get("variant"):
        return models.clip_config(
            te.variant,
            vocab_size=int(config.tokenizer.vocab_size),
            context_length=int(config.tokenizer.context_length),
            dtype=config.model.dtype,
        )
    if te.checkpoint and os.path.isfile(os.path.join(te.checkpoint, rundir.MODEL_FILE)):
        family, clip_config = rundir.load_model_config(te.checkpoint)
        if family == "clip":
            return clip_config
    raise AOTError(
        "a text-conditioned DiT needs the shapes of its CLIP text tower: set "
        "config.text_encoder.variant (e.g. 'L/14') or config.text_encoder.checkpoint to a CLIP run "
        "directory of train.py."
    )


@dataclasses.dataclass(frozen=True)
class AbstractDecoder:
    """The autoencoder whose decoder sample.py runs after a latent DiT, from shapes alone."""

    graphdef: Any
    state: Any  # ShapeDtypeStructs of the whole autoencoder, as sample.py places it
    encoding: LatentEncoding


def autoencoder_config(config) -> AutoencoderConfig:
    """config.autoencoder of a latent DiT recipe: a row of AUTOENCODER_VARIANTS (`variant`) and
    AutoencoderConfig fields that override it."""
    section = config.get("autoencoder")
    if section is None or not section.get("variant"):
        raise AOTError(
            "a latent DiT (config.model.in_channels != 3) samples through the decoder of the "
            "autoencoder its latents came from: set config.autoencoder.variant to one of "
            f"{sorted(AUTOENCODER_VARIANTS)} (e.g. 'SD', the VAE of encode.py's datasets)."
        )
    fields = {k: v for k, v in section.items() if k != "variant" and v is not None}
    if "block_out_channels" in fields:
        fields["block_out_channels"] = tuple(int(w) for w in fields["block_out_channels"])
    try:
        return autoencoder_variant(section.variant, **fields)
    except ValueError as error:
        raise AOTError(f"config.autoencoder: {error}") from error


def abstract_decoder(config, dit_config, latent_side: int) -> AbstractDecoder | None:
    """The decoder of a latent DiT recipe with abstract weights; None for a pixel DiT."""
    if dit_config.in_channels == 3:
        return None
    ae_config = autoencoder_config(config)
    if ae_config.latent_channels != dit_config.in_channels:
        raise AOTError(
            f"config.autoencoder makes latents of {ae_config.latent_channels} channels but the "
            f"DiT reads {dit_config.in_channels} (config.model.in_channels)."
        )
    abstract = nnx.eval_shape(lambda: Autoencoder(ae_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    encoding = LatentEncoding(
        autoencoder=f"config.autoencoder.variant={config.autoencoder.variant}",
        scaling_factor=ae_config.scaling_factor,
        shift_factor=ae_config.shift_factor or 0.0,
        latent_shape=(latent_side, latent_side, ae_config.latent_channels),
        downsampling_factor=ae_config.downsampling_factor,
    )
    return AbstractDecoder(graphdef, state, encoding)


@dataclasses.dataclass
class Programs:
    """What gets compiled: the train step (and, for a DiT, the sampling program that sample.py
    runs) with abstract arguments."""

    build: families.ModelBuild
    train_step: TrainStep
    train_args: tuple
    sample_fn: Any = None
    sample_args: tuple = ()

    @property
    def family(self) -> str:
        return self.build.family

    @property
    def model_config(self):
        return self.build.model_config


def recipe_facts(config) -> families.DataFacts:
    """What the data would tell the model builder, from the recipe alone: for a text DiT whose
    recipe states that its data carries cached text features (config.data.cached_text), their
    empty caption too, so that the build's loss reads them and its step runs no text tower."""
    default = 32
    if config.family == "clip":
        default = models.CLIP_VARIANTS.get(config.model.variant, {}).get("image_size", 32)
    facts = families.DataFacts.from_config(config, recipe_image_size(config, default))
    if config.family == "video_dit" and rundir.builder_resolution(config.data):
        # An embedded builder config names its clips' frames ("32_8"); else one-frame clips.
        facts = dataclasses.replace(facts, frames=rundir.run_frames(config))
    if config.family == "dit" and families.dit.stated_cached_text(config):
        words = bool(config.model.get("word_conditioning", False))
        empty_text = abstract_empty_text(text_encoder_config(config), facts, words)
        facts = dataclasses.replace(facts, empty_text=empty_text)
    return facts


def abstract_empty_text(
    text_config: models.CLIPConfig, facts: families.DataFacts, words: bool
) -> dict[str, np.ndarray]:
    """The empty caption's cached text features as encode.py stores them for `text_config`'s
    tower (`latents.text_feature_shapes`: the keys, shapes and dtypes of a record's), with the
    empty caption's token mask and zero features: without the tower's weights their values are
    unknown, and they are constants of the step that change none of its shapes or costs. `words`
    only for a DiT that reads them (model.word_conditioning; encode.py --text_words)."""
    shapes = latents.text_feature_shapes(
        facts.context_length, text_config.text_width, text_config.embed_dim, words
    )
    empty = {key: np.zeros(shape, dtype) for key, (shape, dtype) in shapes.items()}
    empty[latents.TEXT_MASK_KEY] = np.asarray(facts.empty_mask[0], np.int32)  # (L,)
    return empty


def build_programs(
    config, mesh, *, sample_batch: int | None = None, model_overrides: Mapping | None = None
) -> Programs:
    """The recipe's real train step (and sampler, for a DiT) over abstract inputs on `mesh`,
    built through the family registry as train.py builds it.

    model_overrides: model config fields to change (the depth twins of `extrapolated_cost`).
    """
    if config.family not in families.FAMILIES:
        raise AOTError(
            f"config.family={config.family!r}; AOT compiles one of {sorted(families.FAMILIES)}."
        )
    families.check_global_batch(int(config.training.global_batch_size), mesh)
    family = families.get(config.family)
    facts = recipe_facts(config)
    overrides = dict(model_overrides or {})
    if config.family in ("dit", "video_dit"):  # the DiT families read a frozen text tower
        text_config = text_encoder_config(config) if family.is_text_conditional(config) else None
        build = family.build(config, facts, mesh, text_config, **overrides)
    else:
        build = family.build(config, facts, mesh, **overrides)
    tx = optim.make_optimizer(config.optimizer, total_steps=config.training.num_steps)
    train_step = build.train_step(config, mesh, tx)
    if build.frozen_config is not None:  # abstract: TrainStep(frozen=...) would device_put one
        train_step.use_abstract_frozen(build.init_frozen)
    batch = family.abstract_batch(config, mesh, build, facts)
    programs = Programs(
        build, train_step, (train_step.abstract_state, batch, train_step.frozen_state)
    )
    if config.family == "dit":
        text_tower = abstract_text_tower(config, train_step)
        programs.sample_fn, programs.sample_args = sampler_program(
            config, mesh, train_step, build, facts, sample_batch, text_tower
        )
    return programs


def abstract_text_tower(config, train_step) -> tuple[Any, Any]:
    """(graphdef, abstract state) of the text tower that sample.py runs on prompts: the train
    step's frozen one, or, where the step reads cached text features and has none, the same
    CLIP from shapes alone, sharded by the recipe's rules as the step would shard it;
    (None, None) for a class-conditional DiT."""
    if train_step.frozen_graphdef is not None:
        return train_step.frozen_graphdef, train_step.frozen_state
    if not families.dit.is_text_conditional(config):
        return None, None
    text_config = text_encoder_config(config)
    graphdef, state, _ = sharding.abstract_state(
        lambda: models.CLIP(text_config, rngs=nnx.Rngs(0)), train_step.mesh, train_step.rules
    )
    return graphdef, state


def sampler_settings(config) -> inference.SamplerSettings:
    """config.sampling as sample.py would resolve it for this recipe's model."""
    d = config.diffusion
    return inference.make_settings(
        d.objective,
        sampler=config.sampling.sampler,
        steps=int(config.sampling.steps),
        default_shift=float(d.get("shift", 1.0) or 1.0),
        num_timesteps=int(d.num_timesteps) if d.objective == "ddpm" else None,
    )


def sampler_program(config, mesh, train_step, build, facts, sample_batch, text_tower):
    """(the sampling program, its abstract arguments (DiT weights, text tower weights, inputs,
    spec, autoencoder weights)): `inference.program.sampling_program`, the one sample.py and
    evaluate.py run, over the EMA weights replicated on every device as TextToImage places them;
    a latent DiT's samples are decoded by config.autoencoder's decoder, replicated likewise.
    `text_tower`: (graphdef, abstract state) of `abstract_text_tower`."""
    settings = sampler_settings(config)
    micro_batch = DEFAULT_MICRO_BATCH
    unit = micro_batch * math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    batch = -(-(sample_batch or unit) // unit) * unit  # whole micro-batches on every device
    text_graphdef, text_tower_state = text_tower
    decoder = abstract_decoder(config, build.model_config, facts.image_size)
    spec = program_spec(
        train_step.graphdef,
        text_graphdef,
        build.model_config,
        config.diffusion,
        resolution=facts.image_size,
        mesh=mesh,
        micro_batch=micro_batch,
        settings=settings,
        decoder_graphdef=None if decoder is None else decoder.graphdef,
        latents=None if decoder is None else decoder.encoding,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = sharding.batch_sharding(mesh)
    state = train_step.abstract_state
    params = state["ema"] if state["ema"] is not None else state["params"]
    as_replicated = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree
    )
    per_sample = lambda dtype, *shape: families.base.abstract_array((batch, *shape), dtype, rows)
    inputs = {"seeds": per_sample(jnp.uint32), "scales": per_sample(jnp.float32)}
    if text_graphdef is None:
        inputs.update(labels=per_sample(jnp.int32), uncond_labels=per_sample(jnp.int32))
    else:
        length = facts.context_length
        for name in ("tokens", "mask", "negative_tokens", "negative_mask"):
            inputs[name] = per_sample(jnp.int32, length)
    text_state = None if text_graphdef is None else as_replicated(text_tower_state)
    decoder_state = None if decoder is None else as_replicated(decoder.state)
    return sampling_program, (as_replicated(params), text_state, inputs, spec, decoder_state)
