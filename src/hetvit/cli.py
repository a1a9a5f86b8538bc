"""The ``hetvit`` command: one subcommand per verb."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="hetvit: make pretrained Vision Transformers faster with static early attention "
    "(DGSSA) and a token aggregation pyramid (GLAD).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    add_completion=False,
)


def main() -> None:
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]warning:[/] {message}", highlight=False)

    warnings.showwarning = show  # one readable line per warning, no source dump
    # Lightning's own deprecation notice about torch internals: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    app()


# Commands are registered below, one function per verb.


# --- shared: clear errors, opening models, plans ------------------------------------------------
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, FileNotFoundError,
                                             RuntimeError, OSError)


def fail(message: str) -> None:
    """Print a short error (no traceback) and exit with status 2.

    Long messages (a state-dict mismatch lists every tensor) keep their first lines.
    """
    from rich.console import Console

    lines = message.splitlines()
    if len(lines) > 4:
        message = "\n".join(lines[:4]) + f"\n... ({len(lines) - 4} more lines)"
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


class user_errors:  # noqa: N801 - used as a context manager, reads like a statement
    """Turn the library's clear exceptions into a clean CLI error instead of a traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None and isinstance(exc, USER_ERRORS) and not isinstance(exc, typer.Exit):
            fail(str(exc))
        return False


def open_model(model: str | None, checkpoint: Path | None, overrides: dict | None = None,
               quiet: bool = False) -> Any:
    """The model a command works on: a hetvit checkpoint directory, a ``hetvit train``
    Lightning checkpoint, or a timm name with an optional local weights file."""
    import warnings

    from .io import is_checkpoint, load
    from .surgery import load_model

    if checkpoint is not None and not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if checkpoint is not None and is_checkpoint(checkpoint):
        return load(checkpoint)
    if checkpoint is not None and checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint} is not a hetvit checkpoint directory (it has no "
                                "source.json): save one with hetvit.save(model, DIR) or use "
                                "hetvit train's OUT/model")
    if model is None:
        if checkpoint is not None and checkpoint.suffix == ".ckpt":
            from .training import load_checkpoint_model

            return load_checkpoint_model(checkpoint)
        if checkpoint is not None:
            raise ValueError(f"{checkpoint} holds weights but not the architecture: give its "
                             "timm name with --model NAME, or use a hetvit checkpoint directory")
        raise ValueError("give --model NAME (a timm ViT, with --checkpoint FILE for its weights) "
                         "or --checkpoint DIR (a hetvit checkpoint)")
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        return load_model(model, checkpoint, **(overrides or {}))


def resolve_plan(plan: str, model: Any) -> Any:
    """``plan`` is a preset name (scaled to ``model``) or a plan JSON file."""
    from .plan import PRESETS, Plan

    if plan in PRESETS:
        return Plan.preset(plan, model)
    if plan.endswith(".json") or Path(plan).exists():
        return Plan.load(plan)
    raise ValueError(f"--plan {plan!r} is neither a preset ({', '.join(PRESETS)}) nor a plan "
                     "JSON file")


@app.command()
def compress(
    plan: Annotated[str, typer.Option(
        help="A preset (balanced, fast, fastest), scaled to the model, or a plan.json file.")],
    out: Annotated[Path, typer.Option(
        help="Directory to write the compressed checkpoint to (an earlier checkpoint there is "
        "replaced; a folder of other files is refused).")],
    model: Annotated[str | None, typer.Option(
        help="timm model name, e.g. deit_small_patch16_224.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Weights for --model (.pth/.safetensors/.ckpt), or a hetvit checkpoint directory "
        "(then --model is not needed).")] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="Images (ImageFolder dir or .tar.gz) whose mean attention initialises the static "
        "maps. Without it the maps start uniform.")] = None,
    class_map: Annotated[str | None, typer.Option(
        help="Class map for the calibration set (not needed: labels are not used).")] = None,
    num_images: Annotated[int, typer.Option(
        help="Calibration images to use, drawn at random (seeded) from the set.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Calibration batch size.")] = 64,
) -> None:
    """Compress a ViT with a plan and save it as a hetvit checkpoint directory.

    The static maps start from the mean attention of the calibration images; fine-tune the
    result with `hetvit finetune` to recover accuracy.
    """
    from rich.console import Console

    from . import io
    from .flops import formula_macs
    from .surgery import compress as do_compress
    from .surgery import describe

    console = Console()
    with user_errors():
        io.check_replaceable(out, io.SOURCE_FILE)
        source = open_model(model, checkpoint)
        the_plan = resolve_plan(plan, source)
        loader = None
        if calibration is not None:
            from .data import make_loader, make_transform, open_dataset, random_subset

            ds = open_dataset(calibration, make_transform(source), class_map=class_map)
            loader = make_loader(random_subset(ds, num_images), batch_size=batch_size)
        student = do_compress(source.eval(), the_plan, calibration=loader)
        io.save(student, out)
    arch = describe(source)
    base, new = formula_macs(arch), formula_macs(arch, student.hetvit_plan)
    console.print(f"compressed [bold]{arch.get('name') or 'model'}[/] with "
                  f"{student.hetvit_plan.describe()}: {base / 1e9:.2f} -> {new / 1e9:.2f} GMACs "
                  f"({base / new:.2f}x fewer); saved to [bold]{out}[/]")


# --- train / evaluate -------------------------------------------------------------------------


def _model_kwargs(img_size: int | None, patch_size: int | None, embed_dim: int | None,
                  depth: int | None, num_heads: int | None, num_classes: int | None,
                  drop_path: float | None) -> dict:
    """The ``timm.create_model`` overrides that were given (the rest keep the model's default)."""
    given = {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim,
             "depth": depth, "num_heads": num_heads, "num_classes": num_classes,
             "drop_path_rate": drop_path}
    return {k: v for k, v in given.items() if v is not None}


def _batch_limit(value: str | None) -> int | float | None:
    """``"5"`` means 5 batches, ``"0.1"`` a tenth of the loader (Lightning's convention)."""
    if value is None:
        return None
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        raise typer.BadParameter(f"expected a batch count or a fraction, got {value!r}") from None


# Options shared by `train` and `finetune`.
DataOpt = Annotated[Path, typer.Option(
    "--data",
    help=(
        "Training images: an ImageFolder directory or a .tar.gz of one (unpacked once "
        "into the cache)."
    )),
]
OutOpt = Annotated[Path, typer.Option(
    "--out",
    help=(
        "Run directory: checkpoints/last.ckpt, logs/ (CSV), epochs.log and curves.png (one "
        "line and a redrawn plot per epoch), the run's settings (train_config.json or "
        "finetune_config.json) and, at the end, the model in model/."
    )),
]
ValDataOpt = Annotated[Path | None, typer.Option(
    "--val-data",
    help="Validation images, evaluated (top-1/top-5) after every epoch."),
]
MinLrOpt = Annotated[float, typer.Option(
    help="Learning rate at the end of the cosine decay."),
]
ThreadsOpt = Annotated[int | None, typer.Option(
    help="torch CPU threads (default: all cores this process may use)."),
]


def _run_options(
    batch_size: Annotated[int, typer.Option(help="Images per step and device.")] = 128,
    weight_decay: Annotated[float, typer.Option(
        help="AdamW weight decay (not applied to norms, biases and position/class tokens)."),
    ] = 0.05,
    label_smoothing: Annotated[float, typer.Option(
        help="Label smoothing of the cross-entropy."),
    ] = 0.1,
    scale_min: Annotated[float, typer.Option(
        help="Smallest area fraction of the random resized crop (augmentation; 1.0 disables "
        "cropping)."),
    ] = 0.6,
    hflip: Annotated[float, typer.Option(
        help="Probability of a horizontal flip (augmentation)."),
    ] = 0.5,
    class_map: Annotated[str | None, typer.Option(
        help="Class map file (one class name a line, line i is class i), or 'auto' to use a "
        "synsets.txt / class_map.txt at the dataset root."),
    ] = None,
    skip_unknown: Annotated[bool, typer.Option(
        help="Skip (with a warning) class folders the class map lacks instead of stopping."),
    ] = False,
    workers: Annotated[int, typer.Option(
        help="Data-loading worker processes (0: load in the main process, best on machines "
        "with few cores)."),
    ] = 0,
    threads: ThreadsOpt = None,
    seed: Annotated[int, typer.Option(
        help="Seed for weights, shuffling and augmentation.")] = 0,
    devices: Annotated[int, typer.Option(
        help="Devices to train on; more than 1 uses DDP.")] = 1,
    accelerator: Annotated[str, typer.Option(help="cpu, gpu or auto.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="32-true, bf16-mixed or 16-mixed (GPU only)."),
    ] = "32-true",
    resume: Annotated[bool, typer.Option(
        help="Continue the run in --out from its last.ckpt (weights, optimizer, schedule, "
        "epoch and step)."),
    ] = False,
    limit_train_batches: Annotated[str | None, typer.Option(
        help="Train on only this many batches (or this fraction) per epoch: for smoke tests."),
    ] = None,
    limit_val_batches: Annotated[str | None, typer.Option(
        help="Validate on only this many batches (or this fraction)."),
    ] = None,
) -> None:
    """The options of every training run (`train`, `finetune`): a signature, never called."""


def with_options(options: Callable[..., None], first: bool = False
                 ) -> Callable[[Callable], Callable]:
    """Give a command the options of the signature ``options``, after its own (before them
    with ``first``); the command takes them as ``**kwargs``.

    typer reads a command's options from its signature, so options several commands share
    are spliced into each signature from one definition instead of being listed again.
    """
    shared = list(inspect.signature(options, eval_str=True).parameters.values())

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not p.VAR_KEYWORD]
        ordered = [*shared, *own] if first else [*own, *shared]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            return command(**kwargs)

        wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [p.replace(kind=p.KEYWORD_ONLY) for p in ordered])
        return wrapper

    return decorate


def _model_options(
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint",
        help="A hetvit model directory (hetvit.save, hetvit train's OUT/model) or a hetvit "
        "train .ckpt file; with --model, the weights file for it (as everywhere else)."),
    ] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="A timm model name, with its weights in --checkpoint FILE or --weights."),
    ] = None,
    weights: Annotated[Path | None, typer.Option(
        "--weights", help="Weights for --model: .safetensors, .pth or Lightning .ckpt."),
    ] = None,
    img_size: Annotated[int | None, typer.Option(help="--model override: input size.")] = None,
    patch_size: Annotated[int | None, typer.Option(help="--model override: patch size.")] = None,
    embed_dim: Annotated[int | None, typer.Option(help="--model override: width.")] = None,
    depth: Annotated[int | None, typer.Option(help="--model override: blocks.")] = None,
    num_heads: Annotated[int | None, typer.Option(help="--model override: heads.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="--model override: outputs.")] = None,
) -> None:
    """The options naming the trained model a command reads: a signature, never called."""


def open_given_model(checkpoint: Path | None, model: str | None, weights: Path | None,
                     **overrides: int | None) -> tuple[Any, bool]:
    """The model named by `_model_options`, in eval mode, and whether it is untrained (a timm
    name without weights: fine for shapes and speed, meaningless for accuracy and patterns)."""
    from rich.console import Console

    if model is not None and checkpoint is not None and weights is None and not checkpoint.is_dir():
        checkpoint, weights = None, checkpoint  # `--model NAME --checkpoint FILE`, as in compress
    if (checkpoint is None) == (model is None):
        fail("give --checkpoint DIR|FILE, or --model NAME with --checkpoint FILE / --weights FILE")
    if weights is not None and model is None:
        fail("--weights goes with --model")
    untrained = model is not None and weights is None
    with user_errors():
        net = open_model(model, checkpoint if model is None else weights,
                         {k: v for k, v in overrides.items() if v is not None}, quiet=untrained)
    if untrained:
        Console(stderr=True).print("[yellow]warning:[/yellow] no --weights: the model is random; "
                                   "its accuracy and attention patterns mean nothing")
    return net.eval(), untrained


def _train_config(options: dict[str, Any]) -> Any:
    """The TrainConfig of a `train` or `finetune` call, from its options."""
    from .training import TrainConfig

    o = dict(options)
    return TrainConfig(
        data=o["data"], out=o["out"], val_data=o["val_data"], epochs=o["epochs"],
        batch_size=o["batch_size"], lr=o["lr"], weight_decay=o["weight_decay"],
        warmup_epochs=o["warmup_epochs"], min_lr=o["min_lr"],
        label_smoothing=o["label_smoothing"], scale=(o["scale_min"], 1.0), hflip=o["hflip"],
        workers=o["workers"], seed=o["seed"], devices=o["devices"],
        accelerator=o["accelerator"], precision=o["precision"], resume=o["resume"],
        class_map=o["class_map"], skip_unknown=o["skip_unknown"],
        limit_train_batches=_batch_limit(o["limit_train_batches"]),
        limit_val_batches=_batch_limit(o["limit_val_batches"]), threads=o["threads"])


@app.command()
@with_options(_run_options)
def finetune(
    plan: Annotated[str, typer.Option(
        help="A preset (balanced, fast, fastest), scaled to the teacher, or a plan.json file.")],
    data: DataOpt,
    out: OutOpt,
    teacher: Annotated[Path | None, typer.Option(
        help="The teacher: a hetvit checkpoint directory (e.g. from `hetvit train`: "
        "RUN/model) or a `hetvit train` last.ckpt.")] = None,
    model: Annotated[str | None, typer.Option(
        help="Or the teacher as a timm model name, with --checkpoint for its weights.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Weights file for --model (.pth, .safetensors).")] = None,
    val_data: ValDataOpt = None,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs (also sets the schedule).")] = 3,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 5e-4,
    map_lr_scale: Annotated[float, typer.Option(
        help="Learning-rate multiplier for the static attention logits and aggregation "
        "weights (log-space parameters, never weight-decayed).")] = 10.0,
    ce: Annotated[float, typer.Option(help="Weight of cross-entropy on the labels.")] = 1.0,
    kd: Annotated[float, typer.Option(
        help="Weight of distillation from the teacher's logits (KL at --temperature).")] = 1.0,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 1.0,
    guidance: Annotated[float, typer.Option(
        help="Weight of the dynamic guidance: KL(teacher's dynamic attention || student's "
        "static attention) at every static layer. 0 turns it off (ablation).")] = 1.0,
    mix_epochs: Annotated[float, typer.Option(
        help="Curriculum: static layers run on lambda*dynamic + (1-lambda)*static, lambda "
        "going 1 -> 0 over this many epochs (0: off).")] = 0.0,
    freeze_aggregation: Annotated[bool, typer.Option(
        help="Keep the token aggregation at its average-pooling start (ablation).")] = False,
    calibration_images: Annotated[int, typer.Option(
        help="Training images whose mean attention initialises the static maps (0: uniform "
        "start).")] = 256,
    warmup_epochs: Annotated[float, typer.Option(help="Warm-up length in epochs.")] = 0.2,
    min_lr: MinLrOpt = 1e-6,
    **run: Any,
) -> None:
    """Compress a trained ViT and fine-tune the student with dynamic guidance and distillation.

    Loss = ce * CE(labels) + kd * KD(teacher logits) + guidance * KL(teacher attention ||
    static attention). The result, RUN/model, is a hetvit checkpoint (`hetvit.load`).
    """
    from rich.console import Console

    from .training import finetune as run_finetune

    console = Console(stderr=True)
    config = _train_config({**locals(), **run})
    with user_errors():
        if teacher is None and model is None:
            raise ValueError("give --teacher DIR (a hetvit checkpoint) or --model NAME "
                             "--checkpoint FILE")
        source = open_model(model, teacher if teacher is not None else checkpoint)
        the_plan = resolve_plan(plan, source)
        target = run_finetune(source, the_plan, config, ce=ce, kd=kd, guidance=guidance,
                              temperature=temperature, mix_epochs=mix_epochs,
                              map_lr_scale=map_lr_scale, freeze_aggregation=freeze_aggregation,
                              calibration_images=calibration_images)
    console.print(f"student written to {target}")


@app.command()
@with_options(_run_options)
def train(
    model: Annotated[str, typer.Option(
        "--model",
        help="timm model name to build (randomly initialised), e.g. deit_tiny_patch16_224."),
    ],
    data: DataOpt,
    out: OutOpt,
    val_data: ValDataOpt = None,
    img_size: Annotated[int | None, typer.Option(
        help="Input resolution override (e.g. 32)."),
    ] = None,
    patch_size: Annotated[int | None, typer.Option(help="Patch size override (e.g. 4).")] = None,
    embed_dim: Annotated[int | None, typer.Option(help="Embedding width override.")] = None,
    depth: Annotated[int | None, typer.Option(help="Number of blocks override.")] = None,
    num_heads: Annotated[int | None, typer.Option(help="Attention heads override.")] = None,
    num_classes: Annotated[int | None, typer.Option(
        help="Classifier outputs (defaults to the model's; must cover the dataset's classes)."),
    ] = None,
    drop_path: Annotated[float | None, typer.Option(help="Stochastic depth rate override.")] = None,
    epochs: Annotated[int, typer.Option(
        help="Epochs to train in total (also sets the schedule)."),
    ] = 16,
    lr: Annotated[float, typer.Option(
        help="Peak AdamW learning rate, reached after warm-up."),
    ] = 1e-3,
    warmup_epochs: Annotated[float, typer.Option(
        help="Linear warm-up length in epochs (per step)."),
    ] = 1.0,
    min_lr: MinLrOpt = 1e-5,
    **run: Any,
) -> None:
    """Train a timm ViT from scratch (the teacher).

    AdamW, warm-up + cosine, label smoothing and timm augmentation, on Lightning; resumable
    (--resume), with CSV logs and a progress bar. The model ends up in OUT/model.
    """
    from rich.console import Console

    from .training import train as run_training

    console = Console(stderr=True)
    kwargs = _model_kwargs(img_size, patch_size, embed_dim, depth, num_heads, num_classes,
                           drop_path)
    config = _train_config({**locals(), **run})
    with user_errors():
        target = run_training(model, kwargs, config)
    console.print(f"model written to {target}")


@app.command("evaluate")
@with_options(_model_options, first=True)
def evaluate_command(
    data: Annotated[Path, typer.Option(
        "--data", help="Images to evaluate: an ImageFolder directory or a .tar.gz of one."),
    ],
    class_map: Annotated[str | None, typer.Option(
        help=(
            "Class map file (one class name a line, line i is class i), or 'auto' for a "
            "synsets.txt at the dataset root; needed when the folders are a subset of the "
            "model's classes."
        )),
    ] = None,
    skip_unknown: Annotated[bool, typer.Option(
        help="Skip class folders the class map lacks instead of stopping."),
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 0,
    threads: ThreadsOpt = None,
    limit: Annotated[int | None, typer.Option(
        help="Evaluate only the first N images (after a fixed shuffle): a quick estimate."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    **source: Any,
) -> None:
    """Top-1 / top-5 accuracy and cross-entropy of a model on an image folder or archive."""
    import json as json_lib

    import torch
    from rich.console import Console
    from rich.table import Table

    from .data import make_loader, make_transform, open_dataset, random_subset
    from .evaluate import evaluate

    console = Console(stderr=True)
    if threads is not None:
        torch.set_num_threads(threads)
    net, _ = open_given_model(**source)
    name = str(source["checkpoint"] or source["model"])
    with user_errors():
        dataset = open_dataset(data, make_transform(net, training=False), class_map=class_map,
                               skip_unknown=skip_unknown)
        outputs = getattr(net, "num_classes", None)
        if outputs is not None and len(dataset.classes) > outputs:
            fail(f"{data} has {len(dataset.classes)} classes but the model outputs {outputs}; "
                 "pass --class-map if the folders are a subset of the model's classes")
        if limit is not None and limit < len(dataset):
            dataset = random_subset(dataset, limit)
        loader = make_loader(dataset, batch_size, workers=workers)
        result = evaluate(net, loader, progress=not as_json)
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    if base.skipped:
        console.print(f"[yellow]warning:[/yellow] {base.skipped} unreadable image(s) skipped")
    result = {**result, "skipped": base.skipped, "model": name, "data": str(data)}
    if as_json:
        print(json_lib.dumps(result, indent=2))
        return
    table = Table(title=f"{name} on {data}")
    for name in ("top-1", "top-5", "loss", "images", "skipped"):
        table.add_column(name, justify="right")
    table.add_row(f"{100 * result['top1']:.2f}%", f"{100 * result['top5']:.2f}%",
                  f"{result['loss']:.4f}", str(result["n"]), str(result["skipped"]))
    Console().print(table)


# --- export -----------------------------------------------------------------------------------


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint",
        help="A hetvit model directory (hetvit.save / hetvit train's OUT/model) or a hetvit "
        "train .ckpt file."),
    ],
    out: Annotated[Path, typer.Option(
        "--out", help="The file to write, e.g. model.onnx (written only if the checks pass)."),
    ],
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    opset: Annotated[int, typer.Option(help="ONNX opset, 17 or newer.")] = 17,
    check: Annotated[bool, typer.Option(
        help="Check the graph and compare onnxruntime with PyTorch (max |diff| and top-1) before "
        "writing --out."),
    ] = True,
    images: Annotated[Path | None, typer.Option(
        "--images",
        help="Real images for the parity check as well as random ones: an ImageFolder, a "
        ".tar.gz of one, or a directory of image files."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Use at most this many of --images.")] = 64,
    atol: Annotated[float, typer.Option(help="Largest accepted |logit difference|.")] = 1e-4,
) -> None:
    """Export a model to ONNX (dynamic batch, static token shapes) and check it in onnxruntime.

    Exit code 0: written and checked; 1: the checks failed and nothing was written; 2: bad
    input (not a checkpoint, unwritable output, missing onnxruntime)."""
    from rich.console import Console
    from rich.table import Table

    from .export import ExportError, ParityError, _onnxruntime, _temp_beside, export_onnx
    err = Console(stderr=True, soft_wrap=True)

    def fail(message: str, code: int = 2) -> None:
        err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
        raise typer.Exit(code)

    if fmt.lower() != "onnx":
        fail(f"unsupported export format {fmt!r}: hetvit exports onnx")
    try:
        if check:
            _onnxruntime()
        _temp_beside(out).unlink()  # is --out writable? (before the model is loaded)
    except ExportError as e:
        fail(str(e))
    try:
        model = open_model(None, checkpoint)
        real = None
        if images is not None and check:
            from .export import load_images

            real = load_images(images, model, limit=limit)
        result = export_onnx(model, out, opset=opset, check=check, images=real, atol=atol)
    except typer.Exit:
        raise
    except ParityError as e:
        result = e.result
        _print_export(result, Console(soft_wrap=True), Table)
        fail(str(e).splitlines()[0] + " (figures above)", code=1)
    except (ExportError, ValueError, TypeError, RuntimeError, OSError) as e:
        fail(str(e))
    _print_export(result, Console(soft_wrap=True), Table)


def _print_export(result: Any, console: Any, table_cls: Any) -> None:
    """The graph check per layer and the parity figures of an export."""
    static = set(result.static_layers)
    table = table_cls(title=f"{result.path} (opset {result.opset})")
    for name in ("layer", "attention", "image x image MatMuls"):
        table.add_column(name, justify="right")
    for layer, count in result.matmuls.items():
        kind = "static" if layer in static else "dynamic"
        flag = " [red](q k^T left!)[/red]" if layer in static and count else ""
        table.add_row(str(layer), kind, f"{count}{flag}")
    console.print(table)
    for parity in result.parity:
        console.print(str(parity), highlight=False)
    if not result.parity:
        console.print(f"wrote {result.path} (parity not checked: --no-check)")
    elif result.passed:
        console.print(f"[green]ok:[/green] wrote {result.path}")


# --- analyze ----------------------------------------------------------------------------------


@app.command("analyze")
@with_options(_model_options, first=True)
def analyze_command(
    data: Annotated[Path, typer.Option(
        "--data", help="Images: an ImageFolder directory or a .tar.gz of one (labels unused)."),
    ],
    num_images: Annotated[int, typer.Option(
        help="Images to analyse, drawn at random (seeded) from --data."),
    ] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    rank_images: Annotated[int | None, typer.Option(
        help="Take singular values of only this many images' maps (default: all). SVDs are "
        "most of the cost on a CPU at 197 tokens."),
    ] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Write patterns.json, patterns.md and plots to this directory."),
    ] = None,
    recommend_speedup: Annotated[float | None, typer.Option(
        "--recommend-speedup", help="Tune the recommended plan to this GMAC speedup."),
    ] = None,
    max_static: Annotated[int | None, typer.Option(
        "--max-static", help="At most this many static (DGSSA) layers."),
    ] = None,
    similarity: Annotated[float, typer.Option(
        help="Static layers need worst-head cross-image cosine similarity at least this."),
    ] = 0.9,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the random choice of images.")] = 0,
    **source: Any,
) -> None:
    """Measure the attention patterns of a trained ViT and recommend a plan.

    Per layer and head: similarity across images, rank and token redundancy; with --out, a
    report with plots.
    """
    import json
    import warnings

    from rich.console import Console
    from rich.table import Table

    from .data import make_loader, make_transform, open_dataset, random_subset
    from .io import check_replaceable
    from .patterns import analyze

    console = Console(stderr=True)
    if num_images < 2:
        fail("--num-images must be at least 2 (the analysis compares images)")
    if out is not None:
        with user_errors():
            check_replaceable(out, "patterns.json")
    net, untrained = open_given_model(**source)
    with user_errors():
        dataset = open_dataset(data, make_transform(net, training=False))
        # A random subset in random order: classes mixed, as the pairwise JS estimate needs.
        loader = make_loader(random_subset(dataset, num_images, seed), batch_size, workers=workers)
        with warnings.catch_warnings():
            if untrained:
                warnings.filterwarnings("ignore", message="the model looks untrained")
            report = analyze(net, loader, num_images=num_images, rank_images=rank_images)
        plan = report.recommend(recommend_speedup, max_static, similarity=similarity)

    name = report.arch.get("name") or str(source["checkpoint"] or source["model"])
    table = Table(title=f"attention patterns: {name}, {report.num_images} images, "
                  f"N = {report.num_tokens}",
                  caption="sim: cross-image cosine similarity (mean, worst head); JS: bits; "
                  "KL: to the mean map, nats; ranks: fractions of N (r90: mean, worst head); "
                  "red.: token redundancy")
    for col in ("layer", "sim", "min", "JS", "KL", "erank", "r90", "max", "r99", "red.",
                "plan"):
        table.add_column(col, justify="right")
    stages = dict(plan.pyramid)
    for row in report.summary():
        i = row["layer"]
        role = "static" if i in plan.static else "dynamic"
        if i in stages:
            role = f"->{stages[i]} {role}"
        table.add_row(str(i), *(f"{row[k]:.3f}" for k in (
            "similarity", "similarity_min", "js", "static_kl", "effective_rank", "rank90",
            "rank90_max", "rank99", "redundancy")), role)
    stdout = Console()
    stdout.print(table)
    stdout.print(report.explain(plan), highlight=False)
    stdout.print(json.dumps(plan.to_dict()), highlight=False)
    if out is not None:
        with user_errors():
            target = report.save(out, plan)
        console.print(f"report written to {target}")


# --- plan / bench -----------------------------------------------------------------------------

def _timm_model(name: str, overrides: dict, weights: Path | None = None, meta: bool = False
                ) -> Any:
    """A timm ViT that hetvit can compress, by name, with clear errors; ``meta`` builds it
    without memory or init (enough for shapes)."""
    import warnings

    import torch

    from .surgery import create_timm_model, describe, load_model

    with user_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": said once, by the caller
        if meta:
            with torch.device("meta"):
                net = create_timm_model(name, **overrides)
        else:
            net = load_model(name, weights, **overrides)
        describe(net)  # raises UnsupportedModelError for what hetvit cannot compress
    return net


@app.command("plan")
def plan_command(
    model: Annotated[str, typer.Option(
        "--model", help="timm model name, e.g. deit_small_patch16_224 (any timm ViT).")],
    preset: Annotated[str, typer.Option(
        "--preset", help="fast, balanced or fastest (scaled to the model's depth and token "
        "grid), or a plan.json file to check against the model and show.")] = "fast",
    img_size: Annotated[int | None, typer.Option(
        help="Input resolution override: the plan fits only this size.")] = None,
    patch_size: Annotated[int | None, typer.Option(help="Patch size override.")] = None,
    embed_dim: Annotated[int | None, typer.Option(help="Embedding width override.")] = None,
    depth: Annotated[int | None, typer.Option(help="Number of blocks override.")] = None,
    num_heads: Annotated[int | None, typer.Option(help="Attention heads override.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Classifier outputs override.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the plan, its layers and GMACs as JSON instead of a table.")
    ] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Also write the plan to this file (for --plan of compress and bench).")
    ] = None,
) -> None:
    """Show a compression plan for a model, layer by layer, with its GMACs.

    The static layers, the pyramid stages with their token counts and grids, and the GMACs
    against the uncompressed model.
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from .flops import formula_macs, plan_layers
    from .plan import token_grid
    from .surgery import describe

    overrides = _model_kwargs(img_size, patch_size, embed_dim, depth, num_heads, num_classes,
                              None)
    net = _timm_model(model, overrides, meta=True)
    arch = describe(net)
    with user_errors():
        the_plan = resolve_plan(preset, net)
        the_plan.validate(arch["depth"], token_grid(arch), tuple(arch["img_size"]))
        if the_plan.img_size is None:
            the_plan = type(the_plan).from_dict({**the_plan.to_dict(),
                                                 "img_size": arch["img_size"]})
        if out is not None:
            the_plan.save(out)
    base, new = formula_macs(arch), formula_macs(arch, the_plan)
    rows = plan_layers(arch, the_plan)
    if as_json:
        print(json.dumps({"model": model, "plan": the_plan.to_dict(), "layers": rows,
                          "gmacs": {"baseline": base / 1e9, "plan": new / 1e9,
                                    "reduction": base / new}}, indent=2))
    else:
        h, w = arch["img_size"]
        table = Table(title=f"{model} at {h}x{w}: {the_plan.label or preset} plan",
                      title_justify="left")
        for col, just in (("layer", "right"), ("runs", "left"), ("tokens", "right"),
                          ("grid", "right"), ("GMACs", "right")):
            table.add_column(col, justify=just)
        for r in rows:
            grid = "x".join(map(str, r["grid"]))
            if r["kind"] == "aggregate":
                table.add_row("", f"[cyan]aggregate {r['tokens_in']} -> {r['tokens']}[/]",
                              str(r["tokens"]), grid, f"{r['macs'] / 1e9:.4g}", style="cyan")
            else:
                kind = "[bold]static[/] attention" if r["kind"] == "static" else "attention"
                table.add_row(str(r["layer"]), kind, f"{r['prefix']}+{r['tokens']}", grid,
                              f"{r['macs'] / 1e9:.4g}")
        console = Console()
        console.print(table)
        console.print(f"{the_plan.describe()}", highlight=False)
        console.print(f"GMACs: baseline {base / 1e9:.4g} -> plan {new / 1e9:.4g} "
                      f"([bold]{base / new:.2f}x fewer[/], {100 * (1 - new / base):.0f}% saved)",
                      highlight=False)
    if out is not None:
        Console(stderr=True).print(f"plan written to {out}", highlight=False)


def _bench_models(model: str | None, checkpoint: Path | None, plan: str | None,
                  overrides: dict) -> tuple[Any, Any, str, list[str]]:
    """Baseline, compressed model, a name, and notes on where their weights came from.

    ``--checkpoint DIR`` holding a compressed model: the baseline is its source architecture
    with random weights. Holding an uncompressed model: it is the baseline, compressed with
    ``--plan``. Otherwise ``--model NAME`` with optional ``--checkpoint FILE`` weights.
    """
    from .bench import compress_for_speed
    from .io import is_checkpoint, load
    from .surgery import build_model, describe, is_compressed

    notes: list[str] = []
    if checkpoint is not None and not checkpoint.exists():
        fail(f"checkpoint not found: {checkpoint}")
    if checkpoint is not None and checkpoint.is_dir():
        if not is_checkpoint(checkpoint):
            fail(f"{checkpoint} is a directory but not a hetvit checkpoint (no source.json); "
                 "a weights file goes with --model NAME")
        if model is not None or overrides:
            fail("--checkpoint DIR names its own architecture: drop --model and the size "
                 "overrides")
        with user_errors():
            net = load(checkpoint)
        name = describe(net).get("name") or str(checkpoint)
        if is_compressed(net):
            if plan is not None:
                fail(f"{checkpoint} is already compressed ({net.hetvit_plan.describe()}): "
                     "drop --plan")
            arch = describe(net)
            baseline = build_model(arch)
            if not arch.get("name"):
                baseline.init_weights()  # build_model leaves a nameless ViT uninitialised
            notes.append(f"baseline: {name} rebuilt with random weights; compressed: weights "
                         f"from {checkpoint}")
            return baseline.eval(), net.eval(), name, notes
        baseline = net
        notes.append(f"baseline: weights from {checkpoint}")
    else:
        if model is None:
            fail("give --model NAME (a timm ViT; --checkpoint FILE for its weights) or "
                 "--checkpoint DIR (a hetvit checkpoint)")
        baseline = _timm_model(model, overrides, weights=checkpoint)
        name = model
        notes.append(f"weights from {checkpoint}" if checkpoint else
                     "weights are random: speed does not depend on them")
    with user_errors():
        compressed = compress_for_speed(baseline.eval(), resolve_plan(plan or "fast", baseline))
    if checkpoint is not None:
        notes.append("compressed: static maps calibrated on 2 random images (enough for speed, "
                     "not for accuracy)")
    return baseline.eval(), compressed.eval(), name, notes


@app.command("bench")
def bench_command(
    model: Annotated[str | None, typer.Option(
        "--model", help="timm model name (any timm ViT), e.g. deit_small_patch16_224. Random "
        "weights unless --checkpoint FILE gives them.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="Weights for --model (.pth/.safetensors/.ckpt), or a hetvit "
        "checkpoint directory: if compressed, it is timed against its source architecture "
        "(random weights); if not, it is the baseline and --plan compresses it.")] = None,
    plan: Annotated[str | None, typer.Option(
        "--plan", help="fast, balanced or fastest (scaled to the model) or a plan.json file. "
        "Default: fast (not allowed with an already compressed --checkpoint DIR).")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Images per call for the throughput measurement.")] = 32,
    latency: Annotated[bool, typer.Option(
        "--latency", help="Also measure batch-1 latency (median ms per image).")] = False,
    rounds: Annotated[int, typer.Option(
        help="Timed runs per model at --batch-size, alternating baseline and compressed; the "
        "speedup is the median over rounds.")] = 7,
    latency_rounds: Annotated[int, typer.Option(
        help="Alternating rounds for --latency (each run lasts --min-time).")] = 9,
    warmup: Annotated[int, typer.Option(
        help="Untimed calls per model first (they also cover --compile's compilation).")] = 2,
    min_time: Annotated[float, typer.Option(
        help="Seconds each timed run lasts at least (several calls when one is quicker).")
    ] = 1.0,
    compile: Annotated[bool, typer.Option(
        "--compile", help="Run both models under torch.compile.")] = False,
    dtype: Annotated[str, typer.Option(
        help="fp32, or bf16 (models and inputs cast to bfloat16).")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu, or cuda when a GPU is present.")] = "cpu",
    threads: Annotated[int | None, typer.Option(
        help="torch CPU threads (default: torch's, one per core).")] = None,
    runtime: Annotated[str, typer.Option(
        help="What runs the models: torch (eager, or compiled with --compile) or "
        "onnxruntime (both models exported to ONNX, fp32 on the CPU).")] = "torch",
    img_size: Annotated[int | None, typer.Option(help="--model override: input size.")] = None,
    patch_size: Annotated[int | None, typer.Option(help="--model override: patch size.")] = None,
    embed_dim: Annotated[int | None, typer.Option(help="--model override: width.")] = None,
    depth: Annotated[int | None, typer.Option(help="--model override: blocks.")] = None,
    num_heads: Annotated[int | None, typer.Option(help="--model override: heads.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="--model override: outputs.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the result as JSON (for machines) instead of the table.")
    ] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Also write the result as JSON to this file.")] = None,
) -> None:
    """Time a model and its compressed version side by side in one process.

    Throughput, speedup (median and spread over alternating rounds), GMACs, and speedup per
    GMAC saved (efficiency).
    """
    import json

    from rich.console import Console

    from .bench import DTYPES, RUNTIMES, compare, render

    err = Console(stderr=True)
    if dtype not in DTYPES:
        fail(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if runtime not in RUNTIMES:
        fail(f"--runtime {runtime!r}: available: {', '.join(RUNTIMES)}")
    if batch_size < 1 or rounds < 1 or latency_rounds < 1 or warmup < 0 or min_time < 0:
        fail("--batch-size, --rounds and --latency-rounds must be at least 1, --warmup and "
             "--min-time at least 0")
    if threads is not None and threads < 1:
        fail("--threads must be at least 1")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: torch sees no CUDA device here")
    elif device != "cpu":
        fail(f"--device {device!r}: use cpu or cuda")
    overrides = _model_kwargs(img_size, patch_size, embed_dim, depth, num_heads, num_classes,
                              None)
    baseline, compressed, name, notes = _bench_models(model, checkpoint, plan, overrides)
    with user_errors():
        with err.status("timing the baseline and the compressed model side by side..."):
            result = compare(baseline, compressed, batch_size, rounds=rounds, warmup=warmup,
                             min_time=min_time, latency=latency, latency_rounds=latency_rounds,
                             compile=compile, dtype=dtype, device=device, runtime=runtime,
                             threads=threads)
    data = {"model": name, "plan": compressed.hetvit_plan.to_dict(), "notes": notes,
            **result.to_dict()}
    if out is not None:
        with user_errors():
            out.write_text(json.dumps(data, indent=2) + "\n")
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        h, w = compressed.patch_embed.img_size
        Console().print(render(result, title=f"{name} at {h}x{w}"))
    for note in notes:
        err.print(f"note: {note}", highlight=False)


# --- demo -------------------------------------------------------------------------------------


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(
        "--out", help="Report directory (replaced once the new report is complete).")
    ] = Path("demo-report"),
    images: Annotated[Path | None, typer.Option(
        "--images", help="CIFAR-10 test images: cifar10-test.tar.gz or an ImageFolder "
        "(default: ../shared/data/cifar10-test.tar.gz beside the repository).")] = None,
    assets: Annotated[Path | None, typer.Option(
        "--assets", help="Directory with the committed cifar10-teacher and cifar10-fast "
        "models (default: the repository's assets/).")] = None,
    eval_images: Annotated[int, typer.Option(
        help="Test images to evaluate on, equally many per class.")] = 1000,
    analysis_images: Annotated[int, typer.Option(
        help="Images whose attention maps are analysed.")] = 256,
    threads: ThreadsOpt = None,
) -> None:
    """Show what hetvit does, in about a minute, on the committed CIFAR-10 models.

    Analyses the teacher's attention patterns, shows its fast student's plan, evaluates and
    benchmarks both side by side, and writes a markdown report with plots to --out.
    """
    from rich.console import Console
    from rich.table import Table

    from .demo import run

    if eval_images < 10 or analysis_images < 2:
        fail("--eval-images needs at least 10 images (one per class), --analysis-images 2")
    console = Console(stderr=True)
    with user_errors():
        result = run(out, assets=assets, images=images, eval_images=eval_images,
                     analysis_images=analysis_images, threads=threads,
                     log=lambda line: console.print(line, highlight=False))
    b = result.bench
    table = Table(title="CIFAR-10 teacher and its fast student, on this machine",
                  title_justify="left")
    for col in ("model", "plan", "GMACs", "top-1", f"img/s (batch {b.settings.batch_size})",
                "speedup"):
        table.add_column(col, justify="left" if col in ("model", "plan") else "right")
    for name, info, which, speed in (("teacher", b.baseline, "baseline", ""),
                                     ("student", b.compressed, "compressed",
                                      f"{b.speedup:.2f}x")):
        table.add_row(name, info.plan, f"{info.gmacs:.4f}",
                      f"{100 * result.accuracy[name]['top1']:.1f}%",
                      f"{b.throughput.median(which):.0f}", speed)
    Console().print(table)
    console.print(f"recommended by the analysis: {result.recommended.describe()}",
                  highlight=False)
    console.print(f"report: {result.report / 'report.md'} ({result.seconds:.0f} s)",
                  highlight=False)
