"""Generates docs/scaling.md: the TPU recipes compiled ahead of time for v4, v5e, v5p and v6e.

    PYTHONPATH=. python scripts/scaling_table.py            # all rows (long: ~1-3 min per row)
    PYTHONPATH=. python scripts/scaling_table.py --only=dit_xl2_imagenet
    PYTHONPATH=. python scripts/scaling_table.py --keys=sampler:dit_xl2_text@v5e:4x4

Each row is `diffusion.aot.compile_for_topology(recipe, slice)` (the real train step, compiled
by the TPU compiler of libtpu); a SAMPLER_ROWS row compiles the recipe's sampling program alone
(the one sample.py runs: DiT, guidance, the sampler's loop and, for the latent recipes, the VAE
decoder). Results are cached in docs/scaling.json (sampling programs under "sampler:" keys) so an
interrupted run resumes, and the markdown is rewritten from the cache after every row. Needs the
tpu extra.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from diffusion import aot
from diffusion import config as config_lib

GIB = 1024**3

# (recipe, topology, why this sharding/remat): the recipes' own mesh is fsdp over every chip.
RECIPES = {
    "dit_xl2_imagenet": "configs/dit_xl2_imagenet.py",
    "dit_xl2_text": "configs/dit_xl2_text.py",
    "clip_b16": "configs/clip_b16.py",
    "clip_l14": "configs/clip_l14.py",
}
ROWS = (
    ("dit_xl2_imagenet", "v5p:2x2x1", {}),
    ("dit_xl2_imagenet", "v5p:4x4x4", {}),
    ("dit_xl2_imagenet", "v5e:2x2", {}),
    ("dit_xl2_imagenet", "v5e:4x4", {}),
    ("dit_xl2_imagenet", "v5e:2x2", {"model.remat": "full"}),
    ("dit_xl2_imagenet", "v4:2x2x1", {}),
    ("dit_xl2_imagenet", "v4:2x2x1", {"model.remat": "full"}),
    ("dit_xl2_imagenet", "v6e:2x4", {}),
    ("dit_xl2_text", "v5p:2x2x1", {}),
    ("dit_xl2_text", "v5e:4x4", {}),
    ("dit_xl2_text", "v5e:4x4", {"model.remat": "full"}),
    ("clip_l14", "v5p:4x4x8", {}),
    ("clip_l14", "v5p:8x8x4", {}),
    ("clip_l14", "v5e:16x16", {}),
    ("clip_l14", "v4:4x4x8", {}),
    ("clip_l14", "v6e:8x16", {}),
    ("clip_b16", "v5p:4x4x4", {}),
    ("clip_b16", "v5e:8x16", {}),
    ("clip_b16", "v6e:8x8", {}),
)

# (recipe, topology): the sampling programs, on the slices both DiT recipes' train steps use.
SAMPLER_ROWS = (
    ("dit_xl2_imagenet", "v5p:2x2x1"),
    ("dit_xl2_imagenet", "v5e:4x4"),
    ("dit_xl2_text", "v5p:2x2x1"),
    ("dit_xl2_text", "v5e:4x4"),
)
SAMPLER_PREFIX = "sampler:"

WHY = {
    "dit": "fsdp over all chips: 675M params x 16 B (f32 params, 2 Adam moments, EMA) = 11 GB "
    "would not leave room for activations if replicated; width 1152 is too narrow for tensor "
    "parallelism to pay; no remat while activations fit (remat costs ~1/3 more FLOPs)",
    "clip": "fsdp over all chips with the ring contrastive loss (no 32k x 32k logits); full remat "
    "keeps only block inputs of 32k x 257 tokens; bf16 matmuls",
}


# How the 'sequence' mesh axis works; no row of the tables above uses it yet.
SEQUENCE_PARALLELISM = [
    "## Sequence parallelism: the `sequence` mesh axis",
    "",
    "- `--config.mesh.sequence=N` (default 1, which changes nothing) splits the tokens of "
    "activations over N devices: the default rule `('activation_length', 'sequence')` shards "
    "the token axis of every constrained activation, while the batch stays on `('data', "
    "'fsdp')` and is whole across `sequence`. It is for examples whose tokens (a video's "
    "T x H x W patches) make activations too large for one device, or a batch too small to "
    "split over every chip.",
    "- Attention over split tokens, `--config.model.attention_impl=`: `ulysses` "
    "(DeepSpeed-Ulysses, arXiv:2309.14509) exchanges the token split for a head split with an "
    "all-to-all of q, k and v over `sequence`, attends over whole sequences with the local "
    "heads, and exchanges back with one more all-to-all; `ring` (ring attention, "
    "arXiv:2310.01889) keeps each device's queries and passes key/value blocks around the "
    "`sequence` devices with collective permutes, folding each block into a streaming softmax, "
    "so no device holds the whole sequence of keys and values. Cross-attention to keys of "
    "another length (the text) splits only the queries: keys and values stay whole on every "
    "device, with no collective.",
    "- Divisibility: the tokens must be a multiple of `mesh.sequence`; for `ulysses` "
    "self-attention so must the heads per tensor device (`num_heads / mesh.tensor`): 12 heads "
    "with tensor 1 allow sequence 1, 2, 3, 4, 6 or 12, while `ring` takes any head count. "
    "Otherwise a UserError names the numbers.",
    "- Checked by `tests/test_sequence_parallel.py` on 8 CPU devices, for both: outputs and "
    "gradients with respect to q, k and v equal the unsharded core (relative 1e-5) on data 2 x "
    "sequence 4, sequence 8 and data 2 x sequence 2 x tensor 2 meshes, without a mask, with a "
    "key mask and with a per-head mask, and the compiled programs hold all-to-alls (ulysses) "
    "or collective permutes (ring) and no all-gather; a tiny text-conditioned DiT on data 2 x "
    "sequence 4 has the one-device loss and parameter gradients. Their speed and memory on "
    "accelerators are not measured yet.",
    "",
]


def sampler_key(recipe, topology) -> str:
    return f"{SAMPLER_PREFIX}{recipe}@{topology}"


def row_key(recipe, topology, overrides) -> str:
    extra = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return f"{recipe}@{topology}" + (f"[{extra}]" if extra else "")


def compile_row(recipe, topology, overrides) -> dict:
    config = config_lib.load_config(RECIPES[recipe], list(overrides.items()))
    start = time.perf_counter()
    report = aot.compile_for_topology(config, topology, sampler=False, check_fit=False)
    report["wall_seconds"] = time.perf_counter() - start
    return report


def compile_sampler_row(recipe, topology) -> dict:
    config = config_lib.load_config(RECIPES[recipe])
    start = time.perf_counter()
    report = aot.compile_for_topology(config, topology, train_step=False, check_fit=False)
    report["wall_seconds"] = time.perf_counter() - start
    return report


def sampler_markdown(results: dict) -> list[str]:
    """The sampling programs' table: memory per device of one program call."""
    lines = [
        "## Sampling programs",
        "",
        "Each row compiles the recipe's sampling program, the very function sample.py runs "
        "(`inference.program.sampling_program`: guidance around the DiT, the sampler's "
        "`lax.scan` over all steps, then the VAE decoder of `config.autoencoder` turning the "
        "32x32x4 latents into 256x256 images), with the weights replicated on every device as "
        "sample.py places them and one micro-batch of samples per device. The autoencoder is "
        "passed whole (83.7M parameters for SD's VAE), as sample.py passes it; jit drops the "
        "encoder's weights, which the program never reads, so the arguments hold the DiT's "
        "EMA weights and the decoder's 49.5M (2.51 + 0.18 GiB for dit_xl2_imagenet). The "
        "compiler gives no time for a loop (it counts one step), so only memory is reported.",
        "",
        "| recipe | slice | devices | samples | sampler, steps | images | autoencoder params "
        "| fits | memory / device (GiB) | HBM (GiB) | arguments (GiB) | temporaries (GiB) | "
        "compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        recipe = key.removeprefix(SAMPLER_PREFIX).split("@")[0]
        sample = r["sampler"]
        if not sample.get("compiled"):
            lines.append(
                f"| {recipe} | {r['topology']} | {r['num_devices']} | {sample['batch']} | "
                f"{sample['sampler']}, {sample['steps']} | - | - | no (compiler: out of memory) "
                "| - | - | - | - | - |"
            )
            continue
        m = sample["memory"]
        size = sample.get("image_size")
        lines.append(
            f"| {recipe} | {r['topology']} | {r['num_devices']} | {sample['batch']} | "
            f"{sample['sampler']}, {sample['steps']} | "
            f"{f'{size}x{size}' if size else '-'} | "
            f"{sample.get('decoder_parameters', 0) / 1e6:.1f}M | "
            f"{'yes' if m['fits'] else '**no**'} | {m['total_bytes'] / GIB:.1f} | "
            f"{m['hbm_bytes'] / GIB:.0f} | {m['argument_bytes'] / GIB:.2f} | "
            f"{m['temp_bytes'] / GIB:.2f} | {sample['compile_seconds']:.0f} |"
        )
    return lines + [""]


def flop_spread(results: dict) -> list[str]:
    """One line per (recipe, remat): the compiler's TFLOP per step over the slices compiled."""
    per_step = {}
    for key, r in results.items():
        if r["train_step"].get("compiled"):
            flops = r["train_step"]["cost"]["flops"] * r["num_devices"] / 1e12
            per_step.setdefault((key.split("@")[0], r["remat"]), {})[r["topology"]] = flops
    return [
        f"- {recipe}, remat {remat}: "
        + ", ".join(f"{topology} {flops:.1f}" for topology, flops in slices.items())
        + f" TFLOP / step (max / min {max(slices.values()) / min(slices.values()):.2f})"
        for (recipe, remat), slices in per_step.items()
    ]


def markdown(results: dict, samplers: dict | None = None) -> str:
    lines = [
        "# TPU scaling: the recipes compiled ahead of time",
        "",
        "Generated by `PYTHONPATH=. python scripts/scaling_table.py` (needs `pip install "
        "'jax[tpu]'`): each row compiles the recipe's real train step (loss, gradients, AdamW, "
        "EMA; global batch of the recipe) with the TPU compiler for the named slice, on a CPU "
        "machine, via `jax.experimental.topologies`. Raw reports: `docs/scaling.json`.",
        "",
        "- *Memory* is per device (`compiled.memory_analysis()`: arguments + outputs - donated "
        "aliases + temporaries + code) against the chip's HBM (v4 32 GiB, v5e 16, v5p 95, v6e "
        "32). On v4 the compile-only topology exposes each chip's two TensorCores as devices, so "
        "each device gets half a chip (16 GiB, half the peak).",
        "- *Step time* is the compiler's `optimal_seconds` where it gives one; for sharded "
        "programs it returns none, and the time is the roofline max(FLOPs / peak, bytes / HBM "
        "bandwidth) from the compiler's own FLOP and byte counts, collectives NOT counted. Both "
        "are lower bounds of the real step time, so *MFU* (compiler FLOPs / (time x bf16 peak)) "
        "is an upper bound. With remat the FLOPs include the recomputation.",
        "- Scanned layers are counted once by XLA; FLOPs, bytes and times are extrapolated from "
        "1- and 2-block unscanned twins of the same step (exact for identical blocks; checked "
        "in tests/test_aot.py).",
        "- *TFLOP / step* is TFLOP / device x devices: the whole step as the compiler counts it, "
        "which should not depend on the slice (full remat adds 1/3, the recomputation). Where "
        "one recipe's rows with the same remat disagree (the spread below), the compiler "
        "counts less than it runs on some slices (a loop whose body the analysis counts once, "
        "such as a collective matmul, would do it; not investigated), and the step time, "
        "examples/s and MFU of the lower rows are not comparable with the others.",
        "",
        *flop_spread(results),
        "",
        "| recipe | slice | devices | mesh | remat | fits | memory / device (GiB) | HBM (GiB) "
        "| TFLOP / device | TFLOP / step | est. step (ms) | est. examples/s | MFU bound | "
        "time source | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        recipe = key.split("@")[0]
        t = r["train_step"]
        mesh = "x".join(f"{v}" for v in r["mesh"].values()) + f" ({' x '.join(r['mesh'])})"
        if not t.get("compiled"):
            lines.append(
                f"| {recipe} | {r['topology']} | {r['num_devices']} | {mesh} | {r['remat']} | "
                f"no (compiler: out of memory) | - | - | - | - | - | - | - | - | - |"
            )
            continue
        m, c = t["memory"], t["cost"]
        source = "compiler" if c["compiler_seconds"] else "roofline"
        lines.append(
            f"| {recipe} | {r['topology']} | {r['num_devices']} | {mesh} | {r['remat']} | "
            f"{'yes' if m['fits'] else '**no**'} | {m['total_bytes'] / GIB:.1f} | "
            f"{m['hbm_bytes'] / GIB:.0f} | {c['flops'] / 1e12:.2f} | "
            f"{c['flops'] * r['num_devices'] / 1e12:.1f} | "
            f"{1e3 * c['step_time_s']:.0f} | {t['examples_per_second']:.0f} | "
            f"{100 * c['mfu']:.0f}% | {source} | {t['compile_seconds']:.0f} |"
        )
    lines += ["", "## Why this sharding and remat", ""]
    lines += [f"- **{family}**: {why}." for family, why in WHY.items()]
    lines += [
        "",
        "Memory per device: "
        + "; ".join(
            f"{key}: arguments {r['train_step']['memory']['argument_bytes'] / GIB:.1f}, "
            f"temporaries {r['train_step']['memory']['temp_bytes'] / GIB:.1f} GiB"
            for key, r in results.items()
            if r["train_step"].get("compiled")
        )
        + ".",
        "",
    ]
    lines += sampler_markdown(samplers) if samplers else []
    lines += SEQUENCE_PARALLELISM
    missing = [row_key(*row) for row in ROWS if row_key(*row) not in results]
    missing += [
        sampler_key(*row) for row in SAMPLER_ROWS if sampler_key(*row) not in (samplers or {})
    ]
    if missing:  # the script resumes from the cache: rerun it to compile these
        lines += [f"Not compiled yet (rerun the script to add them): {', '.join(missing)}.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated recipes (default: all)")
    parser.add_argument("--output", default="docs/scaling.md")
    parser.add_argument("--cache", default="docs/scaling.json")
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    parser.add_argument(
        "--render_only", action="store_true", help="rewrite the markdown from the cache"
    )
    parser.add_argument(
        "--first", default="", help="comma-separated row keys (recipe@topology) to compile first"
    )
    parser.add_argument(
        "--keys",
        default="",
        help="comma-separated row keys to compile, the others skipped (e.g. "
        "'sampler:dit_xl2_text@v5e:4x4': one row per process on a small host)",
    )
    args = parser.parse_args()
    results = {}
    if os.path.isfile(args.cache) and not args.fresh:
        with open(args.cache, encoding="utf-8") as f:
            results = json.load(f)
    only = set(filter(None, args.only.split(",")))
    keys = set(filter(None, args.keys.split(",")))
    first = list(filter(None, args.first.split(",")))
    order = sorted(ROWS, key=lambda row: (row_key(*row) not in first, ROWS.index(row)))
    for recipe, topology, overrides in order:
        key = row_key(recipe, topology, overrides)
        if (only and recipe not in only) or (keys and key not in keys):
            continue
        if key in results or args.render_only:
            continue
        print(f"compiling {key} ...", flush=True)
        results[key] = compile_row(recipe, topology, overrides)
        print(aot.format_report(results[key]), flush=True)
        save(results, args)
    for recipe, topology in SAMPLER_ROWS:
        key = sampler_key(recipe, topology)
        if (only and recipe not in only) or (keys and key not in keys):
            continue
        if key in results or args.render_only:
            continue
        print(f"compiling {key} ...", flush=True)
        results[key] = compile_sampler_row(recipe, topology)
        print(aot.format_report(results[key]), flush=True)
        save(results, args)
    write_markdown(results, args.output)


def save(results: dict, args) -> None:
    with open(args.cache, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    write_markdown(results, args.output)


def write_markdown(results: dict, path: str) -> None:
    ordered = {row_key(*row): results[row_key(*row)] for row in ROWS if row_key(*row) in results}
    keys = [sampler_key(*row) for row in SAMPLER_ROWS]
    samplers = {key: results[key] for key in keys if key in results}
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(ordered, samplers))


if __name__ == "__main__":
    main()
