"""Starting several JAX processes: explicit coordinator flags, or the TPU pod's own discovery."""

from __future__ import annotations

import contextlib
import os
import sys

import jax

from diffusion.errors import UserError

# Set by the Cloud TPU runtime on every host of a multi-host slice.
_TPU_POD_VARIABLES = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")

# How the errors of a collective or of the coordination service read when a peer process is gone.
_LOST_PEER_MARKERS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
    "Socket closed",
    "heartbeat timeout",
)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Calls `jax.distributed.initialize` when this run spans several processes.

    With a coordinator address the three values are explicit (CPU or GPU clusters; on CPU the
    collectives run over gloo). On a multi-host TPU slice JAX finds them itself. Otherwise this is
    one process and nothing happens.
    """
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise UserError(
                "--coordinator_address needs --num_processes and --process_id as well "
                f"(got num_processes={num_processes}, process_id={process_id})."
            )
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id} must be in [0, {num_processes}).")
        if (
            jax.config.jax_platforms in (None, "", "cpu")
            or os.environ.get("JAX_PLATFORMS") == "cpu"
        ):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif any(os.environ.get(name) for name in _TPU_POD_VARIABLES):
        jax.distributed.initialize()


def barrier(name: str) -> None:
    """Waits until every process reaches `name` (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def lost_peer_error(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain (itself or what it was raised from) that says another process
    of the run is gone, or None."""
    if jax.process_count() < 2:
        return None
    while error is not None:
        if isinstance(error, jax.errors.JaxRuntimeError) and any(
            marker in str(error) for marker in _LOST_PEER_MARKERS
        ):
            return error
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def exit_if_a_peer_is_lost(program: str, workdir: str):
    """Turns the loss of another process into one clear message and exit status 1.

    The process exits at once (`os._exit`): at a normal exit `jax.distributed.shutdown` would
    wait for the dead process at its shutdown barrier, then abort with a C++ stack trace.
    """
    try:
        yield
    except Exception as error:
        cause = lost_peer_error(error)
        if cause is None:
            raise
        first_line = str(cause).strip().splitlines()[0]
        print(
            f"{program}: lost a peer: process {jax.process_index()} of {jax.process_count()} "
            f"lost contact with another process of this run ({first_line}). That process died "
            "or its host went away; this one stops too, without saving. To resume, start all "
            f"{jax.process_count()} processes again with the same flags: training continues "
            f"from the newest complete checkpoint under {os.path.abspath(workdir)}.",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)
