"""What the ``hetvit`` commands share besides the app (:mod:`.app`): opening models and plans,
and the option sets several commands take (each defined once, spliced into each signature).

The commands live beside it by theme (``models``, ``training``, ``analysis``, ``fit``) and
import the library inside their bodies, so that ``hetvit --help`` starts without torch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..configs import AGGREGATION_INITS, TRAIN_OPTIM, OptimConfig, TrainConfig
from ..errors import MisshapenWeightsError, UsageError
from .app import fail, flag, user_errors


def open_model(model: str | None, checkpoint: Path | None, overrides: dict | None = None,
               quiet: bool = False, model_flag: bool = True) -> Any:
    """The model a command works on: a hetvit checkpoint directory, a ``hetvit train``
    Lightning checkpoint, or a timm name with an optional local weights file.

    ``model_flag``: whether the command has ``--model`` (export does not), so that no error
    advises a flag the command would refuse.
    """
    import warnings

    from ..io import is_checkpoint, load

    if checkpoint is not None and not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if checkpoint is not None and is_checkpoint(checkpoint):
        if model is not None or overrides:
            raise UsageError(f"{checkpoint} is a hetvit checkpoint directory, which holds its "
                             "own architecture: drop --model and the architecture options")
        return load(checkpoint)
    if checkpoint is not None and checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint} is not a hetvit checkpoint directory (it has no "
                                "source.json): save one with hetvit.save(model, DIR) or use "
                                "hetvit train's OUT/model")
    if model is None:
        if checkpoint is not None and checkpoint.suffix == ".ckpt":
            from ..runs import load_checkpoint_model

            return load_checkpoint_model(checkpoint)
        if checkpoint is not None and not model_flag:
            raise UsageError(f"{checkpoint} holds weights but not the architecture: give a "
                             "hetvit checkpoint directory (make one with hetvit compress --model "
                             "NAME --checkpoint FILE --plan PLAN, or hetvit.save(model, DIR))")
        if checkpoint is not None:
            raise UsageError(f"{checkpoint} holds weights but not the architecture: give its "
                             "timm name with --model NAME, or use a hetvit checkpoint directory")
        raise UsageError("give --model NAME (a timm ViT, with --checkpoint FILE for its weights) "
                         "or --checkpoint DIR (a hetvit checkpoint)")
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        return load_by_name(model, checkpoint, overrides or {})


def load_by_name(model: str, weights: Path | None, overrides: dict[str, Any]) -> Any:
    """``--model`` built with its architecture options and loaded with ``--checkpoint``; weights
    of another shape say which options build the model they were trained as."""
    from ..surgery import load_model

    try:
        return load_model(model, weights, **overrides)
    except MisshapenWeightsError as e:
        raise MisshapenWeightsError(f"{e}: --model {model} with --img-size, --patch-size, "
                              "--embed-dim, --depth, --num-heads and --num-classes as the "
                              "weights were trained", e.path) from e


TeacherOpt = Annotated[Path | None, typer.Option(
    help="The teacher: a hetvit checkpoint directory (e.g. from `hetvit train`: RUN/model) or a "
    "`hetvit train` last.ckpt.")]
TeacherModelOpt = Annotated[str | None, typer.Option(
    help="Or the teacher as a timm model name, with --checkpoint for its weights, or hf:DIR "
    "(a Hugging Face model directory).")]
TeacherWeightsOpt = Annotated[Path | None, typer.Option(
    help="Weights file for --model (.pth, .safetensors, or a `hetvit train` .ckpt).")]


def open_teacher(teacher: Path | None, model: str | None, checkpoint: Path | None,
                 overrides: dict | None = None) -> Any:
    """The model a compressing command starts from (`--teacher`, or `--model` with
    `--checkpoint` and any architecture overrides), in eval mode."""
    if teacher is None and model is None:
        raise UsageError("give --teacher DIR (a hetvit checkpoint) or --model NAME "
                         "--checkpoint FILE")
    if teacher is not None and (model is not None or checkpoint is not None or overrides):
        raise UsageError("give --teacher DIR, or --model NAME with --checkpoint FILE and the "
                         "architecture options, not both")
    if teacher is not None:
        return open_model(None, teacher).eval()
    return open_model(model, checkpoint, overrides).eval()


def check_out_is_not_an_input(out: Path, **inputs: Path | None) -> None:
    """Refuse an ``--out`` that is one of the command's inputs: writing there would replace
    the very model it was made from."""
    for name, path in inputs.items():
        if path is not None and path.exists() and out.exists() and out.resolve() == \
                path.resolve():
            raise UsageError(f"--out {out} is the --{name.replace('_', '-')} this command reads:"
                             " writing there would replace it; give another --out")


def resolve_plan(plan: str, model: Any, aggregation: str | None = None,
                 flag: str = "--plan") -> Any:
    """``plan`` is a preset name (scaled to ``model``) or a plan JSON file; ``aggregation``
    (``--aggregation``), when given, replaces the plan's own. ``flag`` is how the error names
    the option (``plan`` takes it as ``--preset`` or ``--plan``)."""
    from dataclasses import replace

    from ..plan import PRESETS, Plan
    from ..surgery import preset

    if plan in PRESETS:
        the_plan = preset(plan, model)
    elif plan.endswith(".json") or Path(plan).exists():
        the_plan = Plan.load(plan)
        _check_plan_file(the_plan, Path(plan), model)
    else:
        raise UsageError(f"{flag} {plan!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                         "plan JSON file")
    return the_plan if aggregation is None else replace(the_plan, aggregation=aggregation)


def _check_plan_file(plan: Any, path: Path, model: Any) -> None:
    """Validate a plan read from ``path`` against ``model`` now, so that its error names the
    file (the later check deep in a command does not know where the plan came from)."""
    from ..grid import token_grid
    from ..hosts import describe
    from ..plan import PlanError
    from ..surgery import is_compressed

    if is_compressed(model):
        return  # compressing it is refused anyway, with its own message
    arch = describe(model)
    try:
        plan.validate(arch["depth"], token_grid(arch), tuple(arch["img_size"]))
    except PlanError as e:
        raise PlanError(f"{path}: {e}") from None


# --- option sets and helpers of the training and measuring commands --------------------------


def _size_options(
    img_size: Annotated[int | None, typer.Option(
        min=1, help="Architecture override: input resolution (e.g. 32).")] = None,
    patch_size: Annotated[int | None, typer.Option(
        min=1, help="Architecture override: patch size (e.g. 4).")] = None,
    embed_dim: Annotated[int | None, typer.Option(
        min=1, help="Architecture override: embedding width.")] = None,
    depth: Annotated[int | None, typer.Option(
        min=1, help="Architecture override: number of blocks.")] = None,
    num_heads: Annotated[int | None, typer.Option(
        min=1, help="Architecture override: attention heads.")] = None,
    num_classes: Annotated[int | None, typer.Option(
        min=1, help="Architecture override: classifier outputs.")] = None,
) -> None:
    """Overrides of a timm model's architecture (``timm.create_model`` keywords) for commands
    that build a model by name: a signature, never called."""


SIZE_KEYS = tuple(inspect.signature(_size_options).parameters)


def _overrides(options: dict[str, Any]) -> dict[str, Any]:
    """The architecture overrides among a command's ``options`` that were given."""
    return {k: options[k] for k in SIZE_KEYS if options.get(k) is not None}


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
        "line and a redrawn plot per epoch), the run's settings (train_config.json, "
        "finetune_config.json for finetune) and, at the end, the model in model/."
    )),
]
ValDataOpt = Annotated[Path | None, typer.Option(
    "--val-data",
    help="Validation images, evaluated (top-1/top-5) after every epoch."),
]
MinLrOpt = Annotated[float, typer.Option(
    help="Learning rate at the end of the cosine decay."),
]


def _aggregation_init(value: str) -> str:
    if value not in AGGREGATION_INITS:  # now, not once the images are read
        raise typer.BadParameter(f"one of {', '.join(AGGREGATION_INITS)}, not {value!r}")
    return value


AggregationInitOpt = Annotated[str, typer.Option(
    callback=_aggregation_init,
    help="How the pyramid stages start: pool (average pooling of the token grid) or cluster "
    "(k-means of the tokens each stage receives over the calibration images: tokens alike "
    "across images are merged, wherever they lie)."),
]


def _aggregation(value: str | None) -> str | None:
    from ..plan import AGGREGATIONS

    if value is not None and value not in AGGREGATIONS:
        raise typer.BadParameter(f"one of {', '.join(AGGREGATIONS)}, not {value!r}")
    return value


AggregationOpt = Annotated[str | None, typer.Option(
    callback=_aggregation,
    help="How the pyramid stages form their tokens: static (the paper's: one learned matrix for "
    "every image), content (that matrix plus learned queries that score each image's "
    "tokens; one more product a stage; fitted, +0.4 to +0.9 points on pyramids that start "
    "late, at 1.5-1.9x, none from 2.25x) or merge (each image's most alike tokens averaged, "
    "at most halving a stage; 4-21 points over static before any fit, none after: "
    "docs/fitting.md). Default: the plan's own (static for a preset)."),
]
ForceOpt = Annotated[bool, flag(
    "--force", help="Overwrite --out even if it is a file this command did not write.")]
ThreadsOpt = Annotated[int | None, typer.Option(
    min=1, help="torch CPU threads per process (default: the cores this process may use, "
    "shared out among the --devices processes)."),
]
ClassMapOpt = Annotated[str | None, typer.Option(
    help="Class map file (one class name a line, line i is class i), or 'auto' for a "
    "synsets.txt, class_map.txt or classes.txt at the dataset root; needed when the folders "
    "are a subset of the model's classes (ImageNet samples)."),
]
TorchThreadsOpt = Annotated[int | None, typer.Option(
    min=1, help="torch CPU threads (default: torch's, one per core)."),
]


# The shared optimiser options take training's defaults, which fine-tuning's share (the two
# recipes differ only in lr, warm-up and floor, which each command sets).
def _run_options(
    batch_size: Annotated[int, typer.Option(
        min=1, help="Images per optimiser step over all processes (each of the --devices x "
        "--num-nodes processes takes an equal share, so the run trains the same on any "
        "number of them).")] = TrainConfig.batch_size,
    weight_decay: Annotated[float, typer.Option(
        help="AdamW weight decay (not applied to norms, biases and position/class tokens)."),
    ] = TRAIN_OPTIM.weight_decay,
    label_smoothing: Annotated[float, typer.Option(
        help="Label smoothing of the cross-entropy."),
    ] = TRAIN_OPTIM.label_smoothing,
    scale_min: Annotated[float, typer.Option(
        help="Smallest area fraction of the random resized crop (augmentation; 1.0 disables "
        "cropping)."),
    ] = 0.6,
    hflip: Annotated[float, typer.Option(
        help="Probability of a horizontal flip (augmentation)."),
    ] = 0.5,
    auto_augment: Annotated[str | None, typer.Option(
        help="timm augmentation policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment, DeiT's "
        "recipe) or original (AutoAugment); off by default."),
    ] = None,
    reprob: Annotated[float, typer.Option(
        help="Random erasing probability (DeiT's recipe: 0.25).")] = 0.0,
    mixup: Annotated[float, typer.Option(
        help="Mixup Beta alpha (DeiT's recipe: 0.8; 0: off). With --cutmix, each batch gets "
        "one of the two.")] = TRAIN_OPTIM.mixup,
    cutmix: Annotated[float, typer.Option(
        help="CutMix Beta alpha (DeiT's recipe: 1.0; 0: off).")] = TRAIN_OPTIM.cutmix,
    class_map: ClassMapOpt = None,
    skip_unknown: Annotated[bool, flag(
        help="Skip (with a warning) class folders the class map lacks instead of stopping."),
    ] = False,
    workers: Annotated[int, typer.Option(
        min=0, help="Data-loading worker processes (0: load in the main process, best on machines "
        "with few cores)."),
    ] = 0,
    threads: ThreadsOpt = None,
    seed: Annotated[int, typer.Option(
        help="Seed for weights, shuffling and augmentation.")] = 0,
    devices: Annotated[int, typer.Option(
        min=1, help="Devices (GPUs, or CPU processes) per machine; more than 1 runs DDP, one "
        "process each (see the README's Scaling out).")] = TrainConfig.devices,
    num_nodes: Annotated[int, typer.Option(
        min=1, help="Machines: start the same command on each (torchrun, SLURM's srun, or "
        "MASTER_ADDR/MASTER_PORT/NODE_RANK set by hand).")] = TrainConfig.num_nodes,
    strategy: Annotated[str, typer.Option(
        help="auto (DDP when there is more than one process) or ddp (also for one).")
    ] = TrainConfig.strategy,
    accelerator: Annotated[str, typer.Option(help="cpu, gpu or auto.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="32-true, bf16-mixed or 16-mixed (GPU only)."),
    ] = "32-true",
    resume: Annotated[bool, flag(
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
        "--model", help="A timm model name, with its weights in --checkpoint FILE or --weights, or "
        "hf:DIR (a Hugging Face model directory, weights included)."),
    ] = None,
    weights: Annotated[Path | None, typer.Option(
        "--weights", help="Weights for --model: .safetensors, .pth or Lightning .ckpt."),
    ] = None,
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
    # an HF directory holds its weights (load_hf warns when it has none)
    untrained = model is not None and weights is None and not model.startswith("hf:")
    with user_errors():
        net = open_model(model, checkpoint if model is None else weights,
                         {k: v for k, v in overrides.items() if v is not None}, quiet=untrained)
    if untrained:
        Console(stderr=True).print("[yellow]warning:[/yellow] no --weights: the model is random; "
                                   "its accuracy and attention patterns mean nothing")
    return net.eval(), untrained


def _train_config(options: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a `train` or `finetune` call, from its options (a bad value is a
    TrainingError: build it inside ``user_errors``)."""
    o = dict(options)
    return TrainConfig(
        data=o["data"], out=o["out"], val_data=o["val_data"], epochs=o["epochs"],
        batch_size=o["batch_size"],
        optim=OptimConfig(**{f.name: o[f.name] for f in dataclasses.fields(OptimConfig)}),
        scale=(o["scale_min"], 1.0), hflip=o["hflip"], auto_augment=o["auto_augment"],
        reprob=o["reprob"], workers=o["workers"], seed=o["seed"], devices=o["devices"],
        num_nodes=o["num_nodes"], strategy=o["strategy"], accelerator=o["accelerator"],
        precision=o["precision"], resume=o["resume"],
        class_map=o["class_map"], skip_unknown=o["skip_unknown"],
        limit_train_batches=_batch_limit(o["limit_train_batches"]),
        limit_val_batches=_batch_limit(o["limit_val_batches"]), threads=o["threads"])
