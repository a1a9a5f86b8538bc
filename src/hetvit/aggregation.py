"""GLAD: global linear aggregation of patch tokens, one stage of the token pyramid.

Late ViT layers have low-rank attention: many tokens carry the same information. A stage
replaces the ``N_p`` patch tokens with ``M`` new ones, each a convex combination of all old ones
(``X' = softmax(W) X``). Prefix tokens (cls, dist, registers) pass through untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import EvalCache
from .errors import DataError, PlanError, UsageError
from .grid import pool_grid

__all__ = ["TokenAggregation", "SizeWeightedTokens", "token_sizes", "pooling_matrix",
           "cluster_matrix", "clustering_cost"]


def pooling_matrix(grid: tuple[int, int], m: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The ``m x N_p`` matrix of average pooling ``grid`` (rows x cols, raster order) to m tokens.

    The target grid keeps the source's aspect where it can (14x14 -> 7x7 with 2x2 windows,
    14x14 -> 14x7 with 2x1 windows); sizes that do not divide use adaptive pooling's
    overlapping windows, and an ``m`` with no fitting grid pools the raster sequence in 1-D.
    Returns the matrix and the target grid.
    """
    h, w = grid
    n = h * w
    eye = torch.eye(n, dtype=torch.float64)
    target = pool_grid(grid, m)
    if target is None:
        pooled = F.adaptive_avg_pool1d(eye.reshape(n, 1, n), m).reshape(n, m)
        target = (1, m)
    else:
        pooled = F.adaptive_avg_pool2d(eye.reshape(n, 1, h, w), target).reshape(n, m)
    return pooled.T.contiguous().float(), target


def clustering_cost(gram: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Squared distances (``M x N``) of every token to every centroid ``c_m = sum_j P_mj f_j``.

    Only inner products of the tokens' descriptors ``f`` are needed: with ``G = F F^T``,
    ``|f_i - c_m|^2 = G_ii - 2 (P G)_mi + (P G P^T)_mm``. So ``G`` can be summed over any
    number of images (a streaming statistic) and never the descriptors themselves held.
    """
    g, p = gram.double(), p.double()
    pg = p @ g
    return g.diagonal()[None, :] - 2 * pg + (pg * p).sum(1, keepdim=True)


def cluster_matrix(gram: torch.Tensor, init: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Group ``N`` tokens into ``M`` clusters by k-means on their Gram matrix, from ``init``.

    The data-driven start for GLAD: tokens that carry the same content across
    images are the redundant ones, so they should be averaged into one new token, wherever they
    lie on the grid. k-means starts from the centroids of ``init`` (the spatial pooling, so it
    can only lower the pooling's within-cluster error, and cluster ``m`` stays near pooling
    window ``m``) and runs Lloyd's iterations in kernel form (:func:`clustering_cost`). A
    cluster that empties takes the token farthest from its own centroid, so none is left
    empty. Returns the ``M x N`` matrix whose row ``m`` averages the tokens of cluster ``m``.
    """
    m, n = init.shape
    p = init.double()
    assign: torch.Tensor | None = None
    for _ in range(iters):
        dist = clustering_cost(gram, p)
        new = dist.argmin(0)
        counts = torch.bincount(new, minlength=m)
        for empty in (counts == 0).nonzero().flatten().tolist():
            own = dist[new, torch.arange(n)].masked_fill(counts[new] <= 1, -float("inf"))
            i = int(own.argmax())
            counts[new[i]] -= 1
            new[i], counts[empty] = empty, 1
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        p = F.one_hot(assign, m).T.double()
        p = p / p.sum(1, keepdim=True)
    return p.to(init.dtype)


class TokenAggregation(nn.Module):
    """Aggregate ``num_in`` patch tokens to ``num_out`` with ``P = softmax(W, -1)``.

    Sits in the host model's block sequence before the block it shrinks (see
    :meth:`hetvit.hosts.base.Host.insert_stages`), so the model's own forward runs it. In
    eval mode ``P`` is computed once and cached.
    """

    def __init__(self, num_in: int, num_out: int, num_prefix_tokens: int = 1,
                 grid_in: tuple[int, int] | None = None, eps: float = 1e-8) -> None:
        super().__init__()
        if not 1 <= num_out <= num_in:
            raise PlanError(f"cannot aggregate {num_in} tokens to {num_out}")
        self.num_in, self.num_out = num_in, num_out
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_in = grid_in or (1, num_in)
        pool, self.grid_out = pooling_matrix(self.grid_in, num_out)
        self.weight = nn.Parameter(torch.log(pool + eps))
        self._cache = EvalCache()

    @classmethod
    def for_plan(cls, num_in: int, num_out: int, dim: int, num_prefix_tokens: int,
                 grid_in: tuple[int, int]) -> TokenAggregation:
        """A stage built from what a plan knows, the same arguments for every kind
        (:func:`hetvit.stages.make_stage`); ``dim``, the token width, is for the kinds that
        need it."""
        return cls(num_in, num_out, num_prefix_tokens, grid_in)

    def matrix(self) -> torch.Tensor:
        """``P = softmax(W)``: ``M x N_p``, each row a convex combination of input tokens."""
        return self.weight.softmax(dim=-1)

    def set_matrix(self, p: torch.Tensor, eps: float = 1e-8) -> None:
        """Set ``W`` so that ``softmax(W)`` equals the row-stochastic ``p`` (up to ``eps``)."""
        if p.shape != self.weight.shape:
            raise UsageError(f"matrix shape {tuple(p.shape)} != {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(torch.log(p.to(self.weight) + eps))

    def _full_matrix(self) -> torch.Tensor:
        """Eval mode: ``P`` extended with an identity block for the prefix tokens, cached.

        ``(k + M) x (k + N_p)``: one matrix product over the whole sequence then replaces
        slicing off the prefix, a product on the (non-contiguous) patch slice and a
        concatenation, which matters at batch 1 where the fixed cost per op is visible.
        """
        return self._cache.get(self.weight, self._extended)

    def _extended(self) -> torch.Tensor:
        k = self.num_prefix_tokens
        p = self.matrix()
        full = p.new_zeros(k + self.num_out, k + self.num_in)
        full[:k, :k] = torch.eye(k, dtype=p.dtype, device=p.device)
        full[k:, k:] = p
        return full

    def train(self, mode: bool = True) -> TokenAggregation:
        self._cache.clear()
        return super().train(mode)

    def check_tokens(self, x: torch.Tensor) -> None:
        """A clear error for a sequence of another length (an input of another size)."""
        k = self.num_prefix_tokens
        if x.shape[1] != k + self.num_in:
            raise DataError(f"token aggregation expects {k} prefix + {self.num_in} patch tokens, "
                             f"got {x.shape[1]}: the model only runs at its plan's input size")

    def macs(self, dim: int) -> int:
        """Multiply-accumulates an image on tokens of width ``dim``: ``M N D``, every new token
        a weighted sum of the ``N`` old ones."""
        return self.cost(self.num_in, self.num_out, dim)

    @staticmethod
    def cost(num_in: int, num_out: int, dim: int) -> int:
        """:meth:`macs` of a stage of these sizes, for the plan's formula
        (:func:`hetvit.flops.plan_layers`)."""
        return num_out * num_in * dim

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        self.check_tokens(x)
        k = self.num_prefix_tokens
        if not self.training:
            return torch.matmul(self._full_matrix(), x)
        patches = torch.matmul(self.matrix(), x[:, k:])
        return torch.cat([x[:, :k], patches], dim=1) if k else patches

    def extra_repr(self) -> str:
        return (f"{self.num_in} -> {self.num_out} tokens, grid {self.grid_in} -> {self.grid_out}, "
                f"prefix={self.num_prefix_tokens}")


def token_sizes(stages: Sequence[TokenAggregation], num_patches: int) -> torch.Tensor:
    """How many original patches each patch token after ``stages`` stands for.

    A patch starts as one. Each old token ``j`` shares itself among the new tokens in
    proportion to its column of ``P`` (``P_mj / sum_m P_mj``), so a new token stands for
    ``sum_j size_j P_mj / sum_m P_mj``: for a hard partition, the size of its group. The sizes
    always add up to ``num_patches``, and they follow the learned matrices (and their
    gradients), not the pooling they started from.
    """
    sizes = torch.ones(num_patches)
    for stage in stages:
        p = stage.matrix()
        share = p / p.sum(0, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        sizes = share @ sizes.to(p)
    return sizes


class SizeWeightedTokens(nn.Module):
    """The final norm of a ViT that averages its patch tokens (timm's ``global_pool='avg'``),
    followed by a weighting that makes that average count every original patch once.

    After aggregation an unweighted mean over the ``M`` tokens would give a token that stands
    for ten patches the same say as one that stands for one. Scaling token ``m`` by
    ``M * size_m / sum(size)`` turns the library's own mean into the size-weighted one, so
    the head's forward is left as it is: when aggregation only merges equal tokens, the output
    is the source model's. Prefix tokens pass through untouched.

    The stages are read, not owned (they live in the block sequence): they are held in a plain
    tuple, which the host sets whenever it changes the sequence.
    """

    def __init__(self, norm: nn.Module, num_prefix_tokens: int,
                 stages: Sequence[TokenAggregation] = ()) -> None:
        super().__init__()
        self.norm = norm
        self.num_prefix_tokens = num_prefix_tokens
        self.stages: tuple[TokenAggregation, ...] = tuple(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if not self.stages:
            return x
        k = self.num_prefix_tokens
        sizes = token_sizes(self.stages, self.stages[0].num_in).to(x)
        weight = sizes * (sizes.numel() / sizes.sum())
        patches = x[:, k:] * weight[None, :, None]
        return torch.cat([x[:, :k], patches], dim=1) if k else patches
