"""Distillation losses as pure functions: shared by label-free fitting and fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
            ) -> torch.Tensor:
    """Hinton distillation: ``T^2 KL(softmax(t/T) || softmax(s/T))``, averaged over the batch."""
    t = temperature
    return F.kl_div((student_logits / t).log_softmax(-1), (teacher_logits / t).log_softmax(-1),
                    reduction="batchmean", log_target=True) * t * t
