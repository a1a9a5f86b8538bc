"""Four models side by side in onnxruntime: baseline and compressed, each in fp32 and int8.

Compression and int8 are meant to multiply, and the only fair way to see whether they do is to
time all four graphs in one process under the same noise. As in :func:`hetvit.bench.compare`,
every model is warmed up, then the four are timed in rotating order (forward one round,
backward the next) over several rounds; each model's speedup is the median of its per-round
ratios to the baseline fp32 of the same round, with the spread.

The int8 graphs are timed whatever their agreement (random weights make top-1 meaningless);
the agreement measured on random images is recorded beside the timings, not enforced: the
accuracy of an int8 model is ``hetvit export --quantize int8``'s and ``hetvit evaluate``'s job.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .bench import ModelInfo, Settings, environment, has_int8_dot, model_info, timed_rounds
from .errors import BenchError
from .export import ort_runner, ort_session
from .hosts import input_size
from .quantize import Quantization, quantize_onnx

__all__ = ["LINEUP", "Lineup", "compare_int8", "render_int8"]

LINEUP = ("baseline fp32", "baseline int8", "compressed fp32", "compressed int8")


@dataclass
class Lineup:
    """Per-round figures of the four models of :data:`LINEUP` (``img/s`` at ``batch_size``,
    and ``ms`` at batch 1 when latency was measured), and the conditions."""

    baseline: ModelInfo
    compressed: ModelInfo
    quantization: dict[str, Any]
    throughput: dict[str, list[float]]
    latency: dict[str, list[float]] | None
    settings: Settings
    agreement: dict[str, float] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)

    def ratios(self, name: str, which: str = "throughput") -> list[float]:
        """``name``'s speedup over baseline fp32 in each round (> 1: faster)."""
        values = getattr(self, which)
        ref = values[LINEUP[0]]
        if which == "latency":
            return [b / v for b, v in zip(ref, values[name], strict=True)]
        return [v / b for b, v in zip(ref, values[name], strict=True)]

    def speedup(self, name: str, which: str = "throughput") -> float:
        return statistics.median(self.ratios(name, which))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"baseline": asdict(self.baseline),
                               "compressed": asdict(self.compressed),
                               "quantization": self.quantization, "agreement": self.agreement,
                               "settings": asdict(self.settings), "env": self.env}
        for which in ("throughput", "latency"):
            values = getattr(self, which)
            out[which] = None if values is None else {
                name: {"median": statistics.median(values[name]),
                       "speedup": self.speedup(name, which),
                       "speedup_min": min(self.ratios(name, which)),
                       "speedup_max": max(self.ratios(name, which)),
                       "rounds": values[name]} for name in LINEUP}
        return out


def _int8_runner(model: nn.Module, config: Quantization, calibration: torch.Tensor | None,
                 threads: int) -> tuple[Callable[[np.ndarray], Any], float]:
    """An onnxruntime session of ``model`` quantized per ``config``, and its agreement with
    the fp32 model on random images."""
    with tempfile.TemporaryDirectory(prefix="hetvit-int8-bench-") as d:
        path = Path(d) / "int8.onnx"
        result = quantize_onnx(model, path, config, calibration=calibration, random_images=8)
        session = ort_session(path, threads=threads)
    agree = result.parity[0].agreement  # type: ignore[attr-defined]
    return (lambda x: session.run(None, {"images": x})), agree


def compare_int8(baseline: nn.Module, compressed: nn.Module, batch_size: int = 32, *,
                 mode: str = "dynamic", rounds: int = 7, warmup: int = 2,
                 min_time: float = 1.0, latency: bool = False, latency_rounds: int | None = None,
                 threads: int | None = None, seed: int = 0) -> Lineup:
    """Time :data:`LINEUP` side by side in onnxruntime on the CPU (fp32 inputs).

    ``mode``: ``"dynamic"``, or ``"static"`` (QDQ, calibrated on 32 random images: the scales
    it gives are fine for timing, not for accuracy). The other arguments are those of
    :func:`hetvit.bench.compare`.
    """
    if batch_size < 1 or rounds < 1 or warmup < 0:
        raise BenchError("batch_size and rounds must be at least 1, warmup at least 0")
    config = Quantization.default(mode, min_agreement=0.0)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        n = torch.get_num_threads()
        infos = [model_info(baseline), model_info(compressed)]
        env = environment("cpu")
        models = [m.eval() for m in (baseline, compressed)]
        c, h, w = input_size(baseline)
        gen = torch.Generator().manual_seed(seed)
        cal = torch.randn(32, c, h, w, generator=gen) if mode == "static" else None
        fns: list[Callable[[np.ndarray], Any]] = []
        agreement: dict[str, float] = {}
        for name, model in zip(("baseline", "compressed"), models, strict=True):
            fns.append(ort_runner(model, threads=n))
            fn, agreement[f"{name} int8"] = _int8_runner(model, config, cal, n)
            fns.append(fn)

        def measure(batch: int, n_rounds: int, unit: str) -> dict[str, list[float]]:
            x = np.ascontiguousarray(torch.randn(batch, c, h, w, generator=gen).numpy())
            runners = [lambda f=f: f(x) for f in fns]
            values = timed_rounds(runners, batch, n_rounds, unit, warmup=warmup,
                                  min_time=min_time)
            return dict(zip(LINEUP, values, strict=True))

        throughput = measure(batch_size, rounds, "img/s")
        lat = measure(1, latency_rounds or rounds, "ms") if latency else None
        env["threads"] = n
    finally:
        torch.set_num_threads(old)
    env.update(rounds=rounds, latency_rounds=(latency_rounds or rounds) if latency else None,
               warmup=warmup, min_time=min_time)
    settings = Settings(batch_size=batch_size, dtype="fp32", device="cpu", runtime="onnxruntime")
    return Lineup(infos[0], infos[1], config.to_dict(), throughput, lat, settings, agreement,
                  env)


def render_int8(result: Lineup, title: str | None = None) -> Any:
    """A rich renderable: the four models' speed and their speedups over baseline fp32."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s, lat = result.settings, result.latency
    table = Table(title=title, title_justify="left")
    for name, justify in (("model", "left"), ("GMACs", "right"),
                          (f"img/s (batch {s.batch_size})", "right"), ("speedup", "right")):
        table.add_column(name, justify=justify)
    if lat is not None:
        table.add_column("latency ms (batch 1)", justify="right")
        table.add_column("speedup", justify="right")

    def ratio(name: str, which: str) -> str:
        r = result.ratios(name, which)
        return f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]"

    for name in LINEUP:
        info = result.baseline if name.startswith("baseline") else result.compressed
        cells = [name, f"{info.gmacs:.4g}", f"{statistics.median(result.throughput[name]):.1f}",
                 ratio(name, "throughput")]
        if lat is not None:
            cells += [f"{statistics.median(lat[name]):.2f}", ratio(name, "latency")]
        table.add_row(*cells, style="bold" if name == LINEUP[-1] else None)
    q, e = result.quantization, result.env
    agree = ", ".join(f"{k} {100 * v:.0f}%" for k, v in result.agreement.items())
    load = f"; load avg {e['load_avg_1m']} at start" if "load_avg_1m" in e else ""
    lines = [table, Text(f"compressed: {result.compressed.plan}"),
             Text(f"int8: onnxruntime {q['mode']} quantization, per-"
                  f"{'channel' if q['per_channel'] else 'tensor'}, kept in float: "
                  f"{', '.join(q['exclude']) or 'none'}; top-1 agreement with fp32 on random "
                  f"images (not an accuracy): {agree}"),
             Text(f"onnxruntime, fp32 inputs, cpu, {e.get('threads')} thread(s), {e.get('cpu')}; "
                  f"rotating rounds: {len(result.ratios(LINEUP[0]))}; speedup over baseline "
                  f"fp32: median [min-max] of the per-round ratios{load}",
                  style="dim")]
    if has_int8_dot(e.get("cpu_flags")) is False:
        lines.append(Text("note: this CPU has no int8 dot-product instructions (VNNI, AMX): "
                          "int8 gains little over fp32 on it", style="yellow"))
    if e.get("load_avg_1m", 0) >= (e.get("cpu_count") or 1):
        lines.append(Text("warning: other work kept the CPU busy: absolute figures are "
                          "unreliable; the ratios, measured in rotating rounds, less so",
                          style="yellow"))
    return Group(*lines)
