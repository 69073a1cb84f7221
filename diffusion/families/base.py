"""What every model family gives the layers above it: a `ModelBuild` from a recipe.

A family turns a recipe (`config`) and the facts only the data knows (`DataFacts`: image size,
vocabulary, the empty caption's tokens) into the model config, the model class, the loss and,
for a DiT, the frozen text encoder's config. Training, ahead-of-time compilation and inference
all build through it, so a recipe means one model and one loss everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from diffusion import sharding
from diffusion.errors import UserError
from diffusion.train_step import LossFn, TrainStep


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What a recipe's model depends on that the dataset and tokenizer decide."""

    image_size: int
    vocab_size: int
    context_length: int
    empty_tokens: np.ndarray  # (1, L) int32: the empty caption, the unconditional input
    empty_mask: np.ndarray  # (1, L) int32
    image_channels: int = 3  # the input pipeline makes every image RGB (grayscale repeated)
    # A dataset with cached text features: the empty caption's, keyed as its records'
    # (`diffusion.data.latents.text_keys`); None: the text tower runs in the train step.
    empty_text: dict[str, np.ndarray] | None = None
    frames: int = 0  # frames per clip of a dataset of clips (batch key 'video'); 0: images

    @classmethod
    def from_config(cls, config, image_size: int) -> DataFacts:
        """Facts from the recipe alone (no tokenizer file): the configured vocabulary size, and
        an empty caption of a start and an end token, as every CLIP-style tokenizer writes it.
        A recipe without a tokenizer section (a family that reads no text) has no vocabulary."""
        if config.get("tokenizer") is None:
            return cls.without_text(image_size)
        length = int(config.tokenizer.context_length)
        return cls(
            image_size=int(image_size),
            vocab_size=int(config.tokenizer.vocab_size),
            context_length=length,
            empty_tokens=np.zeros((1, length), np.int32),
            empty_mask=(np.arange(length) < 2).astype(np.int32)[None],
        )

    @classmethod
    def without_text(cls, image_size: int) -> DataFacts:
        """Facts of a family that reads images only (the autoencoder): no vocabulary, no caption."""
        empty = np.zeros((1, 0), np.int32)
        return cls(int(image_size), 0, 0, empty, empty)


@dataclasses.dataclass(frozen=True)
class ModelBuild:
    """One family's model and loss for a recipe."""

    family: str
    model_config: Any
    model_class: type
    loss_fn: LossFn
    seed: int
    frozen_config: Any = None  # the read-only model the loss gets (a DiT's text tower), if any
    frozen_class: type | None = None
    # A fine-tune: () -> {parameter path: host array}, the pretrained weights that replace the
    # initial ones; None: training starts from the initialisation.
    base_params: Callable[[], Mapping[tuple, np.ndarray]] | None = None
    trainable: Callable[[tuple], bool] | None = None  # parameter paths trained (None: all)
    # (trained model, run directory) -> None: files a finished run writes beside params/
    # (a LoRA fine-tune's adapters in diffusers' format).
    export: Callable[[nnx.Module, str], None] | None = None

    def train_step(self, config, mesh, tx, frozen: nnx.Module | None = None) -> TrainStep:
        """The sharded train state and jitted step of this build under the recipe's training
        section and sharding rules (`frozen`: the loaded read-only model, if any)."""
        t = config.training
        return TrainStep(
            self.init_model,
            self.loss_fn,
            tx,
            mesh,
            seed=config.seed,
            rules=sharding.rules_from_config(config.mesh),
            ema_decay=t.ema_decay,
            nan_policy=t.nan_policy,
            frozen=frozen,
            trainable=self.trainable,
        )

    def init_frozen(self) -> nnx.Module:
        """The read-only model from shapes alone (for programs that are lowered, never run)."""
        return self.frozen_class(self.frozen_config, rngs=nnx.Rngs(0))

    def init_model(self, model_config=None) -> nnx.Module:
        """A new model of `model_config` (default: the build's own), seeded by the recipe."""
        return self.model_class(model_config or self.model_config, rngs=nnx.Rngs(self.seed))


def model_config_error(error: ValueError, model_section, prefix: str = "config.model") -> UserError:
    """A model config that the model code refused, as a user error naming the recipe's fields."""
    fields = ", ".join(f"{k}={v!r}" for k, v in model_section.items())
    return UserError(
        f"{prefix} ({fields}) does not make a model: {error}. Fix the field it names with "
        f"--{prefix}.FIELD=VALUE."
    )


def check_global_batch(global_batch_size: int, mesh) -> None:
    """The global batch must split evenly over the mesh's batch axes and the processes."""
    axes = sharding.batch_axes(mesh)
    size = math.prod(mesh.shape[a] for a in axes)
    processes = jax.process_count()
    if global_batch_size < 1 or global_batch_size % size or global_batch_size % processes:
        raise UserError(
            f"config.training.global_batch_size={global_batch_size} is not divisible by the "
            f"{size} devices of the mesh's batch axes {axes} (and the {processes} processes); "
            f"use a multiple of {math.lcm(size, processes)}."
        )


def abstract_array(shape, dtype, array_sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=array_sharding)
