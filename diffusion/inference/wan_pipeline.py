"""Text-to-video with Wan 2.1 itself: a local diffusers-format Wan 2.1 directory (what
`WanPipeline.save_pretrained` writes, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) sampled the way
diffusers' `WanPipeline` samples it, on a mesh of data / fsdp / sequence / tensor devices.

    pipe = WanTextToVideo.from_diffusers("Wan2.1-T2V-1.3B-Diffusers")
    clips = pipe.generate(["a cat surfing"], seeds=[0], steps=50)  # (1, 81, 480, 832, 3) uint8

What follows WanPipeline (diffusers/pipelines/wan/pipeline_wan.py), step by step:
  - prompts are cleaned (HTML entities, runs of whitespace; ftfy when installed, as diffusers),
    tokenized to max_sequence_length = 512 and encoded by umT5 with the attention mask; the
    states after the real tokens are zeros (`umt5.masked_states`), and the DiT attends to all
    512 positions (no context mask). An absent negative prompt is the empty string.
  - the initial latents are (t, h, w, c) = (1 + (T - 1) / 4, H / 8, W / 8, 16) standard normal;
    here each sample draws them from its own `jax.random.key(seed)` (or takes them from
    `latents=`), so a clip never depends on the batch size or its position in the batch.
  - guidance: uncond + w (cond - uncond) with the negative prompt's states as uncond.
  - the noise levels are those of diffusers' UniPCMultistepScheduler with use_flow_sigmas (the
    scheduler of Wan's diffusers repositories): sigma = shift(linspace(1, 1/1000, N + 1)[:-1]),
    the first lowered by 1e-6, then 0; the DiT sees the integer timestep int(1000 sigma), the
    solver the exact sigma, as in diffusers and Wan's own code (see `wan_directory.wan_levels`).
  - the latents are de-normalised with the VAE config's latents_mean / latents_std and decoded
    by the causal VAE; pixels (x + 1) / 2 in [0, 1] are diffusers' output_type="np" frames.

Prompt states are computed once per distinct text (kept in a small cache, so a prompt file's
shared negative prompt is encoded once per job), outside the denoising program. The program
(`wan_program.wan_sampling_program`) is one GSPMD jit: `lax.map` over micro-batches (equal
shapes for any batch size or device count, as in program.py), each clip's sampler `lax.scan`
under a vmap over the clips, the VAE decode. How the mesh splits the work:
  - clips: over the batch axes (data, fsdp; `sharding.batch_axes`), micro_batch of them per
    batch device at a time, each device holding the same rows a data-parallel shard_map would.
    The vmap over clips carries those axes (`spmd_axis_name`), and inside it the DiT's own batch
    (a clip's cond / uncond pair) stays whole (`per_clip_rules`).
  - the DiT's weights: placed by their logical names under the mesh config's rules
    (`sharding.state_shardings`; over fsdp and tensor by default, read straight onto their
    shards), gathered by GSPMD where used: the 14B DiT need not be whole on any device. On a
    batch-only mesh (fsdp = tensor = 1) they are whole on every device, as data parallelism has.
  - a clip's DiT tokens: over `sequence`, the activation constraints active while tracing
    (`sharding.activate`), self-attention by "ulysses" (all-to-alls; heads per tensor device
    divisible by sequence) or "ring" (ppermutes); cross-attention splits only the queries.
  - the VAE is small and stays replicated; it decodes each device's own clips.
  - the umT5 encoder's weights are sharded over fsdp / tensor (`hf/files.module_with_params`).
One program serves every mesh (a batch-only one included, where it is the data-parallel program
the shard_map used to spell out): a clip depends on its seed alone, never on the batch size, its
position, the mesh or the device count, up to float reduction order between meshes (float
clips of the sharded meshes in tests/test_wan_pipeline.py equal data=8's within 1e-5).
"""

from __future__ import annotations

import collections
import html
import math
import numbers
import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion import meshes, sharding
from diffusion.hf.umt5 import load_hf_umt5
from diffusion.hf.wan_transformer import load_diffusers_wan_transformer
from diffusion.hf.wan_vae import load_diffusers_wan_vae
from diffusion.inference.program import (
    host_to_global,
    pad_rows,
    to_host,
)
from diffusion.inference.settings import (
    SamplerSettings,
    SamplingError,
    check_number,
    check_seed,
    make_settings,
    per_sample,
)
from diffusion.inference.wan_directory import check_wan_directory, read_scheduler
from diffusion.inference.wan_program import (
    WanProgramSpec,
    check_sequence_parallel,
    encode_texts_program,
    per_clip_rules,
    token_split,
    wan_sampling_program,
)

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default
DEFAULT_SIZE = (81, 480, 832)  # frames, height, width: WanPipeline's defaults
DEFAULT_STEPS = 50
DEFAULT_SAMPLER = "unipc"
DEFAULT_ATTENTION = "ulysses"  # the plain core unless the mesh splits tokens over `sequence`
DEFAULT_MICRO_BATCH = 1  # a clip's activations are large; one per device at a time
TEXT_CACHE_SIZE = 64  # distinct texts whose umT5 states are kept between calls


# ---------------------------------------------------------------------------------------------
# Prompts as diffusers' WanPipeline cleans them
# ---------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """WanPipeline's prompt_clean: ftfy's fixes when installed, HTML entities unescaped twice,
    runs of whitespace collapsed to one space, ends stripped."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # diffusers skips it too when ftfy is missing
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise SamplingError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class WanTextToVideo:
    """A Wan 2.1 text-to-video model (DiT, causal VAE, umT5, tokenizer, scheduler shift) on a
    mesh, ready to sample clips of `frames` x `height` x `width`.

    The attributes sample.py's `sample_to_directory` reads: frames, frame_shape, micro_batch,
    run_dir (the directory), checkpoint_step (None), use_ema (False: released weights).
    """

    checkpoint_step = None
    use_ema = False

    def __init__(
        self,
        *,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        flow_shift: float,
        num_train_timesteps: int = 1000,
        mesh: Mesh | None = None,
        rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
        micro_batch: int = DEFAULT_MICRO_BATCH,
        directory: str | None = None,
        num_frames: int = DEFAULT_SIZE[0],
        height: int = DEFAULT_SIZE[1],
        width: int = DEFAULT_SIZE[2],
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ):
        self.run_dir = directory
        self.micro_batch = _check_count(micro_batch, "micro_batch")
        self.mesh = mesh if mesh is not None else meshes.make_mesh({"data": -1})
        self.rules = tuple(rules)
        self.flow_shift = float(flow_shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.max_sequence_length = _check_count(max_sequence_length, "max_sequence_length")
        self.dit_config, self.vae_config = transformer.config, vae.config
        if text_encoder.config.width != self.dit_config.text_dim:
            raise SamplingError(
                f"the text encoder's states have width {text_encoder.config.width} but the "
                f"transformer reads text_dim={self.dit_config.text_dim}: the two are not one Wan "
                "model"
            )
        if self.vae_config.z_dim != self.dit_config.in_channels:
            raise SamplingError(
                f"the VAE's latents have z_dim={self.vae_config.z_dim} channels but the "
                f"transformer reads in_channels={self.dit_config.in_channels}"
            )
        check_sequence_parallel(self.dit_config, self.mesh, self.rules)
        self.tokenizer = tokenizer
        # The DiT split by its logical names (over fsdp / tensor; whole on a batch-only mesh);
        # the VAE, small, replicated on every device.
        self._dit_graphdef, dit_state = nnx.split(transformer)
        self._dit_state = sharding.shard_tree(
            dit_state, sharding.state_shardings(dit_state, self.mesh, self.rules)
        )
        self._vae_graphdef, vae_state = nnx.split(vae)
        self._vae_state = jax.device_put(vae_state, NamedSharding(self.mesh, PartitionSpec()))
        # The encoder stays where it was loaded (sharded over fsdp/tensor by `from_diffusers`).
        self._text_graphdef, self._text_state = nnx.split(text_encoder)
        self._text_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.frames, self.frame_shape = self.check_size(num_frames, height, width)

    @classmethod
    def from_diffusers(
        cls,
        directory: str,
        mesh: Mesh | None = None,
        *,
        rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
        attention_impl: str = DEFAULT_ATTENTION,
        micro_batch: int = DEFAULT_MICRO_BATCH,
        num_frames: int = DEFAULT_SIZE[0],
        height: int = DEFAULT_SIZE[1],
        width: int = DEFAULT_SIZE[2],
        dtype: str = "float32",
        param_dtype: str = "float32",
    ) -> WanTextToVideo:
        """Loads a diffusers Wan 2.1 text-to-video directory (model_index.json naming
        WanPipeline; transformer/, vae/, text_encoder/, tokenizer/, scheduler/).

        mesh, rules: the clips are split over the mesh's batch axes (data, fsdp); the DiT's and
        the umT5 encoder's weights are placed on their shards (fsdp / tensor under `rules`) as
        they are read; a `sequence` axis splits the DiT's tokens. attention_impl: the DiT's
        self-attention core; "ulysses" or "ring" split the tokens over `sequence` (with sequence
        1 they are the plain core). dtype / param_dtype: of the DiT and the encoder (the VAE
        runs in float32, as diffusers' example loads it).
        """
        check_wan_directory(directory)
        flow_shift, num_train_timesteps = read_scheduler(directory)
        mesh = mesh if mesh is not None else meshes.make_mesh({"data": -1})
        execution = dict(dtype=dtype, param_dtype=param_dtype)
        transformer, _ = load_diffusers_wan_transformer(
            os.path.join(directory, "transformer"),
            mesh=mesh,
            rules=rules,
            attention_impl=attention_impl,
            **execution,
        )
        vae, _ = load_diffusers_wan_vae(os.path.join(directory, "vae"))
        text_encoder, _ = load_hf_umt5(
            os.path.join(directory, "text_encoder"), mesh=mesh, rules=rules, **execution
        )
        import transformers  # noqa: PLC0415 (slow to import; only a Wan directory needs it)

        tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
        return cls(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            flow_shift=flow_shift,
            num_train_timesteps=num_train_timesteps,
            mesh=mesh,
            rules=rules,
            micro_batch=micro_batch,
            directory=directory,
            num_frames=num_frames,
            height=height,
            width=width,
        )

    # -- sizes and settings ---------------------------------------------------------------------

    def check_size(self, num_frames, height, width) -> tuple[int, tuple[int, int]]:
        """(frames, (height, width)) if the VAE and the DiT's patches tile them, else a
        SamplingError naming the nearest sizes that do."""
        num_frames = _check_count(num_frames, "num_frames")
        step = self.vae_config.temporal_factor
        if (num_frames - 1) % step:
            below = num_frames - (num_frames - 1) % step
            raise SamplingError(
                f"num_frames={num_frames}: the Wan VAE makes 1 + {step}k frames; use "
                f"{below} or {below + step}"
            )
        latent_frames = self.vae_config.latent_frames(num_frames)
        if latent_frames % self.dit_config.patch_size[0]:
            raise SamplingError(
                f"num_frames={num_frames} gives {latent_frames} latent frames, not a multiple of "
                f"the DiT's temporal patch {self.dit_config.patch_size[0]}"
            )
        sides = []
        for name, side, patch in (
            ("height", height, self.dit_config.patch_size[1]),
            ("width", width, self.dit_config.patch_size[2]),
        ):
            side = _check_count(side, name)
            multiple = self.vae_config.spatial_factor * patch
            if side % multiple:
                below = side - side % multiple
                nearest = f"{below} or {below + multiple}" if below else f"{multiple}"
                raise SamplingError(
                    f"{name}={side} is not a multiple of {multiple} (the VAE's factor "
                    f"{self.vae_config.spatial_factor} x the DiT's patch {patch}); use {nearest}"
                )
            sides.append(side)
        self.check_token_split(num_frames, *sides)
        return num_frames, (sides[0], sides[1])

    def check_token_split(self, num_frames: int, height: int, width: int) -> None:
        """A SamplingError unless the mesh's sequence devices split the clip's tokens evenly."""
        axes, size = token_split(self.mesh, self.rules)
        latent = self.latent_shape(num_frames, height, width)[:3]
        tokens = math.prod(n // p for n, p in zip(latent, self.dit_config.patch_size, strict=True))
        if tokens % size:
            raise SamplingError(
                f"{num_frames} frames of {height}x{width} make {tokens} DiT tokens, which the "
                f"{size} devices of the mesh axes {axes} cannot split evenly; use a "
                f"config.mesh.sequence that divides {tokens} or a clip size whose token count is "
                f"a multiple of {size}"
            )

    def with_size(self, num_frames=None, height=None, width=None) -> WanTextToVideo:
        """The same loaded pipeline drawing clips of another size (None: keep this one's)."""
        frames, size = self.check_size(
            self.frames if num_frames is None else num_frames,
            self.frame_shape[0] if height is None else height,
            self.frame_shape[1] if width is None else width,
        )
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.frames, other.frame_shape = frames, size
        return other

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_config.spatial_factor
        return (
            self.vae_config.latent_frames(frames),
            height // f,
            width // f,
            self.dit_config.in_channels,
        )

    @property
    def num_data_devices(self) -> int:
        return math.prod(self.mesh.shape[a] for a in sharding.batch_axes(self.mesh))

    def settings(self, **options) -> SamplerSettings:
        """Sampler options -> the static settings of a program. Defaults: Wan's UniPC, 50 steps,
        the scheduler's shift. options: sampler, steps, eta, shift, guidance_rescale,
        guidance_interval (see `settings.make_settings`; the flow samplers)."""
        options = {"sampler": DEFAULT_SAMPLER, "steps": DEFAULT_STEPS, **options}
        return make_settings("flow", default_shift=self.flow_shift, **options)

    def program_batch_size(self, count: int, batch_size: int | None = None) -> int:
        """Clips per program call: `batch_size` (default min(count, micro_batch x devices))
        rounded up to a multiple of micro_batch x data devices."""
        unit = self.micro_batch * self.num_data_devices
        requested = (
            min(count, unit) if batch_size is None else _check_count(batch_size, "batch_size")
        )
        return max(1, -(-requested // unit)) * unit

    # -- text ----------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int32 (N, max_sequence_length) of cleaned texts, as WanPipeline pads and
        truncates them."""
        encoded = self.tokenizer(
            [clean_prompt(t) for t in texts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        return (
            np.asarray(encoded["input_ids"], np.int32),
            np.asarray(encoded["attention_mask"], np.int32),
        )

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """umT5 states (N, max_sequence_length, D) float32, zero after each text's tokens; each
        distinct text is encoded once (and kept for the next calls)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            # Rows padded to a multiple of 8: few distinct shapes, hence few compilations.
            tokens, mask = self.tokenize(missing)
            size = -(-len(missing) // 8) * 8
            states = encode_texts_program(
                self._text_state, pad_rows(tokens, size), pad_rows(mask, size), self._text_graphdef
            )
            for text, state in zip(missing, np.asarray(states)[: len(missing)], strict=True):
                self._text_cache[text] = state
        for text in texts:
            self._text_cache.move_to_end(text)
        states = np.stack([self._text_cache[t] for t in texts])
        while len(self._text_cache) > max(TEXT_CACHE_SIZE, len(set(texts))):
            self._text_cache.popitem(last=False)
        return states

    # -- sampling --------------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str | None] | None = None,
        seeds: int | Sequence[int] = 0,
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | Sequence[float] = 5.0,
        latents: np.ndarray | None = None,
        batch_size: int | None = None,
        settings: SamplerSettings | None = None,
        output: str = "uint8",
        **sampler_options,
    ) -> np.ndarray:
        """Clips (N, T, H, W, 3) for N prompts: uint8, or float32 in [0, 1] (`output="float"`,
        diffusers' output_type="np" frames).

        negative_prompts: one for all or one per prompt (None or "": the empty prompt, as in
          WanPipeline). seeds: clip i's noise comes from jax.random.key(seed_i).
        num_frames / height / width: default the pipeline's (`frame_shape`, `frames`).
        guidance_scale: w of uncond + w (cond - uncond); one for all or one per prompt.
        latents: the initial noise (N, t, h, w, c) in the DiT's normalised latent space, in
          place of the seeds' (diffusers' `latents=`, channels last).
        settings / sampler_options: `self.settings(...)` or its options (sampler="unipc",
          steps=50, shift=None: the scheduler's).
        batch_size: clips per program call; the clips do not depend on it.
        """
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
            raise SamplingError(f"prompts must be a string or a list of strings, got {prompts!r}")
        prompts, count = list(prompts), len(prompts)
        if output not in ("uint8", "float"):
            raise SamplingError(f"output must be 'uint8' or 'float', got {output!r}")
        if settings is None:
            settings = self.settings(**sampler_options)
        elif sampler_options:
            raise SamplingError(
                f"pass either settings or sampler options, not both ({sorted(sampler_options)})"
            )
        negatives = [
            "" if n is None else n for n in per_sample(negative_prompts, count, "negative_prompts")
        ]
        if not all(isinstance(n, str) for n in negatives):
            raise SamplingError(f"negative prompts must be strings or None, got {negatives!r}")
        seed_list = [check_seed(s) for s in per_sample(seeds, count, "seeds")]
        scales = [
            check_number(s, "guidance_scale")
            for s in per_sample(guidance_scale, count, "guidance_scale")
        ]
        frames, (height, width) = self.check_size(
            self.frames if num_frames is None else num_frames,
            self.frame_shape[0] if height is None else height,
            self.frame_shape[1] if width is None else width,
        )
        latent_shape = self.latent_shape(frames, height, width)
        size = self.program_batch_size(max(count, 1), batch_size)
        if count == 0:
            return np.zeros(
                (0, frames, height, width, 3), np.float32 if output == "float" else np.uint8
            )
        states = self.encode_texts(prompts + negatives)
        inputs = {
            "context": states[:count],
            "negative_context": states[count:],
            "seeds": np.asarray(seed_list, np.uint32),
            "scales": np.asarray(scales, np.float32),
        }
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (count, *latent_shape):
                raise SamplingError(
                    f"latents of shape {latents.shape} do not fit {count} clips of "
                    f"{frames}x{height}x{width}: expected {(count, *latent_shape)} "
                    "(batch, latent frames, height / 8, width / 8, channels)"
                )
            inputs["latents"] = latents
        spec = self.program_spec(settings, latent_shape, floats=output == "float")
        clips = []
        for start in range(0, count, size):
            chunk = {k: pad_rows(v[start : start + size], size) for k, v in inputs.items()}
            with sharding.activate(self.mesh, per_clip_rules(self.rules)):
                out = wan_sampling_program(
                    self._dit_state, self._vae_state, host_to_global(chunk, self.mesh), spec
                )
            clips.append(to_host(out)[: min(size, count - start)])
        return np.concatenate(clips, axis=0)

    def program_spec(
        self, settings: SamplerSettings, latent_shape: tuple[int, ...], floats: bool
    ) -> WanProgramSpec:
        return WanProgramSpec(
            dit_graphdef=self._dit_graphdef,
            vae_graphdef=self._vae_graphdef,
            mesh=self.mesh,
            rules=self.rules,
            micro_batch=self.micro_batch,
            settings=settings,
            latent_shape=tuple(latent_shape),
            num_train_timesteps=self.num_train_timesteps,
            floats=floats,
        )

    def lower_program(self, count: int = 1, **sampler_options) -> jax.stages.Lowered:
        """The sampling program of `count` clips of this pipeline's size (uint8 frames),
        lowered: its `.as_text()` and `.compile()` show how the mesh splits the DiT (the
        collectives, the memory per device)."""
        settings = self.settings(**sampler_options)
        spec = self.program_spec(settings, self.latent_shape(self.frames, *self.frame_shape), False)
        size = self.program_batch_size(count)
        states = np.repeat(self.encode_texts([""]), size, axis=0)
        inputs = {
            "context": states,
            "negative_context": states,
            "seeds": np.zeros(size, np.uint32),
            "scales": np.ones(size, np.float32),
        }
        with sharding.activate(self.mesh, per_clip_rules(self.rules)):
            return wan_sampling_program.lower(
                self._dit_state, self._vae_state, host_to_global(inputs, self.mesh), spec
            )


def from_recipe(config) -> WanTextToVideo:
    """The pipeline a sampling recipe describes (configs/base_wan21.py: config.weights, dtype,
    param_dtype, mesh (its rules too), attention_impl, micro_batch and the clip size of
    config.sampling)."""
    if not config.get("weights"):
        raise SamplingError(
            "config.weights is not set: pass --config.weights=DIR, the local diffusers-format "
            "Wan 2.1 directory (e.g. a download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
        )
    s = config.sampling
    return WanTextToVideo.from_diffusers(
        config.weights,
        meshes.mesh_from_config(config.mesh),
        rules=sharding.rules_from_config(config.mesh),
        attention_impl=config.get("attention_impl", DEFAULT_ATTENTION),
        micro_batch=config.micro_batch,
        num_frames=s.num_frames,
        height=s.height,
        width=s.width,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
    )
