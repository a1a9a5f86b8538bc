"""Image batches from whatever a caller holds: a tensor, a DataLoader, a list of batches.

Calibration, analysis, fitting and cluster initialisation all read images this way, so that a
user can pass what they have. A leaf module: it imports only hetvit's errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .errors import DataError

__all__ = ["image_batches", "is_batches", "size_mismatch"]


def image_batches(images: Any, batch_size: int | None = None) -> Iterator[torch.Tensor]:
    """The image tensors of ``images``: a B x C x H x W tensor (split into ``batch_size``
    chunks if given) or any iterable of batches, e.g. a DataLoader of ``(images, labels)``.

    A loader's batch whose images were all unreadable (``None``, see :func:`collate_skipping`)
    is passed over: its images were already warned about and counted.
    """
    if isinstance(images, torch.Tensor):
        images = _checked(images)
        yield from (images.split(batch_size) if batch_size else (images,))
        return
    if not is_batches(images):
        raise DataError(f"images must be a B x C x H x W tensor or an iterable of such batches "
                        f"(a DataLoader, say), got {type(images).__name__}")
    for item in images:
        if item is not None:
            yield _checked(item[0] if isinstance(item, (tuple, list)) else item)


def is_batches(images: Any) -> bool:
    """Whether ``images`` can be read as batches at all: a tensor or an iterable (a string or
    a mapping is not, though Python iterates them)."""
    return isinstance(images, torch.Tensor) or (
        isinstance(images, Iterable) and not isinstance(images, str | bytes | Mapping))


def _checked(batch: Any) -> torch.Tensor:
    """``batch`` if it is a batch of images (a 4-d tensor), else a :class:`DataError` naming what
    it is: a list of file names or arrays fails here, not deep inside a model."""
    if not isinstance(batch, torch.Tensor):
        raise DataError(f"a batch of images must be a B x C x H x W tensor (or an (images, "
                        f"labels) pair), got {type(batch).__name__}")
    if batch.ndim != 4:
        raise DataError(f"images must be a B x C x H x W tensor, got shape "
                        f"{tuple(batch.shape)}")
    return batch


def size_mismatch(images: torch.Tensor, want: tuple[int, ...], what: str = "the images"
                  ) -> str | None:
    """The one line that says ``images`` are not of the size ``want`` (C x H x W) a model
    takes, and what to do; ``None`` when they are. Calibration and fitting say it alike."""
    got = tuple(images.shape[1:])
    if got == tuple(want):
        return None
    return (f"{what} are {got} (C x H x W) but the model takes {tuple(want)}: resize them "
            "with the model's eval transform")
