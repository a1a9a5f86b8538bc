"""Deployment: ``hetvit export``, a checked ONNX file (fp32, or int8 with ``--quantize``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from .app import app, fail, flag, user_errors
from .common import ForceOpt, open_model


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint",
        help="A hetvit model directory (hetvit.save / hetvit train's OUT/model) or a hetvit "
        "train .ckpt file."),
    ],
    out: Annotated[Path, typer.Option(
        "--out", help="The file to write, e.g. model.onnx (written only if the checks pass; "
        "an earlier export there is replaced, another file only with --force)."),
    ],
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    opset: Annotated[int, typer.Option(
        help="ONNX opset: 17 (the first with LayerNormalization) up to the newest torch's "
        "exporter writes (20 in torch 2.14).")] = 17,
    check: Annotated[bool, flag(
        help="Check the graph and compare onnxruntime with PyTorch (max |diff| and top-1) before "
        "writing --out."),
    ] = True,
    images: Annotated[Path | None, typer.Option(
        "--images",
        help="Real images for the parity check as well as random ones: an ImageFolder, a "
        ".tar.gz of one, or a directory of image files."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Use at most this many of --images.")] = 64,
    atol: Annotated[float, typer.Option(help="Largest accepted |logit difference|.")] = 1e-4,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="int8: quantize with onnxruntime's tools and check top-1 agreement "
        "with the fp32 model instead of --atol.")] = None,
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="With --quantize: images (a folder or archive) whose activation "
        "ranges set static QDQ quantization's scales; without it, dynamic quantization.")
    ] = None,
    calibration_images: Annotated[int, typer.Option(
        min=1, help="Images drawn at random from --calibration.")] = 256,
    min_agreement: Annotated[float, typer.Option(
        help="With --quantize: the smallest accepted fraction of images whose int8 top-1 is "
        "the fp32 model's.")] = 0.98,
    per_channel: Annotated[bool | None, typer.Option(
        "--per-channel/--per-tensor", metavar="", help="With --quantize: weight scales per "
        "output channel or per tensor (default: the measured choice of the mode).")] = None,
    exclude: Annotated[str | None, typer.Option(
        help="With --quantize: node groups kept in float, comma-separated, from softmax, "
        "layernorm, static_maps, aggregation ('none' for none; default: the measured choice)."),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Export a model to ONNX (dynamic batch, static token shapes) and check it in onnxruntime.

    With --quantize int8 the graph is quantized (dynamic, or static QDQ with --calibration)
    and must agree with the fp32 model's top-1 on at least --min-agreement of the images.

    Exit code 0: written and checked; 1: the checks failed and nothing was written; 2: bad
    input (not a checkpoint, unwritable output, missing onnxruntime)."""
    from rich.console import Console
    from rich.table import Table

    from ..export import ParityError

    with user_errors():
        config = _checked_options(checkpoint, out, fmt, check, force, quantize, calibration,
                                  min_agreement, per_channel, exclude)
        try:
            result = _export(checkpoint, out, config, opset=opset, check=check, images=images,
                             limit=limit, atol=atol, calibration=calibration,
                             calibration_images=calibration_images)
        except ParityError as e:
            _print_export(e.result, Console(soft_wrap=True), Table)
            fail(str(e).splitlines()[0] + " (figures above)", code=1)
        else:
            _print_export(result, Console(soft_wrap=True), Table)


def _checked_options(checkpoint: Path, out: Path, fmt: str, check: bool, force: bool,
                     quantize: str | None, calibration: Path | None, min_agreement: float,
                     per_channel: bool | None, exclude: str | None) -> Any:
    """The quantization asked for (None: fp32), once every option has been checked.

    Everything that can be checked without the model is, before it is loaded: a typo, a
    missing package or an unwritable ``--out`` costs one line, not a model load and an export.
    Nothing is created here (the folders of ``--out`` appear when the file is written).
    """
    from ..export import import_onnxruntime, is_onnx_export
    from ..files import check_file_replaceable

    if fmt.lower() != "onnx":
        raise UsageError(f"unsupported export format {fmt!r}: hetvit exports onnx")
    config = _quantization_config(quantize, calibration, min_agreement, per_channel, exclude,
                                  check)
    if check:
        import_onnxruntime()
    if config is not None:
        from ..quantize import import_quantization

        import_quantization()  # onnxruntime's quantization tools
    check_file_replaceable(out, is_onnx_export, force)
    if checkpoint.is_file() and is_onnx_export(checkpoint):
        raise UsageError(f"{checkpoint} is an ONNX export, not a hetvit checkpoint: give the "
                         "checkpoint it was exported from (the PyTorch model is the reference "
                         "the export is checked against)")
    return config


def _export(checkpoint: Path, out: Path, config: Any, *, opset: int, check: bool,
            images: Path | None, limit: int, atol: float, calibration: Path | None,
            calibration_images: int) -> Any:
    """Load the model and write its checked export (fp32, or int8 with ``config``) to ``out``.

    Raises what the library raises: a :class:`~hetvit.errors.HetvitError` (a
    :class:`~hetvit.export.ParityError` when the checks fail) or an ``OSError``.
    """
    from ..export import export_onnx, load_images

    model = open_model(None, checkpoint, model_flag=False)
    real = load_images(images, model, limit=limit) if images is not None and check else None
    if config is None:
        return export_onnx(model, out, opset=opset, check=check, images=real, atol=atol)
    from ..data import sample_images
    from ..quantize import quantize_onnx

    cal = (sample_images(calibration, model, calibration_images)
           if calibration is not None else None)
    return quantize_onnx(model, out, config, calibration=cal, images=real, opset=opset)


def _quantization_config(quantize: str | None, calibration: Path | None, min_agreement: float,
                         per_channel: bool | None, exclude: str | None, check: bool) -> Any:
    """The :class:`hetvit.quantize.Quantization` the export options ask for, or None."""
    if quantize is None:
        if calibration is not None or exclude is not None or per_channel is not None:
            raise UsageError("--calibration, --exclude and --per-channel go with --quantize "
                             "int8")
        return None
    if quantize.lower() != "int8":
        raise UsageError(f"--quantize {quantize!r}: hetvit quantizes to int8")
    if not check:
        raise UsageError("--quantize needs the checks (its agreement is the point): drop "
                         "--no-check")
    from ..quantize import Quantization

    config = Quantization.default("static" if calibration is not None else "dynamic",
                                  min_agreement=min_agreement)
    groups = config.exclude
    if exclude is not None:
        groups = tuple(g.strip() for g in exclude.split(",") if g.strip() not in ("", "none"))
    return Quantization(config.mode, config.per_channel if per_channel is None else per_channel,
                        groups, min_agreement, config.op_types)


def _print_export(result: Any, console: Any, table_cls: Any) -> None:
    """The graph check per layer and the parity figures of an export."""
    static = set(result.static_layers)
    q = result.quantization
    how = (f", int8 {q.mode}, per-{'channel' if q.per_channel else 'tensor'}, float: "
           f"{', '.join(q.exclude) or 'none'}" if q is not None else "")
    table = table_cls(title=f"{result.path} (opset {result.opset}{how})")
    for name in ("layer", "attention", "image x image MatMuls"):
        table.add_column(name, justify="right")
    for layer, count in result.matmuls.items():
        kind = "static" if layer in static else "dynamic"
        left = " [red](q k^T left!)[/red]" if layer in static and count else ""
        table.add_row(str(layer), kind, f"{count}{left}")
    console.print(table)
    for parity in result.parity:
        console.print(str(parity), highlight=False)
    if not result.parity:
        console.print(f"wrote {result.path} (parity not checked: --no-check)")
    elif result.passed:
        console.print(f"[green]ok:[/green] wrote {result.path}")
