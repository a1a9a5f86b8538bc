"""``hetvit fit``: compress a model and make it accurate from unlabeled images, in minutes."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from .app import app, flag, user_errors
from .common import (
    AggregationInitOpt,
    AggregationOpt,
    TeacherModelOpt,
    TeacherOpt,
    TeacherWeightsOpt,
    TorchThreadsOpt,
    _overrides,
    _size_options,
    check_out_is_not_an_input,
    open_teacher,
    resolve_plan,
    with_options,
)


def _trainable(value: str) -> str:
    from ..configs import TRAINABLE

    if value not in TRAINABLE:  # now, in the flag's words, not once the model is loaded
        raise typer.BadParameter(f"one of {', '.join(TRAINABLE)}, not {value!r}")
    return value


def _positive_minutes(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"a budget is a positive number of minutes, not {value:g}")
    return value


@app.command("fit")
@with_options(_size_options)
def fit_command(
    plan: Annotated[str, typer.Option(
        help="A preset (balanced, fast, fastest), scaled to the teacher, or a plan.json file.")],
    images: Annotated[Path, typer.Option(
        help="Unlabeled images of the model's domain: a folder of images (an ImageFolder, or "
        "images in any sub-folders) or a .tar.gz of one. Labels, if any, are never read.")],
    out: Annotated[Path, typer.Option(
        help="Directory to write the fitted checkpoint to, with fit.json (the fit's settings, "
        "images and time). An earlier checkpoint there is replaced; a folder of other files, or "
        "the teacher itself, is refused.")],
    teacher: TeacherOpt = None,
    model: TeacherModelOpt = None,
    checkpoint: TeacherWeightsOpt = None,
    num_images: Annotated[int, typer.Option(
        min=1, help="Images to fit on, drawn at random (seeded) from --images.")] = 2048,
    calibration_images: Annotated[int, typer.Option(
        min=1, help="Of those, how many start the static maps (mean attention) and, with "
        "--aggregation-init cluster, the pyramid.")] = 256,
    passes: Annotated[int, typer.Option(
        min=1, help="Passes over the images (each sees every image once, freshly augmented).",
    )] = 20,
    minutes: Annotated[float | None, typer.Option(
        callback=_positive_minutes,
        help="A budget of wall time for the whole command, loading included: one step is "
        "timed first and the passes cut to what the budget affords (at least 1, at most "
        "--passes). fit.json records the passes run; --passes of that number remakes the fit "
        "exactly.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the inherited weights.")
    ] = 3e-4,
    lr_new: Annotated[float, typer.Option(
        help="Peak learning rate of the static logits and aggregation weights.")] = 5e-2,
    mixup: Annotated[float, typer.Option(
        min=0.0, help="Mixup of image pairs, Beta(a, a) (0: off); 1.0 gained on every plan "
        "tried (docs/fitting.md).")] = 1.0,
    crop: Annotated[int, typer.Option(
        min=0, help="Shift each image by up to this many pixels (reflect padding) every "
        "step (0: off).")] = 0,
    scale: Annotated[float, typer.Option(
        help="Smallest area fraction of a random resized crop of each image every step, in "
        "(0, 1] (1: off).")] = 1.0,
    cutmix: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Probability that a step uses CutMix (a pasted box) instead "
        "of mixup (0: mixup only).")] = 0.0,
    features: Annotated[float, typer.Option(
        min=0.0, help="Weight of token distillation at the end of each pyramid stage (0: "
        "logits only).")] = 0.0,
    pre_logits: Annotated[float, typer.Option(
        min=0.0, help="Weight of distillation of the head's input (the pooled, normed token: "
        "D numbers an image where the logits give ten; 0: off). 10 gained 0.4-0.7 points "
        "with --aggregation content (docs/fitting.md).")] = 0.0,
    anchor: Annotated[float, typer.Option(
        min=0.0, help="Decay of the inherited weights towards the teacher's, per unit of "
        "learning rate (0: off).")] = 0.0,
    temperature: Annotated[float, typer.Option(
        help="Distillation temperature (1: match the teacher's probabilities; higher also "
        "matches how it ranks the unlikely classes).")] = 1.0,
    trainable: Annotated[str, typer.Option(
        callback=_trainable, help="What the fit trains: all, norms (the new parameters, norms "
        "and biases) or new (static logits and aggregation weights only).")] = "all",
    freeze_early: Annotated[bool, flag(
        "--freeze-early/--no-freeze-early", help="Keep the teacher's weights in the embeddings "
        "and the blocks before the plan's first change: they compute the teacher's tokens "
        "already (measured: the same top-1 in 14-27% less time). --no-freeze-early trains "
        "them too, as the committed assets/cifar10-fitted was.")
    ] = True,
    held_out: Annotated[int, typer.Option(
        min=0, help="Also draw this many images and keep them out of the fit: the fitted "
        "student's top-1 agreement with the teacher on them shows how it does on unseen "
        "images (no labels needed).")] = 0,
    aggregation_init: AggregationInitOpt = "pool",
    aggregation: AggregationOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the image draw, order and augmentation.")
    ] = 0,
    threads: TorchThreadsOpt = None,
    **sizes: Any,
) -> None:
    """Compress a trained ViT and fit the student to it on unlabeled images: no labels, no
    training pipeline, about ten minutes of a 2-core CPU for a small ViT.

    The frozen teacher labels every (augmented) image itself, and the student learns to match
    its predictions (distillation on its logits). About 2,000 images of the model's domain are
    enough. A fit is short and seeded, so an interrupted one is simply run again.
    """
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .. import files, io
    from ..data import sample_images
    from ..fitting import FitConfig, FitError, collect_images, fit
    from ..surgery import compress

    started = time.perf_counter()
    console = Console(stderr=True)
    if threads is not None:
        torch.set_num_threads(threads)
    with user_errors():
        config = FitConfig(passes=passes, batch_size=batch_size, lr=lr, lr_new=lr_new,
                           mixup=mixup, crop=crop, scale=scale, cutmix=cutmix, features=features,
                           pre_logits=pre_logits, anchor=anchor, temperature=temperature,
                           trainable=trainable, freeze_early=freeze_early, seed=seed,
                           minutes=minutes)
        files.check_writable(out)
        check_out_is_not_an_input(out, teacher=teacher, checkpoint=checkpoint)
        files.check_replaceable(out, io.SOURCE_FILE)
        source = open_teacher(teacher, model, checkpoint, _overrides(sizes))
        the_plan = resolve_plan(plan, source, aggregation)
        pool = collect_images(sample_images(images, source, num_images + held_out, seed=seed,
                                            batch_size=256))
        if held_out and len(pool) <= held_out:
            raise FitError(f"{images} holds {len(pool)} images: too few to keep {held_out} "
                           "out of the fit")
        if len(pool) < num_images + held_out:
            console.print(f"note: {images} holds {len(pool)} images, fewer than the "
                          f"{num_images + held_out} asked: fitting on all of them",
                          highlight=False)
        pool, unseen = (pool[:-held_out], pool[-held_out:]) if held_out else (pool, None)
        student = compress(source, the_plan, calibration=pool[:calibration_images],
                           aggregation_init=aggregation_init)
        with Progress(TextColumn("fit"), BarColumn(), TextColumn("{task.completed}/"
                      "{task.total} steps"), TextColumn("loss {task.fields[loss]:.4f}"),
                      TimeElapsedColumn(), console=console, transient=False) as bar:
            task = bar.add_task("fit", total=None, loss=float("nan"))

            def progress(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, total=total, loss=loss)

            if minutes is not None:  # the budget is the command's: loading counts too
                left = minutes - (time.perf_counter() - started) / 60
                config = replace(config, minutes=max(left, 1e-3))
            fitted = fit(student, source, pool, config, progress=progress, held_out=unseen)
        fitted.hetvit_fit.inputs = {
            "images": str(images), "num_images": num_images,
            "calibration_images": min(calibration_images, len(pool)),
            "aggregation_init": aggregation_init,
            "plan": plan, "aggregation": the_plan.aggregation, "seed": seed,
            "held_out": held_out, "minutes": minutes}
        io.save(fitted, out)
    record = fitted.hetvit_fit
    console.print(f"fitted {fitted.hetvit_plan.describe()} on {record.images} images in "
                  f"{record.seconds:.0f} s ({record.steps} steps); saved to [bold]{out}[/]",
                  highlight=False)
    if minutes is not None:
        console.print(f"the {minutes:g}-minute budget ({config.minutes:.1f} of it left after "
                      f"loading) afforded {record.passes} of {passes} passes "
                      f"({record.step_seconds:.2f} s a step)", highlight=False)
    match = record.match
    line = f"agreement with the teacher: {100 * match['fit']['agreement']:.1f}% on its own images"
    if "held_out" in match:
        line += (f", {100 * match['held_out']['agreement']:.1f}% on {held_out} held-out ones "
                 f"(KL {match['fit']['kl']:.3f} / {match['held_out']['kl']:.3f})")
    console.print(line, highlight=False)
