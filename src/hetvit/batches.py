"""Image batches from whatever a caller holds: a tensor, a DataLoader, a list of batches.

Calibration, analysis, fitting and cluster initialisation all read images this way, so that a
user can pass what they have. A leaf module: it imports only hetvit's errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .errors import DataError

__all__ = ["image_batches"]


def image_batches(images: Any, batch_size: int | None = None) -> Iterator[torch.Tensor]:
    """The image tensors of ``images``: a B x C x H x W tensor (split into ``batch_size``
    chunks if given) or any iterable of batches, e.g. a DataLoader of ``(images, labels)``.

    A loader's batch whose images were all unreadable (``None``, see :func:`collate_skipping`)
    is passed over: its images were already warned about and counted.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise DataError(f"images must be a B x C x H x W tensor, got shape "
                             f"{tuple(images.shape)}")
        yield from (images.split(batch_size) if batch_size else (images,))
        return
    for item in images:
        if item is not None:
            yield item[0] if isinstance(item, (tuple, list)) else item
