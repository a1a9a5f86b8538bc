"""int8 quantization of hetvit's ONNX exports with onnxruntime's own tools, checked for agreement.

Compression and int8 multiply: a compressed model has fewer, fixed-shape dense MatMuls, which
is what int8 kernels run best. The quantizer is onnxruntime's (``quantize_dynamic``, or
``quantize_static`` in QDQ format with a calibration reader); what hetvit adds is the choice of
what to leave in float, the checks, and an atomic write:

- the graph check of :func:`hetvit.export.layer_matmuls` on the int8 graph (a static layer must
  still have no activation x activation MatMul, quantized or not);
- top-1 agreement with the fp32 PyTorch model and the largest logit difference, on random and
  on real images, reported as fp32 parity is; under ``min_agreement`` (default 98%) the export
  fails and nothing is written.

The defaults (:data:`DEFAULTS`) were chosen by measurement on the CIFAR-10 ``fast`` student and
DeiT-Small ``fast`` (``docs/int8.md``); ``benchmarks/int8.py`` re-measures them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .aggregation import TokenAggregation
from .attention import StaticAttention
from .batches import image_batches
from .errors import UnsupportedModelError
from .export import (
    INPUT_NAME,
    MIN_OPSET,
    ExportError,
    ExportResult,
    Parity,
    ParityError,
    _input_shape,
    _onnx,
    check_parity,
    export_onnx,
    import_onnxruntime,
    is_onnx_export,
    layer_matmuls,
    metadata,
    ort_session,
    temp_beside,
)
from .files import current_umask, new_parents_removed_on_error
from .hosts import host_of
from .surgery import plan_of

__all__ = ["quantize_onnx", "Quantization", "QuantParity", "QuantizeError", "node_groups",
           "MODES", "GROUPS", "DEFAULTS", "MIN_AGREEMENT"]

MODES = ("dynamic", "static")
GROUPS = ("softmax", "layernorm", "static_maps", "aggregation")
"""Node groups that can be left in float: the Softmax and LayerNormalization ops, the MatMuls
that multiply by a static layer's constant attention map, and the token-aggregation MatMuls."""
MIN_AGREEMENT = 0.98


class QuantizeError(ExportError):
    """The model or file cannot be quantized (bad input, missing tools, no calibration)."""


@dataclass(frozen=True)
class Quantization:
    """How a model is quantized to int8; validated on creation.

    ``per_channel``: one weight scale per output channel instead of one per tensor.
    ``exclude``: groups of :data:`GROUPS` kept in float. ``min_agreement``: the smallest
    accepted fraction of images whose int8 top-1 is the fp32 model's. ``op_types``: the op
    types quantized (``()``: every type onnxruntime's quantizer of the mode handles).
    """

    mode: str = "dynamic"
    per_channel: bool = False
    exclude: tuple[str, ...] = ()
    min_agreement: float = MIN_AGREEMENT
    op_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QuantizeError(f"unknown quantization mode {self.mode!r}: choose "
                                f"{' or '.join(MODES)}")
        unknown = sorted(set(self.exclude) - set(GROUPS))
        if unknown:
            raise QuantizeError(f"unknown node group(s) to exclude: {', '.join(unknown)}; "
                                f"choose from {', '.join(GROUPS)}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise QuantizeError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        object.__setattr__(self, "exclude", tuple(g for g in GROUPS if g in self.exclude))
        object.__setattr__(self, "op_types", tuple(self.op_types))

    @classmethod
    def default(cls, mode: str = "dynamic", min_agreement: float = MIN_AGREEMENT
                ) -> Quantization:
        """The measured defaults of ``mode`` (:data:`DEFAULTS`)."""
        if mode not in DEFAULTS:
            raise QuantizeError(f"unknown quantization mode {mode!r}: choose "
                                f"{' or '.join(MODES)}")
        return cls(mode=mode, **DEFAULTS[mode], min_agreement=min_agreement)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "per_channel": self.per_channel,
                "exclude": list(self.exclude), "op_types": list(self.op_types),
                "min_agreement": self.min_agreement}


DEFAULTS: dict[str, dict[str, Any]] = {
    "dynamic": {"per_channel": False, "exclude": ()},
    "static": {"per_channel": True, "exclude": ("static_maps", "aggregation"),
               "op_types": ("Conv", "MatMul", "Gemm")},
}
"""Per mode, the per-channel setting, the groups kept in float and the op types quantized, as
chosen by measurement (``docs/int8.md``); the static mode's uint8 activations likewise."""


@dataclass
class QuantParity(Parity):
    """:class:`hetvit.export.Parity` of an int8 graph: int8 changes logits by far more than
    fp32's tolerance, so what must hold is top-1 agreement of at least ``min_agreement``; the
    largest logit difference is reported, not bounded."""

    min_agreement: float = MIN_AGREEMENT

    @property
    def agreement(self) -> float:
        return (self.top1_agree + self.ties) / self.images if self.images else 0.0

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.name} (int8 vs fp32): {self.images} images, top-1 agree "
                f"{self.top1_agree + self.ties}/{self.images} ({100 * self.agreement:.2f}%, "
                f"min {100 * self.min_agreement:.0f}%), max |diff| {self.max_abs_diff:.3g}: "
                f"{verdict}")


# ----------------------------------------------------------------------------- dependencies
def import_quantization() -> Any:
    """onnxruntime's quantization tools, or a :class:`QuantizeError` saying how to get them."""
    try:
        import onnxruntime.quantization as quantization
    except ImportError:
        raise QuantizeError("onnxruntime's quantization tools (onnxruntime.quantization) are "
                            "missing: pip install onnxruntime (or hetvit[export])") from None
    return quantization


# ----------------------------------------------------------------------------- node groups
_STATIC_MAP = re.compile(r"/attn/MatMul(_\d+)?$")


def node_groups(model: nn.Module, onnx_path: str | os.PathLike) -> dict[str, list[str]]:
    """The names of the fp32 graph's nodes in each group of :data:`GROUPS`.

    Relies on the module-scoped node names of hetvit's export (``/blocks/blocks.3/attn/MatMul``)
    and on the host's block sequence (:meth:`hetvit.hosts.base.Host.sequence_position`).
    """
    graph = _onnx().load(str(onnx_path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    host = host_of(model)
    kinds = {i: ("aggregation" if isinstance(b, TokenAggregation) else
                 "static" if isinstance(host.attention(b), StaticAttention) else "dynamic")
             for i, b in enumerate(host.sequence(model))}
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for node in graph.node:
        if node.op_type == "Softmax":
            groups["softmax"].append(node.name)
        elif node.op_type == "LayerNormalization":
            groups["layernorm"].append(node.name)
        elif node.op_type == "MatMul":
            position = host.sequence_position(node.name)
            kind = kinds.get(position) if position is not None else None
            if kind == "aggregation":
                groups["aggregation"].append(node.name)
            elif (kind == "static" and _STATIC_MAP.search(node.name)
                  and any(i in constants for i in node.input)):
                groups["static_maps"].append(node.name)
    return groups


# ----------------------------------------------------------------------------- calibration
def _reader(q: Any, batches: Iterable[torch.Tensor]) -> Any:
    """An onnxruntime ``CalibrationDataReader`` over ``batches`` (it must subclass theirs)."""

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[torch.Tensor] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            if batch is None:
                return None
            return {INPUT_NAME: np.ascontiguousarray(batch.float().numpy())}

    return Reader()


def _calibration_batches(calibration: torch.Tensor | Iterable[Any] | None,
                         batch_size: int = 32) -> list[torch.Tensor]:
    batches = [] if calibration is None else list(image_batches(calibration, batch_size))
    batches = [b for b in batches if len(b)]
    if not batches:
        raise QuantizeError("static quantization needs calibration images (a few hundred, "
                            "through the model's eval transform: --calibration DIR, or "
                            "hetvit.data.sample_images); or use mode 'dynamic'")
    return batches


# ----------------------------------------------------------------------------- quantizing
def _check_source(source: Path) -> None:
    """``source`` must be an fp32 ONNX file written by hetvit's export."""
    if not source.is_file():
        raise QuantizeError(f"{source} is not a file: give the .onnx that hetvit export wrote")
    if not is_onnx_export(source):
        raise QuantizeError(f"{source} is not an ONNX export of PyTorch (the file does not start "
                            "as one): hetvit quantizes the .onnx files hetvit export writes")
    meta = metadata(source)
    if meta is None:
        raise QuantizeError(f"{source} is an ONNX model but not a hetvit export (no hetvit "
                            "metadata): export it with hetvit export / hetvit.export_onnx")
    if meta.get("quantization"):
        raise QuantizeError(f"{source} is already quantized ({meta['quantization']['mode']} "
                            "int8): give the fp32 export")


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """onnxruntime's quantization tools log advice and per-tensor notes as root-logger
    warnings (e.g. that a LayerNorm weight has no channel axis); a user of hetvit cannot act
    on them, and the checks that follow say what matters."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _run_quantizer(q: Any, config: Quantization, model: nn.Module, source: Path, target: Path,
                   calibration: list[torch.Tensor] | None, work: Path) -> None:
    groups = node_groups(model, source)
    exclude = [name for g in config.exclude for name in groups[g]]
    if config.mode == "dynamic":
        q.quantize_dynamic(str(source), str(target), weight_type=q.QuantType.QInt8,
                           per_channel=config.per_channel, nodes_to_exclude=exclude,
                           op_types_to_quantize=list(config.op_types) or None)
        return
    prepared = work / "prepared.onnx"
    # onnxruntime's recommended pre-processing: shape inference and graph simplification, so
    # that the calibrator sees the tensors the quantizer will rewrite.
    q.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    q.quantize_static(str(prepared), str(target), _reader(q, calibration or []),
                      quant_format=q.QuantFormat.QDQ, per_channel=config.per_channel,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      nodes_to_exclude=exclude, calibrate_method=q.CalibrationMethod.MinMax,
                      op_types_to_quantize=list(config.op_types) or None)


def _stamp(source: Path, target: Path, config: Quantization) -> None:
    """Copy the fp32 export's hetvit metadata to the int8 graph, saying how it was quantized."""
    onnx = _onnx()
    meta = dict(metadata(source) or {})
    meta["quantization"] = config.to_dict()
    proto = onnx.load(str(target))
    del proto.metadata_props[:]
    proto.metadata_props.add(key="hetvit", value=json.dumps(meta))
    onnx.save(proto, str(target))


def quantize_onnx(model: nn.Module, path: str | os.PathLike,
                  quantization: Quantization | str = "dynamic", *,
                  calibration: torch.Tensor | Iterable[Any] | None = None,
                  images: torch.Tensor | Iterable[Any] | None = None,
                  source: str | os.PathLike | None = None, opset: int = MIN_OPSET,
                  random_images: int = 64) -> ExportResult:
    """Write an int8 ONNX graph of ``model`` to ``path``, checked against ``model`` in fp32.

    Args:
        model: a ViT of a supported host (timm or Hugging Face), compressed or not, float32: it
            is exported, and it is the reference the int8 graph must agree with.
        path: the ``.onnx`` file to write; it appears only once every check has passed.
        quantization: a :class:`Quantization`, or a mode name (its measured defaults).
        calibration: for static mode, the images whose activation ranges set the scales (a few
            hundred, through the model's eval transform): a tensor or an iterable of batches,
            e.g. :func:`hetvit.data.sample_images`.
        images: real, preprocessed images for the agreement check (default: the calibration
            images in static mode, ``random_images`` random ones in dynamic mode).
        source: an fp32 ``.onnx`` of ``model`` already written by hetvit's export, to quantize
            instead of exporting again.

    Raises:
        QuantizeError: bad input (not a hetvit model or export, no calibration images for static
            mode, onnxruntime's quantization tools missing).
        ParityError: the int8 graph failed the graph check or agreed too rarely (``.result``
            holds the figures); nothing is written.
        ExportError: a model the fp32 export refuses (not float32, say: see
            :func:`hetvit.export.export_onnx`).
    """
    config = (quantization if isinstance(quantization, Quantization)
              else Quantization.default(quantization))
    q = import_quantization()
    import_onnxruntime()
    try:
        host_of(model)
    except UnsupportedModelError:
        raise QuantizeError(f"{type(model).__name__} is not a model hetvit exports: hetvit "
                            "quantizes its own exports") from None
    try:
        c, h, w = _input_shape(model)
    except ExportError as e:
        raise QuantizeError(str(e)) from None
    if source is not None:
        _check_source(Path(source))
    batches = _calibration_batches(calibration) if config.mode == "static" else None
    path = Path(path)
    with new_parents_removed_on_error(path):  # the temporary makes any missing folders
        tmp = temp_beside(path)
        try:
            with tempfile.TemporaryDirectory(prefix="hetvit-int8-") as d:
                work = Path(d)
                fp32 = Path(source) if source is not None else work / "fp32.onnx"
                if source is None:
                    export_onnx(model, fp32, opset=opset, check=False)
                try:
                    with _quiet_logging():
                        _run_quantizer(q, config, model, fp32, tmp, batches, work)
                except Exception as e:
                    raise QuantizeError(f"onnxruntime could not quantize the model: {e}") from e
                _stamp(fp32, tmp, config)
            result = ExportResult(path=path, opset=opset, static_layers=plan_of(model).static,
                                  quantization=config)
            result.matmuls = layer_matmuls(model, tmp)
            name, imgs = _agreement_images(images, batches, (random_images, c, h, w))
            p = check_parity(model, ort_session(tmp), imgs, name=name)
            result.parity.append(QuantParity(**{**vars(p), "min_agreement": config.min_agreement}))
            if not result.passed:
                raise ParityError(_failure_message(result), result)
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return result


def _agreement_images(images: torch.Tensor | Iterable[Any] | None,
                      calibration: list[torch.Tensor] | None, shape: tuple[int, ...]
                      ) -> tuple[str, Any]:
    """What the int8 graph's agreement is measured on: the real images when given, else the
    calibration images (real, though the scales were fitted on them), else random ones.

    Unlike fp32 parity, random images are no test of an int8 graph calibrated on real ones:
    they lie outside the ranges its scales cover, and fail where real inputs would pass.
    """
    if images is not None:
        return "real images", images
    if calibration:
        return "calibration images", calibration
    return "random images", torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _failure_message(result: ExportResult) -> str:
    lines = [f"the int8 export to {result.path} failed its checks; nothing was written"]
    if not result.graph_ok:
        bad = [i for i in result.static_layers if result.matmuls.get(i, 0)]
        lines.append(f"static layer(s) {bad} have activation x activation MatMuls")
    lines += [str(p) for p in result.parity if not p.passed]
    return "\n".join(lines)
