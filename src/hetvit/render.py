"""A pattern report for people: Markdown and plots, written together as one directory.

Kept apart from :mod:`hetvit.patterns` so the measurement needs no plotting and any reader of
``patterns.json`` can redraw it; the directory's names (``patterns.json``, ``patterns.md``,
``similarity.png``, ``rank.png``, ``heatmaps.png``, ``maps.png``, ``spectra.png``) are what
the README and ``hetvit analyze --out`` promise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .files import atomic_directory
from .patterns import DEFINITIONS, PatternReport
from .recommend import Recommendation

__all__ = ["save_report", "markdown", "plots"]


def save_report(report: PatternReport, recommendation: Recommendation,
                directory: str | os.PathLike) -> Path:
    """Write ``patterns.json``, ``patterns.md`` and the plots to ``directory``, atomically.

    Everything goes to a temporary directory beside it that is renamed into place, so a
    reader never sees half a report; an earlier report at ``directory`` is replaced, a
    folder of other files is refused. ``patterns.json`` holds the measurements, the
    recommendation's data, its plan and its explanation.
    """
    directory = Path(directory)
    explanation = recommendation.explain()
    with atomic_directory(directory, "patterns.json") as tmp:
        report.save_json(tmp / "patterns.json", recommendation=recommendation.to_dict(),
                         plan=recommendation.plan.to_dict(), explanation=explanation)
        written = plots(report, tmp)
        (tmp / "patterns.md").write_text(markdown(report, recommendation, written))
    return directory


def markdown(report: PatternReport, recommendation: Recommendation, plot_names: list[str]
             ) -> str:
    """``patterns.md``: the per-layer table, the recommended plan and why, the definitions
    and the plots (``plot_names``, files beside it)."""
    name = report.arch.get("name") or "ViT"
    out = [f"# Attention patterns: {name}", "",
           f"{report.num_images} images ({report.rank_images} for the rank metrics), "
           f"{report.depth} layers x {report.num_heads} heads, N = {report.num_tokens} tokens.",
           "",
           "| layer | similarity (mean / min head) | JS (bits) | static KL (nats) | "
           "eff. rank | rank90 (mean / max head) | rank99 | redundancy |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.summary():
        out.append(f"| {r['layer']} | {r['similarity']:.3f} / {r['similarity_min']:.3f} | "
                   f"{r['js']:.4f} | {r['static_kl']:.4f} | {r['effective_rank']:.3f} | "
                   f"{r['rank90']:.3f} / {r['rank90_max']:.3f} | {r['rank99']:.3f} | "
                   f"{r['redundancy']:.3f} |")
    out += ["", "## Recommended plan", "", "```json", recommendation.plan.to_json(), "```", "",
            "```", recommendation.explain(), "```", "", "## Definitions", ""]
    out += [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
    out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plot_names]
    return "\n".join(out) + "\n"


def plots(report: PatternReport, directory: Path) -> list[str]:
    """Write the PNG plots; returns their file names.

    Uses matplotlib's object API with the Agg canvas, so no global backend is switched.
    """
    written: list[str] = []
    layers = np.arange(report.depth)

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.savefig(directory / name, dpi=100)
        written.append(name)

    def band(ax: Any, values: np.ndarray, label: str) -> None:
        ax.plot(layers, values.mean(1), marker="o", label=f"{label} (mean over heads)")
        ax.fill_between(layers, values.min(1), values.max(1), alpha=0.2)

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    band(ax1, report.similarity, "cosine similarity")
    ax1.set(xlabel="layer", ylabel="cross-image cosine similarity", title="similarity per layer")
    band(ax2, report.js, "JS divergence (bits)")
    band(ax2, report.static_kl, "KL to mean map (nats)")
    ax2.set(xlabel="layer", ylabel="divergence", title="divergence between images")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save(fig, "similarity.png")

    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    band(ax, report.effective_rank, "effective rank")
    band(ax, report.rank90, "rank90")
    band(ax, report.rank99, "rank99")
    ax.plot(layers, report.redundancy, marker="s", ls="--", label="token redundancy")
    ax.set(xlabel="layer", ylabel="fraction of N", title="rank per layer (band: spread of heads)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save(fig, "rank.png")

    metrics = [("similarity", report.similarity), ("js (bits)", report.js),
               ("effective rank / N", report.effective_rank), ("rank90 / N", report.rank90)]
    fig = Figure(figsize=(4 * len(metrics), 0.35 * report.depth + 2), layout="constrained")
    for ax, (title, values) in zip(fig.subplots(1, len(metrics)), metrics, strict=True):
        im = ax.imshow(values, aspect="auto", cmap="viridis")
        ax.set(xlabel="head", ylabel="layer", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax)
    save(fig, "heatmaps.png")

    if report.mean_maps is not None and report.examples is not None:
        shown = sorted({*range(min(3, report.depth)), report.depth - 1})
        n_ex = report.examples.shape[1]
        fig = Figure(figsize=(3 * (1 + n_ex), 3 * len(shown)), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(shown), 1 + n_ex))
        for row, layer in zip(axes, shown, strict=True):
            maps = [report.mean_maps[layer].mean(0)] + [e.mean(0) for e in
                                                        report.examples[layer]]
            vmax = float(np.percentile(np.stack(maps), 99.5))
            for j, (ax, m) in enumerate(zip(row, maps, strict=True)):
                ax.imshow(m, cmap="magma", vmin=0, vmax=vmax)
                ax.set_xticks([])
                ax.set_yticks([])
                what = "mean over images" if j == 0 else f"image {j}"
                ax.set_title(f"layer {layer}: {what}", fontsize=9)
        fig.suptitle("attention maps (averaged over heads; rows query, columns key)")
        save(fig, "maps.png")

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    picks = [0, report.depth - 1] if report.depth > 1 else [0]
    for ax, layer in zip(np.atleast_1d(fig.subplots(1, len(picks))), picks, strict=True):
        k = np.arange(1, report.num_tokens + 1)
        for h in range(report.num_heads):
            ax.semilogy(k, np.maximum(report.spectra[layer, h], 1e-12), label=f"head {h}")
        ax.set(xlabel="singular value index", ylabel="s_k / sum(s)",
               title=f"layer {layer} spectrum (mean over images)")
        ax.grid(alpha=0.3)
        if report.num_heads <= 12:
            ax.legend(fontsize=6)
    save(fig, "spectra.png")
    return written
