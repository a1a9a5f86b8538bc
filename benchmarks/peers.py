"""hetvit against token merging (ToMe) and top-k pruning (EViT) on the CIFAR-10 teacher.

One row per model: the teacher; hetvit after calibration only (the presets and any
``--plan-file``); hetvit checkpoints (``--checkpoint NAME=DIR``: fitted or fine-tuned models,
by default the committed ``assets/cifar10-fast``, ``fast`` fine-tuned for 8 epochs); rows
whose top-1 comes from ``accuracy.json`` (``--record``: models not committed, timed on a
calibration-only copy of the same plan, since time depends on shapes, not weights); the ToMe
sweep (``r`` 1..8, constant and decreasing) and EViT (keep rates 0.5..0.9 at layers 3, 6, 9).

Top-1 is on the full CIFAR-10 test set, decoded once and shared by every row. Speed is
:func:`hetvit.bench.compare` of the teacher against each model in this one process (batch 64
throughput and batch-1 latency, median and spread over alternating rounds). The teacher's own
time is recorded at every pairing: an earlier measurement found it moved with its partner
(117-169 ms beside ToMe, 96-101 ms beside hetvit) under glibc's default allocator, whose
mmap/trim thresholds adapt to what the previous model freed. So this script pins both
thresholds at 1 GiB (re-executing itself if they are not set: glibc reads them at start-up)
and warns when the teacher's time still moves more than 10% between pairings.

Resumable: each row is written to ``peers.json`` as it finishes; a restart with the same
settings skips the rows already there (``--force`` redoes them).

    .venv/bin/python benchmarks/peers.py                                   # ~40 min, 2 cores
    .venv/bin/python benchmarks/peers.py --checkpoint fit-4k=runs/fit/model
    .venv/bin/python benchmarks/peers.py --test-images 200 --rounds 1 --latency-rounds 1 \\
        --tome-r 2 --evit-keep 0.7 --presets fast --out-dir /tmp/peers-smoke   # ~3 min
    .venv/bin/python benchmarks/peers.py --runtime onnxruntime --out-dir runs/peers-ort
    .venv/bin/python benchmarks/peers.py --plots-only                      # redraw from JSON

With ``--runtime onnxruntime`` both models of every pairing are exported to ONNX and timed in
onnxruntime instead of eager PyTorch. Top-1 is still the PyTorch model's; each row first checks
that its export gives the same top-1 on at least 99% of the first 500 test images, and
records that agreement and the largest difference of the logits.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetvit.surgery import preset as surgery_preset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).parent / "results"
GIB = "1073741824"
ALLOCATOR = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
REEXEC_MARK = "HETVIT_PEERS_REEXEC"
BATCH = 64
CALIBRATION_DRAW, CALIBRATION_IMAGES = 2048, 256
DRIFT_TOLERANCE = 0.1
PARITY_IMAGES, PARITY_AGREEMENT = 500, 0.99

FAMILIES: dict[str, dict[str, Any]] = {  # plot style per family, in legend order
    "teacher": {"color": "black", "marker": "*"},
    "hetvit calibration-only": {"color": "tab:blue", "marker": "X"},
    "hetvit fitted": {"color": "tab:cyan", "marker": "P"},
    "hetvit fine-tuned": {"color": "tab:green", "marker": "o"},
    "ToMe constant": {"color": "tab:orange", "marker": "s"},
    "ToMe decreasing": {"color": "tab:red", "marker": "v"},
    "EViT": {"color": "tab:purple", "marker": "D"},
}


# ----------------------------------------------------------------------------- allocator
def pin_allocator() -> dict[str, str]:
    """glibc's mmap and trim thresholds at 1 GiB, re-executing this script if they are not.

    By default both thresholds move with the sizes the process frees, so the teacher's time
    depends on what ran before it; fixed thresholds keep big activations on the heap for every
    model alike. glibc reads them once at start-up, hence the re-exec (same interpreter flags
    and arguments).
    """
    if all(os.environ.get(k) == GIB for k in ALLOCATOR):
        return {k: os.environ[k] for k in ALLOCATOR}
    if os.environ.get(REEXEC_MARK):  # set and still not seen: do not loop
        raise SystemExit("could not pin the allocator thresholds (re-exec did not keep them)")
    env = {**os.environ, **dict.fromkeys(ALLOCATOR, GIB), REEXEC_MARK: "1"}
    print(f"re-executing with {' '.join(f'{k}={GIB}' for k in ALLOCATOR)}", flush=True)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    raise AssertionError("unreachable")


def command_line() -> str:
    """This run's command as a reader would type it, with the allocator settings in front."""
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) \
        else sys.executable
    prefix = " ".join(f"{k}={GIB}" for k in ALLOCATOR)
    return f"{prefix} {shlex.join([python, *sys.argv])}"


# ----------------------------------------------------------------------------- rows
@dataclass
class Context:
    """What every row shares: the teacher, the calibration images, the test images."""

    teacher: Any
    calibration: Callable[[], Any]  # lazily decoded: only calibration rows need it
    args: argparse.Namespace


@dataclass
class Row:
    """One model of the comparison.

    ``ident`` says what this row measures beyond the run's settings (a plan, a checkpoint's
    checksum): a stored row is reused only if it matches. ``record``: top-1 taken from
    accuracy.json instead of evaluated (the model timed then only stands in for its shapes).
    """

    key: str
    family: str
    method: str
    setting: str
    label: str  # short text next to the point in the plots
    build: Callable[[Context], Any]
    ident: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None


def calibrated(plan: Any) -> Callable[[Context], Any]:
    """A builder: the teacher compressed with ``plan`` and calibrated on the 256 images."""
    import hetvit

    def build(ctx: Context) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # calibration notes: the row reports accuracy
            return hetvit.compress(ctx.teacher, plan, calibration=ctx.calibration()).eval()

    return build


def plan_named(spec: str, teacher: Any) -> Any:
    """A preset (scaled to the teacher) or a plan JSON file."""
    from hetvit.plan import Plan

    return surgery_preset(spec, teacher) if spec in ("balanced", "fast", "fastest") \
        else Plan.load(spec)


def checkpoint_family(directory: Path) -> tuple[str, str]:
    """``(family, how)``: fitted if the directory holds fit.json, else fine-tuned."""
    if (directory / "fit.json").is_file():
        fit = json.loads((directory / "fit.json").read_text())
        passes = (fit.get("config") or {}).get("passes")
        return "hetvit fitted", f"fitted on {fit.get('images')} images" + (
            f", {passes} passes" if passes else "")
    config = directory / "training" / "finetune_config.json"
    if config.is_file():
        return "hetvit fine-tuned", f"fine-tuned {json.loads(config.read_text())['epochs']} ep"
    return "hetvit fine-tuned", "checkpoint"


def checkpoint_row(spec: str) -> Row:
    import hetvit
    from hetvit.plan import Plan

    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--checkpoint {spec!r}: expected NAME=DIR")
    directory = Path(path)
    if not (directory / "source.json").is_file():
        raise SystemExit(f"--checkpoint {spec!r}: {directory} is not a hetvit checkpoint")
    family, how = checkpoint_family(directory)
    plan = Plan.load(directory / "plan.json")
    sha = json.loads((directory / "source.json").read_text()).get("sha256")
    return Row(f"checkpoint-{name}", family, "hetvit", f"{name}: {plan.describe()}, {how}",
               name, lambda ctx: hetvit.load(directory).eval(),
               ident={"dir": str(directory.resolve()), "sha256": sha, "plan": plan.to_dict()})


def record_row(spec: str, teacher: Any, records: dict[str, dict]) -> Row:
    """A row for a model that is not committed: top-1 from accuracy.json, speed from a
    calibration-only copy of its plan. ``KEY`` or ``KEY=PLAN`` (preset or plan JSON); without
    PLAN, the preset whose layout the record names."""
    key, _, given = spec.partition("=")
    rec = records.get(key)
    if rec is None:
        raise SystemExit(f"--record {key!r}: not in accuracy.json (it has {', '.join(records)})")
    candidates = [given] if given else ["balanced", "fast", "fastest"]
    plan = next((p for p in map(lambda s: plan_named(s, teacher), candidates)
                 if p.describe() == rec["plan"]), None)
    if plan is None:
        raise SystemExit(f"--record {spec!r}: its plan {rec['plan']!r} is "
                         f"{'not ' + given if given else 'no preset'}; give KEY=plan.json")
    if rec.get("n") != 10000:
        print(f"note: the record {key!r} is top-1 on {rec.get('n')} images, not 10,000")
    epochs = rec.get("epochs", 0)
    return Row(f"record-{key}", "hetvit fine-tuned", "hetvit",
               f"{rec['label']} ({epochs} ep): {plan.describe()}, top-1 from record",
               f"{key} ({epochs} ep, record)", calibrated(plan),
               ident={"record": key, "top1": rec["top1"], "plan": plan.to_dict()}, record=rec)


def rows_for(args: argparse.Namespace, teacher: Any) -> list[Row]:
    """Every row the flags ask for, in table order (``--only`` is applied by the caller)."""
    from hetvit import baselines

    rows = [Row("teacher", "teacher", "teacher", "unmodified (timed against a copy of itself)",
                "teacher", lambda ctx: copy.deepcopy(ctx.teacher))]
    for spec in [*args.presets, *args.plan_file]:
        plan = plan_named(spec, teacher)
        name = spec if spec in args.presets else Path(spec).stem
        rows.append(Row(f"calibrated-{name}", "hetvit calibration-only", "hetvit",
                        f"{name}: {plan.describe()}, calibration only", name, calibrated(plan),
                        ident={"plan": plan.to_dict()}))
    rows += [checkpoint_row(spec) for spec in args.checkpoint]
    if args.record:
        records = json.loads(args.records.read_text())
        rows += [record_row(spec, teacher, records) for spec in args.record]
    for schedule in args.tome_schedules:
        rows += [Row(f"tome-r{r}-{schedule}", f"ToMe {schedule}", "ToMe", f"r={r} ({schedule})",
                     f"r={r}", lambda ctx, r=r, s=schedule: baselines.tome(ctx.teacher, r, s))
                 for r in args.tome_r]
    layers = ",".join(map(str, args.evit_layers))
    rows += [Row(f"evit-{k:g}", "EViT", "EViT", f"keep {k:g} at layers {layers}", f"{k:g}",
                 lambda ctx, k=k: baselines.evit(ctx.teacher, k, tuple(args.evit_layers)))
             for k in args.evit_keep]
    return rows


# ----------------------------------------------------------------------------- measuring
def load_images(path: Path, teacher: Any, n: int | None, seed: int) -> tuple[Any, Any]:
    """All (or ``n`` seeded random) images of a labelled set as tensors, through the teacher's
    eval transform: decoded once, shared by every row."""
    import torch

    from hetvit.data import make_loader, make_transform, open_for_model, random_subset

    ds = open_for_model(path, teacher, transform=make_transform(teacher))
    if n is not None:
        ds = random_subset(ds, n, seed=seed)
    xs, ys = zip(*make_loader(ds, batch_size=500), strict=True)
    return torch.cat(xs), torch.cat(ys)


def calibration_images(train: Path, teacher: Any) -> Any:
    """The first 256 of 2048 training images drawn with seed 0 (``x[:256]`` of that draw)."""
    import torch
    from torch.utils.data import Subset

    from hetvit.data import make_loader, make_transform, open_dataset, random_subset

    ds = open_dataset(train, transform=make_transform(teacher))
    draw = random_subset(ds, CALIBRATION_DRAW, seed=0)
    first = Subset(ds, draw.indices[:CALIBRATION_IMAGES])
    return torch.cat([x for x, _ in make_loader(first, batch_size=CALIBRATION_IMAGES)])


def top1(model: Any, images: Any, labels: Any, batch: int = 250) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        hits = sum(int((model(images[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum())
                   for i in range(0, len(images), batch))
    return hits / len(images)


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def measure(row: Row, ctx: Context, test: tuple[Any, Any]) -> dict[str, Any]:
    """Build the row's model, evaluate it (unless its top-1 is recorded) and time it beside
    the teacher; returns what peers.json keeps for it."""
    import torch

    from hetvit.bench import compare

    args = ctx.args
    start = time.perf_counter()
    model = row.build(ctx)
    torch.set_num_threads(args.threads)
    if row.record is None:
        acc, n, source = top1(model, *test), len(test[1]), "evaluated"
    else:
        acc, n, source = row.record["top1"], row.record.get("n"), "top-1 from record"
    parity = onnx_parity(model, test[0], args.threads) if args.runtime == "onnxruntime" \
        else None
    evaluated = time.perf_counter()
    before = loadavg()
    result = compare(ctx.teacher, model, batch_size=BATCH, rounds=args.rounds,
                     latency_rounds=args.latency_rounds, latency=True, threads=args.threads,
                     warmup=args.warmup, min_time=args.min_time, runtime=args.runtime)
    after = loadavg()
    done = time.perf_counter()
    tp, lat = result.throughput, result.latency
    return {"key": row.key, "family": row.family, "method": row.method, "setting": row.setting,
            "label": row.label, "ident": row.ident, "top1": acc, "top1_images": n,
            "top1_source": source, "gmacs": result.compressed.gmacs,
            "gmac_reduction": result.gmac_reduction, "plan": result.compressed.plan,
            "speedup": tp.speedup, "speedup_min": tp.spread[0], "speedup_max": tp.spread[1],
            "latency_speedup": lat.speedup, "latency_speedup_min": lat.spread[0],
            "latency_speedup_max": lat.spread[1],
            "teacher_ms_b64": statistics.median(tp.baseline_ms(BATCH)),
            "teacher_ms_b1": statistics.median(lat.baseline_ms(1)),
            "load_before": before, "load_after": after,
            "seconds": {"build_eval": round(evaluated - start, 1),
                        "bench": round(done - evaluated, 1)},
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "bench": result.to_dict(),
            **({"onnx_parity": parity} if parity else {})}


def onnx_parity(model: Any, images: Any, threads: int) -> dict[str, Any]:
    """How the exported graph's logits match the PyTorch model's, on the first
    ``PARITY_IMAGES`` test images run 50 at a time (not the batch the graph was traced at).

    The onnxruntime rows' top-1 is the PyTorch model's, so the graph has to give the same
    answers: on at least ``PARITY_AGREEMENT`` of the images. Not on all, nor to 1e-4: token
    merging picks its pairs by ranking similarities, and onnxruntime's own rounding can swap
    two nearly equal ones, which moves that image's logits (by up to 0.7 on one of 500 for
    ToMe r=5). The agreement and the largest difference are recorded.
    """
    from hetvit.export import check_parity, ort_runner

    run = ort_runner(model, BATCH, threads=threads)
    p = check_parity(model, run.session, images[:PARITY_IMAGES], batch_size=50)
    if p.top1_agree + p.ties < PARITY_AGREEMENT * p.images:
        raise SystemExit(f"the ONNX export does not give the PyTorch model's top-1: {p}")
    return {"images": p.images, "max_abs_diff": p.max_abs_diff, "top1_agree": p.top1_agree}


def run_settings(args: argparse.Namespace, allocator: dict[str, str], teacher_dir: Path
                 ) -> dict[str, Any]:
    """What every row's figures depend on; a stored row is reused only under the same."""
    import torch

    from hetvit.bench import cpu_name

    sha = json.loads((teacher_dir / "source.json").read_text()).get("sha256")
    return {"teacher": str(teacher_dir.resolve()), "teacher_sha256": sha,
            "test_data": str(args.data / "cifar10-test.tar.gz"),
            "test_images": args.test_images or 10000, "test_seed": args.seed,
            "calibration": f"first {CALIBRATION_IMAGES} of {CALIBRATION_DRAW} training images, "
                           "seed 0", "batch_size": BATCH, "rounds": args.rounds,
            "latency_rounds": args.latency_rounds, "warmup": args.warmup,
            "min_time": args.min_time, "threads": args.threads, "allocator": allocator,
            **({"runtime": args.runtime} if args.runtime != "torch" else {}),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__}


# ----------------------------------------------------------------------------- storing
def write_json(path: Path, data: dict) -> None:
    """Atomically: a killed run leaves the previous complete file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def current_rows(store: dict) -> list[dict]:
    """The stored rows measured under the store's current settings, teacher first."""
    rows = [r for r in store.get("rows", {}).values() if r.get("settings") == store["settings"]]
    order = {k: i for i, k in enumerate(store.get("order", []))}
    return sorted(rows, key=lambda r: order.get(r["key"], len(order)))


def drift_warning(rows: list[dict]) -> str | None:
    """The teacher's time across this run's pairings, via :func:`hetvit.bench.baseline_drift`."""
    from hetvit.bench import BenchResult, baseline_drift

    return baseline_drift([BenchResult.from_dict(r["bench"]) for r in rows],
                          tolerance=DRIFT_TOLERANCE,
                          labels=[r["key"] for r in rows])


# ----------------------------------------------------------------------------- reporting
def spread(r: dict, prefix: str) -> str:
    return (f"{r[prefix]:.2f}x [{r[prefix + '_min']:.2f}-{r[prefix + '_max']:.2f}]")


def markdown(store: dict) -> str:
    rows, s = current_rows(store), store["settings"]
    commands = store.get("commands", [])
    lines = ["# hetvit against ToMe and EViT on the CIFAR-10 teacher", "", "```bash",
             *(commands[-1:] or ["?"]), "```", ""]
    if len(commands) > 1:
        lines += [f"(rows from {len(commands)} runs with the same settings; earlier commands "
                  "in peers.json)", ""]
    lines += ["| method | setting | GMACs | top-1 | speedup b64 [min-max] | batch-1 speedup "
              "[min-max] | teacher ms b64 / b1 (this pairing) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " (record)" if r["top1_source"] != "evaluated" else ""
        lines.append(f"| {r['method']} | {r['setting']} | {r['gmacs']:.4f} | "
                     f"{100 * r['top1']:.2f}%{mark} | {spread(r, 'speedup')} | "
                     f"{spread(r, 'latency_speedup')} | {r['teacher_ms_b64']:.1f} / "
                     f"{r['teacher_ms_b1']:.2f} |")
    alloc = " ".join(f"{k}={v}" for k, v in s["allocator"].items())
    lines += ["", f"Top-1 on {s['test_images']:,} CIFAR-10 test images (rows marked "
              "(record): on the full test set, from accuracy.json). Speed: each model beside "
              f"the teacher in one process, batch {s['batch_size']} throughput and batch-1 "
              f"latency, median of {s['rounds']} / {s['latency_rounds']} alternating rounds with "
              f"the lowest and highest; {s['cpu']}, {s['threads']} thread(s), torch "
              f"{s['torch']}, fp32, {runtime_words(s)}; {alloc}."]
    parity = [(r["onnx_parity"], r["key"]) for r in rows if "onnx_parity" in r]
    if parity:
        (worst, key), images = min(parity, key=lambda p: p[0]["top1_agree"]), parity[0][0]["images"]
        diff, far = max((p["max_abs_diff"], k) for p, k in parity)
        lines += ["", f"Each export against its PyTorch model on the first {images} test images: "
                  f"top-1 agreement {worst['top1_agree']}/{images} at the lowest ({key}), "
                  f"largest difference of a logit {diff:.2g} ({far})."]
    loads = [v for r in rows for v in (r["load_before"][0], r["load_after"][0])]
    if loads:
        lines += ["", f"1-minute load average over the pairings: {min(loads):.2f}-"
                  f"{max(loads):.2f} (on {s['cpu_count']} cores)."]
    for w in store.get("warnings", []):
        lines += ["", f"**Warning:** {w}"]
    stale = len(store.get("rows", {})) - len(rows)
    if stale:
        lines += ["", f"({stale} stored row(s) measured under other settings are left out.)"]
    return "\n".join(lines) + "\n"


def runtime_name(settings: dict) -> str:
    return "onnxruntime" if settings.get("runtime") == "onnxruntime" else "eager PyTorch"


def runtime_words(settings: dict) -> str:
    """What ran the models, as the table's note says it (runs before ``--runtime`` had
    none stored: eager PyTorch)."""
    if runtime_name(settings) == "onnxruntime":
        return ("both models exported to ONNX and run by onnxruntime (top-1 from the PyTorch "
                "model; how each export agrees with it is below)")
    return "eager"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speed and top-1, fastest first."""
    front, best = [], -1.0
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot(store: dict, path: Path, which: str) -> None:
    """Top-1 against measured speedup (``which``: "speedup" at batch 64 or
    "latency_speedup" at batch 1), one series per family with its Pareto front."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = current_rows(store)
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for family, style in FAMILIES.items():
        members = [r for r in rows if r["family"] == family]
        if not members:
            continue
        points = []
        for r in members:
            x = 1.0 if family == "teacher" else r[which]  # by definition; bar: its noise
            y = 100 * r["top1"]
            points.append((x, y))
            recorded = r["top1_source"] != "evaluated"
            bar = [[max(x - r[which + "_min"], 0)], [max(r[which + "_max"] - x, 0)]]
            ax.errorbar(x, y, xerr=bar, color=style["color"], alpha=0.45, linewidth=1,
                        capsize=2, zorder=1)
            ax.scatter(x, y, s=110 if family == "teacher" else 55, marker=style["marker"],
                       facecolors="none" if recorded else style["color"],
                       edgecolors=style["color"], zorder=3)
            ax.annotate(r["label"], (x, y), xytext=(4, 4), textcoords="offset points",
                        fontsize=7, color=style["color"])
        front = pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], color=style["color"],
                linewidth=1.4, zorder=2)
        ax.plot([], [], color=style["color"], marker=style["marker"], linewidth=1.4,
                label=f"{family} ({len(members)})")  # the legend's entry: marker and line
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="0.4",
               label="hollow: top-1 from record")
    s = store["settings"]
    batch = f"batch {s['batch_size']}" if which == "speedup" else "batch 1"
    ax.set(xlabel=f"speedup over the teacher at {batch}, measured beside it "
                  f"({s['cpu']}, {s['threads']} thread(s), {runtime_name(s)})\n"
                  "point: median of the rounds; bar: lowest to highest round (teacher: beside "
                  "a copy of itself); line: each family's Pareto front",
           ylabel=f"CIFAR-10 top-1 (%), {s['test_images']:,} test images",
           title=f"hetvit against ToMe and EViT on the CIFAR-10 teacher ({batch})")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)


def report(store: dict, out_dir: Path) -> None:
    (out_dir / "peers.md").write_text(markdown(store))
    if current_rows(store):
        plot(store, out_dir / "peers-b64.png", "speedup")
        plot(store, out_dir / "peers-b1.png", "latency_speedup")


# ----------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, default=ROOT / "assets" / "cifar10-teacher")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="directory with cifar10-train.tar.gz and cifar10-test.tar.gz")
    parser.add_argument("--test-images", type=int, default=None,
                        help="a seeded random subset of the test set (default: all 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --test-images")
    parser.add_argument("--presets", nargs="*", default=["balanced", "fast", "fastest"])
    parser.add_argument("--plan-file", action="append", default=[], metavar="PLAN.json",
                        help="also a calibration-only row for this plan (repeatable)")
    parser.add_argument("--checkpoint", action="append", default=None, metavar="NAME=DIR",
                        help="a hetvit checkpoint row (repeatable; default: "
                             "fast-8ep=assets/cifar10-fast; 'none' for no checkpoint rows)")
    parser.add_argument("--record", nargs="*", default=["fast", "balanced"],
                        metavar="KEY[=PLAN]", help="rows with top-1 from --records")
    parser.add_argument("--records", type=Path, default=RESULTS / "accuracy.json")
    parser.add_argument("--tome-r", type=int, nargs="*", default=list(range(1, 9)))
    parser.add_argument("--tome-schedules", nargs="*", default=["constant", "decreasing"])
    parser.add_argument("--evit-keep", type=float, nargs="*", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--evit-layers", type=lambda s: [int(v) for v in s.split(",")],
                        default=[3, 6, 9], metavar="3,6,9")
    parser.add_argument("--only", nargs="+", default=["*"], metavar="PATTERN",
                        help="only rows whose key matches (fnmatch), e.g. 'tome-*' teacher")
    parser.add_argument("--rounds", type=int, default=7, help="batch-64 rounds per pairing")
    parser.add_argument("--latency-rounds", type=int, default=9, help="batch-1 rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds each timed run lasts at least")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                        help="what runs the models while timed: eager PyTorch, or both "
                             "exported to ONNX (fp32) and run by onnxruntime")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--force", action="store_true", help="redo rows already stored")
    parser.add_argument("--list", action="store_true", help="print the rows and stop")
    parser.add_argument("--plots-only", action="store_true",
                        help="redraw peers.md and the plots from peers.json")
    args = parser.parse_args()
    if args.checkpoint is None:
        args.checkpoint = [f"fast-8ep={ROOT / 'assets' / 'cifar10-fast'}"]
    args.checkpoint = [c for c in args.checkpoint if c != "none"]
    return args


def main() -> None:
    args = parse_args()
    store_path = args.out_dir / "peers.json"
    if args.plots_only:
        report(json.loads(store_path.read_text()), args.out_dir)
        print(f"redrew {args.out_dir}/peers.md, peers-b64.png and peers-b1.png")
        return
    allocator = pin_allocator() if not args.list else {}

    import torch
    from rich.console import Console

    import hetvit

    console = Console(highlight=False, soft_wrap=True)  # one line per row, also in a log
    torch.set_num_threads(args.threads)
    teacher = hetvit.load(args.teacher).eval()
    every = rows_for(args, teacher)
    rows = [r for r in every if any(fnmatch.fnmatch(r.key, p) for p in args.only)]
    if args.list:
        for r in rows:
            print(f"{r.key:28} {r.family:24} {r.setting}")
        return

    args.out_dir.mkdir(parents=True, exist_ok=True)
    store = json.loads(store_path.read_text()) if store_path.exists() else {}
    settings = run_settings(args, allocator, args.teacher)
    if store.get("settings") != settings:
        store["commands"] = []
    store["settings"] = settings
    store.setdefault("rows", {})
    if command_line() not in store["commands"]:
        store["commands"].append(command_line())
    store["order"] = [r.key for r in every] + [k for k in store.get("order", [])
                                               if k not in {r.key for r in every}]

    todo = [r for r in rows if args.force or store["rows"].get(r.key, {}).get("settings")
            != settings or store["rows"][r.key].get("ident") != r.ident]
    write_json(store_path, store)  # the command and the order, even if no row is left to do
    console.print(f"{len(rows)} rows, {len(rows) - len(todo)} already in {store_path}; "
                  f"{settings['threads']} thread(s), allocator "
                  f"{' '.join(f'{k}={v}' for k, v in allocator.items())}, load {loadavg()}")
    test = None
    if any(r.record is None for r in todo) or (todo and args.runtime == "onnxruntime"):
        t = time.perf_counter()
        test = load_images(args.data / "cifar10-test.tar.gz", teacher, args.test_images,
                           args.seed)
        console.print(f"{len(test[1])} test images decoded ({time.perf_counter() - t:.0f} s)")
    cache: dict[str, Any] = {}

    def calibration() -> Any:
        if "x" not in cache:
            cache["x"] = calibration_images(args.data / "cifar10-train.tar.gz", teacher)
        return cache["x"]

    ctx = Context(teacher, calibration, args)
    began = time.perf_counter()
    for i, row in enumerate(todo, 1):
        t = time.perf_counter()
        record = measure(row, ctx, test)
        record["settings"] = settings
        store["rows"][row.key] = record
        warning = drift_warning(current_rows(store))
        store["warnings"] = [warning] if warning else []
        write_json(store_path, store)
        left = (time.perf_counter() - began) / i * (len(todo) - i)
        console.print(
            f"[bold][{i}/{len(todo)}][/bold] {row.method} {row.setting}: "
            f"top-1 [bold]{100 * record['top1']:.2f}%[/bold]"
            f"{' (record)' if row.record else ''}, b64 [bold]{spread(record, 'speedup')}"
            f"[/bold], b1 {spread(record, 'latency_speedup')}, {record['gmacs']:.3f} GMACs; "
            f"teacher {record['teacher_ms_b64']:.1f} ms; load {record['load_before'][0]}"
            f"->{record['load_after'][0]}; {time.perf_counter() - t:.0f} s, ~{left / 60:.0f} "
            "min left")
    report(store, args.out_dir)
    for w in store.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(f"wrote {store_path}, peers.md, peers-b64.png, peers-b1.png")


if __name__ == "__main__":
    main()
