"""DDP on the CPU: a 2-process fine-tune of the CIFAR-10 student against 1 process with the
same batch per step, their loss curves side by side.

Both runs are ``hetvit finetune`` of the committed teacher with the ``fast`` plan on CIFAR-10
training images (the default augmentation), the same seed and ``--batch-size`` (the batch of
one step: 2 x 32 images, or 1 x 64), for ``--steps`` steps, one after the other on this
machine's 2 cores (1 torch thread per process in DDP, 2 threads alone). The step losses are
Lightning's CSV log (every 10 steps; under DDP the mean over both processes). They agree
statistically, not exactly: each process draws its own crops and flips.

    .venv/bin/python benchmarks/ddp.py            # ~6 min on 2 idle cores

Writes ``benchmarks/results/ddp.json`` and ``ddp-loss.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hetvit.curves import read_epochs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data"


def run(out: Path, devices: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "hetvit", "finetune", "--teacher",
               str(ROOT / "assets" / "cifar10-teacher"), "--plan", "fast",
               "--data", str(DATA / "cifar10-train.tar.gz"), "--out", str(out),
               "--epochs", "1", "--limit-train-batches", str(args.steps),
               "--batch-size", str(args.batch_size), "--seed", "0",
               "--devices", str(devices), "--accelerator", "cpu",
               "--threads", str(max(1, args.cores // devices))]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK")}
    t0 = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    steps, losses = [], []
    with open(next((out / "logs").glob("version_*")) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss_step"):
                steps.append(int(row["step"]))
                losses.append(float(row["train/loss_step"]))
    epoch = read_epochs(out / "epochs.log")[-1]
    return {"devices": devices, "command": " ".join(command[1:]), "wall_s": round(seconds, 1),
            "images_per_s_per_process": round(epoch["images/s/process"], 1),
            "processes": int(epoch["processes"]), "steps": steps, "loss": losses}


def plot(runs: list[dict], path: Path) -> None:
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in runs:
        label = (f"{r['processes']} process{'es' if r['processes'] > 1 else ''} x "
                 f"{r['per_process_batch']} images, {r['images_per_s_per_process']:.0f} img/s "
                 "a process")
        ax.plot(r["steps"], r["loss"], label=label, linewidth=1.2)
    ax.set(xlabel="optimiser step", ylabel="training loss (every 10 steps)",
           title="CIFAR-10 fast student, 64 images a step: DDP vs one process")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replot", action="store_true", help="redraw the plot from ddp.json")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64, help="images a step, all processes")
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((RESULTS / "ddp.json").read_text())["runs"], RESULTS / "ddp-loss.png")
        return
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="hetvit-ddp-"))
    try:
        runs = []
        for devices in (1, 2):
            runs.append(run(work / f"run{devices}", devices, args))
            runs[-1]["per_process_batch"] = args.batch_size // devices
            print(f"{devices} process(es): {runs[-1]['wall_s']} s, "
                  f"{runs[-1]['images_per_s_per_process']} img/s a process", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, two = runs
    shared = [s for s in one["steps"] if s in two["steps"]]
    gaps = [abs(one["loss"][one["steps"].index(s)] - two["loss"][two["steps"].index(s)])
            for s in shared]
    last = [s for s in shared if s >= shared[-1] - 100]
    summary = {
        "mean_abs_gap": sum(gaps) / len(gaps),
        "mean_loss_last_100_steps": {
            str(r["processes"]): sum(r["loss"][r["steps"].index(s)] for s in last) / len(last)
            for r in runs},
        "load_avg_start": [round(x, 2) for x in load],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"command": "python benchmarks/ddp.py " + " ".join(sys.argv[1:]), "summary": summary,
           "runs": runs}
    (RESULTS / "ddp.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(runs, RESULTS / "ddp-loss.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
