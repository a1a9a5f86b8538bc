"""An exported ``.onnx`` file (fp32 or int8) run by onnxruntime, in the shape of a model.

What is deployed is the graph, not the PyTorch module it came from; quantization changes its
outputs, so its accuracy has to be measured on the graph itself. :class:`OnnxClassifier` gives
the graph the few attributes hetvit's data and evaluation code read from a model (its input
size, eval-transform config, class names, number of outputs), all from the metadata that
``hetvit export`` records in the file, so ``hetvit evaluate`` needs nothing but the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .export import INPUT_NAME, ExportError, is_onnx_export, metadata, ort_session

__all__ = ["OnnxClassifier", "is_onnx_file"]


def is_onnx_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ONNX file of the kind ``hetvit export`` writes (fp32 or int8)."""
    return Path(path).is_file() and is_onnx_export(path)


class OnnxClassifier(nn.Module):
    """``forward(images) -> logits`` through an onnxruntime CPU session of a hetvit export.

    It has no parameters; ``eval()``/``train()`` change nothing (the graph is inference only).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        path = Path(path)
        if not is_onnx_file(path):
            raise ExportError(f"{path} is not an ONNX file written by hetvit export")
        meta = metadata(path)
        if meta is None or "data_config" not in meta:
            raise ExportError(f"{path} has no hetvit metadata (input size, transform, classes): "
                              "export it again with hetvit export")
        self.path = path
        self.session = ort_session(path, threads=threads)
        cfg = dict(meta["data_config"])
        size = tuple(int(s) for s in cfg["input_size"])
        self.pretrained_cfg = cfg
        self.hetvit_data_config = cfg  # read by hetvit.data.data_config: no host to ask
        self.input_size = size
        self.num_classes = int(self.session.get_outputs()[0].shape[-1])
        if meta.get("classes") is not None:
            self.hetvit_classes = list(meta["classes"])
        # how the graph was quantized (hetvit.quantize.Quantization.to_dict), None for fp32
        self.quantization: dict[str, Any] | None = meta.get("quantization")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: x})[0])
