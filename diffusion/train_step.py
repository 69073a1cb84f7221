"""The train state and the jitted train step of one model, under explicit shardings.

A train state is a dict of arrays (nothing else), so Orbax saves it whole and `jax.jit` can donate
it:
    params     the model's nnx.Param state (logical names carried as Variable metadata)
    opt_state  optax state; Adam's moments inherit the parameters' logical names, hence sharding
    ema        exponential moving average of params (evaluation and sampling use it)
    step       number of updates applied
    rng        the run's base key; the key of step k is fold_in(rng, k), so a resumed run draws
               exactly the numbers an uninterrupted one would

A fine-tune that trains a part of the model (`trainable`: low-rank adapters) differentiates and
updates only that part: the optimizer state and the EMA's updates cover it alone, and every other
parameter is carried through each step untouched (bitwise).

What differs between the model families is only the loss (`diffusion.families`). A loss takes
(model, frozen, batch, key) and returns (loss, metrics), where `frozen` is a model that is read but
not trained (the DiT's CLIP text tower) or None.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
    frozen: the read-only model passed to the loss (or None).
    trainable: a parameter-path predicate ((path,) -> bool): only those parameters are trained;
      None trains them all.
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
        trainable: Callable[[tuple], bool] | None = None,
    ):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.init_model, self.loss_fn, self.tx = init_model, loss_fn, tx
        self.mesh, self.rules, self.seed = mesh, rules, seed
        self.ema_decay, self.nan_policy = ema_decay, nan_policy
        self.trainable = trainable
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

    def split_trainable(self, params):
        """(trained part, fixed part) of a params state; (params, None) when all are trained."""
        if self.trainable is None:
            return params, None
        return nnx.split_state(params, lambda path, _: self.trainable(path), ...)

    def join_trainable(self, trained, fixed):
        return trained if fixed is None else nnx.merge_state(trained, fixed)

    def _state_from_params(self, params) -> dict[str, Any]:
        return {
            "params": params,
            "opt_state": self.tx.init(self.split_trainable(params)[0]),
            "ema": params if self.ema_decay > 0 else None,
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(self.seed)),
        }

    def init_state(self, base_params: Mapping[tuple, Any] | None = None) -> dict[str, Any]:
        """The whole train state, every array created directly in its sharding: one program
        (the model's parameters, then the optimizer and EMA states from them).

        base_params: {parameter path: host array} replacing those freshly initialised (a
        fine-tune's pretrained weights), each sent straight to its shards.
        """
        if base_params is None:
            create = lambda: self._state_from_params(sharding.split_state_of(self.init_model))
            with sharding.activate(self.mesh, self.rules):
                return jax.jit(create, out_shardings=self.state_shardings)()
        param_shardings = self.state_shardings["params"]
        with sharding.activate(self.mesh, self.rules):
            params = jax.jit(
                lambda: sharding.split_state_of(self.init_model), out_shardings=param_shardings
            )()
        placed = dict(nnx.to_flat_state(param_shardings))
        replaced = []
        for path, variable in nnx.to_flat_state(params):
            if path in base_params:
                value = np.asarray(base_params[path], variable.get_value().dtype)
                if value.shape != variable.get_value().shape:
                    raise ValueError(
                        f"base parameter {'/'.join(map(str, path))} has shape {value.shape}, "
                        f"the model's is {variable.get_value().shape}"
                    )
                variable = variable.replace(jax.device_put(value, placed[path].get_value()))
            replaced.append((path, variable))
        params = nnx.from_flat_state(replaced)
        with sharding.activate(self.mesh, self.rules):
            return jax.jit(
                self._state_from_params,
                in_shardings=(param_shardings,),
                out_shardings=self.state_shardings,
            )(params)

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

        old_trained, fixed = self.split_trainable(state["params"])

        def loss_of(trained):
            frozen = self._frozen_model(frozen_state)
            model = self.model(self.join_trainable(trained, fixed))
            return self.loss_fn(model, frozen, batch, key)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(old_trained)
        updates, opt_state = self.tx.update(grads, state["opt_state"], old_trained)
        trained = optax.apply_updates(old_trained, updates)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if self.nan_policy == "skip":  # keep the old state; the step counter still advances
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            trained = keep(trained, old_trained)
            opt_state = keep(opt_state, state["opt_state"])
        params = self.join_trainable(trained, fixed)
        ema = state["ema"]
        if ema is not None:  # the fixed part of the EMA is the fixed parameters: left as is
            ema_trained, ema_fixed = self.split_trainable(ema)
            decay = optim.ema_decay_at(step, self.ema_decay)
            ema = self.join_trainable(optim.ema_update(ema_trained, trained, decay), ema_fixed)
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
