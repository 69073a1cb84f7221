"""The pipeline runner: what train.py calls. A recipe of one family trains that model; a
"pipeline" recipe (configs/shapes.py) chains stages, each in its own subdirectory of the work
directory: clip -> dit (on the frozen CLIP text tower) -> evaluate -> samples.

The runner owns preemption: one SIGTERM guard spans all stages, so a SIGTERM during any stage
saves the stage in flight (training: a checkpoint; evaluate: the runs evaluated so far;
samples: the images made so far; encode: the shards written so far) and exits without starting
another; rerunning the same command continues where it stopped (training resumes, encoding
skips the written shards, a finished evaluation is skipped, existing images are kept).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import ml_collections

from diffusion import families, meshes, rundir
from diffusion.data import sources
from diffusion.errors import UserError
from diffusion.pipeline import stages
from diffusion.pipeline.periodic import PeriodicEvaluation
from diffusion.training import PreemptionGuard, build_on, inputs, reads_text_tower, train

PIPELINE_STAGES = ("autoencoder", "clip", "encode", "dit", "video_dit", "evaluate", "samples")
TRAINING_STAGES = ("autoencoder", "clip", "dit", "video_dit")
# The stages whose text encoder is, unless the recipe names one, the clip stage's run.
TEXT_CONDITIONED_STAGES = ("dit", "video_dit")
# The directory a stage writes, where not its name.
STAGE_DIRECTORIES = {"evaluate": "eval", "encode": stages.LATENTS_DIR}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains what `config.family` names in `workdir` (a family of `diffusion.families`, or a
    "pipeline" of stages); returns the last logged metrics (per stage, for a pipeline)."""
    if config.family == "pipeline":
        return run_pipeline(config, workdir)
    if config.family == "sampling":
        raise UserError(
            "this recipe (config.family='sampling') samples released weights and trains nothing; "
            "run it with python sample.py --config=RECIPE --config.weights=DIR --prompts=FILE "
            "--output_dir=OUT"
        )
    if config.family not in families.FAMILIES:
        valid = (*families.FAMILIES, "pipeline")
        raise UserError(f"config.family={config.family!r} is not one of {valid}.")
    check_data(config, [config])
    with PreemptionGuard() as preemption:
        return train(config, workdir, callbacks=[PeriodicEvaluation(config)], preemption=preemption)


def check_data(config: ml_collections.ConfigDict, trained: list) -> None:
    """Every split and feature the run will read, checked against the dataset before anything is
    trained: a wrong evaluation split or caption feature is named now, not after hours of
    training (the shapes dataset is built here if missing, as training would build it).

    trained: the training configs (a family's recipe, or a pipeline's training stages)."""
    reads: dict[int, tuple] = {}  # one dataset opened once, however many stages share it

    def read(data, seed, splits, captions):
        _, _, known, with_captions = reads.get(id(data), (data, seed, [], False))
        reads[id(data)] = (data, seed, known + list(splits), with_captions or captions)

    for c in trained:
        read(
            c.data, c.seed, [c.data.train_split, *c.data.get("eval_splits", ())], _reads_captions(c)
        )
    if config.family == "pipeline" and "evaluate" in config.stages:
        read(config.data, config.seed, config.evaluate.splits, True)
    for data, seed, splits, captions in reads.values():
        source, _ = inputs.prepare_source(data, seed)
        for split in dict.fromkeys(splits):
            sources.open_source(source, split, captions=captions)
    for c in trained:  # clips for a family of images: named before any stage trains
        source, builder = inputs.prepare_source(c.data, c.seed)
        families.check_inputs(c.family, inputs.frames_of(source, builder), source.name)


def _reads_captions(config: ml_collections.ConfigDict) -> bool:
    return families.get(config.family).input_options(config).get("captions", True)


def check_models(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Each training stage's model and loss, built from its recipe before the first stage trains:
    a bad field of a later stage (`--config.dit.model.patch_size=3`) is named now, not after the
    earlier stages have trained. A stage is built on what its data will be: the dataset's images
    or clips, or (a stage on the encode stage's latents) the autoencoder stage's latent side and
    channels; a text-conditioned stage on the text tower its recipe names, else the clip stage's
    as that stage's recipe configures it. Nothing is initialised or written."""
    built: dict[str, families.ModelBuild] = {}
    pixels: dict[str, families.DataFacts] = {}
    for stage in (s for s in config.stages if s in TRAINING_STAGES):
        c = config[stage]
        on_latents = stage in TEXT_CONDITIONED_STAGES and "encode" in config.stages
        try:
            if on_latents:
                if "autoencoder" not in built:
                    continue  # the encode stage names the missing autoencoder stage
                c = c.copy_and_resolve_references()  # the data section the stage will read
                c.data = stages.latent_data_config(config, workdir)
                facts = _latent_facts(c, pixels["autoencoder"], built["autoencoder"])
            else:
                source, builder = inputs.prepare_source(c.data, c.seed)
                side, channels = inputs.image_shape_of(c, source, builder)
                frames = inputs.frames_of(source, builder)
                facts = dataclasses.replace(
                    families.DataFacts.from_config(c, side), image_channels=channels, frames=frames
                )
                pixels[stage] = facts
            text_config = _text_tower_config(config, workdir, stage, built)
            if reads_text_tower(c) and text_config is None:
                continue  # no tower to build on: the stage names the missing one when it runs
            mesh = meshes.mesh_from_config(c.mesh)
            built[stage] = build_on(c, facts, mesh, text_config)
        except UserError as error:  # the hint spelled for the pipeline, as when the stage runs
            error.args = (stage_flags(str(error), stage),)
            raise


def _latent_facts(c, images: families.DataFacts, autoencoder: families.ModelBuild):
    """The facts of a stage that trains on the latents of the autoencoder stage's build."""
    latent = autoencoder.model_config
    return dataclasses.replace(
        families.DataFacts.from_config(c, images.image_size // latent.downsampling_factor),
        image_channels=latent.latent_channels,
        frames=images.frames,
    )


def _text_tower_config(config, workdir: str, stage: str, built: dict):
    """The config of the text tower `stage` reads: the one its recipe names, the clip stage's
    (built just before), or a clip run already in WORKDIR/clip; None where there is none yet."""
    if stage not in TEXT_CONDITIONED_STAGES:
        return None
    named = config[stage].text_encoder.checkpoint
    if not named and "clip" in built:
        return built["clip"].model_config
    checkpoint = named or stages.text_encoder_of(config, workdir, stage)
    if not os.path.isfile(os.path.join(checkpoint, rundir.MODEL_FILE)):
        return None
    return rundir.load_model_config(checkpoint)[1]


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs config.stages in order, each in WORKDIR/<stage>; every stage resumes or skips on
    rerun. A SIGTERM stops after the stage in flight has saved: no later stage starts."""
    unknown = [s for s in config.stages if s not in PIPELINE_STAGES]
    if unknown:
        raise UserError(f"config.stages names {unknown}; valid stages: {PIPELINE_STAGES}.")
    check_data(config, [config[s] for s in config.stages if s in TRAINING_STAGES])
    check_models(config, workdir)
    results, timings = {}, {}
    with PreemptionGuard() as preemption:
        for stage in config.stages:
            where = os.path.join(workdir, STAGE_DIRECTORIES.get(stage, stage))
            print(f"== stage {stage}: {where}", flush=True)
            start = time.perf_counter()
            results[stage] = _run_stage(config, workdir, stage, preemption)
            timings[stage] = time.perf_counter() - start
            if preemption.requested:
                print(
                    f"== preempted during stage {stage}: it is saved; rerun the same command "
                    "to continue",
                    flush=True,
                )
                return results
    if jax.process_index() == 0:
        print(pipeline_summary(workdir, timings), flush=True)
    return results


def _run_stage(config, workdir: str, stage: str, preemption: PreemptionGuard):
    if stage in TRAINING_STAGES:
        stage_config = config[stage]
        if stage in TEXT_CONDITIONED_STAGES:  # the encode stage's text features name it too
            stage_config.text_encoder.checkpoint = stages.text_encoder_of(config, workdir, stage)
        if stage in TEXT_CONDITIONED_STAGES and "encode" in config.stages:  # on the latents
            stage_config.data = stages.latent_data_config(config, workdir)
        try:
            return train(
                stage_config,
                os.path.join(workdir, stage),
                rundir.tokenizer_dir(workdir),
                callbacks=[PeriodicEvaluation(stage_config)],
                preemption=preemption,
            )
        except UserError as error:  # same type and traceback, the hint spelled for here
            error.args = (stage_flags(str(error), stage),)
            raise
    # Every process polls at the same points (the same batches of evaluation and sampling, the
    # same rounds of shards): with several processes they agree (JAX's preemption sync point)
    # on the one after which all stop.
    if stage == "encode":
        return stages.run_encode_stage(config, workdir, preemption.poll)
    if stage == "evaluate":
        return stages.run_evaluate_stage(config, workdir, preemption.poll)
    return stages.run_samples_stage(config, workdir, preemption.poll)


def stage_flags(message: str, stage: str) -> str:
    """A training error's flag hints (`--config.model.X`) as the pipeline spells them
    (`--config.clip.model.X`); the sections all stages share (data, tokenizer, seed) stay."""
    return re.sub(r"--config\.(?!(data|tokenizer|seed)\b)", f"--config.{stage}.", message)


def pipeline_summary(workdir: str, timings: dict[str, float]) -> str:
    """What a finished pipeline made and where: wall time per stage and the files to open."""
    lines = ["== done. wall time per stage (this invocation):"]
    lines += [f"   {stage:9s} {seconds:7.1f} s" for stage, seconds in timings.items()]
    lines.append(f"   {'total':9s} {sum(timings.values()):7.1f} s")
    places = (
        ("autoencoder", os.path.join(workdir, "autoencoder", rundir.PARAMS_DIR)),
        ("autoencoder eval", os.path.join(workdir, "eval", "autoencoder", "metrics.json")),
        ("latents", os.path.join(workdir, stages.LATENTS_DIR)),
        ("prompt grid", os.path.join(workdir, "samples", "grid.png")),
        ("DiT report", os.path.join(workdir, "eval", "dit", "index.html")),
        ("DiT metrics", os.path.join(workdir, "eval", "dit", "metrics.json")),
        ("video report", os.path.join(workdir, "eval", "video_dit", "index.html")),
        ("video metrics", os.path.join(workdir, "eval", "video_dit", "metrics.json")),
        ("CLIP report", os.path.join(workdir, "eval", "clip", "index.html")),
        ("CLIP metrics", os.path.join(workdir, "eval", "clip", "metrics.json")),
        ("DiT weights", os.path.join(workdir, "dit", rundir.PARAMS_DIR)),
        ("video DiT weights", os.path.join(workdir, "video_dit", rundir.PARAMS_DIR)),
    )
    lines += [f"   {name:17s} {path}" for name, path in places if os.path.exists(path)]
    return "\n".join(lines)
