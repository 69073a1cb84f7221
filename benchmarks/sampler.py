"""Images/s and compile time of every sampler of `TextToImage.generate`, and proof of no recompile.

    PYTHONPATH=. python benchmarks/sampler.py [--steps=20,50] [--batch=16] [--samplers=euler,ddim]

The pipeline is built directly from the constructor (no training): a tiny text-conditioned DiT
(models.dit_config("tiny"), 32x32x3, patch 4) and the tiny CLIP text tower, both with RANDOM
weights (init plus N(0, 0.05) noise, so the prediction depends on the prompt), a caption
tokenizer trained on the spot, one CPU device. Random weights change no timing. The same DiT is
read once as a flow-matching model (euler, heun, euler_stochastic, dpmpp_2m) and once as a DDPM
model (epsilon, linear betas, T = 1000: ddim, ddpm, dpmpp_2m).

For each (model, sampler, steps):
1. first call: prompts A, guidance scale 4. Its wall time includes tracing and compiling; the
   compile time is the sum of jax's trace, lowering and XLA backend-compile events (the events
   behind `jax.log_compiles`) during that call.
2. second call: a NEW prompt set B, new seeds, a NEW scale (1 = guidance off). `num_compilations`
   and the count of XLA backend compiles during the call must both be 0.
3. `--repeats` more calls at scale 4 and at scale 1, best time -> images/s.
Ratios are within this run (absolute times drift with the machine's load).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from diffusion import data as data_lib
from diffusion import inference, meshes, models

RESOLUTION = 32
CONTEXT_LENGTH = 16
CASES = (  # (model, user-facing sampler) in the order of the table
    ("flow", "euler"),
    ("flow", "heun"),
    ("flow", "euler_stochastic"),
    ("flow", "dpmpp_2m"),
    ("ddpm", "ddim"),
    ("ddpm", "ddpm"),
    ("ddpm", "dpmpp_2m"),
)
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "heart")
SIZES = ("small", "large")
MAX_BATCH = len(COLORS) * len(SHAPES) * len(SIZES)  # prompt_sets makes 2x this many prompts
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def model_calls_per_image(sampler: str, steps: int) -> int:
    """DiT forward passes (each on 2x the batch: cond and uncond) per image, from samplers.py."""
    return 2 * steps - 1 if sampler == "heun" else steps  # Heun's last step is plain Euler


class CompileEvents:
    """Sums jax's compile-duration events, and counts XLA backend compiles, since `reset()`."""

    def __init__(self):
        self.reset()
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def reset(self):
        self.seconds, self.backend_compiles = 0.0, 0

    def _record(self, event: str, duration: float, **kwargs):
        if event in COMPILE_EVENTS:
            self.seconds += duration
            self.backend_compiles += event == COMPILE_EVENTS[-1]


def perturbed(module, key, std: float = 0.05):
    """`module` with N(0, std) noise on every parameter: the DiT's zero-initialised adaLN gates
    and output layer would otherwise make the prediction 0 whatever the prompt."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


def build_pipelines(tokenizer_dir: str) -> dict[str, inference.TextToImage]:
    """objective -> a TextToImage over one random-weight tiny DiT and CLIP text tower."""
    captions = [
        f"a {size} {color} {shape}"
        for size, color, shape in itertools.product(SIZES, COLORS, SHAPES)
    ]
    tokenizer = data_lib.train_caption_tokenizer(captions, tokenizer_dir, vocab_size=300)
    clip_config = models.clip_config(
        "tiny", vocab_size=len(tokenizer), context_length=CONTEXT_LENGTH, image_size=RESOLUTION
    )
    clip = perturbed(models.CLIP(clip_config, rngs=nnx.Rngs(0)), jax.random.key(1))
    dit_config = models.dit_config(
        "tiny", context_dim=clip_config.text_width, pooled_dim=clip_config.embed_dim
    )
    dit = perturbed(models.DiT(dit_config, rngs=nnx.Rngs(2)), jax.random.key(3))
    mesh = meshes.make_mesh({"data": 1}, jax.devices()[:1])
    diffusion = {
        "flow": dict(objective="flow", shift=1.0),
        "ddpm": dict(
            objective="ddpm",
            prediction_type="epsilon",
            schedule="linear",
            num_timesteps=1000,
            zero_terminal_snr=False,
        ),
    }
    return {
        objective: inference.TextToImage(
            dit=dit,
            text_encoder=clip,
            tokenizer=tokenizer,
            diffusion_config=ml_collections.ConfigDict(fields),
            context_length=CONTEXT_LENGTH,
            resolution=RESOLUTION,
            mesh=mesh,
        )
        for objective, fields in diffusion.items()
    }


def prompt_sets(batch: int) -> tuple[list[str], list[str]]:
    """Two disjoint prompt sets of `batch` prompts (the second never seen by the first call)."""
    every = [f"a {s} {c} {h}" for s, c, h in itertools.product(SIZES, COLORS, SHAPES)]
    every += [f"{p} on the left" for p in every]
    return every[:batch], every[batch : 2 * batch]


def timed(function) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    images = function()  # generate returns host uint8 arrays: the work is done
    return time.perf_counter() - start, images


def measure(pipeline, sampler: str, steps: int, batch: int, repeats: int, events) -> dict:
    prompts_a, prompts_b = prompt_sets(batch)

    def generate(prompts, seeds, scale):
        return pipeline.generate(
            prompts,
            seeds=seeds,
            sampler=sampler,
            steps=steps,
            guidance_scale=scale,
            batch_size=batch,
        )

    seeds_a, seeds_b = list(range(batch)), list(range(batch, 2 * batch))
    programs = pipeline.num_compilations
    events.reset()
    first, images_a = timed(lambda: generate(prompts_a, seeds_a, 4.0))
    compile_seconds, first_compiles = events.seconds, events.backend_compiles
    first_programs = pipeline.num_compilations - programs
    events.reset()
    second, images_b = timed(lambda: generate(prompts_b, seeds_b, 1.0))
    second_compiles, second_programs = events.backend_compiles, pipeline.num_compilations
    second_programs -= programs + first_programs
    guided = min(timed(lambda: generate(prompts_a, seeds_a, 4.0))[0] for _ in range(repeats))
    unguided = min(timed(lambda: generate(prompts_b, seeds_b, 1.0))[0] for _ in range(repeats))
    return dict(
        first=first,
        second=second,
        compile=compile_seconds,
        first_compiles=first_compiles,
        first_programs=first_programs,
        second_compiles=second_compiles,
        second_programs=second_programs,
        guided=batch / guided,
        unguided=batch / unguided,
        differ=not np.array_equal(images_a, images_b),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="20,50", help="comma-separated step counts")
    parser.add_argument("--batch", type=int, default=16, help="images per generate() call")
    parser.add_argument(
        "--samplers",
        default="",
        help="comma-separated model:sampler or sampler names (default: all): "
        + ",".join(f"{m}:{s}" for m, s in CASES),
    )
    parser.add_argument("--repeats", type=int, default=1, help="more timed calls per scale")
    args = parser.parse_args()
    if not 1 <= args.batch <= MAX_BATCH:
        parser.error(f"--batch must be in [1, {MAX_BATCH}] (two disjoint prompt sets)")
    jax.config.update("jax_enable_compilation_cache", False)  # real compile times, every run
    wanted = set(args.samplers.split(",")) if args.samplers else None
    cases = [(m, s) for m, s in CASES if wanted is None or s in wanted or f"{m}:{s}" in wanted]
    if not cases:
        parser.error(f"--samplers={args.samplers!r} names no case of {CASES}")
    events = CompileEvents()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipelines = build_pipelines(tokenizer_dir)
    print(
        f"tiny DiT ({RESOLUTION}x{RESOLUTION}x3, patch 4) + tiny CLIP text tower, RANDOM weights; "
        f"batch {args.batch}, micro_batch {inference.settings.DEFAULT_MICRO_BATCH}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"load average {os.getloadavg()[0]:.1f} at start\n"
    )
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for model, sampler in cases:
            result = measure(pipelines[model], sampler, steps, args.batch, args.repeats, events)
            rows.append((model, sampler, steps, result))
            print(f"  measured {model} {sampler} {steps} steps", flush=True)
    print("\nimages/s per sampler (guided = scale 4; off = scale 1, the same compiled program)\n")
    print(
        "| model | sampler | steps | DiT calls/image | images/s guided | images/s off | "
        "off / guided | guided vs flow euler |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model, sampler, steps, r in rows:
        euler = next((x for m, s, n, x in rows if (m, s, n) == ("flow", "euler", steps)), None)
        versus = f"{r['guided'] / euler['guided']:.2f}" if euler else "n/a"
        print(
            f"| {model} | {sampler} | {steps} | {model_calls_per_image(sampler, steps)} | "
            f"{r['guided']:.1f} | {r['unguided']:.1f} | {r['unguided'] / r['guided']:.2f} | "
            f"{versus} |"
        )
    print(
        "\ncompilation: first call (prompts A, scale 4) vs second call (new prompts B, new seeds,"
        " scale 1)\n"
    )
    print(
        "| model | sampler | steps | compile (s) | first call (s) | second call (s) | "
        "first / second | programs traced 1st / 2nd | XLA compiles 1st / 2nd | images differ |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, sampler, steps, r in rows:
        print(
            f"| {model} | {sampler} | {steps} | {r['compile']:.1f} | {r['first']:.2f} | "
            f"{r['second']:.2f} | {r['first'] / r['second']:.1f} | "
            f"{r['first_programs']} / {r['second_programs']} | "
            f"{r['first_compiles']} / {r['second_compiles']} | {r['differ']} |"
        )


if __name__ == "__main__":
    main()
