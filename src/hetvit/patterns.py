"""Attention-pattern analysis: how alike and how low-rank each layer's attention is.

The method rests on two measurable claims (see DESIGN.md): early layers attend alike for every
image (so a static map can replace them, DGSSA) and late layers have low-rank attention (so their
tokens can be aggregated, GLAD). :func:`analyze` measures both per layer and head over a stream of
images, and :meth:`PatternReport.recommend` turns the measurements into a :class:`~hetvit.Plan`.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .batches import image_batches
from .capture import attention_maps, module_inputs
from .files import atomic_directory
from .flops import formula_macs
from .grid import pool_grid, token_grid
from .hosts import describe, host_of
from .modes import eval_mode
from .plan import Plan
from .surgery import is_compressed

__all__ = ["analyze", "PatternReport", "token_ladder"]

RANK_METRICS = ("rank90", "rank99", "effective_rank")
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
        model: a timm ``VisionTransformer`` (not a compressed one: analyse its source model).
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
        raise ValueError("this model is already compressed: analyse its source model, whose "
                         "attention is still dynamic in every layer")
    if rank_images is not None and rank_images < 1:
        raise ValueError(f"rank_images must be at least 1, got {rank_images}")
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
        raise ValueError(f"need at least 2 images to compare attention across images, got {seen}")
    return PatternReport.from_stats(arch, stats, seen)


class _Progress:
    """A rich progress bar over images (or nothing), used as ``with ... as advance``."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.total = enabled, total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("analysing attention"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("images", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ----------------------------------------------------------------------------- token ladder
PYRAMID_GAP = 2  # fewest layers between two recommended stages (the presets use 2-3)


def token_ladder(grid: tuple[int, int]) -> list[int]:
    """Patch-token counts a pyramid may use, largest first, each a regular grid.

    The full grid, then half along one axis, then about 1/4, 1/8 and 1/16 of the tokens with
    the grid's aspect (14x14: 196, 98 (14x7), 49 (7x7), 25 (5x5), 16 (4x4)), as the presets do,
    so aggregation pools regular windows.
    """
    h, w = grid
    sizes = [h * w, h * math.ceil(w / 2)]
    for keep in (1 / 4, 1 / 8, 1 / 16):
        sizes.append(max(1, round(h * math.sqrt(keep))) * max(1, round(w * math.sqrt(keep))))
    ladder: list[int] = []
    for m in sizes:
        if (not ladder or m < ladder[-1]) and (m == h * w or pool_grid(grid, m) is not None):
            ladder.append(m)
    return ladder


# ----------------------------------------------------------------------------- the report
@dataclass
class PatternReport:
    """Attention patterns per layer (rows) and head (columns); see the module docstring.

    ``similarity``, ``js``, ``static_kl``, ``effective_rank``, ``rank90`` and ``rank99`` are
    ``layers x heads`` arrays, ``redundancy`` has one value per layer. ``mean_maps``
    (``layers x heads x N x N``), ``examples`` (``layers x images x heads x N x N``) and
    ``spectra`` (``layers x heads x N``, mean of ``s / sum(s)``) feed the plots; the maps are
    not saved, so a report loaded from ``patterns.json`` has none.
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
    recommendation: dict[str, Any] | None = field(default=None, repr=False)

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

    # ----------------------------------------------------------------- recommend
    def recommend(self, speedup: float | None = None, max_static: int | None = None, *,
                  similarity: float = 0.9, rank: str = "rank90", margin: float = 1.0) -> Plan:
        """A plan from the measured patterns; :attr:`recommendation` and :meth:`explain` say why.

        **Static layers** are the leading run of layers, from layer 0, whose worst head has
        ``similarity >= similarity`` (capped at ``max_static``). The worst head decides because a
        static layer drops q and k for all its heads. The run stops at the first layer that
        fails: a layer after it is not made static even if it passes, because

        - each layer was measured with every earlier layer dynamic. In a leading run the earlier
          layers are themselves nearly image-independent, so making them static changes the
          later ones' inputs little and the measurement still holds; behind a dynamic layer it
          need not.
        - a deep layer can pass for a shallow reason: most of its mass on the cls token or a
          few sink tokens, identical for every image, while what depends on the image hides in
          small entries that cosine similarity hardly weighs. Such layers are the low-rank ones
          the pyramid is for.
        - pyramid stages come after the static layers (below), so static maps keep the token
          count they were measured with; a static layer past a stage would need a map that was
          never measured.
        - one boundary is one knob (``max_static``) with a monotone cost/accuracy trade-off.

        **Pyramid stages** come after the static run (stage layers ``>= max(1, static count)``),
        so every static map keeps the token count it was measured with. The worst head's
        ``rank`` (``"rank90"``, ``"rank99"`` or ``"effective_rank"``, a fraction of ``N``)
        says how many tokens a layer needs. Aggregation before layer ``l`` serves every later
        layer too, so layer ``l`` needs the most any layer from ``l`` on needs. From the first
        stage layer on, each layer runs on the smallest :func:`token_ladder` size ``M`` with
        ``M >= margin * need(l) * N_patches``, and a stage goes wherever that size drops, but
        as a pyramid: one step of the ladder per stage (at most about halving the tokens) and
        stages at least :data:`PYRAMID_GAP` layers apart. A rank measures what a layer's
        attention mixes, not what the tokens carry through the residual stream, so one deep
        cut at the first low-rank layer would throw away what later layers still need.

        **A speed target** (``speedup``: baseline GMACs / plan GMACs, from
        :func:`hetvit.flops.formula_macs`) keeps the static layers as found and tunes
        ``margin``: the largest margin (the most tokens kept) that reaches the target wins. If
        none does, the fastest plan is returned with a warning. The ladder moves in whole steps,
        so that plan can overshoot the target by a lot (2.7x for 2.4x asked); its stages are then
        moved to later layers, one layer at a time, for as long as the target still holds. A
        later stage only gives layers more tokens than their rank needs, never fewer.
        """
        if rank not in RANK_METRICS:
            raise ValueError(f"rank must be one of {RANK_METRICS}, got {rank!r}")
        if speedup is not None and speedup <= 0:
            raise ValueError(f"speedup must be positive, got {speedup}")
        if max_static is not None and max_static < 0:
            raise ValueError(f"max_static must be >= 0, got {max_static}")
        worst_sim = self.similarity.min(axis=1)
        passed = [i for i in range(self.depth) if worst_sim[i] >= similarity]
        run = 0
        while run < self.depth and worst_sim[run] >= similarity:
            run += 1
        n_static = run if max_static is None else min(run, max_static)
        need = np.maximum.accumulate(getattr(self, rank).max(axis=1)[::-1])[::-1]

        base = formula_macs(self.arch)
        if speedup is None:
            chosen = margin
            plan = undelayed = self._plan(n_static, need, margin)
        else:
            candidates = [math.inf, *np.geomspace(16, 1 / 64, 97).tolist()]
            plans = [(m, self._plan(n_static, need, m)) for m in candidates]
            fits = [(m, p) for m, p in plans if base / formula_macs(self.arch, p) >= speedup]
            chosen, undelayed = fits[0] if fits else plans[-1]
            plan = self._delay(undelayed, base, speedup) if fits else undelayed
        macs = formula_macs(self.arch, plan)
        reached = None if speedup is None else base / macs >= speedup - 1e-9
        self.recommendation = {
            "plan": plan.to_dict(),
            "similarity_threshold": similarity,
            "worst_head_similarity": worst_sim.tolist(),
            "passed_similarity": passed,
            "leading_run": run,
            "max_static": max_static,
            "static": list(plan.static),
            "rank_metric": rank,
            "worst_head_rank": getattr(self, rank).max(axis=1).tolist(),
            "rank_need": need.tolist(),
            "margin": None if math.isinf(chosen) else chosen,
            "pyramid_before_delay": [list(stage) for stage in undelayed.pyramid],
            "first_stage_layer": max(1, n_static),
            "gmacs_baseline": base / 1e9,
            "gmacs_plan": macs / 1e9,
            "speedup": base / macs,
            "target_speedup": speedup,
            "target_reached": reached,
        }
        if reached is False:
            warnings.warn(f"a {speedup:.2f}x GMAC speedup is out of reach of the measured "
                          f"patterns: the fastest plan gives {base / macs:.2f}x with {n_static} "
                          f"static layers (lower `similarity` to allow more, or use a preset)",
                          stacklevel=2)
        return plan

    def _delay(self, plan: Plan, base: float, speedup: float) -> Plan:
        """``plan`` with its stages moved as late as the target allows (see :meth:`recommend`).

        Each step tries moving every stage one layer later (the last one past the end drops
        it; stages keep :data:`PYRAMID_GAP` apart) and takes the move that keeps the most GMACs
        while the speedup stays ``>= speedup``; it stops when no move does.
        """
        while True:
            stages = list(plan.pyramid)
            moves = []
            for i, (at, m) in enumerate(stages):
                if i + 1 < len(stages) and stages[i + 1][0] - (at + 1) < PYRAMID_GAP:
                    continue
                later = stages[:i] + ([(at + 1, m)] if at + 1 < self.depth else []) + stages[i + 1:]
                moved = replace(plan, pyramid=tuple(later))
                gain = base / formula_macs(self.arch, moved)
                if gain >= speedup:
                    moves.append((gain, moved))
            if not moves:
                return plan
            plan = min(moves, key=lambda move: move[0])[1]

    def _plan(self, n_static: int, need: np.ndarray, margin: float) -> Plan:
        grid = token_grid(self.arch)
        ladder = token_ladder(grid)
        n_patches = ladder[0]
        stages: list[tuple[int, int]] = []
        cur = n_patches
        last = -PYRAMID_GAP
        for layer in range(max(1, n_static), self.depth):
            want = margin * need[layer] * n_patches
            m = min((s for s in ladder if s >= want), default=n_patches)
            if m < cur and layer - last >= PYRAMID_GAP:
                m = max(m, ladder[ladder.index(cur) + 1])  # one step of the ladder at a time
                stages.append((layer, m))
                cur, last = m, layer
        return Plan(static=tuple(range(n_static)), pyramid=tuple(stages),
                    img_size=tuple(self.arch["img_size"]), source={"name": self.arch.get("name")},
                    label="recommended")

    # ----------------------------------------------------------------- explain
    def explain(self, plan: Plan | None = None) -> str:
        """Why each layer of ``plan`` (default: the last recommendation) is what it is.

        Works for any plan, a preset included: it shows each layer's worst-head similarity
        against the threshold, its rank need against the tokens the plan gives it, and the
        plan's predicted GMACs against the baseline.
        """
        rec = self.recommendation or {}
        if plan is None:
            if not rec:
                plan = self.recommend()
                rec = self.recommendation or {}
            else:
                plan = Plan.from_dict(rec["plan"])
        threshold = rec.get("similarity_threshold", 0.9)
        rank = rec.get("rank_metric", "rank90")
        worst_sim = self.similarity.min(axis=1)
        worst_rank = getattr(self, rank).max(axis=1)
        need = np.maximum.accumulate(worst_rank[::-1])[::-1]
        n_patches = token_grid(self.arch)[0] * token_grid(self.arch)[1]
        lines = [f"plan: {plan.describe()}",
                 f"static rule: worst-head cosine similarity >= {threshold:.3f}, leading run "
                 f"from layer 0; pyramid rule: tokens kept >= margin x worst-head {rank} of "
                 f"this and every later layer (fractions of N = {self.num_tokens}), one grid "
                 f"step per stage, stages >= {PYRAMID_GAP} layers apart"]
        if rec.get("plan") == plan.to_dict():
            m = rec["margin"]
            lines.append(f"recommended with {rec['leading_run']} leading layers passing the "
                         f"similarity threshold (max_static={rec['max_static']}), margin "
                         f"{'inf (no pyramid)' if m is None else f'{m:.3g}'}"
                         + (f", target {rec['target_speedup']:.2f}x "
                            f"{'reached' if rec['target_reached'] else 'NOT reached'}"
                            if rec["target_speedup"] is not None else ""))
            before = [tuple(stage) for stage in rec.get("pyramid_before_delay", plan.pyramid)]
            if before != list(plan.pyramid):
                lines.append("stages moved later to come closer to the target: "
                             + " ".join(f"{at}:{m}" for at, m in before) + " -> "
                             + " ".join(f"{at}:{m}" for at, m in plan.pyramid))
        lines.append(f"{'layer':>5}  {'sim(min)':>8}  {'pass':>4}  {rank + '(max)':>14}  "
                     f"{'need':>6}  {'kept':>6}  role")
        stages = dict(plan.pyramid)
        for layer in range(self.depth):
            kept = plan.tokens_before(layer, n_patches) / n_patches
            role = "static" if layer in plan.static else "dynamic"
            if layer in stages:
                role += f", stage -> {stages[layer]} tokens"
            ok = "yes" if worst_sim[layer] >= threshold else "no"
            warn = "  (kept < need)" if kept + 1e-9 < need[layer] else ""
            lines.append(f"{layer:>5}  {worst_sim[layer]:>8.4f}  {ok:>4}  "
                         f"{worst_rank[layer]:>14.4f}  {need[layer]:>6.3f}  {kept:>6.3f}  "
                         f"{role}{warn}")
        base = formula_macs(self.arch)
        macs = formula_macs(self.arch, plan)
        lines.append(f"GMACs: baseline {base / 1e9:.4f}, plan {macs / 1e9:.4f} "
                     f"({base / macs:.2f}x)")
        return "\n".join(lines)

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
            "similarity": arr(self.similarity),
            "js": arr(self.js),
            "static_kl": arr(self.static_kl),
            "effective_rank": arr(self.effective_rank),
            "rank90": arr(self.rank90),
            "rank99": arr(self.rank99),
            "redundancy": arr(self.redundancy),
            "spectra": arr(self.spectra),
            "recommendation": self.recommendation,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatternReport:
        """A report from ``patterns.json`` (or the directory holding it), without the maps."""
        p = Path(path)
        if p.is_dir():
            p = p / "patterns.json"
        if not p.is_file():
            raise FileNotFoundError(f"no patterns.json at {path}")
        d = json.loads(p.read_text())
        a = {k: np.asarray(d[k], dtype=np.float64) for k in
             ("similarity", "js", "static_kl", "effective_rank", "rank90", "rank99",
              "redundancy", "spectra")}
        return cls(arch=d["arch"], num_images=d["num_images"], rank_images=d["rank_images"],
                   recommendation=d.get("recommendation"), **a)

    def save(self, directory: str | os.PathLike, plan: Plan | None = None) -> Path:
        """Write ``patterns.json``, ``patterns.md`` and the plots to ``directory``, atomically.

        Everything goes to a temporary directory beside it that is renamed into place, so a
        reader never sees half a report; an earlier report at ``directory`` is replaced, a
        folder of other files is refused. The plan shown is ``plan``, else the last
        recommendation, else :meth:`recommend`'s default.
        """
        directory = Path(directory)
        if plan is None:
            plan = (Plan.from_dict(self.recommendation["plan"]) if self.recommendation
                    else self.recommend())
        explanation = self.explain(plan)
        with atomic_directory(directory, "patterns.json") as tmp:
            data = self.to_dict()
            data["plan"] = plan.to_dict()
            data["explanation"] = explanation
            (tmp / "patterns.json").write_text(json.dumps(data, indent=1) + "\n")
            plots = _plots(self, tmp)
            (tmp / "patterns.md").write_text(self._markdown(plan, explanation, plots))
        return directory

    def _markdown(self, plan: Plan, explanation: str, plots: list[str]) -> str:
        name = self.arch.get("name") or "ViT"
        out = [f"# Attention patterns: {name}", "",
               f"{self.num_images} images ({self.rank_images} for the rank metrics), "
               f"{self.depth} layers x {self.num_heads} heads, N = {self.num_tokens} tokens.", "",
               "| layer | similarity (mean / min head) | JS (bits) | static KL (nats) | "
               "eff. rank | rank90 (mean / max head) | rank99 | redundancy |",
               "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.summary():
            out.append(f"| {r['layer']} | {r['similarity']:.3f} / {r['similarity_min']:.3f} | "
                       f"{r['js']:.4f} | {r['static_kl']:.4f} | {r['effective_rank']:.3f} | "
                       f"{r['rank90']:.3f} / {r['rank90_max']:.3f} | {r['rank99']:.3f} | "
                       f"{r['redundancy']:.3f} |")
        out += ["", "## Recommended plan", "", "```json", plan.to_json(), "```", "", "```",
                explanation, "```", "", "## Definitions", ""]
        out += [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
        return "\n".join(out) + "\n"


def _rank_frac(total: torch.Tensor | None, s: _LayerStats) -> np.ndarray:
    n_tokens = s.map_sum.shape[-1]
    return (total / s.rank_n / n_tokens).cpu().numpy()


# ----------------------------------------------------------------------------- plots
def _plots(report: PatternReport, directory: Path) -> list[str]:
    """Write the PNG plots; returns their file names.

    Uses matplotlib's object API with the Agg canvas, so no global backend is switched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    written: list[str] = []
    layers = np.arange(report.depth)

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.savefig(directory / name, dpi=100)
        written.append(name)

    def band(ax: Any, values: np.ndarray, label: str) -> None:
        ax.plot(layers, values.mean(1), marker="o", label=f"{label} (mean over heads)")
        ax.fill_between(layers, values.min(1), values.max(1), alpha=0.2)

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    band(ax1, report.similarity, "cosine similarity")
    ax1.set(xlabel="layer", ylabel="cross-image cosine similarity", title="similarity per layer")
    band(ax2, report.js, "JS divergence (bits)")
    band(ax2, report.static_kl, "KL to mean map (nats)")
    ax2.set(xlabel="layer", ylabel="divergence", title="divergence between images")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save(fig, "similarity.png")

    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    band(ax, report.effective_rank, "effective rank")
    band(ax, report.rank90, "rank90")
    band(ax, report.rank99, "rank99")
    ax.plot(layers, report.redundancy, marker="s", ls="--", label="token redundancy")
    ax.set(xlabel="layer", ylabel="fraction of N", title="rank per layer (band: spread of heads)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save(fig, "rank.png")

    metrics = [("similarity", report.similarity), ("js (bits)", report.js),
               ("effective rank / N", report.effective_rank), ("rank90 / N", report.rank90)]
    fig = Figure(figsize=(4 * len(metrics), 0.35 * report.depth + 2), layout="constrained")
    for ax, (title, values) in zip(fig.subplots(1, len(metrics)), metrics, strict=True):
        im = ax.imshow(values, aspect="auto", cmap="viridis")
        ax.set(xlabel="head", ylabel="layer", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax)
    save(fig, "heatmaps.png")

    if report.mean_maps is not None and report.examples is not None:
        shown = sorted({*range(min(3, report.depth)), report.depth - 1})
        n_ex = report.examples.shape[1]
        fig = Figure(figsize=(3 * (1 + n_ex), 3 * len(shown)), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(shown), 1 + n_ex))
        for row, layer in zip(axes, shown, strict=True):
            maps = [report.mean_maps[layer].mean(0)] + [e.mean(0) for e in
                                                        report.examples[layer]]
            vmax = float(np.percentile(np.stack(maps), 99.5))
            for j, (ax, m) in enumerate(zip(row, maps, strict=True)):
                ax.imshow(m, cmap="magma", vmin=0, vmax=vmax)
                ax.set_xticks([])
                ax.set_yticks([])
                what = "mean over images" if j == 0 else f"image {j}"
                ax.set_title(f"layer {layer}: {what}", fontsize=9)
        fig.suptitle("attention maps (averaged over heads; rows query, columns key)")
        save(fig, "maps.png")

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    picks = [0, report.depth - 1] if report.depth > 1 else [0]
    for ax, layer in zip(np.atleast_1d(fig.subplots(1, len(picks))), picks, strict=True):
        k = np.arange(1, report.num_tokens + 1)
        for h in range(report.num_heads):
            ax.semilogy(k, np.maximum(report.spectra[layer, h], 1e-12), label=f"head {h}")
        ax.set(xlabel="singular value index", ylabel="s_k / sum(s)",
               title=f"layer {layer} spectrum (mean over images)")
        ax.grid(alpha=0.3)
        if report.num_heads <= 12:
            ax.legend(fontsize=6)
    save(fig, "spectra.png")
    return written

