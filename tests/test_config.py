"""Recipes load, overrides keep field types, and bad keys or values are named in the error."""

import json
import subprocess
import sys

import pytest

from configs import shapes
from diffusion import aot, families, pipeline
from diffusion import config as config_lib
from diffusion.config import ConfigError


def test_every_recipe_loads_and_serialises():
    recipes = config_lib.available_configs()
    assert "configs/shapes.py" in recipes and "configs/base_dit.py" in recipes
    for path in recipes:
        config = config_lib.load_config(path)
        assert config.family in (*families.FAMILIES, "pipeline", "sampling")
        json.loads(config_lib.to_json(config))


def test_overrides_keep_types_and_reach_shared_sections():
    config = config_lib.load_config(
        "configs/shapes.py:runlocal",
        [
            ("data.data_dir", "/tmp/x"),
            ("clip.optimizer.learning_rate", "3e-4"),
            ("dit.training.num_steps", "7"),
            ("dit.model.scan_layers", "true"),
            ("data.eval_splits", "test"),
            ("data.label_key", "label"),
            ("seed", "5"),
        ],
    )
    assert config.dit.data.data_dir == "/tmp/x" == config.clip.data.data_dir
    assert config.clip.optimizer.learning_rate == pytest.approx(3e-4)
    assert config.dit.training.num_steps == 7 and isinstance(config.dit.training.num_steps, int)
    assert config.dit.model.scan_layers is True
    assert config.data.eval_splits == ("test",)
    assert config.data.label_key == "label"
    assert config.clip.seed == 5 and config.dit.seed == 5
    assert config.data.num_train_examples == 2_000  # the runlocal argument was applied


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("clip.optimizer.learnin_rate", "1", ["learnin_rate", "Did you mean 'learning_rate'"]),
        ("nope", "1", ["Unknown config key 'nope'", "Valid fields of config:"]),
        ("clip.training.num_steps", "ten", ["num_steps", "not a valid integer"]),
        ("clip.model.scan_layers", "maybe", ["scan_layers", "not a valid boolean"]),
        ("clip.optimizer.learning_rate", "fast", ["learning_rate", "not a valid number"]),
        ("clip.seed.x", "1", ["is a value, not a section"]),
        ("clip.model", "1", ["names a whole section", "variant"]),
    ],
)
def test_bad_overrides_name_the_key(key, value, words):
    config = config_lib.load_config("configs/shapes.py")
    with pytest.raises(ConfigError) as error:
        config_lib.apply_override(config, key, value)
    for word in words:
        assert word in str(error.value)


def test_the_long_default_changes_only_the_dit_length_and_the_guidance_sweep():
    def flat(config):
        return dict(_leaves(config.to_dict()))

    default = flat(config_lib.load_config("configs/shapes.py"))
    long = flat(config_lib.load_config("configs/shapes.py:long"))
    changed = {k for k in default.keys() | long.keys() if default.get(k) != long.get(k)}
    assert changed == {"dit.training.num_steps", "evaluate.guidance_scales"}
    assert long["dit.training.num_steps"] == 2 * default["dit.training.num_steps"]


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_sampler_options_of_a_pipeline_reach_its_evaluation_and_its_grid(tmp_path):
    import dataclasses

    from diffusion.errors import UserError
    from diffusion.evaluation import evaluator
    from diffusion.pipeline import stages

    config = config_lib.load_config(
        "configs/shapes.py",
        [
            ("evaluate.eta", "1"),
            ("evaluate.guidance_interval", "0,0.7"),
            ("samples.shift", "6"),
        ],
    )
    options = stages.evaluation_options(config, data_dir=None)
    assert options.sampler_options == {
        "eta": 1.0,
        "shift": None,
        "guidance_rescale": 0.0,
        "guidance_interval": (0.0, 0.7),
    }
    assert stages.sampler_options(config.samples) == {
        "eta": 0.0,
        "shift": 6.0,
        "guidance_rescale": 0.0,
    }
    # A rerun evaluates again when the evaluation's options changed, not only its checkpoint.
    metrics = tmp_path / "metrics.json"
    record = {"checkpoint_step": 5, "options": evaluator.options_record(options)}
    metrics.write_text(json.dumps(record))
    assert stages._up_to_date(str(metrics), 5, options)
    assert not stages._up_to_date(str(metrics), 6, options)
    assert not stages._up_to_date(str(metrics), 5, dataclasses.replace(options, eta=0.5))
    # A CLIP run's metrics stay up to date when only what its evaluation does not read changed.
    clip_record = {"family": "clip", "checkpoint_step": 5}
    metrics.write_text(
        json.dumps(clip_record | {"options": evaluator.options_record(options, "clip")})
    )
    assert stages._up_to_date(str(metrics), 5, dataclasses.replace(options, eta=0.5, shift=6.0))
    assert not stages._up_to_date(str(metrics), 5, dataclasses.replace(options, num_samples=9))
    config.evaluate.guidance_interval = "0.7"
    with pytest.raises(UserError, match="'0.7' is not two numbers T_LO,T_HI"):
        stages.evaluation_options(config, data_dir=None)


def test_a_stage_error_names_the_flags_the_pipeline_takes():
    message = (
        "Fix --config.model.width, --config.mesh.data or --config.data.data_dir (--config.seed)"
    )
    assert pipeline.runner.stage_flags(message, "dit") == (
        "Fix --config.dit.model.width, --config.dit.mesh.data or --config.data.data_dir "
        "(--config.seed)"  # data, tokenizer and seed are one section shared by every stage
    )


def test_missing_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError, match="configs/shapes.py"):
        config_lib.load_config("configs/does_not_exist.py")


def test_split_config_flags():
    argv = ["train.py", "--workdir=w", "--config=configs/shapes.py:runlocal", "--config.seed", "3"]
    remaining, spec, overrides = config_lib.split_config_flags(argv)
    assert remaining == ["train.py", "--workdir=w"]
    assert spec == "configs/shapes.py:runlocal"
    assert overrides == [("seed", "3")]


def test_train_py_reports_an_unknown_key_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/shapes.py",
            "--config.trainig.x=1",
            f"--workdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Unknown config key 'trainig.x'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("family", ["clip", "dit"])
def test_aot_builds_the_model_train_py_builds_size_overrides_included(family):
    """A recipe's size and execution fields (--config.model.depth=2 ...) reach the compiled model
    exactly as they reach train.py's (`training.build_model`: the tokenizer's vocabulary and the
    dataset's image size, here those the recipe names): the report is about the model that
    would train."""
    import jax
    import numpy as np

    from diffusion import families, meshes

    recipe = shapes.get_config()
    config = recipe.clip if family == "clip" else recipe.dit
    text_config = None
    if family == "clip":
        sizes = dict(patch_size=8, vision_depth=1, text_width=64)
        config.model.update(remat="full", **sizes)
        config.loss.kind = "sigmoid"
    else:
        sizes = dict(patch_size=8, width=64, depth=2, num_heads=2)
        config.model.update(scan_layers=True, **sizes)
        config.text_encoder.variant = "tiny"
        text_config = aot.text_encoder_config(config)
    mesh = meshes.make_mesh({"data": 1}, devices=jax.devices()[:1])
    config.training.global_batch_size = 2
    built = aot.build_programs(config, mesh).model_config
    length = config.tokenizer.context_length
    data = families.DataFacts(
        image_size=32,
        vocab_size=config.tokenizer.vocab_size,
        context_length=length,
        empty_tokens=np.zeros((1, length), np.int32),
        empty_mask=np.zeros((1, length), np.int32),
    )
    extra = (text_config,) if family == "dit" else ()
    expected = families.get(family).build(config, data, mesh, *extra).model_config
    if family == "clip":
        assert (built.remat_policy, built.logit_bias_init) == ("full", -10.0)
    else:
        assert built.scan_layers and built.context_dim == text_config.text_width
    assert built == expected
    assert {name: getattr(built, name) for name in sizes} == sizes


@pytest.mark.parametrize("program", ["train.py", "sample.py", "evaluate.py", "encode.py"])
def test_help_prints_the_flags_and_exits_0(program):
    """absl exits 1 after --help; asking for the usage is no failure."""
    result = subprocess.run(
        [sys.executable, program, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"{program}:" in result.stdout and "--" in result.stdout
