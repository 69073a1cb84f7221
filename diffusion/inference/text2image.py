"""TextToImage: a trained text-conditioned DiT with its tokenizer and text tower, on a mesh,
ready to sample.

    pipe = TextToImage.from_run("runs/shapes/dit")
    images = pipe.generate(["a red circle"], seeds=[0], sampler="euler", steps=20)

Tokens of the prompts and of the negative prompts (the empty prompt when none, the unconditional
input the DiT was trained with) go into ONE jitted program per (batch shape, settings)
(`diffusion.inference.program`), whose images are a pure function of the prompt, negative prompt,
seed and settings: never of the batch size or the device count. What does not depend on text
(weights on the mesh, sampler settings, batching) is `dit_pipeline.DiTPipeline`'s.

The run of a video DiT (Wan 2.1's shape, trained on clips) loads the same way; `generate` then
returns clips (N, T, H, W, 3) of its training clips' length (`pipe.frames`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from diffusion import data as data_lib
from diffusion import models, rundir
from diffusion.inference.dit_pipeline import DiTPipeline, LatentDecoder, load_dit_run
from diffusion.inference.settings import (
    DEFAULT_MICRO_BATCH,
    SamplerSettings,
    SamplingError,
    check_number,
    check_seed,
    per_sample,
)

logger = logging.getLogger(__name__)


class TextToImage(DiTPipeline):
    """A DiT with its tokenizer and text tower, placed on a mesh, ready to sample.

    Attributes (beyond `DiTPipeline`'s): context_length, tokenizer.
    """

    def __init__(
        self,
        *,
        dit: models.DiT | models.VideoDiT,
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
        latent_decoder: LatentDecoder | None = None,
        frames: int = 0,
    ):
        super().__init__(
            dit=dit,
            text_encoder=text_encoder,
            diffusion_config=diffusion_config,
            resolution=resolution,
            checkpoint_step=checkpoint_step,
            mesh=mesh,
            micro_batch=micro_batch,
            run_dir=run_dir,
            use_ema=use_ema,
            latent_decoder=latent_decoder,
            frames=frames,
        )
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
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

        def load_text(run_dir: str, config):
            encoder_dir = text_encoder or config.text_encoder.checkpoint
            if not text_encoder and not os.path.isdir(encoder_dir):
                raise SamplingError(
                    f"config.text_encoder.checkpoint={encoder_dir!r} of {run_dir} is not a "
                    "directory: the CLIP run the DiT was trained on moved or was deleted. Name a "
                    "CLIP run directory where it is now with text_encoder= (sample.py: "
                    "--text_encoder=DIR)"
                )
            encoder = rundir.load_text_encoder(encoder_dir, {"dtype": config.model.dtype})
            tokenizer = rundir.load_tokenizer(run_dir, config)
            if len(tokenizer) > encoder.config.vocab_size:
                raise SamplingError(
                    f"the run's tokenizer has {len(tokenizer)} tokens but the text encoder "
                    f"{encoder_dir!r} embeds {encoder.config.vocab_size}: they were not trained "
                    "together. Name the CLIP run this DiT was trained on (--text_encoder=DIR)"
                )
            return encoder, tokenizer

        run = load_dit_run(
            run_dir,
            conditioning="text",
            use_ema=use_ema,
            mesh=mesh,
            resolution=resolution,
            load_condition=load_text,
        )
        config = run.config
        encoder, tokenizer = run.condition
        return cls(
            dit=run.dit,
            text_encoder=encoder,
            tokenizer=tokenizer,
            diffusion_config=config.diffusion,
            context_length=config.tokenizer.context_length,
            resolution=run.resolution,
            checkpoint_step=run.step,
            mesh=run.mesh,
            micro_batch=micro_batch,
            run_dir=run.run_dir,
            use_ema=use_ema,
            latent_decoder=run.latent_decoder,
            frames=run.frames,
        )

    # -- public API -----------------------------------------------------------------------------

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
        """Images (N, H, W, 3) uint8 for N prompts (clips (N, T, H, W, 3) of a video DiT).

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
        settings = self._resolve_settings(settings, sampler_options)
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
        self.program_batch_size(count, batch_size)  # a bad batch size fails before tokenizing
        if count == 0:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        inputs = self.program_inputs(prompts, negatives, seed_list, scales)
        return self.run_program(inputs, settings, batch_size)

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
