"""Top-k token pruning by cls attention, with a fused token (EViT; Liang et al., "Not All
Patches are What You Need: Expediting Vision Transformers via Token Reorganizations",
ICLR 2022).

The cls token's attention says which patches the classification draws on. At a few chosen
blocks, right after attention and before the MLP, the ``keep_rate`` fraction of patch tokens
with the highest cls attention (averaged over heads) is kept; the inattentive rest is not
thrown away but fused into one token, their cls-attention-weighted average, appended after the
kept ones. In later pruning blocks the fused token competes like any other.

Written for hetvit from the paper's description, as a training-free baseline to compare the
method against; no code of the authors' repository is used.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import UsageError
from ..hosts import host_of
from .common import BaselineError, ReducingBlock, check_model, patch_tokens, replace_layers

__all__ = ["evit", "prune_tokens", "PruningBlock", "kept_tokens"]


def kept_tokens(keep_rate: float, n: int) -> int:
    """Patch tokens kept of ``n``: ``ceil(keep_rate * n)`` (a hair of slack for float error,
    so that 0.7 of 10 keeps 7, not 8)."""
    return min(n, max(1, math.ceil(keep_rate * n - 1e-9)))


def prune_tokens(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, prefix: int
                 ) -> torch.Tensor:
    """Keep the ``keep`` patch tokens of ``x`` (``B x N x C``) with the highest ``cls_attn``
    (``B x N_p``, one weight per patch token) and fuse the rest into one token, their
    ``cls_attn``-weighted mean. Returns ``prefix + keep + 1`` tokens."""
    c = x.shape[-1]
    order = cls_attn.argsort(dim=-1, descending=True)
    patches = x[:, prefix:]
    kept = patches.gather(1, order[:, :keep, None].expand(-1, -1, c))
    dropped = order[:, keep:]
    w = cls_attn.gather(1, dropped)
    w = (w / w.sum(dim=-1, keepdim=True))[:, None]  # B x 1 x dropped
    fused = w @ patches.gather(1, dropped[..., None].expand(-1, -1, c))
    return torch.cat([x[:, :prefix], kept, fused], dim=1)


class PruningBlock(ReducingBlock):
    """A timm ``Block`` that keeps ``keep`` patch tokens (plus a fused one) before its MLP."""

    def __init__(self, blk: Block, keep: int, prefix: int) -> None:
        super().__init__(blk)
        self.keep, self.prefix = keep, prefix

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise UsageError("token pruning does not take attention masks")
        out, q, k = self.attn(self.norm1(x))
        x = x + self.drop_path1(self.ls1(out))
        # The cls row of this block's attention (softmax over all keys, as the block ran
        # it), averaged over heads; only the patch columns compete.
        logits = (q[:, :, :1] * self.attn.scale) @ k.transpose(-2, -1)  # B x H x 1 x N
        cls_attn = logits.softmax(dim=-1).mean(dim=1)[:, 0, self.prefix:]
        x = prune_tokens(x, cls_attn, self.keep, self.prefix)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def extra_repr(self) -> str:
        return f"keep={self.keep} patch tokens + 1 fused"


def evit(model: nn.Module, keep_rate: float = 0.7, layers: Sequence[int] = (3, 6, 9)
         ) -> VisionTransformer:
    """A copy of ``model`` that prunes inattentive tokens at ``layers`` (EViT); ``model`` is
    untouched.

    Args:
        model: a timm ``VisionTransformer`` (or ``VisionTransformerDistilled``) classified
            from its cls token. Prefix tokens (cls, dist) are always kept.
        keep_rate: fraction of the patch tokens entering a pruning block that it keeps,
            in (0, 1]; the others become one fused token. 1 keeps everything.
        layers: the blocks that prune (0-based), e.g. ``(3, 6, 9)`` of 12 as in the paper.

    The copy carries ``hetvit_baseline``: the settings and the tokens entering each block
    (:func:`hetvit.baselines.token_counts`).
    """
    arch = check_model(model, "evit")
    depth = arch["depth"]
    prefix, patches = patch_tokens(arch)
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, int | float) or not (
            0 < keep_rate <= 1):
        raise BaselineError(f"evit: keep_rate must be in (0, 1], got {keep_rate!r}")
    layers = list(layers)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise BaselineError(f"evit: layers must be block indices, got {layers}")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise BaselineError(f"evit: layers {bad} out of range: the model has blocks "
                            f"0-{depth - 1}")
    if len(set(layers)) != len(layers):
        raise BaselineError(f"evit: layers repeat: {layers}")
    layers = sorted(layers)
    new = copy.deepcopy(model)
    n = patches + prefix
    tokens, blocks, pruning = [], host_of(new).layers(new), {}
    for i in range(depth):
        tokens.append(n)
        if i in layers:
            keep = kept_tokens(keep_rate, n - prefix)
            if keep < n - prefix - 1:  # fusing a single token into itself would change nothing
                pruning[i] = PruningBlock(blocks[i], keep, prefix)
                n = prefix + keep + 1
    replace_layers(new, pruning)
    new.hetvit_baseline = {"method": "evit", "keep_rate": float(keep_rate), "layers": layers,
                           "tokens": tokens, "tokens_out": n}
    return new
