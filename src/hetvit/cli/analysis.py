"""Commands that look at a trained model: analyze, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .app import app, fail, user_errors
from .common import TorchThreadsOpt, _model_options, _size_options, open_given_model, with_options

RECOMMEND_FLAGS = {"speedup": "--recommend-speedup", "max_static": "--max-static",
                   "similarity": "--similarity"}
"""How ``hetvit analyze`` spells :func:`hetvit.recommend.recommend`'s settings, for its
errors."""


@app.command("analyze")
@with_options(_model_options, first=True)
@with_options(_size_options)
def analyze_command(
    data: Annotated[Path, typer.Option(
        "--data", help="Images: a directory of image files at any depth (class folders or "
        "none) or a .tar.gz of one; labels unused."),
    ],
    num_images: Annotated[int, typer.Option(
        min=2, help="Images to analyse, drawn at random (seeded) from --data; at least 2 (the "
        "analysis compares images)."),
    ] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    rank_images: Annotated[int | None, typer.Option(
        min=1, help="Take singular values of only this many images' maps (default: all). "
        "SVDs are most of the cost on a CPU at 197 tokens."),
    ] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Write patterns.json, patterns.md and plots to this directory."),
    ] = None,
    recommend_speedup: Annotated[float | None, typer.Option(
        "--recommend-speedup", help="Tune the recommended plan to this GMAC speedup (> 0)."),
    ] = None,
    max_static: Annotated[int | None, typer.Option(
        "--max-static", help="At most this many static (DGSSA) layers (>= 0)."),
    ] = None,
    similarity: Annotated[float, typer.Option(
        help="Static layers need worst-head cross-image cosine similarity at least this, "
        "in (0, 1]."),
    ] = 0.9,
    workers: Annotated[int, typer.Option(
        min=0, help="Data-loading worker processes (0: load in this process).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the random choice of images.")] = 0,
    **source: Any,
) -> None:
    """Measure the attention patterns of a trained ViT and recommend a plan.

    Per layer and head: similarity across images, rank and token redundancy; with --out, a
    report with plots.
    """
    import json
    import warnings

    from rich.console import Console
    from rich.table import Table

    from ..data import make_loader, make_transform, open_images, random_subset
    from ..files import check_replaceable, check_writable
    from ..patterns import analyze
    from ..recommend import check_settings, recommend
    from ..render import save_report

    console = Console(stderr=True)
    # Everything a mistyped flag can spoil is refused before the model, the data and the
    # analysis (minutes on the default 1,000 images), not by recommend() at the very end.
    with user_errors():
        check_settings(recommend_speedup, max_static, similarity, names=RECOMMEND_FLAGS)
    if out is not None:
        with user_errors():
            check_replaceable(out, "patterns.json")
            check_writable(out)
    net, untrained = open_given_model(**source)
    with user_errors():
        # Labels are unused, so any images will do, in class folders or not (as fit reads
        # them): open_dataset would refuse a flat folder and warn about class maps.
        dataset = open_images(data, make_transform(net, training=False))
        # A random subset in random order: classes mixed, as the pairwise JS estimate needs.
        loader = make_loader(random_subset(dataset, num_images, seed), batch_size, workers=workers)
        with warnings.catch_warnings():
            if untrained:
                warnings.filterwarnings("ignore", message="the model looks untrained")
            report = analyze(net, loader, num_images=num_images, rank_images=rank_images)
        recommendation = recommend(report, recommend_speedup, max_static,
                                   similarity=similarity)
    plan = recommendation.plan

    name = report.arch.get("name") or str(source["checkpoint"] or source["model"])
    table = Table(title=f"attention patterns: {name}, {report.num_images} images, "
                  f"N = {report.num_tokens}",
                  caption="sim: cross-image cosine similarity (mean, worst head); JS: bits; "
                  "KL: to the mean map, nats; ranks: fractions of N (r90: mean, worst head); "
                  "red.: token redundancy")
    for col in ("layer", "sim", "min", "JS", "KL", "erank", "r90", "max", "r99", "red.",
                "plan"):
        table.add_column(col, justify="right")
    stages = dict(plan.pyramid)
    for row in report.summary():
        i = row["layer"]
        role = "static" if i in plan.static else "dynamic"
        if i in stages:
            role = f"->{stages[i]} {role}"
        table.add_row(str(i), *(f"{row[k]:.3f}" for k in (
            "similarity", "similarity_min", "js", "static_kl", "effective_rank", "rank90",
            "rank90_max", "rank99", "redundancy")), role)
    stdout = Console()
    stdout.print(table)
    stdout.print(recommendation.explain(), highlight=False)
    stdout.print(json.dumps(plan.to_dict()), highlight=False)
    if out is not None:
        with user_errors():
            target = save_report(report, recommendation, out)
        console.print(f"report written to {target}")


# --- demo -------------------------------------------------------------------------------------

@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(
        "--out", help="Report directory (replaced once the new report is complete).")
    ] = Path("demo-report"),
    images: Annotated[Path | None, typer.Option(
        "--images", help="CIFAR-10 test images: cifar10-test.tar.gz or an ImageFolder "
        "(default: ../shared/data/cifar10-test.tar.gz beside the repository).")] = None,
    assets: Annotated[Path | None, typer.Option(
        "--assets", help="Directory with the committed cifar10-teacher, cifar10-fast and "
        "cifar10-fitted models (default: assets/ of the clone you run in).")] = None,
    eval_images: Annotated[int, typer.Option(
        help="Test images to evaluate on, equally many per class: rounded down to a multiple "
        "of 10 (15 evaluates 10), at least 10.")] = 1000,
    analysis_images: Annotated[int, typer.Option(
        help="Images whose attention maps are analysed.")] = 256,
    threads: TorchThreadsOpt = None,
) -> None:
    """Show what hetvit does, in about a minute, on the committed CIFAR-10 models.

    Analyses the teacher's attention patterns, then evaluates and benchmarks (each beside the
    teacher) its fast student fine-tuned with labels, a pyramid-2.5x student fitted without
    labels and token merging (ToMe) of the teacher, and writes a markdown report with plots to
    --out. Warns when the machine was too busy for the speed figures.
    """
    from rich.console import Console

    from ..demo import run

    if eval_images < 10 or analysis_images < 2:
        fail("--eval-images needs at least 10 images (one per class), --analysis-images 2")
    console = Console(stderr=True)

    def log(line: str) -> None:
        if not line.startswith("warning: "):  # printed under the table, beside the figures
            console.print(line, highlight=False)

    with user_errors():
        result = run(out, assets=assets, images=images, eval_images=eval_images,
                     analysis_images=analysis_images, threads=threads, log=log)
    table = _demo_table(result, Console())
    Console().print(table)
    if "plan" not in [c.header for c in table.columns]:
        console.print("(each model's plan is in the report; a wider terminal shows it here)",
                      highlight=False)
    for warning in result.warnings:
        console.print(f"[yellow]warning: {warning}[/]", highlight=False)
    console.print(f"recommended by the analysis: {result.recommended.describe()}",
                  highlight=False)
    console.print(f"report: {result.report / 'report.md'} ({result.seconds:.0f} s)",
                  highlight=False)


def _demo_table(result: Any, console: Any) -> Any:
    """One row per model; each speedup is from that model's own pairing with the teacher (the
    teacher's img/s: the median over its pairings). The plans join the table only where it
    then fits ``console`` unwrapped: squeezed, each would wrap its row over five lines."""
    from rich.measure import Measurement

    wide = _demo_rows(result, with_plan=True)
    unbounded = console.options.update(width=10_000)  # a measurement is clamped to its width
    if Measurement.get(console, unbounded, wide).maximum <= console.width:
        return wide
    return _demo_rows(result, with_plan=False)


def _demo_rows(result: Any, with_plan: bool) -> Any:
    import statistics

    from rich.table import Table

    first = next(iter(result.bench.values()))
    table = Table(title="CIFAR-10 teacher and its compressed models, on this machine",
                  title_justify="left")
    for col in ("model", "plan", "GMACs", "top-1", f"img/s\n(batch {first.settings.batch_size})",
                "speedup", "speedup\n(batch 1)"):
        if col != "plan" or with_plan:
            table.add_column(col, justify="left" if col in ("model", "plan") else "right",
                             no_wrap=col != "plan")
    teacher_tp = statistics.median(b.throughput.median("baseline") for b in result.bench.values())
    rows = [(result.names["teacher"], "baseline", f"{first.baseline.gmacs:.4f}",
             f"{100 * result.accuracy['teacher']['top1']:.1f}%", f"{teacher_tp:.0f}", "", "")]
    for key, b in result.bench.items():
        lat = f"{b.latency_speedup:.2f}x" if b.latency is not None else "-"
        rows.append((result.names[key], b.compressed.plan, f"{b.compressed.gmacs:.4f}",
                     f"{100 * result.accuracy[key]['top1']:.1f}%",
                     f"{b.throughput.median('compressed'):.0f}", f"{b.speedup:.2f}x", lat))
    for row in rows:
        table.add_row(*(row if with_plan else row[:1] + row[2:]))
    return table
