"""Bad inputs across train.py, sample.py, evaluate.py and the Python API: one table, one row each.

Every row gives a bad input and the words its error must contain: what is wrong (the bad value or
file) and how to fix it. Library rows call the functions the entry points call and expect a
UserError (ValueError for model and array code that has no CLI); `cli` rows run the real entry
point and expect exit status 2, the message as one paragraph, and no Python traceback. After
every row the trained run is unchanged on disk (names, sizes, mtimes); rows that resume copies
of it check that the checkpoints there survive byte for byte, and the disk-full row that the
same command, rerun, resumes from the checkpoint before the failed save.

Categories of the table:
  config        unknown override keys and sections, wrong value types, overriding a section or
                a value's field, unknown or non-Python --config files, a file without
                get_config, unknown recipe arguments, a flag without a value
  setup         mesh shapes that do not fit 8 devices, a batch the data axis does not divide,
                unknown family / flow prediction type / nan policy / model variant / dtype,
                warmup >= steps (and no stale config.json after it), a text encoder that is not
                there, a bad model field in a stage of the default pipeline (the hint names
                --config.clip.model; a later stage's is refused before the first trains)
  run dirs      missing checkpoint, a directory that is no run, a CLIP run given to sampling,
                malformed or incomplete config.json / model.json, a DiT whose text encoder
                moved, an unfinished run, resuming a run with a model of another width (the
                checkpoint stays untouched), disk full while saving (the earlier checkpoint
                restores and the rerun resumes from it)
  weights       Hugging Face directories: pickle-only, no config.json, malformed config.json,
                not a CLIP model, a pickle-only directory named as a DiT's text encoder
  sampling      unknown sampler, a sampler of the other objective, steps 0 / negative / not an
                integer, guidance scale NaN / inf / a string, negative and too large seeds,
                negative eta and shift, batch size 0, bad settings with existing samples (kept)
  prompt files  bad JSON line (with its number), unknown fields, empty file, non-UTF-8 bytes,
                a missing file, a line that is no object, a NaN guidance scale, a prompt far
                longer than the context (a warning and truncation, not an error)
  arrays        float / wrongly shaped / non-square images to the shapes oracle and the CLIP
                encoder, one string where a list is expected, wrong sizes and channels for the
                CLIP and DiT models, too many tokens
  data          a data_dir that is a file, an unknown TFDS name, an unprepared dataset, an
                unknown split, an unknown evaluation split of the default pipeline (refused
                before its first stage trains), an unknown image feature
  evaluation    zero samples, a negative guidance scale, a sampler with zero steps, a CLIP run
                as --feature_autoencoder
  latents       encode.py with a missing autoencoder or a CLIP run as one, zero examples per
                shard, an unfinished latent dataset, a malformed latents.json, a latent DiT whose
                autoencoder is gone, a 4-channel DiT without latents.json, a pipeline's encode
                stage before its autoencoder or its CLIP
  cli           a representative row of each entry point: unknown --config file, unknown
                recipe argument, --config without a value, a flag that does not parse, a mesh
                that does not fit, a CLIP run given to sample.py, a non-UTF-8 prompt file, a run
                whose config.json is malformed
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_evaluate import _tiny

from configs import base_dit, common, shapes_latent
from configs import shapes as shapes_recipe
from diffusion import (
    checkpoints,
    encoding,
    evaluation,
    hf,
    inference,
    meshes,
    models,
    param_export,
    pipeline,
    rundir,
    training,
)
from diffusion import config as config_lib
from diffusion.data import latents as data_latents
from diffusion.data import load_tokenizer
from diffusion.errors import UserError
from diffusion.families import dit as dit_family

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "base_clip.py")


# ---------------------------------------------------------------------------------------------
# What the rows work on: one tiny trained CLIP run, and things built from it on demand
# ---------------------------------------------------------------------------------------------


class Env:
    """The module's trained CLIP run and lazily built helpers that the rows share."""

    def __init__(self, root: str, clip_dir: str, data_dir: str):
        self.root, self.clip_dir, self.data_dir = root, clip_dir, data_dir

    def clip_config(self, **changes) -> ml_collections.ConfigDict:
        """The config the run was trained with, plus `changes` (section__field=value)."""
        config = _tiny("clip", self.data_dir)
        config.training.checkpoint_every = 1
        config.tokenizer.path = os.path.join(self.clip_dir, "tokenizer")
        for key, value in changes.items():
            *parents, leaf = key.split("__")
            node = config
            for name in parents:
                node = node[name]
            node[leaf] = value
        return config

    @functools.cached_property
    def text_encoder(self) -> models.CLIP:
        _, clip_config = rundir.load_model_config(self.clip_dir)
        return rundir.load_run_params(self.clip_dir, clip_config, models.CLIP)

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(os.path.join(self.clip_dir, "tokenizer"))

    @functools.cached_property
    def dit(self) -> models.DiT:
        """A one-block DiT with zero weights (no initialiser runs: the rows only need shapes)."""
        config = models.dit_config("tiny", depth=1, context_dim=128, pooled_dim=128)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: models.DiT(config, rngs=nnx.Rngs(0))))
        return nnx.merge(graphdef, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state))

    @functools.cached_property
    def pipeline(self) -> inference.TextToImage:
        """A flow DiT (zero weights) on the run's text tower: for the sampling API's checks."""
        return inference.TextToImage(
            dit=self.dit,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            diffusion_config=ml_collections.ConfigDict(
                {"objective": "flow", "prediction_type": "epsilon", "shift": 1.0}
            ),
            context_length=32,
            resolution=16,
            mesh=meshes.make_mesh({"data": 1}, jax.devices()[:1]),
        )

    @functools.cached_property
    def encoder(self) -> evaluation.ClipEncoder:
        return evaluation.ClipEncoder.load(self.clip_dir, batch_size=4)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    """Trains the run while the cli rows that do not need it run, two processes at a time (each
    spends most of its time importing jax); the others start once the run exists."""
    root = tmp_path_factory.mktemp("bad_inputs")
    data_dir, clip_dir = str(root / "data"), str(root / "clip")
    rows = [case for case in CASES if case.program]
    tmps = {case.id: tmp_path_factory.mktemp(case.id) for case in rows}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {c.id: pool.submit(run_cli, c, None, tmps[c.id]) for c in rows if not c.needs_run}
    config = _tiny("clip", data_dir)
    config.training.checkpoint_every = 1  # steps 1 and 2: the disk-full row resumes from 1
    training.train(config, clip_dir, devices=jax.devices()[:1])
    env = Env(str(root), clip_dir, data_dir)
    env.run_state = tree_state(clip_dir)
    for case in rows:
        if case.needs_run:
            futures[case.id] = pool.submit(run_cli, case, env, tmps[case.id])
    pool.shutdown(wait=False)
    env.cli_results = futures
    return env


def run_cli(case, env: Env | None, tmp) -> subprocess.CompletedProcess:
    argv = [sys.executable, case.program, *case.call(env, tmp)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180)


def tree_state(directory: str) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `directory`: cheap, and any write changes it."""
    state = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            stat = os.stat(os.path.join(parent, name))
            state[os.path.relpath(os.path.join(parent, name), directory)] = (
                stat.st_size,
                stat.st_mtime_ns,
            )
    return state


def tree_hashes(directory: str) -> dict[str, str]:
    hashes = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def write(path, text: str | bytes) -> str:
    path = str(path)
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


# ---------------------------------------------------------------------------------------------
# Helpers the rows call
# ---------------------------------------------------------------------------------------------


def train_with(env: Env, tmp, devices: int = 1, **changes):
    """trainer.train of the run's config with `changes` (section__field=value), in a fresh
    workdir, on the first `devices` devices."""
    config = env.clip_config(**changes)
    return training.train(config, str(tmp / "run"), devices=jax.devices()[:devices])


def pipeline_with(env: Env, tmp, **changes):
    """The default pipeline's CLIP stage alone, on the run's config with `changes`."""
    config = shapes_recipe.get_config("runlocal")
    config.clip = env.clip_config(mesh__data=-1, **changes)  # the pipeline takes all devices
    config.stages = ("clip",)
    return pipeline.train_and_evaluate(config, str(tmp / "pipeline"))


def pipeline_evaluating(env: Env, tmp, splits, recipe=shapes_recipe, **dit_changes):
    """A pipeline `recipe` (runlocal) on the run's data, evaluating `splits`, its DiT stage with
    `dit_changes` (section__field=value); checks that a refusal comes before any stage trained."""
    config = recipe.get_config("runlocal")
    config.data = env.clip_config().data
    trained = [stage for stage in config.stages if stage in pipeline.runner.TRAINING_STAGES]
    for stage in trained:
        config[stage].data = config.data
    config.evaluate.splits = splits
    for key, value in dit_changes.items():
        *parents, leaf = key.split("__")
        functools.reduce(lambda node, name: node[name], parents, config.dit)[leaf] = value
    workdir = tmp / "pipeline"
    try:
        return pipeline.train_and_evaluate(config, str(workdir))
    finally:
        for stage in trained:
            assert not os.path.exists(workdir / stage / "checkpoints"), stage


def small_run_copy(env: Env, tmp, edit_config=None, model_json: str | None = None) -> str:
    """The run's model.json and config.json (no weights) in a new directory, optionally edited."""
    run = str(tmp / "copy")
    os.makedirs(run)
    for name in ("model.json", "config.json"):
        shutil.copy(os.path.join(env.clip_dir, name), run)
    if model_json is not None:
        write(os.path.join(run, "model.json"), model_json)
    if edit_config is not None:
        path = os.path.join(run, "config.json")
        with open(path) as f:
            text = f.read()
        write(path, edit_config(text))
    return run


def without(*keys: str) -> Callable[[str], str]:
    """A config.json edit that deletes dotted `keys`."""

    def edit(text: str) -> str:
        record = json.loads(text)
        for key in keys:
            *parents, leaf = key.split(".")
            node = record
            for name in parents:
                node = node[name]
            del node[leaf]
        return json.dumps(record)

    return edit


def dit_run(env: Env, tmp, **config_changes) -> str:
    """A DiT run directory as train.py writes it (model.json, config.json), before its weights;
    its text encoder is the module's CLIP run. `config_changes`: dotted key -> value, or None to
    delete the key."""
    run = str(tmp / "dit")
    rundir.save_model_config(run, "dit", env.dit.config)
    config = base_dit.get_config()
    config.text_encoder.checkpoint = env.clip_dir
    config.tokenizer.path = os.path.join(env.clip_dir, "tokenizer")
    record = json.loads(config_lib.to_json(config))
    for key, value in config_changes.items():
        *parents, leaf = key.split(".")
        node = record
        for name in parents:
            node = node[name]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    write(os.path.join(run, "config.json"), json.dumps(record))
    return run


def small_vocab_clip(env: Env, tmp) -> str:
    """A CLIP run directory (model.json, params/) whose text tower embeds 64 tokens only."""
    run = str(tmp / "small_vocab_clip")
    config = models.clip_config("tiny", vocab_size=64, context_length=16, image_size=16)
    rundir.save_model_config(run, "clip", config)
    abstract = nnx.eval_shape(lambda: models.CLIP(config, rngs=nnx.Rngs(0)))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.state(abstract))
    param_export.export_params(os.path.join(run, rundir.PARAMS_DIR), zeros)
    return run


def evaluate(run: str, tmp, **options):
    options = evaluation.EvaluationOptions(**{"num_samples": 4, "batch_size": 4, **options})
    return evaluation.evaluate_checkpoint(run, str(tmp / "eval"), options)


def hf_dir(tmp, files: dict[str, str | bytes]) -> str:
    directory = tmp / "hf"
    directory.mkdir()
    for name, content in files.items():
        write(directory / name, content)
    return str(directory)


HF_CONFIG = json.dumps({"model_type": "clip", "text_config": {}, "vision_config": {}})


def prompts(tmp, name: str, content: str | bytes, **kwargs):
    return inference.read_prompt_file(write(tmp / name, content), **kwargs)


def generate(env: Env, **kwargs):
    return env.pipeline.generate(["a red circle"], **{"steps": 2, **kwargs})


def resume_with_another_width(env: Env, tmp):
    """Resumes a copy of the run with a CLIP of another width: refused before any write."""
    run = str(tmp / "run")
    shutil.copytree(env.clip_dir, run)
    before = tree_hashes(run)
    try:
        training.train(env.clip_config(model__variant="B/16"), run, devices=jax.devices()[:1])
    finally:
        assert tree_hashes(run) == before  # checkpoints, params, model.json: byte for byte


def disk_full_on_save(env: Env, tmp, monkeypatch):
    """A run stopped after step 1 resumes; writing checkpoint 2 fails with ENOSPC."""
    run = str(tmp / "run")
    shutil.copytree(env.clip_dir, run)
    shutil.rmtree(os.path.join(run, "checkpoints", "2"))

    def disk_full(self, directory, args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(directory))

    monkeypatch.setattr(checkpoints.ProcessLocalJsonHandler, "save", disk_full)
    training.train(env.clip_config(), run, devices=jax.devices()[:1])


def disk_full_after(env: Env, tmp, monkeypatch, capsys):
    """Checkpoint 1 is intact; with space again the same command resumes from it and finishes."""
    run = str(tmp / "run")
    step_1 = os.path.join(run, "checkpoints", "1")
    assert tree_hashes(step_1) == tree_hashes(os.path.join(env.clip_dir, "checkpoints", "1"))
    monkeypatch.undo()
    capsys.readouterr()
    training.train(env.clip_config(), run, devices=jax.devices()[:1])
    assert f"resumed from {step_1} (step 1)" in capsys.readouterr().out
    assert {"1", "2"} <= set(os.listdir(os.path.join(run, "checkpoints")))


def samples_kept(env: Env, tmp):
    """An existing sample directory, then a call with a bad setting: every file is still there."""
    out = tmp / "samples"
    out.mkdir()
    write(out / "00001_000.png", b"\x89PNG earlier sample")
    write(out / "manifest.jsonl", '{"file": "00001_000.png"}\n')
    before = tree_hashes(str(out))
    items = prompts(tmp, "p.txt", "a red circle\n")
    try:
        inference.sample_to_directory(env.pipeline, items, str(out), steps=0)
    finally:
        assert tree_hashes(str(out)) == before


def long_prompt(env: Env, tmp):
    """A prompt of ~1350 tokens for a context of 32: read, then truncated with a warning."""
    items = prompts(tmp, "long.txt", "a red circle " * 150 + "\n")
    tokens, mask = env.pipeline.tokenize([items[0].prompt])
    assert tokens.shape == (1, 32) and mask.all()  # the context is full, nothing more


def objective_with(**diffusion_fields):
    """The DiT objective of base_dit's config.diffusion with some fields changed."""
    fields = base_dit.get_config().diffusion.to_dict() | diffusion_fields
    return dit_family.DiffusionObjective.from_config(ml_collections.ConfigDict(fields))


def no_stale_config(env: Env, tmp, *, run=None):
    """A run refused by validation writes no config.json, model.json or copy of its tokenizer
    that a fixed rerun would keep."""
    run = tmp / "run" if run is None else run
    for name in ("config.json", "model.json", "tokenizer"):
        assert not os.path.exists(run / name), name


def float_images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


def encode_with(autoencoder: str, tmp) -> str:
    options = encoding.EncodeOptions(output_dir=str(tmp / "latents"))
    return encoding.encode_dataset(autoencoder, common.data_config(), 0, options)


def latent_run_dir(tmp, latents_json: str | None, in_channels: int = 4) -> str:
    """A DiT run directory of model.json (a DiT over `in_channels`) and, if given, latents.json."""
    run = str(tmp / "latent_dit")
    config = models.dit_config("tiny", conditioning="class", num_classes=5, in_channels=in_channels)
    rundir.save_model_config(run, "dit", config)
    if latents_json is not None:
        write(os.path.join(run, rundir.LATENTS_FILE), latents_json)
    return run


LATENTS_JSON = json.dumps(
    dict(
        autoencoder="/nonexistent/autoencoder",
        scaling_factor=0.5,
        shift_factor=0.0,
        latent_shape=[8, 8, 4],
        downsampling_factor=2,
    )
)


def workdir_with_trained(workdir, *stages: str) -> str:
    """`workdir` with an empty WORKDIR/<stage>/params of each stage: what a pipeline's stage
    checks for a trained run before it reads one."""
    for stage in stages:
        os.makedirs(os.path.join(workdir, stage, "params"))
    return str(workdir)


def shapes_latent_config(data_dir: str) -> ml_collections.ConfigDict:
    config = config_lib.load_config(os.path.join(REPO, "configs", "shapes_latent.py"))
    config.data.data_dir = data_dir
    return config


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    call: Callable  # (env, tmp[, monkeypatch]): makes the bad call; cli rows: returns argv
    words: tuple[str, ...]  # each must appear in the message (the problem and the fix)
    error: type | None = UserError  # None: a warning with `words`, and no error
    after: Callable | None = None  # (env, tmp[, monkeypatch, capsys]) -> checks after the row
    program: str | None = None  # cli rows: the entry point
    needs_run: bool = False  # cli rows: whether `call` needs the trained run (else env is None)


def cli(id: str, program: str, argv: Callable, words: tuple, needs_run: bool = False) -> Case:
    return Case(id, argv, words, program=program, needs_run=needs_run)


A = "a red circle"
NOT_UTF8 = b"a red \xe9circle"  # Latin-1, not UTF-8
CASES = [
    # -- config --------------------------------------------------------------------------------
    Case(
        "config-unknown-key",
        lambda e, t: config_lib.load_config(RECIPE, [("optimizer.learnin_rate", "1")]),
        ("'optimizer.learnin_rate'", "Did you mean 'learning_rate'?"),
    ),
    Case(
        "config-unknown-section",
        lambda e, t: config_lib.load_config(RECIPE, [("optimiser.learning_rate", "1")]),
        ("no field 'optimiser'", "Did you mean 'optimizer'?"),
    ),
    Case(
        "config-int-not-int",
        lambda e, t: config_lib.load_config(RECIPE, [("training.num_steps", "ten")]),
        ("--config.training.num_steps='ten' is not a valid integer", "--config.x=8"),
    ),
    Case(
        "config-float-not-number",
        lambda e, t: config_lib.load_config(RECIPE, [("optimizer.learning_rate", "fast")]),
        ("'fast' is not a valid number", "--config.x=1e-4"),
    ),
    Case(
        "config-bool-not-bool",
        lambda e, t: config_lib.load_config(RECIPE, [("model.scan_layers", "maybe")]),
        ("'maybe' is not a valid boolean", "--config.x=true"),
    ),
    Case(
        "config-sets-a-section",
        lambda e, t: config_lib.load_config(RECIPE, [("mesh", "4")]),
        ("--config.mesh names a whole section", "data, dcn_data, fsdp, rules, sequence, tensor"),
    ),
    Case(
        "config-field-of-a-value",
        lambda e, t: config_lib.load_config(RECIPE, [("seed.x", "1")]),
        ("'config.seed' is a value, not a section",),
    ),
    Case(
        "config-file-missing",
        lambda e, t: config_lib.load_config("configs/nope.py"),
        ("'configs/nope.py' does not exist", "--config=configs/NAME.py", "configs/shapes.py"),
    ),
    Case(
        "config-file-not-python",
        lambda e, t: config_lib.load_config(os.path.join(REPO, "README.md")),
        ("README.md' does not exist or is not a .py file", "--config=configs/NAME.py"),
    ),
    Case(
        "config-file-without-get-config",
        lambda e, t: config_lib.load_config(write(t / "recipe.py", "X = 1\n")),
        ("recipe.py' defines no get_config(arg) function",),
    ),
    Case(
        "config-unknown-argument",  # fixed: was silently ignored (a full-size run)
        lambda e, t: config_lib.load_config(RECIPE + ":bogus"),
        ("Config argument 'bogus'", "silently ignored", "one of runlocal"),
    ),
    Case(
        "config-flag-without-value",
        lambda e, t: config_lib.split_config_flags(["train.py", "--config.seed"]),
        ("--config.seed needs a value", "--config.seed=VALUE"),
    ),
    # -- setup ---------------------------------------------------------------------------------
    Case(
        "mesh-fsdp-3-on-8-devices",  # fixed: was a ValueError from deep in sharding
        lambda e, t: train_with(e, t, devices=8, mesh__data=-1, mesh__fsdp=3),
        ("config.mesh", "'fsdp': 3", "does not fit the 8 devices", "multiply to 8"),
    ),
    Case(
        "mesh-two-free-axes",  # fixed
        lambda e, t: train_with(e, t, devices=8, mesh__data=-1, mesh__fsdp=-1),
        ("several -1 entries", "--config.mesh.data=-1"),
    ),
    Case(
        "mesh-more-devices-than-there-are",  # fixed
        lambda e, t: train_with(e, t, devices=8, mesh__data=16),
        ("'data': 16", "has 16 devices but 8 are available", "multiply to 8"),
    ),
    Case(
        "batch-not-divisible-by-data-axis",
        lambda e, t: train_with(e, t, 8, training__global_batch_size=12, mesh__data=-1),
        ("global_batch_size=12 is not divisible by the 8 devices", "use a multiple of 8"),
    ),
    Case(
        "unknown-family",
        lambda e, t: pipeline.train_and_evaluate(e.clip_config(family="gan"), str(t)),
        ("config.family='gan'", "('clip', 'dit', 'video_dit', 'autoencoder', 'pipeline')"),
    ),
    Case(
        "unknown-flow-prediction-type",
        lambda e, t: objective_with(flow_prediction_type="x0"),
        ("flow_prediction_type='x0'", "valid: flow_velocity, sample"),
    ),
    Case(
        "unknown-flow-loss-space",
        lambda e, t: objective_with(flow_loss_space="x0"),
        ("flow_loss_space='x0'", "valid: prediction, velocity"),
    ),
    Case(
        "unknown-nan-policy",
        lambda e, t: train_with(e, t, training__nan_policy="ignore"),
        ("nan_policy='ignore'", "valid: stop, skip"),
    ),
    Case(
        "unknown-model-variant",  # fixed: was a ValueError from models
        lambda e, t: train_with(e, t, model__variant="huge"),
        ("variant='huge'", "unknown CLIP variant 'huge'", "'tiny'", "--config.model.FIELD"),
        after=no_stale_config,
    ),
    Case(
        "pipeline-stage-model-field",  # fixed: the hint said --config.model.FIELD
        lambda e, t: pipeline_with(e, t, model__variant="huge"),
        ("unknown CLIP variant 'huge'", "--config.clip.model.FIELD=VALUE"),
        after=lambda e, t: no_stale_config(e, t, run=t / "pipeline" / "clip"),
    ),
    Case(
        "pipeline-later-stage-model-field-refused-before-training",  # fixed: after the CLIP trained
        lambda e, t: pipeline_evaluating(e, t, ("test",), model__variant="huge"),
        ("unknown DiT variant 'huge'", "--config.dit.model.FIELD=VALUE"),
    ),
    Case(
        "pipeline-latent-stage-patch-refused-before-training",  # 8 tiles 16x16 images, not latents
        lambda e, t: pipeline_evaluating(e, t, ("test",), shapes_latent, model__patch_size=8),
        (
            "patch_size=8 does not tile the 4x4 inputs of 'shapes_latents'",
            "--config.dit.model.patch_size=2",
        ),
    ),
    Case(
        "unknown-model-dtype",  # fixed
        lambda e, t: train_with(e, t, model__dtype="float8"),
        ("float8", "--config.model.FIELD=VALUE"),
        after=no_stale_config,
    ),
    Case(
        "warmup-not-below-steps",  # fixed: a stale config.json was written before the error
        lambda e, t: train_with(e, t, optimizer__warmup_steps=5),
        ("total_steps > warmup_steps", "total_steps=2, warmup_steps=5"),
        after=no_stale_config,
    ),
    Case(
        "text-encoder-missing",
        lambda e, t: rundir.load_text_encoder(str(t / "moved"), {}),
        ("is not a directory", "Name a CLIP run directory"),
    ),
    Case(
        "text-encoder-without-tokenizer",  # a DiT would read its captions with this tokenizer
        lambda e, t: rundir.text_encoder_tokenizer(
            hf_dir(t, {"config.json": '{"model_type": "clip"}', "model.safetensors": b""})
        ),
        ("has no tokenizer files (tokenizer_config.json)", "pass --config.tokenizer.path="),
    ),
    # -- run directories -------------------------------------------------------------------------
    Case(
        "checkpoint-missing",
        lambda e, t: inference.TextToImage.from_run(str(t / "nope")),
        ("nope' does not exist", "pass a DiT run directory"),
    ),
    Case(
        "checkpoint-not-a-run",
        lambda e, t: inference.TextToImage.from_run(str(t)),
        ("is neither a run directory (it has no model.json)", "--workdir of a train.py DiT run"),
    ),
    Case(
        "checkpoint-of-another-family",
        lambda e, t: inference.TextToImage.from_run(e.clip_dir),
        ("holds a clip model", "needs a DiT or video DiT run directory"),
    ),
    Case(
        "run-config-malformed",  # fixed: was a JSONDecodeError
        lambda e, t: evaluate(small_run_copy(e, t, lambda text: text[:-20]), t),
        ("config.json is not valid JSON", "line", "delete it and rerun the train.py command"),
    ),
    Case(
        "run-config-missing-keys",  # fixed: was AttributeError "'data'"
        lambda e, t: evaluate(small_run_copy(e, t, without("data", "seed")), t),
        ("config.json lacks the fields seed, data.name", "rerun the train.py command"),
    ),
    Case(
        "dit-run-config-missing-keys",  # fixed: was AttributeError deep in from_run
        lambda e, t: inference.TextToImage.from_run(dit_run(e, t, diffusion=None)),
        ("lacks the fields diffusion.objective, diffusion.prediction_type", "restore it"),
    ),
    Case(
        "model-json-malformed",  # fixed: was a JSONDecodeError
        lambda e, t: evaluate(small_run_copy(e, t, model_json='{"family": "clip",'), t),
        ("model.json does not describe a model", "JSONDecodeError", "delete it and rerun"),
    ),
    Case(
        "model-json-missing-keys",  # fixed: was KeyError 'config'
        lambda e, t: inference.TextToImage.from_run(small_run_copy(e, t, model_json="{}")),
        ("model.json does not describe a model", "missing key 'family'", "Restore it"),
    ),
    Case(
        "model-json-unknown-field",  # fixed: was KeyError 'pixel_mean'
        lambda e, t: rundir.load_model_config(
            small_run_copy(e, t, model_json='{"family": "clip", "config": {"widht": 3}}')
        ),
        ("model.json does not describe a model", "'widht'", "Restore it"),
    ),
    Case(
        "dit-text-encoder-moved",
        lambda e, t: inference.TextToImage.from_run(
            dit_run(e, t, **{"text_encoder.checkpoint": str(t / "moved")})
        ),
        ("text_encoder.checkpoint=", "moved' of", "is not a directory", "--text_encoder=DIR"),
    ),
    Case(
        "dit-text-encoder-moved-and-named",  # the fix the row above names works
        lambda e, t: inference.TextToImage.from_run(
            dit_run(e, t, **{"text_encoder.checkpoint": str(t / "moved")}),
            text_encoder=str(t / "elsewhere"),
        ),
        ("elsewhere' is not a directory", "Name a CLIP run directory"),
    ),
    Case(
        "run-unfinished",
        lambda e, t: evaluate(small_run_copy(e, t), t),
        ("has no exported parameters (params/)", "Rerun train.py with that --workdir"),
    ),
    Case(
        "resume-with-another-width",  # fixed: model.json was overwritten, then restore failed
        resume_with_another_width,
        ("holds checkpoints of another model", "vision_width: 128 -> 768", "left untouched"),
    ),
    Case(
        "disk-full-on-checkpoint-save",  # fixed: was an OSError traceback
        disk_full_on_save,
        ("could not write a checkpoint", "No space left on device", "checkpoints/1, is intact"),
        after=disk_full_after,
    ),
    # -- weights ---------------------------------------------------------------------------------
    Case(
        "hf-pickle-only",
        lambda e, t: hf.load_hf_clip(
            hf_dir(t, {"config.json": HF_CONFIG, "pytorch_model.bin": b"pickle"})
        ),
        ("only has pickled PyTorch weights", "safe_serialization=True"),
    ),
    Case(
        "hf-pickle-only-as-text-encoder",
        lambda e, t: rundir.load_text_encoder(
            hf_dir(t, {"config.json": HF_CONFIG, "pytorch_model.bin.index.json": "{}"}), {}
        ),
        ("pytorch_model.bin.index.json", "refused because unpickling can run arbitrary code"),
    ),
    Case(
        "hf-no-config",
        lambda e, t: hf.load_hf_clip(hf_dir(t, {"model.safetensors": b""})),
        ("has no config.json", "save_pretrained"),
    ),
    Case(
        "hf-config-malformed",  # fixed: was a JSONDecodeError
        lambda e, t: hf.load_hf_clip(hf_dir(t, {"config.json": "{", "model.safetensors": b""})),
        ("config.json is not valid JSON", "save_pretrained"),
    ),
    Case(
        "hf-not-clip",
        lambda e, t: hf.load_hf_clip(
            hf_dir(t, {"config.json": '{"model_type": "bert"}', "model.safetensors": b""})
        ),
        ("holds a 'bert' model, not a CLIP model", "model_type must be 'clip'"),
    ),
    # -- sampling settings ---------------------------------------------------------------------
    Case(
        "sampler-unknown",
        lambda e, t: inference.check_sampler_name("eulr"),
        ("unknown sampler 'eulr'", "valid samplers: ddim, ddpm, dpmpp_2m, euler"),
    ),
    Case(
        "sampler-of-the-other-objective",
        lambda e, t: generate(e, sampler="ddpm"),
        ("'ddpm' does not apply to a flow-trained model", "valid samplers for this flow model"),
    ),
    Case(
        "steps-zero",
        lambda e, t: inference.check_steps(0),
        ("steps must be an integer >= 1, got 0",),
    ),
    Case(
        "steps-negative",
        lambda e, t: generate(e, steps=-5),
        ("steps must be an integer >= 1, got -5",),
    ),
    Case(
        "steps-not-integer",
        lambda e, t: generate(e, steps=2.5),
        ("steps must be an integer >= 1, got 2.5",),
    ),
    Case(
        "steps-absurdly-many",  # was accepted: 100000 steps would sample for hours
        lambda e, t: generate(e, steps=100_000),
        ("steps=100000 is more than 10000", "pass a smaller --steps"),
    ),
    Case(
        "prompts-not-a-list",  # was a raw TypeError
        lambda e, t: e.pipeline.generate(123, steps=2),
        ("prompts must be a string or a list of strings, got int 123",),
    ),
    Case(
        "prompt-file-is-a-directory",  # said "does not exist"
        lambda e, t: inference.read_prompt_file(str(t)),
        ("is a directory", "pass a .txt file (one prompt per line) or a .jsonl file"),
    ),
    Case(
        "resolution-not-a-multiple-of-the-patch",  # was a ValueError from the model code
        lambda e, t: inference.TextToImage.from_run(dit_run(e, t), resolution=17),
        ("resolution=17 is not a positive multiple of the DiT's patch size 4",),
    ),
    Case(
        "text-encoder-of-another-vocabulary",  # was never checked
        lambda e, t: inference.TextToImage.from_run(
            dit_run(e, t), text_encoder=small_vocab_clip(e, t)
        ),
        ("tokens but the text encoder", "embeds 64", "--text_encoder=DIR"),
    ),
    Case(
        "guidance-nan",
        lambda e, t: generate(e, guidance_scale=float("nan")),
        ("guidance_scale must be a finite number, got nan",),
    ),
    Case(
        "guidance-inf",
        lambda e, t: prompts(t, "p.txt", A, guidance_scale=math.inf),
        ("guidance_scale must be a finite number, got inf",),
    ),
    Case(
        "guidance-string",
        lambda e, t: generate(e, guidance_scale="3"),
        ("guidance_scale must be a finite number, got '3'",),
    ),
    Case(
        "seed-negative",
        lambda e, t: generate(e, seeds=-1),
        ("seeds must be integers in [0, 2**32), got -1",),
    ),
    Case(
        "seed-too-large",
        lambda e, t: prompts(t, "p.txt", A, seed=2**32),
        ("seeds must be integers in [0, 2**32), got 4294967296",),
    ),
    Case(
        "eta-negative",
        lambda e, t: generate(e, sampler="ddim", eta=-0.5),
        ("eta must be >= 0, got -0.5",),
    ),
    Case(
        "shift-negative",
        lambda e, t: generate(e, shift=-1.0),
        ("shift must be positive, got -1.0",),
    ),
    Case(
        "batch-size-zero",
        lambda e, t: generate(e, batch_size=0),
        ("batch_size must be an integer >= 1, got 0",),
    ),
    Case(
        "bad-settings-keep-existing-samples",
        samples_kept,
        ("steps must be an integer >= 1, got 0",),
    ),
    # -- prompt files ----------------------------------------------------------------------------
    Case(
        "prompts-bad-json-line",
        lambda e, t: prompts(t, "p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n'),
        ("p.jsonl:3: not valid JSON", '{"prompt": "b",}'),
    ),
    Case(
        "prompts-unknown-field",
        lambda e, t: prompts(t, "p.jsonl", '{"promt": "a red circle"}\n'),
        ("p.jsonl:1: unknown fields ['promt']", "valid: prompt, class, negative_prompt, seed"),
    ),
    Case(
        "prompts-empty-file",
        lambda e, t: prompts(t, "p.txt", "\n  \n"),
        ("p.txt' has no prompts (only blank lines)",),
    ),
    Case(
        "prompts-not-utf8",  # fixed: was a UnicodeDecodeError
        lambda e, t: prompts(t, "p.txt", b"a red circle\na blue \xff square\n"),
        ("p.txt:2: not UTF-8 text (byte 0xff at column 8)", "save the prompt file with UTF-8"),
    ),
    Case(
        "prompts-file-missing",
        lambda e, t: inference.read_prompt_file(str(t / "nope.txt")),
        ("nope.txt' does not exist",),
    ),
    Case(
        "prompts-line-not-object",
        lambda e, t: prompts(t, "p.jsonl", '["a red circle"]\n'),
        ("p.jsonl:1: expected a JSON object with a 'prompt'",),
    ),
    Case(
        "prompts-nan-guidance",  # fixed: json reads NaN, and it reached the sampler
        lambda e, t: prompts(t, "p.jsonl", '{"prompt": "a", "guidance_scale": NaN}\n'),
        ("p.jsonl:1: 'guidance_scale' must be a finite number, got nan",),
    ),
    Case(
        "prompt-longer-than-context",  # not an error: truncated, with a warning
        long_prompt,
        ("tokens, more than the context of 32: it is truncated",),
        error=None,
    ),
    # -- arrays to the Python API ----------------------------------------------------------------
    Case(
        "oracle-float-images",  # fixed: floats were read as near-black images, silently
        lambda e, t: evaluation.read_attributes(float_images()),
        ("images must be uint8 in [0, 255], got dtype float32", "astype(np.uint8)"),
        error=ValueError,
    ),
    Case(
        "oracle-images-not-nhwc",
        lambda e, t: evaluation.read_attributes(np.zeros((2, 16, 16), np.uint8)),
        ("images must be (N, H, W, 3) uint8, got shape (2, 16, 16)",),
        error=ValueError,
    ),
    Case(
        "oracle-images-not-square",
        lambda e, t: evaluation.read_attributes(np.zeros((2, 16, 8, 3), np.uint8)),
        ("the oracle reads square images; got 16x8",),
        error=ValueError,
    ),
    Case(
        "clip-encoder-float-images",  # fixed: floats were cast to uint8, silently
        lambda e, t: e.encoder.encode_images(float_images()),
        ("images must be uint8 in [0, 255], got dtype float32", "astype(np.uint8)"),
        error=ValueError,
    ),
    Case(
        "clip-encoder-gray-images",  # fixed: was an IndexError from inside jit
        lambda e, t: e.encoder.encode_images(np.zeros((2, 20, 20), np.uint8)),
        ("images must be (N, H, W, 3) uint8, got shape (2, 20, 20)",),
        error=ValueError,
    ),
    Case(
        "clip-encoder-one-string",  # fixed: embedded each character of the string
        lambda e, t: e.encoder.encode_texts(A),
        ("texts must be a list of strings, got one string", "pass ['a red circle']"),
        error=ValueError,
    ),
    Case(
        "clip-model-wrong-image-size",
        lambda e, t: e.text_encoder.encode_image(jnp.zeros((1, 20, 20, 3))),
        ("image size 20x20 does not match the variant's 16x16", "resize the images"),
        error=ValueError,
    ),
    Case(
        "clip-model-wrong-channels",
        lambda e, t: e.text_encoder.encode_image(jnp.zeros((1, 16, 16, 1))),
        ("images must be NHWC with 3 channels, got shape (1, 16, 16, 1)",),
        error=ValueError,
    ),
    Case(
        "clip-model-too-many-tokens",
        lambda e, t: e.text_encoder.encode_text(jnp.ones((1, 40), jnp.int32)),
        ("40 tokens exceed the context length 32", "truncate or pad captions"),
        error=ValueError,
    ),
    Case(
        "dit-model-wrong-channels",
        lambda e, t: e.dit(jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,))),
        ("x has 4 channels, the model expects 3",),
        error=ValueError,
    ),
    Case(
        "dit-model-wrong-time-shape",
        lambda e, t: e.dit(jnp.zeros((2, 16, 16, 3)), jnp.zeros((1,))),
        ("t must have shape (batch,) = (2,), got (1,)",),
        error=ValueError,
    ),
    Case(
        "dit-model-wrong-context-width",
        lambda e, t: e.dit(
            jnp.zeros((1, 16, 16, 3)),
            jnp.zeros((1,)),
            context=jnp.zeros((1, 8, 64)),
            pooled=jnp.zeros((1, 128)),
        ),
        ("context must be (batch=1, length, context_dim=128), got (1, 8, 64)",),
        error=ValueError,
    ),
    # -- data ------------------------------------------------------------------------------------
    Case(
        "data-dir-is-a-file",  # fixed: was a NotADirectoryError from TFDS
        lambda e, t: train_with(e, t, data__data_dir=write(t / "file", "")),
        ("Cannot prepare the shapes dataset under data_dir=", "at a writable directory"),
    ),
    Case(
        "data-unknown-tfds-name",
        lambda e, t: train_with(e, t, data__name="shapez"),
        ("Unknown TFDS dataset 'shapez'", "Close matches: ['shapes'"),
    ),
    Case(
        "data-not-prepared",
        lambda e, t: train_with(
            e, t, data__name="mnist", data__builder_config=None, data__data_dir=str(t / "empty")
        ),
        ("Dataset 'mnist' is not prepared under data_dir=", "nothing is downloaded"),
    ),
    Case(
        "data-unknown-split",
        lambda e, t: evaluate(e.clip_dir, t, splits=("validation",)),
        ("Split 'validation'", "available splits: ['train', 'test', 'test_unseen']"),
    ),
    Case(
        "data-unknown-evaluation-split-refused-before-training",
        lambda e, t: pipeline_evaluating(e, t, ("test", "validation")),
        ("Split 'validation'", "available splits: ['train', 'test', 'test_unseen']"),
    ),
    Case(
        "data-unknown-image-feature",
        lambda e, t: train_with(e, t, data__image_key="img"),
        ("config.data.image_key='img' is not a feature of", "'image'"),
    ),
    # -- evaluation options ----------------------------------------------------------------------
    Case(
        "evaluate-zero-samples",
        lambda e, t: evaluate(e.clip_dir, t, num_samples=0),
        ("--num_samples must be >= 1, got 0",),
    ),
    Case(
        "evaluate-negative-guidance",
        lambda e, t: evaluation.parse_guidance_scales("1,-2"),
        ("'-2' is not a finite number >= 0", "such as 1,2,4,6"),
    ),
    Case(
        "evaluate-sampler-without-steps",
        lambda e, t: evaluation.parse_samplers("euler:0"),
        ("'euler:0' needs a step count >= 1", "e.g. euler:20"),
    ),
    Case(
        "evaluate-feature-autoencoder-not-an-autoencoder",
        lambda e, t: evaluate(dit_run(e, t), t, feature_autoencoder=e.clip_dir),
        (
            "--feature_autoencoder=",
            "is a run directory of a clip model, not of an autoencoder",
            "Pass an autoencoder run directory",
        ),
    ),
    # -- entry points: exit status 2, one paragraph, no traceback ------------------------------
    cli(
        "cli-train-unknown-config-file",
        "train.py",
        lambda e, t: ["--config=configs/nope.py", f"--workdir={t}/w"],
        ("'configs/nope.py' does not exist",),
    ),
    cli(
        "cli-train-unknown-config-argument",
        "train.py",
        lambda e, t: ["--config=configs/shapes.py:bogus", f"--workdir={t}/w"],
        ("Config argument 'bogus'",),
    ),
    cli(
        "cli-train-config-without-value",  # fixed: was a traceback from the flags parser
        "train.py",
        lambda e, t: [f"--workdir={t}/w", "--config"],
        ("--config needs a value", "--help"),
    ),
    cli(
        "cli-sample-flag-does-not-parse",  # fixed: was exit status 1
        "sample.py",
        lambda e, t: ["--guidance_scale=high"],
        ("flag --guidance_scale=high: could not convert string to float", "--help"),
    ),
    cli(
        "cli-train-mesh-does-not-fit",  # fixed: was a ValueError traceback
        "train.py",
        lambda e, t: ["--config=configs/base_clip.py", "--config.mesh.fsdp=3", f"--workdir={t}/w"],
        ("'fsdp': 3", "does not fit the 8 devices"),
    ),
    cli(
        "cli-sample-clip-run",
        "sample.py",
        lambda e, t: [
            f"--checkpoint={e.clip_dir}",
            f"--prompts={write(t / 'p.txt', A)}",
            f"--output_dir={t}/out",
        ],
        ("holds a clip model", "needs a DiT or video DiT run directory"),
        needs_run=True,
    ),
    cli(
        "cli-sample-prompts-not-utf8",  # fixed: was a UnicodeDecodeError traceback
        "sample.py",
        lambda e, t: [
            f"--checkpoint={t}/run",
            f"--prompts={write(t / 'p.txt', NOT_UTF8)}",
            f"--output_dir={t}/out",
        ],
        ("p.txt:1: not UTF-8 text", "UTF-8 encoding"),
    ),
    cli(
        "cli-evaluate-guidance-interval-one-number",
        "evaluate.py",
        lambda e, t: [f"--checkpoint={t}/run", f"--output_dir={t}/eval", "--guidance_interval=0.7"],
        ("guidance interval '0.7' is not two numbers T_LO,T_HI", "e.g. 0.1,0.7"),
    ),
    cli(
        "cli-evaluate-config-malformed",  # fixed: was a JSONDecodeError traceback
        "evaluate.py",
        lambda e, t: [
            f"--checkpoint={small_run_copy(e, t, lambda text: '{' + text)}",
            f"--output_dir={t}/eval",
        ],
        ("config.json is not valid JSON", "rerun the train.py command"),
        needs_run=True,
    ),
    # -- latents: the autoencoder, encode.py and DiTs trained on latents ----------------------
    Case(
        "encode-autoencoder-missing",
        lambda e, t: encode_with(str(t / "no_autoencoder"), t),
        ("no_autoencoder' is not a directory", "autoencoder run directory"),
    ),
    Case(
        "encode-autoencoder-is-a-clip-run",
        lambda e, t: encode_with(e.clip_dir, t),
        ("is a run directory of a clip model, not of an autoencoder",),
    ),
    Case(
        "encode-examples-per-shard-zero",
        lambda e, t: encoding.LatentDatasetWriter(str(t), "x", None, {"train": 4}, 0),
        ("examples_per_shard must be >= 1, got 0",),
    ),
    Case(
        "latent-dataset-unfinished",  # shards written, encoding.json not yet
        lambda e, t: data_latents.encoding_of(str(t), ["latent_mean", "latent_std", "caption"]),
        ("holds latents", "no encoding.json", "rerun the same encode.py command"),
    ),
    Case(
        "latents-json-malformed",
        lambda e, t: rundir.load_latents(latent_run_dir(t, "{}")),
        ("latents.json does not describe latents",),
    ),
    Case(
        "latent-run-whose-autoencoder-is-gone",
        lambda e, t: inference.ClassToImage.from_run(latent_run_dir(t, LATENTS_JSON)),
        ("trained on latents of the autoencoder '/nonexistent/autoencoder'", "cannot be loaded"),
    ),
    Case(
        "dit-over-latents-without-latents-json",
        lambda e, t: inference.ClassToImage.from_run(latent_run_dir(t, None)),
        ("holds a DiT over 4 channels but no latents.json", "encode.py dataset"),
    ),
    Case(
        "pipeline-encode-before-autoencoder",  # the encode stage needs the autoencoder stage's run
        lambda e, t: pipeline.stages.run_encode_stage(shapes_latent_config(str(t)), str(t / "w")),
        ("stage encode needs the trained autoencoder", "put 'autoencoder' before 'encode'"),
    ),
    Case(
        "pipeline-encode-before-clip",  # its text features are the clip stage's run's
        lambda e, t: pipeline.stages.run_encode_stage(
            shapes_latent_config(str(t)), workdir_with_trained(t / "w", "autoencoder")
        ),
        (
            "stage encode stores the DiT's text features",
            "w/clip",
            "put 'clip' before 'encode'",
            "--config.encode.text_features=False",
        ),
    ),
]


# ---------------------------------------------------------------------------------------------
# Running a row
# ---------------------------------------------------------------------------------------------


def _call(function: Callable, *candidates):
    """Calls `function` with as many of (env, tmp, monkeypatch, capsys) as it takes."""
    count = function.__code__.co_argcount
    return function(*candidates[:count])


def check_message(message: str, words: tuple[str, ...]) -> None:
    assert "\n\n" not in message.strip(), message  # one paragraph
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, env, tmp_path, monkeypatch, capsys, caplog):
    run_before = tree_state(env.clip_dir)
    assert run_before == env.run_state  # nothing before this row touched the run either
    if case.program:
        result = env.cli_results[case.id].result()
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        marker = f"{case.program}: error: "
        assert marker in result.stderr, result.stderr
        message = result.stderr[result.stderr.index(marker) :]
        assert "\n\n" not in message.strip(), message  # one paragraph (wrapped at 100 columns)
        check_message(" ".join(message.split()), case.words)
    elif case.error is None:
        with caplog.at_level(logging.WARNING):
            _call(case.call, env, tmp_path, monkeypatch, capsys)
        check_message(" ".join(r.getMessage() for r in caplog.records), case.words)
    else:
        with pytest.raises(case.error) as raised:
            _call(case.call, env, tmp_path, monkeypatch, capsys)
        check_message(str(raised.value), case.words)
    if case.after is not None:
        _call(case.after, env, tmp_path, monkeypatch, capsys)
    assert tree_state(env.clip_dir) == run_before  # the trained run is untouched


def test_the_table_is_as_large_as_promised():
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids) >= 40
    assert sum(1 for case in CASES if case.program) >= 6
