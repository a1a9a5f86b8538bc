"""The README's accuracy table, ablations and Pareto plot, on the CIFAR-10 teacher.

Variants: the teacher; ``balanced`` and ``fast`` right after calibration and after fine-tuning
(``fast`` also three and eight times as long, and eight times without guidance); ``fast``'s
two halves after calibration, to see which one costs the accuracy that fine-tuning must win
back; and, all on ``fast`` with the same budget,
fine-tuning without the guidance loss, DGSSA only (no pyramid), GLAD only (no static
layers), static maps started uniform instead of from the teacher's attention, the pooling
matrices frozen, the pyramid started from k-means of the tokens instead of pooling
(``--aggregation-init cluster``, also after calibration only), feature distillation added
(``--features``), and the plan ``hetvit analyze`` recommends (as is, and for the GMACs of
``fast``).

Every figure comes from a ``hetvit`` command, printed before it runs, so any row can be
redone by hand. Top-1 is on the full CIFAR-10 test set; speed is ``hetvit bench`` at the
teacher's shape (batch 64). Resumable: a finished variant is read back from
``accuracy.json`` (``--force`` redoes it) and an interrupted fine-tune goes on from its
``last.ckpt``.

    .venv/bin/python benchmarks/accuracy.py --epochs 1          # ~2.5 h on 2 cores
    .venv/bin/python benchmarks/accuracy.py --only teacher fast-calibrated
    .venv/bin/python benchmarks/accuracy.py --report-only       # tables and plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hetvit.surgery import preset as surgery_preset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    plan: str | None  # a preset, "fast:static", "fast:pyramid", "recommended"; None: teacher
    finetune: bool = True
    flags: tuple[str, ...] = ()
    epoch_scale: int = 1  # fine-tune this many times --epochs


VARIANTS = [
    Variant("teacher", "teacher", None, finetune=False),
    Variant("balanced-calibrated", "balanced, calibration only", "balanced", finetune=False),
    Variant("fast-calibrated", "fast, calibration only", "fast", finetune=False),
    Variant("dgssa-only-calibrated", "DGSSA only, calibration only", "fast:static",
            finetune=False),
    Variant("glad-only-calibrated", "GLAD only, calibration only", "fast:pyramid",
            finetune=False),
    Variant("fast-cluster-calibrated", "fast, pyramid from k-means, calibration only", "fast",
            finetune=False, flags=("--aggregation-init", "cluster")),
    Variant("balanced", "balanced, fine-tuned", "balanced"),
    Variant("fast", "fast, fine-tuned", "fast"),
    Variant("fast-3x", "fast, fine-tuned three times as long", "fast", epoch_scale=3),
    Variant("fast-8x", "fast, fine-tuned eight times as long", "fast", epoch_scale=8),
    Variant("fast-no-guidance", "fast, fine-tuned without guidance", "fast",
            flags=("--guidance", "0")),
    Variant("fast-8x-no-guidance", "fast, fine-tuned eight times as long without guidance",
            "fast", epoch_scale=8, flags=("--guidance", "0")),
    Variant("dgssa-only", "DGSSA only (fast's static layers, no pyramid)", "fast:static"),
    Variant("glad-only", "GLAD only (fast's pyramid, no static layers)", "fast:pyramid"),
    Variant("fast-uniform-init", "fast, static maps start uniform", "fast",
            flags=("--calibration-images", "0")),
    Variant("fast-glad-frozen", "fast, pooling matrices frozen", "fast",
            flags=("--freeze-aggregation",)),
    Variant("fast-cluster-init", "fast, pyramid started from k-means of the tokens", "fast",
            flags=("--aggregation-init", "cluster")),
    Variant("fast-features", "fast, plus feature distillation at stage ends", "fast",
            flags=("--features", "1")),
    Variant("recommended", "plan recommended by hetvit analyze, fine-tuned", "recommended"),
    Variant("recommended-at-fast", "plan recommended for fast's GMACs, fine-tuned",
            "recommended@fast"),
]


def hetvit(*args: str | Path, capture: bool = False) -> str:
    """Run ``hetvit ARGS`` (this interpreter's), echoing the command; stdout if ``capture``."""
    cmd = ["hetvit", *map(str, args)]
    print(f"$ {shlex.join(cmd)}", flush=True)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hetvit", *cmd[1:]], check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    return done.stdout if capture else ""


def plan_file(spec: str, teacher: Path, runs: Path, test: Path, analysis_images: int) -> str:
    """A preset name as is; the partial and recommended plans written to ``runs`` as JSON.

    ``recommended@fast`` asks ``hetvit analyze`` for a plan with the GMACs of ``fast`` (its
    reduction rounded down to 0.01), so the two compare at equal cost.
    """
    from hetvit import load
    from hetvit.flops import formula_macs
    from hetvit.plan import Plan
    from hetvit.surgery import describe

    if spec in ("balanced", "fast", "fastest"):
        return spec
    path = runs / f"plan-{spec.replace(':', '-').replace('@', '-at-')}.json"
    if spec.startswith("recommended"):
        analysis = runs / spec.replace("@", "-at-")
        target = []
        if spec == "recommended@fast":  # the same GMACs as the fast preset
            model = load(teacher)
            arch = describe(model)
            fast = formula_macs(arch) / formula_macs(arch, surgery_preset("fast", model))
            target = ["--recommend-speedup", f"{fast - 0.005:.2f}"]
        if not (analysis / "patterns.json").exists():
            hetvit("analyze", "--checkpoint", teacher, "--data", test, "--num-images",
                   analysis_images, *target, "--out", analysis)
        plan = Plan.from_dict(json.loads((analysis / "patterns.json").read_text())["plan"])
    else:
        fast = surgery_preset("fast", load(teacher))
        keep = spec.split(":")[1]
        plan = Plan(static=fast.static if keep == "static" else (),
                    pyramid=fast.pyramid if keep == "pyramid" else (),
                    img_size=fast.img_size, label=spec)
    runs.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return str(path)


def run_variant(v: Variant, args: argparse.Namespace) -> dict:
    """Build (or fine-tune) the variant's model, evaluate it and time it; returns its record."""
    train, test = args.data / "cifar10-train.tar.gz", args.data / "cifar10-test.tar.gz"
    run_dir = args.runs / v.name
    if v.plan is None:
        model = args.teacher
    else:
        plan = plan_file(v.plan, args.teacher, args.runs, test, 64 if args.smoke else 1000)
        model = run_dir / "model"
        if not (model / "source.json").exists():
            if v.finetune:
                resume = (run_dir / "checkpoints" / "last.ckpt").exists()
                # no --val-data: the test set is evaluated once, below
                hetvit("finetune", "--teacher", args.teacher, "--plan", plan, "--data", train,
                       "--epochs", args.epochs * v.epoch_scale, "--out", run_dir, *v.flags,
                       *(["--resume"] if resume else []),
                       *(["--limit-train-batches", 2] if args.smoke else []))
            else:
                hetvit("compress", "--checkpoint", args.teacher, "--plan", plan,
                       "--calibration", train, "--out", model, *v.flags)
    epochs = 0
    if v.finetune and v.plan:  # what the run did, even if --epochs changed since
        epochs = json.loads((run_dir / "finetune_config.json").read_text())["epochs"]
    record = {"name": v.name, "label": v.label, "epochs": epochs}
    record.update(json.loads(hetvit("evaluate", "--checkpoint", model, "--data", test,
                                    "--json", *(["--limit", 200] if args.smoke else []),
                                    capture=True)))
    if v.plan is None:
        record.update(speedup=1.0, latency_speedup=1.0, gmac_reduction=1.0, plan="baseline")
        return record
    bench = json.loads(hetvit("bench", "--checkpoint", model, "--batch-size", 64, "--latency",
                              "--rounds", args.rounds, "--json", capture=True))
    record.update(speedup=bench["speedup"], speedup_min=bench["throughput"]["speedup_min"],
                  speedup_max=bench["throughput"]["speedup_max"],
                  latency_speedup=bench["latency_speedup"],
                  gmac_reduction=bench["gmac_reduction"], plan=bench["compressed"]["plan"],
                  gmacs=bench["compressed"]["gmacs"], env=bench["env"])
    return record


def markdown(results: dict[str, dict]) -> str:
    lines = ["| variant | plan | fine-tune epochs | top-1 | top-5 | speedup (batch 64) | batch 1 "
             "| GMAC reduction |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        r = results.get(v.name)
        if r is None:
            continue
        spread = (f" [{r['speedup_min']:.2f}-{r['speedup_max']:.2f}]"
                  if "speedup_min" in r else "")
        lines.append(f"| {r['label']} | {r['plan']} | {r['epochs']} | {100 * r['top1']:.2f}% | "
                     f"{100 * r['top5']:.2f}% | {r['speedup']:.2f}x{spread} | "
                     f"{r['latency_speedup']:.2f}x | {r['gmac_reduction']:.2f}x |")
    env = next((r["env"] for r in results.values() if "env" in r), None)
    if env:
        lines += ["", f"Top-1 on the 10,000 CIFAR-10 test images. Speed: {env['cpu']}, "
                  f"{env['threads']} threads, torch {env['torch']}, fp32, eager; each row's "
                  "own measurement, the median of its rounds with the lowest and highest in "
                  "brackets. Rows with the same plan run the same shapes, so they differ by "
                  "noise alone; pooled per plan (median of its rows, as in the plot):", ""]
        lines += [f"- `{plan}`: {median:.2f}x [{low:.2f}-{high:.2f}]"
                  for plan, (median, low, high) in plan_speedups(results).items()
                  if plan != "baseline"]
    return "\n".join(lines) + "\n"


def plan_speedups(results: dict[str, dict]) -> dict[str, tuple[float, float, float]]:
    """Per plan: the median of the speedups measured for its rows, and the lowest and highest
    round ratio among them.

    Speed depends on the plan only (fine-tuning changes weights, not shapes), so rows with the
    same plan differ by measurement noise alone; pooling them keeps that noise out of the
    Pareto front.
    """
    pooled: dict[str, list[dict]] = {}
    for r in results.values():
        pooled.setdefault(r["plan"], []).append(r)
    out = {}
    for plan, rows in pooled.items():
        speeds = sorted(r["speedup"] for r in rows)
        mid = len(speeds) // 2
        median = speeds[mid] if len(speeds) % 2 else (speeds[mid - 1] + speeds[mid]) / 2
        out[plan] = (median, min(r.get("speedup_min", r["speedup"]) for r in rows),
                     max(r.get("speedup_max", r["speedup"]) for r in rows))
    return out


def pareto(results: dict[str, dict], path: Path) -> None:
    """Top-1 against speedup for every variant (its plan's pooled speedup, with the spread of
    round ratios as a bar), with the Pareto front drawn through them."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [results[v.name] for v in VARIANTS if v.name in results]
    speed = plan_speedups(results)
    fig = Figure(figsize=(11, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = [colormaps["tab20"](i % 20) for i in range(len(rows))]
    for r, color in zip(rows, colors, strict=True):
        tuned = r["epochs"] > 0 or r["name"] == "teacher"
        x, low, high = speed[r["plan"]]
        ax.errorbar(x, 100 * r["top1"], xerr=[[x - low], [high - x]], color=color, alpha=0.5,
                    linewidth=1, capsize=2, zorder=1)
        ax.scatter(x, 100 * r["top1"], s=60, color=color, marker="o" if tuned else "X",
                   label=f"{r['label']} ({r['plan']})", zorder=2)
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (-speed[r["plan"]][0], -r["top1"])):
        if r["top1"] > best:
            front.append(r)
            best = r["top1"]
    ax.plot([speed[r["plan"]][0] for r in front], [100 * r["top1"] for r in front],
            color="0.6", linestyle="--", zorder=1, label="Pareto front")
    ax.set(xlabel="speedup over the teacher (batch 64, this CPU)\n"
                  "median over the rows of a plan; bar: lowest to highest round",
           ylabel="CIFAR-10 top-1 (%)",
           title="Accuracy against speed (X: calibration only, no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main() -> None:
    names = [v.name for v in VARIANTS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, default=ROOT / "assets" / "cifar10-teacher")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="directory with cifar10-train.tar.gz and cifar10-test.tar.gz")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per variant")
    parser.add_argument("--rounds", type=int, default=7, help="benchmark rounds")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "accuracy")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--only", nargs="+", choices=names, default=names)
    parser.add_argument("--force", action="store_true", help="redo finished variants")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="a few batches per step: checks the script, measures nothing")
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 2

    args.out_dir.mkdir(parents=True, exist_ok=True)
    store = args.out_dir / "accuracy.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if not args.report_only:
        for v in VARIANTS:
            if v.name not in args.only or (v.name in results and not args.force):
                continue
            print(f"== {v.name}: {v.label}", flush=True)
            results[v.name] = run_variant(v, args)
            write_json(store, results)
    (args.out_dir / "accuracy.md").write_text(markdown(results))
    if results:
        pareto(results, args.out_dir / "pareto.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
