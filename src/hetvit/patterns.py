"""Attention-pattern analysis: how alike and how low-rank each layer's attention is.

The method rests on two measurable claims (see docs/design.md): early layers attend alike for every
image (so a static map can replace them, DGSSA) and late layers have low-rank attention (so their
tokens can be aggregated, GLAD). :func:`analyze` measures both per layer and head over a stream of
images into a :class:`PatternReport`; :func:`hetvit.recommend.recommend` turns the measurements
into a :class:`~hetvit.Plan` and :mod:`hetvit.render` draws them.

Everything is accumulated batch by batch, so 1,000 images through DeiT-Small (12 x 6 maps of
197 x 197 per image) never sit in memory together. The metrics, per layer ``l`` and head ``h``,
with ``A_i`` the ``N x N`` attention map of image ``i`` (``N`` tokens, prefix tokens included)
and ``n`` images:

``similarity``
    Mean cosine similarity of the flattened maps of two different images,
    ``mean_{i != j} <u_i, u_j>`` with ``u_i = A_i / ||A_i||``. Exact in streaming form:
    ``(||sum_i u_i||^2 - n) / (n (n - 1))``.
``js``
    Mean Jensen-Shannon divergence (base 2, so in [0, 1]) between the same query row of two
    different images' maps, averaged over rows. The all-pairs mean needs every map at once, so it
    is estimated from the ``n - 1`` consecutive pairs ``(i, i + 1)`` of the stream. Each pair is a
    uniformly random pair of distinct images when the images come in random order, so the
    estimate is then unbiased for the all-pairs mean. A stream sorted by class (an ImageFolder
    read in order) pairs alike images and biases it low: shuffle (the CLI does).
``static_kl``
    ``mean_i KL(A_i || A_mean)`` per query row, in nats, averaged over rows, with ``A_mean``
    the mean map over all images. It is exact in streaming form, since it equals
    ``H(A_mean) - mean_i H(A_i)`` row by row (the generalised Jensen-Shannon divergence, or
    information radius, of the images' rows). It is also what DGSSA cares about: its guidance
    loss is ``KL(A_dyn || A_static)`` over heads and rows, the static map starts as the mean
    map, and the mean map is the static map that minimises that loss. So ``static_kl`` is the
    loss left at step 0, and the least any static map can reach on these images.
``effective_rank``
    ``exp(entropy(s / sum(s)))`` for the singular values ``s`` of ``A_i`` (Roy & Vetterli),
    divided by ``N`` and averaged over images. A uniform map has rank 1, so ``1 / N``.
``rank90``, ``rank99``
    The fewest singular values holding 90% / 99% of ``sum(s^2)``, as a fraction of ``N``,
    averaged over images.
``redundancy`` (per layer)
    Mean cosine similarity of two different patch tokens entering the block (the residual
    stream, before its norm), averaged over images. Patch tokens only, since only they are
    aggregated.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from .batches import image_batches
from .capture import attention_maps, module_inputs
from .errors import AnalysisError
from .files import atomic_write_text
from .hosts import describe, host_of
from .modes import eval_mode
from .surgery import is_compressed

__all__ = ["analyze", "PatternReport", "DEFINITIONS", "looks_untrained"]

DEFINITIONS = {
    "similarity": "mean cosine similarity of the flattened maps of two different images "
                  "(exact: (||sum u_i||^2 - n) / (n(n-1)), u_i = A_i / ||A_i||)",
    "js": "mean Jensen-Shannon divergence (bits) of the same query row in two different images' "
          "maps, averaged over rows; estimated from consecutive images of the stream (unbiased "
          "for the all-pairs mean when the images come in random order)",
    "static_kl": "mean over images of KL(A_i || mean map) per query row (nats), averaged over "
                 "rows: the DGSSA guidance loss at initialisation (exact)",
    "effective_rank": "exp(entropy of s / sum(s)) of the singular values s of a map, as a "
                      "fraction of N, averaged over images",
    "rank90": "fewest singular values holding 90% of sum(s^2), as a fraction of N, averaged "
              "over images",
    "rank99": "fewest singular values holding 99% of sum(s^2), as a fraction of N, averaged "
              "over images",
    "redundancy": "mean cosine similarity of two different patch tokens entering the block, "
                  "averaged over images",
}


# ----------------------------------------------------------------------------- streaming stats
class _LayerStats:
    """Running sums for one layer; every statistic is a sum over images, divided at the end."""

    def __init__(self, examples: int) -> None:
        self.n = 0  # images whose maps were seen
        self.map_sum: torch.Tensor | None = None  # H x N x N, sum of A_i
        self.unit_sum: torch.Tensor | None = None  # H x N x N, sum of A_i / ||A_i||
        self.entropy_sum: torch.Tensor | None = None  # H x N, sum of row entropies (nats)
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None  # last map and its entropies
        self.js_sum: torch.Tensor | None = None  # H, sum over consecutive pairs (nats)
        self.pairs = 0
        self.rank_n = 0  # images whose spectra were taken
        self.erank_sum: torch.Tensor | None = None  # H
        self.r90_sum: torch.Tensor | None = None  # H
        self.r99_sum: torch.Tensor | None = None  # H
        self.spectrum_sum: torch.Tensor | None = None  # H x N, sum of s / sum(s)
        self.tokens_n = 0
        self.redundancy_sum = 0.0
        self.examples: list[torch.Tensor] = []
        self.max_examples = examples

    @staticmethod
    def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        return value if total is None else total + value

    def add_maps(self, maps: torch.Tensor, rank_budget: float) -> None:
        """Fold in a batch of maps ``B x H x N x N`` (any dtype; statistics use float64)."""
        if len(self.examples) < self.max_examples:
            take = maps[: self.max_examples - len(self.examples)]
            self.examples.extend(m.detach().float().cpu().clone() for m in take)
        a = maps.double()
        b = a.shape[0]
        self.n += b
        self.map_sum = self._add(self.map_sum, a.sum(0))
        norms = a.flatten(2).norm(dim=-1).clamp_min(1e-300)[..., None, None]
        self.unit_sum = self._add(self.unit_sum, (a / norms).sum(0))
        ent = _entropy(a)  # B x H x N
        self.entropy_sum = self._add(self.entropy_sum, ent.sum(0))

        # Jensen-Shannon of consecutive images: pair the previous batch's last image with this
        # batch's first, and so on, so batch boundaries do not change the pairs.
        if self.prev is not None:
            p = torch.cat([self.prev[0][None], a[:-1]])
            hp = torch.cat([self.prev[1][None], ent[:-1]])
            q, hq = a, ent
        else:
            p, hp, q, hq = a[:-1], ent[:-1], a[1:], ent[1:]
        if p.shape[0]:
            js = (_entropy((p + q) / 2) - (hp + hq) / 2).clamp_min(0).mean(-1)  # pairs x H
            self.js_sum = self._add(self.js_sum, js.sum(0))
            self.pairs += p.shape[0]
        self.prev = (a[-1].clone(), ent[-1].clone())

        take = min(b, max(0, rank_budget - self.rank_n))
        if take:
            self._add_spectra(a[:take])

    def _add_spectra(self, a: torch.Tensor) -> None:
        s = torch.linalg.svdvals(a)  # B x H x N, descending
        p = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
        erank = torch.exp(-torch.xlogy(p, p).sum(-1))
        energy = s.square()
        cum = energy.cumsum(-1) / energy.sum(-1, keepdim=True).clamp_min(1e-300)
        # The smallest k with cum[k-1] >= q; the tolerance keeps rounding from adding a value.
        r90 = (cum < 0.9 - 1e-9).sum(-1) + 1
        r99 = (cum < 0.99 - 1e-9).sum(-1) + 1
        self.rank_n += a.shape[0]
        self.erank_sum = self._add(self.erank_sum, erank.sum(0))
        self.r90_sum = self._add(self.r90_sum, r90.double().sum(0))
        self.r99_sum = self._add(self.r99_sum, r99.double().sum(0))
        self.spectrum_sum = self._add(self.spectrum_sum, p.sum(0))

    def add_tokens(self, x: torch.Tensor, prefix: int) -> None:
        """Fold in the tokens entering the block, ``B x N x D``."""
        t = x[:, prefix:].double()
        m = t.shape[1]
        if m < 2:
            return
        u = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        total = u.sum(1).square().sum(-1)  # ||sum u||^2 per image
        self.redundancy_sum += float(((total - m) / (m * (m - 1))).sum())
        self.tokens_n += t.shape[0]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each distribution along the last axis; ``0 log 0 = 0``."""
    return -torch.xlogy(p, p).sum(-1)


# ----------------------------------------------------------------------------- capture
def _expected_images(images: Any, num_images: int | None) -> int | None:
    total = None
    if isinstance(images, torch.Tensor):
        total = images.shape[0]
    elif hasattr(images, "dataset") and hasattr(images.dataset, "__len__"):
        total = len(images.dataset)
    if total is None:
        return num_images
    return total if num_images is None else min(total, num_images)


def looks_untrained(model: nn.Module) -> bool:
    """True when every LayerNorm still has its initial weight 1 and bias 0.

    timm initialises norms that way and no training run leaves them there, so this catches a
    model created without weights. The attention of random weights is close to uniform in every
    layer, which would read as "every layer is static and low-rank".
    """
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None]
    if not norms:
        return False
    with torch.no_grad():
        return all(bool((m.weight == 1).all()) and (m.bias is None or bool((m.bias == 0).all()))
                   for m in norms)


def analyze(model: nn.Module, images: Any, *, num_images: int | None = None,
            batch_size: int = 32, rank_images: int | None = None, examples: int = 2,
            progress: bool = True) -> PatternReport:
    """Measure the attention patterns of ``model`` over ``images``.

    Args:
        model: a ViT of a supported host (:func:`hetvit.hosts.supported`), not a compressed
            one: analyse its source model.
        images: a ``B x C x H x W`` tensor (run in chunks of ``batch_size``), or an iterable of
            tensors or ``(images, labels)`` batches such as a DataLoader. Give the images in
            random order: the ``js`` estimate pairs consecutive images.
        num_images: stop after this many images (all of them by default).
        batch_size: chunk size when ``images`` is a tensor.
        rank_images: take the singular values of only the first this-many images' maps (all by
            default). SVDs dominate the cost on a CPU (DeiT-Small: 72 SVDs of 197 x 197 per
            image), and the rank metrics settle within a few hundred images.
        examples: how many single images' maps to keep for the plots.
        progress: show a progress bar.

    Every layer's maps come from its q and k (:func:`hetvit.capture.attention_maps`) in a
    forward-pre hook on its attention, so fused attention stays on; statistics are accumulated
    per batch and no map outlives its batch (bar ``examples``).
    """
    if is_compressed(model):
        raise AnalysisError("this model is already compressed: analyse its source model, whose "
                         "attention is still dynamic in every layer")
    if rank_images is not None and rank_images < 1:
        raise AnalysisError(f"rank_images must be at least 1, got {rank_images}")
    arch = describe(model)
    if looks_untrained(model):
        warnings.warn("the model looks untrained (every LayerNorm is at its initial value): "
                      "attention patterns of random weights mean nothing; load trained weights",
                      stacklevel=2)
    host = host_of(model)
    prefix = host.prefix_tokens(arch)
    blocks = host.layers(model)
    stats = [_LayerStats(examples) for _ in blocks]
    budget = math.inf if rank_images is None else rank_images
    limit = math.inf if num_images is None else num_images

    def add_tokens(i: int, x: torch.Tensor) -> None:
        stats[i].add_tokens(x, prefix)

    def add_maps(i: int, attn_map: torch.Tensor) -> None:
        stats[i].add_maps(attn_map, budget)

    param = next(model.parameters())
    seen = 0
    bar = _Progress(progress, _expected_images(images, num_images))
    with (module_inputs(blocks, add_tokens), attention_maps(model, range(len(blocks)), add_maps),
          eval_mode(model), torch.no_grad(), bar as advance):
        for x in image_batches(images, batch_size):
            if seen >= limit:
                break
            if seen + x.shape[0] > limit:
                x = x[: int(limit - seen)]
            if not x.shape[0]:
                continue
            host.features(model, x.to(device=param.device, dtype=param.dtype))
            seen += x.shape[0]
            advance(x.shape[0])
    if seen < 2:
        raise AnalysisError(f"need at least 2 images to compare attention across images, "
                            f"got {seen}")
    return PatternReport.from_stats(arch, stats, seen)


class _Progress:
    """A rich progress bar over images (or nothing), used as ``with ... as advance``."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.total = enabled, total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda n: None
        self.bar = Progress(TextColumn("analysing attention"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("images", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ----------------------------------------------------------------------------- the report
ARRAYS = ("similarity", "js", "static_kl", "effective_rank", "rank90", "rank99", "redundancy",
          "spectra")
"""The measurements a report holds and saves (the maps it keeps for the plots are not saved)."""


@dataclass(frozen=True, eq=False)
class PatternReport:
    """Attention patterns per layer (rows) and head (columns); see the module docstring.

    ``similarity``, ``js``, ``static_kl``, ``effective_rank``, ``rank90`` and ``rank99`` are
    ``layers x heads`` arrays, ``redundancy`` has one value per layer. ``mean_maps``
    (``layers x heads x N x N``), ``examples`` (``layers x images x heads x N x N``) and
    ``spectra`` (``layers x heads x N``, mean of ``s / sum(s)``) feed the plots; the maps are
    not saved, so a report loaded from ``patterns.json`` has none.

    The report is measurement only: :func:`hetvit.recommend.recommend` reads a plan from it
    and :mod:`hetvit.render` draws it, so it holds for any plan read from it.
    """

    arch: dict[str, Any]
    num_images: int
    rank_images: int
    similarity: np.ndarray
    js: np.ndarray
    static_kl: np.ndarray
    effective_rank: np.ndarray
    rank90: np.ndarray
    rank99: np.ndarray
    redundancy: np.ndarray
    spectra: np.ndarray
    mean_maps: np.ndarray | None = None
    examples: np.ndarray | None = None

    def __post_init__(self) -> None:
        layers_heads = np.shape(self.similarity)
        if len(layers_heads) != 2:
            raise AnalysisError(f"similarity must be layers x heads, got shape {layers_heads}")
        for name in ("js", "static_kl", "effective_rank", "rank90", "rank99"):
            if np.shape(getattr(self, name)) != layers_heads:
                raise AnalysisError(f"{name} has shape {np.shape(getattr(self, name))}, not "
                                 f"similarity's {layers_heads} (layers x heads)")
        if np.shape(self.redundancy) != layers_heads[:1]:
            raise AnalysisError(f"redundancy must have one value per layer ({layers_heads[0]}), "
                             f"got shape {np.shape(self.redundancy)}")
        if np.ndim(self.spectra) != 3 or np.shape(self.spectra)[:2] != layers_heads:
            raise AnalysisError(f"spectra must be layers x heads x N, got shape "
                             f"{np.shape(self.spectra)}")

    @classmethod
    def from_stats(cls, arch: dict[str, Any], stats: list[_LayerStats], n: int) -> PatternReport:
        def per_layer(fn: Any) -> np.ndarray:
            return np.stack([fn(s) for s in stats])

        def mean_entropy_gap(s: _LayerStats) -> np.ndarray:
            mean_map = s.map_sum / s.n
            return ((_entropy(mean_map) - s.entropy_sum / s.n).clamp_min(0).mean(-1)).cpu().numpy()

        def cosine(s: _LayerStats) -> np.ndarray:
            total = s.unit_sum.flatten(1).square().sum(-1)
            return ((total - s.n) / (s.n * (s.n - 1))).cpu().numpy()

        return cls(
            arch=arch,
            num_images=n,
            rank_images=stats[0].rank_n,
            similarity=per_layer(cosine),
            js=per_layer(lambda s: (s.js_sum / s.pairs / math.log(2)).cpu().numpy()),
            static_kl=per_layer(mean_entropy_gap),
            effective_rank=per_layer(lambda s: _rank_frac(s.erank_sum, s)),
            rank90=per_layer(lambda s: _rank_frac(s.r90_sum, s)),
            rank99=per_layer(lambda s: _rank_frac(s.r99_sum, s)),
            redundancy=np.array([s.redundancy_sum / max(1, s.tokens_n) for s in stats]),
            spectra=per_layer(lambda s: (s.spectrum_sum / s.rank_n).float().cpu().numpy()),
            mean_maps=per_layer(lambda s: (s.map_sum / s.n).float().cpu().numpy()),
            examples=(per_layer(lambda s: torch.stack(s.examples).numpy())
                      if stats[0].examples else None),
        )

    # ----------------------------------------------------------------- shape
    @property
    def depth(self) -> int:
        return self.similarity.shape[0]

    @property
    def num_heads(self) -> int:
        return self.similarity.shape[1]

    @property
    def num_tokens(self) -> int:
        """``N``: the tokens of every map, prefix tokens included."""
        return self.spectra.shape[-1]

    # ----------------------------------------------------------------- (de)serialisation
    def summary(self) -> list[dict[str, float]]:
        """One row per layer: means over heads, and the worst head where the plan uses it."""
        rows = []
        for i in range(self.depth):
            rows.append({
                "layer": i,
                "similarity": float(self.similarity[i].mean()),
                "similarity_min": float(self.similarity[i].min()),
                "js": float(self.js[i].mean()),
                "static_kl": float(self.static_kl[i].mean()),
                "effective_rank": float(self.effective_rank[i].mean()),
                "rank90": float(self.rank90[i].mean()),
                "rank90_max": float(self.rank90[i].max()),
                "rank99": float(self.rank99[i].mean()),
                "redundancy": float(self.redundancy[i]),
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The measurements as JSON-ready data (rounded to 6 decimals), with their definitions
        and a per-layer summary; the maps are left out."""
        def arr(a: np.ndarray) -> Any:
            return np.round(a.astype(np.float64), 6).tolist()

        return {
            "format": 1,
            "arch": self.arch,
            "num_images": self.num_images,
            "rank_images": self.rank_images,
            "num_tokens": self.num_tokens,
            "definitions": DEFINITIONS,
            "summary": self.summary(),
            **{name: arr(getattr(self, name)) for name in ARRAYS},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PatternReport:
        """A report from :meth:`to_dict`'s data (other keys, such as a plan, are ignored)."""
        missing = [k for k in ("arch", "num_images", "rank_images", *ARRAYS) if k not in d]
        if missing:
            raise AnalysisError(f"not a pattern report: missing {', '.join(missing)}")
        return cls(arch=d["arch"], num_images=d["num_images"], rank_images=d["rank_images"],
                   **{k: np.asarray(d[k], dtype=np.float64) for k in ARRAYS})

    def save_json(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write :meth:`to_dict`, then ``extra`` (a plan, its explanation ...), to ``path``.

        Written through a temporary renamed into place, so a reader never sees half a file.
        """
        return atomic_write_text(path, json.dumps({**self.to_dict(), **extra}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatternReport:
        """A report from ``patterns.json`` (or the directory holding it), without the maps."""
        p = Path(path)
        if p.is_dir():
            p = p / "patterns.json"
        if not p.is_file():
            raise FileNotFoundError(f"no patterns.json at {path}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise AnalysisError(f"{p} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise AnalysisError(f"{p}: {e}") from None


def _rank_frac(total: torch.Tensor | None, s: _LayerStats) -> np.ndarray:
    n_tokens = s.map_sum.shape[-1]
    return (total / s.rank_n / n_tokens).cpu().numpy()
