"""hetvit: faster Vision Transformers from their heterogeneous attention patterns.

Early layers get a static attention map (DGSSA), late layers a token aggregation pyramid (GLAD).
"""

from .plan import Plan, PlanError

__version__ = "0.1.0"

__all__ = ["Plan", "PlanError", "compress", "load", "save", "__version__"]


def __getattr__(name: str):
    # Keep `import hetvit` light: torch-heavy modules load on first use.
    if name == "compress":
        from .surgery import compress

        return compress
    if name in ("save", "load"):
        from . import io

        return getattr(io, name)
    if name == "analyze":
        from .patterns import analyze

        return analyze
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'hetvit' has no attribute {name!r}")
