"""Ahead-of-time compilation for a TPU topology: does a recipe fit, and how fast could it run?

With libtpu installed (the `tpu` extra), `jax.experimental.topologies.get_topology_desc` describes
the chips of a TPU slice on any machine, this CPU included. The REAL train step of a recipe
(`train_step.TrainStep.step_fn`: loss, gradients, AdamW, EMA, under the recipe's mesh and logical
rules) and its sampling program (`inference.program.sampling_program`, the very program sample.py
runs: text tower, guidance, the sampler's `lax.scan`, and for a latent DiT the autoencoder's
decoder from config.autoencoder) are lowered with abstract inputs
(`jax.ShapeDtypeStruct` carrying shardings) and compiled by the TPU compiler. Nothing is
allocated; the compiled programs report

    memory_analysis()   per-device bytes: arguments, outputs, temporaries, generated code, and
                        the outputs aliased to donated arguments (counted once)
    cost_analysis()     per-device FLOPs, bytes accessed and `optimal_seconds`, the compiler's
                        roofline estimate of the program's run time on that chip

from which the report derives the peak memory per device against the chip's HBM, the step time
and the implied utilisation (FLOPs / (time x peak)). The FLOPs are the compiler's, so with
rematerialisation they include the recomputed forward pass (hardware, not model, FLOPs).

    report = compile_for_topology(config, "v5p:2x2x1")
    python train.py --config=configs/dit_xl2_imagenet.py --aot_topology=v5p:8x8x4 --workdir=W
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffusion import families, inference, metrics, models, optim, rundir, sharding
from diffusion.data.latents import LatentEncoding
from diffusion.errors import UserError
from diffusion.inference.program import program_spec, sampling_program
from diffusion.inference.settings import DEFAULT_MICRO_BATCH
from diffusion.models.autoencoder import (
    AUTOENCODER_VARIANTS,
    Autoencoder,
    AutoencoderConfig,
)
from diffusion.models.autoencoder import autoencoder_config as autoencoder_variant
from diffusion.train_step import TrainStep

GIB = 1024**3

# HBM per chip from the vendors' data sheets, by the chip name a topology string starts with.
HBM_BYTES_BY_CHIP = {
    "v4": 32 * GIB,
    "v5e": 16 * GIB,
    "v5p": 95 * GIB,
    "v6e": 32 * GIB,
}

# HBM bandwidth per chip (data sheets), for the roofline when the compiler gives no time.
HBM_BANDWIDTH_BY_CHIP = {
    "v4": 1228e9,
    "v5e": 819e9,
    "v5p": 2765e9,
    "v6e": 1640e9,
}


class AOTError(UserError):
    """A topology that cannot be used, or a recipe that does not fit it."""


# ---------------------------------------------------------------------------------------------
# Topologies
# ---------------------------------------------------------------------------------------------


def libtpu_available() -> bool:
    """Whether the TPU compiler is there: the `libtpu` package of the `tpu` extra, or a
    libtpu.so named by TPU_LIBRARY_PATH (how `make test` provides it without putting libtpu on
    the import path, where jax would probe for TPU chips in every CPU run)."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


def chip_name(topology: str) -> str:
    """'v5p:8x8x4' -> 'v5p'; raises AOTError for a chip without an HBM entry."""
    chip, sep, shape = topology.partition(":")
    if not sep or chip not in HBM_BYTES_BY_CHIP or not shape:
        raise AOTError(
            f"topology {topology!r} is not CHIP:SHAPE with CHIP one of "
            f"{sorted(HBM_BYTES_BY_CHIP)}, e.g. 'v5e:2x2', 'v5p:2x2x1', 'v4:2x2x1', 'v6e:4x4'."
        )
    return chip


def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU slice such as 'v5e:2x2' or 'v5p:8x8x4'."""
    chip_name(topology)
    if not libtpu_available():
        raise AOTError(
            "ahead-of-time compilation for TPU needs libtpu: pip install 'jax[tpu]' (the "
            "project's `tpu` extra)."
        )
    # libtpu guards a real TPU with /tmp/libtpu_lockfile; compiling only, several processes
    # (another job, a test worker) may safely load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as error:  # libtpu reports bad shapes as JaxRuntimeError(INVALID_ARGUMENT)
        raise AOTError(f"libtpu cannot describe topology {topology!r}: {error}") from error


def devices_per_chip(devices: Sequence[Any]) -> int:
    """TensorCores exposed as separate devices per chip (2 on v4 here, 1 on v5e/v5p/v6e)."""
    chips = {tuple(d.coords) for d in devices}
    return max(1, len(devices) // len(chips))


# ---------------------------------------------------------------------------------------------
# The programs: abstract train step and sampler of a recipe
# ---------------------------------------------------------------------------------------------


def recipe_image_size(config, default: int) -> int:
    """The image side a recipe trains at: config.data.image_size, a shapes builder config such as
    "32", else `default` (the recipe compiles without its dataset)."""
    size = config.data.get("image_size")
    if size:
        return int(size)
    return rundir.builder_resolution(config.data) or default


def text_encoder_config(config) -> models.CLIPConfig:
    """The frozen text tower's CLIP of a text-conditioned DiT recipe, from shapes alone."""
    te = config.text_encoder
    if te.get("variant"):
        return models.clip_config(
            te.variant,
            vocab_size=int(config.tokenizer.vocab_size),
            context_length=int(config.tokenizer.context_length),
            dtype=config.model.dtype,
        )
    if te.checkpoint and os.path.isfile(os.path.join(te.checkpoint, rundir.MODEL_FILE)):
        family, clip_config = rundir.load_model_config(te.checkpoint)
        if family == "clip":
            return clip_config
    raise AOTError(
        "a text-conditioned DiT needs the shapes of its CLIP text tower: set "
        "config.text_encoder.variant (e.g. 'L/14') or config.text_encoder.checkpoint to a CLIP run "
        "directory of train.py."
    )


@dataclasses.dataclass(frozen=True)
class AbstractDecoder:
    """The autoencoder whose decoder sample.py runs after a latent DiT, from shapes alone."""

    graphdef: Any
    state: Any  # ShapeDtypeStructs of the whole autoencoder, as sample.py places it
    encoding: LatentEncoding


def autoencoder_config(config) -> AutoencoderConfig:
    """config.autoencoder of a latent DiT recipe: a row of AUTOENCODER_VARIANTS (`variant`) and
    AutoencoderConfig fields that override it."""
    section = config.get("autoencoder")
    if section is None or not section.get("variant"):
        raise AOTError(
            "a latent DiT (config.model.in_channels != 3) samples through the decoder of the "
            "autoencoder its latents came from: set config.autoencoder.variant to one of "
            f"{sorted(AUTOENCODER_VARIANTS)} (e.g. 'SD', the VAE of encode.py's datasets)."
        )
    fields = {k: v for k, v in section.items() if k != "variant" and v is not None}
    if "block_out_channels" in fields:
        fields["block_out_channels"] = tuple(int(w) for w in fields["block_out_channels"])
    try:
        return autoencoder_variant(section.variant, **fields)
    except ValueError as error:
        raise AOTError(f"config.autoencoder: {error}") from error


def abstract_decoder(config, dit_config, latent_side: int) -> AbstractDecoder | None:
    """The decoder of a latent DiT recipe with abstract weights; None for a pixel DiT."""
    if dit_config.in_channels == 3:
        return None
    ae_config = autoencoder_config(config)
    if ae_config.latent_channels != dit_config.in_channels:
        raise AOTError(
            f"config.autoencoder makes latents of {ae_config.latent_channels} channels but the "
            f"DiT reads {dit_config.in_channels} (config.model.in_channels)."
        )
    abstract = nnx.eval_shape(lambda: Autoencoder(ae_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    encoding = LatentEncoding(
        autoencoder=f"config.autoencoder.variant={config.autoencoder.variant}",
        scaling_factor=ae_config.scaling_factor,
        shift_factor=ae_config.shift_factor or 0.0,
        latent_shape=(latent_side, latent_side, ae_config.latent_channels),
        downsampling_factor=ae_config.downsampling_factor,
    )
    return AbstractDecoder(graphdef, state, encoding)


@dataclasses.dataclass
class Programs:
    """What gets compiled: the train step (and, for a DiT, the sampling program that sample.py
    runs) with abstract arguments."""

    build: families.ModelBuild
    train_step: TrainStep
    train_args: tuple
    sample_fn: Any = None
    sample_args: tuple = ()

    @property
    def family(self) -> str:
        return self.build.family

    @property
    def model_config(self):
        return self.build.model_config


def recipe_facts(config) -> families.DataFacts:
    """What the data would tell the model builder, from the recipe alone."""
    default = 32
    if config.family == "clip":
        default = models.CLIP_VARIANTS.get(config.model.variant, {}).get("image_size", 32)
    return families.DataFacts.from_config(config, recipe_image_size(config, default))


def build_programs(
    config, mesh, *, sample_batch: int | None = None, model_overrides: Mapping | None = None
) -> Programs:
    """The recipe's real train step (and sampler, for a DiT) over abstract inputs on `mesh`,
    built through the family registry as train.py builds it.

    model_overrides: model config fields to change (the depth twins of `extrapolated_cost`).
    """
    if config.family not in families.FAMILIES:
        raise AOTError(
            f"config.family={config.family!r}; AOT compiles one of {sorted(families.FAMILIES)}."
        )
    families.check_global_batch(int(config.training.global_batch_size), mesh)
    family = families.get(config.family)
    facts = recipe_facts(config)
    overrides = dict(model_overrides or {})
    if config.family == "dit":
        text_config = text_encoder_config(config) if family.is_text_conditional(config) else None
        build = family.build(config, facts, mesh, text_config, **overrides)
    else:
        build = family.build(config, facts, mesh, **overrides)
    tx = optim.make_optimizer(config.optimizer, total_steps=config.training.num_steps)
    train_step = build.train_step(config, mesh, tx)
    if build.frozen_config is not None:  # abstract: TrainStep(frozen=...) would device_put one
        train_step.use_abstract_frozen(build.init_frozen)
    batch = family.abstract_batch(config, mesh, build, facts)
    programs = Programs(
        build, train_step, (train_step.abstract_state, batch, train_step.frozen_state)
    )
    if config.family == "dit":
        programs.sample_fn, programs.sample_args = sampler_program(
            config, mesh, train_step, build, facts, sample_batch
        )
    return programs


def sampler_settings(config) -> inference.SamplerSettings:
    """config.sampling as sample.py would resolve it for this recipe's model."""
    d = config.diffusion
    return inference.make_settings(
        d.objective,
        sampler=config.sampling.sampler,
        steps=int(config.sampling.steps),
        default_shift=float(d.get("shift", 1.0) or 1.0),
        num_timesteps=int(d.num_timesteps) if d.objective == "ddpm" else None,
    )


def sampler_program(config, mesh, train_step, build, facts, sample_batch):
    """(the sampling program, its abstract arguments (DiT weights, text tower weights, inputs,
    spec, autoencoder weights)): `inference.program.sampling_program`, the one sample.py and
    evaluate.py run, over the EMA weights replicated on every device as TextToImage places them;
    a latent DiT's samples are decoded by config.autoencoder's decoder, replicated likewise."""
    settings = sampler_settings(config)
    micro_batch = DEFAULT_MICRO_BATCH
    unit = micro_batch * math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    batch = -(-(sample_batch or unit) // unit) * unit  # whole micro-batches on every device
    text_graphdef = train_step.frozen_graphdef
    decoder = abstract_decoder(config, build.model_config, facts.image_size)
    spec = program_spec(
        train_step.graphdef,
        text_graphdef,
        build.model_config,
        config.diffusion,
        resolution=facts.image_size,
        mesh=mesh,
        micro_batch=micro_batch,
        settings=settings,
        decoder_graphdef=None if decoder is None else decoder.graphdef,
        latents=None if decoder is None else decoder.encoding,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = sharding.batch_sharding(mesh)
    state = train_step.abstract_state
    params = state["ema"] if state["ema"] is not None else state["params"]
    as_replicated = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree
    )
    per_sample = lambda dtype, *shape: families.base.abstract_array((batch, *shape), dtype, rows)
    inputs = {"seeds": per_sample(jnp.uint32), "scales": per_sample(jnp.float32)}
    if text_graphdef is None:
        inputs.update(labels=per_sample(jnp.int32), uncond_labels=per_sample(jnp.int32))
    else:
        length = facts.context_length
        for name in ("tokens", "mask", "negative_tokens", "negative_mask"):
            inputs[name] = per_sample(jnp.int32, length)
    text_state = None if text_graphdef is None else as_replicated(train_step.frozen_state)
    decoder_state = None if decoder is None else as_replicated(decoder.state)
    return sampling_program, (as_replicated(params), text_state, inputs, spec, decoder_state)


# ---------------------------------------------------------------------------------------------
# Compiling and reading the compiler's analyses
# ---------------------------------------------------------------------------------------------


def memory_report(compiled, hbm_bytes: float) -> dict[str, Any]:
    """Per-device bytes of a compiled program against the device's HBM.

    total = arguments + outputs - aliased (donated buffers reused) + temporaries + code.
    """
    m = compiled.memory_analysis()
    argument, output = m.argument_size_in_bytes, m.output_size_in_bytes
    temp, alias, code = m.temp_size_in_bytes, m.alias_size_in_bytes, m.generated_code_size_in_bytes
    total = argument + output - alias + temp + code
    return {
        "argument_bytes": int(argument),
        "output_bytes": int(output),
        "alias_bytes": int(alias),
        "temp_bytes": int(temp),
        "generated_code_bytes": int(code),
        "total_bytes": int(total),
        "hbm_bytes": int(hbm_bytes),
        "hbm_fraction": total / hbm_bytes,
        "fits": bool(total <= hbm_bytes),
    }


def cost_report(compiled, peak_flops: float, hbm_bandwidth: float) -> dict[str, Any]:
    """Per-device FLOPs, bytes and time of a compiled program, and the implied utilisation.

    The time is the compiler's own estimate (`optimal_seconds`) when it gives one; it returns a
    negative value for many sharded programs (with all-gathers, or loops), and then the time is
    the roofline max(FLOPs / peak, bytes accessed / HBM bandwidth), collectives not counted.
    Either way it is a lower bound of the real step time, so the utilisation is an upper bound.
    Note that XLA counts the body of a loop (a scan over layers) once: see `extrapolated_cost`.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    flops = float(analysis.get("flops", 0.0))
    bytes_accessed = float(analysis.get("bytes accessed", 0.0))
    compiler_seconds = float(analysis.get("optimal_seconds", -1.0))
    return _cost(flops, bytes_accessed, compiler_seconds, peak_flops, hbm_bandwidth)


def _cost(flops, bytes_accessed, compiler_seconds, peak_flops, hbm_bandwidth) -> dict[str, Any]:
    ideal = flops / peak_flops
    roofline = max(ideal, bytes_accessed / hbm_bandwidth)
    if compiler_seconds > 0:
        step_time, source = compiler_seconds, "compiler optimal_seconds"
    else:
        step_time, source = roofline, "roofline: max(flops / peak, bytes / HBM bandwidth)"
    return {
        "flops": flops,
        "bytes_accessed": bytes_accessed,
        "compiler_seconds": compiler_seconds if compiler_seconds > 0 else None,
        "ideal_compute_time_s": ideal,
        "roofline_time_s": roofline,
        "step_time_s": step_time,
        "step_time_source": source,
        "mfu": ideal / step_time if step_time > 0 else None,
        "peak_flops": peak_flops,
        "hbm_bandwidth": hbm_bandwidth,
    }


def _compile(jitted, args, mesh, rules) -> tuple[Any, float, float]:
    start = time.perf_counter()
    with sharding.activate(mesh, rules):
        lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _program_report(jitted, args, mesh, rules, hbm, peak, bandwidth) -> dict[str, Any]:
    try:
        compiled, lower_s, compile_s = _compile(jitted, args, mesh, rules)
    except Exception as error:  # the TPU compiler refuses programs that cannot fit HBM
        if not _is_out_of_memory(error):
            raise
        return {"compiled": False, "error": str(error).splitlines()[0][:500], "fits": False}
    report = {"compiled": True, "lower_seconds": lower_s, "compile_seconds": compile_s}
    report["memory"] = memory_report(compiled, hbm)
    report["cost"] = cost_report(compiled, peak, bandwidth)
    report["fits"] = report["memory"]["fits"]
    return report


def mesh_shape_of(config, num_devices: int, override: Mapping[str, int] | None = None):
    shape = dict(override) if override else {a: int(config.mesh[a]) for a in sharding.MESH_AXES}
    return sharding.resolve_mesh_shape(shape, num_devices)


def compile_for_topology(
    config,
    topology: str,
    *,
    mesh_shape: Mapping[str, int] | None = None,
    sampler: bool = True,
    train_step: bool = True,
    sample_batch: int | None = None,
    check_fit: bool = True,
    cost_twin: bool = True,
) -> dict[str, Any]:
    """Compiles the recipe's train step (and sampler) for a TPU slice; returns the report.

    mesh_shape: {'data': .., 'fsdp': .., 'tensor': ..} instead of config.mesh (one may be -1).
    train_step: False compiles the sampler alone (the report then has no "train_step").
    check_fit: raise AOTError when the train step does not fit the chips' HBM.
    cost_twin: when the step scans over layers (XLA then counts one block's FLOPs), take FLOPs,
      time and utilisation from `extrapolated_cost`; memory always comes from the recipe's own
      program. The sampler (a loop over steps) gets a memory report only.
    Every byte, FLOP and second in the report is PER DEVICE (a device is a chip on v5e, v5p and
    v6e, and one of a v4 chip's two TensorCores here).
    """
    chip = chip_name(topology)
    devices = topology_devices(topology)
    per_chip = devices_per_chip(devices)
    hbm = HBM_BYTES_BY_CHIP[chip] / per_chip
    peak = _peak_per_chip(devices[0]) / per_chip
    bandwidth = HBM_BANDWIDTH_BY_CHIP[chip] / per_chip
    shape = mesh_shape_of(config, len(devices), mesh_shape)
    mesh = sharding.make_mesh(shape, devices=devices)
    programs = build_programs(config, mesh, sample_batch=sample_batch)
    rules = programs.train_step.rules
    limits = (hbm, peak, bandwidth)
    batch = int(config.training.global_batch_size)
    train = None
    if train_step:
        jitted, args = programs.train_step.step_fn, programs.train_args
        train = _program_report(jitted, args, mesh, rules, *limits)
        if cost_twin and train.get("compiled") and config.model.get("scan_layers", False):
            depths = {f: getattr(programs.model_config, f) for f in DEPTH_FIELDS[programs.family]}
            train["cost"] = extrapolated_cost(config, mesh, peak, bandwidth, depths)
        if train.get("compiled"):
            train["examples_per_second"] = batch / train["cost"]["step_time_s"]
    report = {
        "topology": topology,
        "chip": chip,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "devices_per_chip": per_chip,
        "mesh": dict(mesh.shape),
        "family": programs.family,
        "model": config.model.variant,
        "dtype": config.model.dtype,
        "remat": config.model.get("remat", "none"),  # the autoencoder has neither
        "scan_layers": bool(config.model.get("scan_layers", False)),
        "global_batch_size": batch,
        "num_parameters": _num_parameters(programs.train_step),
    }
    if train is not None:
        report["train_step"] = train
    if sampler and programs.sample_fn is not None:
        sample = _program_report(programs.sample_fn, programs.sample_args, mesh, rules, *limits)
        sample.pop("cost", None)  # a loop over steps: XLA counts one step, see cost_report
        spec = programs.sample_args[3]
        sample["batch"] = int(programs.sample_args[2]["seeds"].shape[0])
        sample["steps"] = spec.settings.steps
        sample["sampler"] = spec.settings.sampler
        decoder_state = programs.sample_args[4]
        if decoder_state is not None:  # a latent DiT: the images are the decoder's
            leaves = jax.tree.leaves(decoder_state)
            sample["decoder_parameters"] = int(sum(math.prod(x.shape) for x in leaves))
            factor = autoencoder_config(config).downsampling_factor
            sample["image_size"] = spec.resolution * factor
        report["sampler"] = sample
    if check_fit and train is not None and not train["fits"]:
        raise AOTError(not_fitting_message(report))
    return report


DEPTH_FIELDS = {"dit": ("depth",), "clip": ("vision_depth", "text_depth")}


def extrapolated_cost(config, mesh, peak, bandwidth, depths: Mapping[str, int]) -> dict:
    """Cost of the full-depth step from shallow unscanned twins, exact for a stack of identical
    blocks: cost(D) = cost(1) + (D - 1) (cost(2) - cost(1)), per tower.

    XLA counts a scanned block once, and compiling 28 unrolled blocks takes minutes on a small
    host; one- and two-block twins compile in seconds and give the per-block increment.
    """
    twin = config.copy_and_resolve_references()
    twin.model.scan_layers = False
    fields = DEPTH_FIELDS[config.family]

    def cost_at(overrides):
        programs = build_programs(twin, mesh, model_overrides=overrides)
        jitted, args = programs.train_step.step_fn, programs.train_args
        compiled, _, _ = _compile(jitted, args, mesh, programs.train_step.rules)
        return cost_report(compiled, peak, bandwidth)

    ones = {f: 1 for f in fields}
    base = cost_at(ones)
    steps = {f: cost_at({**ones, f: 2}) for f in fields}
    keys = ("flops", "bytes_accessed", "compiler_seconds")
    valid = {k: all(c[k] is not None for c in (base, *steps.values())) for k in keys}
    total = {k: base[k] for k in keys if valid[k]}
    for field, step in steps.items():
        for k in total:
            total[k] += (depths[field] - 1) * (step[k] - base[k])
    cost = _cost(
        total["flops"],
        total["bytes_accessed"],
        total.get("compiler_seconds", -1.0),
        peak,
        bandwidth,
    )
    cost["step_time_source"] += ", extrapolated from 1- and 2-block unscanned twins"
    return cost


def _peak_per_chip(device) -> float:
    for kind, flops in metrics.PEAK_FLOPS_BY_DEVICE_KIND:
        if kind.lower() in device.device_kind.lower():
            return flops
    raise AOTError(f"no peak FLOP/s known for device kind {device.device_kind!r}")


def _num_parameters(train_step) -> int:
    leaves = jax.tree.leaves(sharding.unbox(train_step.abstract_state["params"]))
    return int(sum(math.prod(x.shape) for x in leaves))


def not_fitting_message(report: dict) -> str:
    train = report["train_step"]
    where = f"{report['model']} at batch {report['global_batch_size']} on {report['topology']}"
    if not train.get("compiled"):
        return f"{where} does not fit: the TPU compiler ran out of memory ({train['error']})."
    m = train["memory"]
    return (
        f"{where} does not fit: the train step needs {m['total_bytes'] / GIB:.2f} GiB per device "
        f"(arguments {m['argument_bytes'] / GIB:.2f}, temporaries {m['temp_bytes'] / GIB:.2f}, "
        f"outputs {m['output_bytes'] / GIB:.2f}) but a {report['chip']} device has "
        f"{m['hbm_bytes'] / GIB:.1f} GiB of HBM. Use a larger slice, more fsdp "
        "(--config.mesh.fsdp), rematerialisation (--config.model.remat=full), or a smaller "
        "--config.training.global_batch_size."
    )


# ---------------------------------------------------------------------------------------------
# Text report (train.py --aot_topology)
# ---------------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    """A few readable lines of a compile_for_topology report."""
    lines = [
        f"{report['model']} ({report['family']}, {report['num_parameters'] / 1e6:.0f}M params, "
        f"{report['dtype']}, remat={report['remat']}, scan_layers={report['scan_layers']}) on "
        f"{report['topology']}: {report['num_devices']} x {report['device_kind']}, "
        f"mesh {report['mesh']}, global batch {report['global_batch_size']}"
    ]
    for name in ("train_step", "sampler"):
        program = report.get(name)
        if program is None:
            continue
        if not program.get("compiled"):
            lines.append(f"  {name}: DOES NOT FIT ({program['error']})")
            continue
        m, c = program["memory"], program.get("cost")
        lines.append(
            f"  {name}: per device {m['total_bytes'] / GIB:.2f} GiB of "
            f"{m['hbm_bytes'] / GIB:.1f} GiB HBM ({100 * m['hbm_fraction']:.0f}%, "
            f"{'fits' if m['fits'] else 'DOES NOT FIT'}): arguments "
            f"{m['argument_bytes'] / GIB:.2f}, outputs {m['output_bytes'] / GIB:.2f} "
            f"(aliased {m['alias_bytes'] / GIB:.2f}), temporaries {m['temp_bytes'] / GIB:.2f}"
        )
        if c is None:
            what = ""
            if name == "sampler":
                what = f"{program['batch']} samples, {program['steps']} {program['sampler']} steps"
                if "decoder_parameters" in program:
                    what += (
                        f", decoded to {program['image_size']}x{program['image_size']} by the "
                        f"{program['decoder_parameters'] / 1e6:.0f}M-parameter autoencoder"
                    )
                what += "; "
            lines.append(f"  {name}: {what}compiled in {program['compile_seconds']:.0f} s")
            continue
        lines.append(
            f"  {name}: {c['flops'] / 1e12:.2f} TFLOP per device, est. time "
            f"{1e3 * c['step_time_s']:.1f} ms ({c['step_time_source']}), utilisation "
            f"{100 * (c['mfu'] or 0):.0f}% of {c['peak_flops'] / 1e12:.0f} TFLOP/s; compiled in "
            f"{program['compile_seconds']:.0f} s"
        )
    return "\n".join(lines)


def run(config, topology: str, workdir: str) -> dict:
    """train.py --aot_topology: compile, print the report, write WORKDIR/aot.json."""
    report = compile_for_topology(config, topology, check_fit=False)
    print(format_report(report), flush=True)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "aot.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    if not report["train_step"]["fits"]:
        raise AOTError(not_fitting_message(report))
    return report
