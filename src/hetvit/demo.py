"""``hetvit demo``: the whole path on the committed CIFAR-10 teacher and its ``fast`` student.

It analyses the teacher's attention patterns, shows the student's plan, evaluates both models,
benchmarks them side by side and writes a markdown report with plots. Nothing is trained or
downloaded: the models are committed in ``assets/`` and the images are CIFAR-10 test images,
read from ``../shared/data/cifar10-test.tar.gz`` beside the repository (or ``--images``). The
images are not committed: their source carries no licence that lets the project redistribute
them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DemoError", "DemoResult", "run", "find_assets", "find_images", "sample_indices"]

REPO = Path(__file__).resolve().parents[2]
TEACHER, STUDENT = "cifar10-teacher", "cifar10-fast"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


class DemoError(RuntimeError):
    """A demo input is missing or damaged; the message says which and how to restore it."""


@dataclass
class DemoResult:
    """What the demo measured; ``report`` is the written report directory."""

    report: Path
    accuracy: dict[str, dict[str, float]]
    bench: Any
    plan: Any
    recommended: Any
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)


def find_assets(assets: str | os.PathLike | None = None) -> Path:
    """The directory holding the committed models: ``assets``, ``$HETVIT_ASSETS`` or the
    repository's ``assets/``."""
    path = Path(assets or os.environ.get("HETVIT_ASSETS") or REPO / "assets")
    if not path.is_dir():
        raise DemoError(f"the demo models were not found: {path} is not a directory. They "
                        "are committed in the repository's assets/ folder: run the demo from a "
                        "clone of it (restore a deleted folder with: git checkout -- assets), "
                        "or give --assets DIR.")
    return path


def find_images(images: str | os.PathLike | None = None) -> Path:
    """CIFAR-10 test images: ``images``, ``$HETVIT_DEMO_IMAGES`` or
    ``../shared/data/cifar10-test.tar.gz`` beside the repository."""
    given = images or os.environ.get("HETVIT_DEMO_IMAGES")
    path = Path(given) if given else REPO.parent / "shared" / "data" / "cifar10-test.tar.gz"
    if not path.exists():
        raise DemoError(f"CIFAR-10 test images not found at {path}. Give --images PATH: the "
                        "cifar10-test.tar.gz archive or an ImageFolder directory with the ten "
                        f"class folders ({', '.join(CIFAR10_CLASSES)}).")
    return path


def _restore_hint(path: Path) -> str:
    try:
        rel = path.resolve().relative_to(REPO)
    except ValueError:
        return f"restore {path} from the hetvit repository's assets/ folder"
    return f"restore it with: git checkout -- {rel}"


def load_model(directory: Path) -> nn.Module:
    """A committed model, with an error that names the broken file and how to restore it."""
    from .io import CheckpointError, load

    try:
        return load(directory)
    except CheckpointError as err:
        raise DemoError(f"{err}\n{_restore_hint(err.path)}") from err


def sample_indices(targets: list[int], per_class: int) -> list[int]:
    """The first ``per_class`` images of every class, in dataset order: the same sample on
    every machine."""
    taken: dict[int, int] = {}
    chosen = []
    for i, t in enumerate(targets):
        if taken.get(t, 0) < per_class:
            taken[t] = taken.get(t, 0) + 1
            chosen.append(i)
    return chosen


def _accuracy_plot(path: Path, accuracy: dict[str, dict[str, float]], bench: Any) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(accuracy)
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    colors = ["#8c8c8c", "#2a7ab9"]
    top1 = [100 * accuracy[n]["top1"] for n in names]
    ax1.bar(names, top1, color=colors)
    ax1.set(title="top-1 (%)", ylim=(max(0.0, min(top1) - 15), 105))
    for x, v in enumerate(top1):
        ax1.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom")
    tp = [bench.throughput.median("baseline"), bench.throughput.median("compressed")]
    ax2.bar(names, tp, color=colors)
    ax2.set(title=f"img/s, batch {bench.settings.batch_size}")
    ax2.annotate(f"{bench.speedup:.2f}x", (1, tp[1]), ha="center", va="bottom")
    gm = [bench.baseline.gmacs, bench.compressed.gmacs]
    ax3.bar(names, gm, color=colors)
    ax3.set(title="GMACs per image")
    ax3.annotate(f"{bench.gmac_reduction:.2f}x fewer", (1, gm[1]), ha="center", va="bottom")
    for ax in (ax2, ax3):
        ax.margins(y=0.12)
    fig.savefig(path, dpi=100)


def _pattern_lines(report: Any) -> list[str]:
    """The measured facts behind the method, as numbers: what was seen, not what was hoped."""
    sim = report.similarity.mean(axis=1)
    rank = report.effective_rank.mean(axis=1)
    rec = report.recommendation
    last = len(sim) - 1
    passed = rec["passed_similarity"]
    return [
        f"- cross-image cosine similarity (mean over heads): {sim[0]:.2f} at layer 0, "
        f"{sim[last]:.2f} at layer {last}; highest {sim.max():.2f} (layer {sim.argmax()}), "
        f"lowest {sim.min():.2f} (layer {sim.argmin()}). Layers whose worst head reaches the "
        f"{rec['similarity_threshold']:.2f} needed for static attention: "
        f"{', '.join(map(str, passed)) if passed else 'none'}.",
        f"- effective rank (fraction of the {report.num_tokens} tokens, mean over heads): "
        f"{rank[0]:.2f} at layer 0, {rank[last]:.2f} at layer {last}; highest "
        f"{rank.max():.2f} (layer {rank.argmax()}), lowest {rank.min():.2f} "
        f"(layer {rank.argmin()}).",
    ]


def _markdown(result: DemoResult, teacher_arch: dict, images: Path, n_eval: int, n_analysed: int,
              analysis_md: str, plan_rows: list[dict], base_macs: int, plan_macs: int,
              patterns: Any) -> str:
    b = result.bench
    acc = result.accuracy
    h, w = teacher_arch["img_size"]
    lines = [
        "# hetvit demo", "",
        f"The committed CIFAR-10 teacher (a DeiT-style ViT: {teacher_arch['depth']} blocks, "
        f"width {teacher_arch['embed_dim']}, {h}x{w} input, patch "
        f"{teacher_arch['patch_size'][0]}) and its fine-tuned `{result.plan.label or 'fast'}` "
        "student, side by side on this machine.", "",
        "![summary](summary.png)", "",
        f"## Accuracy ({n_eval} CIFAR-10 test images, {n_eval // 10} per class)", "",
        "| model | top-1 | top-5 | loss |", "|---|---:|---:|---:|",
    ]
    for name, m in acc.items():
        lines.append(f"| {name} | {100 * m['top1']:.1f}% | {100 * m['top5']:.1f}% | "
                     f"{m['loss']:.3f} |")
    lines += [
        "", f"Images: `{images}`. The full test set is in the README's accuracy table.", "",
        "## Speed", "",
        f"| model | GMACs | params (M) | img/s (batch {b.settings.batch_size}) | "
        "latency ms (batch 1) |", "|---|---:|---:|---:|---:|",
    ]
    for name, info, which in (("teacher", b.baseline, "baseline"),
                              ("student", b.compressed, "compressed")):
        lat = f"{b.latency.median(which):.2f}" if b.latency is not None else "-"
        lines.append(f"| {name} | {info.gmacs:.4f} | {info.params / 1e6:.2f} | "
                     f"{b.throughput.median(which):.0f} | {lat} |")
    lo, hi = b.throughput.spread
    lines += ["", f"Speedup at batch {b.settings.batch_size}: **{b.speedup:.2f}x** "
              f"(median of {len(b.throughput.ratios)} alternating rounds, range "
              f"{lo:.2f}-{hi:.2f}); "
              f"{b.gmac_reduction:.2f}x fewer GMACs."]
    if b.latency is not None:
        lines.append(f"Speedup at batch 1: {b.latency_speedup:.2f}x.")
    e = b.env
    lines += ["", f"Machine: {e.get('cpu')}, {e.get('threads')} thread(s), torch "
              f"{e.get('torch')}, timm {e.get('timm')}, fp32, eager; load average "
              f"{e.get('load_avg_1m')} at start.", "",
              "## The student's plan", "",
              f"`{result.plan.describe()}`", "",
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
              "attention. Measured on this teacher:", "", *_pattern_lines(patterns), "",
              "The plan `hetvit analyze` recommends from these measurements:", "",
              f"`{result.recommended.describe()}`", "",
              f"Details, definitions and every plot: [analysis/patterns.md]({analysis_md}).", "",
              "![similarity](analysis/similarity.png)", "", "![rank](analysis/rank.png)", "",
              "## The same steps by hand", "",
              "(on the whole test set rather than the demo's sample)", "", "```",
              f"hetvit analyze --checkpoint assets/{TEACHER} --data {images} --num-images "
              f"{n_analysed}",
              f"hetvit evaluate --checkpoint assets/{STUDENT} --data {images}",
              f"hetvit bench --checkpoint assets/{STUDENT} --batch-size 64 --latency",
              "```", "",
              f"Demo time: {result.seconds:.0f} s ("
              + ", ".join(f"{k} {v:.0f} s" for k, v in result.steps.items()) + ")."]
    return "\n".join(lines) + "\n"


def run(out: str | os.PathLike = "demo-report", *, assets: str | os.PathLike | None = None,
        images: str | os.PathLike | None = None, eval_images: int = 1000,
        analysis_images: int = 256, bench_rounds: int = 5, bench_time: float = 0.5,
        threads: int | None = None, progress: bool = True,
        log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo and write its report to ``out`` (atomically: a failed run leaves no
    half-written report, and an earlier report stays until the new one is complete).

    ``eval_images`` (a multiple of 10: equal per class), ``analysis_images``, ``bench_rounds``
    and ``bench_time`` (seconds per timed run) trade time for precision; ``log`` receives one
    line per step.
    """
    from torch.utils.data import Subset

    from .bench import compare
    from .data import make_loader, make_transform, open_dataset, random_subset
    from .evaluate import evaluate
    from .flops import formula_macs, plan_layers
    from .io import atomic_directory, check_replaceable
    from .patterns import analyze
    from .surgery import describe, plan_of

    start = time.perf_counter()
    steps: dict[str, float] = {}
    check_replaceable(out, "report.md")  # before minutes of work, not after
    root = find_assets(assets)
    image_path = find_images(images)
    teacher = load_model(root / TEACHER)
    student = load_model(root / STUDENT)
    if getattr(student, "hetvit_source", None) != describe(teacher):
        raise DemoError(f"{root / STUDENT} was not compressed from {root / TEACHER}: their "
                        "architectures differ; restore both with: git checkout -- assets")
    plan = plan_of(student)

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
            recommended = report.recommend()
            report.save(tmp / "analysis", plan=recommended)
            steps["analysis"] = time.perf_counter() - t

            t = time.perf_counter()
            log(f"[2/4] evaluating teacher and student on {len(chosen)} images")
            accuracy = {name: evaluate(m, loader, progress=progress)
                        for name, m in (("teacher", teacher), ("student", student))}
            steps["evaluation"] = time.perf_counter() - t

            t = time.perf_counter()
            log("[3/4] benchmarking teacher and student side by side")
            bench = compare(teacher, student, batch_size=64, rounds=bench_rounds,
                            min_time=bench_time, latency=True, threads=threads)
            steps["benchmark"] = time.perf_counter() - t

            log("[4/4] writing the report")
            arch = describe(teacher)
            result = DemoResult(report=Path(out), accuracy=accuracy, bench=bench, plan=plan,
                                recommended=recommended, seconds=0.0, steps=steps)
            _accuracy_plot(tmp / "summary.png", accuracy, bench)
            result.seconds = time.perf_counter() - start
            (tmp / "report.md").write_text(_markdown(
                result, arch, image_path, len(chosen), n_analysed, "analysis/patterns.md",
                plan_layers(arch, plan), formula_macs(arch), formula_macs(arch, plan),
                report))
    finally:
        torch.set_num_threads(previous)
    return result
