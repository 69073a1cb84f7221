"""Orbax checkpoints: one atomic composite per step, resume from the latest complete one.

Layout of ``<workdir>/checkpoints/<step>/`` (one ``ocp.args.Composite`` per step):
  ``state/``          the train state (params, optimizer state, EMA, step, RNG key, ...) as a
                      nested dict of arrays (``ocp.args.StandardSave``); typed PRNG keys are stored
                      as their ``jax.random.key_data`` (see ``diffusion.storable_state``).
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

The parameters a sampler loads are exported apart from the checkpoints (``diffusion.param_export``).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from diffusion import distributed, errors, storable_state

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
        STATE_ITEM: ocp.args.StandardSave(storable_state.to_storable(train_state)),
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


def remove_until_settled(
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
    remove_until_settled(lambda: list(_temporary_steps(directory)))
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
    abstract, target = storable_state.restore_target(abstract_train_state)
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
        train_state=storable_state.from_storable(restored[STATE_ITEM], abstract),
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
# The run's config
# ------------------------------------------------------------------------------------------------


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
