"""How the int8 defaults were chosen: agreement and speed of each quantization setting.

Agreement: the CIFAR-10 ``fast`` student's int8 top-1 against its fp32 top-1 on 2,000 test
images (static modes calibrated on 256 training images). Speed: DeiT-Small ``fast`` (random
weights) in each setting, timed in rotating rounds beside the fp32 baseline, as the median of
the per-round ratios.

    PYTHONPATH=src .venv/bin/python benchmarks/int8_choice.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

import hetvit
from hetvit.data import make_transform, open_for_model, random_subset, sample_images
from hetvit.export import export_onnx, ort_session
from hetvit.quantize import Quantization, quantize_onnx
from hetvit.surgery import preset

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/work/shared/data")
MM = ("Conv", "MatMul", "Gemm")
FLOAT = ("static_maps", "aggregation")
SETTINGS = {
    "dynamic, per-tensor": Quantization("dynamic", False, (), 0.0),
    "dynamic, per-channel": Quantization("dynamic", True, (), 0.0),
    "dynamic, per-tensor, maps+aggregation in float": Quantization("dynamic", False, FLOAT, 0.0),
    "static all ops, per-channel, maps+aggregation in float": Quantization("static", True, FLOAT,
                                                                           0.0),
    "static all ops, per-tensor, layernorm in float": Quantization("static", False,
                                                                   ("layernorm",), 0.0),
    "static MatMul/Gemm/Conv, per-channel, maps+aggregation in float":
        Quantization("static", True, FLOAT, 0.0, MM),
    "static MatMul/Gemm/Conv, per-channel": Quantization("static", True, (), 0.0, MM),
    "static MatMul/Gemm/Conv, per-tensor, maps+aggregation in float":
        Quantization("static", False, FLOAT, 0.0, MM),
    "static MatMul/Gemm/Conv, per-tensor": Quantization("static", False, (), 0.0, MM),
}


def logits(session: ort.InferenceSession, x: torch.Tensor) -> np.ndarray:
    return np.concatenate([session.run(None, {"images": x[i:i + 256].numpy()})[0]
                           for i in range(0, len(x), 256)])


@torch.no_grad()
def agreement(work: Path, n: int) -> dict[str, dict[str, float]]:
    model = hetvit.load(ROOT / "assets" / "cifar10-fast").eval()
    cal = torch.cat([b[0] if isinstance(b, list | tuple) else b
                     for b in sample_images(DATA / "cifar10-train.tar.gz", model, 256)])
    test = random_subset(open_for_model(DATA / "cifar10-test.tar.gz", model,
                                        make_transform(model)), n)
    xs, ys = zip(*(test[i] for i in range(len(test))), strict=True)
    x, y = torch.stack(xs), np.array(ys)
    ref = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy().argmax(1)
    fp32 = work / "cifar-fp32.onnx"
    export_onnx(model, fp32, check=False)
    out = {}
    for name, config in SETTINGS.items():
        path = work / "cifar-int8.onnx"
        quantize_onnx(model, path, config, calibration=cal, source=fp32)
        pred = logits(ort_session(path), x).argmax(1)
        out[name] = {"agreement": float((pred == ref).mean()), "top1": float((pred == y).mean()),
                     "top1_fp32": float((ref == y).mean())}
        print(name, out[name], flush=True)
    return out


def speed(work: Path, threads: int, rounds: tuple[int, int]) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        fast = hetvit.compress(base, preset("fast", base),
                               calibration=torch.randn(4, 3, 224, 224)).eval()
    export_onnx(base, work / "base.onnx", check=False)
    export_onnx(fast, work / "fast.onnx", check=False)
    sessions = {"baseline fp32": ort_session(work / "base.onnx", threads=threads),
                "compressed fp32": ort_session(work / "fast.onnx", threads=threads)}
    cal = torch.randn(16, 3, 224, 224)
    for i, (name, config) in enumerate(SETTINGS.items()):
        path = work / f"fast-{i}.onnx"
        quantize_onnx(fast, path, config, calibration=cal, source=work / "fast.onnx",
                      random_images=2)
        sessions[name] = ort_session(path, threads=threads)
    out: dict[str, dict[str, float]] = {name: {} for name in sessions}
    for batch, n in zip((32, 1), rounds, strict=True):
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        for s in sessions.values():
            s.run(None, {"images": x})
        times: dict[str, list[float]] = {k: [] for k in sessions}
        items = list(sessions.items())
        for r in range(n):
            for k, s in items if r % 2 == 0 else items[::-1]:
                t0 = time.perf_counter()
                s.run(None, {"images": x})
                times[k].append(time.perf_counter() - t0)
        ref = times["baseline fp32"]
        for k, v in times.items():
            ratios = [b / t for b, t in zip(ref, v, strict=True)]
            out[k][f"speedup_b{batch}"] = statistics.median(ratios)
            out[k][f"spread_b{batch}"] = [min(ratios), max(ratios)]
        print(f"batch {batch}:", {k: round(v[f'speedup_b{batch}'], 2) for k, v in out.items()},
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, nargs=2, default=(6, 30), metavar=("B32", "B1"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                    "int8-choice.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="hetvit-int8-choice-") as d:
        acc = agreement(Path(d), args.images)
        fast = speed(Path(d), args.threads, tuple(args.rounds))
    result = {"load_avg_start": load, "load_avg_end": [round(v, 2) for v in os.getloadavg()],
              "threads": args.threads, "agreement": acc, "speed": fast}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
