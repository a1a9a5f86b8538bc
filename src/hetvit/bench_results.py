"""What a side-by-side benchmark found, and how it reads: the settings both models ran under,
the paired per-round measurements and their speedup, the models' cost, the warnings a reader
must see (a baseline whose time moved between rounds or between pairings), and the table.

:mod:`hetvit.bench` does the measuring and returns a :class:`BenchResult`; everything that
only reads one lives here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import BenchError

__all__ = ["Settings", "Paired", "ModelInfo", "BenchResult", "render", "baseline_drift",
           "baseline_unsteady"]


@dataclass(frozen=True)
class Settings:
    """How both models are run. Everything here is recorded with the result."""

    batch_size: int = 32
    dtype: str = "fp32"
    device: str = "cpu"
    compile: bool = False
    runtime: str = "torch"


# ----------------------------------------------------------------------------- results
@dataclass
class Paired:
    """One quantity measured for both models, one value per round, in alternating order.

    ``unit`` is ``"img/s"`` (higher is better) or ``"ms"`` (lower is better); the per-round
    speedup is compressed over baseline throughput, or baseline over compressed latency.
    """

    unit: str
    baseline: list[float]
    compressed: list[float]

    @property
    def ratios(self) -> list[float]:
        """The speedup of each round (> 1 means the compressed model is faster)."""
        if self.unit == "ms":
            return [b / c for b, c in zip(self.baseline, self.compressed, strict=True)]
        return [c / b for b, c in zip(self.baseline, self.compressed, strict=True)]

    @property
    def speedup(self) -> float:
        """Median of the per-round speedups: pairs taken seconds apart share the same noise."""
        return statistics.median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        """Smallest and largest per-round speedup."""
        return min(self.ratios), max(self.ratios)

    @property
    def iqr(self) -> tuple[float, float]:
        """25th and 75th percentile of the per-round speedups."""
        r = self.ratios
        if len(r) < 2:
            return r[0], r[0]
        q = statistics.quantiles(r, n=4, method="inclusive")
        return q[0], q[2]

    def median(self, which: str) -> float:
        return statistics.median(getattr(self, which))

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "baseline": self.median("baseline"),
                "compressed": self.median("compressed"), "speedup": self.speedup,
                "speedup_min": self.spread[0], "speedup_max": self.spread[1],
                "speedup_q1": self.iqr[0], "speedup_q3": self.iqr[1],
                "rounds": {"baseline": self.baseline, "compressed": self.compressed,
                           "speedup": self.ratios}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Paired:
        """The inverse of :meth:`to_dict` (the per-round values are what it keeps)."""
        return cls(d["unit"], list(d["rounds"]["baseline"]), list(d["rounds"]["compressed"]))

    def baseline_ms(self, batch_size: int) -> list[float]:
        """The baseline's time per call of each round, in ms, whatever the unit."""
        if self.unit == "ms":
            return list(self.baseline)
        return [1e3 * batch_size / v for v in self.baseline]


@dataclass
class ModelInfo:
    """The cost of one model: analytic GMACs, counted GMACs and parameters."""

    gmacs: float
    gmacs_counted: float
    params: int
    plan: str

    @property
    def macs_agree(self) -> bool:
        return math.isclose(self.gmacs, self.gmacs_counted, rel_tol=1e-9)


@dataclass
class BenchResult:
    """Everything :func:`compare` measured, and the conditions it was measured under."""

    baseline: ModelInfo
    compressed: ModelInfo
    throughput: Paired
    latency: Paired | None
    settings: Settings
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Median throughput speedup at ``settings.batch_size``."""
        return self.throughput.speedup

    @property
    def gmac_reduction(self) -> float:
        """How many times fewer MACs the compressed model needs per image."""
        return self.baseline.gmacs / self.compressed.gmacs

    @property
    def efficiency(self) -> float:
        """Speedup divided by the GMAC reduction: 1.0 means every saved MAC became time."""
        return self.speedup / self.gmac_reduction

    @property
    def latency_speedup(self) -> float | None:
        return None if self.latency is None else self.latency.speedup

    @property
    def latency_efficiency(self) -> float | None:
        return None if self.latency is None else self.latency.speedup / self.gmac_reduction

    def to_dict(self) -> dict[str, Any]:
        return {
            "speedup": self.speedup,
            "gmac_reduction": self.gmac_reduction,
            "efficiency": self.efficiency,
            "latency_speedup": self.latency_speedup,
            "latency_efficiency": self.latency_efficiency,
            "baseline": asdict(self.baseline),
            "compressed": asdict(self.compressed),
            "throughput": self.throughput.to_dict(),
            "latency": None if self.latency is None else self.latency.to_dict(),
            "settings": asdict(self.settings),
            "env": self.env,
            "warnings": [w for w in (baseline_unsteady(self),) if w],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        """The inverse of :meth:`to_dict`: re-read a saved result, e.g. to compare pairings
        measured by earlier runs of a resumable benchmark (:func:`baseline_drift`)."""
        lat = d.get("latency")
        latency = None if lat is None else Paired.from_dict(lat)
        return cls(ModelInfo(**d["baseline"]), ModelInfo(**d["compressed"]),
                   Paired.from_dict(d["throughput"]), latency, Settings(**d["settings"]),
                   dict(d.get("env") or {}))


# ----------------------------------------------------------------------------- steadiness
def _measurements(result: BenchResult) -> list[tuple[str, Paired, int]]:
    """``(what, paired, batch)`` for the throughput and, if measured, the latency."""
    out = [(f"batch {result.settings.batch_size}", result.throughput, result.settings.batch_size)]
    if result.latency is not None:
        out.append(("batch 1", result.latency, 1))
    return out


def baseline_unsteady(result: BenchResult, tolerance: float = 0.1) -> str | None:
    """A warning when the baseline's own rounds in one pairing differ by more than
    ``tolerance`` (slowest over fastest), else ``None``.

    The speedup is a median of per-round ratios, so it survives a slow round; but rounds that
    disagree this much mean something else ran on the machine meanwhile, and the absolute
    figures (img/s, ms) are not to be quoted.
    """
    parts = []
    for what, paired, batch in _measurements(result):
        ms = paired.baseline_ms(batch)
        if len(ms) > 1 and max(ms) / min(ms) - 1 > tolerance:
            parts.append(f"{min(ms):.1f}-{max(ms):.1f} ms at {what} "
                         f"({100 * (max(ms) / min(ms) - 1):.0f}% apart)")
    if not parts:
        return None
    return (f"the baseline's own rounds disagree by more than {100 * tolerance:.0f}%: "
            f"{'; '.join(parts)}: other work shared the CPU; the median ratio is more "
            "trustworthy than the absolute figures")


def baseline_drift(results: list[BenchResult], tolerance: float = 0.1,
                   labels: list[str] | None = None) -> str | None:
    """A warning when the same baseline's median time moves more than ``tolerance`` between
    pairings (several :func:`compare` calls with one baseline), else ``None``.

    Each pairing's ratio only cancels noise that both of its models shared. If the baseline
    itself runs slower beside one partner than beside another (allocator state, cache or
    memory pressure left by the partner, a neighbour's load), ratios from different pairings
    are not on one scale, and the warning names the pairings at either end. ``labels`` name
    the pairings (default: the compressed model's plan or method).
    """
    if len(results) < 2:
        return None
    names = labels if labels is not None else [r.compressed.plan for r in results]
    if len(names) != len(results):
        raise BenchError(f"{len(names)} labels for {len(results)} results")
    parts = []
    for what, _, _ in _measurements(results[0]):
        times = []
        for name, r in zip(names, results, strict=True):
            found = {w: (p, b) for w, p, b in _measurements(r)}
            if what in found:
                paired, batch = found[what]
                times.append((statistics.median(paired.baseline_ms(batch)), name))
        if len(times) < 2:
            continue
        (fast, fast_name), (slow, slow_name) = min(times), max(times)
        if slow / fast - 1 > tolerance:
            off = [n for t, n in sorted(times, reverse=True) if t / fast - 1 > tolerance]
            more = f" (+{len(off) - 5} more)" if len(off) > 5 else ""
            parts.append(f"at {what} {100 * (slow / fast - 1):.0f}% apart over {len(times)} "
                         f"pairings: {fast:.1f} ms beside {fast_name}, {slow:.1f} ms beside "
                         f"{slow_name}; over {100 * tolerance:.0f}% slower than the fastest "
                         f"beside: {', '.join(off[:5])}{more}")
    if not parts:
        return None
    return (f"the baseline's median time moved more than {100 * tolerance:.0f}% between "
            f"pairings ({'; '.join(parts)}): speedups from different pairings are not on one "
            "scale")


# ----------------------------------------------------------------------------- rendering
def render(result: BenchResult, title: str | None = None) -> Any:
    """A rich renderable: both models' cost and speed, the ratios, and the conditions."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s, b, c = result.settings, result.baseline, result.compressed
    tp, lat = result.throughput, result.latency
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    table.add_column("GMACs", justify="right")
    table.add_column("params (M)", justify="right")
    table.add_column(f"img/s (batch {s.batch_size})", justify="right")
    if lat is not None:
        table.add_column("latency ms (batch 1)", justify="right")

    def row(name: str, info: ModelInfo, which: str) -> list[str]:
        cells = [name, f"{info.gmacs:.4g}", f"{info.params / 1e6:.2f}", f"{tp.median(which):.1f}"]
        if lat is not None:
            cells.append(f"{lat.median(which):.2f}")
        return cells

    def ratio(p: Paired) -> str:
        lo, hi = p.spread
        return f"{p.speedup:.2f}x [{lo:.2f}-{hi:.2f}]"

    table.add_row(*row("baseline", b, "baseline"))
    table.add_row(*row("compressed", c, "compressed"))
    last = ["speedup", f"{result.gmac_reduction:.2f}x fewer", "", ratio(tp)]
    if lat is not None:
        last.append(ratio(lat))
    table.add_row(*last, style="bold")

    eff = f"efficiency (speedup / GMAC reduction): {100 * result.efficiency:.0f}%"
    if result.latency_efficiency is not None:
        eff += f" at batch {s.batch_size}, {100 * result.latency_efficiency:.0f}% at batch 1"
    e = result.env
    mode = {"torch": " (torch.compile)" if s.compile else " (eager)"}.get(s.runtime, "")
    conditions = (f"{s.runtime}{mode}, {s.dtype}, {s.device}"
                  f"{' (' + e['gpu'] + ')' if e.get('gpu') else ''}, {e.get('threads')} thread(s), "
                  f"{e.get('cpu')}, torch {e.get('torch')}, timm {e.get('timm')}; "
                  f"alternating rounds: {len(tp.ratios)}"
                  f"{f' ({len(lat.ratios)} at batch 1)' if lat is not None else ''}; "
                  "speedup: median [min-max] of the per-round ratios")
    if "load_avg_1m" in e:
        conditions += f"; load avg {e['load_avg_1m']} at start"
    if e.get("threading_env"):
        conditions += "; " + " ".join(f"{k}={v}" for k, v in e["threading_env"].items())
    lines = [table, Text(f"compressed: {c.plan}"), Text(eff), Text(conditions, style="dim")]
    if e.get("load_avg_1m", 0) >= (e.get("cpu_count") or 1):
        lines.append(Text("warning: other work kept the CPU busy: absolute figures are "
                          "unreliable; the ratios, measured in alternating rounds, less so",
                          style="yellow"))
    unsteady = baseline_unsteady(result)
    if unsteady:
        lines.append(Text(f"warning: {unsteady}", style="yellow"))
    for name, info in (("baseline", b), ("compressed", c)):
        if not info.macs_agree:
            lines.append(Text(f"warning: {name} GMACs: formula {info.gmacs:.4f} != counted "
                              f"{info.gmacs_counted:.4f}", style="yellow"))
    return Group(*lines)
