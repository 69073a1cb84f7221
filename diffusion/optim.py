"""Optimizer from config: AdamW or Muon, masked decoupled weight decay, schedules, clipping, EMA.

Config fields (``configs/common.py: optimizer_config``): ``name`` (``'adamw'`` | ``'muon'``),
``learning_rate``, ``schedule``
(``'cosine'`` | ``'constant'``), ``warmup_steps``, ``total_steps`` (or the ``total_steps``
argument), ``end_lr_fraction``, ``weight_decay``, ``b1``, ``b2``, ``eps``, ``grad_clip_norm``
(0 disables clipping), ``accumulation_steps`` (> 1 wraps everything in ``optax.MultiSteps``),
``muon_ns_steps`` (Muon's Newton-Schulz iterations).

Schedule steps count OPTIMIZER UPDATES: with accumulation, the schedule advances once per
``accumulation_steps`` micro-batches, and ``total_steps`` is the number of updates.

Weight-decay mask (decoupled decay, Loshchilov & Hutter 2019): a parameter is decayed iff its own
name (last path entry) is in ``decay_names`` (default ``('kernel',)``, the weight matrices and
convolution kernels of ``nnx.Linear``/``LinearGeneral``/``Conv``/``Einsum``) AND it has at least
``min_ndim`` (default 2) dimensions. So norms' ``scale``/``bias``, every ``bias``, embedding tables
(``nnx.Embed``'s ``embedding``), learned position embeddings / class tokens and the CLIP logit
scale and bias are NOT decayed, whatever their shape. A patch-embedding convolution is a
``kernel`` and IS decayed (it is a linear projection, not a lookup table). Custom parameters that
should be decayed must be named ``kernel`` (or passed in ``decay_names``).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): the hidden weight matrices
follow the Newton-Schulz orthogonalised Nesterov momentum, scaled to AdamW's update RMS of 0.2
(Liu et al. 2025, "Muon is scalable for LLM training", sec. 2.2), so the learning rate and
weight decay of an AdamW recipe carry over; every other parameter keeps AdamW. Hidden matrices
are the ``kernel``s of Dense layers and attention projections, told apart from the layers that
meet pixels, tokens, classes or the shared embedding space by their logical axis names
(``MUON_ADAMW_AXES``), as Muon's authors keep the embedding and output layers on AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffusion.errors import UserError

SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "muon")

_DEFAULTS = {
    "name": "adamw",
    "schedule": "cosine",
    "warmup_steps": 0,
    "end_lr_fraction": 0.0,
    "weight_decay": 0.0,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "grad_clip_norm": 0.0,
    "accumulation_steps": 1,
    "muon_ns_steps": 5,
}


def _field(config: Mapping[str, Any] | Any, name: str) -> Any:
    getter = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    value = getter(name, _DEFAULTS.get(name))
    if value is None and name not in _DEFAULTS:
        raise UserError(f"optimizer config is missing field {name!r}")
    return value


# ------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ------------------------------------------------------------------------------------------------


def make_learning_rate_schedule(
    learning_rate: float,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    end_lr_fraction: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay or constant.

    Cosine (Loshchilov & Hutter 2017, SGDR without restarts): for ``warmup <= s <= total``,
    ``lr(s) = end + (peak - end) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2`` with
    ``end = end_lr_fraction * peak``; ``lr(s) = end`` after ``total``. Warmup:
    ``lr(s) = peak * s / warmup``.
    """
    if schedule not in SCHEDULES:
        raise UserError(f"unknown learning-rate schedule {schedule!r}; valid: {SCHEDULES}")
    if learning_rate < 0 or warmup_steps < 0:
        raise UserError(
            f"learning_rate ({learning_rate}) and warmup_steps ({warmup_steps}) must be >= 0"
        )
    if schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, learning_rate, warmup_steps),
                optax.constant_schedule(learning_rate),
            ],
            [warmup_steps],
        )
    if total_steps is None or total_steps <= warmup_steps:
        raise UserError(
            f"the cosine schedule needs total_steps > warmup_steps; got total_steps={total_steps}, "
            f"warmup_steps={warmup_steps}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,  # optax counts the warmup inside decay_steps
        end_value=learning_rate * end_lr_fraction,
    )


def learning_rate_schedule_from_config(config: Any, total_steps: int | None = None):
    """:func:`make_learning_rate_schedule` from an optimizer config section."""
    total = total_steps if total_steps is not None else _field(config, "total_steps")
    return make_learning_rate_schedule(
        learning_rate=float(_field(config, "learning_rate")),
        schedule=str(_field(config, "schedule")),
        warmup_steps=int(_field(config, "warmup_steps")),
        total_steps=None if total is None else int(total),
        end_lr_fraction=float(_field(config, "end_lr_fraction")),
    )


# ------------------------------------------------------------------------------------------------
# Weight-decay mask
# ------------------------------------------------------------------------------------------------


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def weight_decay_mask(
    params: Any, decay_names: Sequence[str] = ("kernel",), min_ndim: int = 2
) -> Any:
    """Tree of bools like ``params``: True where decoupled weight decay applies (module docstring).

    Works on ``nnx.State`` (Variables kept, their values become bools), dicts and other pytrees.
    """

    def decide(path, leaf):
        value = leaf.get_value() if _is_variable(leaf) else leaf
        names = [_key_name(k) for k in path]
        name = names[-1] if names else ""
        masked_out = isinstance(value, optax.MaskedNode)  # another optimizer's (Muon's partition)
        decayed = not masked_out and name in decay_names and jnp.ndim(value) >= min_ndim
        return leaf.replace(decayed) if _is_variable(leaf) else decayed

    return jax.tree_util.tree_map_with_path(decide, params, is_leaf=_is_variable)


# ------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------


# Logical axes of the layers that stay on AdamW under Muon: the patch embedding and the pixel
# decoder ('patch'), a pixel-space output convolution ('channels'), token and class embeddings
# ('vocab', 'classes'), CLIP's projections into the shared space ('projection').
MUON_ADAMW_AXES = ("patch", "channels", "vocab", "classes", "projection")
MUON_UPDATE_RMS = 0.2  # AdamW's typical update RMS (Liu et al. 2025)
MUON_MOMENTUM = 0.95  # Nesterov momentum of Muon's reference implementation
# Leading axes a parameter's kernel contracts in `layers.matmul`, by parameter name; a
# convolution or Dense `kernel` contracts all but its last axis.
_CONTRACTED_AXES = {"query_kernel": 1, "key_kernel": 1, "value_kernel": 1, "out_kernel": 2}


def muon_dimension_numbers(params: Any) -> Any:
    """Which parameters Muon orthogonalises, and as which matrix: a tree like ``params``.

    A leaf is ``optax.contrib.MuonDimensionNumbers(reduction_axes, output_axes)`` for a hidden
    weight matrix, None for a parameter that stays on AdamW, and optax's ``MaskedNode`` where
    ``optax.partition`` has masked the parameter out (NNX Variables keep wrapping the leaves,
    so the tree matches ``params`` node for node). A leading 'layers' axis (scanned blocks) is a
    batch axis: each layer is orthogonalised on its own.
    """

    def dimension_numbers(name, value, axes):
        if any(a in MUON_ADAMW_AXES for a in axes):
            return None
        first = 1 if axes[:1] == ("layers",) else 0  # scanned blocks: one matrix per layer
        matrix_ndim = jnp.ndim(value) - first
        contracted = matrix_ndim - 1 if name == "kernel" else _CONTRACTED_AXES.get(name, 0)
        if matrix_ndim < 2 or not 1 <= contracted < matrix_ndim:
            return None
        return optax.contrib.MuonDimensionNumbers(
            reduction_axis=tuple(range(first, first + contracted)),
            output_axis=tuple(range(first + contracted, first + matrix_ndim)),
        )

    def decide(path, leaf):
        value = leaf.get_value() if _is_variable(leaf) else leaf
        if isinstance(value, optax.MaskedNode):
            return leaf
        axes = leaf.get_metadata().get("out_sharding") if _is_variable(leaf) else None
        axes = tuple(axes) if axes is not None else (None,) * jnp.ndim(value)
        name = _key_name(path[-1]) if path else ""
        dims = dimension_numbers(name, value, axes)
        return leaf.replace(dims) if _is_variable(leaf) else dims

    return jax.tree_util.tree_map_with_path(decide, params, is_leaf=_is_variable)


def _is_dimension_numbers(x: Any) -> bool:
    return x is None or isinstance(x, optax.contrib.MuonDimensionNumbers | optax.MaskedNode)


def scale_by_muon(
    ns_steps: int, beta: float, eps: float, weight_dimension_numbers
) -> optax.GradientTransformation:
    """``optax.contrib.scale_by_muon`` (Nesterov momentum, then Newton-Schulz), with the matrices
    of one shape orthogonalised together: one batched product per iteration and shape instead of
    one per parameter (the default DiT's 51 hidden matrices in 8 groups: its compiled step has
    2552 XLA ops instead of 3578). Optax's update to float rounding and optax's state
    (``MuonState``), so checkpoints of either restore into the other.

    Only parameters of equal shape and equal ``MuonDimensionNumbers`` share a group: they carry
    the same logical axes, hence the same sharding, so stacking them should need no resharding
    on a mesh (reasoned, not measured; the v5e AOT test compiles it).
    """
    reference = optax.contrib.scale_by_muon(
        ns_steps=ns_steps, beta=beta, eps=eps, weight_dimension_numbers=weight_dimension_numbers
    )

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        nesterov = jax.tree.map(
            lambda m, g: beta * m + (1 - beta) * g,
            optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
            optax.tree.bias_correction(updates, beta, count),
        )
        coeffs = state.ns_coeffs
        if coeffs.ndim == 1:  # one set of coefficients for every iteration
            coeffs = jnp.broadcast_to(coeffs, (ns_steps, 3))
        orthogonal = _orthogonalize_by_shape(
            nesterov, weight_dimension_numbers(updates), coeffs, eps
        )
        return orthogonal, state._replace(count=count, mu=mu)

    return optax.GradientTransformation(reference.init, update_fn)


def _orthogonalize_by_shape(updates: Any, dims: Any, coeffs: jax.Array, eps: float) -> Any:
    """Newton-Schulz on every leaf of ``updates`` that ``dims`` names a matrix, one batch per
    (shape, dtype, dimension numbers); other leaves (optax's MaskedNode) pass through."""
    dim_leaves, treedef = jax.tree.flatten(dims, is_leaf=_is_dimension_numbers)
    leaves = treedef.flatten_up_to(updates)
    groups: dict[tuple, list[int]] = {}
    for index, (dim, leaf) in enumerate(zip(dim_leaves, leaves, strict=True)):
        if isinstance(dim, optax.contrib.MuonDimensionNumbers):
            groups.setdefault((leaf.shape, leaf.dtype, dim), []).append(index)
    out = list(leaves)
    for (shape, _, dim), indices in groups.items():
        to_matrices, from_matrices = _matrix_view(shape, dim)
        stacked = jnp.concatenate([to_matrices(leaves[i]) for i in indices])  # (n * batch, r, o)
        orthogonal = _newton_schulz(stacked, coeffs, eps)
        for index, part in zip(indices, jnp.split(orthogonal, len(indices)), strict=True):
            out[index] = from_matrices(part)
    return treedef.unflatten(out)


def _matrix_view(shape: tuple[int, ...], dims) -> tuple[Any, Any]:
    """Functions between an array of ``shape`` and its (batch, reduction, output) matrices."""
    ndim = len(shape)
    reduction = tuple(a % ndim for a in _as_tuple(dims.reduction_axis))
    output = tuple(a % ndim for a in _as_tuple(dims.output_axis))
    batch = tuple(a for a in range(ndim) if a not in reduction + output)
    order = batch + reduction + output
    inverse_order = tuple(order.index(a) for a in range(ndim))
    size = lambda axes: math.prod(shape[a] for a in axes)
    flat = (size(batch), size(reduction), size(output))
    ordered_shape = tuple(shape[a] for a in order)
    to_matrices = lambda x: x.transpose(order).reshape(flat)
    from_matrices = lambda m: m.reshape(ordered_shape).transpose(inverse_order)
    return to_matrices, from_matrices


def _newton_schulz(x: jax.Array, coeffs: jax.Array, eps: float) -> jax.Array:
    """Muon's quintic Newton-Schulz iteration on a batch of matrices (b, m, n): each scaled to
    Frobenius norm 1, then X <- a X + (b A + c A^2) X with A = X X^T, one row of ``coeffs``
    (iterations, 3) per iteration, on the wider side (as optax: the result transposes)."""
    wide = x.shape[1] <= x.shape[2]
    x = x if wide else x.mT
    x = x / (jnp.linalg.norm(x, axis=(1, 2), keepdims=True) + eps)
    for a, b, c in coeffs.astype(x.dtype):
        gram = x @ x.mT  # (batch, m, m)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


def scale_to_update_rms(rms: float) -> optax.GradientTransformation:
    """Scales each orthogonalised update (all singular values ~1, so an RMS of
    1 / sqrt(max(fan_in, fan_out))) to the RMS ``rms``."""

    def update_fn(updates, state, params=None):
        del params

        def scale(dims, update):
            if not isinstance(dims, optax.contrib.MuonDimensionNumbers):
                return update
            fan_in = math.prod(update.shape[a] for a in _as_tuple(dims.reduction_axis))
            fan_out = math.prod(update.shape[a] for a in _as_tuple(dims.output_axis))
            return update * (rms * max(fan_in, fan_out) ** 0.5)

        dims = muon_dimension_numbers(updates)
        return jax.tree.map(scale, dims, updates, is_leaf=_is_dimension_numbers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _as_tuple(axes: int | Sequence[int]) -> tuple[int, ...]:
    return (axes,) if isinstance(axes, int) else tuple(axes)


def make_optimizer(
    config: Any,
    total_steps: int | None = None,
    decay_names: Sequence[str] = ("kernel",),
) -> optax.GradientTransformation:
    """AdamW or Muon from an optimizer config (dict / ConfigDict / object with the module's
    fields).

    Chain: global-norm clipping -> the optimizer -> ``-lr(step)``; AdamW: Adam moments ->
    decoupled weight decay (masked); Muon: hidden matrices as in the module docstring, the rest
    as AdamW. Wrapped in ``optax.MultiSteps`` (gradient mean over micro-batches) when
    ``accumulation_steps > 1``. The learning rate is injected as a hyperparameter, so
    ``learning_rate_from_state`` can read the current value for logging.
    """
    name = str(_field(config, "name"))
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer name {name!r}; valid: {OPTIMIZERS}")
    accumulation_steps = int(_field(config, "accumulation_steps"))
    if accumulation_steps < 1:
        raise UserError(f"accumulation_steps must be >= 1; got {accumulation_steps}")
    clip = float(_field(config, "grad_clip_norm") or 0.0)
    if clip < 0:
        raise UserError(f"grad_clip_norm must be >= 0 (0 disables clipping); got {clip}")
    schedule = learning_rate_schedule_from_config(config, total_steps)
    b1, b2, eps = (float(_field(config, k)) for k in ("b1", "b2", "eps"))
    weight_decay = float(_field(config, "weight_decay"))
    ns_steps = int(_field(config, "muon_ns_steps"))
    if ns_steps < 1:
        raise UserError(f"muon_ns_steps must be >= 1 (5 in Muon's reference); got {ns_steps}")
    decay_mask = lambda params: weight_decay_mask(params, decay_names)

    def adamw(learning_rate):
        return optax.adamw(
            learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask
        )

    def muon(learning_rate):
        hidden_matrices = optax.chain(
            scale_by_muon(
                ns_steps=ns_steps,
                beta=MUON_MOMENTUM,
                eps=eps,
                weight_dimension_numbers=muon_dimension_numbers,
            ),
            scale_to_update_rms(MUON_UPDATE_RMS),
            optax.add_decayed_weights(weight_decay, decay_mask),
            optax.scale_by_learning_rate(learning_rate),
        )
        label = lambda dims: "adamw" if dims is None else "muon"
        return optax.partition(
            {"muon": hidden_matrices, "adamw": adamw(learning_rate)},
            lambda params: jax.tree.map(
                label, muon_dimension_numbers(params), is_leaf=_is_dimension_numbers
            ),
        )

    optimizer = optax.inject_hyperparams({"adamw": adamw, "muon": muon}[name])
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    tx = optax.chain(*parts, optimizer(learning_rate=schedule))
    if accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps).gradient_transformation()
    return tx


def learning_rate_from_state(opt_state: Any) -> jax.Array | None:
    """The learning rate last used by an optimizer from :func:`make_optimizer` (for logging)."""
    found = []

    def has_hyperparams(x: Any) -> bool:
        return isinstance(getattr(x, "hyperparams", None), dict)

    def visit(x: Any) -> Any:
        if has_hyperparams(x):
            found.append(x.hyperparams["learning_rate"])
        return x

    jax.tree.map(visit, opt_state, is_leaf=has_hyperparams)
    return found[0] if found else None


# ------------------------------------------------------------------------------------------------
# EMA of parameters
# ------------------------------------------------------------------------------------------------


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` leaf by leaf (Polyak averaging), in float32
    arithmetic and cast back to the EMA's dtype."""

    def one(e, p):
        mixed = decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)
        return mixed.astype(e.dtype)

    return jax.tree.map(one, ema, params)


def ema_decay_at(step: jax.Array | int, max_decay: float, warmup: bool = True) -> jax.Array:
    """EMA decay for update ``step`` (0-based count of updates already applied).

    With warmup, ``min(max_decay, (1 + step) / (10 + step))`` as in
    ``tf.train.ExponentialMovingAverage(num_updates=...)``, so the early EMA is not dominated by
    the random initialisation; otherwise ``max_decay``.
    """
    if not 0.0 <= max_decay < 1.0:
        raise UserError(f"EMA decay must be in [0, 1); got {max_decay}")
    if not warmup:
        return jnp.asarray(max_decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))
