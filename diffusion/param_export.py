"""Exported parameters: the weights a sampler loads (e.g. the EMA), apart from the checkpoints.

Layout of an export directory (``<workdir>/params/``): one Orbax ``StandardCheckpointer`` save of
the parameters as a nested dict of arrays (see ``diffusion.storable_state``), and, once Orbax has
finalised it, ``export.json``: the step and a :func:`fingerprint` of the values it holds. An
export is written beside its path and renamed into place, so a reader never sees half of one, and
an export of the same values is not written again.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

# `checkpoints` also registers the jax.Array handler that Orbax uses for these writes.
from diffusion import checkpoints, distributed, errors, storable_state

# Written into an export once Orbax has finalised it: which step and values the directory holds.
EXPORT_RECORD = "export.json"
_ORBAX_FINALISED = "_CHECKPOINT_METADATA"  # written by Orbax's finalisation of a checkpoint


def export_params(path: str | os.PathLike, params: Any, *, step: int | None = None) -> str:
    """Writes ``params`` (e.g. the EMA weights) alone to ``path`` for sampling. Synchronous;
    every process calls it. Returns the absolute path.

    A complete export of the same values (``export.json`` naming ``step`` and a fingerprint of
    the values, written after Orbax finalised the directory) is left as it is: rerunning a
    finished run does not rewrite files that a sampler may be reading. Other values are written
    beside it (``<path>.new``) and renamed into place, so ``path`` never holds a half export.

    Raises:
      CheckpointWriteError: the export could not be written (disk full, permissions); the
        partial export is removed and what ``path`` held before is unchanged.
    """
    path = os.path.abspath(os.fspath(path))
    record = {"step": None if step is None else int(step), "fingerprint": fingerprint(params)}
    if read_export_record(path) == record:
        return path
    staging = path + ".new"
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(staging, storable_state.to_storable(params), force=True)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            _write_json_atomically(os.path.join(staging, EXPORT_RECORD), record)
            _replace_directory(staging, path)
    except (OSError, ValueError, RuntimeError) as error:
        os_error = errors.os_error_of(error)
        if os_error is None:
            raise
        with contextlib.suppress(Exception):  # let the writes already under way end first
            checkpointer.wait_until_finished()
        checkpoints.remove_until_settled(lambda: _partial_exports(staging))
        cause, fix = errors.describe_os_error(os_error)
        at = f" writing {os_error.filename}" if os_error.filename else ""
        before = "is unchanged" if os.path.isdir(path) else "does not exist yet"
        raise checkpoints.CheckpointWriteError(
            f"could not export the parameters to {path}: {cause}{at}. The partial export was "
            f"removed; {path} {before}, and the checkpoints are intact. {fix}; the same command "
            "then writes the export again."
        ) from error
    finally:
        checkpointer.close()
    distributed.barrier("parameters exported")
    return path


def read_export_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``export.json`` of a complete export at ``path``; None when there is none."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, _ORBAX_FINALISED)):
        return None
    try:
        with open(os.path.join(path, EXPORT_RECORD), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_params(path: str | os.PathLike, abstract_params: Any) -> Any:
    """Loads parameters written by :func:`export_params` onto ``abstract_params``' shardings."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no exported parameters at {path}")
    abstract, target = storable_state.restore_target(abstract_params)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.restore(path, target)
    return storable_state.from_storable(stored, abstract)


# ------------------------------------------------------------------------------------------------
# Fingerprint of the exported values
# ------------------------------------------------------------------------------------------------


def fingerprint(tree: Any) -> str:
    """A digest of a pytree's names, shapes, dtypes and values, the same on every process.

    Arrays with a full copy on this process are hashed on the host (SHA-256 of their bytes);
    trees with arrays sharded over processes get a position-weighted 32-bit sum of their bits,
    computed as one global program, since no process holds all of their values.
    """
    named = [
        (names, leaf if isinstance(leaf, jax.Array) else np.asarray(leaf))
        for names, leaf in storable_state.named_storable_leaves(tree)
    ]
    local = all(_has_local_copy(leaf) for _, leaf in named)
    digest = hashlib.sha256()
    for names, leaf in named:
        digest.update(f"{'/'.join(names)}:{np.dtype(leaf.dtype).name}:{np.shape(leaf)};".encode())
        if local:
            digest.update(np.ascontiguousarray(_local_copy(leaf)).tobytes())
    if not local:
        sums = _local_copy(_bit_sums([leaf for _, leaf in named]))  # replicated
        digest.update(sums.astype(np.uint32).tobytes())
    return ("sha256:" if local else "bitsum32:") + digest.hexdigest()


def _has_local_copy(x: Any) -> bool:
    if not isinstance(x, jax.Array):
        return True
    return x.is_fully_addressable or x.is_fully_replicated


def _local_copy(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # a full replica
    return np.asarray(jax.device_get(x))


@jax.jit
def _bit_sums(leaves: list[jax.Array]) -> jax.Array:
    """Per leaf: sum over elements of (bits of the element) * (1 + flat index mod 65521), mod
    2^32. Integer sums do not depend on the order of reduction, hence not on the mesh."""

    def bits(x):
        if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
            return x.astype(jnp.uint32)
        if x.dtype.itemsize == 2:
            return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        b = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types: a trailing axis of 2
        return b if x.dtype.itemsize == 4 else b[..., 0] * jnp.uint32(31) + b[..., 1]

    sums = []
    for x in leaves:
        b = bits(x)
        index = jnp.zeros(b.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(b.ndim)):
            index = index + jax.lax.broadcasted_iota(jnp.uint32, b.shape, axis) * jnp.uint32(
                stride % 2**32
            )
            stride *= b.shape[axis]
        sums.append(jnp.sum(b * (index % jnp.uint32(65521) + 1), dtype=jnp.uint32))
    return jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def _write_json_atomically(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _replace_directory(new: str, path: str) -> None:
    """Puts the directory ``new`` at ``path``: the old one is renamed aside, then removed."""
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _partial_exports(staging: str) -> list[str]:
    """``staging`` and Orbax's ``<staging>.orbax-checkpoint-tmp-<time>`` directories, if there."""
    temporaries = glob.glob(glob.escape(staging) + ".orbax-checkpoint-tmp*")
    return [staging, *temporaries] if os.path.exists(staging) else temporaries
