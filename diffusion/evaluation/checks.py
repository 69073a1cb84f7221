"""The DiT evaluation's two checks beyond the guidance x sampler sweep, each sampling its own
images: the diversity of samples of one caption against real images of it (`diversity_check`),
and the effect of a colour as negative prompt (`negative_prompt_check`, at the guidance scale
`negative_check_scale` picks).

Each takes a loaded pipeline and the evaluation options and returns (metrics, galleries), so the
sweep in `diffusion/evaluation/evaluator.py` only decides when to run them; the pipeline's
stages pick the negative check's scale with `negative_check_scale` too.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from diffusion.data import shapes as shapes_lib
from diffusion.evaluation import report
from diffusion.evaluation.fidelity import (
    caption_diversity,
    caption_names_background,
    reference_images,
)
from diffusion.evaluation.shapes_oracle import read_attributes


def diversity_check(
    pipe, examples, split: str, setting: dict, options, seed: int, output_dir: str | None
):
    """The first `diversity_captions` captions of a split, each sampled with
    `diversity_samples` seeds at `setting` ({sampler, guidance_scale}), against 2x as many real
    images of each caption (`fidelity.reference_images`): `fidelity.caption_diversity`.
    -> (metrics, galleries); the grids of samples and real images go to output_dir (None:
    metrics alone, no galleries)."""
    count = min(options.diversity_captions, len(examples.captions))
    per_caption = options.diversity_samples
    captions = examples.captions[:count]
    sampler, steps = setting["sampler"].split(":")
    images = pipe.generate(
        [c for c in captions for _ in range(per_caption)],
        seeds=list(range(count * per_caption)),
        sampler=sampler,
        steps=int(steps),
        guidance_scale=setting["guidance_scale"],
        batch_size=options.batch_size,
        **options.sampler_options,
    )
    samples = images.reshape(count, per_caption, *images.shape[1:])  # (C, K, S, S, 3)
    names_background = np.array([caption_names_background(c) for c in captions])
    resolution = examples.images.shape[1]
    references = np.stack(
        [
            reference_images(
                {a: int(examples.labels[a][i]) for a in examples.labels},
                bool(names_background[i]),
                2 * per_caption,
                np.random.default_rng([seed, zlib.crc32(split.encode()), i]),
                resolution,
            )
            for i in range(count)
        ]
    )  # (C, 2K, S, S, 3)
    result = {"sampler": setting["sampler"], "guidance_scale": setting["guidance_scale"]}
    result |= caption_diversity(samples, references, names_background)
    galleries = []
    if output_dir is None:
        return result, galleries
    for name, grid in (("samples", samples), ("real", references[:, :per_caption])):
        path = f"grids/{split}_diversity_{name}.png"
        report.save_grid(
            grid.reshape(-1, *grid.shape[2:]), os.path.join(output_dir, path), per_caption
        )
        result[f"{name}_grid"] = path
        galleries.append(
            {
                "title": f"{split}: {per_caption} {name} images of each caption (one row each)",
                "image": path,
                "items": [{"prompt": c} for c in captions],
                "split": f"diversity:{split}",
                "legend": "none: rows are captions, columns seeds",
            }
        )
    return result, galleries


def negative_check_scale(best_scale: float, scales: tuple[float, ...]) -> float:
    """Guidance scale of the negative-prompt check: the sweep's best, unless that is <= 1, where
    the negative prompt (the unconditional branch) has no effect; then the sweep's largest scale,
    or 3 if none is above 1."""
    if best_scale > 1:
        return best_scale
    return max((s for s in scales if s > 1), default=3.0)


def negative_prompt_check(pipe, options, sampler_name: str, scale: float, output_dir: str):
    """The same prompt sampled with and without a colour as negative prompt (same seeds): the
    fraction of images the oracle reads in that colour, each way. -> (metrics, galleries)."""
    sampler, steps = sampler_name.split(":")
    count = options.num_samples
    prompts = [options.negative_prompt] * count
    result = {
        "prompt": options.negative_prompt,
        "negative_prompt": options.negative_color,
        "sampler": sampler_name,
        "guidance_scale": scale,
        "num_samples": count,
    }
    galleries = []
    for name, negatives in (("without", None), ("with", [options.negative_color] * count)):
        images = pipe.generate(
            prompts,
            negative_prompts=negatives,
            seeds=list(range(count)),
            sampler=sampler,
            steps=int(steps),
            guidance_scale=scale,
            batch_size=options.batch_size,
            **options.sampler_options,
        )
        reading = read_attributes(images)
        colors = np.bincount(reading.color, minlength=len(shapes_lib.COLOR_NAMES)) / count
        result[f"{name}_negative"] = {
            "color_fraction": float(colors[shapes_lib.COLOR_NAMES.index(options.negative_color)]),
            "color_histogram": dict(zip(shapes_lib.COLOR_NAMES, map(float, colors), strict=True)),
        }
        shown = min(options.grid_size, count)
        path = f"grids/negative_{name}.png"
        report.save_grid(images[:shown], os.path.join(output_dir, path))
        title = f'"{options.negative_prompt}" {name} negative prompt "{options.negative_color}"'
        items = [
            {"prompt": options.negative_prompt, "read": reading.names(i)} for i in range(shown)
        ]
        galleries.append({"title": title, "image": path, "items": items, "split": "negative"})
    return result, galleries
