"""The errors hetvit raises for bad input or state, under one base: :class:`HetvitError`.

A caller (the CLI first) can tell a mistake a user can fix, which deserves one clear line, from
a bug, which deserves its traceback: everything here derives from :class:`HetvitError`, and
nothing else the library lets out is meant for the user. Each class also derives from the
builtin it replaced (``ValueError``, ``TypeError``, ...), so code that caught those keeps
working.

This module imports nothing of hetvit, so every other module may import it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HetvitError", "UsageError", "PlanError", "UnsupportedModelError", "CheckpointError",
           "MisshapenWeightsError", "DataError", "ExportError", "AnalysisError", "TrainingError",
           "FitError", "BaselineError", "BenchError", "DemoError"]


class HetvitError(Exception):
    """Base of every error hetvit raises for input or state a user can fix."""


class UsageError(HetvitError, ValueError):
    """Arguments that do not go together or make no sense (an unknown choice, a bad count)."""


class PlanError(HetvitError, ValueError):
    """A plan that cannot be applied to the model it was given."""


class UnsupportedModelError(HetvitError, TypeError):
    """The model is not a ViT that hetvit knows how to compress."""


class CheckpointError(HetvitError, RuntimeError):
    """A checkpoint (a hetvit directory or a weights file) that is missing, incomplete, damaged
    or does not fit its model.

    ``path`` is the file (or directory) at fault, for callers that say how to restore it.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class MisshapenWeightsError(CheckpointError):
    """Weights whose tensors differ in shape from the model's: saved from another architecture
    or size (the CLI answers with the options that build the right one)."""


class DataError(HetvitError, ValueError):
    """A dataset, image folder or batch that cannot be used as asked."""


class ExportError(HetvitError, RuntimeError):
    """An ONNX export that cannot be made, or whose result does not match the model."""


class AnalysisError(HetvitError, ValueError):
    """An attention analysis or a recommendation that cannot be made from what was given."""


class TrainingError(HetvitError, ValueError):
    """A training or fine-tuning run that cannot start or resume as configured."""


class FitError(HetvitError, ValueError):
    """A label-free fit that cannot run on the student, teacher and images given."""


class BaselineError(HetvitError, ValueError):
    """A peer method (token merging, pruning) that cannot be applied to the model."""


class BenchError(HetvitError, ValueError):
    """A benchmark whose settings cannot be measured on this machine."""


class DemoError(HetvitError, RuntimeError):
    """The demo cannot find or use what it shows."""
