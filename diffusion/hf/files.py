"""Reading a `save_pretrained` directory: the checks on its files, config.json, the safetensors
weights (one file or the shards of an index), and the tensor-by-tensor checks shared by every
import.

transformers writes `model.safetensors`, diffusers `diffusion_pytorch_model.safetensors` (each
with a `.index.json` when sharded); a `Layout` names them and the library that converts pickled
`.bin` weights, which are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion import sharding
from diffusion.errors import UserError

CONFIG_FILE = "config.json"


class CheckpointError(UserError):
    """The checkpoint directory or its contents cannot be imported."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """The file names one library's `save_pretrained` writes."""

    library: str  # who wrote the directory, named in error messages
    weights_file: str  # the unsharded safetensors file
    index_file: str  # the index of a sharded safetensors checkpoint
    pickled: tuple[str, ...]  # pickled weights we refuse
    loader: str  # the Python expression that loads the pickled model, for the conversion hint


TRANSFORMERS = Layout(
    library="transformers",
    weights_file="model.safetensors",
    index_file="model.safetensors.index.json",
    pickled=("pytorch_model.bin", "pytorch_model.bin.index.json"),
    loader="transformers.CLIPModel.from_pretrained(dir)",
)
DIFFUSERS = Layout(
    library="diffusers",
    weights_file="diffusion_pytorch_model.safetensors",
    index_file="diffusion_pytorch_model.safetensors.index.json",
    pickled=("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"),
    loader="diffusers.AutoencoderKL.from_pretrained(dir)",
)
# transformers' names: the defaults of `read_safetensors`.
WEIGHTS_FILE = TRANSFORMERS.weights_file
WEIGHTS_INDEX_FILE = TRANSFORMERS.index_file
PICKLED_WEIGHTS = TRANSFORMERS.pickled


def check_directory(directory: str, layout: Layout = TRANSFORMERS) -> None:
    """Raises CheckpointError unless `directory` holds config.json and safetensors weights."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
    files = set(os.listdir(directory))
    if CONFIG_FILE not in files:
        raise CheckpointError(
            f"{directory!r} has no {CONFIG_FILE}; expected a directory written by "
            f"{layout.library}' save_pretrained (found: {sorted(files)})"
        )
    if layout.weights_file not in files and layout.index_file not in files:
        if files & set(layout.pickled):
            pickled = sorted(files & set(layout.pickled))
            raise CheckpointError(
                f"{directory!r} only has pickled PyTorch weights ({pickled}); pickled weights are "
                "refused because unpickling can run arbitrary code. Convert them once in a trusted "
                f"environment: `m = {layout.loader}` then "
                f"`m.save_pretrained(dir, safe_serialization=True)`, which writes "
                f"{layout.weights_file}"
            )
        raise CheckpointError(
            f"{directory!r} has no {layout.weights_file} (or {layout.index_file}); found "
            f"{sorted(files)}"
        )


def read_config(directory: str, layout: Layout = TRANSFORMERS) -> dict:
    """config.json as a dict, with a clear error when it is not JSON."""
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(
            f"{path} is not valid JSON ({error}); write it again with {layout.library}' "
            "save_pretrained"
        ) from error


def read_safetensors(
    directory: str, weights_file: str = WEIGHTS_FILE, index_file: str = WEIGHTS_INDEX_FILE
) -> dict[str, np.ndarray]:
    """All tensors of `weights_file` (or the shards `index_file` lists) as float32/int numpy."""
    from safetensors import SafetensorError, safe_open

    if os.path.exists(os.path.join(directory, weights_file)):
        shards = [weights_file]
    else:
        with open(os.path.join(directory, index_file)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        path = os.path.join(directory, shard)
        try:
            # The flax framework reads bfloat16 too (numpy has no bfloat16).
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    value = np.asarray(f.get_tensor(name))
                    if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
                        value = value.astype(np.float32)
                    tensors[name] = value
        except (SafetensorError, OSError) as error:
            state = (
                f"is truncated or damaged ({os.path.getsize(path)} bytes; an interrupted "
                "download or copy)"
                if os.path.isfile(path)
                else f"is missing ({index_file} names it)"
            )
            raise CheckpointError(
                f"cannot read the weights file {path!r}: {error}. The file {state}; download it "
                "again, or re-save the model with save_pretrained(dir, safe_serialization=True)"
            ) from error
    return tensors


# ============================================================================================
# Tensor by tensor
# ============================================================================================

# (our parameter path, checkpoint tensor name, expected checkpoint shape, checkpoint -> ours)
Entry = tuple[tuple, str, tuple, Callable[[np.ndarray], np.ndarray]]


def take_tensor(
    tensors: Mapping[str, np.ndarray], name: str, expected_shape: tuple, used: set
) -> np.ndarray:
    """tensors[name], checked against the shape config.json implies; `name` joins `used`."""
    if name not in tensors:
        raise CheckpointError(
            f"tensor {name!r} (expected shape {expected_shape} from config.json) is missing from "
            "the safetensors file; the config and the weights do not belong together"
        )
    value = tensors[name]
    if tuple(value.shape) != tuple(expected_shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(value.shape)} in the safetensors file but "
            f"config.json implies {tuple(expected_shape)}; the config and the weights do not match"
        )
    used.add(name)
    return value


def convert_entries(
    tensors: Mapping[str, np.ndarray], entries: list[Entry], used: set
) -> dict[tuple, np.ndarray]:
    """{our path: converted array} for `entries`, each tensor checked by `take_tensor`."""
    return {
        path: convert(take_tensor(tensors, name, shape, used))
        for path, name, shape, convert in entries
    }


def check_all_used(
    tensors: Mapping[str, np.ndarray], used: set, ignored_suffixes: tuple[str, ...] = ()
) -> None:
    """Raises CheckpointError naming the first tensor no entry took."""
    unused = sorted(n for n in set(tensors) - used if not n.endswith(ignored_suffixes))
    if unused:
        raise CheckpointError(
            f"tensor {unused[0]!r} (shape {tuple(tensors[unused[0]].shape)}) has no place in "
            f"the model config.json describes ({len(unused)} unused tensors in all)"
        )


def module_with_params(
    init_fn: Callable[[], nnx.Module],
    params: Mapping[tuple, np.ndarray],
    mesh: Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
):
    """The module `init_fn()` builds (never initialised), its parameters taken from `params`.

    With a `mesh`, each parameter goes from host memory straight to its shards (its logical axis
    names under `rules`), so a model larger than one device's memory is never whole on one.
    """
    abstract = nnx.eval_shape(init_fn)
    graphdef, state = nnx.split(abstract)
    values = []
    for path, variable in nnx.to_flat_state(state):
        if path not in params:
            raise CheckpointError(f"no checkpoint tensor for parameter {'/'.join(map(str, path))}")
        expected = variable.get_value()
        value = params[path]
        if value.shape != expected.shape:  # a mapping bug, not a user error
            raise CheckpointError(
                f"parameter {'/'.join(map(str, path))}: converted shape {value.shape} "
                f"!= model shape {expected.shape}"
            )
        value = np.asarray(value, expected.dtype)
        if mesh is not None:
            names = sharding.variable_logical_names(variable)
            placed = sharding.logical_sharding(names, mesh, rules, shape=value.shape)
            values.append((path, variable.replace(jax.device_put(value, placed))))
        else:
            values.append((path, variable.replace(jnp.asarray(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(values))
