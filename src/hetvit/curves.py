"""A training run's per-epoch record (``epochs.log``) and its plot (``curves.png``).

Lightning's CSV logs start a new ``version_N`` folder at every resume and are flushed in
chunks, so a run resumed across sessions is hard to read from them. Instead every epoch
appends one plain line to ``<run>/epochs.log``::

    epoch 12/24 | time 731s | step 4680 | train/loss_epoch 1.2381 | val/top1 0.6520 | ...

(then ``images/s/process 85.2391 | processes 2``: the training throughput of one process, and
how many there were),

and the plot is redrawn from that file, so it always shows the whole run, resumes included.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["EPOCHS_LOG", "CURVES_PNG", "format_epoch", "read_epochs", "plot_epochs"]

EPOCHS_LOG, CURVES_PNG = "epochs.log", "curves.png"


def format_epoch(epoch: int, total: int, seconds: float, step: int,
                 metrics: dict[str, float | int]) -> str:
    """One ``epochs.log`` line: epoch (1-based) of the run's total, time, step, then metrics
    (counts as whole numbers, the rest to 4 decimals)."""
    parts = [f"epoch {epoch}/{total}", f"time {seconds:.0f}s", f"step {step}"]
    parts += [f"{key} {value}" if isinstance(value, int) else f"{key} {value:.4f}"
              for key, value in metrics.items()]
    return " | ".join(parts)


def read_epochs(path: str | Path) -> list[dict[str, float]]:
    """The rows of an ``epochs.log``: ``epoch``, ``total`` (the run's planned epochs at the
    time), ``time``, ``step`` and each metric. A repeated epoch (a resume that redid it) keeps
    its last line."""
    rows: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        fields = [f.strip() for f in line.split("|")]
        if not fields or not fields[0].startswith("epoch "):
            continue
        epoch, total = fields[0].split()[1].split("/")
        row = {"epoch": int(epoch), "total": int(total)}
        for field in fields[1:]:
            key, _, value = field.rpartition(" ")
            row[key] = float(value.rstrip("s"))
        rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def plot_epochs(path: str | Path, out: str | Path, title: str | None = None,
                notes: Sequence[tuple[float, str]] = ()) -> Path:
    """Plot an ``epochs.log``: validation top-1 (left) and losses (right) per epoch, with a
    dotted line wherever the run's planned length changed (its schedule was stretched) and
    at each ``(epoch, text)`` of ``notes`` (a line just after that epoch), for other changes a
    reader of the curves must know about."""

    rows = read_epochs(path)
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    acc, loss = fig.subplots(1, 2)
    for key, label in (("val/top1", "top-1"), ("val/top5", "top-5")):
        points = [(r["epoch"], 100 * r[key]) for r in rows if key in r]
        if points:
            acc.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    for key, label in (("train/loss_epoch", "training loss (augmented, smoothed labels)"),
                       ("val/loss", "validation loss")):
        points = [(r["epoch"], r[key]) for r in rows if key in r]
        if points:
            loss.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    marks = [(before["epoch"],
              f"schedule: {int(before['total'])} -> {int(after['total'])} epochs")
             for before, after in zip(rows, rows[1:], strict=False)
             if after["total"] != before["total"]]
    for epoch, text in [*marks, *notes]:
        for ax in (acc, loss):
            ax.axvline(epoch + 0.5, color="0.5", linestyle=":", linewidth=1)
        acc.annotate(text, (epoch + 0.6, 0.02), xycoords=("data", "axes fraction"),
                     fontsize=7, color="0.4", rotation=90)
    if title:
        fig.suptitle(title)
    acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="accuracy")
    loss.set(xlabel="epoch", ylabel="loss", title="loss")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
        if epochs:
            ax.set_xlim(0.5, max(epochs) + 0.5)
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out
