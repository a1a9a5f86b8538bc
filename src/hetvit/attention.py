"""DGSSA: dynamic-guided static self-attention.

Early ViT layers produce nearly the same attention map for every image, so the per-image
``softmax(q k^T)`` can be replaced by one learned map per head. What is left per image is the
value projection, ``A @ V`` and the output projection: no q, no k, no ``q k^T``, no softmax.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .cache import EvalCache
from .errors import DataError, UsageError

__all__ = ["StaticAttention", "Projections"]


@dataclass(frozen=True)
class Projections:
    """What a static attention inherits from the dynamic one it replaces.

    ``value`` maps tokens to values (``dim -> attn_dim``), ``output`` maps the heads' merged
    output back (``attn_dim -> dim``); ``norm`` runs between them (timm's scale-norm) and
    ``drop`` after. All are copies: the source model is never shared.
    """

    value: nn.Linear
    output: nn.Linear
    num_heads: int
    norm: nn.Module
    drop: nn.Module


class StaticAttention(nn.Module):
    """Attention with a static, learned map per head (DGSSA).

    ``out = proj(merge_heads(softmax(logits) @ split_heads(v(x))))``.

    The value and output projections are inherited from the attention module it replaces;
    ``logits`` (``H x N x N``) start from the log of the layer's mean dynamic map over a
    calibration set. In eval mode the softmax is computed once and cached.

    During fine-tuning, :attr:`guide` may hold the teacher's dynamic map for the current batch
    (``B x H x N x N``) and :attr:`mix` a weight ``lambda``: the layer then runs with
    ``lambda * guide + (1 - lambda) * static`` (the optional curriculum of the method).
    """

    def __init__(self, dim: int, num_heads: int, num_tokens: int, attn_dim: int | None = None,
                 qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        attn_dim = attn_dim or dim
        if attn_dim % num_heads:
            raise UsageError(f"attention width {attn_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = attn_dim // num_heads
        self.attn_dim = attn_dim
        self.num_tokens = num_tokens
        self.v = nn.Linear(dim, attn_dim, bias=qkv_bias)
        self.norm: nn.Module = nn.Identity()
        self.proj = nn.Linear(attn_dim, dim, bias=proj_bias)
        self.proj_drop: nn.Module = nn.Identity()
        self.logits = nn.Parameter(torch.zeros(num_heads, num_tokens, num_tokens))
        self.guide: torch.Tensor | None = None
        self.mix: float = 0.0
        self._cache = EvalCache()

    @classmethod
    def from_projections(cls, p: Projections, num_tokens: int) -> StaticAttention:
        """A static attention over ``num_tokens`` tokens that inherits ``p`` (the value and
        output projections of the dynamic attention it replaces, from the model's host)."""
        new = cls(p.value.in_features, p.num_heads, num_tokens, attn_dim=p.value.out_features,
                  qkv_bias=p.value.bias is not None, proj_bias=p.output.bias is not None)
        new = new.to(device=p.value.weight.device, dtype=p.value.weight.dtype)
        new.v, new.proj, new.norm, new.proj_drop = p.value, p.output, p.norm, p.drop
        return new

    # ----------------------------------------------------------------- the static map
    def static_map(self) -> torch.Tensor:
        """``softmax(logits)``: ``H x N x N``, differentiable (for the guidance loss)."""
        return self.logits.softmax(dim=-1)

    def set_map(self, attn_map: torch.Tensor, eps: float = 1e-6) -> None:
        """Initialise the logits so that the static map equals ``attn_map`` (``H x N x N``)."""
        if attn_map.shape != self.logits.shape:
            raise UsageError(f"map shape {tuple(attn_map.shape)} does not match the static "
                             f"logits {tuple(self.logits.shape)}")
        with torch.no_grad():
            self.logits.copy_(torch.log(attn_map.to(self.logits) + eps))

    def _map(self) -> torch.Tensor:
        if self.training:
            return self.static_map()
        return self._cache.get(self.logits, self.static_map)

    def train(self, mode: bool = True) -> StaticAttention:
        self._cache.clear()
        return super().train(mode)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        if n != self.num_tokens:
            raise DataError(f"static attention was built for {self.num_tokens} tokens but got "
                             f"{n}: the compressed model only runs at the input size of its plan")
        if attn_mask is not None or is_causal:
            raise UsageError("static attention does not take attention masks")
        a = self._map()
        if self.guide is not None and self.mix > 0:
            a = self.mix * self.guide + (1.0 - self.mix) * a
        v = self.v(x)
        if a.dim() == 3 and b > 1:
            # One product per head on a column slice of v: broadcasting the H x N x N map
            # against B x H x N x d would first copy it B times (more memory traffic than the
            # product itself at batch 32), and v would be copied into head-major order.
            d = self.head_dim
            out = torch.cat([torch.matmul(a[h], v[..., h * d:(h + 1) * d])
                             for h in range(self.num_heads)], dim=-1)
        else:
            v = v.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            out = torch.matmul(a, v).transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, tokens={self.num_tokens}"


def warn_uniform(layer: int) -> None:
    warnings.warn(f"no calibration data: static attention of block {layer} starts from a uniform "
                  "map. Pass calibration images to start from the layer's real attention.",
                  stacklevel=3)
