"""Ahead-of-time programs of the video DiT at Wan 2.1's sizes, compiled for a TPU slice.

Two programs, on abstract inputs (nothing is allocated), as Wan trains and samples:

    train step      flow-matching loss (`families.dit.DiffusionObjective`) of the video DiT on
                    Wan-VAE latents (B, 21, 60, 104, 16) for 81 frames at 832x480, or
                    (B, 21, 90, 160, 16) at 1280x720, with cached umT5 text states (B, 512, 4096)
                    and their mask as inputs; gradients, AdamW (`optim.make_optimizer`), the
                    sharded train state of `train_step.TrainStep`; float32 parameters, bfloat16
                    compute, every block rematerialised.
    sampling step   one classifier-free-guided evaluation (`guidance.guided_model_fn`: cond and
                    uncond batched, 2B rows) of the same shapes, bfloat16 weights.

The mesh is data 1 x fsdp N/s x sequence s x tensor 1 over the slice's N chips. The parameters
(and Adam's moments) are split over fsdp AND sequence (the rule `embed -> (fsdp, sequence)`, as
MaxText shards its weights over its context axis too), so sequence parallelism does not replicate
the weights; the batch is split over fsdp, the tokens over sequence, and self-attention runs
`attention_impl` (ulysses: all-to-all tokens <-> heads) when s > 1.

The report is `topology.compile_for_topology`'s (memory per chip against HBM, the compiler's FLOPs
and roofline time), with the FLOPs and time of the scanned stack extrapolated from 1- and 2-block
unscanned twins, plus the closed form `video_dit_costs.flops_per_example` (forward; x3 for a train
step) and the utilisation it implies at the estimated time.

    report = compile_video_row(VideoRow("wan2.1-14b", "480p", "v5p:2x2x2", sequence=8, batch=1))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion import guidance, meshes, optim, sharding
from diffusion.aot.programs import AOTError
from diffusion.aot.topology import (
    GIB,
    HBM_BANDWIDTH_BY_CHIP,
    HBM_BYTES_BY_CHIP,
    chip_name,
    compile_program,
    cost_report,
    devices_per_chip,
    peak_flops_per_chip,
    program_cost,
    program_report,
    topology_devices,
)
from diffusion.families.base import abstract_array
from diffusion.families.dit import DiffusionObjective
from diffusion.models.video_dit import VideoDiT, video_dit_config
from diffusion.models.video_dit_costs import flops_per_example
from diffusion.models.wan_vae import wan_vae_config
from diffusion.train_step import TrainStep

# Wan 2.1's clips: 81 frames, (height, width) per resolution; its autoencoder ("Wan2.1": 4x
# temporal after the first frame, 8x spatial, 16 channels) makes the latents the DiT reads.
FRAMES = 81
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
TEXT_LENGTH = 512  # umT5 states are padded to 512 tokens in Wan's pipeline
PROGRAMS = ("train", "sample")

# The default rules, but parameters also split over 'sequence': with fsdp N/s x sequence s the
# weights and Adam's moments stay split over all N chips instead of N/s.
VIDEO_RULES = tuple(
    ("embed", ("fsdp", "sequence")) if name == "embed" else (name, axes)
    for name, axes in sharding.DEFAULT_RULES
)

# A constant learning rate: the schedule's value is one scalar, no part of the program's cost.
OPTIMIZER = dict(
    name="adamw",
    learning_rate=1e-5,
    schedule="constant",
    warmup_steps=0,
    weight_decay=0.01,
    grad_clip_norm=1.0,
    accumulation_steps=1,
    muon_ns_steps=5,
)


def latent_shape(resolution: str) -> tuple[int, int, int, int]:
    """(frames, rows, columns, channels) of the Wan 2.1 autoencoder's latents of an 81-frame clip
    at `resolution` ('480p': (21, 60, 104, 16), '720p': (21, 90, 160, 16))."""
    if resolution not in RESOLUTIONS:
        raise AOTError(f"resolution {resolution!r}; valid: {sorted(RESOLUTIONS)}")
    vae = wan_vae_config("Wan2.1")
    height, width = RESOLUTIONS[resolution]
    factor = vae.spatial_factor
    return vae.latent_frames(FRAMES), height // factor, width // factor, vae.z_dim


@dataclasses.dataclass(frozen=True)
class VideoRow:
    """One configuration to compile: model size, clip resolution, slice, sequence-parallel degree
    (1: none, the mesh is fsdp over every chip), global batch and program."""

    variant: str  # a VIDEO_DIT_VARIANTS name, e.g. 'wan2.1-14b'
    resolution: str  # a RESOLUTIONS key
    topology: str  # e.g. 'v5p:2x2x1'
    sequence: int = 1  # chips along the 'sequence' mesh axis
    batch: int = 1  # global batch (clips); the sampling program evaluates 2 x batch rows
    program: str = "train"  # 'train' or 'sample'
    # Self-attention core when sequence > 1; with sequence 1 the einsum core, or the splash
    # kernel for 'splash' and 'ulysses_splash' (attention.ATTENTION_IMPLEMENTATIONS).
    attention_impl: str = "ulysses"
    remat: str = "full"  # remat policy of the train step's blocks (blocks.REMAT_POLICIES)
    # (frames, rows, columns, channels) instead of the resolution's Wan latents (a tiny model's
    # clips in the tests), and the text tokens.
    latents: tuple[int, int, int, int] | None = None
    text_length: int = TEXT_LENGTH
    depth: int | None = None  # blocks, instead of the variant's (a tiny model in the tests)
    # False: the blocks unrolled, and the FLOPs and time taken from the program itself (no
    # twins; compile time grows with depth, so only for small models).
    scan_layers: bool = True

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return tuple(self.latents) if self.latents else latent_shape(self.resolution)

    @property
    def key(self) -> str:
        # ';', not ',': scaling_table.py --keys takes a comma-separated list of keys.
        attention = self_attention_impl(self)
        sp = f"sequence={self.sequence};{attention}" if self.sequence > 1 else "no sp"
        sp += ";splash" if self.sequence == 1 and attention == "splash" else ""
        return (
            f"video:{self.program}:{self.variant}@{self.resolution}@{self.topology}"
            f"[{sp};batch={self.batch}]"
        )


def self_attention_impl(row: VideoRow) -> str:
    """The attention_impl the row's model runs: its own with sequence parallelism; without, the
    core its sequence-parallel one falls back to (the einsum, or the splash kernel)."""
    if row.sequence > 1:
        return row.attention_impl
    return "splash" if row.attention_impl in ("splash", "ulysses_splash") else "xla"


def video_mesh(devices, sequence: int):
    """data 1 x fsdp N/s x sequence s x tensor 1 over the slice's devices."""
    if sequence < 1 or len(devices) % sequence:
        raise AOTError(f"sequence={sequence} does not divide the slice's {len(devices)} devices")
    shape = {"data": 1, "fsdp": len(devices) // sequence, "sequence": sequence, "tensor": 1}
    return meshes.make_mesh(shape, devices=devices)


def model_config(row: VideoRow, **overrides):
    """The row's VideoDiTConfig: bfloat16 compute, float32 (train) or bfloat16 (sample) weights,
    scanned blocks (compile time independent of depth), remat for the train step."""
    fields = dict(
        dtype="bfloat16",
        param_dtype="float32" if row.program == "train" else "bfloat16",
        attention_impl=self_attention_impl(row),
        remat_policy=row.remat if row.program == "train" else "none",
        scan_layers=row.scan_layers,
        **({"depth": row.depth} if row.depth else {}),
    )
    return video_dit_config(row.variant, **{**fields, **overrides})


def video_flow_loss(model, frozen, batch, key, *, objective: DiffusionObjective):
    """Flow-matching loss of the video DiT on cached text states (no text tower in the step)."""
    del frozen
    cond = {"context": batch["context"], "context_mask": batch["context_mask"]}
    model_fn = lambda x, t, c: model(x, t, c["context"], c["context_mask"])
    loss, aux = objective.loss(model_fn, batch["latents"], cond, key)
    return loss, {"mean_t": jnp.mean(aux["t"])}


def abstract_inputs(row: VideoRow, mesh, text_dim: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Latents, umT5 states (bfloat16, as cached) and mask of `row.batch` clips, batch-sharded."""
    rows = sharding.batch_sharding(mesh)
    batch = row.batch
    return {
        "latents": abstract_array((batch, *row.latent_shape), jnp.float32, rows),
        "context": abstract_array((batch, row.text_length, text_dim), jnp.bfloat16, rows),
        "context_mask": abstract_array((batch, row.text_length), jnp.int32, rows),
    }


def train_program(row: VideoRow, mesh, **overrides) -> tuple[Any, tuple]:
    """(jitted train step, abstract (state, batch, frozen))."""
    config = model_config(row, **overrides)
    objective = DiffusionObjective()  # flow matching, velocity target; t's law costs nothing
    train_step = TrainStep(
        lambda: VideoDiT(config, rngs=nnx.Rngs(0)),
        functools.partial(video_flow_loss, objective=objective),
        optim.make_optimizer(OPTIMIZER, total_steps=1),
        mesh,
        seed=0,
        rules=VIDEO_RULES,
        ema_decay=0.0,  # Wan-sized runs keep no EMA copy in HBM
    )
    batch = abstract_inputs(row, mesh, config.text_dim)
    return train_step.step_fn, (train_step.abstract_state, batch, None)


def sampling_program(row: VideoRow, mesh, **overrides) -> tuple[Any, tuple]:
    """(jitted guided evaluation, abstract (weights, inputs)): cond and uncond (a negative
    prompt's states) in one 2B-row forward, as every sampler step of Wan runs it."""
    config = model_config(row, **overrides)
    graphdef, params, shardings = sharding.abstract_state(
        lambda: VideoDiT(config, rngs=nnx.Rngs(0)), mesh, VIDEO_RULES
    )
    text = abstract_inputs(row, mesh, config.text_dim)
    rows = sharding.batch_sharding(mesh)
    inputs = {
        "latents": text["latents"],
        "t": abstract_array((row.batch,), jnp.float32, rows),
        "context": text["context"],
        "context_mask": text["context_mask"],
        "negative_context": text["context"],
        "negative_mask": text["context_mask"],
        "scale": abstract_array((row.batch,), jnp.float32, rows),
    }

    def guided_step(params, inputs):
        model = nnx.merge(graphdef, params)
        model_fn = lambda x, t, c: model(x, t, c["context"], c["context_mask"])
        condition = guidance.GuidanceCondition(
            cond={"context": inputs["context"], "context_mask": inputs["context_mask"]},
            uncond={"context": inputs["negative_context"], "context_mask": inputs["negative_mask"]},
            scale=inputs["scale"],
        )
        return guidance.guided_model_fn(model_fn)(inputs["latents"], inputs["t"], condition)

    input_shardings = jax.tree.map(lambda x: x.sharding, inputs)
    with sharding.activate(mesh, VIDEO_RULES):
        jitted = jax.jit(guided_step, in_shardings=(shardings, input_shardings), out_shardings=rows)
    return jitted, (params, inputs)


PROGRAM_BUILDERS = {"train": train_program, "sample": sampling_program}


def model_flops(row: VideoRow, config) -> float:
    """Closed-form matmul FLOPs of the whole step, all chips: forward x 3 (forward, and a
    backward of twice its cost) per clip for the train step, not counting the remat recompute;
    one forward of 2B rows for the guided evaluation."""
    frames, rows, columns, _ = row.latent_shape
    forward = flops_per_example(config, frames, rows, columns, row.text_length)
    return 3 * forward * row.batch if row.program == "train" else forward * 2 * row.batch


def extrapolated_video_cost(row, mesh, depth, peak, bandwidth) -> dict[str, Any]:
    """Per-device cost of the full-depth program from unscanned 1- and 2-block twins (XLA counts
    a scanned body once): cost(D) = cost(1) + (D - 1) (cost(2) - cost(1)), as
    `topology.extrapolated_cost` does for the recipes."""
    costs = []
    for twin_depth in (1, 2):
        jitted, args = PROGRAM_BUILDERS[row.program](row, mesh, depth=twin_depth, scan_layers=False)
        compiled, _, _ = compile_program(jitted, args, mesh, VIDEO_RULES)
        costs.append(cost_report(compiled, peak, bandwidth))
    one, two = costs
    total = {}
    for k in ("flops", "bytes_accessed", "compiler_seconds"):
        if one[k] is not None and two[k] is not None:
            total[k] = one[k] + (depth - 1) * (two[k] - one[k])
    cost = program_cost(
        total["flops"],
        total["bytes_accessed"],
        total.get("compiler_seconds", -1.0),
        peak,
        bandwidth,
    )
    cost["step_time_source"] += ", extrapolated from 1- and 2-block unscanned twins"
    return cost


def compile_video_row(row: VideoRow, *, cost: bool = True) -> dict[str, Any]:
    """Compiles `row`'s program for its slice; returns the report (every byte, FLOP and second
    PER DEVICE, a device being a chip on v5e, v5p and v6e).

    cost: also compile the 1- and 2-block twins for the FLOPs and time of the full depth (only
    when the program itself compiled).
    """
    if row.program not in PROGRAMS:
        raise AOTError(f"program {row.program!r}; valid: {PROGRAMS}")
    start = time.perf_counter()
    chip = chip_name(row.topology)
    devices = topology_devices(row.topology)
    per_chip = devices_per_chip(devices)
    hbm = HBM_BYTES_BY_CHIP[chip] / per_chip
    peak = peak_flops_per_chip(devices[0]) / per_chip
    bandwidth = HBM_BANDWIDTH_BY_CHIP[chip] / per_chip
    mesh = video_mesh(devices, row.sequence)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if row.batch % split:
        raise AOTError(
            f"global batch {row.batch} does not split over the {split} devices of the batch axes "
            f"(data x fsdp of mesh {dict(mesh.shape)}); use a multiple of {split} or more "
            "sequence parallelism"
        )
    config = model_config(row)
    jitted, args = PROGRAM_BUILDERS[row.program](row, mesh)
    report = program_report(jitted, args, mesh, VIDEO_RULES, hbm, peak, bandwidth)
    if row.scan_layers:
        report.pop("cost", None)  # counts the scanned block once: replaced by the twins' below
    if cost and report["compiled"]:
        if row.scan_layers:
            report["cost"] = extrapolated_video_cost(row, mesh, config.depth, peak, bandwidth)
        c = report["cost"]
        report["model_flops"] = model_flops(row, config)
        # Model FLOPs (closed form, no remat recompute) over what the chips could do meanwhile.
        report["model_flops_utilisation"] = report["model_flops"] / (
            c["step_time_s"] * peak * len(devices)
        )
        report["compiler_over_model_flops"] = c["flops"] * len(devices) / report["model_flops"]
    frames, rows, columns, channels = row.latent_shape
    pt, ph, pw = config.patch_size
    report.update(
        row=dataclasses.asdict(row),
        key=row.key,
        chip=chip,
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        devices_per_chip=per_chip,
        mesh=dict(mesh.shape),
        latents=[frames, rows, columns, channels],
        tokens=(frames // pt) * (rows // ph) * (columns // pw),
        num_parameters=int(
            sum(math.prod(x.shape) for x in jax.tree.leaves(sharding.unbox(_params_of(args))))
        ),
        wall_seconds=time.perf_counter() - start,
    )
    return report


def _params_of(args):
    state = args[0]
    return state["params"] if isinstance(state, dict) and "params" in state else state


def format_video_report(report: dict[str, Any]) -> str:
    """One readable line of a compile_video_row report."""
    head = f"{report['key']}: mesh {report['mesh']}, {report['tokens']} tokens"
    if not report["compiled"]:
        return f"{head}; DOES NOT FIT (compiler: {report['error']})"
    m = report["memory"]
    line = (
        f"{head}; {m['total_bytes'] / GIB:.1f} GiB of {m['hbm_bytes'] / GIB:.0f} GiB per device "
        f"({'fits' if m['fits'] else 'DOES NOT FIT'}: arguments {m['argument_bytes'] / GIB:.1f}, "
        f"temporaries {m['temp_bytes'] / GIB:.1f})"
    )
    if "cost" in report:
        c = report["cost"]
        line += (
            f"; {c['flops'] / 1e12:.1f} TFLOP per device, est. {c['step_time_s']:.2f} s "
            f"({c['step_time_source']}), MFU estimate "
            f"{100 * report['model_flops_utilisation']:.0f}%"
        )
    return line
