"""Held-out checks during training (config.training.eval_every), as a training callback."""

from __future__ import annotations

import os

import jax

from diffusion import contrastive
from diffusion.evaluation import report
from diffusion.evaluation.clip_metrics import ClipEncoder
from diffusion.evaluation.held_out import load_split_examples
from diffusion.inference import TextToImage
from diffusion.training import RunContext


class PeriodicEvaluation:
    """What train.py measures every `config.training.eval_every` steps, on the weights sampling
    would use (EMA when kept): CLIP -> image/text recall@1 and @5 among the first
    `config.training.eval_examples` captions of the first held-out split (scalars `eval/...`);
    DiT -> a grid of `config.sampling.prompts` x 4 seeds in WORKDIR/samples/step_<N>.png.

    Runs on single-process jobs (evaluate.py covers multi-host runs after training)."""

    SEEDS_PER_PROMPT = 4

    def __init__(self, config):
        self.config = config
        self._examples = None

    def enabled(self, step: int) -> bool:
        every = self.config.training.get("eval_every", 0)
        return bool(every) and step % every == 0 and jax.process_count() == 1

    def __call__(self, context: RunContext, state, step: int) -> dict[str, float]:
        params = state["ema"] if state["ema"] is not None else state["params"]
        model = context.train_step.model(params)
        if context.build.family == "clip":
            return self._clip_retrieval(context, model)
        self._dit_grid(context, model, step)
        return {}

    def _clip_retrieval(self, context: RunContext, model) -> dict[str, float]:
        if self._examples is None:
            split = self.config.data.eval_splits[0]
            count = self.config.training.get("eval_examples", 256)
            self._examples = load_split_examples(self.config.data, self.config.seed, split, count)
        encoder = ClipEncoder(model, context.tokenizer, batch_size=256)
        images = encoder.encode_images(self._examples.images)
        texts = encoder.encode_texts(self._examples.captions)
        recalls = contrastive.retrieval_metrics(images, texts, ks=(1, 5))
        return {f"eval/{name}": float(value) for name, value in recalls.items()}

    def _dit_grid(self, context: RunContext, model, step: int) -> str:
        s = self.config.sampling
        pipe = TextToImage(
            dit=model,
            text_encoder=context.frozen,
            tokenizer=context.tokenizer,
            diffusion_config=self.config.diffusion,
            context_length=self.config.tokenizer.context_length,
            resolution=context.image_size,
            checkpoint_step=step,
        )
        prompts = [p for p in s.prompts for _ in range(self.SEEDS_PER_PROMPT)]
        seeds = [k for _ in s.prompts for k in range(self.SEEDS_PER_PROMPT)]
        images = pipe.generate(
            prompts, seeds=seeds, sampler=s.sampler, steps=s.steps, guidance_scale=s.guidance_scale
        )
        path = os.path.join(context.workdir, "samples", f"step_{step}.png")
        return report.save_grid(images, path, columns=self.SEEDS_PER_PROMPT)
