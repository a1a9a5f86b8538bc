"""Speed of a compressed ViT against its baseline in onnxruntime, next to the PyTorch figure.

Both models are exported with ``hetvit.export`` and timed side by side in one process:
after warm-up, each round runs the baseline and the compressed model once, in alternating
order, and the result is the median of the per-round ratios (with the 25th-75th percentile
spread). Absolute milliseconds are context only; other load on the machine moves them, and
alternation keeps the ratio fair.

    .venv/bin/python benchmarks/onnx_speed.py --model deit_small_patch16_224 --preset fast
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable

import numpy as np
import onnxruntime
import timm
import torch

import hetvit
from hetvit.export import check_parity, ort_runner


def side_by_side(base: Callable[[], object], fast: Callable[[], object], rounds: int,
                 warmup: int) -> dict[str, float]:
    """Median times and the median per-round speedup of ``fast`` over ``base``."""
    for _ in range(warmup):
        base()
        fast()
    tb, tf, ratios = [], [], []
    for r in range(rounds):
        order = (("b", base), ("f", fast)) if r % 2 == 0 else (("f", fast), ("b", base))
        times = {}
        for key, fn in order:
            t0 = time.perf_counter()
            fn()
            times[key] = time.perf_counter() - t0
        tb.append(times["b"])
        tf.append(times["f"])
        ratios.append(times["b"] / times["f"])
    q1, _, q3 = statistics.quantiles(ratios, n=4)  # needs 2 rounds or more
    return {"base_ms": 1e3 * statistics.median(tb), "fast_ms": 1e3 * statistics.median(tf),
            "speedup": statistics.median(ratios), "q1": q1, "q3": q3}


def other_load() -> str:
    """Other CPU-heavy processes on this machine (they make absolute timings noisy)."""
    try:
        ps = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True,
                            text=True, check=True).stdout.splitlines()[1:4]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    busy = [line.strip()[:90] for line in ps if float(line.split()[0]) > 20
            and "onnx_speed" not in line]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"load average {load}; busy: {busy or 'none'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=32, help="throughput batch size")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds at --batch")
    ap.add_argument("--latency-rounds", type=int, default=40, help="timed rounds at batch 1")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = timm.create_model(args.model, pretrained=False).eval()
        plan = hetvit.surgery.preset(args.preset, base)
        c, h, w = 3, *base.patch_embed.img_size
        fast = hetvit.compress(base, plan, calibration=torch.randn(8, c, h, w)).eval()
    print(f"model {args.model} (random weights), preset {args.preset}: {plan.describe()}")
    print(f"threads {args.threads}, fp32, CPU ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, opset 17")
    print(f"other load: {other_load()}")

    ort_base = ort_runner(base, batch_size=1, threads=args.threads)
    ort_fast = ort_runner(fast, batch_size=1, threads=args.threads)
    check = torch.randn(8, c, h, w)
    for name, model, run in (("baseline", base, ort_base), ("compressed", fast, ort_fast)):
        print(f"parity {name}: {check_parity(model, run.session, check, name='random images')}")

    rows = []
    for batch, rounds in ((args.batch, args.rounds), (1, args.latency_rounds)):
        x = torch.randn(batch, c, h, w)
        xn = np.ascontiguousarray(x.numpy())
        with torch.inference_mode():
            torch_stats = side_by_side(lambda x=x: base(x), lambda x=x: fast(x), rounds,
                                       args.warmup)
        ort_stats = side_by_side(lambda xn=xn: ort_base(xn), lambda xn=xn: ort_fast(xn),
                                 rounds, args.warmup)
        rows.append(("onnxruntime", batch, ort_stats))
        rows.append(("pytorch", batch, torch_stats))

    print()
    print("| runtime | batch | baseline ms | compressed ms | speedup (median) | spread (p25-p75) "
          "| compressed img/s |")
    print("|---|---|---|---|---|---|---|")
    for runtime, batch, s in sorted(rows, key=lambda r: (-r[1], r[0])):
        print(f"| {runtime} | {batch} | {s['base_ms']:.1f} | {s['fast_ms']:.1f} | "
              f"{s['speedup']:.2f}x | {s['q1']:.2f}-{s['q3']:.2f} | "
              f"{1e3 * batch / s['fast_ms']:.1f} |")
    print(f"\nother load at the end: {other_load()}")


if __name__ == "__main__":
    main()
