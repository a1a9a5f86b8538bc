"""Token grid geometry: the patch grid of an architecture, and the grid of a pyramid stage.

Plans, pooling windows and MAC counts all follow the same grids, so they are computed in one
place. A leaf module: it imports nothing of hetvit.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["token_grid", "pool_grid"]


def token_grid(arch: dict[str, Any]) -> tuple[int, int]:
    """Patch token grid ``(rows, cols)`` of an architecture description."""
    h, w = arch["img_size"]
    ph, pw = arch["patch_size"]
    return h // ph, w // pw


def pool_grid(grid: tuple[int, int], m: int) -> tuple[int, int] | None:
    """The ``(rows, cols)`` grid of ``m`` tokens that best keeps the shape of ``grid``.

    Returns None when ``m`` has no factorisation that fits inside ``grid`` (then aggregation
    pools the raster sequence in 1-D).
    """
    h, w = grid
    best, best_cost = None, math.inf
    for r in range(h, 0, -1):  # on a tie, keep more rows: 14x14 -> 14x7
        if m % r:
            continue
        c = m // r
        if c > w:
            continue
        # Prefer grids whose windows are close to equal along both axes.
        cost = abs(math.log((h / r) / (w / c)))
        if cost < best_cost - 1e-12:
            best, best_cost = (r, c), cost
    return best
