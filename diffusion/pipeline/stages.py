"""The stages of a pipeline that are not training: encoding, evaluation and the prompt grid.

`make train` (configs/shapes.py, family "pipeline") runs clip -> dit -> evaluate -> samples, each
in its own subdirectory of the work directory; configs/shapes_latent.py first trains an
autoencoder and CLIP, then encodes the dataset with the autoencoder (`encode`, into
WORKDIR/latents) and each caption with the DiT's text tower (the CLIP's), and its DiT trains on
those latents and cached text features. The last two stages are pure consumers of the trained
runs, so rerunning them is always safe: `evaluate` is skipped when its metrics already describe
the final checkpoint, and `samples` only makes the images that are missing; `encode` keeps a
finished encoding of the same plan and refuses one of another."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from diffusion import encoding, rundir
from diffusion.errors import UserError
from diffusion.evaluation.checks import negative_check_scale
from diffusion.evaluation.evaluator import (
    EvaluationOptions,
    evaluate_checkpoint,
    options_record,
    parse_samplers,
)
from diffusion.evaluation.sweep import EvaluationStopped
from diffusion.families import dit
from diffusion.inference import (
    GRID,
    PromptItem,
    TextToImage,
    parse_guidance_interval,
    sample_to_directory,
)


def sampler_options(section: ml_collections.ConfigDict) -> dict:
    """The sampler options a stage's section (`config.evaluate`, `config.samples`) sets besides
    its sampler and steps, as sample.py's flags: eta, shift, guidance_rescale, and
    guidance_interval as "T_LO,T_HI" ("" guides every step)."""
    options = {
        name: section[name] for name in ("eta", "shift", "guidance_rescale") if name in section
    }
    if section.get("guidance_interval"):
        options["guidance_interval"] = parse_guidance_interval(section.guidance_interval)
    return options


def evaluation_options(config: ml_collections.ConfigDict, data_dir: str | None):
    """evaluate.py's options from the pipeline's `config.evaluate` section."""
    e = config.evaluate
    return EvaluationOptions(
        num_samples=e.num_samples,
        splits=tuple(e.splits),
        guidance_scales=tuple(float(s) for s in e.guidance_scales),
        samplers=parse_samplers(e.samplers),
        batch_size=e.batch_size,
        negative_prompt=e.negative_prompt,
        negative_color=e.negative_color,
        diversity_captions=e.diversity_captions,
        diversity_samples=e.diversity_samples,
        data_dir=data_dir,
        **sampler_options(e),
    )


def _up_to_date(metrics_path: str, step: int | None, options: EvaluationOptions) -> bool:
    """Whether metrics.json exists and was computed from checkpoint `step` with `options` (a
    recipe whose evaluation section changed is evaluated again, for the options its family
    reads)."""
    if step is None or not os.path.isfile(metrics_path):
        return False
    try:
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError):  # a torn file from a killed run: evaluate again
        return False
    recorded = options_record(options, metrics.get("family"))
    return metrics.get("checkpoint_step") == step and metrics.get("options") == recorded


LATENTS_DIR = "latents"  # WORKDIR/latents: the encode stage's data_dir


def latent_data_config(config: ml_collections.ConfigDict, workdir: str):
    """The data section of a DiT (or video DiT) that trains on the encode stage's latents of
    config.data."""
    data = config.data.copy_and_resolve_references()
    data.name = latent_dataset_name(config)
    data.data_dir = os.path.join(workdir, LATENTS_DIR)
    data.builder_config = None
    return data


def latent_dataset_name(config: ml_collections.ConfigDict) -> str:
    return f"{config.data.name}_latents"


def text_encoder_of(config: ml_collections.ConfigDict, workdir: str, stage: str = "dit") -> str:
    """The frozen text tower of a text-conditioned stage: the one its recipe names, else the
    clip stage's run (WORKDIR/clip)."""
    return config[stage].text_encoder.checkpoint or os.path.join(workdir, "clip")


def encoded_text(config: ml_collections.ConfigDict, workdir: str) -> tuple[str | None, bool]:
    """(text encoder, with word embeddings) whose features of each caption the encode stage
    stores for the DiT (`config.encode.text_features`): the DiT's own tower, and its word
    embeddings where the DiT reads them (`model.word_conditioning`); (None, False) where the
    field is off or no text-conditional DiT trains on the latents."""
    if not config.encode.get("text_features", False) or "dit" not in config.stages:
        return None, False
    if not dit.is_text_conditional(config.dit):  # class-conditional: reads no caption
        return None, False
    return text_encoder_of(config, workdir), bool(config.dit.model.get("word_conditioning", False))


def run_encode_stage(
    config: ml_collections.ConfigDict, workdir: str, stop=lambda: False
) -> str | None:
    """encode.py on config.data with the autoencoder stage's run: WORKDIR/latents/NAME/1.0.0,
    with the DiT's text features of each caption (`encoded_text`). Resumes an interrupted
    encoding; a finished one of the same plan is kept, one of another plan refused. stop():
    checked after every batch; True ends the stage with the shards written so far (None; a rerun
    encodes the rest)."""
    autoencoder = os.path.join(workdir, "autoencoder")
    if not os.path.isdir(os.path.join(autoencoder, rundir.PARAMS_DIR)):
        raise UserError(
            f"stage encode needs the trained autoencoder in {autoencoder}; put 'autoencoder' "
            "before 'encode' in config.stages."
        )
    text_encoder, words = encoded_text(config, workdir)
    if text_encoder is not None and not os.path.isdir(text_encoder):
        raise UserError(
            f"stage encode stores the DiT's text features (config.encode.text_features=True), "
            f"which needs its text encoder {text_encoder}: put 'clip' before 'encode' in "
            "config.stages, or pass --config.encode.text_features=False (the DiT then runs the "
            "text tower in its step)."
        )
    latents_dir = os.path.join(workdir, LATENTS_DIR)
    options = encoding.EncodeOptions(
        output_dir=latents_dir,
        name=latent_dataset_name(config),
        batch_size=config.encode.batch_size,
        examples_per_shard=config.encode.examples_per_shard,
        text_encoder=text_encoder,
        text_words=words,
    )
    try:
        return encoding.encode_dataset(autoencoder, config.data, config.seed, options, stop)
    except encoding.EncodingStopped:
        return None
    except encoding.PlanChanged as error:  # the same type, the fix spelled for the pipeline
        error.args = (plan_changed_message(error, latents_dir, workdir),)
        raise


def plan_changed_message(error, latents_dir: str, workdir: str) -> str:
    """What to do about WORKDIR/latents made with another plan, e.g. by the pipeline before
    config.encode.text_features (no text features) or with another text encoder."""
    message = (
        f"stage encode: {error.root} holds latents encoded with another plan than this "
        f"pipeline's (differs in {error.changed}); they are kept as they are. Delete "
        f"{latents_dir} to encode them again (and {os.path.join(workdir, 'dit')} to train the "
        "DiT on them)"
    )
    # Latents without text features and otherwise this plan: the DiT can run its tower.
    if all(key.startswith("text_") for key in error.changed) and not error.earlier.get(
        "text_encoder"
    ):
        message += (
            ", or pass --config.encode.text_features=False to train the DiT on them as they are "
            "(with the text tower in its step)"
        )
    return message + "."


def generator_stage(config: ml_collections.ConfigDict) -> str:
    """The stage whose run the evaluate and samples stages sample: "video_dit" or "dit"."""
    return "video_dit" if "video_dit" in config.stages else "dit"


def run_evaluate_stage(
    config: ml_collections.ConfigDict, workdir: str, stop=lambda: False
) -> dict[str, Any]:
    """evaluate.py on every run: WORKDIR/eval/{autoencoder (a latent recipe's), clip, dit (or
    video_dit)}/{metrics.json, index.html}. stop(): checked before each run and each setting of
    the DiT's sweep; True ends the stage with the metrics finished so far (an unfinished
    evaluation writes none and is redone on rerun)."""
    options = evaluation_options(config, config.data.data_dir)
    results = {}
    runs = ("autoencoder",) if "autoencoder" in config.stages else ()
    for run in (*runs, "clip", generator_stage(config)):
        if run == generator_stage(config) and "encode" in config.stages:  # its data: latents
            options = dataclasses.replace(options, data_dir=None)
        run_dir = os.path.join(workdir, run)
        if not os.path.isdir(run_dir):
            raise UserError(f"stage evaluate needs the {run} run in {run_dir}; train it first.")
        output_dir = os.path.join(workdir, "eval", run)
        metrics_path = os.path.join(output_dir, "metrics.json")
        if _up_to_date(metrics_path, rundir.latest_step(run_dir), options):
            print(f"   {run}: {metrics_path} is up to date", flush=True)
        else:
            if stop():
                return results
            try:
                evaluate_checkpoint(run_dir, output_dir, options, stop)
            except EvaluationStopped:
                return results
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


def _dit_metrics(workdir: str, stage: str = "dit") -> dict:
    """WORKDIR/eval/<stage>/metrics.json (the DiT's or the video DiT's), or {} before the
    evaluation."""
    path = os.path.join(workdir, "eval", stage, "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def best_guidance_scale(workdir: str, fallback: float, stage: str = "dit") -> float:
    """The guidance scale the evaluation found best on `test`, else `fallback`."""
    best = _dit_metrics(workdir, stage).get("splits", {}).get("test", {}).get("best", {})
    return float(best.get("guidance_scale", fallback))


def grid_guidance_scales(config: ml_collections.ConfigDict, workdir: str) -> tuple[float, float]:
    """(scale of the grid's prompts, scale of its negative examples). The first is
    `config.samples.guidance_scale`, else the evaluation's best. At a scale <= 1 the
    unconditional branch, where a negative prompt sits, cancels out of uncond + w (cond -
    uncond); the negative examples then take the scale of evaluate.py's negative-prompt check
    (before an evaluation: the same rule over the configured scale)."""
    stage = generator_stage(config)
    fallback = config[stage].sampling.guidance_scale
    scale = config.samples.guidance_scale
    if scale is None:
        scale = best_guidance_scale(workdir, fallback=fallback, stage=stage)
    checked = _dit_metrics(workdir, stage).get("negative_prompt", {}).get("guidance_scale")
    return scale, negative_check_scale(scale, (float(checked),) if checked else (fallback,))


def run_samples_stage(
    config: ml_collections.ConfigDict, workdir: str, stop=lambda: False
) -> str | None:
    """The fixed prompts of `config.samples` -> WORKDIR/samples (PNGs, manifest.jsonl and
    grid.png, one labelled row per prompt; a video DiT's MP4 and GIF per clip and a frame
    strip). Returns the grid's path, or None when stop() ended the stage after a batch (a rerun
    makes the rest)."""
    s = config.samples
    items = sample_items(s, *grid_guidance_scales(config, workdir))
    output_dir = os.path.join(workdir, "samples")
    pipe = TextToImage.from_run(os.path.join(workdir, generator_stage(config)))
    made = sample_to_directory(
        pipe,
        items,
        output_dir,
        sampler=s.sampler,
        steps=s.steps,
        batch_size=s.batch_size,
        stop=stop,
        **sampler_options(s),
    )
    if made.get("stopped"):
        return None
    return os.path.join(output_dir, GRID)
