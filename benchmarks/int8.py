"""int8 on top of compression in onnxruntime: speed of DeiT-Small and accuracy of the CIFAR-10
student, each quantization mode in turn.

Speed: DeiT-Small (random weights: time does not depend on them) and its ``fast`` plan, each in
fp32 and int8, timed side by side in one process (:func:`hetvit.bench_int8.compare_int8`) at
batch 32 and batch 1; the figure is the median of per-round ratios to the baseline fp32.

Accuracy: the committed CIFAR-10 ``fast`` student (assets/cifar10-fast) quantized with
:func:`hetvit.quantize_onnx` (static mode calibrated on 256 training images), then top-1 of the
PyTorch fp32 model and of the int8 graph over the full CIFAR-10 test set, and how often their
top-1 agree.

    PYTHONPATH=src .venv/bin/python benchmarks/int8.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime
import timm
import torch

import hetvit
from hetvit.bench import cpu_name
from hetvit.bench_int8 import LINEUP, compare_int8
from hetvit.data import make_loader, make_transform, open_for_model, sample_images
from hetvit.export import ort_session
from hetvit.quantize import MODES, Quantization, quantize_onnx
from hetvit.surgery import preset

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/work/shared/data")
RESULTS = ROOT / "benchmarks" / "results"


def speed(mode: str, threads: int, rounds: int, latency_rounds: int) -> dict:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        fast = hetvit.compress(base, preset("fast", base),
                               calibration=torch.randn(8, 3, 224, 224)).eval()
    load = os.getloadavg()
    result = compare_int8(base, fast, 32, mode=mode, rounds=rounds, warmup=2, min_time=1.0,
                          latency=True, latency_rounds=latency_rounds, threads=threads)
    data = result.to_dict()
    data["load_avg_start"] = [round(x, 2) for x in load]
    data["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return data


@torch.no_grad()
def accuracy(mode: str, threads: int, work: Path) -> dict:
    model = hetvit.load(ROOT / "assets" / "cifar10-fast").eval()
    calibration = (sample_images(DATA / "cifar10-train.tar.gz", model, 256)
                   if mode == "static" else None)
    path = work / f"cifar10-fast-{mode}.onnx"
    t0 = time.perf_counter()
    result = quantize_onnx(model, path, Quantization.default(mode), calibration=calibration)
    quantize_s = time.perf_counter() - t0
    session = ort_session(path, threads=threads)
    dataset = open_for_model(DATA / "cifar10-test.tar.gz", model, make_transform(model))
    fp32 = int8 = agree = n = 0
    for images, target in make_loader(dataset, batch_size=256):
        ref = model(images).argmax(-1)
        out = torch.from_numpy(session.run(None, {"images": images.numpy()})[0]).argmax(-1)
        fp32 += int((ref == target).sum())
        int8 += int((out == target).sum())
        agree += int((out == ref).sum())
        n += len(target)
    return {"mode": mode, "quantization": result.quantization.to_dict(),
            "gate": str(result.parity[0]), "quantize_s": round(quantize_s, 1), "images": n,
            "top1_fp32": fp32 / n, "top1_int8": int8 / n, "agreement": agree / n,
            "delta_points": 100 * (int8 - fp32) / n, "file_mb": path.stat().st_size / 1e6}


def markdown(out: dict) -> str:
    lines = ["# int8 in onnxruntime on top of compression", "",
             f"{out['env']['cpu']}, {out['env']['threads']} threads, onnxruntime "
             f"{out['env']['onnxruntime']}, torch {out['env']['torch']}; load average at the "
             f"start {out['env']['load_avg']}.", ""]
    for mode, s in out.get("speed", {}).items():
        lines += [f"## Speed, DeiT-Small `fast`, {mode} int8 (load avg {s['load_avg_start'][0]}"
                  f" -> {s['load_avg_end'][0]})", "",
                  "| model | img/s (batch 32) | speedup [min-max] | ms (batch 1) | speedup "
                  "[min-max] |", "|---|---|---|---|---|"]
        for name in LINEUP:
            tp, lat = s["throughput"][name], s["latency"][name]
            lines.append(f"| {name} | {tp['median']:.1f} | {tp['speedup']:.2f}x "
                         f"[{tp['speedup_min']:.2f}-{tp['speedup_max']:.2f}] | "
                         f"{lat['median']:.1f} | {lat['speedup']:.2f}x "
                         f"[{lat['speedup_min']:.2f}-{lat['speedup_max']:.2f}] |")
        lines.append("")
    if out.get("accuracy"):
        lines += ["## Accuracy, CIFAR-10 `fast` student, full test set", "",
                  "| mode | fp32 top-1 | int8 top-1 | delta (points) | top-1 agreement |",
                  "|---|---|---|---|---|"]
        for a in out["accuracy"].values():
            lines.append(f"| {a['mode']} | {100 * a['top1_fp32']:.2f}% | "
                         f"{100 * a['top1_int8']:.2f}% | {a['delta_points']:+.2f} | "
                         f"{100 * a['agreement']:.2f}% |")
        lines.append("")
    lines += ["Command: `" + out["command"] + "`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--rounds", type=int, default=7, help="rotating rounds at batch 32")
    ap.add_argument("--latency-rounds", type=int, default=9, help="rotating rounds at batch 1")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {"command": "PYTHONPATH=src .venv/bin/python benchmarks/int8.py "
                 + " ".join(sys.argv[1:]),
                 "env": {"cpu": cpu_name() or platform.machine(),
                         "threads": args.threads, "onnxruntime": onnxruntime.__version__,
                         "torch": torch.__version__,
                         "load_avg": [round(x, 2) for x in os.getloadavg()]}}
    if not args.skip_accuracy:
        out["accuracy"] = {}
        with tempfile.TemporaryDirectory(prefix="hetvit-int8-") as work:
            for mode in args.modes:
                out["accuracy"][mode] = a = accuracy(mode, args.threads, Path(work))
                print(json.dumps(a), flush=True)
    if not args.skip_speed:
        out["speed"] = {}
        for mode in args.modes:
            out["speed"][mode] = s = speed(mode, args.threads, args.rounds, args.latency_rounds)
            print(mode, {k: round(s["throughput"][k]["speedup"], 2) for k in LINEUP},
                  {k: round(s["latency"][k]["speedup"], 2) for k in LINEUP}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
