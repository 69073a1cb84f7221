"""Evaluation of a video DiT run: clips sampled for a split's captions over the sweep of samplers
and guidance scales, read back by the moving-shapes oracle (`video_oracle`): every attribute
(motion and speed included) against the captions' labels, "all" (shape, colour and background
right in every frame; size, motion and speed right for the clip) and temporal consistency. The
real clips of the split are read too: the oracle's own ceiling. A few clips of each setting are
written as GIF and MP4 for the report.
"""

from __future__ import annotations

import os

import numpy as np

from diffusion.evaluation import sweep, video_oracle
from diffusion.evaluation.held_out import load_split_examples
from diffusion.inference import video_files
from diffusion.inference.batch_io import DEFAULT_FPS
from diffusion.inference.text2image import TextToImage


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


def setting_score(result: dict) -> tuple[float, float]:
    """How the best setting is chosen: the clips read right most often ("all"), ties to the
    higher mean attribute accuracy."""
    return sweep.accuracy_score(result["accuracy"], "all", video_oracle.ATTRIBUTES)


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
    samplers = sweep.checked_samplers(pipe, options)
    metrics = sweep.metrics_head(pipe, samplers, options, dimensions={"frames": pipe.frames})
    galleries = []
    progress = sweep.progress_bar(options, samplers)
    for split in options.splits:
        examples = load_split_examples(
            config.data, config.seed, split, options.num_samples, options.source_data_dir
        )
        labels, captions = split_labels(examples), examples.captions
        real_reading = video_oracle.read_clips(examples.images)
        entry = {
            "num_samples": len(captions),
            "real": {
                "oracle_accuracy": video_oracle.video_accuracy(real_reading, labels),
                "temporal_consistency": video_oracle.temporal_consistency(real_reading),
            },
            "samples": {},
        }
        settings = sweep.settings_of_split(pipe, split, captions, samplers, options, progress, stop)
        for setting, clips, seconds in settings:
            reading = video_oracle.read_clips(clips)
            setting.store(
                entry["samples"],
                {
                    "accuracy": video_oracle.video_accuracy(reading, labels),
                    "temporal_consistency": video_oracle.temporal_consistency(reading),
                    "seconds": seconds,
                    "clips": f"clips/{setting.file_stem}",
                },
            )
            directory = os.path.join(output_dir, "clips", setting.file_stem)
            gallery = clip_gallery(
                setting.title, directory, output_dir, clips, captions, reading, labels,
                options.grid_size, DEFAULT_FPS,
            )  # fmt: skip
            galleries.append(gallery | setting.gallery_tags)
        entry["best"] = sweep.best_setting(entry["samples"], setting_score, drop="clips")
        metrics["splits"][split] = entry
    progress.close()
    return metrics, galleries
