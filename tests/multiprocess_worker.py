"""A toy NNX model and its sharded training loop, shared by the sharding/checkpoint tests.

Run as a script, it is one process of a multi-process (``jax.distributed``, gloo collectives)
training run: ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT MESH OUT_DIR``.
It writes ``OUT_DIR/losses_<PROCESS_ID>.json`` and a checkpoint under ``OUT_DIR/checkpoints``.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffusion import checkpoints, meshes, optim, sharding

VOCAB, WIDTH, HIDDEN, SEQ = 32, 16, 64, 4
MESHES = {
    "1": {"data": 1},
    "8data": {"data": 8},
    "2data4fsdp": {"data": 2, "fsdp": 4},
    "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2},
}


class ToyModel(nnx.Module):
    """Embedding -> MLP -> LayerNorm, every parameter annotated with logical axis names."""

    def __init__(self, rngs: nnx.Rngs):
        kernel = nnx.initializers.lecun_normal()
        self.embed = nnx.Embed(
            VOCAB,
            WIDTH,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")),
            rngs=rngs,
        )
        self.up = nnx.Linear(
            WIDTH,
            HIDDEN,
            kernel_init=nnx.with_partitioning(kernel, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            HIDDEN,
            WIDTH,
            kernel_init=nnx.with_partitioning(kernel, ("mlp", "embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)),
            rngs=rngs,
        )
        self.norm = nnx.LayerNorm(
            WIDTH,
            scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)),
            rngs=rngs,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)  # (B, L, D)
        h = sharding.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_embed")
        )
        h = h + self.down(jax.nn.gelu(self.up(h)))  # (B, L, D)
        return self.norm(h)


def global_batch(step: int, batch_size: int) -> dict[str, np.ndarray]:
    """The step's global batch, a pure function of the step (what a resumable pipeline gives)."""
    rng = np.random.default_rng(1000 + step)
    return {
        "tokens": rng.integers(0, VOCAB, size=(batch_size, SEQ)).astype(np.int32),
        "targets": rng.normal(size=(batch_size, SEQ, WIDTH)).astype(np.float32),
    }


def make_tx(accumulation_steps: int = 1, name: str = "adamw") -> optax.GradientTransformation:
    return optim.make_optimizer(
        {
            "name": name,
            "learning_rate": 1e-2,
            "schedule": "cosine",
            "warmup_steps": 2,
            "total_steps": 20,
            "end_lr_fraction": 0.1,
            "weight_decay": 0.1,
            "grad_clip_norm": 1.0,
            "accumulation_steps": accumulation_steps,
        }
    )


class ToyTrainer:
    """State creation and a jitted train step with explicit shardings and a donated state."""

    def __init__(self, mesh, rules=sharding.DEFAULT_RULES, tx=None, ema_decay=0.9):
        self.mesh, self.rules = mesh, rules
        self.tx = tx or make_tx()
        self.graphdef, abstract_params, _ = sharding.abstract_state(
            lambda: ToyModel(nnx.Rngs(0)), mesh, rules
        )
        self.ema_decay = ema_decay
        abstract = jax.eval_shape(self._init_from_params, abstract_params)
        self.state_shardings = sharding.state_shardings(abstract, mesh, rules)
        self.abstract_state = sharding.abstract_with_shardings(abstract, self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        with sharding.activate(mesh, rules):
            self.step_fn = jax.jit(
                self._train_step,
                in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, replicated),
                donate_argnums=0,
            )

    def _init_from_params(self, params):
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "ema": params,
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key(0),
        }

    def init_state(self):
        """The whole train state, created directly sharded."""
        _, params = sharding.create_sharded_state(
            lambda: ToyModel(nnx.Rngs(0)), self.mesh, self.rules
        )
        with sharding.activate(self.mesh, self.rules):
            return jax.jit(self._init_from_params, out_shardings=self.state_shardings)(params)

    def loss(self, params, batch):
        model = nnx.merge(self.graphdef, params)
        prediction = model(batch["tokens"])  # (B, L, D)
        return jnp.mean((prediction - batch["targets"]) ** 2)

    def _train_step(self, state, batch):
        loss, grads = jax.value_and_grad(self.loss)(state["params"], batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "ema": optim.ema_update(state["ema"], params, self.ema_decay),
            "step": state["step"] + 1,
            "rng": jax.random.fold_in(state["rng"], state["step"]),
        }
        return new_state, loss

    def put_batch(self, batch):
        """Each process feeds only its own rows of the global batch."""
        rows = sharding.process_batch_rows(self.mesh, len(batch["tokens"]))
        return sharding.shard_batch({k: v[rows] for k, v in batch.items()}, self.mesh)

    def run(self, state, first_step, num_steps, batch_size):
        losses = []
        with sharding.activate(self.mesh, self.rules):  # activation constraints apply at trace
            for step in range(first_step, first_step + num_steps):
                state, loss = self.step_fn(state, self.put_batch(global_batch(step, batch_size)))
                losses.append(float(loss))
        return state, losses


def main(argv: list[str]) -> None:
    process_id, num_processes, port, mesh_name, out_dir = argv
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(num_processes),
        process_id=int(process_id),
        initialization_timeout=60,
    )
    mesh = meshes.make_mesh(MESHES[mesh_name])
    trainer = ToyTrainer(mesh)
    state, losses = trainer.run(trainer.init_state(), 0, 3, batch_size=16)
    manager = checkpoints.make_checkpoint_manager(os.path.join(out_dir, "checkpoints"))
    checkpoints.save_checkpoint(
        manager, 3, state, data_iterator_state={"next_step": 3, "process": jax.process_index()}
    )
    manager.wait_until_finished()
    manager.close()
    # A hybrid mesh with one process per DCN granule: the data axis runs across processes.
    hybrid = meshes.make_mesh({"data": 1, "fsdp": 4}, dcn_mesh_shape={"data": 2})
    hybrid_processes = [[d.process_index for d in row] for row in hybrid.devices]
    with open(os.path.join(out_dir, f"losses_{process_id}.json"), "w") as f:
        json.dump(
            {
                "losses": losses,
                "devices": jax.device_count(),
                "hybrid_shape": dict(hybrid.shape),
                "hybrid_processes": hybrid_processes,
            },
            f,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
