"""A latent DiT's train step against a pixel DiT's at the same IMAGE resolution, in one process.

    PYTHONPATH=. python benchmarks/latent_vs_pixel.py [--image_size=64] [--variant=tiny] \
        [--patch_size=2] [--batch=8] [--steps=3] [--rounds=2] [--dtype=float32]

The baseline is a class-conditional DiT on image_size x image_size x 3 pixels; the other case is
the same DiT (width, depth, heads, patch) on the (image_size / f)^2 x 4 latents of
config.autoencoder's VAE (default "SD": f = 8, 4 channels), as configs/dit_xl2_imagenet.py trains
on encode.py's datasets. Only the DiT's step is timed: a latent dataset holds the encoder's
posteriors, so training never runs the encoder (encode.py does, once; benchmarks/encode.py times
it). Each case is the real `Trainer.step` built through `benchmarks/train_step.py` (loss,
gradients, AdamW, EMA) on one device, compiled once; the cases alternate for `--rounds` rounds of
best-of-`--steps`, and the table gives each case's best time and its speed-up over the pixel DiT.
Model FLOPs are XLA's count of the same step lowered without remat or scan.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (the benchmark beside this one builds and times the step)

from configs import base_dit  # noqa: E402
from diffusion import aot, meshes  # noqa: E402


def case_config(args, latent: bool) -> ml_collections.ConfigDict:
    """The pixel DiT's recipe, or the same DiT on the VAE latents of the same images."""
    config = base_dit.get_config()
    config.model.variant = args.variant
    config.model.patch_size = args.patch_size
    config.model.num_classes = 10  # class-conditional: no frozen text tower to build
    config.model.dtype = args.dtype
    config.training.global_batch_size = args.batch
    config.data.image_size = args.image_size
    config.model.in_channels = 3
    if latent:
        config.autoencoder = ml_collections.ConfigDict({"variant": args.autoencoder})
        vae = aot.autoencoder_config(config)
        if args.image_size % (vae.downsampling_factor * args.patch_size):
            raise SystemExit(
                f"--image_size={args.image_size} is not a multiple of the VAE's factor "
                f"{vae.downsampling_factor} x --patch_size={args.patch_size}"
            )
        config.data.image_size = args.image_size // vae.downsampling_factor
        config.model.in_channels = vae.latent_channels
    return config


def time_round(case: dict, steps: int) -> float:
    """Best-of-`steps` seconds of a case's step; keeps its state (donated at every call)."""
    compiled, state, batch, frozen = case["step"]
    state, out = compiled(state, batch, frozen)  # warm-up: allocator, caches
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        state, out = compiled(state, batch, frozen)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - start)
    case["step"] = (compiled, state, batch, frozen)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=64, help="side of the images")
    parser.add_argument("--variant", default="tiny", help="DiT variant, e.g. tiny, DiT-S/2")
    parser.add_argument("--patch_size", type=int, default=2, help="patch side of both DiTs")
    parser.add_argument("--autoencoder", default="SD", help="VAE variant of the latents")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (best of)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two cases")
    parser.add_argument("--dtype", default="float32", help="compute dtype of both DiTs")
    args = parser.parse_args()
    device = jax.devices()[0]
    mesh = meshes.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
    print(f"device: {device.device_kind} ({jax.default_backend()}); args: {vars(args)}\n")
    cases = {}
    for name, latent in (("pixel", False), ("latent", True)):
        config = case_config(args, latent)
        compiled, state, batch, frozen, compile_seconds = train_step.compile_step(config, mesh)
        side, channels = config.data.image_size, config.model.in_channels
        tokens = (side // args.patch_size) ** 2
        flops = train_step.step_flops(config, mesh)
        cases[name] = dict(
            step=(compiled, state, batch, frozen),
            inputs=f"{side}x{side}x{channels}",
            tokens=tokens,
            flops=flops,
            compile_seconds=compile_seconds,
            best=float("inf"),
        )
    for _ in range(args.rounds):
        for case in cases.values():
            case["best"] = min(case["best"], time_round(case, args.steps))
    print(
        "| case | DiT input | tokens | step (s) | examples/s | speed-up vs pixel | "
        "model GFLOP / step | compile (s) |\n|---|---|---|---|---|---|---|---|"
    )
    base = cases["pixel"]["best"]
    for name, case in cases.items():
        flops = f"{case['flops'] / 1e9:.1f}" if case["flops"] else "-"
        print(
            f"| {name} | {case['inputs']} | {case['tokens']} | {case['best']:.4f} | "
            f"{args.batch / case['best']:.1f} | {base / case['best']:.1f}x | {flops} | "
            f"{case['compile_seconds']:.1f} |"
        )
    print(
        f"\nimages {args.image_size}x{args.image_size}; same DiT ({args.variant}, patch "
        f"{args.patch_size}) on both; the latent step excludes encoding (done once by encode.py)"
    )


if __name__ == "__main__":
    main()
