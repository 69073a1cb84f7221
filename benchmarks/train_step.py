"""Examples/s and MFU of the real train step on one device (CPU by default, or a GPU).

    PYTHONPATH=. python benchmarks/train_step.py [--steps=3] [--only=dit_s2]
        [--cases=dit_s2:256,dit_xl2:64] [--peak_size=8192] [--set model.patch_size=8]

Cases: the tiny DiT and CLIP of the CPU recipes, DiT-S/2 on 32x32x3 and DiT-XL/2 on 32x32x4
latents (configs/dit_xl2_imagenet.py), class-conditional; `dit_text` is the DiT step of
`make train` itself (configs/shapes.py: text conditioning with word embeddings, on a frozen tiny
CLIP text tower, randomly initialised here), and `dit_text_cached` the same step on cached text
features (`config.data.cached_text`: a dataset encoded with encode.py --text_encoder, so no text
tower in the step; when both run, the last line gives its speed-up over `dit_text`). Each runs
`training.Trainer.step` (loss, gradients, AdamW or Muon, EMA) on one device, compiled once,
timed best-of-`steps`. FLOPs come from XLA's cost analysis of the same step LOWERED without
remat or scan: model FLOPs (remat's
recomputation is not useful work, and XLA counts a scanned block once), counted before XLA's GPU
passes turn the matmuls into cuBLAS calls that its analysis does not count. MFU is given against
the float32 matmul peak measured in the same run (the issue's CPU denominator) and against the
peak of the variant's own compute dtype (on a GPU, bf16 steps against the bf16 peak; JAX's
default float32 matmul there runs as TF32, and so does the float32 peak).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from configs import base_clip, base_dit, dit_xl2_imagenet, shapes
from diffusion import aot, meshes, metrics, sharding
from diffusion import config as config_lib

VARIANTS = {  # name -> (dtype, remat, scan_layers, optimizer)
    "f32": ("float32", "none", False, "adamw"),
    "f32 remat=full": ("float32", "full", False, "adamw"),
    "f32 scan": ("float32", "none", True, "adamw"),
    "bf16": ("bfloat16", "none", False, "adamw"),
    "f32 muon": ("float32", "none", False, "muon"),
}


def case_config(case: str, batch: int):
    if case == "clip_tiny":
        config = base_clip.get_config()
    elif case in ("dit_text", "dit_text_cached"):
        config = shapes.get_config().dit
        config.text_encoder.variant = "tiny"  # the shapes alone; weights random (build below)
        config.data.cached_text = case == "dit_text_cached"  # features in the batch, no tower
    elif case == "dit_xl2":
        config = dit_xl2_imagenet.get_config()  # 32x32x4 latents, 1000 classes
    else:
        config = base_dit.get_config()
        config.model.num_classes = 10  # class-conditional: no frozen text tower to load
        if case == "dit_s2":
            config.model.variant = "DiT-S/2"
            config.data.image_size = 32
    config.training.global_batch_size = batch
    return config


def apply_overrides(config, overrides: list[str]):
    """`--set model.patch_size=8`: a recipe field set exactly as train.py's --config.FIELD."""
    for item in overrides:
        field, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE, e.g. model.patch_size=8")
        try:
            config_lib.apply_override(config, field, raw)
        except config_lib.ConfigError as error:
            raise SystemExit(f"--set {item!r}: {error}") from None
    return config


def concrete_batch(abstract: dict, num_classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in abstract.items():
        if name == "image":
            value = rng.uniform(-1, 1, a.shape).astype(np.float32)
        elif name == "label":
            value = rng.integers(0, num_classes, a.shape).astype(np.int32)
        elif name == "tokens":
            value = rng.integers(1, 900, a.shape).astype(np.int32)
        elif np.issubdtype(a.dtype, np.floating):  # cached text features
            value = rng.standard_normal(a.shape).astype(a.dtype)
        else:  # masks
            value = np.ones(a.shape, a.dtype)
        out[name] = jax.device_put(value, a.sharding)
    return out


def build(config, mesh):
    programs = aot.build_programs(config, mesh)
    train_step = programs.train_step
    if train_step.frozen_state is not None:  # AOT's frozen text tower is abstract: initialise it
        _, train_step.frozen_state = sharding.create_sharded_state(
            programs.build.init_frozen, mesh, train_step.rules
        )
    batch = concrete_batch(programs.train_args[1], int(config.model.get("num_classes", 10)))
    return train_step, train_step.init_state(), batch


def with_variant(config, dtype: str, remat: str, scan: bool, optimizer: str = "adamw"):
    variant = config.copy_and_resolve_references()
    variant.model.dtype, variant.model.remat, variant.model.scan_layers = dtype, remat, scan
    variant.optimizer.name = optimizer
    return variant


def compile_step(config, mesh):
    """(compiled step, state, batch, frozen state, compile seconds); one XLA compile per variant."""
    train_step, state, batch = build(config, mesh)
    start = time.perf_counter()
    compiled = train_step.compiled_step(state, batch)
    return compiled, state, batch, train_step.frozen_state, time.perf_counter() - start


def step_flops(config, mesh) -> float | None:
    """Model FLOPs of one step: the lowered f32 step without remat or scan (a trace, no compile)."""
    programs = aot.build_programs(with_variant(config, "float32", "none", False), mesh)
    with sharding.activate(mesh, programs.train_step.rules):
        lowered = programs.train_step.step_fn.lower(*programs.train_args)
    return metrics.cost_analysis_flops(lowered)


def time_steps(compiled, state, batch, frozen, steps: int) -> float:
    state, out = compiled(state, batch, frozen)  # warm-up: allocator, autotuning
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        state, out = compiled(state, batch, frozen)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - start)
    return best


# case -> global batch: the CPU defaults (--cases overrides both, e.g. dit_s2:256,dit_xl2:64).
CASES = {"dit_tiny": 64, "dit_text": 64, "dit_text_cached": 64, "clip_tiny": 64, "dit_s2": 8}
KNOWN_CASES = (*CASES, "dit_xl2")


def parse_cases(text: str) -> dict[str, int]:
    cases = {}
    for item in text.split(","):
        name, _, batch = item.partition(":")
        if name not in KNOWN_CASES or not batch.isdigit():
            raise SystemExit(f"--cases: {item!r}; expected CASE:BATCH with CASE in {KNOWN_CASES}")
        cases[name] = int(batch)
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated cases: " + ",".join(CASES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cases", default="", help="CASE:BATCH,... instead of the CPU defaults")
    parser.add_argument("--peak_size", type=int, default=1024, help="side of the peak's matmul")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a recipe field of every case, as train.py's --config.FIELD (repeatable), e.g. "
        "--set model.patch_size=8 --set diffusion.flow_prediction_type=sample",
    )
    args = parser.parse_args()
    device = jax.devices()[0]
    mesh = meshes.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
    peaks = {
        dtype: metrics.measure_matmul_flops(size=args.peak_size, dtype=dtype, seconds=1.0)
        for dtype in ("float32", "bfloat16")
    }
    print(
        f"device: {device.device_kind} ({jax.default_backend()}); matmul peaks (this run, "
        f"{args.peak_size}^3): float32 {peaks['float32'] / 1e9:.1f} GFLOP/s, "
        f"bfloat16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s\n"
    )
    print(
        "| case | batch | variant | step (s) | examples/s | vs f32 | MFU | MFU vs own dtype | "
        "compile (s) |\n|---|---|---|---|---|---|---|---|---|"
    )
    cases = parse_cases(args.cases) if args.cases else CASES
    first_seconds = {}  # case -> its first variant's step time
    for case, batch_size in cases.items():
        if args.only and case not in args.only.split(","):
            continue
        config = apply_overrides(case_config(case, batch_size), args.set)
        flops, base = step_flops(config, mesh), None
        for name in args.variants.split(","):
            dtype, remat, scan, optimizer = VARIANTS[name]
            compiled, state, batch, frozen, compile_seconds = compile_step(
                with_variant(config, dtype, remat, scan, optimizer), mesh
            )
            seconds = time_steps(compiled, state, batch, frozen, args.steps)
            del compiled, state, batch  # free device memory before the next variant
            base = base or seconds
            first_seconds.setdefault(case, seconds)
            print(
                f"| {case} | {batch_size} | {name} | {seconds:.4f} | {batch_size / seconds:.1f} | "
                f"{base / seconds:.2f} | {100 * flops / seconds / peaks['float32']:.0f}% | "
                f"{100 * flops / seconds / peaks[dtype]:.0f}% | {compile_seconds:.1f} |",
                flush=True,
            )
    print("\nmodel FLOPs per step from XLA cost analysis of the f32 step (no remat, no scan)")
    if {"dit_text", "dit_text_cached"} <= first_seconds.keys():
        ratio = first_seconds["dit_text"] / first_seconds["dit_text_cached"]
        print(f"dit_text_cached vs dit_text (first variant, this run): {ratio:.2f}x examples/s")


if __name__ == "__main__":
    main()
