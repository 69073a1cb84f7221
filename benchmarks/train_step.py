"""Examples/s and MFU of the real train step on this CPU (tiny DiT, tiny CLIP, DiT-S/2 32x32).

    PYTHONPATH=. python benchmarks/train_step.py [--steps=3] [--only=dit_s2]

Each case runs `training.Trainer.step` (loss, gradients, AdamW, EMA) on one device, compiled
once, timed best-of-`steps`. FLOPs come from XLA's cost analysis of the same step WITHOUT remat
or scan (model FLOPs: remat's recomputation is not useful work, and XLA counts a scanned block
once), and MFU = FLOPs / time / the float32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from configs import base_clip, base_dit
from diffusion import aot, metrics, sharding

VARIANTS = {  # name -> (dtype, remat, scan_layers)
    "f32": ("float32", "none", False),
    "f32 remat=full": ("float32", "full", False),
    "f32 scan": ("float32", "none", True),
    "bf16": ("bfloat16", "none", False),
}


def case_config(case: str, batch: int):
    if case == "clip_tiny":
        config = base_clip.get_config()
    else:
        config = base_dit.get_config()
        config.model.num_classes = 10  # class-conditional: no frozen text tower to load
        if case == "dit_s2":
            config.model.variant = "DiT-S/2"
            config.data.image_size = 32
    config.training.global_batch_size = batch
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
        else:
            value = np.ones(a.shape, np.int32)
        out[name] = jax.device_put(value, a.sharding)
    return out


def build(config, mesh):
    programs = aot.build_programs(config, mesh)
    trainer = programs.trainer
    batch = concrete_batch(programs.train_args[1], int(config.model.get("num_classes", 10)))
    return trainer, trainer.init_state(), batch


def step_flops(config, mesh) -> float:
    """Model FLOPs of one step: the f32 step without remat or scan, per XLA's cost analysis."""
    plain = config.copy_and_resolve_references()
    plain.model.dtype, plain.model.remat, plain.model.scan_layers = "float32", "none", False
    trainer, state, batch = build(plain, mesh)
    return metrics.compiled_flops(trainer.compiled_step(state, batch))


def time_steps(trainer, state, batch, steps: int) -> tuple[float, float]:
    start = time.perf_counter()
    state, out = trainer.step(state, batch)
    jax.block_until_ready(out)
    compile_seconds = time.perf_counter() - start
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        state, out = trainer.step(state, batch)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - start)
    return best, compile_seconds


CASES = {"dit_tiny": 64, "clip_tiny": 64, "dit_s2": 8}  # case -> global batch (the CPU default: 64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated cases: " + ",".join(CASES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    peak = metrics.measure_matmul_flops(size=1024, seconds=1.0)
    print(f"float32 matmul peak (this run): {peak / 1e9:.1f} GFLOP/s\n")
    print("| case | batch | variant | step (s) | examples/s | vs f32 | MFU | compile (s) |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [c for c in CASES if not args.only or c in args.only.split(",")]
    for case in cases:
        config = case_config(case, CASES[case])
        flops = step_flops(config, mesh)
        base = None
        for name in args.variants.split(","):
            dtype, remat, scan = VARIANTS[name]
            variant = config.copy_and_resolve_references()
            variant.model.dtype, variant.model.remat, variant.model.scan_layers = dtype, remat, scan
            trainer, state, batch = build(variant, mesh)
            seconds, compile_seconds = time_steps(trainer, state, batch, args.steps)
            base = base or seconds
            examples = CASES[case] / seconds
            print(
                f"| {case} | {CASES[case]} | {name} | {seconds:.3f} | {examples:.1f} | "
                f"{base / seconds:.2f} | {100 * flops / seconds / peak:.0f}% | "
                f"{compile_seconds:.1f} |",
                flush=True,
            )
    print("\nmodel FLOPs per step from XLA cost analysis of the f32 step (no remat, no scan)")


if __name__ == "__main__":
    main()
