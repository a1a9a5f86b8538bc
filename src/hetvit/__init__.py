"""hetvit: faster Vision Transformers from their heterogeneous attention patterns.

Early layers get a static attention map (DGSSA), late layers a token aggregation pyramid (GLAD).
The common path, in top-level names::

    report = hetvit.analyze(teacher, images)          # where attention is static, low-rank
    student = hetvit.compress(teacher, "fast", calibration=images)
    student = hetvit.fit(student, teacher, unlabeled_images)            # no labels
    student = hetvit.finetune(teacher, plan, train_loader, val_loader)  # with labels
    hetvit.evaluate(student, val_loader); hetvit.save(student, "out/")
    hetvit.export_onnx(student, "student.onnx")

Everything else lives in the submodules (``hetvit.recommend``, ``hetvit.bench``, ...).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .errors import HetvitError
from .plan import Plan

__version__ = "0.1.0"

# Top-level name -> the module that defines it; loaded on first use, so that `import hetvit`
# stays light (no torch until a function needs it).
_LAZY = {
    "analyze": "patterns", "compress": "surgery", "fit": "fitting", "FitConfig": "fitting",
    "finetune": "training", "DistillConfig": "configs", "OptimConfig": "configs",
    "evaluate": "evaluation", "save": "io", "load": "io", "export_onnx": "export",
    "quantize_onnx": "quantize",
}
__all__ = ["Plan", "HetvitError", *_LAZY, "__version__"]
_SUBMODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                           if m.name not in ("cli", "__main__")))
"""Every submodule but the CLI's (``__main__`` would run it), read off the package itself so
that a new module is reachable as ``hetvit.NAME`` without a list to keep."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:  # hetvit.flops.formula_macs(...) after a plain `import hetvit`
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hetvit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES})
