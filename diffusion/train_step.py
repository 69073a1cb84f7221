"""The train state and the jitted train step of one model, under explicit shardings.

A train state is a dict of arrays (nothing else), so Orbax saves it whole and `jax.jit` can donate
it:
    params     the model's nnx.Param state (logical names carried as Variable metadata)
    opt_state  optax state; Adam's moments inherit the parameters' logical names, hence sharding
    ema        exponential moving average of params (evaluation and sampling use it)
    step       number of updates applied
    rng        the run's base key; the key of step k is fold_in(rng, k), so a resumed run draws
               exactly the numbers an uninterrupted one would

What differs between the model families is only the loss (`diffusion.families`). A loss takes
(model, frozen, batch, key) and returns (loss, metrics), where `frozen` is a model that is read but
not trained (the DiT's CLIP text tower) or None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion import optim, sharding
from diffusion.models import layers

LossFn = Callable[[nnx.Module, Any, dict, jax.Array], tuple[jax.Array, dict]]
NAN_POLICIES = ("stop", "skip")


def _global_norm(tree) -> jax.Array:
    return optax.tree.norm(sharding.unbox(tree))


class TrainStep:
    """Creates the sharded train state and the jitted, donated train step of one model.

    init_model: builds the model (deterministic: seeds its own nnx.Rngs).
    loss_fn: (model, frozen, batch, key) -> (loss, metrics dict of scalars).
    frozen_params / frozen_graphdef: the read-only model passed to the loss (or None).
    """

    def __init__(
        self,
        init_model: Callable[[], nnx.Module],
        loss_fn: LossFn,
        tx: optax.GradientTransformation,
        mesh: Mesh,
        *,
        seed: int,
        rules=sharding.DEFAULT_RULES,
        ema_decay: float = 0.0,
        nan_policy: str = "stop",
        frozen: nnx.Module | None = None,
    ):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.init_model, self.loss_fn, self.tx = init_model, loss_fn, tx
        self.mesh, self.rules, self.seed = mesh, rules, seed
        self.ema_decay, self.nan_policy = ema_decay, nan_policy
        self.graphdef, abstract_params, _ = sharding.abstract_state(init_model, mesh, rules)
        abstract = jax.eval_shape(self._state_from_params, abstract_params)
        self.state_shardings = sharding.state_shardings(abstract, mesh, rules)
        self.abstract_state = sharding.abstract_with_shardings(abstract, self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.frozen_graphdef, self.frozen_state = (None, None)
        if frozen is not None:  # sharded by the same rules as trained parameters
            self.frozen_graphdef, frozen_state = nnx.split(frozen)
            frozen_shardings = sharding.state_shardings(frozen_state, mesh, rules)
            self.frozen_state = sharding.shard_tree(frozen_state, frozen_shardings)
        replicated = NamedSharding(mesh, PartitionSpec())
        with sharding.activate(mesh, rules):
            self.step_fn = jax.jit(
                self._train_step,
                in_shardings=(self.state_shardings, self.batch_sharding, None),
                out_shardings=(self.state_shardings, replicated),
                donate_argnums=0,
            )

    def use_abstract_frozen(self, init_frozen: Callable[[], nnx.Module]) -> None:
        """Make the model `init_frozen` builds the frozen one, from shapes alone (nothing is
        allocated): for programs that are lowered or compiled, never run."""
        self.frozen_graphdef, self.frozen_state, _ = sharding.abstract_state(
            init_frozen, self.mesh, self.rules
        )

    def _state_from_params(self, params) -> dict[str, Any]:
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "ema": params if self.ema_decay > 0 else None,
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(self.seed)),
        }

    def init_state(self) -> dict[str, Any]:
        """The whole train state, every array created directly in its sharding: one program
        (the model's parameters, then the optimizer and EMA states from them)."""
        create = lambda: self._state_from_params(sharding.split_state_of(self.init_model))
        with sharding.activate(self.mesh, self.rules):
            return jax.jit(create, out_shardings=self.state_shardings)()

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params)

    def _frozen_model(self, frozen_state):
        """The frozen model, for use in the trace it is merged in (see layers.merge_here)."""
        if frozen_state is None:
            return None
        return layers.merge_here(self.frozen_graphdef, frozen_state)

    def _train_step(self, state, batch, frozen_state):
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)

        def loss_of(params):
            frozen = self._frozen_model(frozen_state)
            return self.loss_fn(self.model(params), frozen, batch, key)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if self.nan_policy == "skip":  # keep the old state; the step counter still advances
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            params = keep(params, state["params"])
            opt_state = keep(opt_state, state["opt_state"])
        ema = state["ema"]
        if ema is not None:
            ema = optim.ema_update(ema, params, optim.ema_decay_at(step, self.ema_decay))
        new_state = {
            **state,
            "params": params,
            "opt_state": opt_state,
            "ema": ema,
            "step": step + 1,
        }
        learning_rate = optim.learning_rate_from_state(opt_state)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": _global_norm(params),
            "finite": finite,
            **({"learning_rate": learning_rate} if learning_rate is not None else {}),
        }
        return new_state, metrics

    def step(self, state, batch):
        """One update. `batch` holds global jax.Arrays sharded like `self.batch_sharding`."""
        with sharding.activate(self.mesh, self.rules):
            return self.step_fn(state, batch, self.frozen_state)

    def compiled_step(self, state, batch):
        """The compiled step, for XLA's FLOP count and memory analysis."""
        with sharding.activate(self.mesh, self.rules):
            return self.step_fn.lower(state, batch, self.frozen_state).compile()
