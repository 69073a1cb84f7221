"""Text-to-image sampling: a trained DiT run directory -> uint8 images for prompts and seeds.

    pipeline = TextToImage.from_run("runs/shapes/dit")
    images = pipeline.generate(["a red circle"], seeds=[0], sampler="euler", steps=20)

The program: tokens of the prompts and of the negative prompts (the empty prompt when none, the
unconditional input the DiT was trained with) -> the frozen CLIP text tower -> classifier-free
guidance around the DiT -> a sampler's `lax.scan` from noise to images -> uint8. Everything
from tokens to uint8 is ONE jitted program per (batch shape, sampler, steps, static options);
prompts, seeds and guidance scales are traced inputs, so new values never recompile.

Determinism. An image is a pure function of (checkpoint, prompt, negative prompt, seed, sampler
settings): never of the batch size, the position in the batch or the number of devices.
  - Randomness: each sample draws its initial noise and every step's noise from its own
    `jax.random.key(seed)`. The samplers draw step noise from one key for the whole batch, so the
    program `vmap`s the sampler over samples (each with batch 1): every sample's draws depend only
    on its own key.
  - Arithmetic: XLA may round a matmul differently for other operand shapes (e.g. the blocking
    of a GEMM can depend on its sizes), and a difference of 1e-7 can flip a uint8 value. So every
    device runs its rows `micro_batch` at a time in a `lax.map` (shard_map over the mesh's batch
    axes): the arithmetic of a sample has one shape for any batch size or device count; only the
    number of loop iterations changes. Batches are padded to a multiple of micro_batch x devices.
    Checked on CPU in tests/test_text2image.py: byte-identical images for batch sizes 1, 3, 8,
    shuffled prompts, and 1 vs 8 devices (float outputs were bit-identical too, while a plain
    batched program differed by ~5e-7). Equal images need an equal micro_batch.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion import checkpoints, guidance, models, optim, samplers, sharding, trainer, training
from diffusion import data as data_lib
from diffusion.errors import UserError
from diffusion.models import layers
from diffusion.schedules import DiscreteSchedule, ddpm_levels, flow_levels

logger = logging.getLogger(__name__)

# User-facing sampler name -> samplers.SAMPLERS name, per training objective.
SAMPLERS_BY_OBJECTIVE = {
    "flow": {
        "euler": "flow_euler",
        "heun": "flow_heun",
        "euler_stochastic": "flow_euler_stochastic",
        "ddim": "ddim",  # the DDIM(eta) update on the flow path; eta = 0 is exactly Euler
        "dpmpp_2m": "dpmpp_2m",
    },
    "ddpm": {"ddpm": "ddpm", "ddim": "ddim", "dpmpp_2m": "dpmpp_2m"},
}
SAMPLERS_WITH_ETA = ("ddim", "flow_euler_stochastic")
DEFAULT_BATCH_SIZE = 16  # samples per program call when generate() is not given batch_size
DEFAULT_MICRO_BATCH = 4  # samples each device computes together (the program's per-device shape)
MAX_SEED = 2**32  # seeds are uint32: jax.random.key(seed) for 0 <= seed < 2**32


class PipelineError(UserError):
    """A checkpoint, prompt or sampling setting that cannot be used."""


# ---------------------------------------------------------------------------------------------
# Settings of one call: validated on the host, before anything is traced
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The static part of a sampling program (hashable: it keys the cache of compiled programs)."""

    sampler: str  # name in samplers.SAMPLERS
    steps: int
    eta: float
    shift: float | None  # flow time shift (None for DDPM models)
    guidance_rescale: float
    guidance_interval: tuple[float, float] | None


def resolve_sampler(name: str, objective: str) -> str:
    """User-facing sampler name -> the samplers.SAMPLERS entry valid for `objective`."""
    valid = SAMPLERS_BY_OBJECTIVE[objective]
    if name not in valid:
        every = {n for names in SAMPLERS_BY_OBJECTIVE.values() for n in names}
        what = (
            f"sampler {name!r} does not apply to a {objective}-trained model"
            if name in every
            else f"unknown sampler {name!r}"
        )
        raise PipelineError(
            f"{what}; valid samplers for this {objective} model: {', '.join(valid)}"
        )
    return valid[name]


def check_sampler_name(name: str) -> None:
    """Fails early (before loading a model) on a name that no objective knows."""
    every = sorted({n for names in SAMPLERS_BY_OBJECTIVE.values() for n in names})
    if name not in every:
        raise PipelineError(f"unknown sampler {name!r}; valid samplers: {', '.join(every)}")


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise PipelineError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PipelineError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _per_sample(value, count: int, name: str) -> list:
    """A scalar for every sample, or a sequence with one entry per prompt."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise PipelineError(f"{name} has {len(values)} entries for {count} prompts; give one each")
    return values


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < MAX_SEED:
        raise PipelineError(f"seeds must be integers in [0, 2**32), got {seed!r}")
    return int(seed)


# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunLocation:
    """Where a --checkpoint points: the run directory, and the checkpoint step if one was named."""

    run_dir: str
    step: int | None  # None: the run's exported params/


def locate_run(path: str) -> RunLocation:
    """A DiT run directory or one of its `checkpoints/<step>` directories -> RunLocation."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise PipelineError(
            f"checkpoint {path!r} does not exist; pass a DiT run directory (train.py --workdir) "
            "or one of its checkpoints/<step> directories"
        )
    if os.path.isfile(os.path.join(path, trainer.MODEL_FILE)):
        return RunLocation(path, None)
    parent = os.path.dirname(path)
    name = os.path.basename(path)
    run_dir = os.path.dirname(parent)
    if (
        name.isdigit()
        and os.path.basename(parent) == "checkpoints"
        and os.path.isfile(os.path.join(run_dir, trainer.MODEL_FILE))
    ):
        return RunLocation(run_dir, int(name))
    raise PipelineError(
        f"{path!r} is neither a run directory (it has no {trainer.MODEL_FILE}) nor a "
        "checkpoints/<step> directory inside one; pass the --workdir of a train.py DiT run"
    )


# The fields of a run's config.json that sampling and evaluation read, by family.
RUN_CONFIG_KEYS = (
    "family",
    "seed",
    "data.name",
    "data.builder_config",
    "data.data_dir",
    "data.image_key",
    "data.caption_key",
    "data.label_key",
    "data.caption_template",
    "data.num_train_examples",
    "data.num_eval_examples",
    "tokenizer.path",
    "tokenizer.context_length",
    "model.dtype",
)
DIT_RUN_CONFIG_KEYS = (
    "text_encoder.checkpoint",
    "diffusion.objective",
    "diffusion.prediction_type",
    "optimizer",
    "training.num_steps",
    "training.ema_decay",
)


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
    """A run directory's config.json, checked to hold every field sampling and evaluation read."""
    path = os.path.join(run_dir, checkpoints.CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise PipelineError(f"run directory {run_dir!r} has no {checkpoints.CONFIG_FILENAME}")
    fix = (
        "It was edited or comes from another version: restore it from a copy, or delete it and "
        "rerun the train.py command of this run, which writes it again."
    )
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise PipelineError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
            f" {fix}"
        ) from error
    if not isinstance(record, dict):
        raise PipelineError(f"{path} holds a {type(record).__name__}, not a JSON object. {fix}")

    def has(key: str) -> bool:
        node = record
        for name in key.split("."):
            if not isinstance(node, dict) or name not in node:
                return False
            node = node[name]
        return True

    keys = RUN_CONFIG_KEYS + (DIT_RUN_CONFIG_KEYS if record.get("family") == "dit" else ())
    missing = [key for key in keys if not has(key)]
    if missing:
        raise PipelineError(f"{path} lacks the fields {', '.join(missing)}. {fix}")
    return ml_collections.ConfigDict(record)


def _resolution(config, resolution: int | None) -> int:
    if resolution is not None:
        return int(resolution)
    found = trainer.resolution_of(config.data)
    if found:
        return found
    try:  # a prepared TFDS dataset knows its image shape
        import tensorflow_datasets as tfds

        name = config.data.name
        if config.data.builder_config:
            name = f"{name}/{config.data.builder_config}"
        builder = tfds.builder(name, data_dir=config.data.data_dir)
        return int(builder.info.features[config.data.image_key].shape[0])
    except Exception as error:  # noqa: BLE001 - any failure means "ask the user"
        raise PipelineError(
            f"cannot tell the image resolution of this run ({config.data.name}: {error}); pass "
            "resolution= to TextToImage.from_run"
        ) from error


def _tokenizer(run_dir: str, config):
    own = os.path.join(run_dir, trainer.TOKENIZER_DIR)
    if os.path.isdir(own):
        return data_lib.load_tokenizer(own)
    if config.tokenizer.path:
        return data_lib.load_tokenizer(config.tokenizer.path)
    raise PipelineError(f"run directory {run_dir!r} has no {trainer.TOKENIZER_DIR}/ directory")


def _checkpoint_params(run_dir: str, config, model_config, mesh, step, use_ema):
    """(DiT params as nnx.State, step) from the run's Orbax checkpoint `step` (None: latest)."""
    directory = os.path.join(run_dir, "checkpoints")
    manager = checkpoints.make_checkpoint_manager(directory, max_to_keep=None, async_save=False)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise PipelineError(
                f"{directory!r} has no complete checkpoint {step if step is not None else ''}; "
                f"complete steps: {sorted(manager.all_steps())}"
            )
        # The trainer's own abstract state: the restore target with every leaf's shape.
        tx = optim.make_optimizer(config.optimizer, total_steps=config.training.num_steps)
        abstract = training.Trainer(
            lambda: models.DiT(model_config, rngs=nnx.Rngs(0)),
            None,
            tx,
            mesh,
            seed=config.seed,
            ema_decay=config.training.ema_decay,
        ).abstract_state
        try:
            state = checkpoints.restore_checkpoint(
                manager, abstract, step, restore_data_iterator=False
            ).train_state
        except Exception as error:  # noqa: BLE001 - Orbax raises many kinds; the user needs one
            raise PipelineError(
                f"checkpoint {checkpoints.step_path(manager, step)!r} could not be restored "
                f"({type(error).__name__}: {error}); pass another step of "
                f"{sorted(manager.all_steps())} or the run directory"
            ) from error
    finally:
        manager.close()
    if use_ema and state["ema"] is None:
        logger.warning("run %s was trained without EMA; sampling its raw parameters", run_dir)
    params = state["ema"] if use_ema and state["ema"] is not None else state["params"]
    return params, int(step)


def default_mesh() -> Mesh:
    """All devices on the data axis: sampling is data parallel."""
    return sharding.make_mesh({"data": -1})


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 [0, 255], rounding to the nearest level."""
    return jnp.clip(jnp.round((images + 1) * 127.5), 0, 255).astype(jnp.uint8)


def seed_keys(seeds: jax.Array) -> jax.Array:
    """uint32 seeds (B,) -> typed keys (B,), each equal to jax.random.key(seed)."""
    return jax.vmap(jax.random.key)(seeds)


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
            raise PipelineError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
        if micro_batch < 1:
            raise PipelineError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
        self.micro_batch = int(micro_batch)
        self.mesh = mesh if mesh is not None else default_mesh()
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.resolution = int(resolution)
        self.checkpoint_step = checkpoint_step
        d = diffusion_config
        self.objective = d.objective
        if self.objective not in SAMPLERS_BY_OBJECTIVE:
            raise PipelineError(f"unknown diffusion objective {d.objective!r}; valid: flow, ddpm")
        self.prediction_type = training.prediction_type_of(d)
        self.default_shift = float(d.get("shift", 1.0) or 1.0)
        self.schedule = self._schedule_key = None
        if self.objective == "ddpm":
            self._schedule_key = (d.schedule, int(d.num_timesteps), bool(d.zero_terminal_snr))
            self.schedule = discrete_schedule(self._schedule_key)
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
    ) -> TextToImage:
        """Loads a DiT run directory (its exported EMA params/) or a `checkpoints/<step>` in it.

        use_ema: the EMA weights (default) or the raw trained ones. A run directory with
          use_ema=False, or without exported params/ (unfinished training), reads its latest
          Orbax checkpoint instead; a step directory always reads that step.
        resolution: the image side; read from the run's dataset when None.
        mesh: where to sample (default: every device on the data axis; weights replicated).
        micro_batch: samples each device computes at once. Images are identical for any batch
          size and device count only between pipelines with the same micro_batch.
        """
        location = locate_run(run_dir)
        family, model_config = trainer.load_model_config(location.run_dir)
        if family != "dit":
            raise PipelineError(
                f"{location.run_dir!r} holds a {family} model; text-to-image sampling needs a DiT "
                "run directory (the dit stage of a pipeline run)"
            )
        if model_config.conditioning != "text":
            raise PipelineError(
                f"{location.run_dir!r} holds a {model_config.conditioning}-conditioned DiT; "
                "text-to-image sampling needs conditioning='text'"
            )
        if model_config.in_channels != 3:
            raise PipelineError(
                f"{location.run_dir!r} holds a DiT over {model_config.in_channels} channels (a "
                "latent model); this pipeline samples RGB pixel models only"
            )
        config = load_run_config(location.run_dir)
        mesh = mesh if mesh is not None else default_mesh()
        text_encoder = trainer.load_text_encoder(
            config.text_encoder.checkpoint, {"dtype": config.model.dtype}
        )
        tokenizer = _tokenizer(location.run_dir, config)
        exported = os.path.join(location.run_dir, trainer.PARAMS_DIR)
        checkpoints_dir = os.path.join(location.run_dir, "checkpoints")
        if location.step is None and use_ema and os.path.isdir(exported):
            dit = trainer.load_run_params(location.run_dir, model_config, models.DiT)
            step = None
            if os.path.isdir(checkpoints_dir):
                manager = checkpoints.make_checkpoint_manager(
                    checkpoints_dir, max_to_keep=None, async_save=False
                )
                step = manager.latest_step()
                manager.close()
        else:
            if not os.path.isdir(checkpoints_dir):
                raise PipelineError(
                    f"{location.run_dir!r} has neither exported params/ nor checkpoints/; "
                    "train it first (train.py --workdir)"
                )
            if location.step is None and use_ema:
                logger.warning(
                    "%s has no exported params/ (training unfinished): sampling the EMA "
                    "weights of its latest checkpoint",
                    location.run_dir,
                )
            params, step = _checkpoint_params(
                location.run_dir, config, model_config, mesh, location.step, use_ema
            )
            abstract = nnx.eval_shape(lambda: models.DiT(model_config, rngs=nnx.Rngs(0)))
            dit = nnx.merge(nnx.graphdef(abstract), params)
        return cls(
            dit=dit,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            diffusion_config=config.diffusion,
            context_length=config.tokenizer.context_length,
            resolution=_resolution(config, resolution),
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
                logger.warning(
                    "prompt %r has %d tokens, more than the context of %d: it is truncated",
                    prompt,
                    length,
                    self.context_length,
                )
        return data_lib.tokenize(self.tokenizer, prompts, self.context_length)

    def settings(
        self,
        sampler: str = "euler",
        steps: int = 20,
        *,
        eta: float = 0.0,
        shift: float | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval=None,
    ) -> SamplerSettings:
        """Validates sampler options for this model -> the static settings of a program."""
        name = resolve_sampler(sampler, self.objective)
        steps = check_steps(steps)
        eta = _check_number(eta, "eta")
        if eta < 0:
            raise PipelineError(f"eta must be >= 0, got {eta}")
        if eta and name not in SAMPLERS_WITH_ETA:
            raise PipelineError(
                f"eta={eta} has no effect on sampler {sampler!r}; it applies to ddim"
                + (" and euler_stochastic" if self.objective == "flow" else "")
            )
        if self.objective == "flow":
            shift = self.default_shift if shift is None else _check_number(shift, "shift")
            if shift <= 0:
                raise PipelineError(f"shift must be positive, got {shift}")
        elif shift is not None:
            raise PipelineError("shift applies to flow-matching models only; this one is ddpm")
        rescale = _check_number(guidance_rescale, "guidance_rescale")
        interval = None if guidance_interval is None else tuple(float(v) for v in guidance_interval)
        # Validates the rescale strength and the interval (GuidanceError is a UserError).
        guidance.guided_model_fn(lambda *a: None, rescale_phi=rescale, interval=interval)
        if self.objective == "ddpm" and steps > self.schedule.num_timesteps:
            raise PipelineError(
                f"steps={steps} exceeds the {self.schedule.num_timesteps} training timesteps"
            )
        return SamplerSettings(name, steps, eta, shift, rescale, interval)

    def generate(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str | None] | None = None,
        seeds: int | Sequence[int] = 0,
        *,
        sampler: str = "euler",
        steps: int = 20,
        guidance_scale: float | Sequence[float] = 3.0,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        shift: float | None = None,
        guidance_interval=None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Images (N, H, W, 3) uint8 for N prompts.

        negative_prompts: one per prompt (None or "" = the empty prompt, i.e. plain guidance).
        seeds: one int for every prompt, or one per prompt; image i uses jax.random.key(seed_i).
        guidance_scale: w of `guided = uncond + w (cond - uncond)` (1 = no guidance), one for all
          or one per prompt. guidance_rescale: phi of Lin et al. 2023. guidance_interval:
          (t_lo, t_hi), guidance only there.
        sampler: euler | heun | euler_stochastic | ddim | dpmpp_2m for flow models, ddpm | ddim |
          dpmpp_2m for DDPM models. eta: DDIM / stochastic-Euler noise (0 = deterministic).
        shift: flow time shift of the sampling grid (default: the training shift).
        batch_size: samples per program call (`program_batch_size`); the images do not depend
          on it. Default: min(N, 16).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise PipelineError(f"prompts must be strings, got {prompt!r}")
        count = len(prompts)
        settings = self.settings(
            sampler,
            steps,
            eta=eta,
            shift=shift,
            guidance_rescale=guidance_rescale,
            guidance_interval=guidance_interval,
        )
        negatives = _per_sample(negative_prompts, count, "negative_prompts")
        negatives = ["" if n is None else n for n in negatives]
        for negative in negatives:
            if not isinstance(negative, str):
                raise PipelineError(f"negative prompts must be strings or None, got {negative!r}")
        seed_list = [_check_seed(s) for s in _per_sample(seeds, count, "seeds")]
        scales = [
            _check_number(s, "guidance_scale")
            for s in _per_sample(guidance_scale, count, "guidance_scale")
        ]
        size = self.program_batch_size(count, batch_size)
        side = self.resolution
        if count == 0:
            return np.zeros((0, side, side, 3), np.uint8)
        tokens, mask = self.tokenize(prompts)
        negative_tokens, negative_mask = self.tokenize(negatives)
        inputs = {
            "tokens": tokens,
            "mask": mask,
            "negative_tokens": negative_tokens,
            "negative_mask": negative_mask,
            "seeds": np.asarray(seed_list, np.uint32),
            "scales": np.asarray(scales, np.float32),
        }
        spec = self._program_spec(settings)
        traces_before = _TRACE_COUNT[0]
        chunks = []
        for start in range(0, count, size):
            chunk = {k: _pad_rows(v[start : start + size], size) for k, v in inputs.items()}
            images = sampling_program(
                self._dit_state, self._text_state, self._to_global(chunk), spec
            )
            chunks.append(self._to_host(images)[: min(size, count - start)])
        self.num_compilations += _TRACE_COUNT[0] - traces_before
        return np.concatenate(chunks, axis=0)

    def _program_spec(self, settings: SamplerSettings) -> ProgramSpec:
        return ProgramSpec(
            dit_graphdef=self._dit_graphdef,
            text_graphdef=self._text_graphdef,
            in_channels=self.dit_config.in_channels,
            word_conditioning=self.dit_config.word_conditioning,
            resolution=self.resolution,
            objective=self.objective,
            prediction_type=self.prediction_type,
            schedule=self._schedule_key,
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
            raise PipelineError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        requested = min(count, DEFAULT_BATCH_SIZE) if batch_size is None else int(batch_size)
        unit = self.micro_batch * self.num_data_devices
        return max(1, -(-requested // unit)) * unit

    # -- host <-> devices -------------------------------------------------------------------------

    def _to_global(self, chunk: dict[str, np.ndarray]) -> dict[str, jax.Array]:
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


@functools.cache
def discrete_schedule(key: tuple[str, int, bool]) -> DiscreteSchedule:
    name, num_timesteps, zero_terminal_snr = key
    return DiscreteSchedule.from_name(name, num_timesteps, zero_terminal_snr=zero_terminal_snr)


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """Everything static about a sampling program. Equal specs (e.g. two checkpoints of one
    model, or pipelines on one mesh) share the compilations of `sampling_program`."""

    dit_graphdef: Any
    text_graphdef: Any
    in_channels: int
    word_conditioning: bool  # the DiT also reads the text tower's word embeddings
    resolution: int
    objective: str  # "flow" or "ddpm"
    prediction_type: str
    schedule: tuple[str, int, bool] | None  # DDPM: (beta schedule, T, zero terminal SNR)
    mesh: Mesh
    micro_batch: int
    settings: SamplerSettings

    def levels(self):
        s = self.settings
        if self.objective == "flow":
            return flow_levels(s.steps, s.shift)
        # Trailing spacing starts at the last training step, the noisiest level (Lin et al. 2023).
        return ddpm_levels(discrete_schedule(self.schedule), s.steps, spacing="trailing")


_TRACE_COUNT = [0]  # traces of sampling_program (one per compilation), for tests and users


@functools.partial(jax.jit, static_argnames="spec")
def sampling_program(dit_state, text_state, inputs: dict, spec: ProgramSpec) -> jax.Array:
    """Tokens, seeds and scales of a global batch -> uint8 images (B, H, W, C).

    Each device walks through its rows `micro_batch` at a time (`lax.map`), so the arithmetic of
    a sample has the same shapes whatever the batch size or the number of devices. The weights
    come replicated, the inputs sharded over the mesh's batch axes.
    """
    _TRACE_COUNT[0] += 1
    batch_spec = PartitionSpec(sharding.batch_axes(spec.mesh) or None)

    def per_device(dit_state, text_state, inputs):
        chunks = jax.tree.map(lambda x: x.reshape((-1, spec.micro_batch) + x.shape[1:]), inputs)
        images = jax.lax.map(
            lambda chunk: _sample_micro_batch(dit_state, text_state, chunk, spec), chunks
        )  # (chunks, micro_batch, H, W, C)
        return images.reshape((-1,) + images.shape[2:])

    return jax.shard_map(
        per_device,
        mesh=spec.mesh,
        in_specs=(PartitionSpec(), PartitionSpec(), batch_spec),
        out_specs=batch_spec,
    )(dit_state, text_state, inputs)


def _sample_micro_batch(dit_state, text_state, inputs, spec: ProgramSpec):
    """One micro-batch: prompt embeddings once, then each sample's own sampling loop."""
    settings = spec.settings
    # Models are merged in the trace they run in (see layers.merge_here): the text encoder in
    # lax.map's, the DiT in the sampler loop's.
    text_encoder = layers.merge_here(spec.text_graphdef, text_state)
    words = spec.word_conditioning
    cond = training.text_condition(text_encoder, inputs["tokens"], inputs["mask"], words=words)
    uncond = training.text_condition(
        text_encoder, inputs["negative_tokens"], inputs["negative_mask"], words=words
    )

    def dit_fn(x, t, cond):
        return training.dit_model_fn(layers.merge_here(spec.dit_graphdef, dit_state))(x, t, cond)

    model_fn = _first_channels(dit_fn, spec.in_channels)
    guided = guidance.guided_model_fn(
        model_fn, rescale_phi=settings.guidance_rescale, interval=settings.guidance_interval
    )
    levels = spec.levels()
    options = {"prediction_type": spec.prediction_type}
    if settings.sampler in SAMPLERS_WITH_ETA:
        options["eta"] = settings.eta
    shape = (1, spec.resolution, spec.resolution, spec.in_channels)

    def one_sample(key, cond, uncond, scale):
        # Batch 1 inside the vmap: the samplers draw step noise from one key per batch, so this
        # gives every sample noise from its own key only.
        noise_key, step_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, shape, jnp.float32)
        add_batch = lambda tree: jax.tree.map(lambda x: x[None], tree)
        condition = guidance.GuidanceCondition(add_batch(cond), add_batch(uncond), scale)
        images = samplers.sample(
            settings.sampler, guided, noise, levels, step_key, condition, **options
        )
        return images[0]

    keys = seed_keys(inputs["seeds"])
    images = jax.vmap(one_sample)(keys, cond, uncond, inputs["scales"])  # (micro, H, W, C)
    return to_uint8(images)


def _first_channels(model_fn, channels: int):
    """The prediction channels of a DiT (a learn_sigma DiT also outputs variance channels)."""

    def prediction_fn(x, t, cond):
        return model_fn(x, t, cond)[..., :channels]

    return prediction_fn


def _pad_rows(array: np.ndarray, size: int) -> np.ndarray:
    """Pads a chunk to `size` rows with copies of its last row (their outputs are dropped)."""
    missing = size - array.shape[0]
    if missing <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)], axis=0)


# ---------------------------------------------------------------------------------------------
# Batch sampling to a directory (sample.py): prompt files, PNGs, manifest, grid, resume
# ---------------------------------------------------------------------------------------------

MANIFEST = "manifest.jsonl"
GRID = "grid.png"
GRID_MAX_IMAGES = 256
JSONL_FIELDS = ("prompt", "negative_prompt", "seed", "guidance_scale")


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One image to make: the k-th sample (`index`) of the prompt on `line` of the prompt file."""

    line: int  # 1-based line number in the prompt file
    index: int  # 0..num_per_prompt-1
    prompt: str
    negative_prompt: str
    seed: int
    guidance_scale: float

    @property
    def file(self) -> str:
        """Stable name: the same item always gets the same file, in any run."""
        return f"{self.line:05d}_{self.index:03d}.png"


def _jsonl_entry(text: str, where: str) -> dict:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise PipelineError(f"{where}: not valid JSON ({error.msg}): {text[:80]!r}") from error
    if not isinstance(entry, dict):
        raise PipelineError(f"{where}: expected a JSON object with a 'prompt', got {text[:80]!r}")
    unknown = sorted(set(entry) - set(JSONL_FIELDS))
    if unknown:
        raise PipelineError(f"{where}: unknown fields {unknown}; valid: {', '.join(JSONL_FIELDS)}")
    if not isinstance(entry.get("prompt"), str):
        raise PipelineError(f"{where}: 'prompt' must be a string, got {entry.get('prompt')!r}")
    negative = entry.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise PipelineError(f"{where}: 'negative_prompt' must be a string, got {negative!r}")
    if "seed" in entry:
        seed = entry["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
            raise PipelineError(f"{where}: 'seed' must be an integer in [0, 2**32), got {seed!r}")
    if "guidance_scale" in entry:
        scale = entry["guidance_scale"]
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)  # json reads NaN and Infinity
        ):
            raise PipelineError(f"{where}: 'guidance_scale' must be a finite number, got {scale!r}")
    return entry


def _utf8_text(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise PipelineError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); "
            "save the prompt file with UTF-8 encoding"
        ) from None


def read_prompt_file(
    path: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    guidance_scale: float = 3.0,
    num_per_prompt: int = 1,
) -> list[PromptItem]:
    """The images a prompt file asks for, in file order.

    `.jsonl`: one JSON object per line, {"prompt", "negative_prompt", "seed", "guidance_scale"}
    (all but prompt optional; the keyword arguments are the defaults). Anything else: one prompt
    per line. Blank lines are skipped. Each prompt gives `num_per_prompt` images with seeds
    seed, seed + 1, ...
    """
    if (
        isinstance(num_per_prompt, bool)
        or not isinstance(num_per_prompt, int)
        or num_per_prompt < 1
    ):
        raise PipelineError(f"num_per_prompt must be an integer >= 1, got {num_per_prompt!r}")
    _check_seed(seed)
    _check_number(guidance_scale, "guidance_scale")
    if not os.path.isfile(path):
        raise PipelineError(f"prompt file {path!r} does not exist")
    is_jsonl = path.endswith(".jsonl")
    items = []
    with open(path, "rb") as f:
        content = _utf8_text(f.read(), path)
    with io.StringIO(content, newline=None) as f:  # newline=None: as open() splits lines
        for line_number, text in enumerate(f, start=1):
            text = text.strip()
            if not text:
                continue
            entry = _jsonl_entry(text, f"{path}:{line_number}") if is_jsonl else {"prompt": text}
            first_seed = entry.get("seed", seed)
            if first_seed + num_per_prompt > MAX_SEED:
                raise PipelineError(f"{path}:{line_number}: seeds past 2**32 - 1")
            for k in range(num_per_prompt):
                items.append(
                    PromptItem(
                        line=line_number,
                        index=k,
                        prompt=entry["prompt"],
                        negative_prompt=entry.get("negative_prompt") or negative_prompt or "",
                        seed=first_seed + k,
                        guidance_scale=float(entry.get("guidance_scale", guidance_scale)),
                    )
                )
    if not items:
        raise PipelineError(f"prompt file {path!r} has no prompts (only blank lines)")
    return items


def manifest_record(
    item: PromptItem, settings: SamplerSettings, user_sampler: str, pipeline: TextToImage
) -> dict:
    """What the manifest says of one image: everything it is a function of, and its file."""
    return {
        "file": item.file,
        "line": item.line,
        "index": item.index,
        "prompt": item.prompt,
        "negative_prompt": item.negative_prompt,
        "seed": item.seed,
        "guidance_scale": item.guidance_scale,
        "sampler": user_sampler,
        "steps": settings.steps,
        "eta": settings.eta,
        "shift": settings.shift,
        "guidance_rescale": settings.guidance_rescale,
        "guidance_interval": None
        if settings.guidance_interval is None
        else list(settings.guidance_interval),
        "micro_batch": pipeline.micro_batch,
        "checkpoint": pipeline.run_dir,
        "checkpoint_step": pipeline.checkpoint_step,
        "use_ema": pipeline.use_ema,
    }


def read_manifest(output_dir: str) -> dict[str, dict]:
    """file -> record of an existing manifest (a record per file; the last one wins)."""
    path = os.path.join(output_dir, MANIFEST)
    records = {}
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                records[record["file"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s:%d is not a manifest record; ignoring it", path, number)
    return records


def _write_atomically(path: str, write) -> None:
    """write(temp_path), then rename onto `path`: a reader (or a kill) never sees half a file."""
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    write(temporary)
    os.replace(temporary, path)


def write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    _write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def write_manifest(output_dir: str, records: dict[str, dict]) -> None:
    """Rewrites the manifest from the records of finished files, sorted by file name."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for name in sorted(records):
                f.write(json.dumps(records[name], sort_keys=True) + "\n")

    _write_atomically(os.path.join(output_dir, MANIFEST), write)


def write_grid(output_dir: str, files: Sequence[str], columns: int | None = None) -> str | None:
    """A grid PNG of the first GRID_MAX_IMAGES `files` (row-major, in the given order)."""
    from PIL import Image

    files = [f for f in files if os.path.isfile(os.path.join(output_dir, f))][:GRID_MAX_IMAGES]
    if not files:
        return None
    images = [np.asarray(Image.open(os.path.join(output_dir, f)).convert("RGB")) for f in files]
    columns = columns or math.ceil(math.sqrt(len(images)))
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    height, width = images[0].shape[:2]
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    path = os.path.join(output_dir, GRID)
    write_png(path, grid)
    return path


def _remove_stale_temporaries(output_dir: str) -> None:
    for name in os.listdir(output_dir):
        if name.startswith(".") and ".tmp-" in name:
            os.remove(os.path.join(output_dir, name))


def _agree_across_processes(mask: np.ndarray) -> np.ndarray:
    """Process 0's view of which items are pending, on every process (they must run together)."""
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(mask))


def sample_to_directory(
    pipeline: TextToImage,
    items: Sequence[PromptItem],
    output_dir: str,
    *,
    sampler: str = "euler",
    steps: int = 20,
    eta: float = 0.0,
    shift: float | None = None,
    guidance_rescale: float = 0.0,
    guidance_interval=None,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Makes the PNG of every item not already finished, with `manifest.jsonl` and `grid.png`.

    Finished = its PNG exists and the manifest has its exact record (same prompt, seed and
    settings). Each batch's PNGs are renamed into place before the manifest (rewritten whole,
    atomically) lists them, so a kill at any moment loses at most the batch in flight and never
    leaves half a file or a duplicate line; a rerun redoes exactly the unfinished items, and the
    images are bit-identical to an uninterrupted run's (see the module docstring). With several
    processes, all run the program and process 0 writes. Returns {"generated", "skipped"}.
    """
    import tqdm

    settings = pipeline.settings(
        sampler,
        steps,
        eta=eta,
        shift=shift,
        guidance_rescale=guidance_rescale,
        guidance_interval=guidance_interval,
    )
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(output_dir, exist_ok=True)
        _remove_stale_temporaries(output_dir)
    records = read_manifest(output_dir) if os.path.isdir(output_dir) else {}
    wanted = {item.file: manifest_record(item, settings, sampler, pipeline) for item in items}
    if len(wanted) != len(items):
        raise PipelineError("two prompt items map to the same file name; check the prompt file")
    pending_mask = np.array(
        [
            records.get(item.file) != wanted[item.file]
            or not os.path.isfile(os.path.join(output_dir, item.file))
            for item in items
        ],
        bool,
    )
    pending_mask = _agree_across_processes(pending_mask)
    pending = [item for item, todo in zip(items, pending_mask, strict=True) if todo]
    size = pipeline.program_batch_size(len(pending), batch_size)
    bar = tqdm.tqdm(
        total=len(pending),
        unit="img",
        desc="sample",
        disable=not progress or not writer,
        dynamic_ncols=True,
    )
    for start in range(0, len(pending), size):
        batch = pending[start : start + size]
        images = pipeline.generate(
            [item.prompt for item in batch],
            [item.negative_prompt for item in batch],
            [item.seed for item in batch],
            sampler=sampler,
            steps=steps,
            guidance_scale=[item.guidance_scale for item in batch],
            guidance_rescale=guidance_rescale,
            eta=eta,
            shift=shift,
            guidance_interval=guidance_interval,
            batch_size=size,
        )
        if writer:
            for item, image in zip(batch, images, strict=True):
                write_png(os.path.join(output_dir, item.file), image)
            for item in batch:
                records[item.file] = wanted[item.file]
            write_manifest(output_dir, records)
        bar.update(len(batch))
    bar.close()
    if writer:
        if not pending and not os.path.isfile(os.path.join(output_dir, MANIFEST)):
            write_manifest(output_dir, records)
        per_prompt = max(item.index for item in items) + 1 if items else None
        write_grid(
            output_dir, [item.file for item in items], per_prompt if per_prompt > 1 else None
        )
    return {"generated": len(pending), "skipped": len(items) - len(pending)}
