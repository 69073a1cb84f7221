"""ClassToImage: a trained class-conditional DiT with the classes of its run, on a mesh, ready to
sample.

    pipe = ClassToImage.from_run("runs/shapes_class")
    images = pipe.generate(["red circle", 7], seeds=[0, 1], sampler="euler", steps=20)

A class is an id or a name ("red circle": the values of the run's class features, in order; the
run directory's classes.json, `diffusion.data.classes`). Classifier-free guidance uses the null
class (id num_classes, the label the DiT was trained with under label dropout) as the
unconditional input, in the same jitted program as text (`diffusion.inference.program`): the
scale is traced, and an image is a pure function of (weights, class, seed, settings), never of
the batch size or the device count.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from diffusion import models, rundir
from diffusion.data.classes import ClassSpace
from diffusion.errors import UserError
from diffusion.inference.dit_pipeline import DiTPipeline, LatentDecoder, load_dit_run
from diffusion.inference.settings import (
    DEFAULT_MICRO_BATCH,
    SamplerSettings,
    SamplingError,
    check_number,
    check_seed,
    per_sample,
)


class ClassToImage(DiTPipeline):
    """A class-conditional DiT placed on a mesh, ready to sample.

    Attributes (beyond `DiTPipeline`'s): classes (the ClassSpace), num_classes (the null class's
    id).
    """

    def __init__(
        self,
        *,
        dit: models.DiT,
        classes: ClassSpace,
        diffusion_config,
        resolution: int,
        checkpoint_step: int | None = None,
        mesh: Mesh | None = None,
        micro_batch: int = DEFAULT_MICRO_BATCH,
        run_dir: str | None = None,
        use_ema: bool = True,
        latent_decoder: LatentDecoder | None = None,
    ):
        if dit.config.conditioning != "class" or dit.config.num_classes != classes.num_classes:
            raise SamplingError(
                f"the DiT embeds {dit.config.num_classes} classes ({dit.config.conditioning} "
                f"conditioning) but the classes name {classes.num_classes}; they are not of one run"
            )
        super().__init__(
            dit=dit,
            text_encoder=None,
            diffusion_config=diffusion_config,
            resolution=resolution,
            checkpoint_step=checkpoint_step,
            mesh=mesh,
            micro_batch=micro_batch,
            run_dir=run_dir,
            use_ema=use_ema,
            latent_decoder=latent_decoder,
        )
        self.classes = classes
        self.num_classes = classes.num_classes

    @classmethod
    def from_run(
        cls,
        run_dir: str,
        *,
        use_ema: bool = True,
        mesh: Mesh | None = None,
        resolution: int | None = None,
        micro_batch: int = DEFAULT_MICRO_BATCH,
    ) -> ClassToImage:
        """Loads a class-conditional DiT run directory (its exported EMA params/ and classes.json)
        or a `checkpoints/<step>` in it; the options are TextToImage.from_run's."""
        run = load_dit_run(
            run_dir,
            conditioning="class",
            use_ema=use_ema,
            mesh=mesh,
            resolution=resolution,
            load_condition=lambda run_dir, config: rundir.load_classes(run_dir),
        )
        return cls(
            dit=run.dit,
            classes=run.condition,
            diffusion_config=run.config.diffusion,
            resolution=run.resolution,
            checkpoint_step=run.step,
            mesh=run.mesh,
            micro_batch=micro_batch,
            run_dir=run.run_dir,
            use_ema=use_ema,
            latent_decoder=run.latent_decoder,
        )

    def class_ids(self, classes: Sequence[int | str]) -> list[int]:
        """Class ids of ids or names; an unknown one fails naming it and the valid classes."""
        try:
            return [self.classes.resolve(c) for c in classes]
        except UserError as error:
            raise SamplingError(str(error)) from None

    def generate(
        self,
        classes: int | str | Sequence[int | str] | np.ndarray,
        seeds: int | Sequence[int] = 0,
        *,
        guidance_scale: float | Sequence[float] = 3.0,
        batch_size: int | None = None,
        settings: SamplerSettings | None = None,
        **sampler_options,
    ) -> np.ndarray:
        """Images (N, H, W, 3) uint8 for N classes (ids or names).

        seeds: one int for every class, or one per class; image i uses jax.random.key(seed_i).
        guidance_scale: w of `guided = null + w (class - null)` (1 = the conditional model
          exactly), one for all or one per class.
        settings / sampler_options / batch_size: as in TextToImage.generate.
        """
        if isinstance(classes, int | str):
            classes = [classes]
        if isinstance(classes, np.ndarray) and classes.ndim == 1:
            classes = classes.tolist()
        if not isinstance(classes, Sequence):
            raise SamplingError(
                "classes must be a class id or name, or a list of them, got "
                f"{reprlib.repr(classes)}"
            )
        class_ids = self.class_ids(classes)
        count = len(class_ids)
        settings = self._resolve_settings(settings, sampler_options)
        seed_list = [check_seed(s) for s in per_sample(seeds, count, "seeds")]
        scales = [
            check_number(s, "guidance_scale")
            for s in per_sample(guidance_scale, count, "guidance_scale")
        ]
        inputs = self.program_inputs(class_ids, seed_list, scales)
        return self.run_program(inputs, settings, batch_size)

    def program_inputs(self, class_ids, seeds, scales) -> dict[str, np.ndarray]:
        """The sampling program's host inputs: int32 class ids and the null class as the
        unconditional label, uint32 seeds, float32 scales."""
        labels = np.asarray(class_ids, np.int32).reshape(-1)
        return {
            "labels": labels,
            "uncond_labels": np.full_like(labels, self.num_classes),
            "seeds": np.asarray(seeds, np.uint32),
            "scales": np.asarray(scales, np.float32),
        }
