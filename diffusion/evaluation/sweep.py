"""The guidance x sampler sweep of a DiT evaluation, one piece for text- and class-conditional
runs, images and clips alike: its default sampler, the checks made before any sampling, how its
settings are named in metrics.json and the report, the loop that samples every setting of a split
(stop check, timing, progress) and the choice of the best setting. What a family scores, and the
files it writes of each setting, stay with the family's evaluator."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import numpy as np
import tqdm

DEFAULT_SAMPLER = {"flow": ("euler", 20), "ddpm": ("ddim", 20)}


def scale_key(scale: float) -> str:
    """How a guidance scale names its entry in metrics.json: 4.0 -> "4", 1.5 -> "1.5"."""
    return f"{scale:g}"


def sampler_key(sampler: str, steps: int) -> str:
    return f"{sampler}:{steps}"


class EvaluationStopped(Exception):
    """The evaluation's `stop` callback asked it to end (a pipeline's SIGTERM): nothing of it is
    written, the rerun evaluates again."""


def checked_samplers(pipe, options) -> tuple[tuple[str, int], ...]:
    """The (sampler, steps) to sweep: options.samplers, else the objective's default. Each is
    tried on the pipe here with the sweep's sampler options, so that a name unknown to this
    objective, or an option it does not take, fails before any sampling."""
    samplers = options.samplers or (DEFAULT_SAMPLER[pipe.objective],)
    for name, steps in samplers:
        pipe.settings(sampler=name, steps=steps, **options.sampler_options)
    return samplers


def metrics_head(pipe, samplers, options, *, dimensions=None, model=None) -> dict:
    """metrics.json's opening keys, "splits" still empty. `dimensions`: the sample's sizes besides
    its resolution (a clip's frames); `model`: what the family says of the model (the CLIP run
    that scores it, its classes). Each stands where readers of metrics.json find it."""
    return {
        "checkpoint_step": pipe.checkpoint_step,
        "resolution": pipe.image_size,
        **(dimensions or {}),
        "objective": pipe.objective,
        **(model or {}),
        "guidance_scales": list(options.guidance_scales),
        "samplers": [sampler_key(*s) for s in samplers],
        "splits": {},
    }


def progress_bar(options, samplers) -> tqdm.tqdm:
    """One bar over every setting of every split: a sweep takes minutes to hours."""
    return tqdm.tqdm(
        total=len(options.splits) * len(samplers) * len(options.guidance_scales),
        desc="evaluate",
        unit="setting",
        dynamic_ncols=True,
    )


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the sweep on one split; its names tie metrics.json, the files and the report
    together."""

    split: str
    sampler: str
    steps: int
    scale: float

    @property
    def place(self) -> tuple[str, str]:
        """Its keys in a split's "samples": ("euler:20", "4")."""
        return sampler_key(self.sampler, self.steps), scale_key(self.scale)

    @property
    def file_stem(self) -> str:
        """The name of its grid or clip folder: "test_euler-20_cfg4"."""
        return f"{self.split}_{self.sampler}-{self.steps}_cfg{scale_key(self.scale)}"

    @property
    def title(self) -> str:
        return f"{self.split}: {self.sampler} {self.steps} steps, guidance {scale_key(self.scale)}"

    @property
    def gallery_tags(self) -> dict:
        """What the report groups a gallery by."""
        return {
            "split": self.split,
            "sampler": sampler_key(self.sampler, self.steps),
            "scale": self.scale,
        }

    def store(self, samples: dict, result: dict) -> None:
        """Puts `result` at its place in a split's "samples", in the order of the sweep."""
        by_sampler, by_scale = self.place
        samples.setdefault(by_sampler, {})[by_scale] = result


def settings_of_split(
    pipe, split: str, conditions, samplers, options, progress: tqdm.tqdm, stop=None
) -> Iterator[tuple[Setting, object, float]]:
    """Samples `conditions` (captions or class ids) at every setting of the sweep ->
    (setting, samples, seconds of sampling), the progress bar moved on once the caller has scored
    them. Sample i always uses seed i, so settings compare sample by sample. stop: asked before
    each setting; True raises EvaluationStopped."""
    seeds = list(range(len(conditions)))
    for sampler, steps in samplers:
        for scale in options.guidance_scales:
            if stop is not None and stop():
                raise EvaluationStopped(f"stopped before {split} {sampler} {scale}")
            start = time.perf_counter()
            outputs = pipe.generate(
                conditions,
                seeds=seeds,
                sampler=sampler,
                steps=steps,
                guidance_scale=scale,
                batch_size=options.batch_size,
                **options.sampler_options,
            )
            seconds = time.perf_counter() - start
            yield Setting(split, sampler, steps, scale), outputs, seconds
            progress.update(1)


def accuracy_score(accuracy: dict, primary: str, attributes) -> tuple[float, float]:
    """(the accuracy that counts, the mean over `attributes`): the mean breaks ties, which are
    common on few samples."""
    return accuracy[primary], float(np.mean([accuracy[a] for a in attributes]))


def best_setting(samples: dict, score: Callable[[dict], tuple], drop: str) -> dict:
    """The setting of a split's "samples" whose result has the highest `score` (the first of
    equals, in the order of the sweep): {sampler, guidance_scale, <its result>...}, less `drop`,
    the result's files, which the report shows with the sweep."""
    candidates = [
        (score(result), sampler, float(scale), result)
        for sampler, by_scale in samples.items()
        for scale, result in by_scale.items()
    ]
    _, sampler, scale, result = max(candidates, key=lambda c: c[0])
    return {"sampler": sampler, "guidance_scale": scale} | {
        k: v for k, v in result.items() if k != drop
    }
