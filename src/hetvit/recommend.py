"""The plan policy: from measured attention patterns to a :class:`~hetvit.Plan`, with reasons.

:func:`recommend` reads a :class:`~hetvit.patterns.PatternReport` and returns a
:class:`Recommendation`: the plan, and for every layer the measurements it was chosen on and
why the layer is static or dynamic and why a stage sits before it, so that the choice can be
checked against the numbers (``print(recommendation)``). The policy lives apart from the
measurement because it is one reading of the numbers among several: the report stays valid for
any other plan, and :func:`explain_plan` holds any plan (a preset, say) against it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import AnalysisError
from .flops import formula_macs
from .grid import pool_grid, token_grid
from .patterns import PatternReport
from .plan import Plan

__all__ = ["recommend", "Recommendation", "LayerChoice", "explain_plan", "token_ladder",
           "check_settings", "PYRAMID_GAP", "RANK_METRICS"]

PYRAMID_GAP = 2  # fewest layers between two recommended stages (the presets use 2-3)
RANK_METRICS = ("rank90", "rank99", "effective_rank")


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


# ----------------------------------------------------------------------------- the value
@dataclass(frozen=True)
class LayerChoice:
    """What a plan does at one layer, the measurements that decided it, and why.

    Attributes:
        layer: the block index.
        similarity: the worst head's cross-image cosine similarity (a static layer drops q
            and k for all its heads, so the worst one decides).
        passes: ``similarity`` reaches the threshold.
        static: the plan makes the layer static.
        rank: the worst head's rank metric, a fraction of ``N``.
        need: the largest ``rank`` of this and every later layer: tokens aggregated away
            before this layer are gone for all of them.
        kept: the fraction of patch tokens the plan runs this layer on.
        stage: the patch tokens left by a stage placed right before this layer, if any.
        reason: why the layer is static or dynamic and, with a stage, why the stage is here
            (empty when the plan was not chosen by :func:`recommend`).
    """

    layer: int
    similarity: float
    passes: bool
    static: bool
    rank: float
    need: float
    kept: float
    stage: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class Recommendation:
    """A plan recommended from measured patterns, with what it was chosen on and why.

    Attributes:
        plan: the recommended plan (label ``"recommended"``).
        layers: one :class:`LayerChoice` per layer, in order.
        similarity_threshold: worst-head similarity a static layer needs.
        rank_metric: the rank that says how many tokens a layer needs (see
            :data:`RANK_METRICS`).
        num_tokens: ``N``, the tokens of every measured map, prefix tokens included.
        leading_run: the layers from layer 0 on that pass the threshold, before ``max_static``.
        max_static: the cap on static layers asked for (``None``: none).
        margin: tokens kept per unit of rank need (``None``: infinite, so no pyramid).
        pyramid_before_delay: the stages before they were moved later towards the target.
        macs_baseline: MACs per image of the model without the plan.
        macs_plan: MACs per image under the plan.
        target_speedup: the GMAC speedup asked for (``None``: none asked).
        target_reached: whether the plan reaches it (``None`` without a target).
    """

    plan: Plan
    layers: tuple[LayerChoice, ...]
    similarity_threshold: float
    rank_metric: str
    num_tokens: int
    leading_run: int
    max_static: int | None
    margin: float | None
    pyramid_before_delay: tuple[tuple[int, int], ...]
    macs_baseline: float
    macs_plan: float
    target_speedup: float | None = None
    target_reached: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "pyramid_before_delay",
                           tuple((int(at), int(m)) for at, m in self.pyramid_before_delay))
        if self.rank_metric not in RANK_METRICS:
            raise AnalysisError(f"rank_metric must be one of {RANK_METRICS}, got "
                             f"{self.rank_metric!r}")
        if [c.layer for c in self.layers] != list(range(len(self.layers))):
            raise AnalysisError("a recommendation needs one LayerChoice per layer, in order")
        if tuple(c.layer for c in self.layers if c.static) != self.plan.static:
            raise AnalysisError(f"the layers marked static do not match the plan's static "
                             f"{list(self.plan.static)}")
        stages = tuple((c.layer, c.stage) for c in self.layers if c.stage is not None)
        if stages != self.plan.pyramid:
            raise AnalysisError(f"the layers' stages do not match the plan's pyramid "
                             f"{[list(s) for s in self.plan.pyramid]}")
        if (self.target_speedup is None) != (self.target_reached is None):
            raise AnalysisError("target_reached is given exactly when target_speedup is")

    # ----------------------------------------------------------------- derived
    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def passed_similarity(self) -> list[int]:
        """Every layer whose worst head passes the threshold, in the run or not."""
        return [c.layer for c in self.layers if c.passes]

    @property
    def first_stage_layer(self) -> int:
        """The earliest layer a stage may sit before: stages come after the static run."""
        return max(1, len(self.plan.static))

    @property
    def speedup(self) -> float:
        """Baseline MACs over the plan's MACs."""
        return self.macs_baseline / self.macs_plan

    # ----------------------------------------------------------------- text
    def explain(self) -> str:
        """The plan, the rules, a table of each layer's numbers and role, why each layer is
        what it is, and the GMACs against the baseline."""
        m = self.margin
        notes = [f"recommended with {self.leading_run} leading layers passing the similarity "
                 f"threshold (max_static={self.max_static}), margin "
                 f"{'inf (no pyramid)' if m is None else f'{m:.3g}'}"
                 + (f", target {self.target_speedup:.2f}x "
                    f"{'reached' if self.target_reached else 'NOT reached'}"
                    if self.target_speedup is not None else "")]
        if self.pyramid_before_delay != self.plan.pyramid:
            notes.append("stages moved later to come closer to the target: "
                         + " ".join(f"{at}:{m}" for at, m in self.pyramid_before_delay) + " -> "
                         + " ".join(f"{at}:{m}" for at, m in self.plan.pyramid))
        return _text(self.plan, self.layers, self.similarity_threshold, self.rank_metric,
                     self.num_tokens, self.macs_baseline, self.macs_plan, notes)

    def __str__(self) -> str:
        return self.explain()

    def to_dict(self) -> dict[str, Any]:
        """The recommendation as JSON-ready data (the ``recommendation`` of patterns.json)."""
        return {
            "plan": self.plan.to_dict(),
            "similarity_threshold": self.similarity_threshold,
            "worst_head_similarity": [c.similarity for c in self.layers],
            "passed_similarity": self.passed_similarity,
            "leading_run": self.leading_run,
            "max_static": self.max_static,
            "static": list(self.plan.static),
            "rank_metric": self.rank_metric,
            "worst_head_rank": [c.rank for c in self.layers],
            "rank_need": [c.need for c in self.layers],
            "margin": self.margin,
            "pyramid_before_delay": [list(stage) for stage in self.pyramid_before_delay],
            "first_stage_layer": self.first_stage_layer,
            "gmacs_baseline": self.macs_baseline / 1e9,
            "gmacs_plan": self.macs_plan / 1e9,
            "speedup": self.speedup,
            "target_speedup": self.target_speedup,
            "target_reached": self.target_reached,
        }


# ----------------------------------------------------------------------------- the policy
def check_settings(speedup: float | None = None, max_static: int | None = None,
                   similarity: float = 0.9, rank: str = "rank90", *,
                   names: Mapping[str, str] | None = None) -> None:
    """Refuse settings :func:`recommend` cannot use, naming each as the caller spells it.

    :func:`recommend` checks its arguments here; a caller that gets them from a user checks
    them first, before the measurement they would otherwise spoil only at its end (``hetvit
    analyze`` passes ``names={"speedup": "--recommend-speedup", ...}`` so the error names its
    flag). Unnamed settings keep their parameter names.

    ``similarity`` must lie in ``(0, 1]``: attention maps are non-negative, so their cosine
    similarity is at least 0, and a threshold of 0 or less would make every layer static; one
    above 1 no layer can reach (``max_static=0`` says that plainly). NaN, which fails every
    comparison, is refused too.
    """
    def name(key: str) -> str:
        return (names or {}).get(key, key)

    if rank not in RANK_METRICS:
        raise AnalysisError(f"{name('rank')} must be one of {RANK_METRICS}, got {rank!r}")
    if speedup is not None and not speedup > 0:
        raise AnalysisError(f"{name('speedup')} must be positive, got {speedup}")
    if max_static is not None and max_static < 0:
        raise AnalysisError(f"{name('max_static')} must be >= 0, got {max_static}")
    if not 0 < similarity <= 1:
        raise AnalysisError(f"{name('similarity')} must be in (0, 1], got {similarity}")


def recommend(report: PatternReport, speedup: float | None = None,
              max_static: int | None = None, *, similarity: float = 0.9, rank: str = "rank90",
              margin: float = 1.0) -> Recommendation:
    """A plan from the measured patterns, with the reasons for every layer.

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
    check_settings(speedup, max_static, similarity, rank)
    arch = report.arch
    worst_sim = report.similarity.min(axis=1)
    run = 0
    while run < report.depth and worst_sim[run] >= similarity:
        run += 1
    n_static = run if max_static is None else min(run, max_static)
    need = _need(report, rank)

    base = formula_macs(arch)
    if speedup is None:
        chosen = margin
        undelayed, why_stage = _pyramid(report, n_static, need, margin, rank)
        plan = undelayed
    else:
        candidates = [math.inf, *np.geomspace(16, 1 / 64, 97).tolist()]
        plans = [(m, *_pyramid(report, n_static, need, m, rank)) for m in candidates]
        fits = [row for row in plans if base / formula_macs(arch, row[1]) >= speedup]
        chosen, undelayed, why_stage = fits[0] if fits else plans[-1]
        plan = _delay(report, undelayed, base, speedup) if fits else undelayed
    macs = formula_macs(arch, plan)
    reached = None if speedup is None else base / macs >= speedup - 1e-9

    moved_from = {m: at for at, m in undelayed.pyramid}  # a delayed stage keeps its size
    layers = []
    for c in _assess(report, plan, similarity, rank):
        why = [_why_role(c, similarity, run, max_static)]
        if c.stage is not None:
            at = moved_from[c.stage]
            if at == c.layer:
                why.append(f"stage -> {c.stage} tokens: {why_stage[at]}")
            else:
                why.append(f"stage -> {c.stage} tokens, moved later from layer {at}, where "
                           f"{why_stage[at]}; the {speedup:.2f}x target still holds with more "
                           f"tokens kept")
        layers.append(replace(c, reason="; ".join(why)))
    if reached is False:
        warnings.warn(f"a {speedup:.2f}x GMAC speedup is out of reach of the measured "
                      f"patterns: the fastest plan gives {base / macs:.2f}x with {n_static} "
                      f"static layers (lower `similarity` to allow more, or use a preset)",
                      stacklevel=2)
    return Recommendation(
        plan=plan, layers=tuple(layers), similarity_threshold=similarity, rank_metric=rank,
        num_tokens=report.num_tokens, leading_run=run, max_static=max_static,
        margin=None if math.isinf(chosen) else chosen,
        pyramid_before_delay=undelayed.pyramid, macs_baseline=base, macs_plan=macs,
        target_speedup=speedup, target_reached=reached)


def explain_plan(report: PatternReport, plan: Plan, *, similarity: float = 0.9,
                 rank: str = "rank90") -> str:
    """How any ``plan`` (a preset, say) fits the measured patterns.

    Each layer's worst-head similarity against ``similarity``, its rank need against the
    tokens the plan gives it (flagged where it keeps fewer), and the plan's GMACs against the
    baseline; :meth:`Recommendation.explain` adds why a recommended plan is what it is.
    """
    check_settings(similarity=similarity, rank=rank)
    return _text(plan, _assess(report, plan, similarity, rank), similarity, rank,
                 report.num_tokens, formula_macs(report.arch), formula_macs(report.arch, plan),
                 [])


def _need(report: PatternReport, rank: str) -> np.ndarray:
    """Per layer, the largest worst-head ``rank`` of this and every later layer."""
    return np.maximum.accumulate(getattr(report, rank).max(axis=1)[::-1])[::-1]


def _assess(report: PatternReport, plan: Plan, similarity: float, rank: str
            ) -> tuple[LayerChoice, ...]:
    """Each layer's measurements beside what ``plan`` does there (no reasons yet)."""
    worst_sim = report.similarity.min(axis=1)
    worst_rank = getattr(report, rank).max(axis=1)
    need = _need(report, rank)
    rows, cols = token_grid(report.arch)
    n_patches = rows * cols
    stages = dict(plan.pyramid)
    return tuple(
        LayerChoice(layer=layer, similarity=float(worst_sim[layer]),
                    passes=bool(worst_sim[layer] >= similarity), static=layer in plan.static,
                    rank=float(worst_rank[layer]), need=float(need[layer]),
                    kept=plan.tokens_before(layer, n_patches) / n_patches,
                    stage=stages.get(layer))
        for layer in range(report.depth))


def _why_role(c: LayerChoice, threshold: float, run: int, max_static: int | None) -> str:
    """Why the layer is static or dynamic, in the words of the static rule."""
    measured = f"worst-head similarity {c.similarity:.4f}"
    if c.static:
        return f"static: {measured} >= {threshold:.3f}, in the leading run from layer 0"
    if not c.passes:
        return f"dynamic: {measured} < {threshold:.3f}"
    if c.layer < run:
        return (f"dynamic: {measured} >= {threshold:.3f}, but max_static={max_static} caps "
                f"the static run")
    return (f"dynamic: {measured} >= {threshold:.3f}, but layer {run} before it fails and only "
            f"the leading run is made static")


def _pyramid(report: PatternReport, n_static: int, need: np.ndarray, margin: float, rank: str
             ) -> tuple[Plan, dict[int, str]]:
    """The plan for a margin (see :func:`recommend`), and why each stage sits where it does
    and keeps the tokens it keeps (by layer)."""
    ladder = token_ladder(token_grid(report.arch))
    n_patches = ladder[0]
    first = max(1, n_static)
    stages: list[tuple[int, int]] = []
    why: dict[int, str] = {}
    cur = n_patches
    last = -PYRAMID_GAP
    for layer in range(first, report.depth):
        want = margin * need[layer] * n_patches
        fit = min((s for s in ladder if s >= want), default=n_patches)
        if fit < cur and layer - last >= PYRAMID_GAP:
            step = ladder[ladder.index(cur) + 1]
            m = max(fit, step)  # one step of the ladder at a time
            text = (f"margin {margin:.3g} x {rank} need {need[layer]:.3f} x {n_patches} "
                    f"patches asks >= {want:.1f} tokens, which {fit} hold")
            if m != fit:
                text += f"; one ladder step down from {cur} at a time"
            if stages and layer == last + PYRAMID_GAP and _fit_earlier(
                    need, margin, n_patches, ladder, cur, last + 1, layer):
                text += (f"; the earliest layer at least {PYRAMID_GAP} layers after the stage at "
                         f"layer {last}")
            elif layer == first:
                text += "; the first layer a stage may precede (after the static run)"
            else:
                text += f"; the first layer whose need lets the tokens go below {cur}"
            why[layer] = text
            stages.append((layer, m))
            cur, last = m, layer
    plan = Plan(static=tuple(range(n_static)), pyramid=tuple(stages),
                img_size=tuple(report.arch["img_size"]), source={"name": report.arch.get("name")},
                label="recommended")
    return plan, why


def _fit_earlier(need: np.ndarray, margin: float, n_patches: int, ladder: list[int], cur: int,
                 start: int, stop: int) -> bool:
    """Whether a layer in ``[start, stop)`` already fit fewer than ``cur`` tokens (the gap
    between stages, not the rank, held the stage back)."""
    return any(min((s for s in ladder if s >= margin * need[i] * n_patches), default=n_patches)
               < cur for i in range(start, stop))


def _delay(report: PatternReport, plan: Plan, base: float, speedup: float) -> Plan:
    """``plan`` with its stages moved as late as the target allows (see :func:`recommend`).

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
            later = stages[:i] + ([(at + 1, m)] if at + 1 < report.depth else []) + stages[i + 1:]
            moved = replace(plan, pyramid=tuple(later))
            gain = base / formula_macs(report.arch, moved)
            if gain >= speedup:
                moves.append((gain, moved))
        if not moves:
            return plan
        plan = min(moves, key=lambda move: move[0])[1]


def _text(plan: Plan, layers: tuple[LayerChoice, ...], threshold: float, rank: str,
          num_tokens: int, base: float, macs: float, notes: list[str]) -> str:
    """The explanation: the plan and its rules, ``notes``, a table per layer, the reasons
    (where there are any) and the GMACs."""
    lines = [f"plan: {plan.describe()}",
             f"static rule: worst-head cosine similarity >= {threshold:.3f}, leading run "
             f"from layer 0; pyramid rule: tokens kept >= margin x worst-head {rank} of "
             f"this and every later layer (fractions of N = {num_tokens}), one grid "
             f"step per stage, stages >= {PYRAMID_GAP} layers apart", *notes,
             f"{'layer':>5}  {'sim(min)':>8}  {'pass':>4}  {rank + '(max)':>14}  "
             f"{'need':>6}  {'kept':>6}  role"]
    for c in layers:
        role = "static" if c.static else "dynamic"
        if c.stage is not None:
            role += f", stage -> {c.stage} tokens"
        ok = "yes" if c.passes else "no"
        warn = "  (kept < need)" if c.kept + 1e-9 < c.need else ""
        lines.append(f"{c.layer:>5}  {c.similarity:>8.4f}  {ok:>4}  {c.rank:>14.4f}  "
                     f"{c.need:>6.3f}  {c.kept:>6.3f}  {role}{warn}")
    if any(c.reason for c in layers):
        lines.append("why:")
        lines += [f"  layer {c.layer}: {c.reason}" for c in layers]
    lines.append(f"GMACs: baseline {base / 1e9:.4f}, plan {macs / 1e9:.4f} ({base / macs:.2f}x)")
    return "\n".join(lines)
