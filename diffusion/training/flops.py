"""Model FLOPs of a train step, the numerator of the model FLOPs utilisation (MFU)."""

from __future__ import annotations

import dataclasses

from flax import nnx

from diffusion import metrics, sharding
from diffusion.families import ModelBuild
from diffusion.train_step import TrainStep


def _plain(model_config):
    """The model config without scan or remat (a model that has neither, the autoencoder, is
    its own plain twin)."""
    fields = {f.name for f in dataclasses.fields(model_config)}
    plain = {"scan_layers": False, "remat_policy": "none"}
    return dataclasses.replace(model_config, **{k: v for k, v in plain.items() if k in fields})


def model_flops(build: ModelBuild, train_step: TrainStep, batch) -> float | None:
    """Model FLOPs of one global train step: XLA's cost analysis of the LOWERED step of a twin of
    the model without scan or remat.

    Lowered, not compiled: the compiled SPMD program counts one device's share, and on a GPU its
    matmuls become cuBLAS calls that the analysis does not count. The twin (of the frozen text
    tower too): XLA counts a scanned block once, and remat's recomputation is not model work.
    Costs a trace, not a compile; the twin's weights are shapes only. A model that neither scans
    nor remats is its own twin: its step is lowered as it is, and that trace is the one the first
    step then compiles (jit caches it), so counting costs nothing extra.
    """
    frozen = build.frozen_config
    is_plain = lambda config: config == _plain(config)
    if is_plain(build.model_config) and (frozen is None or is_plain(frozen)):
        with sharding.activate(train_step.mesh, train_step.rules):
            lowered = train_step.step_fn.lower(
                train_step.abstract_state, batch, train_step.frozen_state
            )
        return metrics.cost_analysis_flops(lowered)
    twin = TrainStep(
        lambda: build.init_model(_plain(build.model_config)),
        build.loss_fn,
        train_step.tx,
        train_step.mesh,
        seed=train_step.seed,
        rules=train_step.rules,
        ema_decay=train_step.ema_decay,
        nan_policy=train_step.nan_policy,
    )
    if frozen is not None:
        twin.use_abstract_frozen(lambda: build.frozen_class(_plain(frozen), rngs=nnx.Rngs(0)))
    with sharding.activate(twin.mesh, twin.rules):
        lowered = twin.step_fn.lower(twin.abstract_state, batch, twin.frozen_state)
    return metrics.cost_analysis_flops(lowered)
