"""Starting several JAX processes: explicit coordinator flags, or the TPU pod's own discovery."""

from __future__ import annotations

import os

import jax

from diffusion.errors import UserError

# Set by the Cloud TPU runtime on every host of a multi-host slice.
_TPU_POD_VARIABLES = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


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
