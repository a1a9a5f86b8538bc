"""``hetvit demo``: the whole path on the committed CIFAR-10 teacher and its compressed models.

It analyses the teacher's attention patterns, shows the students' plans, and evaluates and
benchmarks four models: the teacher, its ``fast`` student fine-tuned with labels, a
``pyramid-2.5x`` student (no static layers) fitted without labels (``hetvit fit``) and
training-free token merging (ToMe) of the teacher, each timed side by side with the teacher.
It writes a markdown report with plots and warns when the machine was too busy for its speed
figures. Nothing is trained or downloaded: the models are committed in ``assets/`` and the
images are CIFAR-10 test images, read from ``../shared/data/cifar10-test.tar.gz`` beside the
repository (or ``--images``). The images are not committed: their source carries no licence
that lets the project redistribute them.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.data import Subset

from .baselines import tome
from .bench import baseline_drift, baseline_unsteady, compare
from .data import make_loader, make_transform, open_dataset, random_subset
from .demo_inputs import (
    CIFAR10_CLASSES,
    check_source,
    find_assets,
    find_images,
    finetune_epochs,
    fit_record,
    load_model,
    sample_indices,
)
from .errors import DemoError
from .evaluation import evaluate
from .files import atomic_directory, check_replaceable
from .fitting import FitConfig
from .flops import formula_macs, plan_layers
from .hosts import describe
from .patterns import analyze
from .plan import PRESETS
from .recommend import recommend
from .render import save_report
from .surgery import plan_of

__all__ = ["DemoError", "DemoResult", "run", "fit_command", "speed_warnings", "TOME_R",
           "TOME_SCHEDULE", "tome_name"]

TEACHER, STUDENT, FITTED = "cifar10-teacher", "cifar10-fast", "cifar10-fitted"
TOME_R, TOME_SCHEDULE = 5, "decreasing"
"""The demo's token-merging row: ToMe's strongest setting near the fitted model's speed, so
that the two training-free methods are compared at about equal cost and token merging at its
best. In the one-run front (benchmarks/results/peers-front, full test set) the decreasing
schedule at r=5 runs at 2.19x the teacher's batch-64 throughput with 71.6% top-1, and is
ToMe's upper envelope there; the constant schedule's nearest setting, r=8, is faster (2.27x)
but far weaker (63.7%). The fitted model runs at 2.46x (74.0%)."""
BUSY_LOAD = 0.5
"""A load average above this fraction of the CPU count means other work shared the machine:
the speed figures are then not to be quoted (the demo says so)."""


@dataclass
class DemoResult:
    """What the demo measured; ``report`` is the written report directory.

    ``accuracy`` is keyed by model (``teacher``, ``fine-tuned``, ``fitted``, ``tome``);
    ``bench`` by the three compressed ones, each the :class:`hetvit.bench.BenchResult` of its
    pairing with the teacher. ``names`` are the models' names in the report, ``about`` one line
    each on how it was made, ``warnings`` what makes the speed figures unreliable and ``load``
    the load average at start and end.
    """

    report: Path
    accuracy: dict[str, dict[str, float]]
    bench: dict[str, Any]
    plan: Any
    recommended: Any
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    about: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    load: tuple[float | None, float | None] = (None, None)
    tome_r: int = TOME_R
    tome_schedule: str = TOME_SCHEDULE


def tome_name(r: int, schedule: str) -> str:
    """The token-merging row's name in the report and the table: ``ToMe r=5 (decreasing)``."""
    return f"ToMe r={r} ({schedule})"


COLORS = ("#8c8c8c", "#2a7ab9", "#e08a1e", "#4a9a4a")
"""The models' colours, in report order: teacher, fine-tuned, fitted, token merging."""


def _summary_plot(path: Path, result: DemoResult) -> None:
    """Top-1 per model, and each model's speed and cost relative to the teacher, grouped by
    measure: one bar per model in every group, so four models stay apart at a glance."""

    keys = list(result.accuracy)
    names = [result.names[k] for k in keys]
    colors = dict(zip(keys, COLORS, strict=False))
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 2])
    top1 = [100 * result.accuracy[k]["top1"] for k in keys]
    bars = ax1.bar(range(len(keys)), top1, color=[colors[k] for k in keys])
    ax1.bar_label(bars, fmt="%.1f", fontsize=8)
    ax1.set_xticks(range(len(keys)), names, fontsize=8)
    ax1.set(title="top-1 (%)", ylim=(max(0.0, min(top1) - 15), max(top1) + 8))
    batch = next(iter(result.bench.values())).settings.batch_size
    groups = [f"speedup, batch {batch}", "speedup, batch 1", "fewer GMACs"]
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        values = [1.0, 1.0, 1.0]
        if k in result.bench:
            b = result.bench[k]
            values = [b.speedup, b.latency_speedup or 0.0, b.gmac_reduction]
        xs = [g + (i - (len(keys) - 1) / 2) * width for g in range(len(groups))]
        bars = ax2.bar(xs, values, width, color=colors[k], label=result.names[k])
        ax2.bar_label(bars, fmt="%.2f", fontsize=7)
    ax2.axhline(1.0, color=colors["teacher"], linestyle="--", linewidth=0.8)
    ax2.set_xticks(range(len(groups)), groups)
    ax2.set(title="relative to the teacher (x; each model timed beside it)")
    ax2.margins(y=0.12)
    fig.legend(*ax2.get_legend_handles_labels(), loc="outside lower center", ncols=len(keys),
               fontsize=8, frameon=False)
    fig.savefig(path, dpi=100)


def _pattern_lines(report: Any, recommendation: Any) -> list[str]:
    """The measured facts behind the method, as numbers: what was seen, not what was hoped."""
    sim = report.similarity.mean(axis=1)
    rank = report.effective_rank.mean(axis=1)
    last = len(sim) - 1
    passed = recommendation.passed_similarity
    return [
        f"- cross-image cosine similarity (mean over heads): {sim[0]:.2f} at layer 0, "
        f"{sim[last]:.2f} at layer {last}; highest {sim.max():.2f} (layer {sim.argmax()}), "
        f"lowest {sim.min():.2f} (layer {sim.argmin()}). Layers whose worst head reaches the "
        f"{recommendation.similarity_threshold:.2f} needed for static attention: "
        f"{', '.join(map(str, passed)) if passed else 'none'}.",
        f"- effective rank (fraction of the {report.num_tokens} tokens, mean over heads): "
        f"{rank[0]:.2f} at layer 0, {rank[last]:.2f} at layer {last}; highest "
        f"{rank.max():.2f} (layer {rank.argmax()}), lowest {rank.min():.2f} "
        f"(layer {rank.argmin()}).",
    ]


FIT_FLAGS = frozenset({"passes", "batch_size", "lr", "lr_new", "mixup", "crop", "scale",
                       "cutmix", "features", "pre_logits", "anchor", "temperature", "trainable",
                       "freeze_early", "seed"})
"""The :class:`hetvit.fitting.FitConfig` settings ``hetvit fit`` has a flag for: ``--NAME``
with hyphens (a switch is ``--NAME`` / ``--no-NAME``)."""

BEFORE_THEIR_TIME = {"freeze_early": False}
"""Settings whose default changed after fits were first recorded: a ``fit.json`` without one
was fitted with this value (every other setting added later was off, its default)."""


def fit_command(record: dict[str, Any], plan: Any) -> str:
    """The ``hetvit fit`` command that remakes the fitted model, from its ``fit.json``: the
    settings that differ from the defaults, and the images it used. Settings that have no
    flag (``fit()`` in Python only) are named in a trailing comment.

    The plan is the preset's name, or else the plan file saved beside the model (a label such
    as ``pyramid-2.5x`` names no file ``--plan`` can read); the remake goes to ``runs/``, so
    that running it never replaces the committed model it is compared with."""

    defaults = asdict(FitConfig())
    plan_arg = plan.label if plan.label in PRESETS else f"assets/{FITTED}/plan.json"
    words = [f"hetvit fit --teacher assets/{TEACHER} --plan {plan_arg} --images "
             f"../shared/data/cifar10-train.tar.gz --out runs/{FITTED} --num-images "
             f"{record['images']}"]
    python_only = []
    config = {**defaults, **BEFORE_THEIR_TIME, **record["config"]}
    for key, value in config.items():
        if key not in defaults or value == defaults[key]:
            continue
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        flag = key.replace("_", "-")
        if key in FIT_FLAGS and isinstance(value, bool):
            words.append(f"--{flag}" if value else f"--no-{flag}")
        elif key in FIT_FLAGS:
            words.append(f"--{flag} {shown}")
        else:
            python_only.append(f"{key}={shown}")
    if python_only:
        words.append(f"# and {', '.join(python_only)} (FitConfig; no flag)")
    return " ".join(words)


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def speed_warnings(bench: dict[str, Any], names: dict[str, str],
                   load: tuple[float | None, float | None], cpus: int | None = None,
                   own: float = 0.0) -> list[str]:
    """Why the speed figures may not be quoted: a busy machine at the start or end, a
    pairing whose teacher rounds disagree, or the teacher's time moving between pairings (then
    the speedups of different models are not on one scale).

    ``own``: the threads the demo itself ran on. The load average at the end counts them, so
    they are taken off it: only other work makes the machine busy.
    """

    cpus = cpus or os.cpu_count() or 1
    found = []
    others = (load[0], None if load[1] is None else max(0.0, load[1] - own))
    busy = [f"{v:.2f} at the {when}" for v, when in zip(others, ("start", "end"), strict=True)
            if v is not None and v > BUSY_LOAD * cpus]
    if busy:
        found.append(f"the machine was busy: load average {' and '.join(busy)}, over "
                     f"{BUSY_LOAD:g} x its {cpus} CPUs: other work shared the CPU, so the speed "
                     "figures (img/s and ms most, the speedups less) are unreliable; run the "
                     "demo again on an idle machine")
    for key, result in bench.items():
        unsteady = baseline_unsteady(result)
        if unsteady:
            found.append(f"beside {names[key]}, "
                         + unsteady.replace("the baseline's", "the teacher's", 1))
    drift = baseline_drift(list(bench.values()), labels=[names[k] for k in bench])
    if drift:
        found.append(drift.replace("the baseline's", "the teacher's", 1))
    return found


def _speed_lines(result: DemoResult) -> list[str]:
    """The speed table: every model's own figures, and each speedup from its own pairing."""
    first = next(iter(result.bench.values()))
    batch = first.settings.batch_size
    lines = [f"| model | plan | GMACs | params (M) | img/s (batch {batch}) | latency ms "
             f"(batch 1) | speedup, batch {batch} | speedup, batch 1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    teacher_tp = [b.throughput.median("baseline") for b in result.bench.values()]
    teacher_ms = [b.latency.median("baseline") for b in result.bench.values() if b.latency]
    median = statistics.median
    lat = f"{median(teacher_ms):.2f}" if teacher_ms else "-"
    lines.append(f"| {result.names['teacher']} | baseline | {first.baseline.gmacs:.4f} | "
                 f"{first.baseline.params / 1e6:.2f} | {median(teacher_tp):.0f} | {lat} | "
                 "1.00x | 1.00x |")

    def ratio(p: Any) -> str:
        lo, hi = p.spread
        return f"{p.speedup:.2f}x [{lo:.2f}-{hi:.2f}]"

    for key, b in result.bench.items():
        lat = f"{b.latency.median('compressed'):.2f}" if b.latency is not None else "-"
        lat_ratio = ratio(b.latency) if b.latency is not None else "-"
        lines.append(f"| {result.names[key]} | {b.compressed.plan} | {b.compressed.gmacs:.4f} "
                     f"({b.gmac_reduction:.2f}x fewer) | {b.compressed.params / 1e6:.2f} | "
                     f"{b.throughput.median('compressed'):.0f} | {lat} | "
                     f"**{b.speedup:.2f}x** [{b.throughput.spread[0]:.2f}-"
                     f"{b.throughput.spread[1]:.2f}] | {lat_ratio} |")
    rounds = len(first.throughput.ratios)
    lines += ["", f"Each model was timed beside the teacher in its own pairing: {rounds} "
              f"alternating rounds at batch {batch}"
              + (f" and {len(first.latency.ratios)} at batch 1" if first.latency else "")
              + ". A speedup is the median of the per-round ratios, the smallest and largest "
              "in brackets. The teacher's img/s is the median over its "
              f"{len(teacher_tp)} pairings (" + ", ".join(f"{v:.0f}" for v in teacher_tp)
              + ")."]
    return lines


def _by_hand_lines(result: DemoResult, images: Path, n_analysed: int, fit_line: str
                   ) -> list[str]:
    bench = f"--batch-size {next(iter(result.bench.values())).settings.batch_size} --latency"
    tome = f"--method tome --r {result.tome_r} --schedule {result.tome_schedule}"
    return ["## The same steps by hand", "",
            "(on the whole test set rather than the demo's sample)", "", "```",
            f"hetvit analyze --checkpoint assets/{TEACHER} --data {images} --num-images "
            f"{n_analysed}",
            f"hetvit evaluate --checkpoint assets/{STUDENT} --data {images}",
            f"hetvit bench --checkpoint assets/{STUDENT} {bench}",
            fit_line,
            f"hetvit evaluate --checkpoint assets/{FITTED} --data {images}",
            f"hetvit bench --checkpoint assets/{FITTED} {bench}",
            f"hetvit evaluate --checkpoint assets/{TEACHER} --data {images} {tome}",
            f"hetvit bench --checkpoint assets/{TEACHER} {tome} {bench}",
            "```", ""]


def _markdown(result: DemoResult, teacher_arch: dict, images: Path, n_eval: int, n_analysed: int,
              analysis_md: str, plan_rows: list[dict], base_macs: int, plan_macs: int,
              patterns: Any, recommendation: Any, fit_line: str, fitted_plan: Any) -> str:
    acc = result.accuracy
    h, w = teacher_arch["img_size"]
    label = result.plan.label or "fast"
    lines = [
        "# hetvit demo", "",
        f"The committed CIFAR-10 teacher (a DeiT-style ViT: {teacher_arch['depth']} blocks, "
        f"width {teacher_arch['embed_dim']}, {h}x{w} input, patch "
        f"{teacher_arch['patch_size'][0]}), its `{label}` student fine-tuned with labels, a "
        f"`{fitted_plan.label or 'custom'}` student fitted without labels and training-free "
        "token merging of the teacher, side by side on this machine.", "",
        *[f"- **{result.names[k]}**: {result.about[k]}" for k in acc], "",
    ]
    if result.warnings:
        lines += ["> **Warning:** the speed figures are unreliable on this run; see "
                  "[Speed](#speed).", ""]
    lines += [
        "![summary](summary.png)", "",
        f"## Accuracy ({n_eval} CIFAR-10 test images, {n_eval // 10} per class)", "",
        "| model | top-1 | top-5 | loss |", "|---|---:|---:|---:|",
    ]
    for key, m in acc.items():
        lines.append(f"| {result.names[key]} | {100 * m['top1']:.1f}% | {100 * m['top5']:.1f}% | "
                     f"{m['loss']:.3f} |")
    lines += ["", f"Images: `{images}`. The full test set is in the README's accuracy table.", "",
              "## Speed", ""]
    lines += [f"> **Warning:** {w}" + "\n" for w in result.warnings]
    lines += _speed_lines(result)
    e = next(iter(result.bench.values())).env
    start, end = result.load
    lines += ["", f"Machine: {e.get('cpu')}, {e.get('threads')} thread(s), torch "
              f"{e.get('torch')}, timm {e.get('timm')}, fp32, eager; load average "
              f"{start} at start, {end} at end.", "",
              "## The students' plan", "",
              f"`{result.plan.describe()}`"
              + ("" if fitted_plan == result.plan else
                 f" (fine-tuned); the fitted model's: `{fitted_plan.describe()}`"), "",
              "| layer | runs | tokens | GMACs |", "|---:|---|---:|---:|"]
    for r in plan_rows:
        if r["kind"] == "aggregate":
            lines.append(f"| | aggregate {r['tokens_in']} -> {r['tokens']} | {r['tokens']} | "
                         f"{r['macs'] / 1e9:.5f} |")
        else:
            kind = "**static** attention" if r["kind"] == "static" else "attention"
            lines.append(f"| {r['layer']} | {kind} | {r['prefix']}+{r['tokens']} | "
                         f"{r['macs'] / 1e9:.5f} |")
    lines += ["", f"GMACs: {base_macs / 1e9:.4f} -> {plan_macs / 1e9:.4f} "
              f"({base_macs / plan_macs:.2f}x fewer).", "",
              f"## The teacher's attention patterns ({n_analysed} images)", "",
              "The method rests on two findings for DeiT on ImageNet: early layers attend "
              "alike for every image (high cross-image similarity), late layers have low-rank "
              "attention. Measured on this teacher:", "",
              *_pattern_lines(patterns, recommendation), "",
              "The plan `hetvit analyze` recommends from these measurements:", "",
              f"`{result.recommended.describe()}`", "",
              f"Details, definitions and every plot: [analysis/patterns.md]({analysis_md}).", "",
              "![similarity](analysis/similarity.png)", "", "![rank](analysis/rank.png)", "",
              *_by_hand_lines(result, images, n_analysed, fit_line),
              f"Demo time: {result.seconds:.0f} s ("
              + ", ".join(f"{k} {v:.0f} s" for k, v in result.steps.items()) + ")."]
    return "\n".join(lines) + "\n"


def _about(root: Path, record: dict[str, Any], plan: Any, fitted_plan: Any, tome_r: int,
           tome_schedule: str) -> dict[str, str]:
    """One line per model on how it was made: what its accuracy and speed cost to get."""
    epochs = finetune_epochs(root / STUDENT)
    passes = record["config"].get("passes")
    return {
        "teacher": "trained here from scratch, with labels (assets/README.md)",
        "fine-tuned": f"the `{plan.label or 'custom'}` plan, fine-tuned "
                      + (f"for {epochs} epochs " if epochs else "")
                      + f"with labels (`hetvit finetune`; assets/{STUDENT})",
        "fitted": f"the `{fitted_plan.label or 'custom'}` plan, fitted without labels "
                  f"(`hetvit fit`; assets/{FITTED}): {record['images']:,} unlabeled images"
                  + (f", {passes} pass{'es' if passes != 1 else ''}" if passes else "")
                  + f", {float(record['seconds']):.0f} s (its fit.json)",
        "tome": f"token merging (ToMe) of the teacher, {tome_r} tokens merged per block "
                + ("in every block" if tome_schedule == "constant" else
                   f"on average ({tome_schedule} schedule: {2 * tome_r} in the first block "
                   "down to none in the last)")
                + ": no training",
    }


def run(out: str | os.PathLike = "demo-report", *, assets: str | os.PathLike | None = None,
        images: str | os.PathLike | None = None, eval_images: int = 1000,
        analysis_images: int = 256, bench_rounds: int = 5, bench_time: float = 0.5,
        threads: int | None = None, tome_r: int = TOME_R,
        tome_schedule: str = TOME_SCHEDULE, progress: bool = True,
        log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo and write its report to ``out`` (atomically: a failed run leaves no
    half-written report, and an earlier report stays until the new one is complete).

    ``eval_images`` (a multiple of 10: equal per class), ``analysis_images``, ``bench_rounds``
    and ``bench_time`` (seconds per timed run) trade time for precision; ``tome_r`` is the
    token-merging row's tokens merged per block and ``tome_schedule`` its schedule
    (:func:`hetvit.baselines.tome`). ``log`` receives one line per step, then one
    ``warning: ...`` line per reason the speed figures are unreliable (also in the report and
    ``result.warnings``).
    """

    start = time.perf_counter()
    load_start = _load_average()
    steps: dict[str, float] = {}
    check_replaceable(out, "report.md")  # before minutes of work, not after
    root = find_assets(assets)
    image_path = find_images(images)
    teacher = load_model(root / TEACHER)
    student = load_model(root / STUDENT)
    check_source(root / STUDENT, student, teacher, root / TEACHER)
    fitted = load_model(root / FITTED)
    check_source(root / FITTED, fitted, teacher, root / TEACHER)
    record = fit_record(root / FITTED)
    plan, fitted_plan = plan_of(student), plan_of(fitted)
    models = {"teacher": teacher, "fine-tuned": student, "fitted": fitted,
              "tome": tome(teacher, r=tome_r, schedule=tome_schedule)}
    names = {"teacher": "teacher", "fine-tuned": "fine-tuned", "fitted": "fitted",
             "tome": tome_name(tome_r, tome_schedule)}

    dataset = open_dataset(image_path, make_transform(teacher))
    if dataset.classes != CIFAR10_CLASSES:
        raise DemoError(f"{image_path} does not hold the CIFAR-10 classes (found "
                        f"{len(dataset.classes)} classes: {', '.join(dataset.classes[:4])} ...)")
    chosen = sample_indices(dataset.targets, max(1, eval_images // 10))
    loader = make_loader(Subset(dataset, chosen), batch_size=100)
    n_analysed = min(analysis_images, len(chosen))
    analysis_loader = make_loader(random_subset(Subset(dataset, chosen), n_analysed),
                                  batch_size=64)

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with atomic_directory(out, "report.md") as tmp:
            t = time.perf_counter()
            log(f"[1/4] analysing the teacher's attention on {n_analysed} images")
            report = analyze(teacher, analysis_loader, progress=progress)
            recommendation = recommend(report)
            recommended = recommendation.plan
            save_report(report, recommendation, tmp / "analysis")
            steps["analysis"] = time.perf_counter() - t

            t = time.perf_counter()
            log(f"[2/4] evaluating {', '.join(names.values())} on {len(chosen)} images")
            accuracy = {key: evaluate(m, loader, progress=progress)
                        for key, m in models.items()}
            steps["evaluation"] = time.perf_counter() - t

            t = time.perf_counter()
            bench = {}
            for key, model in models.items():
                if key == "teacher":
                    continue
                log(f"[3/4] benchmarking {names[key]} beside the teacher")
                bench[key] = compare(teacher, model, batch_size=64, rounds=bench_rounds,
                                     min_time=bench_time, latency=True, threads=threads)
            steps["benchmark"] = time.perf_counter() - t
            load = (load_start, _load_average())

            log("[4/4] writing the report")
            arch = describe(teacher)
            result = DemoResult(report=Path(out), accuracy=accuracy, bench=bench, plan=plan,
                                recommended=recommended, seconds=0.0, steps=steps,
                                names=names, about=_about(root, record, plan, fitted_plan,
                                                          tome_r, tome_schedule),
                                warnings=speed_warnings(bench, names, load,
                                                         own=torch.get_num_threads()),
                                load=load,
                                tome_r=tome_r, tome_schedule=tome_schedule)
            _summary_plot(tmp / "summary.png", result)
            result.seconds = time.perf_counter() - start
            (tmp / "report.md").write_text(_markdown(
                result, arch, image_path, len(chosen), n_analysed, "analysis/patterns.md",
                plan_layers(arch, plan), formula_macs(arch), formula_macs(arch, plan),
                report, recommendation, fit_command(record, fitted_plan), fitted_plan))
    finally:
        torch.set_num_threads(previous)
    for warning in result.warnings:
        log(f"warning: {warning}")
    return result
