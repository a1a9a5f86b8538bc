"""The compression plan: which layers get static attention, where the token pyramid shrinks.

A plan is small, JSON-serialisable and checked against the model it is applied to, so that a
mistake (a layer that does not exist, a pyramid that grows) fails before any surgery runs.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import PlanError
from .files import atomic_write_text
from .grid import pool_grid, token_grid

__all__ = ["Plan", "PlanError", "PRESETS", "preset_for", "AGGREGATIONS"]

AGGREGATIONS = ("static", "content", "merge")
"""How a pyramid stage forms its tokens: one learned matrix for every image (the paper's GLAD),
that matrix plus learned queries that score each image's tokens
(:mod:`hetvit.content_aggregation`), or each image's most alike tokens merged
(:mod:`hetvit.merge_aggregation`)."""


@dataclass(frozen=True)
class Plan:
    """Where to put DGSSA (``static``) and GLAD (``pyramid``) in a ViT.

    Attributes:
        static: indices of the blocks whose attention becomes a static learned map.
        pyramid: ``(layer, M)`` stages: before block ``layer`` the patch tokens are aggregated
            down to ``M`` tokens. Layers strictly increase and ``M`` strictly decreases.
        img_size: the ``(height, width)`` input size the plan was made for. Static maps and
            aggregation matrices have fixed shapes, so the plan only fits this size.
        source: the model the plan was made for (``name`` of the timm model, when known).
        label: where the plan came from: a preset name, "recommended", ... (informational).
        aggregation: ``"static"`` (the paper's: one matrix for every image), ``"content"``
            (that matrix plus learned queries that read each image; see
            :mod:`hetvit.content_aggregation`) or ``"merge"`` (each image's most alike tokens
            averaged, to the same fixed counts; see :mod:`hetvit.merge_aggregation`).
    """

    static: tuple[int, ...] = ()
    pyramid: tuple[tuple[int, int], ...] = ()
    img_size: tuple[int, int] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    aggregation: str = "static"

    def __post_init__(self) -> None:
        # Normalise lists from JSON into tuples so plans compare and hash by value.
        object.__setattr__(self, "static", tuple(_whole(i, "static layer") for i in self.static))
        object.__setattr__(self, "pyramid", tuple((_whole(at, "pyramid layer"),
                                                   _whole(m, "pyramid M"))
                                                  for at, m in self.pyramid))
        if self.img_size is not None:
            object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
        if len(set(self.static)) != len(self.static):
            raise PlanError(f"static layers repeat: {list(self.static)}")
        if self.aggregation not in AGGREGATIONS:
            raise PlanError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not "
                            f"{self.aggregation!r}")

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["static"] = list(self.static)
        d["pyramid"] = [list(s) for s in self.pyramid]
        d["img_size"] = list(self.img_size) if self.img_size else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        unknown = set(d) - {"static", "pyramid", "img_size", "source", "label", "aggregation"}
        if unknown:
            raise PlanError(f"unknown plan fields: {sorted(unknown)}")
        try:
            return cls(
                static=d.get("static", ()),
                pyramid=[tuple(s) for s in d.get("pyramid", ())],
                img_size=d.get("img_size"),
                source=dict(d.get("source") or {}),
                label=d.get("label"),
                aggregation=d.get("aggregation", "static"),  # plans from before the option
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, PlanError):
                raise
            raise PlanError(f"malformed plan {d!r}: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise PlanError("a plan must be a JSON object with 'static' and 'pyramid'")
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically (a plan file is read by later commands)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """The plan in the JSON file ``path``; its errors name the file (a command may read
        several, and a message without the name leaves the user guessing which)."""
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file not found: {p}")
        try:
            return cls.from_json(p.read_text())
        except PlanError as e:
            raise PlanError(f"{p}: {e}") from None

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, arch: Mapping[str, Any]) -> Plan:
        """The preset ``name`` scaled to architecture ``arch``'s depth and token grid.

        ``arch`` is a description (:func:`hetvit.surgery.describe`); for a model,
        :func:`hetvit.surgery.preset` does both steps. A plan stays pure data: it never
        looks inside a model.
        """
        if not isinstance(arch, Mapping):
            raise PlanError(f"Plan.preset takes an architecture description, not a "
                            f"{type(arch).__name__}: use hetvit.surgery.preset({name!r}, model) "
                            f"or Plan.preset({name!r}, hetvit.surgery.describe(model))")
        return preset_for(name, depth=arch["depth"], grid=token_grid(arch),
                          img_size=tuple(arch["img_size"]), source={"name": arch.get("name")})

    # ----------------------------------------------------------------- validation
    def validate(self, depth: int, grid: tuple[int, int], img_size: tuple[int, int] | None = None
                 ) -> None:
        """Raise :class:`PlanError` if the plan cannot run on a ViT of this shape.

        Args:
            depth: number of transformer blocks.
            grid: the patch token grid ``(rows, cols)`` at the model's input size.
            img_size: the model's input size; checked against ``self.img_size``.
        """
        n_patches = grid[0] * grid[1]
        for i in self.static:
            if not 0 <= i < depth:
                raise PlanError(f"static layer {i} is out of range: the model has {depth} "
                                f"blocks (valid layers 0..{depth - 1})")
        prev_layer, prev_m = -1, n_patches
        for layer, m in self.pyramid:
            if not 0 <= layer < depth:
                raise PlanError(f"pyramid stage ({layer}, {m}): layer {layer} is out of range "
                                f"(the model has {depth} blocks, valid layers 0..{depth - 1})")
            if layer <= prev_layer:
                raise PlanError(f"pyramid layers must strictly increase: {list(self.pyramid)}")
            if m < 1:
                raise PlanError(f"pyramid stage ({layer}, {m}): M must be at least 1")
            if m > prev_m:
                raise PlanError(f"pyramid stage ({layer}, {m}): M={m} is larger than the "
                                f"{prev_m} patch tokens present before block {layer}")
            if m == prev_m:  # a stage that keeps every token costs M x N x D and buys nothing
                raise PlanError(f"pyramid must strictly decrease the token count: stage "
                                f"({layer}, {m}) keeps all {prev_m} tokens: {list(self.pyramid)}")
            prev_layer, prev_m = layer, m
        if img_size is not None and self.img_size is not None:
            if tuple(img_size) != tuple(self.img_size):
                raise PlanError(f"plan was made for input size {tuple(self.img_size)}, the "
                                f"model takes {tuple(img_size)}: make a plan for this size")

    def tokens_before(self, layer: int, n_patches: int) -> int:
        """Patch tokens entering block ``layer`` (after any aggregation placed before it)."""
        n = n_patches
        for stage_layer, m in self.pyramid:
            if stage_layer <= layer:
                n = m
        return n

    def with_source(self, **source: Any) -> Plan:
        return replace(self, source={**self.source, **source})

    def describe(self) -> str:
        st = ",".join(map(str, self.static)) or "-"
        py = " ".join(f"{at}:{m}" for at, m in self.pyramid) or "-"
        kind = f" {self.aggregation}" if self.aggregation != "static" and self.pyramid else ""
        return f"static [{st}]  pyramid{kind} [{py}]"


def _whole(value: Any, what: str) -> int:
    """``value`` as an int, refusing what ``int()`` would silently truncate (``0.5`` -> 0)."""
    if isinstance(value, bool):
        raise PlanError(f"{what} {value!r} is not a whole number")
    try:
        return operator.index(value)  # int, numpy and torch integers
    except TypeError:
        pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PlanError(f"{what} {value!r} is not a whole number") from None
    if not number.is_integer():
        raise PlanError(f"{what} {value!r} is not a whole number")
    return int(number)


# A preset is a rule, written for a 12-block model and scaled to other depths:
#   static: how many leading blocks get static attention (fraction of depth),
#   stages: (fraction of depth where a stage sits, fraction of the patch tokens kept).
PRESETS: dict[str, dict[str, Any]] = {
    "balanced": {"static": 3 / 12, "stages": [(4 / 12, 1 / 2), (8 / 12, 1 / 4)]},
    "fast": {"static": 4 / 12, "stages": [(3 / 12, 1 / 2), (6 / 12, 1 / 4), (9 / 12, 1 / 8)]},
    "fastest": {"static": 4 / 12, "stages": [(2 / 12, 1 / 2), (4 / 12, 1 / 4),
                                              (7 / 12, 1 / 8)]},
}


def preset_for(name: str, depth: int, grid: tuple[int, int],
               img_size: tuple[int, int] | None = None,
               source: dict[str, Any] | None = None) -> Plan:
    """Scale preset ``name`` to a model with ``depth`` blocks and a ``grid`` of patch tokens.

    Stage sizes follow the grid: each kept fraction is turned into a grid of about that many
    tokens with the input grid's aspect, so pooling windows stay regular (14x14 -> 14x7 -> 7x7).
    """
    if name not in PRESETS:
        raise PlanError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    rule = PRESETS[name]
    n_static = min(depth, max(0, round(depth * rule["static"])))
    stages: list[tuple[int, int]] = []
    cur = grid
    for at, keep in rule["stages"]:
        layer = min(depth - 1, max(1, round(depth * at)))
        m = _grid_tokens(grid, keep)
        if stages and layer <= stages[-1][0]:
            continue
        if m >= cur[0] * cur[1] or m < 1:
            continue
        stages.append((layer, m))
        cur = pool_grid(cur, m) or (1, m)
    return Plan(static=tuple(range(n_static)), pyramid=tuple(stages), img_size=img_size,
                source=dict(source or {}), label=name)


def _grid_tokens(grid: tuple[int, int], keep: float) -> int:
    """Token count of a regular grid holding about ``keep`` of ``grid``'s tokens."""
    h, w = grid
    if keep == 1 / 2:
        # Halve along one axis: 14x14 -> 14x7, 8x8 -> 8x4 (2x1 windows).
        return h * math.ceil(w / 2)
    side_h = max(1, round(h * math.sqrt(keep)))
    side_w = max(1, round(w * math.sqrt(keep)))
    return side_h * side_w
