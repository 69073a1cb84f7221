"""TextToImage: a trained text-conditioned DiT with its tokenizer and text tower, on a mesh,
ready to sample.

    pipe = TextToImage.from_run("runs/shapes/dit")
    images = pipe.generate(["a red circle"], seeds=[0], sampler="euler", steps=20)

Tokens of the prompts and of the negative prompts (the empty prompt when none, the unconditional
input the DiT was trained with) go into ONE jitted program per (batch shape, settings)
(`diffusion.inference.program`), whose images are a pure function of the prompt, negative prompt,
seed and settings: never of the batch size or the device count.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion import checkpoints, models, rundir, sharding
from diffusion import data as data_lib
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
    check_number,
    check_seed,
    make_settings,
    per_sample,
)

logger = logging.getLogger(__name__)


def default_mesh() -> Mesh:
    """All devices on the data axis: sampling is data parallel."""
    return sharding.make_mesh({"data": -1})


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


class TextToImage:
    """A DiT with its tokenizer and text tower, placed on a mesh, ready to sample.

    Attributes: checkpoint_step (the training step of the weights; None if unknown), resolution,
    objective ("flow" or "ddpm"), prediction_type, context_length, mesh, micro_batch, run_dir,
    use_ema, num_compilations (programs traced so far; a new guidance scale or prompt does not
    add one).
    """

    def __init__(
        self,
        *,
        dit: models.DiT,
        text_encoder: models.CLIP,
        tokenizer,
        diffusion_config,
        context_length: int,
        resolution: int,
        checkpoint_step: int | None = None,
        mesh: Mesh | None = None,
        micro_batch: int = DEFAULT_MICRO_BATCH,
        run_dir: str | None = None,
        use_ema: bool = True,
    ):
        self.run_dir, self.use_ema = run_dir, use_ema
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, numbers.Integral):
            raise SamplingError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
        if micro_batch < 1:
            raise SamplingError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
        self.micro_batch = int(micro_batch)
        self.mesh = mesh if mesh is not None else default_mesh()
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
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
        self._text_graphdef, text_state = nnx.split(text_encoder)
        # Sampling is data parallel: the weights are replicated on every device.
        self._dit_state = jax.device_put(dit_state, replicated)
        self._text_state = jax.device_put(text_state, replicated)
        self.num_compilations = 0
        self._warned_prompts: set[str] = set()

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_run(
        cls,
        run_dir: str,
        *,
        use_ema: bool = True,
        mesh: Mesh | None = None,
        resolution: int | None = None,
        micro_batch: int = DEFAULT_MICRO_BATCH,
        text_encoder: str | None = None,
    ) -> TextToImage:
        """Loads a DiT run directory (its exported EMA params/) or a `checkpoints/<step>` in it.

        use_ema: the EMA weights (default) or the raw trained ones. A run directory with
          use_ema=False, or without exported params/ (unfinished training), reads its latest
          Orbax checkpoint instead; a step directory always reads that step.
        resolution: the image side; read from the run's dataset when None.
        mesh: where to sample (default: every device on the data axis; weights replicated).
        micro_batch: samples each device computes at once. Images are identical for any batch
          size and device count only between pipelines with the same micro_batch.
        text_encoder: the CLIP run (or Hugging Face CLIP directory) the DiT was trained on, where
          it is now; default: the path the run recorded (config.text_encoder.checkpoint).
        """
        location = rundir.locate_run(run_dir, what="DiT run")
        family, model_config = rundir.load_model_config(location.run_dir)
        if family != "dit":
            raise SamplingError(
                f"{location.run_dir!r} holds a {family} model; text-to-image sampling needs a DiT "
                "run directory (the dit stage of a pipeline run)"
            )
        if model_config.conditioning != "text":
            raise SamplingError(
                f"{location.run_dir!r} holds a {model_config.conditioning}-conditioned DiT; "
                "text-to-image sampling needs conditioning='text'"
            )
        if model_config.in_channels != 3:
            raise SamplingError(
                f"{location.run_dir!r} holds a DiT over {model_config.in_channels} channels (a "
                "latent model); this pipeline samples RGB pixel models only"
            )
        config = rundir.load_run_config(location.run_dir)
        side = rundir.run_resolution(config) if resolution is None else resolution
        _check_resolution(side, model_config.patch_size)
        mesh = mesh if mesh is not None else default_mesh()
        encoder_dir = text_encoder or config.text_encoder.checkpoint
        if not text_encoder and not os.path.isdir(encoder_dir):
            raise SamplingError(
                f"config.text_encoder.checkpoint={encoder_dir!r} of {location.run_dir} is not a "
                "directory: the CLIP run the DiT was trained on moved or was deleted. Name a CLIP "
                "run directory where it is now with text_encoder= (sample.py: --text_encoder=DIR)"
            )
        encoder = rundir.load_text_encoder(encoder_dir, {"dtype": config.model.dtype})
        tokenizer = rundir.load_tokenizer(location.run_dir, config)
        if len(tokenizer) > encoder.config.vocab_size:
            raise SamplingError(
                f"the run's tokenizer has {len(tokenizer)} tokens but the text encoder "
                f"{encoder_dir!r} embeds {encoder.config.vocab_size}: they were not trained "
                "together. Name the CLIP run this DiT was trained on (--text_encoder=DIR)"
            )
        exported = os.path.join(location.run_dir, rundir.PARAMS_DIR)
        checkpoints_dir = os.path.join(location.run_dir, rundir.CHECKPOINTS_DIR)
        if location.step is None and use_ema and os.path.isdir(exported):
            dit = rundir.load_run_params(location.run_dir, model_config, models.DiT)
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
                location.run_dir, config, model_config, models.DiT, mesh, location.step, use_ema
            )
            abstract = nnx.eval_shape(lambda: models.DiT(model_config, rngs=nnx.Rngs(0)))
            dit = nnx.merge(nnx.graphdef(abstract), params)
        return cls(
            dit=dit,
            text_encoder=encoder,
            tokenizer=tokenizer,
            diffusion_config=config.diffusion,
            context_length=config.tokenizer.context_length,
            resolution=int(side),
            checkpoint_step=step,
            mesh=mesh,
            micro_batch=micro_batch,
            run_dir=location.run_dir,
            use_ema=use_ema,
        )

    # -- public API -----------------------------------------------------------------------------

    @property
    def num_data_devices(self) -> int:
        return math.prod(self.mesh.shape[a] for a in sharding.batch_axes(self.mesh))

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int32 (B, L); a prompt over the context is truncated with a warning."""
        prompts = list(prompts)
        lengths = [
            len(ids)
            for ids in self.tokenizer(prompts, add_special_tokens=True, truncation=False)[
                "input_ids"
            ]
        ]
        for prompt, length in zip(prompts, lengths, strict=True):
            if length > self.context_length and prompt not in self._warned_prompts:
                self._warned_prompts.add(prompt)  # once per prompt, not once per image
                shown = prompt if len(prompt) <= 80 else f"{prompt[:77]}..."
                logger.warning(
                    "prompt %r has %d tokens, more than the context of %d: it is truncated",
                    shown,
                    length,
                    self.context_length,
                )
        return data_lib.tokenize(self.tokenizer, prompts, self.context_length)

    def settings(self, **options) -> SamplerSettings:
        """Validates sampler options for this model -> the static settings of a program.

        options: sampler (euler | heun | euler_stochastic | ddim | dpmpp_2m for flow models,
        ddpm | ddim | dpmpp_2m for DDPM models), steps, eta (DDIM / stochastic-Euler noise),
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

    def generate(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str | None] | None = None,
        seeds: int | Sequence[int] = 0,
        *,
        guidance_scale: float | Sequence[float] = 3.0,
        batch_size: int | None = None,
        settings: SamplerSettings | None = None,
        **sampler_options,
    ) -> np.ndarray:
        """Images (N, H, W, 3) uint8 for N prompts.

        negative_prompts: one per prompt (None or "" = the empty prompt, i.e. plain guidance).
        seeds: one int for every prompt, or one per prompt; image i uses jax.random.key(seed_i).
        guidance_scale: w of `guided = uncond + w (cond - uncond)` (1 = no guidance), one for all
          or one per prompt.
        settings / sampler_options: the sampler, either as `self.settings(...)` made once, or as
          that method's keyword options (sampler="euler", steps=20, eta, shift, ...).
        batch_size: samples per program call (`program_batch_size`); the images do not depend
          on it. Default: min(N, 16).
        """
        if not isinstance(prompts, str | Sequence):
            raise SamplingError(
                f"prompts must be a string or a list of strings, got {type(prompts).__name__} "
                f"{prompts!r}"
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise SamplingError(f"prompts must be strings, got {prompt!r}")
        count = len(prompts)
        if settings is None:
            settings = self.settings(**sampler_options)
        elif sampler_options:
            raise SamplingError(
                f"pass either settings or sampler options, not both ({sorted(sampler_options)})"
            )
        negatives = per_sample(negative_prompts, count, "negative_prompts")
        negatives = ["" if n is None else n for n in negatives]
        for negative in negatives:
            if not isinstance(negative, str):
                raise SamplingError(f"negative prompts must be strings or None, got {negative!r}")
        seed_list = [check_seed(s) for s in per_sample(seeds, count, "seeds")]
        scales = [
            check_number(s, "guidance_scale")
            for s in per_sample(guidance_scale, count, "guidance_scale")
        ]
        size = self.program_batch_size(count, batch_size)
        side = self.resolution
        if count == 0:
            return np.zeros((0, side, side, 3), np.uint8)
        inputs = self.program_inputs(prompts, negatives, seed_list, scales)
        spec = self.spec_for(settings)
        traces_before = program_lib.TRACE_COUNT[0]
        chunks = []
        for start in range(0, count, size):
            chunk = {k: pad_rows(v[start : start + size], size) for k, v in inputs.items()}
            images = sampling_program(
                self._dit_state, self._text_state, self.to_global(chunk), spec
            )
            chunks.append(self._to_host(images)[: min(size, count - start)])
        self.num_compilations += program_lib.TRACE_COUNT[0] - traces_before
        return np.concatenate(chunks, axis=0)

    def program_inputs(self, prompts, negatives, seeds, scales) -> dict[str, np.ndarray]:
        """The sampling program's host inputs for checked prompts, negative prompts (strings),
        seeds and guidance scales: token ids and masks, uint32 seeds, float32 scales."""
        tokens, mask = self.tokenize(prompts)
        negative_tokens, negative_mask = self.tokenize(negatives)
        return {
            "tokens": tokens,
            "mask": mask,
            "negative_tokens": negative_tokens,
            "negative_mask": negative_mask,
            "seeds": np.asarray(seeds, np.uint32),
            "scales": np.asarray(scales, np.float32),
        }

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

    # -- host <-> devices -------------------------------------------------------------------------

    def to_global(self, chunk: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host arrays (the same on every process) -> global arrays sharded over the batch."""
        batch = sharding.batch_sharding(self.mesh)
        return {
            name: jax.make_array_from_callback(value.shape, batch, lambda index, v=value: v[index])
            for name, value in chunk.items()
        }

    @staticmethod
    def _to_host(images: jax.Array) -> np.ndarray:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(images, tiled=True))
        return np.asarray(images)
