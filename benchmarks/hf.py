"""The Hugging Face host against the timm host: speed, GMACs and accuracy.

Speed: HF ``ViTForImageClassification`` ViT-B/16 at 224 built from its config (random
weights: time does not depend on them) and timm's ``vit_base_patch16_224``, each compressed
with the same ``fast`` plan, timed with :func:`hetvit.bench.compare` (batch 32 and batch-1
latency) in one process, the two pairs in turn. The HF speedup should be within 10% of
timm's, and the GMACs the same.

Accuracy (``--accuracy``): the committed CIFAR-10 teacher converted to HF
(:func:`hetvit.hosts.convert.timm_to_hf`); both compressed with ``fast`` (calibrated on the
same training images), fitted label-free on the same images and evaluated on the whole test
set. The top-1s should agree within 0.1 points.

    .venv/bin/python benchmarks/hf.py                 # speed, ~5 min on 2 idle cores
    .venv/bin/python benchmarks/hf.py --accuracy      # accuracy, ~10 min

Writes ``benchmarks/results/hf-speed.json`` / ``hf-accuracy.json`` and ``hf.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import timm
import torch
import transformers

import hetvit
from hetvit.batches import image_batches
from hetvit.bench import compare, compress_for_speed
from hetvit.data import make_loader, make_transform, open_dataset, sample_images
from hetvit.demo import TEACHER, find_assets
from hetvit.evaluation import evaluate
from hetvit.hosts.convert import timm_to_hf
from hetvit.surgery import preset

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def speed(args: argparse.Namespace) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": intended
        timm_model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    hf_model = transformers.ViTForImageClassification(
        transformers.ViTConfig(num_labels=1000)).eval()  # ViT-B/16 at 224 is the default
    plan = preset("fast", timm_model)
    hf_plan = preset("fast", hf_model)  # the same layers; only the recorded source differs
    assert (plan.static, plan.pyramid) == (hf_plan.static, hf_plan.pyramid)
    load = os.getloadavg()[0]
    rows = {}
    for name, model, its_plan in (("hf", hf_model, hf_plan), ("timm", timm_model, plan)):
        compressed = compress_for_speed(model, its_plan)
        result = compare(model, compressed, batch_size=args.batch_size, rounds=args.rounds,
                         latency=True, latency_rounds=args.latency_rounds,
                         threads=args.threads)
        rows[name] = {"plan": plan.describe(), **result.to_dict()}
        print(f"{name}: speedup {result.speedup:.2f}x (batch {args.batch_size}), latency "
              f"{result.latency_speedup:.2f}x, GMACs {result.baseline.gmacs:.2f} -> "
              f"{result.compressed.gmacs:.2f}", flush=True)
    load_after = os.getloadavg()[0]
    hf, tm = rows["hf"], rows["timm"]
    summary = {
        "load_avg_1m": [round(load, 2), round(load_after, 2)],
        "cpus": os.cpu_count(),
        "provisional": max(load, load_after) >= (os.cpu_count() or 1) * 0.5,
        "speedup_ratio_b32": hf["speedup"] / tm["speedup"],
        "speedup_ratio_b1": hf["latency_speedup"] / tm["latency_speedup"],
        "gmacs_hf": [hf[k]["gmacs"] for k in ("baseline", "compressed")],
        "gmacs_timm": [tm[k]["gmacs"] for k in ("baseline", "compressed")],
    }
    return {"rows": rows, "summary": summary}


def accuracy(args: argparse.Namespace) -> dict:
    teacher = hetvit.load(find_assets() / TEACHER)
    pair = {"timm": teacher, "hf": timm_to_hf(teacher)}
    torch.manual_seed(0)
    calibration = torch.cat(list(image_batches(
        sample_images(DATA / "cifar10-train.tar.gz", teacher, args.fit_images))))
    test = open_dataset(DATA / "cifar10-test.tar.gz", make_transform(teacher))
    if args.test_images:
        test = torch.utils.data.Subset(test, range(0, len(test), len(test) // args.test_images))
    out = {}
    for name, model in pair.items():
        compressed = hetvit.compress(model, "fast", calibration)
        fitted = hetvit.fit(compressed, model, calibration,
                            hetvit.FitConfig(passes=args.passes, batch_size=64))
        out[name] = {key: evaluate(m, make_loader(test, batch_size=200))["top1"]
                     for key, m in (("teacher", model), ("compressed", compressed),
                                    ("fitted", fitted))}
        print(name, out[name], flush=True)
    out["images"] = {"fit": args.fit_images, "test": len(test), "passes": args.passes}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fit-images", type=int, default=2000)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--test-images", type=int, default=0, help="0: the whole test set")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    kind = "accuracy" if args.accuracy else "speed"
    result = accuracy(args) if args.accuracy else speed(args)
    result["env"] = {"torch": torch.__version__, "timm": timm.__version__,
                     "transformers": transformers.__version__}
    path = args.out_dir / f"hf-{kind}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
