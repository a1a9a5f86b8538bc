"""hetvit: faster Vision Transformers from their heterogeneous attention patterns.

Early layers get a static attention map (DGSSA), late layers a token aggregation pyramid (GLAD).
"""

from .plan import Plan, PlanError

__version__ = "0.1.0"

__all__ = ["Plan", "PlanError", "compress", "fit", "FitConfig", "load", "save", "analyze",
           "export_onnx", "quantize_onnx", "__version__"]
_SUBMODULES = ("aggregation", "attention", "baselines", "bench", "bench_int8", "data", "demo",
               "evaluate", "export", "fitting", "flops", "io", "onnx_model", "patterns", "plan",
               "quantize", "surgery", "training")


def __getattr__(name: str):
    # Keep `import hetvit` light: torch-heavy modules load on first use.
    if name == "compress":
        from .surgery import compress

        return compress
    if name in ("fit", "FitConfig"):
        from . import fitting

        return getattr(fitting, name)
    if name in ("save", "load"):
        from . import io

        return getattr(io, name)
    if name == "analyze":
        from .patterns import analyze

        return analyze
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    if name == "quantize_onnx":
        from .quantize import quantize_onnx

        return quantize_onnx
    if name in _SUBMODULES:  # hetvit.flops.formula_macs(...) after a plain `import hetvit`
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hetvit' has no attribute {name!r}")
