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


def sample_items(samples_config: ml_collections.ConfigDict, guidance_scale: float):
    """The prompt grid's images: `num_per_prompt` seeds for each prompt, then for each
    (prompt, negative prompt) example. Line numbers follow the config's order."""
    from diffusion.text2image import PromptItem

    entries = [(p, "") for p in samples_config.prompts]
    entries += [(p, n) for p, n in samples_config.negative_examples]
    return [
        PromptItem(
            line=line,
            index=k,
            prompt=prompt,
            negative_prompt=negative,
            seed=k,
            guidance_scale=float(guidance_scale),
        )
        for line, (prompt, negative) in enumerate(entries, start=1)
        for k in range(samples_config.num_per_prompt)
    ]


def best_guidance_scale(workdir: str, fallback: float) -> float:
    """The guidance scale the evaluation found best on `test`, else `fallback`."""
    path = os.path.join(workdir, "eval", "dit", "metrics.json")
    if not os.path.isfile(path):
        return fallback
    with open(path, encoding="utf-8") as f:
        best = json.load(f)["splits"].get("test", {}).get("best", {})
    return float(best.get("guidance_scale", fallback))


def run_samples_stage(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The fixed prompts of `config.samples` -> WORKDIR/samples (PNGs, manifest.jsonl, grid.png)
    and WORKDIR/samples/prompts.png (one labelled row per prompt). Returns the latter's path."""
    import numpy as np
    from PIL import Image

    from diffusion import report
    from diffusion.text2image import TextToImage, sample_to_directory

    s = config.samples
    scale = s.guidance_scale
    if scale is None:
        scale = best_guidance_scale(workdir, fallback=config.dit.sampling.guidance_scale)
    items = sample_items(s, scale)
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
