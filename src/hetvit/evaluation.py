"""Top-1 / top-5 accuracy and mean cross-entropy of a classifier over a data loader."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn

from .errors import DataError
from .hosts import logits as host_logits
from .metrics import topk_correct
from .modes import eval_mode

__all__ = ["evaluate"]


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable[Any], device: str | torch.device | None = None,
             progress: bool = False) -> dict[str, float]:
    """Accuracy of ``model`` over ``loader`` of ``(images, targets)`` batches.

    Returns ``top1`` and ``top5`` (fractions in [0, 1]), ``loss`` (mean cross-entropy without
    label smoothing) and ``n`` (images counted). Batches that are ``None`` (every image
    unreadable, see :func:`hetvit.data.collate_skipping`) are passed over. The model is put in
    eval mode and restored to its previous mode afterwards. Batches are moved to ``device``
    (default: where the model's parameters are); ``progress`` draws a progress bar.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    batches = loader
    if progress:
        total = len(loader) if hasattr(loader, "__len__") else None
        batches = track(loader, description="evaluating", total=total, transient=True)
    with eval_mode(model):
        for batch in batches:
            if batch is None:
                continue
            images, target = batch
            images, target = images.to(device), target.to(device)
            logits = host_logits(model, images).float()
            if logits.shape[-1] <= int(target.max()):
                raise DataError(f"a target class ({int(target.max())}) is beyond the model's "
                                 f"{logits.shape[-1]} outputs; is the class map right?")
            hit1, hit5 = topk_correct(logits, target)
            correct1 += int(hit1.sum())
            correct5 += int(hit5.sum())
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            n += int(target.shape[0])
    if n == 0:
        raise DataError("no images were evaluated (the loader is empty)")
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n, "n": n}
