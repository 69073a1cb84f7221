"""Evaluation of a video DiT run: clips sampled for a split's captions over the sweep of samplers
and guidance scales, read back by the moving-shapes oracle (`video_oracle`): every attribute
(motion and speed included) against the captions' labels, "all" (shape, colour and background
right in every frame; size, motion and speed right for the clip) and temporal consistency. The
real clips of the split are read too: the oracle's own ceiling. A few clips of each setting are
written as GIF and MP4 for the report.
"""

from __future__ import annotations

import os
import time

import numpy as np
import tqdm

from diffusion.evaluation import video_oracle
from diffusion.evaluation.held_out import load_split_examples
from diffusion.evaluation.sweep import (
    DEFAULT_SAMPLER,
    EvaluationStopped,
    sampler_key,
    scale_key,
)
from diffusion.inference import video_files
from diffusion.inference.batch_io import DEFAULT_FPS
from diffusion.inference.text2image import TextToImage


def best_setting(samples: dict) -> dict:
    """The (sampler, scale) whose clips are read right most often ("all"), ties to the higher
    mean attribute accuracy."""
    candidates = []
    for sampler, by_scale in samples.items():
        for scale, result in by_scale.items():
            accuracy = result["accuracy"]
            mean = np.mean([accuracy[a] for a in video_oracle.ATTRIBUTES])
            candidates.append(((accuracy["all"], mean), sampler, float(scale), result))
    _, sampler, scale, result = max(candidates, key=lambda c: c[0])
    return {"sampler": sampler, "guidance_scale": scale} | {
        k: v for k, v in result.items() if k != "clips"
    }


def clip_gallery(title, directory, output_dir, clips, captions, reading, labels, count, fps):
    """The first `count` clips as GIF and MP4 files in `directory`, with what the oracle read of
    each (paths relative to `output_dir`, where the report is)."""
    items = []
    for i in range(min(count, len(captions))):
        files = video_files.write_clip_files(directory, f"{i:03d}", clips[i], fps)
        names = {a: video_oracle.VOCABULARIES[a][getattr(reading, a)[i]] for a in labels}
        items.append(
            {
                "prompt": captions[i],
                "gif": os.path.relpath(files["gif"], output_dir),
                "mp4": os.path.relpath(files["mp4"], output_dir),
                "read": names,
                "correct": {
                    a: bool(getattr(reading, a)[i] == labels[a][i]) for a in video_oracle.ATTRIBUTES
                },
            }
        )
    return {"title": title, "items": items, "clips": True}


def split_labels(examples) -> dict[str, np.ndarray]:
    """The six clip attributes of a moving-shapes split, as label indices."""
    return {a: examples.labels[a] for a in video_oracle.ATTRIBUTES}


def evaluate_video_dit_run(
    checkpoint: str, config, options, output_dir: str, stop=None
) -> tuple[dict, list[dict]]:
    """Samples each split's captions over the sweep; reads the clips. -> (metrics, galleries).

    metrics: resolution, frames, objective, guidance_scales, samplers, splits[split] =
    {num_samples, real: {oracle_accuracy, temporal_consistency}, samples: {"<sampler>:<steps>":
    {"<scale>": {accuracy: {shape, color, size, motion, speed, background, all},
    temporal_consistency: {consistency, background_change}, seconds}}}, best: {...}}.
    """
    pipe = TextToImage.from_run(checkpoint)
    samplers = options.samplers or (DEFAULT_SAMPLER[pipe.objective],)
    for name, steps in samplers:  # unknown names for this objective fail before any work
        pipe.settings(sampler=name, steps=steps)
    metrics = {
        "checkpoint_step": pipe.checkpoint_step,
        "resolution": pipe.image_size,
        "frames": pipe.frames,
        "objective": pipe.objective,
        "guidance_scales": list(options.guidance_scales),
        "samplers": [sampler_key(*s) for s in samplers],
        "splits": {},
    }
    galleries = []
    progress = tqdm.tqdm(
        total=len(options.splits) * len(samplers) * len(options.guidance_scales),
        desc="evaluate",
        unit="setting",
        dynamic_ncols=True,
    )
    for split in options.splits:
        examples = load_split_examples(
            config.data, config.seed, split, options.num_samples, options.source_data_dir
        )
        labels, captions = split_labels(examples), examples.captions
        seeds = list(range(len(captions)))  # sample i always uses seed i: paired comparisons
        real_reading = video_oracle.read_clips(examples.images)
        entry = {
            "num_samples": len(captions),
            "real": {
                "oracle_accuracy": video_oracle.video_accuracy(real_reading, labels),
                "temporal_consistency": video_oracle.temporal_consistency(real_reading),
            },
            "samples": {},
        }
        for sampler, steps in samplers:
            by_scale = entry["samples"].setdefault(sampler_key(sampler, steps), {})
            for scale in options.guidance_scales:
                if stop is not None and stop():
                    raise EvaluationStopped(f"stopped before {split} {sampler} {scale}")
                start = time.perf_counter()
                clips = pipe.generate(
                    captions,
                    seeds=seeds,
                    sampler=sampler,
                    steps=steps,
                    guidance_scale=scale,
                    batch_size=options.batch_size,
                )
                seconds = time.perf_counter() - start
                reading = video_oracle.read_clips(clips)
                key = f"{split}_{sampler}-{steps}_cfg{scale_key(scale)}"
                by_scale[scale_key(scale)] = {
                    "accuracy": video_oracle.video_accuracy(reading, labels),
                    "temporal_consistency": video_oracle.temporal_consistency(reading),
                    "seconds": seconds,
                    "clips": f"clips/{key}",
                }
                title = f"{split}: {sampler} {steps} steps, guidance {scale_key(scale)}"
                directory = os.path.join(output_dir, "clips", key)
                gallery = clip_gallery(
                    title, directory, output_dir, clips, captions, reading, labels,
                    options.grid_size, DEFAULT_FPS,
                )  # fmt: skip
                galleries.append(
                    gallery
                    | {"split": split, "sampler": sampler_key(sampler, steps), "scale": scale}
                )
                progress.update(1)
        entry["best"] = best_setting(entry["samples"])
        metrics["splits"][split] = entry
    progress.close()
    return metrics, galleries
