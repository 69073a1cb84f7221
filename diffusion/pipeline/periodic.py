"""Held-out checks during training (config.training.eval_every), as a training callback."""

from __future__ import annotations

import os

import jax

from diffusion import contrastive, rundir
from diffusion.errors import UserError
from diffusion.evaluation import report
from diffusion.evaluation.clip_metrics import ClipEncoder
from diffusion.evaluation.held_out import load_split_examples
from diffusion.evaluation.reconstruction import reconstruction_metrics
from diffusion.inference import ClassToImage, TextToImage
from diffusion.inference.dit_pipeline import LatentDecoder
from diffusion.training import RunContext


class PeriodicEvaluation:
    """What train.py measures every `config.training.eval_every` steps, on the weights sampling
    would use (EMA when kept): CLIP -> image/text recall@1 and @5 among the first
    `config.training.eval_examples` captions of the first held-out split (scalars `eval/...`);
    DiT -> a grid of `config.sampling.prompts` (a class-conditional DiT: its first
    `CLASSES_SHOWN` classes) x 4 seeds in WORKDIR/samples/step_<N>.png; autoencoder -> PSNR and
    SSIM of the reconstructions of the first `eval_examples` held-out images (`eval/...`).

    Runs on single-process jobs (evaluate.py covers multi-host runs after training)."""

    SEEDS_PER_PROMPT = 4
    CLASSES_SHOWN = 8

    def __init__(self, config):
        if config.get("family") == "video_dit" and config.training.get("eval_every", 0):
            raise UserError(
                f"config.training.eval_every={config.training.eval_every}, but the video DiT has "
                "no check during training (its clips are evaluated after training); pass "
                "--config.training.eval_every=0."
            )
        self.config = config
        self._examples = None
        self._decoders: dict[str, LatentDecoder | None] = {}

    def enabled(self, step: int) -> bool:
        every = self.config.training.get("eval_every", 0)
        return bool(every) and step % every == 0 and jax.process_count() == 1

    def __call__(self, context: RunContext, state, step: int) -> dict[str, float]:
        params = state["ema"] if state["ema"] is not None else state["params"]
        model = context.train_step.model(params)
        if context.build.family == "clip":
            return self._clip_retrieval(context, model)
        if context.build.family == "autoencoder":
            metrics, _ = reconstruction_metrics(model, self._held_out().images)
            return {"eval/psnr": metrics["psnr"], "eval/ssim": metrics["ssim"]}
        self._dit_grid(context, model, step)
        return {}

    def _held_out(self):
        """The first `eval_examples` examples of the first held-out split, read once."""
        if self._examples is None:
            split = self.config.data.eval_splits[0]
            count = self.config.training.get("eval_examples", 256)
            self._examples = load_split_examples(self.config.data, self.config.seed, split, count)
        return self._examples

    def _latent_decoder(self, workdir: str) -> LatentDecoder | None:
        """The run's autoencoder (None for a pixel DiT), loaded from disk once per run."""
        if workdir not in self._decoders:
            self._decoders[workdir] = LatentDecoder.of_run(workdir)
        return self._decoders[workdir]

    def _clip_retrieval(self, context: RunContext, model) -> dict[str, float]:
        examples = self._held_out()
        encoder = ClipEncoder(model, context.tokenizer, batch_size=256)
        images = encoder.encode_images(examples.images)
        texts = encoder.encode_texts(examples.captions)
        recalls = contrastive.retrieval_metrics(images, texts, (1, 5), examples.captions)
        return {f"eval/{name}": float(value) for name, value in recalls.items()}

    def _dit_grid(self, context: RunContext, model, step: int) -> str:
        s = self.config.sampling
        common = dict(
            dit=model,
            diffusion_config=self.config.diffusion,
            resolution=context.image_size,
            checkpoint_step=step,
            latent_decoder=self._latent_decoder(context.workdir),
        )
        if model.config.conditioning == "class":
            classes = rundir.load_classes(context.workdir)
            pipe = ClassToImage(classes=classes, **common)
            conditions = list(range(min(self.CLASSES_SHOWN, classes.num_classes)))
        else:
            pipe = TextToImage(
                text_encoder=context.frozen,
                tokenizer=context.tokenizer,
                context_length=self.config.tokenizer.context_length,
                **common,
            )
            conditions = list(s.prompts)
        rows = [c for c in conditions for _ in range(self.SEEDS_PER_PROMPT)]
        seeds = [k for _ in conditions for k in range(self.SEEDS_PER_PROMPT)]
        images = pipe.generate(
            rows, seeds=seeds, sampler=s.sampler, steps=s.steps, guidance_scale=s.guidance_scale
        )
        path = os.path.join(context.workdir, "samples", f"step_{step}.png")
        return report.save_grid(images, path, columns=self.SEEDS_PER_PROMPT)
