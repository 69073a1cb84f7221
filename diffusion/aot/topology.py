"""Compiling a recipe's programs for a TPU topology, and what the compiler reports: memory per
device against the chip's HBM, FLOPs, the roofline time and the implied utilisation."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from diffusion import meshes, metrics, sharding
from diffusion.aot.programs import AOTError, autoencoder_config, build_programs

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
    return program_cost(flops, bytes_accessed, compiler_seconds, peak_flops, hbm_bandwidth)


def program_cost(
    flops, bytes_accessed, compiler_seconds, peak_flops, hbm_bandwidth
) -> dict[str, Any]:
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


def compile_program(jitted, args, mesh, rules) -> tuple[Any, float, float]:
    start = time.perf_counter()
    with sharding.activate(mesh, rules):
        lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def program_report(jitted, args, mesh, rules, hbm, peak, bandwidth) -> dict[str, Any]:
    try:
        compiled, lower_s, compile_s = compile_program(jitted, args, mesh, rules)
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
    shape = dict(override) if override else meshes.mesh_shape_from_config(config.mesh)
    return meshes.resolve_mesh_shape(shape, num_devices)


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

    mesh_shape: {'data': .., 'fsdp': .., 'sequence': .., 'tensor': ..} instead of config.mesh
      (one may be -1; absent axes are left out of the mesh).
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
    peak = peak_flops_per_chip(devices[0]) / per_chip
    bandwidth = HBM_BANDWIDTH_BY_CHIP[chip] / per_chip
    shape = mesh_shape_of(config, len(devices), mesh_shape)
    mesh = meshes.make_mesh(shape, devices=devices)
    programs = build_programs(config, mesh, sample_batch=sample_batch)
    rules = programs.train_step.rules
    limits = (hbm, peak, bandwidth)
    batch = int(config.training.global_batch_size)
    train = None
    if train_step:
        jitted, args = programs.train_step.step_fn, programs.train_args
        train = program_report(jitted, args, mesh, rules, *limits)
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
        "text_features": text_features_of(programs),
    }
    if train is not None:
        report["train_step"] = train
    if sampler and programs.sample_fn is not None:
        sample = program_report(programs.sample_fn, programs.sample_args, mesh, rules, *limits)
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
        compiled, _, _ = compile_program(jitted, args, mesh, programs.train_step.rules)
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
    cost = program_cost(
        total["flops"],
        total["bytes_accessed"],
        total.get("compiler_seconds", -1.0),
        peak,
        bandwidth,
    )
    cost["step_time_source"] += ", extrapolated from 1- and 2-block unscanned twins"
    return cost


def text_features_of(programs) -> str | None:
    """Where a text-conditional DiT's train step gets its text features: "cached" (the batch
    holds encode.py --text_encoder's, config.data.cached_text) or "tower" (it runs the frozen
    text tower on the captions' tokens); None for a model without a text tower."""
    if programs.family != "dit" or programs.model_config.conditioning != "text":
        return None
    return "tower" if programs.train_step.frozen_graphdef is not None else "cached"


def peak_flops_per_chip(device) -> float:
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
    text = report.get("text_features")  # absent from reports written before it existed
    if text is not None:
        lines.append(
            "  text features: cached in the batch (encode.py --text_encoder; no text tower in "
            "the train step)"
            if text == "cached"
            else "  text features: the frozen text tower runs in the train step"
        )
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
