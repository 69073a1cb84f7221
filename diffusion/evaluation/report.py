"""The evaluation report: sample grids and plots as PNG files, and an index.html that shows them.

`write_report(metrics, galleries, output_dir)` takes evaluate.py's metrics.json dict (layout in
`diffusion.evaluation.evaluate_checkpoint`) and the sample galleries (grid image + prompts) and
writes OUTPUT_DIR/index.html plus its plots (drawn by `diffusion/evaluation/plots.py`) under
OUTPUT_DIR/plots/. The page is static HTML with relative links: copy the folder anywhere and open
it.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from diffusion.evaluation import fidelity, plots

ATTRIBUTE_COLUMNS = ("all", "shape", "color", "size", "position", "background")
GOOD, BAD, NEUTRAL = (40, 170, 60), (210, 40, 40), (200, 200, 200)

# =============================================================================================
# Grids
# =============================================================================================


def save_grid(
    images: np.ndarray,
    path: str,
    columns: int | None = None,
    tile: int = 96,
    frame_colors: Sequence[tuple[int, int, int]] | None = None,
    frame: int = 3,
) -> str:
    """Saves uint8 (N, H, W, 3) images as one PNG grid, row by row, each image scaled up (nearest
    neighbour, so pixels stay visible) to about `tile` pixels and framed in `frame_colors[i]`
    (e.g. green when the oracle read every attribute right). Returns `path`."""
    images = np.asarray(images, np.uint8)
    count, height, width, _ = images.shape
    if count == 0:
        raise ValueError("save_grid needs at least one image")
    columns = columns or min(8, count)
    rows = -(-count // columns)
    scale = max(1, tile // max(height, width))
    cell_h, cell_w = height * scale + 2 * frame, width * scale + 2 * frame
    canvas = np.full((rows * cell_h, columns * cell_w, 3), 255, np.uint8)
    for i, image in enumerate(images):
        top, left = (i // columns) * cell_h, (i % columns) * cell_w
        color = frame_colors[i] if frame_colors is not None else NEUTRAL
        canvas[top : top + cell_h, left : left + cell_w] = color
        big = image.repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[
            top + frame : top + frame + big.shape[0], left + frame : left + frame + big.shape[1]
        ] = big
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


# =============================================================================================
# HTML
# =============================================================================================

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
tr.best td { background: #eaf6ea; font-weight: 600; }
img.plot { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
figure { margin: 1em 0 2em; } figcaption ol { columns: 2; font-size: 0.85em; }
.ok { color: #1a8a2a; } .bad { color: #c02020; } .meta { color: #666; }
.clips { display: flex; flex-wrap: wrap; gap: 12px; }
.clips figure { margin: 0; width: 160px; font-size: 0.8em; }
.clips img { width: 128px; image-rendering: pixelated; border: 3px solid #ccc; }
.clips img.ok { border-color: rgb(40, 170, 60); } .clips img.bad { border-color: rgb(210, 40, 40); }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _number(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return (
        f"{100 * value:.1f} %"
        if percent
        else f"{value:.3g}"
        if abs(value) < 1e4
        else f"{value:.0f}"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], classes=None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(
            f'<td class="text">{c}</td>' if j == 0 else f"<td>{c}</td>" for j, c in enumerate(row)
        )
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _gallery_html(gallery: dict) -> str:
    items = []
    for i, item in enumerate(gallery["items"]):
        text = _e(item["prompt"])
        if "correct" in item:
            marks = " ".join(
                f'<span class="{"ok" if ok else "bad"}">{"&#10003;" if ok else "&#10007;"}'
                f"{_e(attribute)}</span>"
                for attribute, ok in item["correct"].items()
            )
            text += f" <span class='meta'>[{marks}]</span>"
        if "read" in item:
            read = item["read"]
            text += (
                f" <span class='meta'>read: {_e(read['size'])} {_e(read['color'])} "
                f"{_e(read['shape'])}, {_e(read['position'])}, {_e(read['background'])}</span>"
            )
        items.append(f"<li value='{i + 1}'>{text}</li>")
    return (
        f"<figure><img src='{_e(gallery['image'])}' alt='{_e(gallery['title'])}'>"
        f"<figcaption><b>{_e(gallery['title'])}</b> (row by row; green frame: "
        f"{_e(gallery.get('legend', 'all four attributes read right'))})"
        f"<ol>{''.join(items)}</ol></figcaption></figure>"
    )


def clip_gallery_html(gallery: dict) -> str:
    """Sampled clips as a block of the report: each clip's animated GIF (framed green when every
    attribute was read right, red when not), a link to its MP4, its prompt, and when given the
    oracle's marks per attribute ("correct") and what it read ("read", as
    `video_oracle.VideoReading.names`). gallery: {"title", "items": [{"gif", "mp4", "prompt",
    "correct"?, "read"?}]}, paths relative to the page."""
    figures = []
    for item in gallery["items"]:
        correct = item.get("correct")
        frame = "" if correct is None else f" class='{'ok' if all(correct.values()) else 'bad'}'"
        caption = _e(item["prompt"])
        if correct is not None:
            marks = " ".join(
                f'<span class="{"ok" if ok else "bad"}">{"&#10003;" if ok else "&#10007;"}'
                f"{_e(attribute)}</span>"
                for attribute, ok in correct.items()
            )
            caption += f"<br><span class='meta'>{marks}</span>"
        if "read" in item:
            caption += f"<br><span class='meta'>read: {_e(', '.join(item['read'].values()))}</span>"
        figures.append(
            f"<figure><img src='{_e(item['gif'])}' alt='{_e(item['prompt'])}'{frame}>"
            f"<figcaption>{caption} <a href='{_e(item['mp4'])}'>MP4</a></figcaption></figure>"
        )
    return f"<h3>{_e(gallery['title'])}</h3><div class='clips'>{''.join(figures)}</div>"


def _beyond_the_prompt(metrics: dict, galleries: list[dict]) -> list[str]:
    """The best settings' fidelity to what captions leave open, and per-caption diversity
    (`fidelity`), with the diversity grids."""
    splits = metrics["splits"]
    if not any("open_attributes" in e["best"] or "diversity" in e for e in splits.values()):
        return []
    header = [
        "split",
        "background TV",
        "position spread",
        "size spread",
        "FD (autoencoder)",
        "diversity ratio",
        "min",
        f"captions >= {fidelity.DIVERSITY_TARGET:g}",
        "real ratio",
        "per-caption background TV",
        "real",
    ]
    rows = []
    for split, entry in splits.items():
        open_ = entry["best"].get("open_attributes", {})
        diversity = entry.get("diversity", {})
        rows.append(
            [
                _e(split),
                _number(open_.get("background", {}).get("total_variation")),
                _number(open_.get("position_spread_ratio")),
                _number(open_.get("size_spread_ratio")),
                _number(entry["best"].get("autoencoder_frechet_distance")),
                _number(diversity.get("ratio")),
                _number(diversity.get("ratio_min")),
                _number(diversity.get("fraction_at_target"), percent=True),
                _number(diversity.get("real_ratio")),
                _number(diversity.get("background_total_variation")),
                _number(diversity.get("background_total_variation_real")),
            ]
        )
    parts = [
        "<h2>Beyond the prompt: what captions leave open, and diversity</h2>",
        "<p>At each split's best setting. Background TV: total variation distance between the "
        "backgrounds the oracle reads in samples and in the real images of the captions that "
        "name no background (0 = the data's distribution, 1 = disjoint). Spreads: std of the "
        "shape's offset from its caption's cell centre, and of its radius, in samples / in real "
        "images. Diversity ratio: mean pairwise distance (8x8 block-averaged pixels) between "
        "samples of one caption / between real images of it, averaged over captions (1 = as "
        "diverse as the data; the real ratio is what the data itself gets with as many images). "
        "Per-caption background TV: samples of one caption against as many real images of it, "
        "beside the same between two real sets.</p>",
        _table(header, rows),
    ]
    for split in splits:
        for gallery in galleries:
            if gallery.get("split") == f"diversity:{split}":
                parts.append(_gallery_html(gallery))
    return parts


def _dit_body(metrics: dict, galleries: list[dict], output_dir: str) -> list[str]:
    parts = []
    splits = metrics["splits"]
    has_oracle = all("accuracy" in e["best"] for e in splits.values())
    header = ["split", "setting"]
    header += [*(f"{a} acc." for a in ATTRIBUTE_COLUMNS)] if has_oracle else []
    header += ["CLIP score", "FD (CLIP)"]

    def accuracy_cells(accuracy):
        return [_number(accuracy.get(a), percent=True) for a in ATTRIBUTE_COLUMNS]

    rows = []
    for split, entry in splits.items():
        best = entry["best"]
        row = [_e(split), _e(f"best: {best['sampler']}, guidance {best['guidance_scale']:g}")]
        row += accuracy_cells(best["accuracy"]) if has_oracle else []
        rows.append(row + [_number(best["clip_score"]), _number(best["frechet_distance"])])
        real = entry["real"]
        row = [_e(split), "real images (oracle / CLIP sanity check)"]
        row += accuracy_cells(real["oracle_accuracy"]) if has_oracle else []
        rows.append(row + [_number(real["clip_score"]), "0"])
    parts.append("<h2>Headline: the best setting of the sweep per split</h2>")
    parts.append(_table(header, rows))
    parts.extend(_beyond_the_prompt(metrics, galleries))

    figures = []
    if has_oracle:
        figures.append(
            plots.plot_accuracy_vs_guidance(
                metrics, os.path.join(output_dir, "plots", "accuracy_vs_guidance.png")
            )
        )
        figures.append(
            plots.plot_accuracy_vs_steps(
                metrics, os.path.join(output_dir, "plots", "accuracy_vs_steps.png")
            )
        )
    figures.append(
        plots.plot_clip_metrics_vs_guidance(
            metrics, os.path.join(output_dir, "plots", "clip_vs_guidance.png")
        )
    )
    parts.append("<h2>Plots</h2>")
    for plot in figures:
        relative = os.path.relpath(plot, output_dir)
        parts.append(f"<img class='plot' src='{_e(relative)}' alt='{_e(relative)}'>")

    parts.append("<h2>The whole sweep</h2>")
    header = ["split", "sampler", "guidance"]
    header += [*(f"{a} acc." for a in ATTRIBUTE_COLUMNS)] if has_oracle else []
    header += ["CLIP score", "FD (CLIP)"]
    has_autoencoder = "feature_autoencoder" in metrics
    header += ["FD (autoencoder)", "seconds"] if has_autoencoder else ["seconds"]
    rows, classes = [], []
    for split, entry in splits.items():
        best = entry["best"]
        for sampler, by_scale in entry["samples"].items():
            for scale, result in by_scale.items():
                row = [_e(split), _e(sampler), _e(scale)]
                row += accuracy_cells(result["accuracy"]) if has_oracle else []
                row += [_number(result["clip_score"]), _number(result["frechet_distance"])]
                if has_autoencoder:
                    row.append(_number(result.get("autoencoder_frechet_distance")))
                rows.append(row + [f"{result['seconds']:.1f}"])
                is_best = sampler == best["sampler"] and float(scale) == best["guidance_scale"]
                classes.append("best" if is_best else "")
    parts.append(_table(header, rows, classes))

    negative = metrics.get("negative_prompt")
    if negative:
        parts.append("<h2>Negative prompt</h2>")
        parts.append(
            f"<p>Prompt <b>{_e(negative['prompt'])}</b>, {negative['num_samples']} seeds, "
            f"{_e(negative['sampler'])}, guidance {negative['guidance_scale']:g}: fraction of "
            f"images the oracle reads as <b>{_e(negative['negative_prompt'])}</b>.</p>"
        )
        rows = [
            [
                _e(f"{way} negative prompt {negative['negative_prompt']!r}"),
                _number(negative[f"{way}_negative"]["color_fraction"], percent=True),
            ]
            for way in ("without", "with")
        ]
        parts.append(_table(["", f"{negative['negative_prompt']} fraction"], rows))
        for gallery in galleries:
            if gallery.get("split") == "negative":
                parts.append(_gallery_html(gallery))

    parts.append("<h2>Samples</h2>")
    for split, entry in splits.items():
        best = entry["best"]
        parts.append(f"<h3>{_e(split)}</h3>")
        others = []
        for gallery in galleries:
            if gallery.get("split") != split:
                continue
            if gallery["sampler"] == best["sampler"] and gallery["scale"] == best["guidance_scale"]:
                parts.append(_gallery_html(gallery))
            else:
                others.append(_gallery_html(gallery))
        if others:
            parts.append(
                f"<details><summary>the other {len(others)} settings</summary>"
                f"{''.join(others)}</details>"
            )
    return parts


def _video_dit_body(metrics: dict, galleries: list[dict]) -> list[str]:
    """A video DiT: the oracle's accuracy per attribute (motion and speed included) and temporal
    consistency of each setting, the real clips' for reference, then the sampled clips."""
    attributes = ("all", "shape", "color", "size", "motion", "speed", "background")
    header = ["split", "sampler", "guidance", *attributes, "consistent", "seconds"]
    rows = []
    for split, entry in metrics["splits"].items():
        real = entry["real"]
        row = [_e(split), "real clips", ""]
        row += [_number(real["oracle_accuracy"].get(a), percent=True) for a in attributes]
        rows.append(row + [_number(real["temporal_consistency"]["consistency"], True), ""])
        for sampler, by_scale in entry["samples"].items():
            for scale, result in by_scale.items():
                row = [_e(split), _e(sampler), _e(scale)]
                row += [_number(result["accuracy"].get(a), percent=True) for a in attributes]
                consistency = result["temporal_consistency"]["consistency"]
                rows.append(row + [_number(consistency, True), f"{result['seconds']:.1f}"])
    parts = [
        f"<h2>Clips of {metrics['frames']} frames, read by the moving-shapes oracle</h2>",
        _table(header, rows),
        "<p class='meta'>all: shape, colour and background read right in every frame, and size, "
        "motion and speed right for the clip. consistent: shape and colour read the same in "
        "every frame. The real clips' row is the oracle's own ceiling.</p>",
    ]
    for split, entry in metrics["splits"].items():
        best = entry["best"]
        for gallery in galleries:
            if gallery.get("split") != split:
                continue
            if gallery["sampler"] == best["sampler"] and gallery["scale"] == best["guidance_scale"]:
                parts.append(clip_gallery_html(gallery))
    return parts


def _class_dit_body(metrics: dict, galleries: list[dict]) -> list[str]:
    """A class-conditional DiT: the oracle's accuracy of the asked class over the sweep."""
    features = metrics["class_features"]
    columns = ("class", *features)
    header = ["split", "sampler", "guidance", *(f"{c} acc." for c in columns), "seconds"]
    rows, classes, real_rows = [], [], []
    for split, entry in metrics["splits"].items():
        best = entry["best"]
        real = entry["real"]["oracle_accuracy"]
        real_rows.append([_e(split), *(_number(real[c], percent=True) for c in columns)])
        for sampler, by_scale in entry["samples"].items():
            for scale, result in by_scale.items():
                cells = [_number(result["accuracy"][c], percent=True) for c in columns]
                rows.append([_e(split), _e(sampler), _e(scale), *cells, f"{result['seconds']:.1f}"])
                is_best = sampler == best["sampler"] and float(scale) == best["guidance_scale"]
                classes.append("best" if is_best else "")
    parts = [
        f"<h2>Accuracy of the asked class ({_e(' x '.join(features))}, "
        f"{metrics['num_classes']} classes)</h2>",
        "<p class='meta'>The shapes oracle reads each sample; 'class' = every class feature "
        "read as asked. Real images of the same examples:</p>",
        _table(["split", *(f"{c} acc." for c in columns)], real_rows),
        _table(header, rows, classes),
    ]
    for split, entry in metrics["splits"].items():
        per_class = sorted(entry["best"]["per_class"].items(), key=lambda item: item[1])
        parts.append(f"<h3>{_e(split)}: class accuracy per class (best setting)</h3>")
        parts.append(
            _table(["class", "accuracy"], [[_e(n), _number(a, True)] for n, a in per_class])
        )
        for gallery in galleries:
            if gallery.get("split") == split:
                parts.append(_gallery_html(gallery | {"legend": "the asked class read right"}))
    return parts


def _clip_body(metrics: dict, output_dir: str) -> list[str]:
    parts = ["<h2>Zero-shot attribute classification and retrieval</h2>"]
    attributes = ("shape", "color", "size", "position", "background", "mean")
    retrieval_keys = [
        f"{d}_recall@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)
    ]
    header = ["split", "examples", *(f"zero-shot {a}" for a in attributes)]
    header += [k.replace("_", " ") for k in retrieval_keys] + ["CLIP score"]
    rows = []
    for split, entry in metrics["splits"].items():
        zero_shot = entry.get("zero_shot", {})
        row = [_e(split), str(entry["num_examples"])]
        row += [_number(zero_shot.get(a), percent=True) for a in attributes]
        row += [_number(entry["retrieval"][k], percent=True) for k in retrieval_keys]
        rows.append(row + [_number(entry["clip_score"])])
    parts.append(_table(header, rows))
    if any("zero_shot" in e for e in metrics["splits"].values()):
        plot = plots.plot_zero_shot(metrics, os.path.join(output_dir, "plots", "zero_shot.png"))
        parts.append(f"<img class='plot' src='{_e(os.path.relpath(plot, output_dir))}'>")
    parts.append(
        "<p class='meta'>Zero-shot: each class is the ensembled embedding of prompts such as "
        "'a red circle' over every value of the attributes the class does not name (CLIP's prompt "
        "ensembling). Retrieval: among the split's examples; an item whose caption is identical "
        "to the partner's is a hit, but captions that differ in a word the images barely show are "
        "near-duplicates, so recall@1 has a ceiling below 100 %.</p>"
    )
    labelled = {
        s: e["zero_shot_classes"] for s, e in metrics["splits"].items() if "zero_shot_classes" in e
    }
    if labelled:
        parts.append("<h2>Zero-shot classification over the class names</h2>")
        rows = [
            [_e(split), str(z["num_classes"]), _e(", ".join(z["features"])), _e(z["template"])]
            + [_number(z.get(k), percent=True) for k in ("top1", "top5")]
            for split, z in labelled.items()
        ]
        header = ["split", "classes", "features", "prompt", "top-1", "top-5"]
        parts.append(_table(header, rows))
    return parts


def _autoencoder_body(metrics: dict, galleries: list[dict]) -> list[str]:
    """An autoencoder: PSNR, SSIM, the oracle on reconstructions, the latents' statistics."""
    attributes = ("all", "shape", "color", "size", "position", "background")
    header = ["split", "images", "PSNR (dB)", "min PSNR", "SSIM"]
    header += [f"oracle {a} (recon. / real)" for a in attributes]
    rows, latent_rows = [], []
    for split, entry in metrics["splits"].items():
        row = [_e(split), str(entry["num_examples"]), f"{entry['psnr']:.2f}"]
        row += [f"{entry['psnr_min']:.2f}", f"{entry['ssim']:.4f}"]
        for a in attributes:
            recon = entry.get("oracle_accuracy", {}).get(a)
            real = entry.get("real_oracle_accuracy", {}).get(a)
            row.append(f"{_number(recon, percent=True)} / {_number(real, percent=True)}")
        rows.append(row)
        z = entry["latents"]
        latent_rows.append(
            [
                _e(split),
                _e("x".join(map(str, entry["latent_shape"]))),
                ", ".join(f"{m:.3f}" for m in z["mean"]),
                ", ".join(f"{s:.3f}" for s in z["std"]),
                _number(z["scaling_factor"]),
                _number(z["shift_factor"]),
                ", ".join(f"{s:.3g}" for s in z["posterior_std"]),
            ]
        )
    parts = ["<h2>Reconstructions (through the posterior mean)</h2>", _table(header, rows)]
    parts.append(
        "<h2>Latents</h2><p class='meta'>z ~ q(z | x) over the images, per channel; "
        "scaling_factor = 1 / std over all channels (LDM), shift_factor = their mean (Flux); "
        f"configured in the autoencoder: scaling_factor {metrics['configured_scaling_factor']}, "
        f"shift_factor {metrics['configured_shift_factor']}.</p>"
    )
    latent_header = ["split", "shape", "mean", "std", "scaling_factor", "shift_factor"]
    parts.append(_table([*latent_header, "posterior sigma"], latent_rows))
    for gallery in galleries:
        parts.append(
            f"<figure><img src='{_e(gallery['image'])}' alt='{_e(gallery['title'])}'>"
            f"<figcaption><b>{_e(gallery['title'])}</b> (each row of images is followed by their "
            "reconstructions, framed green where the oracle reads all four attributes right)"
            "</figcaption></figure>"
        )
    return parts


def write_report(metrics: dict, galleries: list[dict], output_dir: str) -> str:
    """Writes OUTPUT_DIR/index.html (and its plots) for a CLIP, DiT or autoencoder metrics dict;
    returns the path of the page."""
    title = f"Evaluation of {metrics['checkpoint']}"
    meta = [f"family: {metrics['family']}", f"checkpoint step: {metrics.get('checkpoint_step')}"]
    for key in ("resolution", "objective", "clip_checkpoint"):
        if key in metrics:
            meta.append(f"{key.replace('_', ' ')}: {metrics[key]}")
    if metrics.get("conditioning") == "class":
        body = _class_dit_body(metrics, galleries)
    elif metrics["family"] == "video_dit" and metrics.get("frames"):
        body = _video_dit_body(metrics, galleries)
    elif metrics["family"] in ("dit", "video_dit"):  # images (a video DiT's as one-frame clips)
        body = _dit_body(metrics, galleries, output_dir)
    elif metrics["family"] == "autoencoder":
        body = _autoencoder_body(metrics, galleries)
    else:
        body = _clip_body(metrics, output_dir)
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>"
        f"<p class='meta'>{' &middot; '.join(_e(m) for m in meta)} &middot; "
        "numbers: <a href='metrics.json'>metrics.json</a></p>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    path = os.path.join(output_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
