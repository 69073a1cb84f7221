"""The jitted programs of Wan 2.1 text-to-video sampling (`wan_pipeline.WanTextToVideo` holds the
models and calls them): the denoising-and-decoding program of a batch of clips, the umT5 encoding
program of prompt rows, and the checks that a mesh's token split suits the DiT, made before
anything is compiled. Apart from the pipeline because these are pure functions of arrays and a
static spec, traced once per spec, while the pipeline is the stateful object around them
(weights, tokenizer, prompt cache, sizes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion import guidance, samplers, sharding
from diffusion.errors import UserError
from diffusion.inference.program import seed_keys, to_uint8
from diffusion.inference.settings import SAMPLERS_WITH_ETA, SamplerSettings, SamplingError
from diffusion.inference.wan_directory import wan_levels
from diffusion.models import attention, layers
from diffusion.models.umt5 import masked_states
from diffusion.schedules import NoiseLevels


@dataclasses.dataclass(frozen=True)
class WanProgramSpec:
    """Everything static about a Wan sampling program (it keys the compilation cache)."""

    dit_graphdef: Any
    vae_graphdef: Any
    mesh: Mesh
    rules: tuple  # the logical-axis rules the DiT is placed and traced with
    micro_batch: int
    settings: SamplerSettings
    latent_shape: tuple[int, int, int, int]  # (t, h, w, c) of one sample
    num_train_timesteps: int
    floats: bool  # pixels as float32 in [0, 1] (diffusers' "np" output) instead of uint8

    def levels(self) -> NoiseLevels:
        s = self.settings
        return wan_levels(s.steps, s.shift, self.num_train_timesteps)


def per_clip_rules(rules: sharding.LogicalRules) -> tuple[tuple[str, sharding.MeshAxes], ...]:
    """`rules` for the DiT inside the per-clip vmap: there its batch is one clip's (cond, uncond)
    pair, which must stay whole, while the vmapped clip axis itself is split over the batch axes
    (`spmd_axis_name`); a mesh axis cannot split both. The first rule for a name wins."""
    return (("activation_batch", None), *rules)


def to_micro_batches(x: jax.Array, devices: int, micro_batch: int) -> jax.Array:
    """(B, ...) split over `devices` batch devices -> (chunks, devices x micro_batch, ...), chunk c
    holding rows c x micro_batch ... of every device's share: the rows each device computes at
    once are those the data-parallel program's device would (its own, in its order)."""
    rows = x.reshape((devices, -1, micro_batch) + x.shape[1:])  # (devices, chunks, micro, ...)
    return rows.swapaxes(0, 1).reshape((rows.shape[1], devices * micro_batch) + x.shape[1:])


def from_micro_batches(x: jax.Array, devices: int) -> jax.Array:
    """The inverse of `to_micro_batches`: (chunks, devices x micro_batch, ...) -> (B, ...)."""
    chunks = x.reshape((x.shape[0], devices, -1) + x.shape[2:])  # (chunks, devices, micro, ...)
    return chunks.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


@functools.partial(jax.jit, static_argnames="spec")
def wan_sampling_program(dit_state, vae_state, inputs: dict, spec: WanProgramSpec) -> jax.Array:
    """Prompt states, seeds and scales of a global batch -> clips (B, T, H, W, 3): uint8, or
    float32 in [0, 1] with `spec.floats`. inputs: "context" and "negative_context" (B, L, D),
    "seeds" (B,) uint32, "scales" (B,) float32, optionally "latents" (B, t, h, w, c), the
    initial noise (else drawn from each sample's seed).

    GSPMD: the states and inputs arrive placed (the DiT by its logical names, the batch over the
    batch axes); call it inside `sharding.activate(spec.mesh, per_clip_rules(spec.rules))`, which
    the DiT's activation constraints and sequence-parallel attention read while tracing."""
    axes = sharding.batch_axes(spec.mesh)
    devices = math.prod(spec.mesh.shape[a] for a in axes)
    split_rows = NamedSharding(spec.mesh, PartitionSpec(None, axes or None))
    chunks = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            to_micro_batches(x, devices, spec.micro_batch), split_rows
        ),
        inputs,
    )
    clips = jax.lax.map(
        lambda chunk: _sample_micro_batch(dit_state, vae_state, chunk, spec), chunks
    )  # (chunks, devices x micro_batch, T, H, W, 3)
    clips = jax.lax.with_sharding_constraint(clips, split_rows)
    batch_rows = NamedSharding(spec.mesh, PartitionSpec(axes or None))
    return jax.lax.with_sharding_constraint(from_micro_batches(clips, devices), batch_rows)


def _sample_micro_batch(dit_state, vae_state, inputs, spec: WanProgramSpec) -> jax.Array:
    settings = spec.settings

    def dit_fn(x, t, context):
        # Merged in the sampler loop's trace (see layers.merge_here). No context mask: WanPipeline
        # lets every one of the 512 positions, zeros included, be attended.
        dit = layers.merge_here(spec.dit_graphdef, dit_state)
        return dit(x, t, context=context)

    guided = guidance.guided_model_fn(
        dit_fn, rescale_phi=settings.guidance_rescale, interval=settings.guidance_interval
    )
    levels = spec.levels()
    options = {"prediction_type": "flow_velocity"}
    if settings.sampler in SAMPLERS_WITH_ETA:
        options["eta"] = settings.eta

    def one_sample(key, context, negative_context, scale, noise):
        # Batch 1 inside the vmap: a sampler's step noise comes from its key alone.
        noise_key, step_key = jax.random.split(key)
        if noise is None:
            noise = jax.random.normal(noise_key, spec.latent_shape, jnp.float32)
        condition = guidance.GuidanceCondition(context[None], negative_context[None], scale)
        latents = samplers.sample(
            settings.sampler, guided, noise[None], levels, step_key, condition, **options
        )
        return latents[0]  # (t, h, w, c)

    # Each clip's sampler on the devices of its batch row; inside, the DiT's weights and tokens
    # are split as the rules say (per_clip_rules).
    axes = sharding.batch_axes(spec.mesh)
    latents = jax.vmap(one_sample, spmd_axis_name=axes or None)(
        seed_keys(inputs["seeds"]),
        inputs["context"],
        inputs["negative_context"],
        inputs["scales"],
        inputs.get("latents"),
    )  # (micro, t, h, w, c)
    vae = layers.merge_here(spec.vae_graphdef, vae_state)
    clips = vae.decode(vae.denormalize_latents(latents)).astype(jnp.float32)  # (micro, T, H, W, 3)
    if spec.floats:
        return jnp.clip((clips + 1) / 2, 0, 1)  # diffusers' postprocess to "np"
    return to_uint8(clips)


@functools.partial(jax.jit, static_argnames="graphdef")
def encode_texts_program(text_state, tokens: jax.Array, mask: jax.Array, graphdef) -> jax.Array:
    """umT5 states (N, L, D) of token rows (N, L), zero after the real tokens; one row at a time
    (`lax.map`), so a text's states have one shape whatever else is encoded with it."""

    def one(row):
        encoder = layers.merge_here(graphdef, text_state)
        tokens, mask = row
        return masked_states(encoder(tokens[None], mask[None]), mask[None])[0]

    return jax.lax.map(one, (tokens, mask))


# ---------------------------------------------------------------------------------------------
# Meshes the program can run on
# ---------------------------------------------------------------------------------------------


SEQUENCE_PARALLEL_ATTENTION = ("ulysses", "ring", "ulysses_splash")


def token_split(mesh: Mesh, rules: sharding.LogicalRules) -> tuple[tuple[str, ...], int]:
    """The mesh axes the rules split the DiT's tokens over (`sequence`), and their size."""
    axes = sharding.mesh_axes(sharding.logical_to_spec(("activation_length",), rules, mesh=mesh)[0])
    return axes, math.prod(mesh.shape[a] for a in axes)


def check_sequence_parallel(dit_config, mesh: Mesh, rules: sharding.LogicalRules) -> None:
    """Refuses, naming the fix, a mesh whose token split the DiT's attention cannot serve (found
    here rather than as a trace-time error after the prompts were encoded)."""
    axes, size = token_split(mesh, rules)
    if size == 1:
        return
    implementation = dit_config.attention_impl
    if implementation not in SEQUENCE_PARALLEL_ATTENTION:
        raise SamplingError(
            f"the mesh splits the DiT's tokens over {axes} ({size} devices) but its attention_impl "
            f"is {implementation!r}, which needs whole sequences; use attention_impl='ulysses', "
            "'ulysses_splash' (TPU) or 'ring' (--config.attention_impl), or config.mesh.sequence=1"
        )
    if implementation in ("ulysses", "ulysses_splash"):
        heads = dit_config.num_heads
        head_entry = sharding.logical_to_spec(("heads",), rules, shape=(heads,), mesh=mesh)[0]
        head_axes = sharding.mesh_axes(head_entry)
        try:
            attention.check_ulysses_heads(
                heads, head_axes, math.prod(mesh.shape[a] for a in head_axes), axes, size
            )
        except UserError as error:  # the pipeline's errors are SamplingErrors
            raise SamplingError(str(error)) from None
