"""The training loop behind train.py: data, model, sharded state, checkpoints, logs, preemption.

`train(config, workdir)` trains the model family that `config.family` names (the registry of
`diffusion.families`), resuming from the latest complete checkpoint in `workdir`, and writes the
run directory (`diffusion.rundir`). Periodic work during training (held-out metrics, sample
grids) comes in as callbacks, so this layer never imports evaluation or sampling.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
import tqdm
from flax import nnx

from diffusion import checkpoints, families, meshes, metrics, optim, param_export, rundir, sharding
from diffusion import data as data_lib
from diffusion.data.selection import selected_records
from diffusion.data.tokenizer import save_tokenizer
from diffusion.errors import NonFiniteError, UserError
from diffusion.train_step import NAN_POLICIES, TrainStep
from diffusion.training import inputs
from diffusion.training.flops import model_flops
from diffusion.training.preemption import PreemptionGuard


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a callback may read of the run it is called from."""

    config: Any
    workdir: str
    build: families.ModelBuild
    train_step: TrainStep
    tokenizer: Any
    image_size: int
    frozen: nnx.Module | None  # the loss's read-only model (a DiT's text encoder), if any


class Callback(Protocol):
    """Periodic work during training: `enabled(step)` says when; the call returns scalars to log
    (or none) after the update of step `step`."""

    def enabled(self, step: int) -> bool: ...

    def __call__(self, context: RunContext, state: dict, step: int) -> dict[str, float]: ...


# The families whose loss may read a frozen text tower (config.text_encoder.checkpoint).
TEXT_ENCODER_FAMILIES = ("dit", "video_dit")


def text_encoder_tokenizer(config) -> str | None:
    """The tokenizer directory of the frozen text encoder the recipe's loss reads, unless the
    recipe names a tokenizer (config.tokenizer.path): the captions must become the token ids the
    encoder learnt, not those of a BPE trained afresh. None: no text encoder. Refuses, before
    anything is written, a context longer than the encoder's."""
    if not reads_text_tower(config):
        return None
    checkpoint = config.text_encoder.checkpoint
    context = rundir.text_encoder_context_length(checkpoint)
    if config.tokenizer.context_length > context:
        raise UserError(
            f"config.tokenizer.context_length={config.tokenizer.context_length} is longer than "
            f"the {context} tokens the text encoder {checkpoint!r} reads; pass "
            f"--config.tokenizer.context_length={context} (or less)"
        )
    return None if config.tokenizer.path else rundir.text_encoder_tokenizer(checkpoint)[0]


def reads_text_tower(config) -> bool:
    """Whether the recipe's model is conditioned on a frozen text tower's states."""
    family = families.get(config.family)
    return config.family in TEXT_ENCODER_FAMILIES and family.is_text_conditional(config)


def build_on(config, facts: families.DataFacts, mesh, text_config=None) -> families.ModelBuild:
    """The family's build of the recipe; `text_config`: the frozen text tower's config, for a
    recipe that `reads_text_tower` (ignored otherwise)."""
    family = families.get(config.family)
    if config.family not in TEXT_ENCODER_FAMILIES:
        return family.build(config, facts, mesh)
    return family.build(config, facts, mesh, text_config if reads_text_tower(config) else None)


def build_model(config, facts: families.DataFacts, mesh) -> tuple[families.ModelBuild, Any]:
    """(the family's build of the recipe, the loaded frozen model or None)."""
    if not reads_text_tower(config):  # no text, or class ids: no frozen model
        return build_on(config, facts, mesh), None
    text_encoder = rundir.load_text_encoder(
        config.text_encoder.checkpoint, dict(dtype=config.model.dtype)
    )
    return build_on(config, facts, mesh, text_encoder.config), text_encoder


def train(
    config,
    workdir: str,
    tokenizer_dir: str | None = None,
    devices=None,
    *,
    callbacks: Sequence[Callback] = (),
    preemption: PreemptionGuard | None = None,
) -> dict[str, Any]:
    """Trains the model of config.family ("clip", "dit", "video_dit" or "autoencoder") in
    `workdir`, resuming if possible; returns the last logged metrics.

    tokenizer_dir: where the tokenizer is trained or read (default WORKDIR/tokenizer).
    devices: the devices of the mesh (default: all of them).
    preemption: the guard whose SIGTERM stops the run after a step, saved (default: a new one).
    """
    os.makedirs(workdir, exist_ok=True)
    t = config.training
    if t.nan_policy not in NAN_POLICIES:
        raise UserError(f"config.training.nan_policy={t.nan_policy!r}; valid: stop, skip.")
    tx = optim.make_optimizer(config.optimizer, total_steps=t.num_steps)  # checks, writes nothing
    family = families.get(config.family)
    mesh = meshes.mesh_from_config(config.mesh, devices)
    sharding.rules_from_config(config.mesh)  # a bad rule is named before any work
    families.check_global_batch(t.global_batch_size, mesh)
    input_options = family.input_options(config)
    source, builder = inputs.prepare_source(config.data, config.seed)
    if source.where:  # a filter that keeps nothing fails now, not after the model is loaded ...
        checked = config.data.eval_splits[:1] if t.eval_every else ()  # ... or at the first check
        for split in (config.data.train_split, *checked):
            selected_records(source, split)
    classes = None
    if input_options.get("class_features") is not None:  # checked before any file is written
        classes = inputs.class_space(config, builder, source.name, input_options["class_features"])
    image_size, channels = inputs.image_shape_of(config, source, builder)
    frames = inputs.frames_of(source, builder)
    families.check_inputs(config.family, frames, source.name)
    tokenizer = own_tokenizer_dir = None
    if input_options.get("captions", True):  # a model without text needs no tokenizer
        own_tokenizer_dir = rundir.tokenizer_dir(workdir)
        encoder_tokenizer_dir = text_encoder_tokenizer(config)
        tokenizer = inputs.prepare_tokenizer(
            config.tokenizer,
            source,
            config.data.train_split,
            tokenizer_dir or encoder_tokenizer_dir or own_tokenizer_dir,
        )
    if config.family in TEXT_ENCODER_FAMILIES and config.text_encoder.checkpoint:
        # Absolute, so that config.json still finds it from a sampling job elsewhere.
        config.text_encoder.checkpoint = os.path.abspath(config.text_encoder.checkpoint)
    empty_text = inputs.cached_text(config, source, builder, tokenizer)
    inputs.check_stated_cached_text(config, builder.data_dir, empty_text)
    facts = inputs.data_facts(config, tokenizer, image_size, channels, empty_text, frames)
    build, frozen = build_model(config, facts, mesh)
    rundir.check_resumable(workdir, build.family, build.model_config)
    # A tokenizer read from elsewhere is copied in once every check has passed, so that a refused
    # run leaves no file a fixed rerun would keep (a BPE trained here was saved when trained).
    if tokenizer is not None and jax.process_index() == 0 and not os.path.isdir(own_tokenizer_dir):
        save_tokenizer(tokenizer, own_tokenizer_dir)  # a run directory is self-contained
    checkpoints.write_config(workdir, config)
    rundir.save_model_config(workdir, build.family, build.model_config)
    if classes is not None:
        rundir.save_classes(workdir, classes)
    if source.latents is not None:
        rundir.save_latents(workdir, source.latents)

    # The text tower stays loaded for sampling callbacks; cached text features keep it out of
    # the step (the build then has no frozen model).
    train_step = build.train_step(
        config, mesh, tx, frozen if build.frozen_config is not None else None
    )
    data_iterator = data_lib.make_input_pipeline(
        source,
        tokenizer,
        split=config.data.train_split,
        global_batch_size=t.global_batch_size,
        seed=config.seed,
        context_length=config.tokenizer.context_length if tokenizer is not None else 0,
        worker_count=config.data.worker_count,
        **input_options,
    )
    manager = checkpoints.make_checkpoint_manager(
        os.path.join(workdir, rundir.CHECKPOINTS_DIR),
        max_to_keep=t.keep_checkpoints,
        keep_period=t.keep_period or None,
    )
    restored = checkpoints.restore_latest(
        manager, train_step.abstract_state, set_aside_unreadable=True
    )
    if restored is not None:
        state, start = restored.train_state, restored.step
        if restored.data_iterator_state is not None:
            data_iterator.set_state(restored.data_iterator_state)
        print(f"resumed from {restored.path} (step {start})", flush=True)
    else:
        base = build.base_params() if build.base_params is not None else None
        state, start = train_step.init_state(base), 0

    context = RunContext(config, workdir, build, train_step, tokenizer, image_size, frozen)
    writer = metrics.MetricWriter(workdir, resume_step=start)  # drops records a kill left
    last = {}
    guard = preemption if preemption is not None else PreemptionGuard()
    try:
        with guard:
            state, last = _loop(
                context, state, start, data_iterator, manager, writer, guard, callbacks
            )
        checkpoints.finish_writes(manager)
        step = int(state["step"])
        if step >= t.num_steps and (jax.process_index() == 0 or jax.process_count() > 1):
            params = state["ema"] if state["ema"] is not None else state["params"]
            # A finished run's rerun finds the same export and leaves its files untouched.
            param_export.export_params(os.path.join(workdir, rundir.PARAMS_DIR), params, step=step)
            if build.export is not None and jax.process_index() == 0:
                build.export(train_step.model(params), workdir)
    finally:
        checkpoints.close_manager(manager)
        writer.close()
    return last


def _loop(context: RunContext, state, start, data_iterator, manager, writer, preemption, callbacks):
    config, train_step = context.config, context.train_step
    t = config.training
    mesh = train_step.mesh
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
            step_flops = model_flops(context.build, train_step, batch)
            peak = metrics.peak_flops_per_device()
            window_start = time.perf_counter()
        state, step_metrics = train_step.step(state, batch)
        window_steps += 1
        done = step + 1
        stop = preemption.should_stop(done)
        is_last = done == t.num_steps or stop
        held_out = {}
        for callback in callbacks:
            if callback.enabled(done):
                held_out.update(callback(context, state, done))
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
            checkpoints.save_checkpoint(  # a failed write says which checkpoint is intact
                manager,
                done,
                state,
                data_iterator_state=data_iterator.get_state(),
                metadata={"family": config.family},
                force=True,
            )
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
