"""The README's speed table: DeiT-Tiny/Small/Base at 224, every preset, batch 32 and batch 1.

Each row is one :func:`hetvit.bench.compare` call: the baseline and its compressed copy run in
alternating rounds in this one process, and the speedup is the median of the per-round ratios
(with the smallest and largest). Weights are random: time does not depend on them.

    .venv/bin/python benchmarks/speed.py                      # ~20 min on 2 idle cores
    .venv/bin/python benchmarks/speed.py --models deit_tiny_patch16_224 --rounds 3   # quick

Writes ``benchmarks/results/speed.json`` and ``speed.md`` (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import timm

from hetvit.bench import compare, compress_for_speed
from hetvit.surgery import preset as surgery_preset

MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
PRESETS = ["balanced", "fast", "fastest"]
RESULTS = Path(__file__).parent / "results"


def measure(model_name: str, preset: str, args: argparse.Namespace) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": intended
        baseline = timm.create_model(model_name, pretrained=False).eval()
    compressed = compress_for_speed(baseline, surgery_preset(preset, baseline))
    result = compare(baseline, compressed, batch_size=args.batch_size, rounds=args.rounds,
                     latency=True, latency_rounds=args.latency_rounds, threads=args.threads)
    return {"model": model_name, "preset": preset, "plan": compressed.hetvit_plan.describe(),
            **result.to_dict()}


def markdown(rows: list[dict]) -> str:
    env = rows[0]["env"]
    batch = rows[0]["settings"]["batch_size"]
    lines = [
        f"| model | preset | GMACs | img/s base -> hetvit (batch {batch}) | speedup "
        f"[min-max] | batch-1 ms base -> hetvit | speedup [min-max] | GMAC reduction | "
        f"efficiency b{batch} / b1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tp, lat = r["throughput"], r["latency"]
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['baseline']['gmacs']:.2f} -> "
            f"{r['compressed']['gmacs']:.2f} | {tp['baseline']:.1f} -> {tp['compressed']:.1f} | "
            f"**{tp['speedup']:.2f}x** [{tp['speedup_min']:.2f}-{tp['speedup_max']:.2f}] | "
            f"{lat['baseline']:.1f} -> {lat['compressed']:.1f} | {lat['speedup']:.2f}x "
            f"[{lat['speedup_min']:.2f}-{lat['speedup_max']:.2f}] | {r['gmac_reduction']:.2f}x | "
            f"{100 * r['efficiency']:.0f}% / {100 * r['latency_efficiency']:.0f}% |")
    lines += ["", f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, timm "
              f"{env['timm']}, fp32, eager; {len(rows[0]['throughput']['rounds']['speedup'])} "
              f"rounds at batch "
              f"{batch}, {len(rows[0]['latency']['rounds']['speedup'])} at batch 1; load "
              f"average {env.get('load_avg_1m')} at the start."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = []
    for model_name in args.models:
        for preset in args.presets:
            row = measure(model_name, preset, args)
            rows.append(row)
            print(f"{model_name} {preset}: {row['speedup']:.2f}x at batch {args.batch_size}, "
                  f"{row['latency_speedup']:.2f}x at batch 1", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "speed.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out_dir / "speed.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
