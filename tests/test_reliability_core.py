"""Reliability at the boundaries: the one error boundary of the entry points, config values checked
before any work, and damaged or unwritable files named with their path and the fix.

(Checkpoint writes that fail, exports that are not rewritten and metrics.jsonl after a resume are
tested in tests/test_checkpoints.py and tests/test_metrics.py.)
"""

import errno
import importlib.util
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion import config as config_lib
from diffusion import errors, hf
from diffusion.data import sources, tokenizer
from diffusion.errors import NonFiniteError, UserError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = "/runs/shapes/checkpoints/3"


def _os_error(code, path=PATH, kind=OSError):
    return kind(code, os.strerror(code), path)


# (id, exception raised inside the boundary, exit status, words of the one paragraph on stderr)
BOUNDARY_CASES = [
    ("user-error", UserError("--steps must be >= 1, got 0"), 2, ("x.py: error:", "got 0")),
    (
        "disk-full",
        _os_error(errno.ENOSPC),
        1,
        ("x.py: error:", PATH, "the disk is full", "No space left on device", "Free space"),
    ),
    (
        "permission-denied",
        _os_error(errno.EACCES, kind=PermissionError),
        1,
        (PATH, "permission denied", "writable"),
    ),
    ("not-permitted", _os_error(errno.EPERM, kind=PermissionError), 1, (PATH, "not permitted")),
    ("read-only", _os_error(errno.EROFS), 1, (PATH, "read-only", "writable file system")),
    (
        "file-where-a-directory-is-needed",
        _os_error(errno.ENOTDIR, kind=NotADirectoryError),
        1,
        (PATH, "a file where a directory is needed", "Move that file away"),
    ),
    (
        "file-exists-where-a-directory-is-needed",
        _os_error(errno.EEXIST, kind=FileExistsError),
        1,
        (PATH, "a file is already there", "Move that file away"),
    ),
    (
        "directory-where-a-file-is-needed",
        _os_error(errno.EISDIR, kind=IsADirectoryError),
        1,
        (PATH, "a directory where a file is needed"),
    ),
    (
        "missing-file",
        _os_error(errno.ENOENT, kind=FileNotFoundError),
        1,
        (PATH, "does not exist", "Check the path"),
    ),
    (
        "missing-file-with-its-own-message",
        FileNotFoundError(f"no exported parameters at {PATH}"),
        1,
        (f"x.py: error: no exported parameters at {PATH}",),
    ),
    (
        "rename-failed",
        OSError(errno.EXDEV, os.strerror(errno.EXDEV), PATH, None, "/elsewhere/3"),
        1,
        (f"cannot move {PATH} to /elsewhere/3", "cross-device link"),
    ),
    (
        "tensorstore-disk-full",  # what Orbax raises from a background checkpoint write
        ValueError(
            'RESOURCE_EXHAUSTED: Error writing local file "/runs/x/checkpoints/'
            '2.orbax-checkpoint-tmp-17/state/d/0a1b": Failed to write: No space left on device '
            "[os_error_code='28'] [source locations='tensorstore/internal/os/file_util.cc:120']"
        ),
        1,
        ("/runs/x/checkpoints/2.orbax-checkpoint-tmp-17/state/d/0a1b", "the disk is full"),
    ),
    (
        "disk-full-in-words-only",
        ValueError("RESOURCE_EXHAUSTED: write failed: No space left on device"),
        1,
        ("the disk is full", "No space left on device"),
    ),
    (
        "non-finite",
        NonFiniteError("non-finite loss or gradients by step 3"),
        1,
        ("x.py: stopped: non-finite loss or gradients by step 3",),
    ),
]


@pytest.mark.parametrize(
    "error, status, words",
    [case[1:] for case in BOUNDARY_CASES],
    ids=[case[0] for case in BOUNDARY_CASES],
)
def test_the_boundary_prints_one_paragraph_and_exits_with_the_status(error, status, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        with errors.error_boundary("x.py"):
            raise error
    assert exit_.value.code == status
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert "\n\n" not in stderr.strip()  # one paragraph
    flat = " ".join(stderr.split())  # wrapped at 100 columns
    for word in words:
        assert word in flat, f"{word!r} not in {flat!r}"


@pytest.mark.parametrize(
    "error",
    [
        ValueError("an unexpected bug"),
        KeyError("params"),
        # An accelerator out of memory is no disk: it keeps its traceback.
        RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB."),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        TimeoutError("the checkpoint barrier timed out"),
        RuntimeError("a worker failed: [Errno 104] Connection reset by peer"),
    ],
    ids=["value-error", "key-error", "device-out-of-memory", "socket", "timeout", "worker"],
)
def test_other_errors_keep_their_traceback(error, capsys):
    with pytest.raises(type(error)) as raised:
        errors.run_entry_point("x.py", lambda: (_ for _ in ()).throw(error))
    assert raised.value is error
    assert capsys.readouterr().err == ""


def test_run_entry_point_returns_when_main_does(capsys):
    calls = []
    errors.run_entry_point("x.py", lambda: calls.append(1))
    assert calls == [1] and capsys.readouterr().err == ""


def test_a_user_error_is_never_read_as_an_os_error():
    """A CheckpointWriteError names "No space left on device" but is already for a person."""
    assert errors.os_error_of(UserError("could not write: No space left on device")) is None
    recovered = errors.os_error_of(ValueError("x [os_error_code='30'] y"))
    assert recovered.errno == errno.EROFS and recovered.filename is None


# ---------------------------------------------------------------------------------------------
# Config values checked in load_config, before any work
# ---------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("configs/base_clip.py", "training.num_steps", "-5", "config.training.num_steps=-5"),
    ("configs/base_clip.py", "training.num_steps", "0", "config.training.num_steps=0"),
    ("configs/base_dit.py", "training.global_batch_size", "0", "training.global_batch_size=0"),
    ("configs/base_dit.py", "training.log_every", "0", "config.training.log_every=0"),
    ("configs/base_clip.py", "training.checkpoint_every", "-1", "training.checkpoint_every=-1"),
    ("configs/base_clip.py", "training.keep_checkpoints", "0", "training.keep_checkpoints=0"),
    ("configs/base_clip.py", "optimizer.warmup_steps", "-1", "optimizer.warmup_steps=-1"),
    # cosine (base_clip's default) decays over the steps after the warmup: it needs some
    (
        "configs/base_clip.py",
        "optimizer.warmup_steps",
        "1000",
        "config.optimizer.warmup_steps=1000 must be < config.training.num_steps=1000",
    ),
    # a pipeline's stages are named as their overrides are spelled
    ("configs/shapes.py", "dit.training.num_steps", "-5", "config.dit.training.num_steps=-5"),
    (
        "configs/shapes.py",
        "clip.optimizer.warmup_steps",
        "300",
        "--config.clip.optimizer.warmup_steps=N with N < 300",
    ),
]


@pytest.mark.parametrize(
    "recipe, key, value, words", BAD_CONFIGS, ids=[f"{c[1]}={c[2]}" for c in BAD_CONFIGS]
)
def test_bad_step_counts_are_refused_by_load_config_naming_the_key(recipe, key, value, words):
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.load_config(recipe, [(key, value)])
    assert words in str(raised.value)


def test_a_non_integer_step_count_is_refused():
    # A recipe may write a float; ConfigDict keeps it one.
    config = ml_collections.ConfigDict({"family": "dit", "training": {"num_steps": 1e5}})
    with pytest.raises(config_lib.ConfigError, match=r"config.training.num_steps=100000.0 must"):
        config_lib.validate_config(config)


def test_good_configs_pass_and_stages_outside_the_pipeline_are_not_checked():
    # A constant schedule may warm up for longer than the run (shapes.py:runlocal does).
    config = config_lib.load_config("configs/shapes.py:runlocal")
    assert config.dit.optimizer.warmup_steps > config.dit.training.num_steps
    config_lib.load_config("configs/base_clip.py", [("training.keep_checkpoints", "1")])
    config = config_lib.load_config("configs/shapes.py", [("stages", "('dit',)")])
    config.clip.training.num_steps = -1  # not trained by this pipeline
    config_lib.validate_config(config)
    assert [prefix for prefix, _ in config_lib.training_sections(config)] == ["config.dit"]
    no_training = ml_collections.ConfigDict({"family": "dit"})
    config_lib.validate_config(no_training)


def test_every_recipe_and_argument_passes_validation():
    for path in config_lib.available_configs():
        spec = importlib.util.spec_from_file_location("_recipe", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for arg in (None, *getattr(module, "ARGS", config_lib.RECIPE_ARGS)):
            config_lib.load_config(path + (f":{arg}" if arg else ""))


def test_train_py_refuses_a_negative_step_count_before_any_work(tmp_path):
    """Before: exit 0, an 'untrained' run with exported initial parameters."""
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/base_clip.py",
            f"--workdir={workdir}",
            "--config.training.num_steps=-5",
            "--config.optimizer.schedule=constant",
        ],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "train.py: error: config.training.num_steps=-5 must be an integer >= 1" in " ".join(
        result.stderr.split()
    )
    assert not workdir.exists()


# ---------------------------------------------------------------------------------------------
# Damaged dataset shards and weight files name the file
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """A prepared 16x16 shapes dataset whose train split is one ArrayRecord shard of 256 KB."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = sources.build_dataset(
        data_dir=data_dir, resolution=16, num_train=512, num_test=8, num_test_unseen=8
    )
    return data_dir, sources.tfds_name(builder)


def _damaged_copy(shapes_dir, tmp_path, damage):
    data_dir, name = shapes_dir
    copy = str(tmp_path / "tfds")
    shutil.copytree(data_dir, copy)
    builder = tfds.builder(name, data_dir=copy)
    (shard,) = [os.fspath(p) for p in builder.info.splits["train"].filepaths]
    damage(shard)
    return sources.SourceConfig(name=name, data_dir=copy), shard, builder.data_dir


def _truncate(fraction):
    def damage(path):
        with open(path, "r+b") as f:
            f.truncate(int(os.path.getsize(path) * fraction))

    return damage


@pytest.mark.parametrize(
    "damage, why",
    [
        (_truncate(0.5), "Invalid Riegeli/records file"),  # what the issue saw as a traceback
        (_truncate(0.1), "at least 64KB"),
        (_truncate(0.99), "Riegeli"),
        (os.remove, "missing"),
    ],
    ids=["half", "tenth", "last-percent", "missing"],
)
def test_a_damaged_shard_is_named_with_the_fix(shapes_dir, tmp_path, damage, why):
    source, shard, dataset_dir = _damaged_copy(shapes_dir, tmp_path, damage)
    with pytest.raises(UserError) as raised:
        reader = sources.open_source(source, "train")
        reader.read(list(range(len(reader))))
    message = str(raised.value)
    assert f"{shard} (" in message and why in message
    assert f"Delete {dataset_dir} and prepare the dataset again" in message


def test_damaged_shards_of_an_intact_dataset_is_empty(shapes_dir):
    data_dir, name = shapes_dir
    builder = tfds.builder(name, data_dir=data_dir)
    assert sources.damaged_shards(builder, "train[:50%]+test") == []
    reader = sources.open_source(sources.SourceConfig(name=name, data_dir=data_dir), "train")
    assert len(reader.read([0, 511])) == 2


def _hf_directory(path, tensors):
    from safetensors.numpy import save_file

    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{}")
    save_file(tensors, os.path.join(path, hf.WEIGHTS_FILE))
    return os.path.join(path, hf.WEIGHTS_FILE)


@pytest.mark.parametrize("keep", [0.5, 0.9999, 4 / 4096], ids=["half", "last-byte", "in-header"])
def test_a_truncated_safetensors_file_is_named(tmp_path, keep):
    tensors = {"a": np.ones((32, 32), np.float32), "b": np.arange(7, dtype=np.int32)}
    weights = _hf_directory(tmp_path / "clip", tensors)
    assert set(hf.read_safetensors(str(tmp_path / "clip"))) == {"a", "b"}  # intact: reads
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(max(1, int(size * keep)))
    with pytest.raises(hf.CheckpointError) as raised:
        hf.read_safetensors(str(tmp_path / "clip"))
    message = str(raised.value)
    assert weights in message and "truncated or damaged" in message and "download it" in message


# ---------------------------------------------------------------------------------------------
# An unwritable run directory when the tokenizer is saved
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_tokenizer_saved_where_a_file_is_in_the_way_is_reported_with_the_path(
    tmp_path, capsys, where
):
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    out_dir = blocker if where == "is-a-file" else blocker / "tokenizer"
    with pytest.raises(SystemExit) as exit_:
        with errors.error_boundary("train.py"):
            tokenizer.train_caption_tokenizer(["a red circle", "a blue square"] * 4, out_dir, 260)
    assert exit_.value.code == 1
    stderr = " ".join(capsys.readouterr().err.split())
    assert f"train.py: error: cannot use {out_dir}:" in stderr
    assert "Traceback" not in stderr and "Move that file away" in stderr
