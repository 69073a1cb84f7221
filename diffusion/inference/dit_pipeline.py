"""What every DiT sampling pipeline shares, text- or class-conditional: the DiT's weights read
from a run directory and replicated on a mesh, the sampler settings of its objective, and
batches run through the one sampling program (`diffusion.inference.program`) in whole
micro-batches.

`TextToImage` (text2image.py) adds a tokenizer and a frozen text tower; `ClassToImage`
(class2image.py) the run's classes. Either way an image is a pure function of (weights,
condition, seed, settings): never of the batch size or the device count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion import checkpoints, meshes, models, rundir, sharding
from diffusion.data.latents import LatentEncoding
from diffusion.errors import UserError
from diffusion.families import dit as dit_family
from diffusion.inference import program as program_lib
from diffusion.inference.program import (
    ProgramSpec,
    discrete_schedule,
    pad_rows,
    program_spec,
    sampling_program,
)
from diffusion.inference.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MICRO_BATCH,
    SAMPLERS_BY_OBJECTIVE,
    SamplerSettings,
    SamplingError,
    make_settings,
)
from diffusion.models import lora
from diffusion.models.autoencoder import Autoencoder

logger = logging.getLogger(__name__)


# The families whose run directories sample: the DiT (images) and the video DiT (clips).
SAMPLED_FAMILIES = ("dit", "video_dit")


def default_mesh() -> Mesh:
    """All devices on the data axis: sampling is data parallel."""
    return meshes.make_mesh({"data": -1})


def _check_resolution(resolution, patch_size: int) -> None:
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, numbers.Integral)
        or resolution < patch_size
        or resolution % patch_size
    ):
        raise SamplingError(
            f"resolution={resolution!r} is not a positive multiple of the DiT's patch size "
            f"{patch_size}; pass e.g. resolution={max(patch_size, 2 * patch_size)}"
        )


# ---------------------------------------------------------------------------------------------
# A DiT run directory -> weights
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LatentDecoder:
    """A latent DiT's autoencoder and the normalisation its training data had."""

    autoencoder: Autoencoder
    encoding: LatentEncoding

    @classmethod
    def of_run(cls, run_dir: str) -> LatentDecoder | None:
        """The decoder a run directory's latents.json names; None for a pixel-space run."""
        encoding = rundir.load_latents(run_dir)
        if encoding is None:
            return None
        try:
            autoencoder, _ = rundir.load_autoencoder(encoding.autoencoder)
        except UserError as error:
            raise SamplingError(
                f"{run_dir!r} was trained on latents of the autoencoder {encoding.autoencoder!r} "
                f"(its {rundir.LATENTS_FILE}), which cannot be loaded: {error}"
            ) from error
        return cls(autoencoder, encoding)


@dataclasses.dataclass(frozen=True)
class DiTRun:
    """A DiT run's weights and what sampling reads of its recipe."""

    run_dir: str
    config: Any  # config.json
    dit: models.DiT | models.VideoDiT
    step: int | None  # the training step of the weights; None if unknown
    resolution: int  # the side of the DiT's inputs (latents, for a latent DiT)
    mesh: Mesh
    latent_decoder: LatentDecoder | None = None
    condition: Any = None  # what `load_condition` returned
    frames: int = 0  # a video DiT's clip length (its training data's); 0: images


def load_dit_run(
    run_dir: str,
    *,
    conditioning: str,
    use_ema: bool = True,
    mesh: Mesh | None = None,
    resolution: int | None = None,
    load_condition: Callable[[str, Any], Any] | None = None,
) -> DiTRun:
    """A DiT run directory (its exported EMA params/) or a `checkpoints/<step>` in it, refused
    unless its DiT is `conditioning`-conditioned ("text" or "class"), over RGB pixels or over
    the latents of the autoencoder its latents.json names (then `resolution` is the side of the
    decoded images).

    use_ema=False, or a run without exported params/ (unfinished training), reads its latest
    Orbax checkpoint that restores; a step directory always reads that step.
    load_condition(run_dir, config): loads what conditions the DiT (a text encoder, the classes)
    before the weights, so that a moved or mismatched one is named before any weight is read.
    """
    location = rundir.locate_run(run_dir, what="DiT run")
    family, model_config = rundir.load_model_config(location.run_dir)
    if family not in SAMPLED_FAMILIES:
        raise SamplingError(
            f"{location.run_dir!r} holds a {family} model; sampling needs a DiT or video DiT "
            "run directory (the dit or video_dit stage of a pipeline run)"
        )
    model_class = rundir.MODEL_CLASSES[family][0]
    run_conditioning = getattr(model_config, "conditioning", "text")  # a video DiT reads text
    if run_conditioning != conditioning:
        raise SamplingError(
            f"{location.run_dir!r} holds a {run_conditioning}-conditioned DiT; "
            + {
                "text": "text-to-image sampling needs conditioning='text'. Sample it by class "
                "(sample.py --class_labels=..., or ClassToImage)",
                "class": "class-to-image sampling needs conditioning='class'. Sample it with "
                "prompts (sample.py --prompts=..., or TextToImage)",
            }[conditioning]
        )
    latent_decoder = LatentDecoder.of_run(location.run_dir)
    if model_config.in_channels != 3 and latent_decoder is None:
        raise SamplingError(
            f"{location.run_dir!r} holds a DiT over {model_config.in_channels} channels but no "
            f"{rundir.LATENTS_FILE} naming the autoencoder whose latents they are; it was not "
            "trained by train.py on an encode.py dataset, so sample.py cannot decode it"
        )
    config = rundir.load_run_config(location.run_dir)
    patch_side = _patch_side(model_config.patch_size)
    if latent_decoder is not None:
        side = _latent_side(latent_decoder.encoding, resolution, patch_side)
    else:
        side = rundir.run_resolution(config) if resolution is None else resolution
        _check_resolution(side, patch_side)
    frames = 0  # a video DiT's clip length: its latent dataset's, else its dataset's
    if family == "video_dit":
        encoding = latent_decoder.encoding if latent_decoder is not None else None
        frames = encoding.frames if encoding is not None else rundir.run_frames(config)
    condition = load_condition(location.run_dir, config) if load_condition else None
    mesh = mesh if mesh is not None else default_mesh()
    exported = os.path.join(location.run_dir, rundir.PARAMS_DIR)
    checkpoints_dir = os.path.join(location.run_dir, rundir.CHECKPOINTS_DIR)
    if location.step is None and use_ema and os.path.isdir(exported):
        dit = rundir.load_run_params(location.run_dir, model_config, model_class)
        step = None
        if os.path.isdir(checkpoints_dir):
            manager = checkpoints.make_checkpoint_manager(
                checkpoints_dir, max_to_keep=None, async_save=False
            )
            step = manager.latest_step()
            manager.close()
    else:
        if not os.path.isdir(checkpoints_dir):
            raise SamplingError(
                f"{location.run_dir!r} has neither exported params/ nor checkpoints/; "
                "train it first (train.py --workdir)"
            )
        if location.step is None and use_ema:
            logger.warning(
                "%s has no exported params/ (training unfinished): sampling the EMA "
                "weights of its latest checkpoint",
                location.run_dir,
            )
        params, step = rundir.load_checkpoint_params(
            location.run_dir, config, model_config, model_class, mesh, location.step, use_ema
        )
        abstract = nnx.eval_shape(lambda: model_class(model_config, rngs=nnx.Rngs(0)))
        dit = nnx.merge(nnx.graphdef(abstract), params)
    if getattr(model_config, "lora_rank", 0):  # a LoRA fine-tune samples at the base's speed
        dit = lora.merge_lora(dit)
    return DiTRun(
        location.run_dir, config, dit, step, int(side), mesh, latent_decoder, condition, frames
    )


def _patch_side(patch_size) -> int:
    """The spatial side of a DiT's square patches; of a video DiT's (frames, rows, columns)."""
    return int(patch_size[-1]) if isinstance(patch_size, tuple | list) else int(patch_size)


def _latent_side(encoding: LatentEncoding, resolution, patch_size: int) -> int:
    """The latent side of images of side `resolution` (None: the training data's)."""
    if resolution is None:
        return encoding.latent_shape[-3]  # (h, w, c) or (T, h, w, c)
    factor = encoding.downsampling_factor
    _check_resolution(resolution, factor * patch_size)
    return resolution // factor


# ---------------------------------------------------------------------------------------------
# The shared pipeline
# ---------------------------------------------------------------------------------------------


class DiTPipeline:
    """A DiT (and its frozen text tower, if any) placed on a mesh, ready to sample.

    Attributes: checkpoint_step (the training step of the weights; None if unknown), resolution,
    objective ("flow" or "ddpm"), prediction_type, mesh, micro_batch, run_dir, use_ema,
    num_compilations (programs traced so far; a new guidance scale or condition does not add
    one).
    """

    def __init__(
        self,
        *,
        dit: models.DiT | models.VideoDiT,
        text_encoder: models.CLIP | None,
        diffusion_config,
        resolution: int,
        checkpoint_step: int | None = None,
        mesh: Mesh | None = None,
        micro_batch: int = DEFAULT_MICRO_BATCH,
        run_dir: str | None = None,
        use_ema: bool = True,
        latent_decoder: LatentDecoder | None = None,
        frames: int = 0,
    ):
        self.run_dir, self.use_ema = run_dir, use_ema
        self.frames = int(frames)  # > 0: a video DiT drawing clips of this many frames
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, numbers.Integral):
            raise SamplingError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
        if micro_batch < 1:
            raise SamplingError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
        self.micro_batch = int(micro_batch)
        self.mesh = mesh if mesh is not None else default_mesh()
        self.resolution = int(resolution)
        self.checkpoint_step = checkpoint_step
        d = self.diffusion_config = diffusion_config
        self.objective = d.objective
        if self.objective not in SAMPLERS_BY_OBJECTIVE:
            raise SamplingError(f"unknown diffusion objective {d.objective!r}; valid: flow, ddpm")
        self.prediction_type = dit_family.prediction_type_of(d)
        self.default_shift = float(d.get("shift", 1.0) or 1.0)
        self.schedule = None
        if self.objective == "ddpm":
            key = (d.schedule, int(d.num_timesteps), bool(d.zero_terminal_snr))
            self.schedule = discrete_schedule(key)
        self.dit_config = dit.config
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._dit_graphdef, dit_state = nnx.split(dit)
        # Sampling is data parallel: the weights are replicated on every device.
        self._dit_state = jax.device_put(dit_state, replicated)
        self._text_graphdef = self._text_state = None
        if text_encoder is not None:
            self._text_graphdef, text_state = nnx.split(text_encoder)
            self._text_state = jax.device_put(text_state, replicated)
        self.latent_decoder = latent_decoder
        self._decoder_graphdef = self._decoder_state = None
        if latent_decoder is not None:
            if latent_decoder.encoding.latent_shape[-1] != dit.config.in_channels:
                raise SamplingError(
                    f"the DiT reads {dit.config.in_channels} channels but the latents of its "
                    f"autoencoder have {latent_decoder.encoding.latent_shape[-1]}"
                )
            self._decoder_graphdef, decoder_state = nnx.split(latent_decoder.autoencoder)
            self._decoder_state = jax.device_put(decoder_state, replicated)
        self.num_compilations = 0

    @property
    def image_size(self) -> int:
        """The side of the images made: the DiT's inputs, decoded if they are latents."""
        if self.latent_decoder is None:
            return self.resolution
        return self.resolution * self.latent_decoder.encoding.downsampling_factor

    @property
    def num_data_devices(self) -> int:
        return math.prod(self.mesh.shape[a] for a in sharding.batch_axes(self.mesh))

    def settings(self, **options) -> SamplerSettings:
        """Validates sampler options for this model -> the static settings of a program.

        options: sampler (euler | heun | euler_stochastic | ddim | dpmpp_2m | unipc for flow
        models, ddpm | ddim | dpmpp_2m | unipc for DDPM models), steps, eta (DDIM /
        stochastic-Euler noise),
        shift (flow time shift of the sampling grid; default the training shift),
        guidance_rescale (phi of Lin et al. 2023), guidance_interval ((t_lo, t_hi): guidance
        only there). See `settings.make_settings`.
        """
        return make_settings(
            self.objective,
            default_shift=self.default_shift,
            num_timesteps=None if self.schedule is None else self.schedule.num_timesteps,
            **options,
        )

    def _resolve_settings(self, settings, sampler_options) -> SamplerSettings:
        if settings is None:
            return self.settings(**sampler_options)
        if sampler_options:
            raise SamplingError(
                f"pass either settings or sampler options, not both ({sorted(sampler_options)})"
            )
        return settings

    def spec_for(self, settings: SamplerSettings) -> ProgramSpec:
        """The static spec of this pipeline's sampling program for `settings`."""
        return program_spec(
            self._dit_graphdef,
            self._text_graphdef,
            self.dit_config,
            self.diffusion_config,
            resolution=self.resolution,
            mesh=self.mesh,
            micro_batch=self.micro_batch,
            settings=settings,
            decoder_graphdef=self._decoder_graphdef,
            latents=None if self.latent_decoder is None else self.latent_decoder.encoding,
            frames=self.frames,
        )

    def program_batch_size(self, count: int, batch_size: int | None = None) -> int:
        """Samples per program call: `batch_size` (default min(count, 16)) rounded up to a
        multiple of micro_batch x data devices, so that every device runs whole micro-batches."""
        if batch_size is not None and (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, numbers.Integral)
            or batch_size < 1
        ):
            raise SamplingError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        requested = min(count, DEFAULT_BATCH_SIZE) if batch_size is None else int(batch_size)
        unit = self.micro_batch * self.num_data_devices
        return max(1, -(-requested // unit)) * unit

    def run_program(
        self, inputs: dict[str, np.ndarray], settings: SamplerSettings, batch_size: int | None
    ) -> np.ndarray:
        """Images (N, H, W, 3) uint8 of the program's host inputs (N rows each), or clips
        (N, T, H, W, 3) of a video DiT, `batch_size` (`program_batch_size`) at a time."""
        count = len(inputs["seeds"])
        size = self.program_batch_size(count, batch_size)
        if count == 0:
            frames = (self.frames,) if self.frames else ()
            return np.zeros((0, *frames, self.image_size, self.image_size, 3), np.uint8)
        spec = self.spec_for(settings)
        traces_before = program_lib.TRACE_COUNT[0]
        chunks = []
        for start in range(0, count, size):
            chunk = {k: pad_rows(v[start : start + size], size) for k, v in inputs.items()}
            images = sampling_program(
                self._dit_state,
                self._text_state,
                program_lib.host_to_global(chunk, self.mesh),
                spec,
                self._decoder_state,
            )
            chunks.append(program_lib.to_host(images)[: min(size, count - start)])
        self.num_compilations += program_lib.TRACE_COUNT[0] - traces_before
        return np.concatenate(chunks, axis=0)
