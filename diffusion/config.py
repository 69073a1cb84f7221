"""Loading `configs/*.py` recipes and `--config.a.b=value` overrides, with clear errors.

A recipe is a Python file with `get_config(arg: str | None) -> ml_collections.ConfigDict`
(big_vision style: `--config=configs/shapes.py:runlocal`). Overrides are applied on top with the
type of the existing field, so `--config.optimizer.learning_rate=1e-3` stays a float and an unknown
key or a value of the wrong type is reported with the key, the value and what would be valid,
instead of a traceback from deep inside absl.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections.config_dict import FieldReference

from diffusion.errors import UserError


class ConfigError(UserError):
    """A recipe file or override that cannot be used."""


# The arguments recipes understand after the colon; a recipe may list others in `ARGS`.
RECIPE_ARGS = ("runlocal",)


def load_config(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """Loads `PATH[:ARG]` and applies `(dotted_key, raw_value)` overrides in order."""
    path, _, arg = spec.partition(":")
    config = _call_get_config(path, arg or None)
    for key, raw_value in overrides:
        apply_override(config, key, raw_value)
    validate_config(config)
    return config


# ---------------------------------------------------------------------------------------------
# Values checked before any work: a bad one would otherwise surface after a tokenizer was trained
# and files were written, or not at all (num_steps=-5 "finished" at once and exported init params)
# ---------------------------------------------------------------------------------------------

# (section, field, smallest valid value) of each training stage.
_AT_LEAST = (
    ("training", "num_steps", 1),
    ("training", "global_batch_size", 1),
    ("training", "log_every", 1),
    ("training", "checkpoint_every", 1),
    ("training", "keep_checkpoints", 1),  # None keeps them all
    ("training", "eval_every", 0),
    ("optimizer", "warmup_steps", 0),
)


def training_sections(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """(prefix, stage config) of every stage that trains: the config itself for a family's
    recipe, `config.autoencoder` / `config.clip` / `config.dit` / `config.video_dit` of a
    pipeline (those among its stages)."""
    if config.get("family") == "pipeline":
        stages = tuple(config.get("stages") or ("clip", "dit"))
        return [
            (f"config.{name}", config[name])
            for name in ("autoencoder", "clip", "dit", "video_dit")
            if name in stages and isinstance(config.get(name), ml_collections.ConfigDict)
        ]
    trains = isinstance(config.get("training"), ml_collections.ConfigDict)
    return [("config", config)] if trains else []


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the step counts and sizes of every training stage; raises ConfigError naming the
    key (e.g. `config.dit.training.num_steps`), the value and what would be valid."""
    for prefix, stage in training_sections(config):
        for section, field, minimum in _AT_LEAST:
            if section not in stage or field not in stage[section]:
                continue
            value = stage[section][field]
            key = f"{prefix}.{section}.{field}"
            if value is None and field == "keep_checkpoints":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(
                    f"{key}={value!r} must be an integer >= {minimum}; pass --{key}=N with N an "
                    f"integer >= {minimum}."
                )
        _check_warmup(prefix, stage)


def _check_warmup(prefix: str, stage: ml_collections.ConfigDict) -> None:
    """The cosine schedule decays over the steps after the warmup, so it needs some."""
    optimizer, training = stage.get("optimizer"), stage.get("training")
    if optimizer is None or training is None or optimizer.get("schedule", "cosine") != "cosine":
        return
    warmup, num_steps = optimizer.get("warmup_steps", 0), training.get("num_steps")
    if num_steps is not None and warmup >= num_steps:
        raise ConfigError(
            f"{prefix}.optimizer.warmup_steps={warmup} must be < {prefix}.training.num_steps="
            f"{num_steps}: the cosine schedule decays the learning rate over the steps after the "
            f"warmup. Pass --{prefix}.optimizer.warmup_steps=N with N < {num_steps} (e.g. "
            f"{num_steps // 10}), raise --{prefix}.training.num_steps, or pass "
            f"--{prefix}.optimizer.schedule=constant."
        )


def _call_get_config(path: str, arg: str | None) -> ml_collections.ConfigDict:
    if not path.endswith(".py") or not os.path.isfile(path):
        raise ConfigError(
            f"Config file {path!r} does not exist or is not a .py file. "
            f"Pass --config=configs/NAME.py[:ARGS]; available: {', '.join(available_configs())}."
        )
    _make_recipe_package_importable(path)
    module_name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {path!r} defines no get_config(arg) function.")
    valid_args = tuple(getattr(module, "ARGS", RECIPE_ARGS))
    if arg is not None and arg not in valid_args:
        raise ConfigError(
            f"Config argument {arg!r} of {path!r} is not known (it would be silently ignored). "
            f"Pass --config={path}:ARG with ARG one of {', '.join(valid_args)}, or no argument."
        )
    config = module.get_config(arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path!r} must return an ml_collections.ConfigDict.")
    return config


def _make_recipe_package_importable(path: str) -> None:
    """Recipes import their bases (`from configs import base_dit`), big_vision style."""
    recipe_dir = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(recipe_dir, "__init__.py")):
        root = os.path.dirname(recipe_dir)
        if root not in sys.path:
            sys.path.insert(0, root)


def available_configs(directory: str = "configs") -> list[str]:
    """Recipe files a user can name with --config (those that define get_config)."""
    if not os.path.isdir(directory):
        return []
    paths = [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.endswith(".py")]
    return [p for p in paths if "def get_config" in open(p, encoding="utf-8").read()]


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, raw_value: str) -> None:
    """Sets `config.<dotted_key>` from a command-line string, keeping the field's type."""
    *parents, leaf = dotted_key.split(".")
    node = config
    walked = []
    for name in parents:
        node = _child(node, name, walked, dotted_key)
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(
                f"--config.{dotted_key}: 'config.{'.'.join([*walked, name])}' is a value, not a "
                "section, so it has no fields to set."
            )
        walked.append(name)
    _child(node, leaf, walked, dotted_key)  # validates the key
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(
            f"--config.{dotted_key} names a whole section; set one of its fields instead: "
            f"{', '.join(sorted(current.keys()))}."
        )
    expected = _field_type(node, leaf)
    node[leaf] = parse_value(raw_value, expected, f"config.{dotted_key}")


def _child(node: ml_collections.ConfigDict, name: str, walked: list[str], dotted_key: str) -> Any:
    if name in node:
        return node[name]
    where = "config." + ".".join(walked) if walked else "config"
    valid = sorted(node.keys())
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"Unknown config key '{dotted_key}' (no field '{name}' in {where}).{hint} "
        f"Valid fields of {where}: {', '.join(valid)}."
    )


def _field_type(node: ml_collections.ConfigDict, leaf: str) -> type | None:
    """The declared type of a field: its value's type, or a placeholder's declared type."""
    field = node._fields[leaf]  # ConfigDict keeps FieldReferences for placeholders here.
    if isinstance(field, FieldReference):
        return field.get_type()
    return None if field is None else type(field)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_value(raw: str, expected: type | None, name: str) -> Any:
    """Parses a command-line string into `expected` (None: a Python literal or a plain string)."""
    try:
        if expected is bool:
            lowered = raw.strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
            raise ValueError
        if expected is int:
            return int(raw)
        if expected is float:
            return float(raw)
        if expected is str:
            return None if raw in ("None", "none", "null") else raw
        if expected in (tuple, list):
            value = ast.literal_eval(raw) if raw.strip()[:1] in "([" else raw.split(",")
            return expected(value)
        if expected is dict:
            return json.loads(raw)
    except (ValueError, SyntaxError):
        kind, example = _KINDS.get(expected, (expected.__name__, "--config.x=..."))
        raise ConfigError(
            f"--{name}={raw!r} is not a valid {kind}. Pass {kind}s like this: {example}."
        ) from None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


_KINDS = {
    bool: ("boolean", "--config.x=true"),
    int: ("integer", "--config.x=8"),
    float: ("number", "--config.x=1e-4"),
    tuple: ("tuple", "--config.x='(1, 2)' or --config.x=1,2"),
    dict: ("JSON object", "--config.x='{\"a\": 1}'"),
}


def split_config_flags(argv: Sequence[str]) -> tuple[list[str], str | None, list[tuple[str, str]]]:
    """Separates `--config=SPEC` and `--config.key=value` from the other command-line flags.

    Returns (remaining argv, the config spec or None, overrides in the order given).
    """
    remaining, spec, overrides = [], None, []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config=") or arg.startswith("--config."):
            flag, has_value, value = arg.partition("=")
            if not has_value:  # `--config X` or `--config.a.b X`
                if i + 1 >= len(args):
                    raise ConfigError(f"{flag} needs a value: {flag}=VALUE.")
                value = args[i + 1]
                i += 1
            if flag == "--config":
                spec = value
            else:
                overrides.append((flag[len("--config.") :], value))
        else:
            remaining.append(arg)
        i += 1
    return remaining, spec, overrides


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON, written into every run directory."""
    return config.to_json_best_effort(indent=2, sort_keys=True)
