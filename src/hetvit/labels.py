"""A model's class names: which dataset folder is which output.

Kept on the model itself (``hetvit_classes``) so that it travels through ``compress``, ``save``
and ``load``; a wrong list would map every label to a wrong output, so lists are checked.
A leaf module: it imports only hetvit's errors.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import DataError

__all__ = ["class_names", "check_class_names"]


def class_names(model: nn.Module) -> list[str] | None:
    """The names of ``model``'s classes (name ``i`` is output ``i``), or ``None`` when unknown.

    Kept on the model as ``hetvit_classes``: :func:`load` and the training runs set it, and
    :func:`hetvit.compress` copies it with the rest of the model.
    """
    names = getattr(model, "hetvit_classes", None)
    return list(names) if names is not None else None


def check_class_names(names: Any, num_classes: int | None) -> list[str]:
    """``names`` as a list of distinct strings, one per output, or :class:`DataError` saying why.

    A wrong list would be worse than none: every label would be mapped to a wrong output.
    """
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"class names must be a list of non-empty strings, got {names!r}")
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if list(names).count(n) > 1})
        raise DataError(f"class names repeat: {', '.join(twice[:5])}")
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f"{len(names)} class names for a model with {num_classes} outputs")
    return list(names)
