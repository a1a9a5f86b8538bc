"""What the token-reduction baselines share: model checks, attention that exposes q and k,
the method descriptor, token counts and MACs.

Both baselines act *inside* a block, between attention and MLP, so the block's forward has to
change; everything around the blocks (patch embedding, ``forward_features``, ``forward_head``)
stays timm's own. A rewritten block holds the very submodules of the timm ``Block`` it
replaces (same names, same weights), so ``surgery.describe`` and ``flops.count_macs`` still
read it, and blocks that do not change the token count are left as timm's ``Block``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from .. import flops
from ..errors import BaselineError, UnsupportedModelError
from ..grid import token_grid
from ..hosts import describe, host_for, host_of
from ..plan import Plan
from ..surgery import is_compressed

__all__ = ["BaselineError", "TokenAttention", "check_model", "baseline_of", "is_baseline",
           "token_counts", "formula_macs", "selection_macs", "describe_baseline", "replace_layers",
           "patch_tokens"]


def replace_layers(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Swap the blocks of plan layers ``new`` (a baseline model holds no aggregation)."""
    host = host_of(model)
    host.set_sequence(model, [new.get(i, b) for i, b in enumerate(host.layers(model))])


def patch_tokens(arch: dict[str, Any]) -> tuple[int, int]:
    """``(prefix, patches)``: the token counts entering the first block."""
    rows, cols = token_grid(arch)
    return host_for(arch).prefix_tokens(arch), rows * cols


def check_model(model: nn.Module, method: str) -> dict[str, Any]:
    """The architecture of ``model`` (:func:`hetvit.hosts.describe`), or
    :class:`BaselineError`. The baselines rewrite timm's ``Block``, so only the timm host."""
    if is_compressed(model):
        raise BaselineError(f"{method}: this model is already compressed by hetvit; apply the "
                            "baseline to its uncompressed source model")
    if is_baseline(model):
        raise BaselineError(f"{method}: this model already runs "
                            f"{model.hetvit_baseline['method']}; apply {method} to the original")
    try:
        arch = describe(model)
    except UnsupportedModelError as e:
        raise BaselineError(f"{method}: {e}") from e
    if arch["host"] != "timm":
        raise BaselineError(f"{method} is written for timm's ViT blocks, not for "
                            f"{arch['host']} models")
    if not arch["class_token"] or arch["global_pool"] != "token":
        raise BaselineError(f"{method} needs a ViT classified from its cls token "
                            f"(global_pool='token'), not global_pool={arch['global_pool']!r}: "
                            "a plain mean over merged or pruned tokens is not the model's pool")
    for i, blk in enumerate(host_of(model).layers(model)):
        if type(blk) is not Block or getattr(blk.attn, "gate", None) is not None:
            raise BaselineError(f"{method}: block {i} is a {type(blk).__name__}; only timm's "
                                "plain pre-norm Block (ungated attention) is supported")
    return arch


def baseline_of(model: nn.Module) -> dict[str, Any] | None:
    """The method descriptor of a baseline model (``None`` for any other model)."""
    return getattr(model, "hetvit_baseline", None)


def is_baseline(model: nn.Module) -> bool:
    return baseline_of(model) is not None


def describe_baseline(model: nn.Module) -> str:
    """One line naming the method and its settings, e.g. ``tome r=6 (constant)``."""
    d = baseline_of(model)
    if d is None:
        return "baseline"
    if d["method"] == "tome":
        prop = "" if d["prop_attn"] else ", no proportional attention"
        return f"tome r={d['r']} ({d['schedule']}{prop}), tokens {_span(d)}"
    layers = ",".join(map(str, d["layers"]))
    return f"evit keep_rate={d['keep_rate']:g} at layers {layers}, tokens {_span(d)}"


def _span(d: dict[str, Any]) -> str:
    return f"{d['tokens'][0]} -> {d['tokens_out']}"


class TokenAttention(nn.Module):
    """timm's multi-head attention, returning q and k too, with an optional additive bias.

    Holds the submodules of the timm ``Attention`` it is made from (same names), so anything
    that inspects timm attention (``qkv``, ``num_heads``, ``proj``, ``attn_dim``) still works.
    The bias (``B x 1 x 1 x N``, added to every query's logits) goes to
    ``F.scaled_dot_product_attention`` as a float mask, so the fused kernel still runs.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads: int = attn.num_heads
        self.head_dim: int = attn.head_dim
        self.attn_dim: int = attn.attn_dim
        self.scale: float = attn.scale
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.attn_drop, self.norm = attn.attn_drop, attn.norm
        self.proj, self.proj_drop = attn.proj, attn.proj_drop

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, q, k)``; q and k are ``B x H x N x d`` (after q/k norm)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(b, n, -1))))
        return out, q, k


class ReducingBlock(nn.Module):
    """A timm pre-norm ``Block`` whose forward a baseline rewrites; same submodules, names."""

    def __init__(self, blk: Block) -> None:
        super().__init__()
        self.norm1, self.ls1, self.drop_path1 = blk.norm1, blk.ls1, blk.drop_path1
        self.attn = TokenAttention(blk.attn)
        self.norm2, self.mlp = blk.norm2, blk.mlp
        self.ls2, self.drop_path2 = blk.ls2, blk.drop_path2


def token_counts(model: nn.Module) -> list[int]:
    """The number of tokens (prefix included) entering each block of a baseline model.

    From the method's settings, not from a forward pass: both methods remove a fixed number
    of tokens per block, whatever the image. A model without a baseline keeps all its tokens.
    """
    d = baseline_of(model)
    if d is not None:
        return list(d["tokens"])
    arch = describe(model)
    rows, cols = token_grid(arch)
    return [host_for(arch).prefix_tokens(arch) + rows * cols] * arch["depth"]


def selection_macs(model: nn.Module) -> int:
    """MACs per image spent choosing tokens, which the timm modules do not run.

    ToMe: the cosine similarities of every A token to every B token (``|A| |B| d``, d the
    head width) in each merging block. EViT: the cls query's logits over all keys (``N D``)
    and the weighted sum that makes the fused token (dropped tokens times ``D``).
    """
    d = baseline_of(model)
    if d is None:
        return 0
    arch = describe(model)
    first = host_of(model).layers(model)[0].attn
    head_dim, attn_dim, dim = first.head_dim, first.attn_dim, arch["embed_dim"]
    prefix, tokens = host_for(arch).prefix_tokens(arch), d["tokens"]
    total = 0
    for i, n in enumerate(tokens):
        after = tokens[i + 1] if i + 1 < len(tokens) else d["tokens_out"]
        if after == n:
            continue
        p = n - prefix
        if d["method"] == "tome":
            total += ((p + 1) // 2) * (p // 2) * head_dim
        else:
            total += n * attn_dim + (p - (after - prefix - 1)) * dim
    return total


def formula_macs(model: nn.Module) -> int:
    """MACs per image of a baseline model in closed form, from its token counts.

    Per block on ``n`` tokens entering and ``m`` leaving: q, k, v and the output projection
    (``4 n D^2``), ``q k^T`` and ``A V`` (``2 n^2 D``) on ``n``, the MLP (``2 m D D_h``) on
    ``m``, plus :func:`selection_macs`; patch embedding and head as for the full model.
    """
    arch = describe(model)
    outside = flops.formula_macs(arch) - sum(r["macs"] for r in flops.plan_layers(arch, Plan()))
    d = baseline_of(model)
    tokens = token_counts(model)
    out = [*tokens[1:], d["tokens_out"] if d else tokens[-1]]
    dim = arch["embed_dim"]
    hidden = round(arch["mlp_ratio"] * dim)
    blocks = sum(4 * n * dim * dim + 2 * n * n * dim + 2 * m * dim * hidden
                 for n, m in zip(tokens, out, strict=True))
    return outside + blocks + selection_macs(model)
