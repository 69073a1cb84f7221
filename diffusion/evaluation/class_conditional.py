"""evaluate.py on a class-conditional DiT of the shapes dataset: samples of the classes of each
held-out split's examples, read back by the shapes oracle, scored by whether the oracle reads the
asked class (every class feature, e.g. colour and shape, right) over a guidance x sampler sweep.

A class-conditional DiT knows only the classes it was trained on: shapes' `test_unseen` split
holds (colour, shape) pairs that never occur in training, whose class embeddings stay at their
random initialisation, so its accuracy measures nothing the model learnt (evaluate `test`).
"""

from __future__ import annotations

import os
import time

import numpy as np
import tqdm

from diffusion.data.classes import ClassSpace
from diffusion.errors import UserError
from diffusion.evaluation import report
from diffusion.evaluation.held_out import load_split_examples
from diffusion.evaluation.shapes_oracle import VOCABULARIES, OracleReading, read_attributes
from diffusion.evaluation.sweep import DEFAULT_SAMPLER, sampler_key, scale_key
from diffusion.inference import ClassToImage


def check_oracle_reads(classes: ClassSpace) -> None:
    """The shapes oracle must read every class feature, with the dataset's value names."""
    for feature, values in zip(classes.features, classes.values, strict=True):
        if tuple(VOCABULARIES.get(feature, ())) != tuple(values):
            raise UserError(
                f"evaluate.py scores class-conditional samples with the shapes oracle, which reads "
                f"{', '.join(VOCABULARIES)} of the shapes dataset; this run's class feature "
                f"{feature!r} ({len(values)} values) is not one of them. Sample it with sample.py "
                "--class_labels instead."
            )


def class_accuracy(reading: OracleReading, asked: dict[str, np.ndarray]) -> dict[str, float]:
    """Per class feature, the fraction read as asked; "class": every feature right."""
    right = {f: getattr(reading, f) == np.asarray(labels) for f, labels in asked.items()}
    accuracy = {f: float(np.mean(r)) for f, r in right.items()}
    accuracy["class"] = float(np.mean(np.all(list(right.values()), axis=0)))
    return accuracy


def per_class_accuracy(reading, asked, class_ids, classes: ClassSpace) -> dict[str, float]:
    """The "class" accuracy of each class that was asked for, by class name."""
    right = np.all([getattr(reading, f) == np.asarray(v) for f, v in asked.items()], axis=0)
    return {
        classes.name(int(c)): float(np.mean(right[class_ids == c])) for c in np.unique(class_ids)
    }


def _best(samples: dict) -> dict:
    """The (sampler, scale) with the highest class accuracy; ties: the higher mean feature one."""
    candidates = []
    for sampler, by_scale in samples.items():
        for scale, result in by_scale.items():
            accuracy = result["accuracy"]
            features = [v for k, v in accuracy.items() if k != "class"]
            score = (accuracy["class"], float(np.mean(features)))
            candidates.append((score, sampler, float(scale), result))
    _, sampler, scale, result = max(candidates, key=lambda c: c[0])
    best = {"sampler": sampler, "guidance_scale": scale}
    best.update({k: v for k, v in result.items() if k != "grid"})
    return best


def evaluate_class_dit_run(checkpoint: str, data_config, seed: int, options, output_dir: str):
    """Samples the class of each of a split's first `options.num_samples` examples (sample i with
    seed i) over the sweep and scores them -> (metrics, galleries).

    metrics: checkpoint_step, resolution, objective, class_features, num_classes,
      guidance_scales, samplers, splits[split] = {num_samples,
        real: {oracle_accuracy: {<feature>..., class}},
        samples: {"<sampler>:<steps>": {"<scale>": {accuracy: {<feature>..., class}, seconds,
            grid}}},
        best: {sampler, guidance_scale, accuracy, seconds, per_class: {name: class accuracy}}}
    """
    pipe = ClassToImage.from_run(checkpoint)
    classes = pipe.classes
    check_oracle_reads(classes)
    samplers = options.samplers or (DEFAULT_SAMPLER[pipe.objective],)
    for name, steps in samplers:  # unknown names for this objective fail before any work
        pipe.settings(sampler=name, steps=steps)
    metrics = {
        "checkpoint_step": pipe.checkpoint_step,
        "resolution": pipe.image_size,
        "objective": pipe.objective,
        "class_features": list(classes.features),
        "num_classes": classes.num_classes,
        "guidance_scales": list(options.guidance_scales),
        "samplers": [sampler_key(*s) for s in samplers],
        "splits": {},
    }
    galleries = []
    os.makedirs(os.path.join(output_dir, "grids"), exist_ok=True)
    progress = tqdm.tqdm(
        total=len(options.splits) * len(samplers) * len(options.guidance_scales),
        desc="evaluate",
        unit="setting",
        dynamic_ncols=True,
    )
    for split in options.splits:
        examples = load_split_examples(
            data_config, seed, split, options.num_samples, options.source_data_dir
        )
        class_ids = classes.ids(examples.labels)  # the classes of the split's examples
        asked = classes.feature_labels(class_ids)
        count = len(class_ids)
        real = {"oracle_accuracy": class_accuracy(read_attributes(examples.images), asked)}
        entry = {"num_samples": count, "real": real, "samples": {}}
        readings = {}
        for sampler, steps in samplers:
            by_scale = entry["samples"].setdefault(sampler_key(sampler, steps), {})
            for scale in options.guidance_scales:
                start = time.perf_counter()
                images = pipe.generate(
                    class_ids,
                    seeds=list(range(count)),
                    sampler=sampler,
                    steps=steps,
                    guidance_scale=scale,
                    batch_size=options.batch_size,
                )
                seconds = time.perf_counter() - start
                reading = read_attributes(images)
                readings[(sampler_key(sampler, steps), scale_key(scale))] = reading
                name = f"{split}_{sampler}-{steps}_cfg{scale_key(scale)}.png"
                shown = min(options.grid_size, count)
                right = np.all([getattr(reading, f) == v for f, v in asked.items()], axis=0)
                report.save_grid(
                    images[:shown],
                    os.path.join(output_dir, "grids", name),
                    frame_colors=[report.GOOD if ok else report.BAD for ok in right[:shown]],
                )
                by_scale[scale_key(scale)] = {
                    "accuracy": class_accuracy(reading, asked),
                    "seconds": seconds,
                    "grid": f"grids/{name}",
                }
                items = [
                    {
                        "prompt": classes.name(int(class_ids[i])),
                        "read": reading.names(i),
                        "correct": {f: bool(getattr(reading, f)[i] == asked[f][i]) for f in asked},
                    }
                    for i in range(shown)
                ]
                title = f"{split}: {sampler} {steps} steps, guidance {scale_key(scale)}"
                galleries.append(
                    {"title": title, "image": f"grids/{name}", "items": items, "split": split}
                    | {"sampler": sampler_key(sampler, steps), "scale": scale}
                )
                progress.update(1)
        best = entry["best"] = _best(entry["samples"])
        reading = readings[(best["sampler"], scale_key(best["guidance_scale"]))]
        best["per_class"] = per_class_accuracy(reading, asked, class_ids, classes)
        metrics["splits"][split] = entry
    progress.close()
    return metrics, galleries
