"""The record filter on ClassLabels (config.data.where): training batches, held-out examples,
evaluate.py's override and the errors of a bad filter."""

import dataclasses
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_input_pipeline import _take

from configs import common
from diffusion.data import input_pipeline, selection, shapes
from diffusion.errors import UserError
from diffusion.evaluation import evaluator, held_out
from diffusion.training.inputs import prepare_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ("background", "color", "position", "shape", "size")


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
    config = common.data_config()
    config.data_dir = str(tmp_path_factory.mktemp("tfds_where"))
    config.builder_config = "16"
    config.num_train_examples = 100
    config.num_eval_examples = 40
    return config


@pytest.fixture(scope="module")
def source(data_config):
    return prepare_source(data_config, seed=0)[0]


def _labels(source, split):
    """{ClassLabel: (N,) int} of every record of the split, read by TFDS itself."""
    builder = tfds.builder(source.name, data_dir=source.data_dir)
    records = builder.as_data_source(split=split)
    return {key: np.array([records[i][key] for i in range(len(records))]) for key in LABELS}


def _pipeline(source, where, **overrides):
    arguments = dict(split="train", global_batch_size=4, seed=0, context_length=0)
    arguments.update(process_index=0, process_count=1, captions=False, **overrides)
    filtered = dataclasses.replace(source, where=where)
    return input_pipeline.make_input_pipeline(filtered, None, **arguments)


def test_parse_where_reads_conditions_with_spaces_and_refuses_malformed_ones():
    assert selection.parse_where("") == () and selection.parse_where("  ") == ()
    assert selection.parse_where(" motion = left to right,size=small") == (
        ("motion", "left to right"),
        ("size", "small"),
    )
    for bad in ("size", "size=", "=small", "size=small,", "size=small=large"):
        with pytest.raises(UserError, match="is not a condition KEY=NAME.*'motion=up,size=small'"):
            selection.parse_where(bad)


def test_training_batches_hold_exactly_the_matching_records(source):
    labels = _labels(source, "train")
    expected = np.flatnonzero(labels["size"] == 1)  # large
    large = dataclasses.replace(source, where="size=large")
    np.testing.assert_array_equal(selection.selected_records(large, "train"), expected)
    # One epoch, one record per batch: every matching record once, and nothing else.
    batches = list(_pipeline(source, "size=large", global_batch_size=1, num_epochs=1))
    assert len(batches) == len(expected)
    rows = np.concatenate([np.stack([b[k] for k in LABELS], axis=1) for b in batches])
    assert (rows[:, LABELS.index("size")] == 1).all()
    expected_rows = np.stack([labels[k][expected] for k in LABELS], axis=1)
    assert sorted(map(tuple, rows)) == sorted(map(tuple, expected_rows))


def test_two_conditions_and_an_integer_index_select_alike(source):
    labels = _labels(source, "train")
    blue = shapes.COLOR_NAMES.index("blue")
    expected = np.flatnonzero((labels["shape"] == 0) & (labels["color"] == blue))
    by_name = dataclasses.replace(source, where="shape=circle,color=blue")
    by_index = dataclasses.replace(source, where=f"shape=0, color={blue}")
    assert selection.parse_where(by_name.where)[1] == ("color", "blue")
    np.testing.assert_array_equal(selection.selected_records(by_name, "train"), expected)
    np.testing.assert_array_equal(selection.selected_records(by_index, "train"), expected)


def test_filtered_batches_are_deterministic_and_resume_exactly(source):
    first = _take(_pipeline(source, "size=small"), 6)
    for batch in first:
        assert (batch["size"] == 0).all()
    iterator = _pipeline(source, "size=small")
    _take(iterator, 2)
    state = iterator.get_state()
    resumed = _pipeline(source, "size=small")
    resumed.set_state(state)
    for expected, batch in zip(first[2:], _take(resumed, 4), strict=True):
        np.testing.assert_array_equal(expected["image"], batch["image"])


def test_held_out_examples_are_the_first_matching_records(data_config):
    labels = _labels(prepare_source(data_config, 0)[0], "test")
    expected = np.flatnonzero(labels["shape"] == 0)[:5]  # circle
    filtered = data_config.copy_and_resolve_references()
    filtered.where = "shape=circle"
    examples = held_out.load_split_examples(filtered, 0, "test", 5)
    assert len(examples.captions) == 5
    assert (examples.labels["shape"] == 0).all()
    for key in LABELS:
        np.testing.assert_array_equal(examples.labels[key], labels[key][expected], err_msg=key)
    assert all("circle" in caption for caption in examples.captions)


def test_evaluate_where_overrides_the_run_config(data_config):
    run_config = ml_collections.ConfigDict({"data": data_config.to_dict(), "seed": 0})
    del run_config.data["where"]  # a run trained before the field existed
    options = evaluator.EvaluationOptions(where="size=small")
    examples = held_out.load_split_examples(
        evaluator.with_where(run_config, options).data, 0, "test", 8
    )
    assert (examples.labels["size"] == 0).all()
    assert "where" not in run_config.data  # the run's own config is left as it is
    kept = evaluator.with_where(run_config, evaluator.EvaluationOptions())
    assert held_out.load_split_examples(kept.data, 0, "test", 8).labels["size"].any()


@pytest.mark.parametrize(
    "where, message",
    [
        ("colour=red", r"'colour' is not a ClassLabel feature .*\['background', 'color', "),
        ("size=huge", r"'huge' is not a name of the ClassLabel 'size'.*\['small', 'large'\]"),
        ("size=2", r"'2' is not a name of the ClassLabel 'size'.*indices 0 to 1"),
        ("size:small", r"'size:small' is not a condition KEY=NAME"),
        ("shape=circle,shape=square", r"keeps none of the 100 records of split 'train'"),
    ],
)
def test_a_bad_filter_is_a_user_error_naming_it(source, data_config, where, message):
    with pytest.raises(UserError, match=message):
        _pipeline(source, where)
    if "keeps none" not in message:  # checked when the run's dataset is opened
        bad = data_config.copy_and_resolve_references()
        bad.where = where
        with pytest.raises(UserError, match=message):
            prepare_source(bad, 0)


def _only_in_train(source) -> str:
    """A filter that keeps records of train but none of test (the split checks read first)."""
    train, test = _labels(source, "train"), _labels(source, "test")
    keys = ("shape", "color", "size", "background")
    in_test = set(zip(*(test[k] for k in keys), strict=True))
    for combination in zip(*(train[k] for k in keys), strict=True):
        if combination not in in_test:
            return ",".join(f"{k}={v}" for k, v in zip(keys, combination, strict=True))
    raise AssertionError("every combination of train is in test")


@pytest.mark.parametrize("bad", ["unknown key", "empty held-out split"])
def test_train_py_refuses_a_bad_filter_before_writing_anything(source, data_config, tmp_path, bad):
    where, words = "motion=up", "config.data.where='motion=up': 'motion' is not a ClassLabel"
    if bad == "empty held-out split":
        where = _only_in_train(source)
        words = f"config.data.where={where!r} keeps none of the 40 records of split 'test'"
    workdir = tmp_path / "run"
    overrides = {
        "data_dir": data_config.data_dir,
        "builder_config": "16",
        "num_train_examples": 100,
        "num_eval_examples": 40,
        "where": where,
    }
    process = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/base_clip.py",
            *(f"--config.data.{key}={value}" for key, value in overrides.items()),
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    assert words in " ".join(process.stderr.split())
    assert not (workdir / "config.json").exists()


def test_hard_negatives_are_refused_with_a_filter(source):
    # Twins come from the whole split, so they could break the filter.
    with pytest.raises(UserError, match="Hard negatives .* not supported with a record filter"):
        _pipeline(source, "size=small", hard_negative_attributes=("shape",))
