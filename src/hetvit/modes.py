"""Train/eval mode as a scope: run a model in eval mode, then give it back as it was.

Calibration, analysis, MAC counting, export and fitting all run a model the caller owns in
eval mode. Each puts back every submodule's own flag afterwards (not one flag for the whole
model: a caller may have frozen part of it in eval mode on purpose), also when the work
fails. A leaf module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the scope; restore each submodule's mode after."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        # modules() is pre-order: a parent's train() sets its children, which then get their
        # own flag back; each module's own train() runs (static maps drop their caches).
        for module, training in modes:
            if module.training != training:
                module.train(training)
