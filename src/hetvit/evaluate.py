"""Top-1 / top-5 accuracy and mean cross-entropy of a classifier over a data loader."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hosts import logits as host_logits

__all__ = ["evaluate"]


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable[Any], device: str | torch.device | None = None,
             progress: bool = False) -> dict[str, float]:
    """Accuracy of ``model`` over ``loader`` of ``(images, targets)`` batches.

    Returns ``top1`` and ``top5`` (fractions in [0, 1]), ``loss`` (mean cross-entropy without
    label smoothing) and ``n`` (images counted). Batches that are ``None`` (every image
    unreadable, see :func:`hetvit.data.collate_skipping`) are passed over. The model is put in
    eval mode and restored to its previous mode afterwards.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    batches = loader
    if progress:
        from rich.progress import track

        total = len(loader) if hasattr(loader, "__len__") else None
        batches = track(loader, description="evaluating", total=total, transient=True)
    try:
        for batch in batches:
            if batch is None:
                continue
            images, target = batch
            images, target = images.to(device), target.to(device)
            logits = host_logits(model, images).float()
            if logits.shape[-1] <= int(target.max()):
                raise ValueError(f"a target class ({int(target.max())}) is beyond the model's "
                                 f"{logits.shape[-1]} outputs; is the class map right?")
            k = min(5, logits.shape[-1])
            topk = logits.topk(k, dim=-1).indices
            correct1 += int((topk[:, 0] == target).sum())
            correct5 += int((topk == target[:, None]).any(-1).sum())
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            n += int(target.shape[0])
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("no images were evaluated (the loader is empty)")
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n, "n": n}
