"""Top-1 of the training-free baselines (ToMe, EViT) on the CIFAR-10 teacher, no timing.

A sanity check that the baselines behave like their papers: accuracy falls slowly with r and
faster with the decreasing schedule (it merges more tokens early). The images are decoded
once and every variant runs on the same tensor, on one thread (``--threads``).

    .venv/bin/python benchmarks/baselines_accuracy.py --images 2000       # ~5 min, 1 thread
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import hetvit
from hetvit import baselines
from hetvit.data import make_loader, make_transform, open_dataset, random_subset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-test.tar.gz"


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    model.eval()
    hits = sum(int((model(images[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum())
               for i in range(0, len(images), batch))
    return hits / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "assets" / "cifar10-teacher"))
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--r", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = hetvit.load(args.checkpoint).eval()
    ds = random_subset(open_dataset(args.data, transform=make_transform(model)), args.images)
    xs, ys = zip(*make_loader(ds, batch_size=args.batch_size), strict=True)
    images, labels = torch.cat(xs), torch.cat(ys)
    base_macs = baselines.formula_macs(model)

    variants = [("teacher", model)]
    for schedule in baselines.SCHEDULES:
        variants += [(f"tome r={r} {schedule}", baselines.tome(model, r, schedule))
                     for r in args.r]
    variants += [(f"evit keep={k:g} at 3,6,9", baselines.evit(model, k, (3, 6, 9)))
                 for k in args.keep_rates]
    rows = []
    print(f"{len(images)} CIFAR-10 test images, {args.threads} thread(s)")
    print("| variant | tokens (in -> out) | fewer GMACs | top-1 |\n| --- | --- | --- | --- |")
    for name, net in variants:
        tokens = baselines.token_counts(net)
        out = (baselines.baseline_of(net) or {}).get("tokens_out", tokens[-1])
        row = {"variant": name, "tokens_in": tokens[0], "tokens_out": out,
               "gmac_reduction": base_macs / baselines.formula_macs(net),
               "top1": top1(net, images, labels, args.batch_size)}
        rows.append(row)
        print(f"| {name} | {tokens[0]} -> {out} | {row['gmac_reduction']:.2f}x | "
              f"{100 * row['top1']:.2f}% |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
