"""The stages of the default pipeline that come after training: evaluation and the prompt grid.

`make train` (configs/shapes.py, family "pipeline") runs clip -> dit -> evaluate -> samples, each
in its own subdirectory of the work directory. These two stages are pure consumers of the trained
runs, so rerunning them is always safe: `evaluate` is skipped when its metrics already describe
the final checkpoint, and `samples` only makes the images that are missing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from diffusion.errors import UserError


def evaluation_options(config: ml_collections.ConfigDict, data_dir: str | None):
    """evaluate.py's options from the pipeline's `config.evaluate` section."""
    from diffusion import evaluation

    e = config.evaluate
    return evaluation.EvaluationOptions(
        num_samples=e.num_samples,
        splits=tuple(e.splits),
        guidance_scales=tuple(float(s) for s in e.guidance_scales),
        samplers=evaluation.parse_samplers(e.samplers),
        batch_size=e.batch_size,
        negative_prompt=e.negative_prompt,
        negative_color=e.negative_color,
        data_dir=data_dir,
    )


def _final_step(run_dir: str) -> int | None:
    from diffusion.evaluation import _latest_step

    return _latest_step(run_dir)


def _up_to_date(metrics_path: str, step: int | None) -> bool:
    """Whether metrics.json exists and was computed from checkpoint `step`."""
    if step is None or not os.path.isfile(metrics_path):
        return False
    try:
        with open(metrics_path, encoding="utf-8") as f:
            return json.load(f).get("checkpoint_step") == step
    except (OSError, ValueError):  # a torn file from a killed run: evaluate again
        return False


def run_evaluate_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """evaluate.py on both runs: WORKDIR/eval/{clip,dit}/{metrics.json,index.html}."""
    from diffusion import evaluation

    options = evaluation_options(config, config.data.data_dir)
    results = {}
    for run in ("clip", "dit"):
        run_dir = os.path.join(workdir, run)
        if not os.path.isdir(run_dir):
            raise UserError(f"stage evaluate needs the {run} run in {run_dir}; train it first.")
        output_dir = os.path.join(workdir, "eval", run)
        metrics_path = os.path.join(output_dir, "metrics.json")
        if _up_to_date(metrics_path, _final_step(run_dir)):
            print(f"   {run}: {metrics_path} is up to date", flush=True)
        else:
            evaluation.evaluate_checkpoint(run_dir, output_dir, options)
        with open(metrics_path, encoding="utf-8") as f:
            results[run] = json.load(f)
    return results


def sample_items(
    samples_config: ml_collections.ConfigDict,
    guidance_scale: float,
    negative_guidance_scale: float | None = None,
):
    """The prompt grid's images: `num_per_prompt` seeds for each prompt, then for each
    (prompt, negative prompt) example. Line numbers follow the config's order. The negative
    examples use `negative_guidance_scale` (default: `guidance_scale`)."""
    from diffusion.text2image import PromptItem

    if negative_guidance_scale is None:
        negative_guidance_scale = guidance_scale
    entries = [(p, "") for p in samples_config.prompts]
    entries += [(p, n) for p, n in samples_config.negative_examples]
    return [
        PromptItem(
            line=line,
            index=k,
            prompt=prompt,
            negative_prompt=negative,
            seed=k,
            guidance_scale=float(negative_guidance_scale if negative else guidance_scale),
        )
        for line, (prompt, negative) in enumerate(entries, start=1)
        for k in range(samples_config.num_per_prompt)
    ]


def _dit_metrics(workdir: str) -> dict:
    """WORKDIR/eval/dit/metrics.json, or {} before the evaluation."""
    path = os.path.join(workdir, "eval", "dit", "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def best_guidance_scale(workdir: str, fallback: float) -> float:
    """The guidance scale the evaluation found best on `test`, else `fallback`."""
    best = _dit_metrics(workdir).get("splits", {}).get("test", {}).get("best", {})
    return float(best.get("guidance_scale", fallback))


def grid_guidance_scales(config: ml_collections.ConfigDict, workdir: str) -> tuple[float, float]:
    """(scale of the grid's prompts, scale of its negative examples). The first is
    `config.samples.guidance_scale`, else the evaluation's best. At a scale <= 1 the
    unconditional branch, where a negative prompt sits, cancels out of uncond + w (cond -
    uncond); the negative examples then take the scale of evaluate.py's negative-prompt check
    (before an evaluation: the same rule over the configured scale)."""
    from diffusion.evaluation import negative_check_scale

    fallback = config.dit.sampling.guidance_scale
    scale = config.samples.guidance_scale
    if scale is None:
        scale = best_guidance_scale(workdir, fallback=fallback)
    checked = _dit_metrics(workdir).get("negative_prompt", {}).get("guidance_scale")
    return scale, negative_check_scale(scale, (float(checked),) if checked else (fallback,))


def run_samples_stage(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The fixed prompts of `config.samples` -> WORKDIR/samples (PNGs, manifest.jsonl, grid.png)
    and WORKDIR/samples/prompts.png (one labelled row per prompt). Returns the latter's path."""
    import numpy as np
    from PIL import Image

    from diffusion import report
    from diffusion.text2image import TextToImage, sample_to_directory

    s = config.samples
    items = sample_items(s, *grid_guidance_scales(config, workdir))
    output_dir = os.path.join(workdir, "samples")
    pipeline = TextToImage.from_run(os.path.join(workdir, "dit"))
    sample_to_directory(
        pipeline, items, output_dir, sampler=s.sampler, steps=s.steps, batch_size=s.batch_size
    )
    rows = []
    for line in sorted({item.line for item in items}):
        row = [item for item in items if item.line == line]
        label = row[0].prompt + (
            f"  (negative: {row[0].negative_prompt})" * bool(row[0].negative_prompt)
        )
        images = np.stack(
            [np.asarray(Image.open(os.path.join(output_dir, i.file)).convert("RGB")) for i in row]
        )
        rows.append((label, images))
    return report.save_labelled_rows(rows, os.path.join(output_dir, "prompts.png"))


# ---------------------------------------------------------------------------------------------
# Held-out checks during training (config.training.eval_every)
# ---------------------------------------------------------------------------------------------


class PeriodicEvaluation:
    """What train.py measures every `config.training.eval_every` steps, on the weights sampling
    would use (EMA when kept): CLIP -> image/text recall@1 and @5 among the first
    `config.training.eval_examples` captions of the first held-out split (scalars `eval/...`);
    DiT -> a grid of `config.sampling.prompts` x 4 seeds in WORKDIR/samples/step_<N>.png.

    Runs on single-process jobs (evaluate.py covers multi-host runs after training)."""

    SEEDS_PER_PROMPT = 4

    def __init__(self, config, task, tokenizer, workdir: str, image_size: int):
        self.config, self.task, self.tokenizer = config, task, tokenizer
        self.workdir, self.image_size = workdir, image_size
        self._examples = None

    def enabled(self, step: int) -> bool:
        every = self.config.training.get("eval_every", 0)
        return bool(every) and step % every == 0 and jax.process_count() == 1

    def __call__(self, trainer, state, step: int) -> dict[str, float]:
        params = state["ema"] if state["ema"] is not None else state["params"]
        model = trainer.model(params)
        if self.task.family == "clip":
            return self._clip_retrieval(model)
        self._dit_grid(model, step)
        return {}

    def _clip_retrieval(self, model) -> dict[str, float]:
        from diffusion import contrastive, evaluation

        if self._examples is None:
            split = self.config.data.eval_splits[0]
            count = self.config.training.get("eval_examples", 256)
            self._examples = evaluation.load_split_examples(
                self.config.data, self.config.seed, split, count
            )
        encoder = evaluation.ClipEncoder(model, self.tokenizer, batch_size=256)
        images = encoder.encode_images(self._examples.images)
        texts = encoder.encode_texts(self._examples.captions)
        recalls = contrastive.retrieval_metrics(images, texts, ks=(1, 5))
        return {f"eval/{name}": float(value) for name, value in recalls.items()}

    def _dit_grid(self, model, step: int) -> str:
        from diffusion import report
        from diffusion.text2image import TextToImage

        s = self.config.sampling
        pipe = TextToImage(
            dit=model,
            text_encoder=self.task.frozen,
            tokenizer=self.tokenizer,
            diffusion_config=self.config.diffusion,
            context_length=self.config.tokenizer.context_length,
            resolution=self.image_size,
            checkpoint_step=step,
        )
        prompts = [p for p in s.prompts for _ in range(self.SEEDS_PER_PROMPT)]
        seeds = [k for _ in s.prompts for k in range(self.SEEDS_PER_PROMPT)]
        images = pipe.generate(
            prompts, seeds=seeds, sampler=s.sampler, steps=s.steps, guidance_scale=s.guidance_scale
        )
        path = os.path.join(self.workdir, "samples", f"step_{step}.png")
        return report.save_grid(images, path, columns=self.SEEDS_PER_PROMPT)
