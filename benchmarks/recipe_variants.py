"""Step time of `make train`'s DiT or CLIP step under recipe overrides, interleaved in one process.

    PYTHONPATH=. python benchmarks/recipe_variants.py [--rounds=4] [--steps=25] [--stage=dit] \
        'default:' 'context 32:tokenizer.context_length=32' 'ns 3:optimizer.muon_ns_steps=3' \
        'optax muon:@optax_muon'
    PYTHONPATH=. python benchmarks/recipe_variants.py --stage=clip 'patch:' \
        'conv stem:model.vision_stem=conv'
    PYTHONPATH=. python benchmarks/recipe_variants.py --stage=video_dit 'default:' \
        'words:model.word_conditioning=True' 'frame patches:model.patch_size=(1,8,8)'

Each argument is NAME:FIELD=VALUE,FIELD=VALUE (fields of configs/shapes.py's `dit` or `clip`
section, or of configs/moving_shapes.py's `video_dit`, set as train.py's --config.dit.FIELD /
--config.clip.FIELD / --config.video_dit.FIELD), or NAME:@optax_muon for
the default step with optax.contrib.scale_by_muon (one Newton-Schulz per matrix) in place of
`optim.scale_by_muon` (batched by shape). All variants are compiled first; then each runs
`--steps` steps back to back (dispatched asynchronously, as in train.py's loop), in turn, for
`--rounds` rounds. The table gives the mean step time and its ratio to the first variant:
round-robin means, not a best-of-N, because this machine's speed drifts by 10 % within minutes
and the loop runs at the mean.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (the benchmark beside this one builds the same step)

from configs import moving_shapes, shapes  # noqa: E402
from diffusion import meshes, optim  # noqa: E402

OPTAX_MUON = "@optax_muon"


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, fields = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"{text!r}: expected NAME:FIELD=VALUE,... (or NAME: for the default)")
    # A comma starts a new FIELD=VALUE only before one: tuple values keep theirs, "(1,8,8)".
    return name, [f for f in re.split(r",(?=[\w.]+=)", fields) if f]


def stage_config(stage: str):
    """The `make train` recipe's section of a stage (random weights and batches, no data)."""
    if stage == "dit":
        return train_step.case_config("dit_text", 64)  # shapes.py's dit, tiny text tower
    if stage == "video_dit":
        config = moving_shapes.get_config().video_dit
        config.text_encoder.variant = "tiny"  # the recipe's CLIP tower's shapes, random weights
        return config
    config = shapes.get_config().clip
    config.training.global_batch_size = 64
    return config


def compile_variant(overrides: list[str], mesh, stage: str = "dit"):
    """(compiled step, state, batch, frozen state, global batch) of the stage's step."""
    config = stage_config(stage)
    use_optax = OPTAX_MUON in overrides
    train_step.apply_overrides(config, [o for o in overrides if o != OPTAX_MUON])
    grouped = optim.scale_by_muon
    if use_optax:  # make_optimizer looks the function up when it builds the chain
        optim.scale_by_muon = optax.contrib.scale_by_muon
    try:
        compiled, state, batch, frozen, _ = train_step.compile_step(config, mesh)
    finally:
        optim.scale_by_muon = grouped
    return [compiled, state, batch, frozen, config.training.global_batch_size]


def run_steps(variant: list, steps: int) -> float:
    """Mean seconds per step over `steps` steps dispatched back to back; keeps the new state."""
    compiled, state, batch, frozen, _ = variant
    start = time.perf_counter()
    for _ in range(steps):
        state, out = compiled(state, batch, frozen)
    jax.block_until_ready(out)
    variant[1] = state
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="NAME:FIELD=VALUE,... (first: baseline)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--stage", choices=("dit", "clip", "video_dit"), default="dit")
    args = parser.parse_args()
    mesh = meshes.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    variants = {}
    for text in args.variants:
        name, overrides = parse_variant(text)
        variants[name] = compile_variant(overrides, mesh, args.stage)
    for variant in variants.values():
        run_steps(variant, 3)  # warm-up
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, variant in variants.items():
            times[name].append(run_steps(variant, args.steps))
    baseline = np.mean(next(iter(times.values())))
    print(f"{'variant':24s} {'step (s)':>9s} {'vs first':>9s} {'examples/s':>11s}  rounds")
    for name, values in times.items():
        mean = float(np.mean(values))
        examples = variants[name][4] / mean
        rounds = " ".join(f"{v:.3f}" for v in values)
        print(f"{name:24s} {mean:9.4f} {baseline / mean:8.2f}x {examples:11.1f}  {rounds}")


if __name__ == "__main__":
    main()
