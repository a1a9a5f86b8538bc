"""A tensor derived from a parameter, computed once while the model is in eval mode.

The static map ``softmax(logits)`` and the aggregation matrix ``softmax(W)`` do not depend on
the input, so at inference they are computed once, not at every forward. The cache is keyed by
the parameter's storage, version, dtype and device: an in-place update, a ``load_state_dict``,
a ``.to()`` or a ``.half()`` each invalidate it, so a stale value is never used. Modules
clear it on ``train()`` / ``eval()`` too. A leaf module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["EvalCache"]


class EvalCache:
    """One cached value of ``compute()``, recomputed whenever ``param`` has changed."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def get(self, param: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (param._version, param.data_ptr(), param.dtype, param.device)
        if self._value is None or self._key != key:
            self._value, self._key = compute().detach(), key
        return self._value

    def clear(self) -> None:
        self._key, self._value = None, None
