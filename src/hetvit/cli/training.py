"""Commands that train and measure accuracy: train, finetune, evaluate."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from ..configs import FINETUNE_EPOCHS, TRAIN_OPTIM, DistillConfig, OptimConfig, TrainConfig
from ..errors import UsageError
from .app import app, fail, flag, user_errors
from .common import (
    AggregationInitOpt,
    AggregationOpt,
    ClassMapOpt,
    DataOpt,
    MinLrOpt,
    OutOpt,
    TeacherModelOpt,
    TeacherOpt,
    TeacherWeightsOpt,
    TorchThreadsOpt,
    ValDataOpt,
    _model_options,
    _overrides,
    _run_options,
    _size_options,
    _train_config,
    open_given_model,
    open_model,
    open_teacher,
    resolve_plan,
    with_options,
)
from .methods import _method_options, apply_method, pop_method_options

OPTIM, DISTILL = OptimConfig(), DistillConfig()  # fine-tuning's defaults


@app.command()
@with_options(_run_options)
@with_options(_size_options)
def train(
    model: Annotated[str, typer.Option(
        "--model",
        help="timm model name to build (randomly initialised), e.g. deit_tiny_patch16_224."),
    ],
    data: DataOpt,
    out: OutOpt,
    val_data: ValDataOpt = None,
    drop_path: Annotated[float | None, typer.Option(help="Stochastic depth rate override.")] = None,
    epochs: Annotated[int, typer.Option(
        min=1, help="Epochs to train in total (also sets the schedule)."),
    ] = TrainConfig.epochs,
    lr: Annotated[float, typer.Option(
        help="Peak AdamW learning rate, reached after warm-up."),
    ] = TRAIN_OPTIM.lr,
    warmup_epochs: Annotated[float, typer.Option(
        help="Linear warm-up length in epochs (the learning rate rises every step)."),
    ] = TRAIN_OPTIM.warmup_epochs,
    min_lr: MinLrOpt = TRAIN_OPTIM.min_lr,
    init: Annotated[Path | None, typer.Option(
        help="Start from these weights instead of random ones (.pth, .safetensors, a `hetvit "
        "train` .ckpt or a hetvit checkpoint directory of the same architecture), with a fresh "
        "optimizer and schedule.")] = None,
    **run: Any,
) -> None:
    """Train a timm ViT from scratch (the teacher), or from --init weights.

    AdamW, warm-up + cosine, label smoothing and timm augmentation, on Lightning; resumable
    (--resume), with CSV logs and a progress bar. The model ends up in OUT/model.
    """
    from rich.console import Console

    from ..distributed import is_writer
    from ..training import train as run_training

    console = Console(stderr=True)
    kwargs = _overrides(run)
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    with user_errors():
        config = _train_config({**locals(), **run})
        target = run_training(model, kwargs, config, init=init)
    if is_writer():  # under DDP every process returns here
        console.print(f"model written to {target}")


@app.command()
@with_options(_run_options)
@with_options(_size_options)
def finetune(
    data: DataOpt,
    out: OutOpt,
    plan: Annotated[str | None, typer.Option(
        help="A preset (balanced, fast, fastest), scaled to the teacher, or a plan.json file "
        "(not with --student, which has its plan).")] = None,
    student: Annotated[Path | None, typer.Option(
        help="Start from this compressed model of the teacher (a hetvit checkpoint directory, "
        "e.g. from `hetvit fit`) instead of compressing and calibrating it here.")] = None,
    teacher: TeacherOpt = None,
    model: TeacherModelOpt = None,
    checkpoint: TeacherWeightsOpt = None,
    val_data: ValDataOpt = None,
    epochs: Annotated[int, typer.Option(
        min=1, help="Fine-tuning epochs (also sets the schedule).")] = FINETUNE_EPOCHS,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = OPTIM.lr,
    map_lr_scale: Annotated[float, typer.Option(
        help="Learning-rate multiplier for the static attention logits and aggregation "
        "weights (log-space parameters, never weight-decayed).")] = DISTILL.map_lr_scale,
    ce: Annotated[float, typer.Option(help="Weight of cross-entropy on the labels.")] = DISTILL.ce,
    kd: Annotated[float, typer.Option(
        help="Weight of distillation from the teacher's logits (KL at --temperature).")
    ] = DISTILL.kd,
    temperature: Annotated[float, typer.Option(
        help="Distillation temperature.")] = DISTILL.temperature,
    guidance: Annotated[float, typer.Option(
        help="Weight of the dynamic guidance: KL(teacher's dynamic attention || student's "
        "static attention) at every static layer. 0 turns it off (ablation).")
    ] = DISTILL.guidance,
    mix_epochs: Annotated[float, typer.Option(
        help="Curriculum: static layers run on lambda*dynamic + (1-lambda)*static, lambda "
        "going 1 -> 0 over this many epochs (0: off).")] = DISTILL.mix_epochs,
    freeze_aggregation: Annotated[bool, flag(
        help="Keep the token aggregation at its start, pooling or k-means (ablation).")
    ] = DISTILL.freeze_aggregation,
    features: Annotated[float, typer.Option(
        help="Weight of feature distillation: at the end of every pyramid stage, the squared "
        "error of the student's tokens against the teacher's tokens aggregated the same way, "
        "divided by the teacher tokens' mean square (0: off).")] = DISTILL.features,
    calibration_images: Annotated[int, typer.Option(
        min=0, help="Training images whose mean attention initialises the static maps (0: uniform "
        "start).")] = DISTILL.calibration_images,
    aggregation_init: AggregationInitOpt = DISTILL.aggregation_init,
    aggregation: AggregationOpt = None,
    warmup_epochs: Annotated[float, typer.Option(
        help="Warm-up length in epochs.")] = OPTIM.warmup_epochs,
    min_lr: MinLrOpt = OPTIM.min_lr,
    **run: Any,
) -> None:
    """Compress a trained ViT and fine-tune the student with dynamic guidance and distillation.

    Loss = ce * CE(labels) + kd * KD(teacher logits) + guidance * KL(teacher attention ||
    static attention) [+ features * token error at each pyramid stage's end]. The result,
    RUN/model, is a hetvit checkpoint (`hetvit.load`).
    """
    from rich.console import Console

    from ..distributed import is_writer
    from ..training import finetune_run

    console = Console(stderr=True)
    options = {**locals(), **run}
    with user_errors():
        config = _train_config(options)
        distill = DistillConfig(**{f.name: options[f.name]
                                   for f in dataclasses.fields(DistillConfig)})
        if (plan is None) == (student is None):
            raise UsageError("give --plan (a preset or plan.json) or --student DIR (a "
                             "compressed model of the teacher, e.g. from hetvit fit), not "
                             f"{'both' if plan else 'neither'}")
        if aggregation is not None and student is not None:
            raise UsageError("--aggregation goes with --plan: a --student has its plan")
        source = open_teacher(teacher, model, checkpoint, _overrides(options))
        start = open_model(None, student) if student is not None else None
        the_plan = (resolve_plan(plan, source, aggregation) if plan is not None
                    else start.hetvit_plan)
        target = finetune_run(source, the_plan, config, distill, student=start)
    if is_writer():
        console.print(f"student written to {target}")


@app.command("evaluate")
@with_options(_model_options, first=True)
@with_options(_method_options)
@with_options(_size_options)
def evaluate_command(
    data: Annotated[Path, typer.Option(
        "--data", help="Images to evaluate: an ImageFolder directory or a .tar.gz of one."),
    ],
    class_map: ClassMapOpt = None,
    skip_unknown: Annotated[bool, flag(
        help="Skip class folders the class map lacks instead of stopping."),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 256,
    workers: Annotated[int, typer.Option(min=0, help="Data-loading worker processes.")] = 0,
    threads: TorchThreadsOpt = None,
    limit: Annotated[int | None, typer.Option(
        min=1, help="Evaluate only the first N images (after a fixed shuffle): a quick estimate."),
    ] = None,
    as_json: Annotated[bool, flag("--json", help="Print JSON instead of a table.")
    ] = False,
    **source: Any,
) -> None:
    """Top-1 / top-5 accuracy and cross-entropy of a model on an image folder or archive.

    With --method tome or evit the model is evaluated under that training-free baseline.
    --checkpoint FILE.onnx (fp32 or int8, from hetvit export) runs that graph in onnxruntime.
    """
    import json as json_lib

    import torch
    from rich.console import Console
    from rich.table import Table

    from ..data import make_loader, make_transform, open_for_model, random_subset
    from ..evaluation import evaluate

    console = Console(stderr=True)
    if threads is not None:
        torch.set_num_threads(threads)
    method = pop_method_options(source)
    net = _open_onnx(source, method, threads)
    if net is None:
        net, _ = open_given_model(**source)
        net = apply_method(net, method)
    name = str(source["checkpoint"] or source["model"])
    if method["method"] is not None:
        from ..baselines import describe_baseline

        name += f" + {describe_baseline(net)}"
    with user_errors():
        # labels are the model's output indices: folders go through its recorded class names
        dataset = open_for_model(data, net, make_transform(net, training=False),
                                 class_map=class_map, skip_unknown=skip_unknown)
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


def _open_onnx(source: dict[str, Any], method: dict[str, Any], threads: int | None) -> Any:
    """The ``--checkpoint FILE.onnx`` of ``evaluate`` as a model run by onnxruntime, or None
    when the checkpoint is not an ONNX file."""
    from ..onnx_model import OnnxClassifier, is_onnx_file

    checkpoint = source.get("checkpoint")
    if checkpoint is None or not is_onnx_file(checkpoint):
        return None
    others = [f"--{k.replace('_', '-')}" for k, v in {**source, **method}.items()
              if k != "checkpoint" and v not in (None, False)]
    if others:
        fail(f"an .onnx --checkpoint is evaluated as it is: {', '.join(others)} cannot apply")
    with user_errors():
        return OnnxClassifier(checkpoint, threads=threads)
