"""The sampling program: one jitted program from a global batch of conditions, seeds and guidance
scales to uint8 images, shared by TextToImage, sample.py, evaluate.py and the ahead-of-time
compiler (which lowers this very function for a TPU slice).

Inside: the frozen text tower once per micro-batch (or the class labels of a class-conditional
DiT) -> classifier-free guidance around the DiT -> a sampler's `lax.scan` from noise to images ->
uint8. Prompts, seeds and guidance scales are traced inputs, so new values never recompile.

Determinism. An image is a pure function of (weights, condition, negative condition, seed,
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
    shuffled prompts, and 1 vs 8 devices. Equal images need an equal micro_batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from diffusion import guidance, samplers, sharding
from diffusion.families import dit as dit_family
from diffusion.families import video_dit as video_dit_family
from diffusion.inference.settings import SAMPLERS_WITH_ETA, SamplerSettings
from diffusion.models import layers
from diffusion.models.video_dit import VideoDiTConfig
from diffusion.schedules import DiscreteSchedule, ddpm_levels, flow_levels


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 [0, 255], rounding to the nearest level."""
    return jnp.clip(jnp.round((images + 1) * 127.5), 0, 255).astype(jnp.uint8)


def seed_keys(seeds: jax.Array) -> jax.Array:
    """uint32 seeds (B,) -> typed keys (B,), each equal to jax.random.key(seed)."""
    return jax.vmap(jax.random.key)(seeds)


@functools.cache
def discrete_schedule(key: tuple[str, int, bool]) -> DiscreteSchedule:
    name, num_timesteps, zero_terminal_snr = key
    return DiscreteSchedule.from_name(name, num_timesteps, zero_terminal_snr=zero_terminal_snr)


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """Everything static about a sampling program. Equal specs (e.g. two checkpoints of one
    model, or pipelines on one mesh) share the compilations of `sampling_program`."""

    dit_graphdef: Any
    text_graphdef: Any  # None: a class-conditional DiT (inputs "labels" / "uncond_labels")
    in_channels: int
    word_conditioning: bool  # the DiT also reads the text tower's word embeddings
    resolution: int
    objective: str  # "flow" or "ddpm"
    prediction_type: str
    schedule: tuple[str, int, bool] | None  # DDPM: (beta schedule, T, zero terminal SNR)
    mesh: Mesh
    micro_batch: int
    settings: SamplerSettings
    # A latent DiT's autoencoder (its decoder turns each drawn latent into an image) and the
    # normalisation training applied: latents = model space / latent_scale + latent_shift.
    decoder_graphdef: Any = None
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    # A video DiT (Wan's call signature: token states and mask, no pooled embedding) and the
    # frames of each clip it draws; 0 frames: images (B, H, W, C), else clips (B, T, H, W, C).
    video: bool = False
    frames: int = 0

    def levels(self):
        s = self.settings
        if self.objective == "flow":
            return flow_levels(s.steps, s.shift)
        # Trailing spacing starts at the last training step, the noisiest level (Lin et al. 2023).
        return ddpm_levels(discrete_schedule(self.schedule), s.steps, spacing="trailing")


TRACE_COUNT = [0]  # traces of sampling_program (one per compilation), for tests and users


@functools.partial(jax.jit, static_argnames="spec")
def sampling_program(
    dit_state, text_state, inputs: dict, spec: ProgramSpec, decoder_state=None
) -> jax.Array:
    """Tokens, seeds and scales of a global batch -> uint8 images (B, H, W, C), or clips
    (B, T, H, W, C) of a video DiT (`spec.frames`).

    Each device walks through its rows `micro_batch` at a time (`lax.map`), so the arithmetic of
    a sample has the same shapes whatever the batch size or the number of devices. The weights
    come replicated, the inputs sharded over the mesh's batch axes. decoder_state: the
    autoencoder's weights of a latent DiT (spec.decoder_graphdef), else None.
    """
    TRACE_COUNT[0] += 1
    batch_spec = PartitionSpec(sharding.batch_axes(spec.mesh) or None)

    def per_device(dit_state, text_state, decoder_state, inputs):
        chunks = jax.tree.map(lambda x: x.reshape((-1, spec.micro_batch) + x.shape[1:]), inputs)
        images = jax.lax.map(
            lambda chunk: _sample_micro_batch(dit_state, text_state, decoder_state, chunk, spec),
            chunks,
        )  # (chunks, micro_batch, H, W, C)
        return images.reshape((-1,) + images.shape[2:])

    replicated = PartitionSpec()
    return jax.shard_map(
        per_device,
        mesh=spec.mesh,
        in_specs=(replicated, replicated, replicated, batch_spec),
        out_specs=batch_spec,
    )(dit_state, text_state, decoder_state, inputs)


def _sample_micro_batch(dit_state, text_state, decoder_state, inputs, spec: ProgramSpec):
    """One micro-batch: prompt embeddings once, then each sample's own sampling loop, then (a
    latent DiT) the autoencoder's decoder over the micro-batch."""
    settings = spec.settings
    cond, uncond = _conditions(text_state, inputs, spec)

    def dit_fn(x, t, cond):
        # Models are merged in the trace they run in (see layers.merge_here): the DiT in the
        # sampler loop's, the text encoder in lax.map's.
        dit = layers.merge_here(spec.dit_graphdef, dit_state)
        if spec.text_graphdef is None:
            return dit(x, t, labels=cond)
        if spec.video:
            return video_dit_family.video_model_fn(dit)(x, t, cond)
        return dit_family.dit_model_fn(dit)(x, t, cond)

    model_fn = _first_channels(dit_fn, spec.in_channels)
    guided = guidance.guided_model_fn(
        model_fn, rescale_phi=settings.guidance_rescale, interval=settings.guidance_interval
    )
    levels = spec.levels()
    options = {"prediction_type": spec.prediction_type}
    if settings.sampler in SAMPLERS_WITH_ETA:
        options["eta"] = settings.eta
    shape = (1, spec.resolution, spec.resolution, spec.in_channels)
    if spec.frames:
        shape = (1, spec.frames, *shape[1:])

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
    images = jax.vmap(one_sample)(keys, cond, uncond, inputs["scales"])  # (micro, [T,] H, W, C)
    if spec.decoder_graphdef is not None:
        autoencoder = layers.merge_here(spec.decoder_graphdef, decoder_state)
        latents = images / spec.latent_scale + spec.latent_shift  # (micro, [T,] h, w, c)
        frames = latents.reshape((-1,) + latents.shape[-3:])  # a clip frame by frame
        decoded = autoencoder.decode(frames).astype(jnp.float32)  # (micro [* T], H, W, 3)
        images = decoded.reshape(latents.shape[:-3] + decoded.shape[1:])
    return to_uint8(images)


def _conditions(text_state, inputs, spec: ProgramSpec):
    """(cond, uncond) of a micro-batch: the prompts' and negative prompts' text conditions, or
    the class labels and the null class of a class-conditional DiT."""
    if spec.text_graphdef is None:
        return inputs["labels"], inputs["uncond_labels"]
    text_encoder = layers.merge_here(spec.text_graphdef, text_state)
    words = spec.word_conditioning
    cond = dit_family.text_condition(text_encoder, inputs["tokens"], inputs["mask"], words=words)
    uncond = dit_family.text_condition(
        text_encoder, inputs["negative_tokens"], inputs["negative_mask"], words=words
    )
    return cond, uncond


def _first_channels(model_fn, channels: int):
    """The prediction channels of a DiT (a learn_sigma DiT also outputs variance channels)."""

    def prediction_fn(x, t, cond):
        return model_fn(x, t, cond)[..., :channels]

    return prediction_fn


def host_to_global(chunk: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays, the same on every process, -> global arrays sharded over the mesh's batch
    axes (each device takes its rows). Unlike `data.to_global_batch`, which assembles each
    process's own rows of a training batch."""
    batch = sharding.batch_sharding(mesh)
    return {
        name: jax.make_array_from_callback(value.shape, batch, lambda index, v=value: v[index])
        for name, value in chunk.items()
    }


def to_host(outputs: jax.Array) -> np.ndarray:
    """A program's sharded outputs as one host array, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(outputs, tiled=True))
    return np.asarray(outputs)


def pad_rows(array: np.ndarray, size: int) -> np.ndarray:
    """Pads a chunk to `size` rows with copies of its last row (their outputs are dropped)."""
    missing = size - array.shape[0]
    if missing <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)], axis=0)


def program_spec(
    dit_graphdef,
    text_graphdef,
    dit_config,
    diffusion_config,
    *,
    resolution: int,
    mesh: Mesh,
    micro_batch: int,
    settings: SamplerSettings,
    decoder_graphdef=None,
    latents=None,
    frames: int = 0,
) -> ProgramSpec:
    """The spec of a DiT's sampling program from its model config and its recipe's
    config.diffusion; a latent DiT's also from its autoencoder's graph and its LatentEncoding;
    a video DiT's with the `frames` of its clips (0: it draws images, one-frame clips)."""
    d = diffusion_config
    schedule = None
    if d.objective == "ddpm":
        schedule = (d.schedule, int(d.num_timesteps), bool(d.zero_terminal_snr))
    return ProgramSpec(
        dit_graphdef=dit_graphdef,
        text_graphdef=text_graphdef,
        in_channels=dit_config.in_channels,
        word_conditioning=getattr(dit_config, "conditioning", "text") == "text"
        and getattr(dit_config, "word_conditioning", False),
        resolution=int(resolution),
        objective=d.objective,
        prediction_type=dit_family.prediction_type_of(d),
        schedule=schedule,
        mesh=mesh,
        micro_batch=int(micro_batch),
        settings=settings,
        decoder_graphdef=decoder_graphdef,
        latent_scale=1.0 if latents is None else latents.scaling_factor,
        latent_shift=0.0 if latents is None else latents.shift_factor,
        video=isinstance(dit_config, VideoDiTConfig),
        frames=int(frames),
    )
