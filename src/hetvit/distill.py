"""The method's distillation losses, as pure functions of tensors.

Shared by label-free fitting (:mod:`hetvit.fitting`) and fine-tuning
(:class:`hetvit.lightning_modules.FinetuneModule`), and tested without Lightning. A student
with a token pyramid has fewer tokens than its teacher after each stage, so the teacher's
targets (attention maps, tokens) are first seen through the student's aggregation:
:func:`aggregation_path` gives the product of the matrices before each block,
:func:`project_map` and :func:`feature_loss` apply it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .aggregation import TokenAggregation
from .hosts import host_of

__all__ = ["kd_loss", "guidance_kl", "feature_loss", "project_map", "aggregation_path",
           "stage_ends", "relative_error"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
            ) -> torch.Tensor:
    """Hinton distillation: ``T^2 KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The ``T^2`` keeps the gradient's scale independent of the temperature.
    """
    t = temperature
    return F.kl_div((student_logits / t).log_softmax(-1), (teacher_logits / t).log_softmax(-1),
                    reduction="batchmean", log_target=True) * t * t


def guidance_kl(dynamic: torch.Tensor, static_logits: torch.Tensor) -> torch.Tensor:
    """``KL(A_dyn || softmax(logits))`` averaged over batch, heads and query rows.

    ``dynamic``: ``B x H x N x N`` teacher maps; ``static_logits``: ``H x N x N``. The KL runs
    from the dynamic maps so that the static map is pulled towards their mean, covering
    every key a teacher's row attends to.
    """
    log_static = static_logits.log_softmax(-1).unsqueeze(0)
    kl = torch.xlogy(dynamic, dynamic) - dynamic * log_static
    return kl.sum(-1).mean()


def project_map(attn_map: torch.Tensor, p: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """A teacher attention map (``B x H x N x N``) seen through aggregation ``p`` (``M x N_p``).

    Query rows are aggregated like tokens (``P A``); the attention an old key token received is
    shared among the new tokens it went into, in proportion to its weights (columns of ``P``
    normalised to one), so every row still sums to one. Prefix tokens pass unchanged.
    """
    if p is None:
        return attn_map
    m, n = p.shape
    full = torch.zeros(prefix + m, prefix + n, dtype=attn_map.dtype, device=attn_map.device)
    full[:prefix, :prefix] = torch.eye(prefix, dtype=attn_map.dtype, device=attn_map.device)
    full[prefix:, prefix:] = p.to(attn_map.dtype)
    share = full / full.sum(0, keepdim=True).clamp_min(1e-12)
    return full @ attn_map @ share.T


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, p: torch.Tensor | None,
                 prefix: int) -> torch.Tensor:
    """Relative squared error of the student's tokens against the teacher's, aggregated by ``p``.

    ``student``: ``B x (prefix + M) x D``; ``teacher``: ``B x (prefix + N_p) x D``; ``p``:
    ``M x N_p`` or ``None`` (no stage before this layer). Divided by the teacher tokens' mean
    square, so the weight means the same at every depth and width.
    """
    if p is not None:
        teacher = torch.cat([teacher[:, :prefix], p.to(teacher.dtype) @ teacher[:, prefix:]], 1)
    return relative_error(student, teacher)


def relative_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((s - t)^2) / mean(t^2)``: a squared error that does not depend on the features'
    scale, so one weight suits any model, depth and width."""
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)


def aggregation_path(student: nn.Module) -> dict[int, torch.Tensor | None]:
    """For each block of ``student``, the product of the aggregation matrices before it.

    ``None`` where no stage precedes the block (tokens are the original ones). The matrices are
    detached: they map teacher targets onto the student's tokens, and a target must not pull
    the aggregation towards itself.
    """
    path: dict[int, torch.Tensor | None] = {}
    total: torch.Tensor | None = None
    layer = 0
    for blk in host_of(student).sequence(student):
        if isinstance(blk, TokenAggregation):
            p = blk.matrix().detach()
            total = p if total is None else p @ total
            continue
        path[layer] = total
        layer += 1
    return path


def stage_ends(plan: Any, depth: int) -> list[int]:
    """The last layer of every pyramid stage: where feature distillation compares tokens."""
    starts = [layer for layer, _ in plan.pyramid]
    return [nxt - 1 for nxt in starts[1:]] + [depth - 1] if starts else []
