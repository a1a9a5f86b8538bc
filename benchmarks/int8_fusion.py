"""Two untried int8 levers: onnxruntime's transformer optimizer (its fusions) before quantizing,
and the QOperator format instead of QDQ. DeiT-Small and its ``fast`` plan (random weights),
every variant timed beside the plain baseline fp32 graph in rotating rounds, 2 threads; prints
the median img/s and the median [min-max] of the per-round ratios to baseline fp32.

    PYTHONPATH=src .venv/bin/python benchmarks/int8_fusion.py \
        | tee benchmarks/results/int8-fusion.txt

Optional arguments keep only the variants whose name contains one of them; BATCH and ROUNDS
in the environment set the batch (1: latency in ms) and the number of rounds.
"""
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime.quantization as q
import timm
import torch
from onnxruntime.transformers.optimizer import optimize_model

import hetvit
from hetvit.bench import cpu_flags, timed_rounds
from hetvit.export import export_onnx, ort_session
from hetvit.quantize import node_groups
from hetvit.surgery import preset

if any(arg.startswith("-") for arg in sys.argv[1:]):  # --help, or a flag it does not take
    print(__doc__)
    sys.exit(0)

torch.set_num_threads(2)
torch.manual_seed(0)
work = Path(tempfile.mkdtemp(prefix="int8fus-"))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    base = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    fast = hetvit.compress(base, preset("fast", base),
                           calibration=torch.randn(8, 3, 224, 224)).eval()
cal = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(1))


class Reader(q.CalibrationDataReader):
    def __init__(self) -> None:
        self.it = iter([{"images": cal[i:i + 8].numpy()} for i in range(0, 32, 8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def optimized(src: Path, dst: Path) -> Path:
    m = optimize_model(str(src), model_type="vit", num_heads=6, hidden_size=384, opt_level=0)
    print(dst.name, m.get_fused_operator_statistics(), flush=True)
    m.save_model_to_file(str(dst))
    return dst


def static(src: Path, dst: Path, model: torch.nn.Module, fmt: str = "QDQ",
           exclude_groups: tuple[str, ...] = ("static_maps", "aggregation")) -> Path:
    groups = node_groups(model, src)
    exclude = [n for g in exclude_groups for n in groups[g]]
    prep = dst.with_suffix(".prep.onnx")
    q.quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
    q.quantize_static(str(prep), str(dst), Reader(),
                      quant_format=getattr(q.QuantFormat, fmt), per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      nodes_to_exclude=exclude, calibrate_method=q.CalibrationMethod.MinMax,
                      op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                      extra_options={"DefaultTensorType": 1})
    return dst


def dynamic(src: Path, dst: Path, op_types: list[str] | None = None) -> Path:
    q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8, per_channel=False,
                       op_types_to_quantize=op_types,
                       extra_options={"DefaultTensorType": 1})
    return dst


files = {}
for name, model in (("base", base), ("fast", fast)):
    p = work / f"{name}.onnx"
    export_onnx(model, p, check=False)
    files[f"{name} fp32"] = p
    files[f"{name} fp32 opt"] = optimized(p, work / f"{name}.opt.onnx")
variants = dict(files)
variants["fast int8 static QDQ"] = static(files["fast fp32"], work / "f.sqdq.onnx", fast)
variants["fast int8 static QOp"] = static(files["fast fp32"], work / "f.sqop.onnx", fast,
                                         "QOperator")
variants["fast int8 dyn"] = dynamic(files["fast fp32"], work / "f.dyn.onnx")
variants["fast opt int8 dyn"] = dynamic(files["fast fp32 opt"], work / "f.opt.dyn.onnx")
try:  # the optimizer's fused ops leave the head bias without a scale: onnxruntime refuses
    variants["fast opt int8 static QDQ"] = static(files["fast fp32 opt"],
                                                  work / "f.opt.sqdq.onnx", fast)
except RuntimeError as e:
    print("static QDQ of the optimized graph failed:", e)
variants["base opt int8 dyn"] = dynamic(files["base fp32 opt"], work / "b.opt.dyn.onnx")
variants["base int8 static QDQ"] = static(files["base fp32"], work / "b.sqdq.onnx", base,
                                          exclude_groups=())

only = sys.argv[1:]
names = [n for n in variants if not only or n == "base fp32" or any(o in n for o in only)]
sessions = {n: ort_session(variants[n], threads=2) for n in names}
batch = int(os.environ.get("BATCH", 32))
x = np.ascontiguousarray(torch.randn(batch, 3, 224, 224).numpy())
runners = [lambda s=s: s.run(None, {"images": x}) for s in sessions.values()]
print("load", os.getloadavg(), flush=True)
unit = "img/s" if batch > 1 else "ms"
vals = timed_rounds(runners, batch, int(os.environ.get("ROUNDS", 5)), unit, warmup=2, min_time=1.0)
print("load", os.getloadavg(), flush=True)
b = vals[0]
for n, v in zip(names, vals, strict=True):
    r = [(vv / bb if unit == "img/s" else bb / vv) for vv, bb in zip(v, b, strict=True)]
    print(f"{n:28s} {statistics.median(v):8.2f} {unit}  {statistics.median(r):.2f}x "
          f"[{min(r):.2f}-{max(r):.2f}]", flush=True)
print("int8-relevant cpu flags:", cpu_flags())
