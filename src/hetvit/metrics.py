"""Top-k accuracy: the one definition evaluation, validation and benchmarks share.

A target counts as top-k correct when it is among the ``k`` largest logits; with fewer than
``k`` classes every target is (top-5 of a 3-class model is 1.0, not an error). A leaf module.
"""

from __future__ import annotations

import torch

__all__ = ["topk_correct"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)
                 ) -> tuple[torch.Tensor, ...]:
    """Per ``k`` in ``ks``, a boolean tensor (one entry per image): target in the top ``k``."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top == target[:, None]
    return tuple(hit[:, :min(k, kmax)].any(-1) for k in ks)
