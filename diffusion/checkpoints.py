"""Orbax checkpoints: one atomic composite per step, resume from the latest complete one.

Layout of ``<workdir>/checkpoints/<step>/`` (one ``ocp.args.Composite`` per step):
  ``state/``          the train state (params, optimizer state, EMA, step, RNG key, ...) as a
                      nested dict of arrays (``ocp.args.StandardSave``); typed PRNG keys are stored
                      as their ``jax.random.key_data`` and re-wrapped on restore.
  ``data_iterator/``  the input pipeline's opaque, JSON-able state, ONE FILE PER PROCESS
                      (``process_<i>-of-<n>.json``, like grain's own handler) because every
                      process reads its own data shard. Restoring needs the same process count.
  ``metadata/``       a JSON dict written by process 0 (e.g. config hash, mesh shape, wall time).

Completeness: Orbax writes a step into ``<step>.orbax-checkpoint-tmp-<time>/`` and renames it to
``<step>/`` only after every item of every process is committed (on object stores it writes
``commit_success.txt`` instead). ``latest_step()`` / ``all_steps()`` list only finalised steps, so a
save interrupted by a kill is never offered. A finalised step that still fails to restore (disk
corruption, a truncated file) is reported with its path by :func:`restore_latest`, which then
falls back to the previous step; nothing is deleted (the trainer renames such a step
``<step>.corrupt``, which Orbax ignores, so that the step can be saved again).

Failed writes: :func:`save_checkpoint` and :func:`finish_writes` turn a write that fails (disk
full, permissions; Orbax reports the failure of a background write at the next save or wait, as
TensorStore's ValueError) into one :class:`CheckpointWriteError`, after removing the failed step's
temporary directory. Orbax deletes old steps only after a new one is finalised, so the previous
checkpoints are intact and the error names the newest of them.

Cross-mesh restore: pass an abstract train state whose leaves are ``jax.ShapeDtypeStruct`` with
the NEW shardings (``diffusion.sharding.abstract_state`` / ``abstract_with_shardings``); arrays are
read straight into those shardings. ``nnx.eval_shape`` alone may drop shardings (flax#5110).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from diffusion import distributed, errors

logger = logging.getLogger(__name__)

# Orbax writes an array whose shards are replicated (data parallelism) cooperatively: each
# replica slices off its part of every shard. Each distinct slice is an eager program compiled on
# the first save, which for the hundreds of small arrays of a train state (biases, norms, Adam's
# moments of them) costs more than writing them: 13 s of a 90 s tiny DiT run on a 2x2x2 mesh.
# Arrays whose per-replica slice would be under this many bytes are written whole by one replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
    """Orbax's default jax.Array handler (with its array metadata store), but replica-parallel
    only above MIN_REPLICA_SLICE_BYTES per slice. Process-wide, like Orbax's registry itself."""
    from orbax.checkpoint._src.metadata import array_metadata_store  # as Orbax's own default

    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
    )
    # Orbax warns on every override (absl logging): expected here, so not shown at each start.
    absl_logger = logging.getLogger("absl")

    def not_the_override_warning(record: logging.LogRecord) -> bool:
        return "Type handler registry" not in record.getMessage()

    absl_logger.addFilter(not_the_override_warning)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.removeFilter(not_the_override_warning)


_register_array_handler()

STATE_ITEM = "state"
DATA_ITERATOR_ITEM = "data_iterator"
METADATA_ITEM = "metadata"
CONFIG_FILENAME = "config.json"


# ------------------------------------------------------------------------------------------------
# Per-process JSON item (data-iterator state)
# ------------------------------------------------------------------------------------------------


def _encode_iterator_state(state: Any) -> dict[str, Any]:
    """Wraps ``get_state()`` output (bytes, str or JSON-able) losslessly into a JSON object."""
    if isinstance(state, bytes):
        return {"kind": "bytes", "value": base64.b64encode(state).decode("ascii")}
    return {"kind": "json", "value": state}


def _decode_iterator_state(payload: Mapping[str, Any]) -> Any:
    if payload["kind"] == "bytes":
        return base64.b64decode(payload["value"])
    return payload["value"]


def _process_filename() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class ProcessLocalJsonHandler(ocp.CheckpointHandler):
    """Writes one JSON file per process (each process's data iterator has its own position)."""

    def save(self, directory: epath.Path, args: ProcessLocalJsonSave) -> None:
        text = json.dumps(_encode_iterator_state(args.item))
        (epath.Path(directory) / _process_filename()).write_text(text)

    def restore(self, directory: epath.Path, args: ProcessLocalJsonRestore | None = None) -> Any:
        path = epath.Path(directory) / _process_filename()
        if not path.exists():
            found = sorted(p.name for p in epath.Path(directory).iterdir())
            raise FileNotFoundError(
                f"{path} does not exist: the data-iterator state was saved by another number of "
                f"processes (files: {found}); resume with the same process count"
            )
        return _decode_iterator_state(json.loads(path.read_text()))

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(ProcessLocalJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessLocalJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(ProcessLocalJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessLocalJsonRestore(ocp.args.CheckpointArgs):
    item: Any = None


# ------------------------------------------------------------------------------------------------
# Train state <-> storable nested dict
# ------------------------------------------------------------------------------------------------


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _leaves_with_names(tree: Any) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
    """Array leaves (Variables unwrapped) with their path names, and the tree's structure."""
    unboxed = jax.tree.map(
        lambda x: x.get_value() if _is_variable(x) else x, tree, is_leaf=_is_variable
    )
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(unboxed)
    named = [(tuple(_path_name(k) for k in path), leaf) for path, leaf in leaves_with_path]
    return named, (jax.tree.structure(tree, is_leaf=_is_variable), treedef)


def _nest(named_leaves: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for names, leaf in named_leaves:
        node = nested
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1] if names else "value"] = leaf
    return nested


def _unnest(nested: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    node: Any = nested
    for name in names or ("value",):
        node = node[name]
    return node


def _storable_leaf(x: Any) -> Any:
    return jax.random.key_data(x) if _is_key(x) else x


def _storable_target(x: Any) -> Any:
    """Restore target of one leaf; typed keys become their uint32 key data."""
    if not _is_key(x):
        return x
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))


def _to_storable(train_state: Any) -> dict[str, Any]:
    named, _ = _leaves_with_names(train_state)
    return _nest([(names, _storable_leaf(leaf)) for names, leaf in named])


def _from_storable(stored: Mapping[str, Any], abstract_train_state: Any) -> Any:
    named, (outer, _) = _leaves_with_names(abstract_train_state)
    values = []
    for names, target in named:
        value = _unnest(stored, names)
        if _is_key(target):
            value = jax.random.wrap_key_data(value, impl=target.dtype._impl)  # noqa: SLF001
        values.append(value)
    # Rebuild with Variables where the target had them.
    leaves_iter = iter(values)

    def refill(x):
        if _is_variable(x):
            if not jax.tree.leaves(x.get_value()):  # optax.MaskedNode: nothing was stored
                return x
            return x.replace(next(leaves_iter))
        return next(leaves_iter)

    return jax.tree.map(refill, abstract_train_state, is_leaf=_is_variable)


def _abstract(x: Any) -> Any:
    """Restore-target leaf: a concrete array becomes a ShapeDtypeStruct with its sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


# ------------------------------------------------------------------------------------------------
# Manager, save, restore
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
    """What :func:`restore_checkpoint` returns."""

    step: int
    train_state: Any
    data_iterator_state: Any  # None when the checkpoint holds none
    metadata: dict[str, Any]
    path: str


def make_checkpoint_manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 2,
    keep_period: int | None = None,
    save_interval_steps: int = 1,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the last ``max_to_keep`` steps and every ``keep_period``-th.

    ``keep_period`` of 0 or None keeps no extra steps. With ``async_save`` the arrays are written
    in a background thread; call ``manager.wait_until_finished()`` before exiting (or before reading
    the directory).
    """
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be >= 1 or None (keep all); got {max_to_keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        keep_period=keep_period or None,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def save_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    train_state: Any,
    *,
    data_iterator_state: Any = None,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
) -> bool:
    """Saves one composite checkpoint (asynchronously if the manager is async).

    Args:
      train_state: any pytree of arrays: dicts, ``nnx.State``, optax states, typed PRNG keys.
      data_iterator_state: the input pipeline's ``get_state()`` (bytes, str or JSON-able), this
        process's own; None saves no iterator item.
      metadata: a JSON-able dict, written by process 0.
      force: save even if the manager's interval policy would skip this step.

    Returns:
      Whether a save was started (the manager may skip steps by its interval policy).
    """
    items: dict[str, Any] = {
        STATE_ITEM: ocp.args.StandardSave(_to_storable(train_state)),
        METADATA_ITEM: ocp.args.JsonSave(dict(metadata or {})),
    }
    if data_iterator_state is not None:
        items[DATA_ITERATOR_ITEM] = ProcessLocalJsonSave(data_iterator_state)
    try:
        return manager.save(step, args=ocp.args.Composite(**items), force=force)
    except (OSError, ValueError, RuntimeError) as error:
        failure = _write_failed(manager, error, step)
        if failure is None:
            raise
        raise failure from error


def finish_writes(manager: ocp.CheckpointManager) -> None:
    """Waits for the checkpoint being written in the background (``manager.wait_until_finished``).

    Raises:
      CheckpointWriteError: that write failed (Orbax raises it here, or at the next save, as
        TensorStore's ValueError); its temporary directory is removed, earlier steps are intact.
    """
    try:
        manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as error:
        failure = _write_failed(manager, error, None)
        if failure is None:
            raise
        raise failure from error


def close_manager(manager: ocp.CheckpointManager) -> None:
    """:func:`finish_writes`, then ``manager.close()`` even when the write failed."""
    try:
        finish_writes(manager)
    finally:
        manager.close()


class CheckpointWriteError(errors.UserError):
    """A checkpoint or the exported parameters could not be written (disk full, permissions).

    Nothing complete was lost: ``intact`` is the newest complete checkpoint (None if there is
    none yet), from which rerunning the same command resumes. ``failed_steps`` were not written.
    """

    def __init__(self, message: str, *, failed_steps=(), intact: str | None = None):
        super().__init__(message)
        self.failed_steps = tuple(failed_steps)
        self.intact = intact


# Orbax writes step N into `N.orbax-checkpoint-tmp-<time>/` and renames it when complete.
_TEMPORARY_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _temporary_steps(directory: str) -> dict[str, int]:
    """{path: step} of the unfinished step directories under ``directory``."""
    return {
        os.path.join(directory, name): int(match.group(1))
        for name in _listdir(directory)
        if (match := _TEMPORARY_STEP.match(name))
    }


def _remove_until_settled(
    list_paths: Callable[[], list[str]], settle_seconds: float = 0.3, limit_seconds: float = 10.0
) -> None:
    """Removes the directories `list_paths()` names until none reappears for `settle_seconds`.

    When one write of a save fails, TensorStore may still be finishing the others it was given
    (they create their directories as they go), so one removal could be undone a moment later.
    """
    deadline = time.monotonic() + limit_seconds
    while True:
        for path in list_paths():
            shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle_seconds)
        if not list_paths() or time.monotonic() > deadline:
            return


def _write_failed(
    manager: ocp.CheckpointManager, error: BaseException, step: int | None
) -> CheckpointWriteError | None:
    """The CheckpointWriteError of a failed save (None when `error` is no write failure), after
    removing the failed step's temporary directory.

    When this is called no write is in flight in this process (the failed one has ended), so
    every ``<step>.orbax-checkpoint-tmp-*`` directory is a leftover of a failed or killed save.
    """
    os_error = errors.os_error_of(error)
    if os_error is None:
        return None
    directory = os.fspath(manager.directory)
    leftovers = _temporary_steps(directory)
    _remove_until_settled(lambda: list(_temporary_steps(directory)))
    failed = sorted(set(leftovers.values())) or ([step] if step is not None else [])
    with contextlib.suppress(OSError, ValueError):
        manager.reload()  # Orbax forgot the old steps it meant to delete after the failed one
    complete = [int(n) for n in _listdir(directory) if n.isdigit()]  # finalised: renamed
    intact = step_path(manager, max(complete)) if complete else None
    kept = (
        f"the last complete checkpoint, {intact}, is intact"
        if intact
        else "there is no complete checkpoint yet"
    )
    cause, fix = errors.describe_os_error(os_error)
    which = f" (step {', '.join(map(str, failed))})" if failed else ""
    at = f" writing {os_error.filename}" if os_error.filename else ""
    then = "then resumes from it" if intact else "then starts the run again"
    message = (
        f"could not write a checkpoint{which} under {directory}: {cause}{at}. Training stopped; "
        f"{kept}, and the partial write was removed. {fix}; the same command {then}."
    )
    logger.error("%s", message)
    return CheckpointWriteError(message, failed_steps=failed, intact=intact)


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
    """Directory of a finalised step."""
    return os.fspath(epath.Path(manager.directory) / str(step))


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    abstract_train_state: Any,
    step: int | None = None,
    *,
    restore_data_iterator: bool = True,
) -> RestoredCheckpoint:
    """Restores ``step`` (default: the latest) onto the shardings of ``abstract_train_state``.

    ``abstract_train_state`` has the structure of the saved train state; its leaves may be
    ``jax.ShapeDtypeStruct`` (with the target sharding) or concrete arrays (their sharding is
    used). Typed PRNG-key leaves come back as typed keys. ``restore_data_iterator=False`` skips
    the per-process iterator state (e.g. to read a checkpoint written by another process count).
    """
    manager.wait_until_finished()
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {manager.directory}")
    abstract = jax.tree.map(_abstract, abstract_train_state, is_leaf=_is_key)
    named, _ = _leaves_with_names(abstract)
    target = _nest([(names, _storable_target(leaf)) for names, leaf in named])
    path = epath.Path(step_path(manager, step))
    items: dict[str, Any] = {
        STATE_ITEM: ocp.args.StandardRestore(target),
        METADATA_ITEM: ocp.args.JsonRestore(),
    }
    has_iterator = restore_data_iterator and (path / DATA_ITERATOR_ITEM).exists()
    if has_iterator:
        items[DATA_ITERATOR_ITEM] = ProcessLocalJsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return RestoredCheckpoint(
        step=int(step),
        train_state=_from_storable(restored[STATE_ITEM], abstract),
        data_iterator_state=restored[DATA_ITERATOR_ITEM] if has_iterator else None,
        metadata=dict(restored[METADATA_ITEM] or {}),
        path=os.fspath(path),
    )


def restore_latest(
    manager: ocp.CheckpointManager, abstract_train_state: Any, *, set_aside_unreadable: bool = False
) -> RestoredCheckpoint | None:
    """Restores the newest complete checkpoint that loads, or returns None if there is none.

    A step that fails to load is logged with its path and skipped for the previous one; if every
    step fails, raises ``RuntimeError`` naming each path and its error. Nothing is deleted. With
    ``set_aside_unreadable``, the steps skipped for an older one are renamed ``<step>.corrupt``
    (kept for a person to inspect), so that training can save those step numbers again.
    """
    manager.wait_until_finished()
    failures, failed_steps = [], []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = restore_checkpoint(manager, abstract_train_state, step)
        except Exception as error:  # noqa: BLE001 - any failure means "try the previous step"
            path = step_path(manager, step)
            logger.error(
                "checkpoint %s failed to restore (%s); trying an earlier step", path, error
            )
            failures.append(f"{path}: {type(error).__name__}: {error}")
            failed_steps.append(step)
            continue
        if set_aside_unreadable and failed_steps:
            _set_aside(manager, failed_steps)
        return restored
    if failures:
        raise RuntimeError("no checkpoint could be restored:\n" + "\n".join(failures))
    return None


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames the step directories to ``<step>.corrupt[-<n>]``, names Orbax does not list."""
    if jax.process_index() == 0:
        for step in steps:
            path = step_path(manager, step)
            target, n = f"{path}.corrupt", 0
            while os.path.exists(target):
                n += 1
                target = f"{path}.corrupt-{n}"
            os.rename(path, target)
            logger.error("moved the unreadable checkpoint %s to %s", path, target)
    distributed.barrier("unreadable checkpoints set aside")
    manager.reload()


# ------------------------------------------------------------------------------------------------
# Parameter export and the run's config
# ------------------------------------------------------------------------------------------------


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
        checkpointer.save(staging, _to_storable(params), force=True)
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
        _remove_until_settled(lambda: _partial_exports(staging))
        cause, fix = errors.describe_os_error(os_error)
        at = f" writing {os_error.filename}" if os_error.filename else ""
        before = "is unchanged" if os.path.isdir(path) else "does not exist yet"
        raise CheckpointWriteError(
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


def fingerprint(tree: Any) -> str:
    """A digest of a pytree's names, shapes, dtypes and values, the same on every process.

    Arrays with a full copy on this process are hashed on the host (SHA-256 of their bytes);
    trees with arrays sharded over processes get a position-weighted 32-bit sum of their bits,
    computed as one global program, since no process holds all of their values.
    """
    named, _ = _leaves_with_names(tree)
    named = [
        (names, leaf if isinstance(leaf, jax.Array) else np.asarray(leaf))
        for names, leaf in ((n, _storable_leaf(x)) for n, x in named)
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


def load_params(path: str | os.PathLike, abstract_params: Any) -> Any:
    """Loads parameters written by :func:`export_params` onto ``abstract_params``' shardings."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no exported parameters at {path}")
    abstract = jax.tree.map(_abstract, abstract_params, is_leaf=_is_key)
    named, _ = _leaves_with_names(abstract)
    target = _nest([(names, _storable_target(leaf)) for names, leaf in named])
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.restore(path, target)
    return _from_storable(stored, abstract)


def write_config(workdir: str | os.PathLike, config: Any) -> str | None:
    """Writes the resolved config to ``<workdir>/config.json`` once, from process 0 only.

    Accepts an ``ml_collections.ConfigDict`` (``to_json_best_effort``) or a JSON-able mapping.
    Returns the path written, or None on other processes / when it already exists.
    """
    if jax.process_index() != 0:
        return None
    path = os.path.join(os.fspath(workdir), CONFIG_FILENAME)
    if os.path.exists(path):
        return None
    os.makedirs(os.fspath(workdir), exist_ok=True)
    if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(indent=2, sort_keys=True)
    else:
        text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a config
    return path
