"""The kinds of pyramid stage a plan can ask for (:attr:`hetvit.Plan.aggregation`), by name.

The plan names a kind; this module maps the name to its module, so that building a stage
(:mod:`hetvit.surgery`) and costing one from the plan alone (:mod:`hetvit.flops`) agree.
"""

from __future__ import annotations

from .aggregation import TokenAggregation
from .content_aggregation import ContentAggregation
from .merge_aggregation import MergeAggregation

__all__ = ["STAGE_KINDS", "make_stage", "stage_cost"]

STAGE_KINDS: dict[str, type[TokenAggregation]] = {
    "static": TokenAggregation,
    "content": ContentAggregation,
    "merge": MergeAggregation,
}


def make_stage(kind: str, num_in: int, num_out: int, dim: int, prefix: int,
               grid: tuple[int, int]) -> TokenAggregation:
    """A pyramid stage of ``kind`` from ``num_in`` to ``num_out`` patch tokens of width ``dim``,
    its matrix started as the average pooling of ``grid``."""
    return STAGE_KINDS[kind].for_plan(num_in, num_out, dim, prefix, grid)


def stage_cost(kind: str, num_in: int, num_out: int, dim: int) -> int:
    """MACs an image of a stage of ``kind``: what its module's ``macs`` counts."""
    return STAGE_KINDS[kind].cost(num_in, num_out, dim)
