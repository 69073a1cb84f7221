"""Train states and train steps: pure functions of (state, batch) under explicit shardings.

A train state is a dict of arrays (nothing else), so Orbax saves it whole and `jax.jit` can donate
it:
    params     the model's nnx.Param state (logical names carried as Variable metadata)
    opt_state  optax state; Adam's moments inherit the parameters' logical names, hence sharding
    ema        exponential moving average of params (evaluation and sampling use it)
    step       number of updates applied
    rng        the run's base key; the key of step k is fold_in(rng, k), so a resumed run draws
               exactly the numbers an uninterrupted one would

What differs between the families is only the loss: `clip_loss` and `dit_loss` below. A loss takes
(model, frozen, batch, key) and returns (loss, metrics), where `frozen` is a model that is read but
not trained (the DiT's CLIP text tower) or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion import contrastive, objectives, optim, sharding
from diffusion.errors import UserError
from diffusion.models import layers
from diffusion.schedules import DiscreteSchedule

LossFn = Callable[[nnx.Module, Any, dict, jax.Array], tuple[jax.Array, dict]]
NAN_POLICIES = ("stop", "skip")


# ---------------------------------------------------------------------------------------------
# Losses of the two families
# ---------------------------------------------------------------------------------------------


def clip_loss(
    model,
    frozen,
    batch,
    key,
    *,
    kind: str = "softmax",
    mesh: Mesh | None = None,
    chunked: bool = False,
):
    """Contrastive loss over the GLOBAL batch (every image against every caption).

    Under jit with the batch sharded over devices the plain formula already is global; the chunked
    variant (a ring of ppermutes) gives the same loss and gradients without the B x B matrix.
    A batch with 'negative_caption_tokens' / 'negative_caption_mask' (each caption with one word
    swapped, data.pipeline) also scores every image against its own swapped caption.
    """
    del frozen, key
    image_emb = model.encode_image(batch["image"])  # (B, E), L2-normalised
    text_emb = model.encode_text(batch["tokens"], batch["mask"])  # (B, E)
    negative_emb = None
    if "negative_caption_tokens" in batch:
        negative_emb = model.encode_text(
            batch["negative_caption_tokens"], batch["negative_caption_mask"]
        )
    log_scale = model.logit_scale[...]  # clamped at ln(100) inside the losses
    bias = model.logit_bias[...] if kind == "sigmoid" else None
    if chunked:
        loss = contrastive.ring_contrastive_loss(
            kind, image_emb, text_emb, log_scale, bias, negative_emb, mesh=mesh
        )
    else:
        loss = contrastive.contrastive_loss(
            kind, image_emb, text_emb, log_scale, bias, negative_emb
        )
    scale = jnp.exp(contrastive.clamp_logit_scale(log_scale))
    return loss, {"logit_scale": scale}


def prediction_type_of(diffusion_config) -> str:
    """What the DiT of a recipe's config.diffusion predicts (objectives.PREDICTION_TYPES).

    Flow models predict config.diffusion.flow_prediction_type (runs written before that field
    existed predict the velocity); DDPM models config.diffusion.prediction_type.
    """
    d = diffusion_config
    if d.objective == "flow":
        return d.get("flow_prediction_type", "flow_velocity")
    return d.prediction_type


@dataclasses.dataclass(frozen=True)
class DiffusionObjective:
    """How the DiT is trained: flow matching or a DDPM-style loss, from config.diffusion."""

    objective: str = "flow"
    prediction_type: str = "flow_velocity"  # see objectives.PREDICTION_TYPES
    schedule: DiscreteSchedule | None = None
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    flow_loss_space: str = "prediction"  # see objectives.FLOW_LOSS_SPACES
    min_snr_gamma: float | None = None

    @classmethod
    def from_config(cls, diffusion_config) -> DiffusionObjective:
        """The objective of a recipe's config.diffusion section."""
        d = diffusion_config
        if d.objective not in ("flow", "ddpm"):
            raise UserError(f"config.diffusion.objective={d.objective!r}; valid: 'flow', 'ddpm'.")
        prediction_type = prediction_type_of(d)
        if d.objective == "flow" and prediction_type not in objectives.FLOW_PREDICTION_TYPES:
            raise UserError(
                f"config.diffusion.flow_prediction_type={prediction_type!r}; valid: "
                f"{', '.join(objectives.FLOW_PREDICTION_TYPES)}."
            )
        flow_loss_space = d.get("flow_loss_space", "prediction")
        if d.objective == "flow" and flow_loss_space not in objectives.FLOW_LOSS_SPACES:
            raise UserError(
                f"config.diffusion.flow_loss_space={flow_loss_space!r}; valid: "
                f"{', '.join(objectives.FLOW_LOSS_SPACES)}."
            )
        schedule = None
        if d.objective == "ddpm":
            schedule = DiscreteSchedule.from_name(
                d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr
            )
        return cls(
            objective=d.objective,
            prediction_type=prediction_type,
            schedule=schedule,
            time_sampling=d.time_sampling,
            logit_mean=d.logit_normal_mean,
            logit_std=d.logit_normal_std,
            shift=d.shift,
            flow_loss_space=flow_loss_space,
            min_snr_gamma=d.min_snr_gamma or None,
        )

    def loss(self, model_fn, x0, cond, key):
        if self.objective == "flow":
            return objectives.flow_matching_loss(
                model_fn,
                x0,
                cond,
                key,
                time_sampling=self.time_sampling,
                logit_mean=self.logit_mean,
                logit_std=self.logit_std,
                shift=self.shift,
                prediction_type=self.prediction_type,
                loss_space=self.flow_loss_space,
            )
        return objectives.diffusion_loss(
            model_fn,
            x0,
            cond,
            key,
            schedule=self.schedule,
            prediction_type=self.prediction_type,
            min_snr_gamma=self.min_snr_gamma,
        )


def text_condition(text_encoder, tokens, mask, *, words: bool = False) -> dict[str, jax.Array]:
    """What the DiT sees of a caption: token states for cross-attention, the pooled embedding
    and, with `words` (a DiT with `word_conditioning`), the tower's input-layer word embeddings."""
    states, pooled = text_encoder.text_states(tokens, mask)
    cond = {
        "context": jax.lax.stop_gradient(states),
        "context_mask": mask,
        "pooled": jax.lax.stop_gradient(pooled),
    }
    if words:
        cond["words"] = jax.lax.stop_gradient(text_encoder.word_embeddings(tokens))
    return cond


def dit_model_fn(model):
    """`model_fn(x_t, t, cond)` of the diffusion core, over a text-conditioned DiT."""

    def model_fn(x, t, cond):
        return model(
            x,
            t,
            context=cond["context"],
            context_mask=cond["context_mask"],
            pooled=cond["pooled"],
            words=cond.get("words"),  # the DiT names a missing or unexpected one
        )

    return model_fn


def dit_loss(
    model,
    text_encoder,
    batch,
    key,
    *,
    objective: DiffusionObjective,
    empty_tokens: np.ndarray,
    empty_mask: np.ndarray,
    cond_dropout: float,
):
    """Denoising loss with condition dropout: a caption becomes the empty prompt with probability
    `cond_dropout`, which teaches the unconditional model that guidance needs (Ho & Salimans)."""
    drop_key, loss_key = jax.random.split(key)
    tokens, mask = batch["tokens"], batch["mask"]
    drop = jax.random.bernoulli(drop_key, cond_dropout, (tokens.shape[0], 1))
    tokens = jnp.where(drop, jnp.asarray(empty_tokens, tokens.dtype), tokens)  # (B, L)
    mask = jnp.where(drop, jnp.asarray(empty_mask, mask.dtype), mask)  # (B, L)
    cond = text_condition(text_encoder, tokens, mask, words=model.config.word_conditioning)
    loss, aux = objective.loss(dit_model_fn(model), batch["image"], cond, loss_key)
    return loss, {"mean_t": jnp.mean(aux["t"])}


# ---------------------------------------------------------------------------------------------
# The trainer: state creation and the jitted step
# ---------------------------------------------------------------------------------------------


def _global_norm(tree) -> jax.Array:
    return optax.tree.norm(sharding.unbox(tree))


class Trainer:
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
