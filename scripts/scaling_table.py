"""Generates docs/scaling.md: the TPU recipes compiled ahead of time for v4, v5e, v5p and v6e.

    PYTHONPATH=. python scripts/scaling_table.py            # all rows (long: ~1-3 min per row)
    PYTHONPATH=. python scripts/scaling_table.py --only=dit_xl2_imagenet
    PYTHONPATH=. python scripts/scaling_table.py --keys=sampler:dit_xl2_text@v5e:4x4
    PYTHONPATH=. python scripts/scaling_table.py --only=video     # the Wan-sized video DiT rows

Each row is `diffusion.aot.compile_for_topology(recipe, slice)` (the real train step, compiled
by the TPU compiler of libtpu); a SAMPLER_ROWS row compiles the recipe's sampling program alone
(the one sample.py runs: DiT, guidance, the sampler's loop and, for the latent recipes, the VAE
decoder); a VIDEO_ROWS row compiles the video DiT's train step or guided sampling step at Wan
2.1's sizes (`diffusion.aot.video`). Results are cached in docs/scaling.json (sampling programs
under "sampler:" keys, video rows under "video:" keys) so an interrupted run resumes, and the
markdown is rewritten from the cache after every row. Needs the tpu extra.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

from diffusion import aot
from diffusion import config as config_lib
from diffusion.aot.video import (
    VideoRow,
    compile_video_row,
    format_video_report,
    self_attention_impl,
)

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
    # The text recipe twice: training on encode.py --text_encoder's cached text features (its
    # default data, no text tower in the step) and with the frozen CLIP L/14 run in the step.
    ("dit_xl2_text", "v5p:2x2x1", {"data.cached_text": "true"}),
    ("dit_xl2_text", "v5p:2x2x1", {"data.cached_text": "false"}),
    ("dit_xl2_text", "v5e:4x4", {"data.cached_text": "false"}),
    ("dit_xl2_text", "v5e:4x4", {"data.cached_text": "true", "model.remat": "full"}),
    ("dit_xl2_text", "v5e:4x4", {"data.cached_text": "false", "model.remat": "full"}),
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

# The video DiT at Wan 2.1's sizes (diffusion.aot.video), most telling rows first: with
# sequence parallelism s (mesh fsdp N/s x sequence s, ulysses attention) and without (fsdp N).
# Without it the batch must split over all N chips (one clip per chip); with s = N one clip is
# the whole global batch, as in MaxDiffusion's published 14B figure.
VIDEO_ROWS = (
    VideoRow("wan2.1-14b", "480p", "v5p:2x2x2", sequence=8, batch=1),
    VideoRow("wan2.1-14b", "720p", "v5p:2x2x1", sequence=4, batch=1),
    # The same step with the Pallas splash kernel as Ulysses' per-device core (no N x N logits).
    VideoRow(
        "wan2.1-14b", "720p", "v5p:2x2x1", sequence=4, batch=1, attention_impl="ulysses_splash"
    ),
    VideoRow("wan2.1-14b", "480p", "v5p:2x2x1", sequence=4, batch=1),
    VideoRow("wan2.1-14b", "480p", "v5p:2x2x1", sequence=1, batch=4),
    # 40 chips (a shape libtpu describes): one of the 14B's 40 heads per chip after ulysses.
    VideoRow("wan2.1-14b", "720p", "v5p:2x4x5", sequence=40, batch=1),
    VideoRow("wan2.1-1.3b", "480p", "v5p:2x2x1", sequence=4, batch=1),
    VideoRow("wan2.1-1.3b", "480p", "v5p:2x2x1", sequence=1, batch=4),
    VideoRow("wan2.1-14b", "480p", "v5p:2x2x1", sequence=4, batch=1, program="sample"),
    VideoRow("wan2.1-1.3b", "480p", "v5p:2x2x1", sequence=4, batch=1, program="sample"),
    VideoRow("wan2.1-14b", "720p", "v5p:2x2x2", sequence=8, batch=1),
    VideoRow("wan2.1-14b", "480p", "v5p:2x2x2", sequence=1, batch=8),
    VideoRow("wan2.1-1.3b", "480p", "v6e:2x4", sequence=4, batch=2),
    VideoRow("wan2.1-1.3b", "480p", "v6e:2x4", sequence=1, batch=8),
    VideoRow("wan2.1-14b", "480p", "v6e:4x4", sequence=8, batch=2),
    VideoRow("wan2.1-14b", "480p", "v6e:4x4", sequence=1, batch=16),
    VideoRow("wan2.1-14b", "720p", "v5p:2x2x1", sequence=4, batch=1, program="sample"),
    VideoRow("wan2.1-14b", "480p", "v5p:2x2x1", sequence=1, batch=4, program="sample"),
    VideoRow("wan2.1-1.3b", "480p", "v6e:2x4", sequence=4, batch=2, program="sample"),
    VideoRow("wan2.1-1.3b", "480p", "v6e:2x4", sequence=1, batch=8, program="sample"),
)
VIDEO_PREFIX = "video:"

WHY = {
    "dit": "fsdp over all chips: 675M params x 16 B (f32 params, 2 Adam moments, EMA) = 11 GB "
    "would not leave room for activations if replicated; width 1152 is too narrow for tensor "
    "parallelism to pay; no remat while activations fit (remat costs ~1/3 more FLOPs)",
    "clip": "fsdp over all chips with the ring contrastive loss (no 32k x 32k logits); full remat "
    "keeps only block inputs of 32k x 257 tokens; bf16 matmuls",
}


# How the 'sequence' mesh axis works; the video DiT's rows (VIDEO_ROWS) use it.
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
    "- On TPU, `ulysses_splash` is `ulysses` with JAX's Pallas splash attention kernel (a "
    "flash kernel: no N x N logits in HBM) as the per-device core, and `splash` the kernel "
    "alone (queries split, keys and values gathered); the kernel takes a key padding mask "
    "(as segment ids), not a per-head or causal one, and pads lengths to whole 512-token "
    "blocks (75,600 tokens run as 75,776). `tests/test_splash_attention.py` checks it (Pallas "
    "interpret mode on CPU) against the einsum core, relative 1e-5 in outputs and gradients; "
    "`tests/test_aot_video.py` that the TPU compiler accepts it in a train step.",
    "- Divisibility: the tokens must be a multiple of `mesh.sequence`; for `ulysses` "
    "(and `ulysses_splash`) self-attention so must the heads per tensor device "
    "(`num_heads / mesh.tensor`): 12 heads with tensor 1 allow sequence 1, 2, 3, 4, 6 or 12, "
    "while `ring` takes any head count. Otherwise a UserError names the numbers.",
    "- Checked by `tests/test_sequence_parallel.py` on 8 CPU devices, for both: outputs and "
    "gradients with respect to q, k and v equal the unsharded core (relative 1e-5) on data 2 x "
    "sequence 4, sequence 8 and data 2 x sequence 2 x tensor 2 meshes, without a mask, with a "
    "key mask and with a per-head mask, and the compiled programs hold all-to-alls (ulysses) "
    "or collective permutes (ring) and no all-gather; a tiny text-conditioned DiT on data 2 x "
    "sequence 4 has the one-device loss and parameter gradients. Their memory and estimated "
    "time at Wan 2.1's sizes, compiled for TPU slices (not run): the next section.",
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


TEXT_FEATURES = {"cached": "cached text", "tower": "text tower"}


def recipe_label(key: str, r: dict) -> str:
    """The recipe of a row, with where a text DiT's step gets its text features:
    'dit_xl2_text (cached text)' or 'dit_xl2_text (text tower)'."""
    recipe = key.split("@")[0]
    text = r.get("text_features")
    return f"{recipe} ({TEXT_FEATURES[text]})" if text else recipe


# The frozen CLIP L/14 text tower's forward pass over dit_xl2_text's batch, in closed form:
# 2 x 84.9M weights of its 12 blocks x 256 captions x 77 tokens + attention (0.06) TFLOP.
TOWER_FORWARD_TFLOP = 3.4


def step_figures(r: dict) -> tuple[float, float, float]:
    """(GiB per device, TFLOP per step, est. step ms) of a compiled train-step row."""
    step = r["train_step"]
    return (
        step["memory"]["total_bytes"] / GIB,
        step["cost"]["flops"] * r["num_devices"] / 1e12,
        1e3 * step["cost"]["step_time_s"],
    )


def cached_text_comparison(results: dict) -> list[str]:
    """One line per slice and remat where dit_xl2_text compiled both ways: what leaving the
    tower out of the step saves (memory per device, TFLOP per step, est. step time)."""
    lines = []
    for key, r in results.items():
        if not key.startswith("dit_xl2_text@") or r.get("text_features") != "cached":
            continue
        tower = results.get(key.replace("data.cached_text=true", "data.cached_text=false"))
        if tower is None or not (
            r["train_step"].get("compiled") and tower["train_step"].get("compiled")
        ):
            continue
        (gib, tflop, ms), (tower_gib, tower_tflop, tower_ms) = step_figures(r), step_figures(tower)
        saved = tower_tflop - tflop
        short = saved < 0.9 * TOWER_FORWARD_TFLOP
        lines.append(
            f"- dit_xl2_text on {r['topology']}, remat {r['remat']}: cached text {gib:.2f} GiB / "
            f"device, {tflop:.1f} TFLOP / step, est. {ms:.0f} ms; text tower {tower_gib:.2f} GiB, "
            f"{tower_tflop:.1f} TFLOP, est. {tower_ms:.0f} ms (difference {saved:.1f} TFLOP / "
            "step"
            + (
                f", less than the closed form's {TOWER_FORWARD_TFLOP}: on this slice the compiler "
                "counts less of the tower than it runs, as in the spread below; not investigated"
                if short
                else ""
            )
            + ")."
        )
    return lines


def flop_spread(results: dict) -> list[str]:
    """One line per (recipe, remat): the compiler's TFLOP per step over the slices compiled."""
    per_step = {}
    for key, r in results.items():
        if r["train_step"].get("compiled"):
            flops = r["train_step"]["cost"]["flops"] * r["num_devices"] / 1e12
            per_step.setdefault((recipe_label(key, r), r["remat"]), {})[r["topology"]] = flops
    return [
        f"- {recipe}, remat {remat}: "
        + ", ".join(f"{topology} {flops:.1f}" for topology, flops in slices.items())
        + f" TFLOP / step (max / min {max(slices.values()) / min(slices.values()):.2f})"
        for (recipe, remat), slices in per_step.items()
    ]


def video_key(row: VideoRow) -> str:
    return row.key


def compiler_memory(error: str) -> str:
    """What a TPU compiler's out-of-memory error says the program needs: '388.16G of
    temporaries' ('... memory required for HLO temporaries (388.16G) exceeds available HBM') or
    '250.12G' ('Used 250.12G of 95.74G hbm'); '?' for another wording."""
    found = re.search(r"required for HLO temporaries \(([\d.]+[KMGT]?)\)", error)
    if found:
        return f"{found.group(1)} of temporaries"
    found = re.search(r"Used ([\d.]+[KMGT]?) of [\d.]+[KMGT]? hbm", error)
    return found.group(1) if found else "?"


def runs_a_pallas_kernel(r: dict) -> bool:
    """Whether the row's attention is the splash kernel, whose FLOPs and bytes the compiler's
    cost analysis does not see (a Pallas call is opaque to it)."""
    return "splash" in self_attention_impl(VideoRow(**r["row"]))


def step_seconds_bound(r: dict) -> float:
    """The row's estimated step time. For a Pallas kernel row the compiler's estimate leaves
    the attention out, so the model FLOPs with full remat's extra forward (4/3) at the chips'
    bf16 peak bound it from below too (the peak is model FLOPs / (MFU x est. step))."""
    compiler = r["cost"]["step_time_s"]
    if not runs_a_pallas_kernel(r):
        return compiler
    return max(compiler, 4 / 3 * r["model_flops_utilisation"] * compiler)


def video_row_cells(r: dict) -> list[str]:
    row = r["row"]
    mesh = f"{r['mesh']['fsdp']} x {r['mesh']['sequence']}"
    attention = self_attention_impl(VideoRow(**row))
    cells = [
        row["program"],
        row["variant"],
        row["resolution"],
        str(row["batch"]),
        row["topology"],
        str(r["num_devices"]),
        mesh,
        attention,
        str(r["tokens"]),
    ]
    if not r["compiled"]:
        used = compiler_memory(r["error"])
        return cells + [f"**no** (compiler: out of memory, needs {used})"] + ["-"] * 10
    m = r["memory"]
    cells += [
        "yes" if m["fits"] else "**no**",
        f"{m['total_bytes'] / GIB:.1f}",
        f"{m['hbm_bytes'] / GIB:.0f}",
        f"{m['argument_bytes'] / GIB:.1f}",
        f"{m['temp_bytes'] / GIB:.1f}",
    ]
    c = r.get("cost")
    if c is None:
        return cells + ["-"] * 6
    source = "compiler" if c["compiler_seconds"] else "roofline"
    if runs_a_pallas_kernel(r):  # the MFU of a bound made of the model FLOPs says nothing
        source = f"model FLOPs x 4/3 at peak (compiler, kernel unseen: {c['step_time_s']:.2f})"
    utilisation = "-" if runs_a_pallas_kernel(r) else f"{100 * r['model_flops_utilisation']:.0f}%"
    return cells + [
        f"{c['flops'] / 1e12:.0f}",
        f"{step_seconds_bound(r):.2f}",
        source,
        f"{r['model_flops'] / 1e12:.0f}",
        f"{r['compiler_over_model_flops']:.2f}",
        utilisation,
    ]


def splash_comparison(videos: dict) -> str:
    """The same 14B 720p step on v5p-8 with the splash kernel as Ulysses' core, from the cached
    row ('' until it is compiled)."""
    key = VideoRow(
        "wan2.1-14b", "720p", "v5p:2x2x1", sequence=4, batch=1, attention_impl="ulysses_splash"
    ).key
    r = videos.get(key)
    if r is None:
        return ""
    if not r["compiled"] or not r["memory"]["fits"]:
        used = compiler_memory(r["error"]) if not r["compiled"] else "more than HBM"
        return f" With the splash kernel (ulysses_splash) it still does not fit: it needs {used}."
    c = r["cost"]
    return (
        " With the splash kernel as Ulysses' per-device core (`ulysses_splash`) the same step "
        f"fits: {r['memory']['total_bytes'] / GIB:.1f} GiB per chip of 95 (temporaries "
        f"{r['memory']['temp_bytes'] / GIB:.1f} GiB). The compiler's est. "
        f"{c['step_time_s']:.1f} s leaves out the kernel's work (its cost analysis does not see "
        f"into a Pallas kernel: compiler / model {r['compiler_over_model_flops']:.2f}); the "
        "model's FLOPs with the remat forward at the chips' bf16 peak take "
        f"{step_seconds_bound(r):.1f} s, a lower bound, comparable with MaxDiffusion's measured "
        f"36 s only as that. (This row: `--keys='{key}'`, {r['wall_seconds']:.0f} s to compile "
        "with its twins on a 2-core host.)"
    )


def maxdiffusion_comparison(videos: dict) -> str:
    """The 14B 720p train step at global batch 1 on v5p-8 (four v5p chips) against
    MaxDiffusion's published figure, from the cached row."""
    key = VideoRow("wan2.1-14b", "720p", "v5p:2x2x1", sequence=4, batch=1).key
    r = videos.get(key)
    head = (
        "MaxDiffusion's published figure, as issue 34 quotes it (not re-checked here): about "
        "36 s per Wan 2.1 14B training step at 720p, 81 frames, global batch 1 on v5p-8 (four "
        "v5p chips), a measured time, with its TPU attention a Pallas flash (splash) kernel. "
    )
    fitting = [
        f"{v['row']['resolution']} on {v['row']['topology']} (fsdp {v['mesh']['fsdp']} x "
        f"sequence {v['mesh']['sequence']}, {v['row']['batch']} clip(s)): "
        f"{v['memory']['total_bytes'] / GIB:.1f} GiB per chip, est. "
        f"{step_seconds_bound(v):.1f} s{' (splash)' if runs_a_pallas_kernel(v) else ''}"
        for v in videos.values()
        if v["row"]["variant"] == "wan2.1-14b"
        and v["row"]["program"] == "train"
        and v["compiled"]
        and v["memory"]["fits"]
    ]
    head += (
        "The 14B training steps of this table that fit: " + "; ".join(fitting) + ". "
        if fitting
        else "No 14B training step of this table fits. "
    )
    if r is None:
        return head + "Our row for that configuration is not compiled yet."
    if not r["compiled"] or not r["memory"]["fits"]:
        used = (
            compiler_memory(r["error"])
            if not r["compiled"]
            else (f"{r['memory']['total_bytes'] / GIB:.0f} GiB")
        )
        return head + (
            f"Our step for it (fsdp 1 x sequence 4, ulysses) does not fit: it needs {used} per "
            "chip of 95 GiB, because the XLA attention core materialises each block's (heads / "
            "4) x N x N float32 logits (N = 75,600 tokens) where a flash kernel streams them "
            "through on-chip memory; so no time can be compared on that slice."
        )
    c = r["cost"]
    return head + (
        f"Our step for it compiles to {r['memory']['total_bytes'] / GIB:.0f} GiB per chip and an "
        f"estimated {c['step_time_s']:.1f} s from the compiler's cost analysis "
        f"({c['step_time_source']}): an estimate, a lower bound that leaves collectives out, not "
        "a measured step time, so the two numbers are not a like-for-like comparison."
    )


def video_markdown(videos: dict) -> list[str]:
    """The video DiT section: one row per VIDEO_ROWS entry compiled."""
    lines = [
        "## Video DiT (Wan 2.1 sizes)",
        "",
        "Generated by `PYTHONPATH=. python scripts/scaling_table.py --only=video` "
        "(`diffusion.aot.video`, one row per process on a small host with `--keys=KEY`). "
        "*train*: the flow-matching train step of the video DiT shaped as Wan 2.1 "
        "(`wan2.1-1.3b`: 30 blocks, width 1536, 12 heads; `wan2.1-14b`: 40 blocks, width 5120, "
        "40 heads) on Wan-VAE latents of 81 frames (480p: 21 x 60 x 104 x 16; 720p: 21 x 90 x "
        "160 x 16; patch 1 x 2 x 2: 32,760 or 75,600 tokens), cached umT5 states (512 x 4096, "
        "bfloat16) and their mask as inputs; loss, gradients, AdamW (float32 parameters and "
        "moments, no EMA), bfloat16 compute, every block rematerialised (`full`), blocks "
        "scanned. *sample*: one classifier-free-guided evaluation (cond and uncond batched: "
        "2 x clips rows), bfloat16 weights. Mesh: fsdp x sequence over the slice's chips "
        "(data 1, tensor 1); the weights and Adam's moments are split over fsdp and sequence "
        "together, the clips over fsdp, the tokens over sequence, and with sequence > 1 "
        "self-attention is ulysses (all-to-all tokens <-> heads). Without sequence parallelism "
        "the global batch is one clip per chip (it must split over fsdp).",
        "",
        "- *memory / chip* is the compiled program's (arguments + outputs - donated aliases + "
        "temporaries + code) against HBM; where the TPU compiler refused the program for memory "
        "the column holds what it reported needing.",
        "- *TFLOP / chip* and *est. step* come from the compiler's cost analysis of 1- and "
        "2-block unscanned twins extrapolated to the full depth (XLA counts a scanned block "
        "once); the time is the compiler's `optimal_seconds` or the roofline max(FLOPs / peak, "
        "bytes / HBM bandwidth), collectives not counted: a lower bound, not a measured time.",
        "- *model TFLOP* is the closed form `video_dit_costs.flops_per_example` (matmuls only) x 3 "
        "per clip for a train step (forward and backward, without the remat recompute) and x 2 "
        "x clips for a guided evaluation; *compiler / model* is the compiler's whole-step "
        "FLOPs over it (full remat adds a forward, which would make it about 4/3; a row below "
        "that has the compiler count or run less recompute than a whole forward, not "
        "investigated); *MFU estimate* = model FLOPs / "
        "(est. step x chips x bf16 peak: v5p 459, v6e 918 TFLOP/s).",
        "- Attention is the XLA einsum core unless the row says splash: each block "
        "materialises (clips, heads / sequence, N, N) float32 logits per chip (14B at 480p "
        "without sequence parallelism: 40 x 32,760^2 x 4 B = 160 GiB), which is what keeps most "
        "rows from fitting. Wan (flash attention on GPUs) and MaxDiffusion (a Pallas flash "
        "kernel on TPU) use kernels that never hold them; so do the rows with "
        "`ulysses_splash` (`attention_impl`: Ulysses around JAX's Pallas splash attention "
        "kernel, `diffusion.models.splash_attention`; the text cross-attention by the kernel "
        "too). The compiler's cost analysis may not count a Pallas kernel's FLOPs as XLA "
        "ops' (see *compiler / model* in those rows).",
        "- v5p:2x4x5 (40 chips, one of the 14B's 40 heads per chip after the all-to-all) is a "
        "topology libtpu compiles for; whether Cloud offers it as a slice was not checked.",
        "",
        "| program | model | video | clips | slice | chips | fsdp x sequence | attention | tokens "
        "| fits | memory / chip (GiB) | HBM (GiB) | arguments (GiB) | temporaries (GiB) | TFLOP / "
        "chip | est. step (s) | time source | model TFLOP / step | compiler / model | MFU "
        "estimate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(video_row_cells(r)) + " |" for r in videos.values()]
    lines += ["", maxdiffusion_comparison(videos) + splash_comparison(videos), ""]
    return lines


def markdown(results: dict, samplers: dict | None = None, videos: dict | None = None) -> str:
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
        "- *dit_xl2_text (cached text)* rows compile the step that trains on a dataset encoded "
        "by encode.py with `--text_encoder` (the recipe's data, `config.data.cached_text=True`): "
        "each caption's CLIP L/14 token states, mask and pooled embedding are inputs of the "
        "step and the frozen text tower is not in it. *dit_xl2_text (text tower)* rows "
        "(`--config.data.cached_text=false`) run the tower on the captions' tokens in every "
        "step, as on latents encoded without `--text_encoder`. Training on encode.py's cached "
        "features: read the cached text rows. The two differ by the tower's forward pass "
        "(no backward: the tower is frozen), in closed form 2 x 85M weights of its 12 blocks x "
        "256 captions x 77 tokens + attention = 3.4 TFLOP a step, and by its weights among the "
        "arguments less the cached features'; the DiT's activations dominate the memory.",
        *cached_text_comparison(results),
        "",
        *flop_spread(results),
        "",
        "| recipe | slice | devices | mesh | remat | fits | memory / device (GiB) | HBM (GiB) "
        "| TFLOP / device | TFLOP / step | est. step (ms) | est. examples/s | MFU bound | "
        "time source | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        recipe = recipe_label(key, r)
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
    lines += video_markdown(videos) if videos else []
    missing = [row_key(*row) for row in ROWS if row_key(*row) not in results]
    missing += [
        sampler_key(*row) for row in SAMPLER_ROWS if sampler_key(*row) not in (samplers or {})
    ]
    missing += [row.key for row in VIDEO_ROWS if row.key not in (videos or {})]
    if missing:  # the script resumes from the cache: rerun it to compile these
        lines += [f"Not compiled yet (rerun the script to add them): {', '.join(missing)}.", ""]
    return "\n".join(lines)


def split_keys(text: str) -> list[str]:
    """Comma-separated row keys, a comma inside a key's [overrides] kept:
    'a@v5e:4x4[x=1,y=2],b@v5p:2x2x1' -> ['a@v5e:4x4[x=1,y=2]', 'b@v5p:2x2x1']."""
    return [key for key in re.split(r",(?![^\[]*\])", text) if key]


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
    keys = set(split_keys(args.keys))
    first = split_keys(args.first)
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
    for row in VIDEO_ROWS:
        if (only and "video" not in only) or (keys and row.key not in keys):
            continue
        if row.key in results or args.render_only:
            continue
        print(f"compiling {row.key} ...", flush=True)
        results[row.key] = compile_video_row(row)
        print(format_video_report(results[row.key]), flush=True)
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
    videos = {row.key: results[row.key] for row in VIDEO_ROWS if row.key in results}
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(ordered, samplers, videos))


if __name__ == "__main__":
    main()
