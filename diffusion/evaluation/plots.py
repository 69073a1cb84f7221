"""The evaluation report's plots: metrics.json's numbers -> PNG figures (matplotlib, Agg).

Only `diffusion/evaluation/report.py` calls them, to place the figures on its page; they live
apart because they are the one part of the report that needs matplotlib (imported on first use,
so a report without plots never loads it) and they read the metrics layout, not HTML.
"""

from __future__ import annotations

import os

import numpy as np

PROMPTED = ("shape", "color", "size", "position")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _subplots(count: int, width: float = 4.8, height: float = 3.6):
    plt = _pyplot()
    figure, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return plt, figure, axes[0]


def _save(plt, figure, path: str) -> str:
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _scale_series(by_scale: dict, value) -> tuple[list[float], list[float]]:
    scales = sorted(by_scale, key=float)
    return [float(s) for s in scales], [value(by_scale[s]) for s in scales]


def plot_accuracy_vs_guidance(metrics: dict, path: str) -> str:
    """One panel per split: all-four accuracy against the guidance scale for every sampler,
    and each attribute's accuracy for the first sampler."""
    splits = metrics["splits"]
    plt, figure, axes = _subplots(len(splits))
    for axis, (split, entry) in zip(axes, splits.items(), strict=True):
        for index, (sampler, by_scale) in enumerate(entry["samples"].items()):
            x, y = _scale_series(by_scale, lambda r: r["accuracy"]["all"])
            axis.plot(x, y, "o-", linewidth=2.5, label=f"all four ({sampler})")
            if index == 0:
                for attribute in PROMPTED:
                    x, y = _scale_series(by_scale, lambda r, a=attribute: r["accuracy"][a])
                    axis.plot(x, y, ".--", linewidth=1, label=f"{attribute} ({sampler})")
        axis.set(title=split, xlabel="guidance scale", ylabel="oracle accuracy", ylim=(-0.02, 1.02))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return _save(plt, figure, path)


def plot_accuracy_vs_steps(metrics: dict, path: str) -> str:
    """One panel per split: all-four accuracy against sampling steps, one line per sampler, at
    the split's best guidance scale."""
    splits = metrics["splits"]
    plt, figure, axes = _subplots(len(splits))
    for axis, (split, entry) in zip(axes, splits.items(), strict=True):
        scale = f"{entry['best']['guidance_scale']:g}"
        lines: dict[str, list[tuple[int, float]]] = {}
        for key, by_scale in entry["samples"].items():
            name, steps = key.split(":")
            if scale in by_scale:
                lines.setdefault(name, []).append((int(steps), by_scale[scale]["accuracy"]["all"]))
        for name, points in lines.items():
            points.sort()
            axis.plot(*zip(*points, strict=True), "o-", label=name)
        axis.set(
            title=f"{split} (guidance {scale})",
            xlabel="sampling steps",
            ylabel="all-four accuracy",
            ylim=(-0.02, 1.02),
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return _save(plt, figure, path)


def plot_clip_metrics_vs_guidance(metrics: dict, path: str) -> str:
    """CLIP score and Frechet distance against the guidance scale, per split and sampler."""
    plt, figure, axes = _subplots(2)
    for split, entry in metrics["splits"].items():
        for sampler, by_scale in entry["samples"].items():
            x, y = _scale_series(by_scale, lambda r: r["clip_score"])
            axes[0].plot(x, y, "o-", label=f"{split} {sampler}")
            x, y = _scale_series(by_scale, lambda r: r["frechet_distance"] or np.nan)
            axes[1].plot(x, y, "o-", label=f"{split} {sampler}")
        axes[0].axhline(entry["real"]["clip_score"], linestyle=":", color="gray")
    axes[0].set(title="CLIP score (dotted: real images)", xlabel="guidance scale")
    axes[1].set(title="Frechet distance to real (CLIP space)", xlabel="guidance scale")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return _save(plt, figure, path)


def plot_zero_shot(metrics: dict, path: str) -> str:
    """Zero-shot accuracy per attribute, one bar group per split (CLIP runs)."""
    splits = {s: e["zero_shot"] for s, e in metrics["splits"].items() if "zero_shot" in e}
    plt, figure, axes = _subplots(1, width=7)
    axis = axes[0]
    attributes = ("shape", "color", "size", "position", "background")
    width = 0.8 / max(len(splits), 1)
    for index, (split, zero_shot) in enumerate(splits.items()):
        x = np.arange(len(attributes)) + index * width
        axis.bar(x, [zero_shot[a] for a in attributes], width, label=split)
    axis.set_xticks(np.arange(len(attributes)) + width * (len(splits) - 1) / 2, attributes)
    axis.set(ylabel="zero-shot accuracy", ylim=(0, 1.02), title="CLIP zero-shot attributes")
    axis.grid(alpha=0.3, axis="y")
    axis.legend()
    return _save(plt, figure, path)
