"""Multiply-accumulate counts (MACs) of ViTs and of compressed ViTs.

Fused attention (``scaled_dot_product_attention``) is invisible to op-level counters such as
fvcore, and it is a large part of what DGSSA saves. So costs are counted two ways that must
agree: :func:`formula_macs` from the architecture and the plan in closed form, and
:func:`count_macs` from the modules that actually run in a forward pass. Element-wise work
(norms, GELU, softmax, residual adds) is not counted, as is usual for GMAC figures.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .aggregation import TokenAggregation
from .attention import StaticAttention
from .grid import pool_grid, token_grid
from .hosts import describe, host_for, host_of
from .modes import eval_mode
from .plan import Plan
from .stages import stage_cost

__all__ = ["formula_macs", "count_macs", "block_macs", "plan_layers"]


def block_macs(n: int, dim: int, hidden: int, static: bool) -> int:
    """MACs of one pre-norm transformer block on ``n`` tokens.

    Dynamic: q, k, v (``3 n D^2``), ``q k^T`` and ``A V`` (``2 n^2 D``), output projection
    (``n D^2``) and MLP (``2 n D D_h``). Static attention drops q, k and ``q k^T``:
    ``n D^2 + n^2 D + n D^2 + 2 n D D_h``.
    """
    mlp = 2 * n * dim * hidden
    if static:
        return 2 * n * dim * dim + n * n * dim + mlp
    return 4 * n * dim * dim + 2 * n * n * dim + mlp


def formula_macs(arch: dict[str, Any], plan: Plan | None = None) -> int:
    """MACs per image of the architecture ``arch`` (:func:`hetvit.hosts.describe`) under
    ``plan``: patch embedding, every stage and block of :func:`plan_layers`, and the head(s)."""
    rows, cols = token_grid(arch)
    ph, pw = arch["patch_size"]
    stem = rows * cols * arch["in_chans"] * ph * pw * arch["embed_dim"]
    blocks = sum(r["macs"] for r in plan_layers(arch, plan or Plan()))
    return stem + blocks + host_for(arch).head_macs(arch)


@torch.no_grad()
def count_macs(model: nn.Module, img_size: tuple[int, int] | None = None) -> int:
    """MACs per image counted from the modules a real forward pass runs.

    Linear and convolution layers are counted from their actual input shapes; the attention
    matrix products, which fused kernels hide, are counted from the shapes entering each
    attention module; aggregation from its matrix.
    """
    total = 0

    def linear(mod: nn.Linear, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() // out.shape[0] * mod.in_features

    def conv(mod: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        total += out.numel() // out.shape[0] * k

    def attention(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        n = args[0].shape[1]
        if isinstance(out, tuple):  # HF attention returns (output, weights)
            out = out[0]
        # attn_dim first: an attention that returns more than its output (the baselines'
        # TokenAttention gives q and k too) is still counted
        attn_dim = getattr(mod, "attn_dim", None) or out.shape[-1]
        total += (1 if isinstance(mod, StaticAttention) else 2) * n * n * attn_dim

    def aggregate(mod: TokenAggregation, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += mod.macs(args[0].shape[-1])

    host = host_of(model)
    chans, *size = host.input_size(describe(model))  # before the hooks: describe runs the stem
    attentions = {id(host.attention(b)) for b in host.layers(model)}
    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear))
        elif isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv))
        elif id(mod) in attentions:
            hooks.append(mod.register_forward_hook(attention))
        elif isinstance(mod, TokenAggregation):
            hooks.append(mod.register_forward_hook(aggregate))
    param = next(model.parameters())
    try:
        with eval_mode(model):
            model(torch.zeros(1, chans, *(img_size or size), dtype=param.dtype,
                              device=param.device))
    finally:
        for h in hooks:
            h.remove()
    return total


def plan_layers(arch: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """One row per aggregation stage and per block: what runs, on how many tokens, at what cost.

    Rows are dicts with ``layer``, ``kind`` (``dynamic``, ``static`` or ``aggregate``),
    ``tokens`` (patch tokens after the row; ``tokens_in`` for a stage), ``grid`` and ``macs``
    (a stage costs what its module counts, :func:`hetvit.stages.stage_cost`: ``M N D`` for the
    paper's, every new token a weighted sum of the ``N`` old ones).
    """
    dim, prefix = arch["embed_dim"], host_for(arch).prefix_tokens(arch)
    hidden = round(arch["mlp_ratio"] * dim)
    grid = token_grid(arch)
    n, stages, rows = grid[0] * grid[1], dict(plan.pyramid), []
    for layer in range(arch["depth"]):
        if layer in stages:
            m = stages[layer]
            new_grid = pool_grid(grid, m) or (1, m)
            rows.append({"layer": layer, "kind": "aggregate", "tokens_in": n, "tokens": m,
                         "grid_in": list(grid), "grid": list(new_grid),
                         "macs": stage_cost(plan.aggregation, n, m, dim)})
            n, grid = m, new_grid
        static = layer in plan.static
        rows.append({"layer": layer, "kind": "static" if static else "dynamic",
                     "tokens": n, "prefix": prefix, "grid": list(grid),
                     "macs": block_macs(prefix + n, dim, hidden, static)})
    return rows
