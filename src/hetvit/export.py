"""ONNX export of (compressed) ViTs, and onnxruntime checks that the export computes the same.

The point of DGSSA for deployment is that a static layer ships no q/k work at all: in eval mode
its attention map is a cached tensor, so tracing turns it into a constant initializer and the
graph keeps only ``v``, ``A @ V`` and the output projection. :func:`layer_matmuls` verifies this
on the exported graph, and :func:`check_parity` compares onnxruntime with PyTorch.

Exports are atomic: the graph is written to a temporary file beside the target, checked, and
only then renamed into place, so a failed export or a failed check never leaves a ``.onnx`` file
that looks usable.

The legacy TorchScript exporter (``dynamo=False``) is used: it needs no extra dependency, and it
names nodes after the modules they come from (``/blocks/blocks.3/attn/MatMul``), which is what
lets the graph check attribute each MatMul to a layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .aggregation import TokenAggregation
from .attention import StaticAttention
from .batches import image_batches
from .data import IMAGE_EXTENSIONS, data_config, make_transform, open_images
from .errors import DataError, ExportError, UnsupportedModelError
from .files import clean_stale_temps, current_umask, new_parents_removed_on_error, temp_prefix
from .hosts import describe, host_of, logits
from .io import _jsonable
from .labels import class_names
from .modes import eval_mode
from .surgery import plan_of

__all__ = ["export_onnx", "check_parity", "layer_matmuls", "ort_session", "ort_runner",
           "load_images", "is_onnx_export", "metadata",
           "ExportError", "ParityError", "Parity", "ExportResult", "MIN_OPSET", "MAX_OPSET"]

MIN_OPSET = 17


def _max_opset() -> int:
    """The newest opset the TorchScript exporter writes. Past it, torch fails with a dump of the
    whole graph instead of a sentence, so :func:`export_onnx` checks it first; the constant is
    private to torch, hence the fallback: 20, torch 2.14's value."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


MAX_OPSET = _max_opset()
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass
class Parity:
    """How closely onnxruntime reproduces PyTorch on one set of images.

    ``ties`` counts images whose top-1 differs only because PyTorch's two best logits are
    within ``atol`` of each other: at that tolerance either class is a correct answer, so such
    an image is not a disagreement. It is reported so that it is never hidden.
    """

    name: str
    images: int
    max_abs_diff: float
    top1_agree: int
    ties: int = 0
    atol: float = 1e-4

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.top1_agree + self.ties == self.images

    def __str__(self) -> str:
        tie = f" ({self.ties} tie(s) within atol)" if self.ties else ""
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.name}: {self.images} images, max |diff| {self.max_abs_diff:.2e} "
                f"(atol {self.atol:.0e}), top-1 agree {self.top1_agree}/{self.images}{tie}: "
                f"{verdict}")


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and what its checks found.

    ``matmuls`` maps each transformer layer (plan numbering) to the number of MatMuls in it
    whose two inputs both depend on the image: ``q k^T`` and ``A V`` in a dynamic layer (2), none
    in a static one.
    """

    path: Path
    opset: int
    static_layers: tuple[int, ...] = ()
    matmuls: dict[int, int] = field(default_factory=dict)
    parity: list[Parity] = field(default_factory=list)
    quantization: Any = None
    """How the graph was quantized (:class:`hetvit.quantize.Quantization`); ``None``: fp32."""

    @property
    def graph_ok(self) -> bool:
        return all(self.matmuls.get(i, 0) == 0 for i in self.static_layers)

    @property
    def passed(self) -> bool:
        return self.graph_ok and all(p.passed for p in self.parity)


class ParityError(ExportError):
    """The export ran but its checks failed; ``result`` holds the figures."""

    def __init__(self, message: str, result: ExportResult) -> None:
        super().__init__(message)
        self.result = result


# ----------------------------------------------------------------------------- dependencies
def import_onnxruntime() -> Any:
    """The onnxruntime module, or an :class:`ExportError` saying how to get it.

    Called before any work that needs it (the CLI calls it before loading the model), so that a
    missing package costs one line, not an export thrown away.
    """
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("onnxruntime is not installed, so the export cannot be checked: "
                          "pip install onnxruntime (or hetvit[export]), or skip the check "
                          "(--no-check / check=False)") from None
    return onnxruntime


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ExportError("the onnx package is not installed: pip install onnx "
                          "(or hetvit[export])") from None
    return onnx


# ----------------------------------------------------------------------------- export
def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    try:
        return host_of(model).input_size(describe(model))
    except UnsupportedModelError as e:
        raise ExportError(f"cannot export {type(model).__name__}: {e}") from None


@contextlib.contextmanager
def _inference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode with no teacher guidance, restored afterwards.

    Eval mode is what makes the static maps and aggregation matrices cached tensors, which
    tracing records as constants; a guide left over from fine-tuning would bake one batch of
    teacher attention into the graph.
    """
    guides = [(m, m.guide, m.mix) for m in model.modules() if isinstance(m, StaticAttention)]
    for m, _, _ in guides:
        m.guide, m.mix = None, 0.0
    try:
        with eval_mode(model):
            yield
    finally:
        for m, guide, mix in guides:
            m.guide, m.mix = guide, mix


class _Logits(nn.Module):
    """``model`` with its host's :meth:`~hetvit.hosts.base.Host.logits` as forward, so that
    a library whose forward returns an output object exports one tensor. Its one child is
    ``model`` under the name ``model``: node scopes gain a ``/model`` in front."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits(self.model, x)


def _write_onnx(model: nn.Module, path: Path, opset: int, batch_size: int) -> None:
    c, h, w = _input_shape(model)
    param = next(model.parameters())
    example = torch.randn(batch_size, c, h, w, device=param.device, dtype=param.dtype)
    with _inference_mode(model), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about the token-count checks; token shapes are static by design.
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model), (example,), str(path), opset_version=opset, dynamo=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    _stamp(model, path)


def _stamp(model: nn.Module, path: Path) -> None:
    """Record in the graph's metadata what running it needs besides the graph: the eval
    transform's data config and the class names, so that an ``.onnx`` file alone can be
    evaluated (:mod:`hetvit.onnx_model`), and the plan, which marks it as hetvit's export."""
    from .surgery import plan_of

    onnx = _onnx()
    proto = onnx.load(str(path))
    meta = {"format": 1, "data_config": _jsonable(data_config(model)),
            "classes": class_names(model), "plan": plan_of(model).to_dict()}
    proto.metadata_props.add(key="hetvit", value=json.dumps(meta))
    onnx.save(proto, str(path))


def metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The hetvit metadata of an ONNX file (see :func:`_stamp`), or ``None`` if it has none."""
    onnx = _onnx()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    value = next((p.value for p in proto.metadata_props if p.key == "hetvit"), None)
    try:
        return json.loads(value) if value is not None else None
    except ValueError:
        return None


def is_onnx_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts as an ONNX model written by ``torch.onnx`` does: field 1
    (``ir_version``) then field 2 (``producer_name``) ``"pytorch"``, or as one quantized by
    onnxruntime (``"onnx.quantize"``, :mod:`hetvit.quantize`).

    What ``hetvit export`` writes, so a re-export may replace it without ``--force``; a file of
    any other kind is not replaced unasked. Reads 32 bytes, whatever the file's size.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return False
    if head[:1] != b"\x08":
        return False
    i = 1
    while i < len(head) and head[i] & 0x80:  # the varint of ir_version
        i += 1
    return (head[i + 1:i + 10] == b"\x12\x07pytorch"
            or head[i + 1:i + 16] == b"\x12\x0donnx.quantize")


def temp_beside(path: Path) -> Path:
    """An empty temporary file in ``path``'s directory (created if needed).

    Beside the target, so that renaming it into place is atomic. Missing folders are created:
    run it inside :func:`hetvit.files.new_parents_removed_on_error` so that a failure takes
    them away again.
    Stale temporaries of killed exports to ``path`` are removed first.
    """
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory; give a file name such as "
                          f"{path / 'model.onnx'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"cannot write {path}: {parent} is a file, not a directory")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent, path.name)  # those of killed exports to this path
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    return Path(tmp)


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = MIN_OPSET,
                batch_size: int = 1, check: bool = True,
                images: torch.Tensor | Iterable[Any] | None = None,
                atol: float = 1e-4, random_images: int = 8) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` with a dynamic batch axis; check it; return figures.

    Args:
        model: a ViT of a supported host (timm or Hugging Face), compressed or not, in
            float32. It is exported in eval mode (its mode is restored afterwards).
        path: the ``.onnx`` file to write. It appears only once the export and its checks have
            passed; an existing file is replaced then.
        opset: ONNX opset, from 17 (the first with LayerNormalization) to ``MAX_OPSET``.
        batch_size: batch of the example input used for tracing; the batch axis is dynamic
            whatever it is. Token shapes are static: the model runs at its plan's input size.
        check: verify the graph (no ``q k^T`` in static layers) and compare onnxruntime with
            PyTorch on ``random_images`` random inputs and on ``images`` when given. Needs
            onnxruntime.
        images: real, preprocessed images for the parity check: a tensor ``B x C x H x W`` or
            an iterable of batches (see :func:`check_parity`); :func:`load_images` makes one.
        atol: the largest accepted absolute difference of the logits.

    Raises:
        ExportError: the model cannot be exported or ``path`` cannot be written.
        ParityError: the checks failed (``.result`` holds the figures); nothing is written.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported: hetvit exports with opsets "
                          f"{MIN_OPSET} to {MAX_OPSET} (the oldest with LayerNormalization, and "
                          "the newest torch's exporter writes)")
    if batch_size < 1:
        raise ExportError(f"batch_size must be at least 1, got {batch_size}")
    param = next(model.parameters(), None)
    if param is None or param.dtype != torch.float32:
        raise ExportError("hetvit exports float32 models (the parity tolerance is for fp32); "
                          "call model.float() first")
    _input_shape(model)
    if check:
        import_onnxruntime()  # fail before any work, not after the export
    path = Path(path)
    with new_parents_removed_on_error(path):
        return _export_checked(model, path, opset, batch_size, check, images, atol,
                               random_images)


def _export_checked(model: nn.Module, path: Path, opset: int, batch_size: int, check: bool,
                    images: torch.Tensor | Iterable[Any] | None, atol: float,
                    random_images: int) -> ExportResult:
    """The export of :func:`export_onnx` once its arguments are checked: written to a
    temporary beside ``path``, checked, and renamed into place only if the checks pass."""
    tmp = temp_beside(path)
    try:
        try:
            _write_onnx(model, tmp, opset, batch_size)
        except Exception as e:
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {e}") from e
        result = ExportResult(path=path, opset=opset, static_layers=plan_of(model).static)
        result.matmuls = layer_matmuls(model, tmp)
        if check:
            session = ort_session(tmp)
            c, h, w = _input_shape(model)
            gen = torch.Generator().manual_seed(0)
            random = torch.randn(random_images, c, h, w, generator=gen)
            result.parity.append(check_parity(model, session, random, atol, "random images"))
            if images is not None:
                result.parity.append(check_parity(model, session, images, atol, "real images"))
        if not result.passed:
            raise ParityError(_failure_message(result), result)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; give it a normal mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def _failure_message(result: ExportResult) -> str:
    lines = [f"the export to {result.path} failed its checks; nothing was written"]
    if not result.graph_ok:
        bad = [i for i in result.static_layers if result.matmuls.get(i, 0)]
        lines.append(f"static layer(s) {bad} still compute attention from the image "
                     "(activation x activation MatMuls in the graph)")
    lines += [str(p) for p in result.parity if not p.passed]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- graph check
MATMULS = frozenset({"MatMul", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
                     "MatMulIntegerToFloat"})
"""A matrix product in fp32 or in one of onnxruntime's int8 forms."""


def layer_matmuls(model: nn.Module, onnx_path: str | os.PathLike) -> dict[int, int]:
    """Per transformer layer, the MatMuls of ``onnx_path`` whose two inputs depend on the image.

    A dynamic attention layer has two (``q k^T`` and ``A V``); a static layer none, because
    its map is a constant and its projections multiply by weights. Layers are numbered as in
    the plan; the host tells which layer a node's scoped name belongs to
    (:meth:`hetvit.hosts.base.Host.layer_of_node`). Aggregation stages are not layers: a
    content-aware one reads the image by design (its scores and ``P(X) X``).
    """
    onnx = _onnx()
    host = host_of(model)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    dynamic = {i.name for i in graph.input}
    dynamic -= {i.name for i in graph.initializer}
    counts = dict.fromkeys(range(len(host.layers(model))), 0)
    for node in graph.node:  # ONNX graphs are topologically sorted
        if any(name in dynamic for name in node.input):
            dynamic.update(node.output)
            if node.op_type in MATMULS and all(name in dynamic for name in _operands(node)):
                if isinstance(host.module_of_node(model, node.name), TokenAggregation):
                    continue
                layer = host.layer_of_node(model, node.name)
                if layer is None:
                    raise ExportError(f"graph check: cannot tell which layer the image x image "
                                      f"MatMul {node.name!r} belongs to")
                counts[layer] += 1
    return counts


def _operands(node: Any) -> list[str]:
    """The two matrices of a MatMul node (QLinearMatMul interleaves scales and zero points)."""
    if node.op_type == "QLinearMatMul":
        return [node.input[0], node.input[3]]
    return list(node.input[:2])


# ----------------------------------------------------------------------------- onnxruntime
def ort_session(onnx_path: str | os.PathLike, threads: int | None = None,
                spinning: bool = False) -> Any:
    """An onnxruntime CPU session with all graph optimisations.

    ``threads``: intra-op threads (None: onnxruntime's default, one per physical core). Spinning
    worker threads are off by default: they keep cores busy after a run ends, which slows
    whatever runs next in the same process (the other model in a side-by-side benchmark).
    """
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(onnx_path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def ort_runner(model: nn.Module, batch_size: int = 1, threads: int | None = None,
               opset: int = MIN_OPSET, spinning: bool = False
               ) -> Callable[[torch.Tensor | np.ndarray], np.ndarray]:
    """Export ``model`` to a temporary file and return ``run(images) -> logits`` (numpy).

    For benchmarks: the file is deleted once the session holds the graph, and the returned
    callable takes a torch tensor or a numpy array of any batch size (``batch_size`` is only
    the tracing example). Its ``session`` attribute is the onnxruntime session.
    """
    with tempfile.TemporaryDirectory(prefix="hetvit-onnx-") as d:
        path = Path(d) / "model.onnx"
        export_onnx(model, path, opset=opset, batch_size=batch_size, check=False)
        session = ort_session(path, threads=threads, spinning=spinning)

    def run(images: torch.Tensor | np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: _numpy(images)})[0]

    run.session = session  # type: ignore[attr-defined]
    return run


# ----------------------------------------------------------------------------- parity
@torch.no_grad()
def check_parity(model: nn.Module, onnx: str | os.PathLike | Any,
                 images: torch.Tensor | Iterable[Any], atol: float = 1e-4,
                 name: str = "images", batch_size: int = 32) -> Parity:
    """Compare the logits of ``model`` (PyTorch) and ``onnx`` (a path or a session).

    ``images`` is a tensor ``B x C x H x W`` or an iterable of tensors or ``(images, labels)``
    batches (a DataLoader); it is run in chunks of ``batch_size``.
    """
    session = onnx if hasattr(onnx, "run") else ort_session(onnx)
    param = next(model.parameters())
    worst, agree, ties, n = 0.0, 0, 0, 0
    with _inference_mode(model):
        for batch in image_batches(images, batch_size):
            ref = logits(model, batch.to(param)).float().cpu().numpy()
            out = session.run(None, {INPUT_NAME: _numpy(batch)})[0]
            if out.shape != ref.shape:
                raise ExportError(f"onnxruntime returned shape {out.shape}, PyTorch "
                                  f"{ref.shape}")
            worst = max(worst, float(np.abs(out - ref).max()) if ref.size else 0.0)
            same = out.argmax(-1) == ref.argmax(-1)
            agree += int(same.sum())
            # A differing top-1 where PyTorch's own top-2 gap is within atol is a tie.
            top2 = np.sort(ref, axis=-1)[:, -2:] if ref.shape[-1] > 1 else None
            if top2 is not None:
                ties += int((~same & (top2[:, 1] - top2[:, 0] <= atol)).sum())
            n += len(ref)
    return Parity(name=name, images=n, max_abs_diff=worst, top1_agree=agree, ties=ties,
                  atol=atol)


def load_images(path: str | os.PathLike, model: nn.Module, limit: int = 64) -> torch.Tensor:
    """Up to ``limit`` images from ``path``, preprocessed with ``model``'s eval transform.

    ``path`` is an ImageFolder directory, a ``.tar.gz`` of one, or a plain directory of image
    files. Images are taken evenly across the set, so a class-sorted folder gives many classes.
    """
    from PIL import Image

    path = Path(path)
    transform = make_transform(model, training=False)
    flat = path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
    if flat:
        def read(file: Path) -> Image.Image:
            with Image.open(file) as img:
                return img.convert("RGB")

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        load = [lambda f=f: read(f) for f in files]
    else:
        try:
            dataset = open_images(path)  # labels unused: no class map to ask for
        except DataError as e:
            raise ExportError(f"cannot read images from {path}: {e}") from None
        load = [lambda i=i: dataset.load(i) for i in range(len(dataset))]
    picks = np.linspace(0, len(load) - 1, num=min(limit, len(load))).round().astype(int)
    tensors = []
    for i in dict.fromkeys(picks.tolist()):
        try:
            img = load[i]()
        except OSError as e:
            warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
            continue
        if img is not None:
            tensors.append(transform(img))
    if not tensors:
        raise ExportError(f"no readable images in {path}")
    return torch.stack(tensors)
