"""The training loop behind train.py: data, model, sharded state, checkpoints, logs, preemption.

`train_and_evaluate(config, workdir)` trains whichever family the config names ("clip", "dit", or
"pipeline", which runs CLIP then a DiT on its frozen text tower), resuming from the latest
complete checkpoint in `workdir`. A run directory holds everything needed to resume or sample:

    config.json        the resolved recipe            model.json   the model's exact config
    tokenizer/         the Hugging Face tokenizer     checkpoints/ Orbax steps (state + data)
    params/            EMA weights for sampling       metrics.jsonl, tensorboard/
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from diffusion import checkpoints, distributed, metrics, models, optim, sharding, training
from diffusion import data as data_lib
from diffusion.errors import NonFiniteError, UserError

logger = logging.getLogger(__name__)

FAMILIES = ("clip", "dit", "pipeline")
MODEL_FILE = "model.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains what `config.family` names in `workdir`; returns the last logged metrics."""
    if config.family not in FAMILIES:
        raise UserError(f"config.family={config.family!r} is not one of {FAMILIES}.")
    if config.family == "pipeline":
        return run_pipeline(config, workdir)
    return train(config, workdir)


PIPELINE_STAGES = ("clip", "dit", "evaluate", "samples")


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """CLIP, then the DiT on the frozen CLIP text tower, each in WORKDIR/<stage>; then evaluation
    (WORKDIR/eval) and the prompt grid (WORKDIR/samples). Every stage resumes or skips on rerun."""
    from diffusion import stages

    unknown = [s for s in config.stages if s not in PIPELINE_STAGES]
    if unknown:
        raise UserError(f"config.stages names {unknown}; valid stages: {PIPELINE_STAGES}.")
    results, timings = {}, {}
    tokenizer_dir = os.path.join(workdir, TOKENIZER_DIR)
    for stage in config.stages:
        where = {"evaluate": "eval"}.get(stage, stage)  # the directory each stage writes
        print(f"== stage {stage}: {os.path.join(workdir, where)}", flush=True)
        start = time.perf_counter()
        if stage in ("clip", "dit"):
            stage_config = config[stage]
            if stage == "dit" and not stage_config.text_encoder.checkpoint:
                stage_config.text_encoder.checkpoint = os.path.join(workdir, "clip")
            try:
                results[stage] = train(stage_config, os.path.join(workdir, stage), tokenizer_dir)
            except UserError as error:  # same type and traceback, the hint spelled for here
                error.args = (stage_flags(str(error), stage),)
                raise
        elif stage == "evaluate":
            results[stage] = stages.run_evaluate_stage(config, workdir)
        else:
            results[stage] = stages.run_samples_stage(config, workdir)
        timings[stage] = time.perf_counter() - start
    if jax.process_index() == 0:
        print(pipeline_summary(workdir, timings), flush=True)
    return results


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
        ("prompt grid", os.path.join(workdir, "samples", "prompts.png")),
        ("DiT report", os.path.join(workdir, "eval", "dit", "index.html")),
        ("DiT metrics", os.path.join(workdir, "eval", "dit", "metrics.json")),
        ("CLIP report", os.path.join(workdir, "eval", "clip", "index.html")),
        ("CLIP metrics", os.path.join(workdir, "eval", "clip", "metrics.json")),
        ("DiT weights", os.path.join(workdir, "dit", PARAMS_DIR)),
    )
    lines += [f"   {name:13s} {path}" for name, path in places if os.path.exists(path)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Data and tokenizer
# ---------------------------------------------------------------------------------------------


def resolution_of(data_config) -> int | None:
    """Shapes resolution from the builder config name ("32"), else None (read from the data)."""
    name = data_config.builder_config
    return int(name) if name and name.isdigit() else None


def prepare_source(data_config, seed: int) -> tuple[data_lib.SourceConfig, Any]:
    """Builds the shapes dataset if missing (other datasets must be prepared) -> source, builder."""
    if data_config.name == "shapes":
        build = lambda: data_lib.build_dataset(
            "shapes",
            data_config.data_dir,
            resolution_of(data_config) or 32,
            num_train=data_config.num_train_examples,
            num_test=data_config.num_eval_examples,
            num_test_unseen=data_config.num_eval_examples,
            seed=seed,
        )
        if jax.process_index() == 0:  # one writer; the others open what it wrote
            builder = build()
        distributed.barrier("shapes dataset prepared")
        if jax.process_index() != 0:
            builder = build()
        name = data_lib.tfds_name(builder)
    else:
        name = data_config.name
        if data_config.builder_config:
            name = f"{name}/{data_config.builder_config}"
        builder = data_lib.build_dataset(name, data_config.data_dir)
    source = data_lib.SourceConfig(
        name=name,
        data_dir=data_config.data_dir,
        image_key=data_config.image_key,
        caption_key=data_config.caption_key,
        label_key=data_config.label_key,
        caption_template=data_config.caption_template,
    )
    return source, builder


def read_captions(source, split: str) -> list[str]:
    """Every caption of a split (as the input pipeline makes them), for training a tokenizer."""
    from diffusion.data import pipeline

    reader = pipeline.open_source(source, split)
    decode = pipeline._BatchDecoder(reader, source, tokenizer=None, context_length=2)
    captions = []
    for start in range(0, len(reader), 4096):
        records = reader.read(list(range(start, min(start + 4096, len(reader)))))
        captions.extend(decode.caption(record) for record in records)
    return captions


def prepare_tokenizer(tokenizer_config, source, split: str, directory: str):
    """The configured tokenizer, or a BPE trained on the split's captions and saved once."""
    if tokenizer_config.path:
        return data_lib.load_tokenizer(tokenizer_config.path)
    saved = os.path.isfile(os.path.join(directory, "tokenizer_config.json"))
    if jax.process_index() == 0 and not saved:  # the run directory is shared by all processes
        captions = read_captions(source, split)
        tokenizer = data_lib.train_caption_tokenizer(
            captions, directory, tokenizer_config.vocab_size
        )
        print(f"trained a {len(tokenizer)}-token BPE on {len(captions)} captions -> {directory}")
        context = tokenizer_config.context_length
        longest, distinct, cut = data_lib.longest_caption(tokenizer, captions, context)
        if cut:  # a context sized to the data (configs/shapes.py) must not silently cut captions
            print(
                f"warning: {cut} of {distinct} distinct captions are longer than "
                f"config.tokenizer.context_length={context} tokens (the longest has {longest}) "
                f"and are cut; --config.tokenizer.context_length={longest} keeps them whole.",
                flush=True,
            )
    distributed.barrier("tokenizer ready")
    return data_lib.load_tokenizer(directory)


# ---------------------------------------------------------------------------------------------
# Models of each family
# ---------------------------------------------------------------------------------------------


def _model_config_error(error: ValueError, model_section) -> UserError:
    return UserError(
        f"config.model ({', '.join(f'{k}={v!r}' for k, v in model_section.items())}) does not "
        f"make a model: {error}. Fix the field it names with --config.model.FIELD=VALUE."
    )


def clip_model_config(config, tokenizer, image_size: int) -> models.CLIPConfig:
    try:
        return models.clip_config(
            config.model.variant,
            image_size=image_size,
            vocab_size=len(tokenizer),
            context_length=config.tokenizer.context_length,
            **models.recipe_fields(config, "clip"),
        )
    except ValueError as error:
        raise _model_config_error(error, config.model) from error


def save_model_config(workdir: str, family: str, model_config) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        record = {"family": family, "config": dataclasses.asdict(model_config)}
        path = os.path.join(workdir, MODEL_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        os.replace(path + ".tmp", path)  # atomic: a kill never leaves half a model.json


def load_model_config(run_dir: str) -> tuple[str, Any]:
    """(family, CLIPConfig or DiTConfig) of a run directory."""
    path = os.path.join(run_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{run_dir!r} is not a run directory of this project: it has no {MODEL_FILE}. "
            "Pass the --workdir of a finished train.py run."
        )
    config_classes = {"clip": models.CLIPConfig, "dit": models.DiTConfig}
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        family, fields = record["family"], dict(record["config"])
        if family not in config_classes:
            raise ValueError(f"family {family!r} is not one of {sorted(config_classes)}")
        for name in ("pixel_mean", "pixel_std"):
            if name in fields:
                fields[name] = tuple(fields[name])
        return family, config_classes[family](**fields)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        what = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise UserError(
            f"{path} does not describe a model of this project ({type(error).__name__}: {what}); "
            f"it was edited or comes from another version. Restore it from a copy, or delete "
            f"it and rerun the train.py command of this run, which writes it again."
        ) from error


def load_run_params(run_dir: str, model_config, model_cls) -> nnx.Module:
    """The exported (EMA) parameters of a run as a model on the default device."""
    abstract = nnx.eval_shape(lambda: model_cls(model_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    path = os.path.join(run_dir, PARAMS_DIR)
    if not os.path.isdir(path):
        raise UserError(
            f"{run_dir!r} has no exported parameters ({PARAMS_DIR}/): its training has not "
            "finished. Rerun train.py with that --workdir to finish it."
        )
    # Onto this process's first device, whatever mesh the run was trained on.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
    return nnx.merge(graphdef, checkpoints.load_params(path, target))


def load_text_encoder(checkpoint: str, execution: dict) -> models.CLIP:
    """A frozen CLIP: our run directory (model.json + params/) or a Hugging Face CLIP directory."""
    if not checkpoint or not os.path.isdir(checkpoint):
        raise UserError(
            f"config.text_encoder.checkpoint={checkpoint!r} is not a directory. Name a CLIP run "
            "directory of train.py or a Hugging Face CLIP directory (config.json + "
            "model.safetensors)."
        )
    if os.path.isfile(os.path.join(checkpoint, MODEL_FILE)):
        family, config = load_model_config(checkpoint)
        if family != "clip":
            raise UserError(
                f"{checkpoint!r} holds a {family} model; the text encoder must be CLIP."
            )
        return load_run_params(checkpoint, config, models.CLIP)
    from diffusion import hf

    return hf.load_hf_clip(checkpoint, **execution)


def dit_model_config(config, text_encoder: models.CLIP | None) -> models.DiTConfig:
    conditioning = "class" if config.model.num_classes > 0 else "text"
    extra = {}
    if conditioning == "text":
        extra = dict(
            context_dim=text_encoder.config.text_width,
            pooled_dim=text_encoder.config.embed_dim,
            word_conditioning=config.model.word_conditioning,
        )
    else:
        extra = dict(num_classes=config.model.num_classes)
    try:
        return models.dit_config(
            config.model.variant,
            conditioning=conditioning,
            output_conv=config.model.output_conv,
            **models.recipe_fields(config, "dit"),
            **extra,
        )
    except ValueError as error:
        raise _model_config_error(error, config.model) from error


@dataclasses.dataclass
class Task:
    """What one family needs from the loop."""

    family: str
    model_config: Any
    model_class: Any  # models.CLIP or models.DiT
    loss_fn: Any
    seed: int
    frozen: Any = None

    def init_model(self, model_config=None):
        """A new model of `model_config` (default: the task's own)."""
        return self.model_class(model_config or self.model_config, rngs=nnx.Rngs(self.seed))


def model_flops(task: Task, trainer: training.Trainer, batch) -> float | None:
    """Model FLOPs of one global train step, the MFU numerator: XLA's cost analysis of the
    LOWERED step of a twin of the model without scan or remat.

    Lowered, not compiled: the compiled SPMD program counts one device's share, and on a GPU its
    matmuls become cuBLAS calls that the analysis does not count. The twin (of the frozen text
    tower too): XLA counts a scanned block once, and remat's recomputation is not model work.
    Costs a trace, not a compile; the twin's weights are shapes only. A model that neither scans
    nor remats is its own twin: its step is lowered as it is, and that trace is the one the first
    step then compiles (jit caches it), so counting costs nothing extra.
    """
    plain = lambda config: dataclasses.replace(config, scan_layers=False, remat_policy="none")
    is_plain = lambda config: config == plain(config)
    if is_plain(task.model_config) and (task.frozen is None or is_plain(task.frozen.config)):
        with sharding.activate(trainer.mesh, trainer.rules):
            lowered = trainer.step_fn.lower(trainer.abstract_state, batch, trainer.frozen_state)
        return metrics.cost_analysis_flops(lowered)
    twin = training.Trainer(
        functools.partial(task.init_model, plain(task.model_config)),
        task.loss_fn,
        trainer.tx,
        trainer.mesh,
        seed=trainer.seed,
        rules=trainer.rules,
        ema_decay=trainer.ema_decay,
        nan_policy=trainer.nan_policy,
    )
    if task.frozen is not None:
        frozen_config = plain(task.frozen.config)
        twin.use_abstract_frozen(lambda: type(task.frozen)(frozen_config, rngs=nnx.Rngs(0)))
    with sharding.activate(twin.mesh, twin.rules):
        lowered = twin.step_fn.lower(twin.abstract_state, batch, twin.frozen_state)
    return metrics.cost_analysis_flops(lowered)


def make_task(config, tokenizer, image_size: int, mesh) -> Task:
    if config.family == "clip":
        model_config = clip_model_config(config, tokenizer, image_size)
        loss_fn = lambda model, frozen, batch, key: training.clip_loss(
            model, frozen, batch, key, kind=config.loss.kind, mesh=mesh, chunked=config.loss.chunked
        )
        return Task("clip", model_config, models.CLIP, loss_fn, config.seed)
    if config.model.num_classes:
        # The input pipeline yields captions of RGB images, not class ids or VAE latents.
        raise UserError(
            f"config.model.num_classes={config.model.num_classes}: train.py trains "
            "text-conditioned DiTs only; class-conditional recipes (configs/dit_xl2_imagenet.py) "
            "are for `train.py --aot_topology=...` (compile and cost, no data). Set "
            "config.model.num_classes=0 and caption the classes (config.data.label_key with "
            "config.data.caption_template) to train on a labelled dataset."
        )
    execution = dict(dtype=config.model.dtype)
    text_encoder = load_text_encoder(config.text_encoder.checkpoint, execution)
    model_config = dit_model_config(config, text_encoder)
    empty_tokens, empty_mask = data_lib.tokenize(tokenizer, [""], config.tokenizer.context_length)
    loss_fn = lambda model, frozen, batch, key: training.dit_loss(
        model,
        frozen,
        batch,
        key,
        objective=training.DiffusionObjective.from_config(config.diffusion),
        empty_tokens=empty_tokens,
        empty_mask=empty_mask,
        cond_dropout=config.diffusion.cond_dropout,
    )
    return Task("dit", model_config, models.DiT, loss_fn, config.seed, frozen=text_encoder)


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------


class PreemptionGuard:
    """Turns SIGTERM (what cloud TPUs send before preemption) into "save and exit after this step".

    With several processes, JAX's own preemption service decides, so that all hosts stop at the
    same step (`multihost_utils.reached_preemption_sync_point`).
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _check_batch(global_batch_size: int, mesh) -> None:
    size = int(np.prod([mesh.shape[a] for a in sharding.batch_axes(mesh)]))
    if global_batch_size % size or global_batch_size % jax.process_count():
        raise UserError(
            f"config.training.global_batch_size={global_batch_size} is not divisible by the "
            f"{size} devices of the mesh's batch axes {sharding.batch_axes(mesh)} (and the "
            f"{jax.process_count()} processes); use a multiple of {size}."
        )


def train(config, workdir: str, tokenizer_dir: str | None = None, devices=None) -> dict[str, Any]:
    """Trains one model (config.family "clip" or "dit") in `workdir`, resuming if possible.

    devices: the devices of the mesh (default: all of them).
    """
    os.makedirs(workdir, exist_ok=True)
    t = config.training
    if t.nan_policy not in training.NAN_POLICIES:
        raise UserError(f"config.training.nan_policy={t.nan_policy!r}; valid: stop, skip.")
    mesh = sharding.mesh_from_config(config.mesh, devices)
    _check_batch(t.global_batch_size, mesh)
    source, builder = prepare_source(config.data, config.seed)
    tokenizer = prepare_tokenizer(
        config.tokenizer,
        source,
        config.data.train_split,
        tokenizer_dir or os.path.join(workdir, TOKENIZER_DIR),
    )
    own_tokenizer_dir = os.path.join(workdir, TOKENIZER_DIR)
    if jax.process_index() == 0 and not os.path.isdir(own_tokenizer_dir):
        tokenizer.save_pretrained(own_tokenizer_dir)  # a run directory is self-contained
    if config.data.image_key not in builder.info.features:
        raise UserError(
            f"config.data.image_key={config.data.image_key!r} is not a feature of {source.name!r};"
            f" set it to one of {sorted(builder.info.features)}."
        )
    image_size = builder.info.features[config.data.image_key].shape[0]
    if config.family == "dit" and config.text_encoder.checkpoint:
        # Absolute, so that config.json still finds it from a sampling job elsewhere.
        config.text_encoder.checkpoint = os.path.abspath(config.text_encoder.checkpoint)
    task = make_task(config, tokenizer, image_size, mesh)
    tx = optim.make_optimizer(config.optimizer, total_steps=t.num_steps)  # checks, writes nothing
    check_resumable(workdir, task.family, task.model_config)
    checkpoints.write_config(workdir, config)
    save_model_config(workdir, task.family, task.model_config)

    trainer = training.Trainer(
        task.init_model,
        task.loss_fn,
        tx,
        mesh,
        seed=config.seed,
        ema_decay=t.ema_decay,
        nan_policy=t.nan_policy,
        frozen=task.frozen,
    )
    clip_loss = config.loss if task.family == "clip" else {}  # hard negatives are CLIP's
    data_iterator = data_lib.make_input_pipeline(
        source,
        tokenizer,
        split=config.data.train_split,
        global_batch_size=t.global_batch_size,
        seed=config.seed,
        context_length=config.tokenizer.context_length,
        worker_count=config.data.worker_count,
        hard_negative_attributes=tuple(clip_loss.get("hard_negative_attributes", ())),
        negative_caption_attributes=tuple(clip_loss.get("negative_caption_attributes", ())),
    )
    manager = checkpoints.make_checkpoint_manager(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=t.keep_checkpoints,
        keep_period=t.keep_period or None,
    )
    restored = checkpoints.restore_latest(
        manager, trainer.abstract_state, set_aside_unreadable=True
    )
    if restored is not None:
        state, start = restored.train_state, restored.step
        if restored.data_iterator_state is not None:
            data_iterator.set_state(restored.data_iterator_state)
        print(f"resumed from {restored.path} (step {start})", flush=True)
    else:
        state, start = trainer.init_state(), 0

    writer = metrics.MetricWriter(workdir)
    from diffusion import stages

    periodic = stages.PeriodicEvaluation(config, task, tokenizer, workdir, image_size)
    last = {}
    try:
        with PreemptionGuard() as preemption:
            state, last = _loop(
                config, task, trainer, state, start, data_iterator, manager, writer, preemption,
                mesh, periodic,
            )  # fmt: skip
        try:
            manager.wait_until_finished()
            if int(state["step"]) >= t.num_steps:
                params = state["ema"] if state["ema"] is not None else state["params"]
                if jax.process_index() == 0 or jax.process_count() > 1:
                    checkpoints.export_params(os.path.join(workdir, PARAMS_DIR), params)
        except OSError as error:
            raise write_failed(error, manager) from error
    finally:
        manager.close()
        writer.close()
    return last


# Model config fields that change how it runs, not its parameters: a run may resume with others.
EXECUTION_FIELDS = ("dtype", "remat_policy", "attention_impl")


def check_resumable(workdir: str, family: str, model_config) -> None:
    """Refuses, before anything is written, a config whose model differs from the one of the
    checkpoints in `workdir` (it would fail deep inside the restore, or mix two models)."""
    steps_dir = os.path.join(workdir, "checkpoints")
    has_steps = os.path.isdir(steps_dir) and any(n.isdigit() for n in os.listdir(steps_dir))
    if not has_steps or not os.path.isfile(os.path.join(workdir, MODEL_FILE)):
        return
    saved_family, saved = load_model_config(workdir)
    old, new = dataclasses.asdict(saved), dataclasses.asdict(model_config)
    changed = [
        f"{name}: {old.get(name)!r} -> {value!r}"
        for name, value in new.items()
        if name not in EXECUTION_FIELDS and old.get(name) != value
    ]
    if saved_family != family:
        changed.insert(0, f"family: {saved_family!r} -> {family!r}")
    if changed:
        raise UserError(
            f"{workdir!r} holds checkpoints of another model than this config makes "
            f"({'; '.join(changed)}), so it cannot resume them; they are left untouched. Pass a "
            "new --workdir for this model, or rerun with the config the run started with "
            f"(saved in {os.path.join(workdir, checkpoints.CONFIG_FILENAME)})."
        )


def write_failed(error: OSError, manager) -> UserError:
    """A checkpoint that could not be written (disk full, quota, permissions), for a person."""
    directory = os.fspath(manager.directory)
    complete = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    kept = (
        f"the last complete checkpoint, {os.path.join(directory, str(complete[-1]))}, is intact"
        if complete
        else "there is no complete checkpoint yet"
    )
    return UserError(
        f"could not write a checkpoint: {error}. Training stopped; {kept}. Free disk space (or "
        f"fix the permissions) under {directory} and rerun the same command to resume from it."
    )


def _loop(
    config, task, trainer, state, start, data_iterator, manager, writer, preemption, mesh, periodic
):
    t = config.training
    num_devices = mesh.devices.size
    step_flops = peak = None
    last = {}
    window_start, window_steps = time.perf_counter(), 0
    progress = tqdm.tqdm(
        total=t.num_steps,
        initial=start,
        desc=f"train {config.family}",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    for step in range(start, t.num_steps):
        batch = data_lib.to_global_batch(next(data_iterator), mesh)
        if step_flops is None and step == start:
            step_flops = model_flops(task, trainer, batch)
            peak = metrics.peak_flops_per_device()
            window_start = time.perf_counter()
        state, step_metrics = trainer.step(state, batch)
        window_steps += 1
        done = step + 1
        stop = preemption.should_stop(done)
        is_last = done == t.num_steps or stop
        held_out = periodic(trainer, state, done) if periodic.enabled(done) else {}
        if held_out and not (done % t.log_every == 0 or is_last):
            writer.write_scalars(done, held_out)
        if done % t.log_every == 0 or is_last:
            scalars = jax.device_get(step_metrics)  # the hosts' only sync point
            elapsed = time.perf_counter() - window_start
            _check_finite(config, scalars, done, manager)
            scalars = {k: v for k, v in scalars.items() if k != "finite"}
            scalars["step_time"] = elapsed / window_steps
            scalars["examples_per_second"] = t.global_batch_size * window_steps / elapsed
            if step_flops:
                scalars["mfu"] = step_flops / scalars["step_time"] / (peak * num_devices)
            scalars.update(held_out)
            writer.write_scalars(done, scalars)
            progress.set_postfix(
                loss=f"{scalars['loss']:.4f}", ex_s=f"{scalars['examples_per_second']:.0f}"
            )
            last = {"step": done, **{k: float(v) for k, v in scalars.items()}}
            window_start, window_steps = time.perf_counter(), 0
        if done % t.checkpoint_every == 0 or is_last:
            try:
                checkpoints.save_checkpoint(
                    manager,
                    done,
                    state,
                    data_iterator_state=data_iterator.get_state(),
                    metadata={"family": config.family},
                    force=True,
                )
            except OSError as error:
                raise write_failed(error, manager) from error
        progress.update(1)
        if stop:
            print(f"preemption requested: saved step {done}, exiting", flush=True)
            break
    progress.close()
    return state, last


def _check_finite(config, scalars, step: int, manager) -> None:
    if config.training.nan_policy == "skip":
        return
    if not (bool(scalars["finite"]) and np.isfinite(scalars["param_norm"])):
        latest = manager.latest_step()
        where = checkpoints.step_path(manager, latest) if latest is not None else "none yet"
        raise NonFiniteError(
            f"non-finite loss or gradients by step {step} (loss={float(scalars['loss'])}, "
            f"grad_norm={float(scalars['grad_norm'])}). Last good checkpoint: {where}. Lower the "
            "learning rate or set --config.training.nan_policy=skip to skip such updates."
        )
