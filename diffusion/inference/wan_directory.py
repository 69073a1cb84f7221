"""A diffusers-format Wan 2.1 directory, read the way diffusers reads it: which folders are one
(`is_wan_directory`, `check_wan_directory`), its scheduler's flow shift (`read_scheduler`) and the
noise levels that scheduler walks (`wan_levels`).

These are about the files and the schedule only, no model or device: sample.py and batch_io.py
ask `is_wan_directory` without building a pipeline, and `WanTextToVideo`
(`diffusion/inference/wan_pipeline.py`) loads its models after `check_wan_directory`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from diffusion.inference.settings import SamplingError, check_number
from diffusion.schedules import NoiseLevels, shift_time

PIPELINE_CLASS = "WanPipeline"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# Scheduler classes of Wan directories and the config field holding their flow shift.
SHIFT_FIELDS = {"UniPCMultistepScheduler": "flow_shift", "FlowMatchEulerDiscreteScheduler": "shift"}


def is_wan_directory(path: str) -> bool:
    """True for a diffusers pipeline directory whose model_index.json names a WanPipeline."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return False
    try:
        with open(index, encoding="utf-8") as f:
            return json.load(f).get("_class_name") == PIPELINE_CLASS
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as error:
        raise SamplingError(f"{path} ({what}) is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise SamplingError(f"{path} ({what}) must hold a JSON object")
    return value


def check_wan_directory(directory: str) -> dict:
    """model_index.json of a diffusers Wan 2.1 text-to-video directory, its subfolders checked."""
    if not os.path.isdir(directory):
        raise SamplingError(
            f"{directory!r} is not a directory; pass a local diffusers-format Wan 2.1 directory "
            "(e.g. a download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
        )
    index_path = os.path.join(directory, "model_index.json")
    if not os.path.isfile(index_path):
        raise SamplingError(
            f"{directory!r} has no model_index.json: it is not a diffusers pipeline directory; "
            "pass the folder WanPipeline.save_pretrained wrote (with transformer/, vae/, ...)"
        )
    index = _read_json(index_path, "model_index.json")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise SamplingError(
            f"{index_path} names the pipeline {index.get('_class_name')!r}; only "
            f"{PIPELINE_CLASS!r} (Wan 2.1 text-to-video) is supported"
        )
    if index.get("transformer_2") not in (None, [None, None]) or index.get("boundary_ratio"):
        raise SamplingError(
            f"{index_path} has a second transformer (Wan 2.2's two-stage denoising); only "
            "Wan 2.1's single transformer is supported"
        )
    if index.get("expand_timesteps"):
        raise SamplingError(
            f"{index_path} sets expand_timesteps (Wan 2.2 TI2V's per-token timesteps); only "
            "Wan 2.1's one timestep per clip is supported"
        )
    missing = [name for name in SUBFOLDERS if not os.path.isdir(os.path.join(directory, name))]
    if missing:
        raise SamplingError(
            f"{directory!r} lacks the subfolders {missing}; a Wan 2.1 directory has "
            f"{', '.join(f'{n}/' for n in SUBFOLDERS)} (download the whole repository)"
        )
    return index


def read_scheduler(directory: str) -> tuple[float, int]:
    """(flow shift, training timesteps) of a Wan directory's scheduler/scheduler_config.json."""
    path = os.path.join(directory, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise SamplingError(f"{path} is missing; the Wan directory's scheduler/ is incomplete")
    config = _read_json(path, "the scheduler's config")
    name = config.get("_class_name")
    if name not in SHIFT_FIELDS:
        raise SamplingError(
            f"{path} describes a {name!r}; a Wan 2.1 directory's scheduler is one of "
            f"{sorted(SHIFT_FIELDS)}"
        )
    if name == "UniPCMultistepScheduler" and not config.get("use_flow_sigmas", False):
        raise SamplingError(
            f"{path}: a UniPCMultistepScheduler without use_flow_sigmas is not a flow-matching "
            "scheduler; Wan's has use_flow_sigmas = true"
        )
    shift = config.get(SHIFT_FIELDS[name], 1.0)
    return check_number(shift, "the scheduler's flow shift"), int(
        config.get("num_train_timesteps", 1000)
    )


def wan_levels(steps: int, shift: float, num_train_timesteps: int = 1000) -> NoiseLevels:
    """The levels of diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)
    after set_timesteps(steps), built with the same float64 -> float32 arithmetic.

    sigma: shift(linspace(1, 1/T, N + 1)[:-1]) with 1 lowered by 1e-6 (diffusers: "to avoid inf
    log(alpha)"), then 0. t: what the DiT sees, the int64 timestep int(T sigma) / T: diffusers
    and Wan's reference code both truncate the timesteps they pass to the model.
    """
    sigmas = np.linspace(1, 1 / num_train_timesteps, steps + 1)[:-1]
    sigmas = shift_time(sigmas, shift)
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = (sigmas * num_train_timesteps).astype(np.int64)  # torch's int64 cast truncates
    sigmas = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)
    t = np.append(timesteps / num_train_timesteps, 0.0)
    return NoiseLevels(t=t, alpha=1 - sigmas, sigma=sigmas)
