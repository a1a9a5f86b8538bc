"""Token merging (ToMe; Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

In every block, between attention and MLP, ``r`` tokens are merged away by bipartite soft
matching: the patch tokens are split alternately into sets A and B, each A token finds its
most similar B token (cosine of the attention keys, averaged over heads: the keys already
summarise what a token contributes to attention), and the ``r`` A tokens with the best matches
are averaged into them, weighted by token size (how many input patches a token stands for).
Proportional attention adds ``log(size)`` to every key's logit, so a merged token is attended
to as much as the tokens it replaces together: merging two identical tokens changes nothing.

Written for hetvit from the paper's description, as a training-free baseline to compare the
method against; no code of the authors' repository is used.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import UsageError
from ..hosts import host_of
from .common import BaselineError, ReducingBlock, check_model, patch_tokens, replace_layers

__all__ = ["tome", "tome_schedule", "bipartite_merge", "MergingBlock", "SCHEDULES"]

SCHEDULES = ("constant", "decreasing")


class _Sizes:
    """Token sizes shared by the merging blocks of one model during a forward pass.

    ``nn.Sequential`` passes one tensor from block to block, so the sizes (``B x N x 1``,
    prefix included; ``None`` while every token still has size 1) travel beside it. The first
    merging block resets them at the start of each forward.
    """

    size: torch.Tensor | None = None


def tome_schedule(r: int | Sequence[int], depth: int, schedule: str = "constant") -> list[int]:
    """Tokens to merge in each of ``depth`` blocks, before clipping to the tokens present.

    ``constant``: ``r`` in every block. ``decreasing``: linear from ``2r`` in the first block
    to 0 in the last, rounded so that the total stays ``r * depth`` (largest remainders, ties
    to earlier blocks, so the list never increases). A list gives ``r`` per block directly.
    """
    if isinstance(r, Sequence) and not isinstance(r, str):
        per_layer = [int(v) for v in r]
        if len(per_layer) != depth or per_layer != list(r):
            raise BaselineError(f"tome: a per-layer r needs {depth} integers (one per block), "
                                f"got {list(r)}")
        if any(v < 0 for v in per_layer):
            raise BaselineError(f"tome: r must be at least 0 in every block, got {per_layer}")
        return per_layer
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise BaselineError(f"tome: r must be an integer >= 0 (tokens merged per block), "
                            f"got {r!r}")
    if schedule == "constant":
        return [r] * depth
    if schedule != "decreasing":
        raise BaselineError(f"tome: schedule must be one of {', '.join(SCHEDULES)}, got "
                            f"{schedule!r} (a list of r per block goes in r)")
    if depth == 1:
        return [r]
    exact = [2 * r * (depth - 1 - i) / (depth - 1) for i in range(depth)]
    per_layer = [int(v) for v in exact]
    left = r * depth - sum(per_layer)
    by_remainder = sorted(range(depth), key=lambda i: (per_layer[i] - exact[i], i))
    for i in by_remainder[:left]:
        per_layer[i] += 1
    return per_layer


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor | None, r: int,
                    prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` patch tokens of ``x`` (``B x N x C``) by bipartite soft matching.

    ``metric`` (``B x N x d``) is what similarity is measured on; ``size`` (``B x N x 1`` or
    ``None`` for all ones) the tokens' sizes. The ``prefix`` tokens take no part: they are
    neither merged nor merged into, and stay in front where timm's head reads them.
    Returns the ``N - r`` tokens (prefix, unmerged A tokens, then B tokens) and their sizes.
    """
    b, n, c = x.shape
    m = F.normalize(metric[:, prefix:], dim=-1)
    best, match = (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)  # per A token
    order = best.argsort(dim=-1, descending=True)
    src, kept = order[:, :r, None], order[:, r:, None]
    dst = match.gather(1, order[:, :r])[..., None]

    # Features weighted by size, with the size as one more channel: one gather and one
    # scatter move both, and the weighted mean is the sum divided by that channel.
    patches = x[:, prefix:]
    if size is None:
        both = torch.cat([patches, patches.new_ones(b, n - prefix, 1)], dim=-1)
    else:
        s = size[:, prefix:]
        both = torch.cat([patches * s, s], dim=-1)
    a, bb = both[:, ::2], both[:, 1::2]
    bb = bb.scatter_add(1, dst.expand(-1, -1, c + 1), a.gather(1, src.expand(-1, -1, c + 1)))
    merged = torch.cat([a.gather(1, kept.expand(-1, -1, c + 1)), bb], dim=1)
    new_size = merged[..., c:]
    out = torch.cat([x[:, :prefix], merged[..., :c] / new_size], dim=1)
    if size is None:
        return out, torch.cat([new_size.new_ones(b, prefix, 1), new_size], dim=1)
    return out, torch.cat([size[:, :prefix], new_size], dim=1)


class MergingBlock(ReducingBlock):
    """A timm ``Block`` that merges ``r`` tokens between attention and MLP (ToMe).

    With ``prop_attn`` it also runs proportional attention on the sizes of earlier merges;
    a block with ``r = 0`` after a merge is one of these for that reason alone.
    """

    def __init__(self, blk: Block, r: int, sizes: _Sizes, prefix: int, prop_attn: bool,
                 first: bool) -> None:
        super().__init__(blk)
        self.r, self.prefix, self.prop_attn, self.first = r, prefix, prop_attn, first
        self.sizes = sizes

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise UsageError("token merging does not take attention masks")
        sizes = self.sizes
        if self.first:
            sizes.size = None
        size = sizes.size
        bias = None
        if self.prop_attn and size is not None:
            bias = size.log().reshape(size.shape[0], 1, 1, size.shape[1])
        out, _, k = self.attn(self.norm1(x), bias)
        x = x + self.drop_path1(self.ls1(out))
        if self.r:
            x, sizes.size = bipartite_merge(x, k.mean(1), size, self.r, self.prefix)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def extra_repr(self) -> str:
        return f"r={self.r}, prop_attn={self.prop_attn}"


def tome(model: nn.Module, r: int | Sequence[int] = 6, schedule: str = "constant",
         prop_attn: bool = True) -> VisionTransformer:
    """A copy of ``model`` that merges tokens in every block (ToMe); ``model`` is untouched.

    Args:
        model: a timm ``VisionTransformer`` (or ``VisionTransformerDistilled``) classified
            from its cls token. Prefix tokens (cls, dist) are never merged.
        r: tokens merged per block (see ``schedule``), or a list with one ``r`` per block.
        schedule: ``"constant"`` or ``"decreasing"`` (``2r`` down to 0, same total).
        prop_attn: proportional attention (``log(size)`` added to each key's logit).

    In each block ``r`` is clipped to half the patch tokens entering it (set A holds half).
    The copy carries ``hetvit_baseline``: the settings, the ``r`` each block merges and the
    tokens entering each block (:func:`hetvit.baselines.token_counts`).
    """
    arch = check_model(model, "tome")
    depth = arch["depth"]
    prefix, patches = patch_tokens(arch)
    asked = tome_schedule(r, depth, schedule)
    n = patches + prefix
    per_layer, tokens = [], []
    for want in asked:
        tokens.append(n)
        per_layer.append(min(want, (n - prefix) // 2))
        n -= per_layer[-1]
    new = copy.deepcopy(model)
    first = next((i for i, v in enumerate(per_layer) if v), depth)
    sizes = _Sizes()
    blocks = host_of(new).layers(new)
    replace_layers(new, {i: MergingBlock(blocks[i], per_layer[i], sizes, prefix, prop_attn,
                                         first=i == first)
                         for i in range(first, depth) if per_layer[i] or prop_attn})
    new.hetvit_baseline = {
        "method": "tome",
        "r": list(r) if isinstance(r, Sequence) else r,
        "schedule": "list" if isinstance(r, Sequence) else schedule,
        "prop_attn": prop_attn, "per_layer": per_layer, "tokens": tokens, "tokens_out": n,
    }
    return new
