"""Images/s of encode.py's encoder program against the images/s a latent DiT trains on.

    PYTHONPATH=. python benchmarks/encode.py [--resolution=64] [--batch=64] [--steps=5]
        [--widths=32,64,128] [--latent_channels=4] [--dit_variant=tiny] [--patch_size=2]

Both on one device, in this process, compiled once and timed best-of-`steps`:
  encode: `diffusion.encoding.job.BatchEncoder` (the program encode.py runs: uint8 images in,
          posterior mean and std out) of an autoencoder with random weights of the given widths;
  train:  the class-conditional DiT train step (loss, gradients, AdamW, EMA) on the latents it
          makes (side resolution / 2^(levels - 1), `latent_channels` channels), batch `--batch`.
The ratio encode / train says how many times faster the offline job turns images into latents
than training consumes them (the issue's target: at least 10x), and XLA's FLOP counts of both
programs what that ratio would be at equal FLOP/s. Random weights change no timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as train_step_benchmark  # noqa: E402  (benchmarks/train_step.py)

from configs import base_dit  # noqa: E402
from diffusion import (
    meshes,  # noqa: E402
)
from diffusion.encoding.job import BatchEncoder  # noqa: E402
from diffusion.models.autoencoder import Autoencoder, autoencoder_config  # noqa: E402


def flops_of(compiled) -> float:
    """XLA's FLOP count of a compiled program (cost_analysis is a dict, or a list of one)."""
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def best_seconds(call, steps: int) -> float:
    jax.block_until_ready(call())  # compile and warm up
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--widths", default="32,64,128", help="block_out_channels")
    parser.add_argument("--latent_channels", type=int, default=4)
    parser.add_argument("--dit_variant", default="tiny")
    parser.add_argument("--patch_size", type=int, default=2, help="DiT patch (shapes_latent's)")
    args = parser.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    config = autoencoder_config(
        block_out_channels=widths, latent_channels=args.latent_channels, norm_num_groups=8
    )
    model = Autoencoder(config, rngs=nnx.Rngs(0))
    encoder = BatchEncoder(model, args.batch)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.resolution,
                                                        args.resolution, 3), np.uint8)  # fmt: skip
    replicas = encoder.program  # the jitted program on this process's devices, and its weights
    encode_seconds = best_seconds(lambda: replicas.program(replicas.state, images), args.steps)
    encode_flops = flops_of(replicas.program.lower(replicas.state, images).compile())

    latent_side = args.resolution // config.downsampling_factor
    dit = base_dit.get_config()
    dit.model.variant = args.dit_variant
    dit.model.patch_size = args.patch_size
    dit.model.num_classes = 10
    dit.model.in_channels = args.latent_channels
    dit.data.image_size = latent_side
    dit.training.global_batch_size = args.batch
    # The build also makes the latent DiT's sampling program, which decodes: this autoencoder.
    dit.autoencoder = ml_collections.ConfigDict(
        {"variant": "tiny", "block_out_channels": widths, "latent_channels": args.latent_channels}
    )
    mesh = meshes.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    compiled, state, batch, frozen, _ = train_step_benchmark.compile_step(dit, mesh)
    train_seconds = train_step_benchmark.time_steps(compiled, state, batch, frozen, args.steps)
    train_flops = flops_of(compiled)

    encode_rate, train_rate = args.batch / encode_seconds, args.batch / train_seconds
    print(f"device: {jax.devices()[0].device_kind}; batch {args.batch}")
    print(
        f"encode  {args.resolution}x{args.resolution}x3 -> {latent_side}x{latent_side}x"
        f"{args.latent_channels} (widths {widths}): {encode_rate:.1f} images/s"
    )
    print(f"train   DiT {args.dit_variant} on those latents: {train_rate:.1f} images/s")
    print(f"ratio   encode / train: {encode_rate / train_rate:.1f}x")
    # What the ratio would be if both programs ran at the same FLOP/s: the encoder's and the
    # train step's work per image, as XLA counts them.
    per_image = encode_flops / args.batch, train_flops / args.batch
    print(
        f"FLOPs per image: encode {per_image[0] / 1e9:.3f} G, train {per_image[1] / 1e9:.3f} G; "
        f"at equal FLOP/s the ratio would be {per_image[1] / per_image[0]:.1f}x"
    )


if __name__ == "__main__":
    main()
