"""A frozen model replicated on this process's devices, applied to batches split over them: how
encode.py runs its encoders (each process encodes its own shards, with no collective)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class LocalReplicas:
    """`fn(model, *inputs)` jitted with the model replicated on this process's devices and every
    input and output split over them along the first (batch) axis."""

    def __init__(self, model: nnx.Module, fn: Callable, num_inputs: int, batch_size: int):
        devices = jax.local_devices()
        self.batch_size = -(-max(1, batch_size) // len(devices)) * len(devices)  # divisible
        mesh = Mesh(np.array(devices), ("data",))
        batch = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, replicated)
        self.program = jax.jit(
            lambda state, *inputs: fn(nnx.merge(graphdef, state), *inputs),
            in_shardings=(replicated, *[batch] * num_inputs),
            out_shardings=batch,
        )

    def __call__(self, *inputs: np.ndarray):
        """The outputs (numpy) for inputs of at most `batch_size` rows, padded to it by repeating
        the last row (one compiled shape for every batch) and cut back after."""
        count = len(inputs[0])
        pad = lambda x: np.concatenate([x, np.repeat(x[-1:], self.batch_size - count, 0)])
        outputs = jax.device_get(self.program(self.state, *map(pad, inputs)))
        return jax.tree.map(lambda y: np.asarray(y)[:count], outputs)
