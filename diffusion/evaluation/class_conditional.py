"""evaluate.py on a class-conditional DiT of the shapes dataset: samples of the classes of each
held-out split's examples, read back by the shapes oracle, scored by whether the oracle reads the
asked class (every class feature, e.g. colour and shape, right) over a guidance x sampler sweep.

A class-conditional DiT knows only the classes it was trained on: shapes' `test_unseen` split
holds (colour, shape) pairs that never occur in training, whose class embeddings stay at their
random initialisation, so its accuracy measures nothing the model learnt (evaluate `test`).
"""

from __future__ import annotations

import os

import numpy as np

from diffusion.data.classes import ClassSpace
from diffusion.errors import UserError
from diffusion.evaluation import report, sweep
from diffusion.evaluation.held_out import load_split_examples
from diffusion.evaluation.shapes_oracle import VOCABULARIES, OracleReading, read_attributes
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


def setting_score(result: dict) -> tuple[float, float]:
    """How the best setting is chosen: the asked class read most often, ties to the higher mean
    feature accuracy."""
    accuracy = result["accuracy"]
    return sweep.accuracy_score(accuracy, "class", [f for f in accuracy if f != "class"])


def evaluate_class_dit_run(
    checkpoint: str, data_config, seed: int, options, output_dir: str, stop=None
):
    """Samples the class of each of a split's first `options.num_samples` examples (sample i with
    seed i) over the sweep and scores them -> (metrics, galleries).

    metrics: checkpoint_step, resolution, objective, class_features, num_classes,
      guidance_scales, samplers, splits[split] = {num_samples,
        real: {oracle_accuracy: {<feature>..., class}},
        samples: {"<sampler>:<steps>": {"<scale>": {accuracy: {<feature>..., class}, seconds,
            grid}}},
        best: {sampler, guidance_scale, accuracy, seconds, per_class: {name: class accuracy}}}
    stop: called before each setting of the sweep; True ends the evaluation (EvaluationStopped).
    """
    pipe = ClassToImage.from_run(checkpoint)
    classes = pipe.classes
    check_oracle_reads(classes)
    samplers = sweep.checked_samplers(pipe, options)
    described = {"class_features": list(classes.features), "num_classes": classes.num_classes}
    metrics = sweep.metrics_head(pipe, samplers, options, model=described)
    galleries = []
    os.makedirs(os.path.join(output_dir, "grids"), exist_ok=True)
    progress = sweep.progress_bar(options, samplers)
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
        settings = sweep.settings_of_split(
            pipe, split, class_ids, samplers, options, progress, stop
        )
        for setting, images, seconds in settings:
            reading = readings[setting.place] = read_attributes(images)
            name = f"{setting.file_stem}.png"
            grid = f"grids/{name}"
            shown = min(options.grid_size, count)
            right = np.all([getattr(reading, f) == v for f, v in asked.items()], axis=0)
            report.save_grid(
                images[:shown],
                os.path.join(output_dir, "grids", name),
                frame_colors=[report.GOOD if ok else report.BAD for ok in right[:shown]],
            )
            setting.store(
                entry["samples"],
                {"accuracy": class_accuracy(reading, asked), "seconds": seconds, "grid": grid},
            )
            items = [
                {
                    "prompt": classes.name(int(class_ids[i])),
                    "read": reading.names(i),
                    "correct": {f: bool(getattr(reading, f)[i] == asked[f][i]) for f in asked},
                }
                for i in range(shown)
            ]
            galleries.append(
                {"title": setting.title, "image": grid, "items": items} | setting.gallery_tags
            )
        best = entry["best"] = sweep.best_setting(entry["samples"], setting_score, drop="grid")
        reading = readings[(best["sampler"], sweep.scale_key(best["guidance_scale"]))]
        best["per_class"] = per_class_accuracy(reading, asked, class_ids, classes)
        metrics["splits"][split] = entry
    progress.close()
    return metrics, galleries
