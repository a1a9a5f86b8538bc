"""Training a ViT and fine-tuning a compressed student: the thin entry points.

:func:`finetune` is the Python API: a teacher, a plan and data loaders in, the fine-tuned
student out. :func:`finetune_run` and :func:`train` are the CLI's path-based runs: they open
the datasets, own a run directory (lock, settings record, resume, ``<out>/model``) and call
into the same module and trainer (:mod:`hetvit.lightning_modules`, :mod:`hetvit.trainer`).
The losses are in :mod:`hetvit.distill`, the run bookkeeping in :mod:`hetvit.runs`, the
settings in :mod:`hetvit.configs`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io
from .batches import image_batches
from .configs import (
    FINETUNE_EPOCHS,
    DistillConfig,
    OptimConfig,
    TrainConfig,
    TrainingError,
)
from .data import make_loader, make_transform, open_dataset, random_subset
from .distributed import check_processes, is_writer
from .fitting import check_student
from .lightning_modules import FinetuneModule, TrainModule
from .plan import Plan
from .runs import (
    CHECKPOINT_NAME,
    check_precision,
    check_run,
    check_run_directory,
    config_dict,
    read_run_checkpoint,
    recorded_classes,
    run_lock,
    save_model,
    write_run_config,
)
from .surgery import compress, load_weights, plan_for
from .trainer import fit, fit_loaders, open_run_data

__all__ = ["finetune", "finetune_run", "train", "TrainConfig", "OptimConfig", "DistillConfig",
           "TrainingError"]

FINETUNE_CONFIG = "finetune_config.json"


def _check_distill(plan: Plan, distill: DistillConfig) -> bool:
    """Refuse settings this plan cannot use; whether the pyramid starts from k-means."""
    if distill.features > 0 and not plan.pyramid:
        raise TrainingError("feature distillation compares tokens at the end of each pyramid "
                            "stage, and this plan has no pyramid: drop --features")
    cluster = distill.aggregation_init == "cluster" and bool(plan.pyramid)
    if cluster and distill.calibration_images <= 0:
        raise TrainingError("--aggregation-init cluster groups tokens over calibration images: "
                            "give --calibration-images > 0")
    return cluster


def _needs_calibration(plan: Plan, distill: DistillConfig, cluster: bool) -> bool:
    return bool(plan.static or cluster) and distill.calibration_images > 0


def _start(teacher: nn.Module, plan: Plan, distill: DistillConfig, student: nn.Module | None,
           calibration: Any) -> nn.Module:
    """The student fine-tuning starts from: a copy of the given one, or ``teacher``
    compressed with ``plan`` and calibrated on ``calibration`` (``None``: uniform maps)."""
    if student is not None:
        student = copy.deepcopy(student)
        student.__dict__.pop("hetvit_fit", None)  # the fit made the start, not this model
        return student
    return compress(teacher, plan, calibration=calibration,
                    aggregation_init=distill.aggregation_init)


def _first_images(loader: Any, n: int) -> torch.Tensor:
    """The first ``n`` images a loader yields (fewer if it holds fewer)."""
    taken: list[torch.Tensor] = []
    count = 0
    for images in image_batches(loader):
        taken.append(images[: n - count])
        count += taken[-1].shape[0]
        if count >= n:
            break
    if not taken:
        raise TrainingError("the training loader yields no images")
    return torch.cat(taken)


@contextmanager
def _teacher_kept(teacher: nn.Module) -> Iterator[None]:
    """Give ``teacher`` back in the mode and on the device it came in (fine-tuning puts it in
    eval mode and moves it to the student's device)."""
    mode = teacher.training
    device = next(teacher.parameters(), torch.empty(0)).device
    try:
        yield
    finally:
        teacher.to(device).train(mode)


def finetune(teacher: nn.Module, plan: Plan | str | os.PathLike | None, train_loader: Any,
             val_loader: Any = None, *, distill: DistillConfig = DistillConfig(),
             optim: OptimConfig = OptimConfig(),
             epochs: int = FINETUNE_EPOCHS, out: str | os.PathLike | None = None,
             student: nn.Module | None = None, calibration: Any = None, seed: int = 0,
             accelerator: str = "auto", devices: int = 1, num_nodes: int = 1,
             strategy: str = "auto", precision: str = "32-true", threads: int | None = None,
             progress: bool = False, callbacks: Sequence[Any] = ()) -> nn.Module:
    """Compress ``teacher`` with ``plan`` and fine-tune the student on ``train_loader``.

    Returns the fine-tuned student (a new model, CPU, eval mode); ``teacher`` is not changed.

    Args:
        plan: where the student's static layers and pyramid stages go: a :class:`Plan`, a
            preset name (``"fast"``, scaled to ``teacher``) or a plan JSON file, as
            :func:`hetvit.compress` takes; ``None`` with ``student``.
        train_loader: ``(images, labels)`` batches in the teacher's input format (labels are
            its output indices), e.g. a ``DataLoader`` over ``hetvit.data.open_dataset``;
            batches of bare images train on the teacher alone (set ``distill.ce`` to 0).
        val_loader: ``(images, labels)`` batches scored (top-1/top-5) after every epoch.
        distill: the loss (:class:`hetvit.DistillConfig`: labels, teacher logits, guidance
            of the static maps, tokens at stage ends) and how the student starts.
        optim: AdamW, its schedule and Mixup/CutMix (:class:`hetvit.OptimConfig`).
        epochs: passes over ``train_loader``.
        seed: seed of the weights' start, the shuffles and the augmentation.
        student: start from this compressed model of ``teacher`` (e.g. from
            :func:`hetvit.fit`) instead; ``plan`` is then its plan (give ``None``).
        calibration: images whose mean teacher attention starts the static maps (anything
            :func:`hetvit.compress` takes); default: the first ``distill.calibration_images``
            images of ``train_loader`` (with its augmentation).
        out: a run directory for checkpoints, logs, ``epochs.log``/``curves.png`` and the
            student in ``<out>/model``; ``None`` keeps nothing on disk.
        devices, num_nodes, strategy: DDP over ``devices * num_nodes`` processes (see the
            README's "Scaling out"). Run from a script: Lightning starts the other processes
            of a machine by running it again. Each process iterates its shard of the loaders
            with their own batch size, so one step sees ``world`` batches; loaders from
            :func:`hetvit.data.make_loader` shard exactly (``shard=True`` for validation).
        accelerator, precision: Lightning's (``"cpu"``, ``"gpu"``; ``"32-true"``,
            ``"bf16-mixed"``, ``"16-mixed"`` on a GPU).
        threads: torch CPU threads of each process (default: its share of the cores).
        progress: draw Lightning's progress bar.
        callbacks: more Lightning callbacks, run with hetvit's own.
    """
    if epochs < 1:
        raise TrainingError(f"--epochs must be at least 1, got {epochs}")
    check_processes(devices, num_nodes, strategy, accelerator, threads=threads)
    check_precision(precision, accelerator)
    if student is not None:
        check_student(student, teacher)
        plan = student.hetvit_plan
    if plan is None:
        raise TrainingError("give a plan (a hetvit.Plan, a preset name or a plan JSON file), or "
                            "a compressed student= to start from")
    plan = plan_for(teacher, plan)[0]  # a Plan as it is; a preset name or a plan file, read
    cluster = _check_distill(plan, distill)
    run = None if out is None else Path(out)
    if run is not None:
        check_run_directory(run, FINETUNE_CONFIG)
        if (run / "checkpoints" / CHECKPOINT_NAME).exists():
            raise TrainingError(f"{run / 'checkpoints' / CHECKPOINT_NAME} exists: choose another "
                                "out (hetvit finetune --resume continues a run)")
    with _teacher_kept(teacher):
        teacher.eval()
        if student is None and calibration is None and _needs_calibration(plan, distill,
                                                                           cluster):
            calibration = _first_images(train_loader, distill.calibration_images)
        start = _start(teacher, plan, distill, student, calibration)
        module = FinetuneModule(start, teacher, distill, optim, seed=seed)
        module.hparams["classes"] = io.class_names(start)
        settings = dict(epochs=epochs, seed=seed, accelerator=accelerator, devices=devices,
                        num_nodes=num_nodes, strategy=strategy, precision=precision,
                        threads=threads, progress=progress, callbacks=callbacks)
        if run is None:
            fit_loaders(module, train_loader, val_loader, **settings)
        else:
            with run_lock(run):
                if is_writer():
                    write_run_config(run / FINETUNE_CONFIG, {
                        "plan": plan.to_dict(), **asdict(distill), **asdict(optim),
                        **{k: v for k, v in settings.items() if k != "callbacks"}})
                trainer = fit_loaders(module, train_loader, val_loader, out=run, **settings)
                if trainer.is_global_zero:
                    io.save(module.model.float().cpu().eval(), run / "model")
    return module.model.float().cpu().eval()


def finetune_run(teacher: nn.Module, plan: Plan | None, config: TrainConfig,
                 distill: DistillConfig = DistillConfig(), *,
                 student: nn.Module | None = None) -> Path:
    """``hetvit finetune``: compress ``teacher`` with ``plan`` and fine-tune the student on
    ``config.data`` in the run directory ``config.out``; returns ``<out>/model``.

    ``student``: start from this compressed model of ``teacher`` instead (e.g. one made by
    :func:`hetvit.fit`); ``plan`` is then its plan, and no calibration runs.

    The static maps start from the teacher's mean attention over ``calibration_images``
    training images drawn at random (eval transform); with ``aggregation_init="cluster"`` the
    pyramid stages start from k-means of the tokens over the same images (see
    :func:`hetvit.compress`). On ``resume`` the student's structure is rebuilt from the plan
    and every weight comes from the checkpoint.
    """
    if student is not None:
        check_student(student, teacher)
        plan = student.hetvit_plan
    check_run(config, FINETUNE_CONFIG)
    cluster = _check_distill(plan, distill)
    out = Path(config.out)
    teacher = teacher.eval()
    last = out / "checkpoints" / CHECKPOINT_NAME
    if config.resume and last.is_file():
        stored = read_run_checkpoint(last)["hyper_parameters"]
        if stored.get("plan", {}).get("static") != list(plan.static) or [
                list(s) for s in stored.get("plan", {}).get("pyramid", [])] != [
                list(s) for s in plan.pyramid]:
            raise TrainingError(f"--resume: the checkpoint was trained with plan "
                                f"{stored.get('plan')}, not {plan.to_dict()}")
        start = compress(teacher, plan, init="none")
    else:
        calib = None
        if student is None and _needs_calibration(plan, distill, cluster):
            ds = open_dataset(config.data, make_transform(teacher), class_map=config.class_map,
                              skip_unknown=config.skip_unknown)
            calib = make_loader(random_subset(ds, distill.calibration_images, config.seed),
                                batch_size=config.batch_size, workers=config.workers)
        start = _start(teacher, plan, distill, student, calib)
    module = FinetuneModule(start, teacher, distill, config.optim, seed=config.seed)
    data = open_run_data(module, config)  # every check before the first write
    with run_lock(out):
        if is_writer():
            write_run_config(out / FINETUNE_CONFIG, {
                "plan": plan.to_dict(), **asdict(distill), **config_dict(config),
                "classes": module.hparams["classes"]})
        trainer = fit(module, config, data)
        target = out / "model"
        if trainer.is_global_zero:
            io.save(module.model.float().cpu().eval(), target)
    return target


def train(model_name: str, model_kwargs: dict[str, Any], config: TrainConfig,
          init: str | os.PathLike | None = None) -> Path:
    """Train a timm model and write it to ``<out>/model``; returns that path.

    From scratch, or from the weights in ``init`` (a weights file or a hetvit checkpoint
    directory of the same architecture) with a fresh optimizer and schedule: a second phase
    with other settings, such as a short fine-tune at the test-time crop. A resumed run must
    name the same model and model flags as the checkpoint, and takes every weight from it;
    other settings (more epochs, say) may change and are recorded by
    :func:`~hetvit.runs.write_run_config`.
    """
    check_run(config, "train_config.json")
    out = Path(config.out)
    module = TrainModule(model_name, model_kwargs, config.optim, seed=config.seed,
                         augment={"scale": list(config.scale), "hflip": config.hflip,
                                  "auto_augment": config.auto_augment, "reprob": config.reprob})
    if init is not None:
        init = Path(init)
        load_weights(module.model, init / "model.safetensors" if init.is_dir() else init)
        names = recorded_classes(init)
        if names is not None:  # the weights' classes stay theirs: --data is mapped to them
            module.model.hetvit_classes = names
    if config.resume:
        last = out / "checkpoints" / CHECKPOINT_NAME
        if last.is_file():
            stored = read_run_checkpoint(last)["hyper_parameters"]
            if (stored["model_name"], stored["model_kwargs"]) != (model_name, model_kwargs):
                raise TrainingError(
                    f"--resume: the checkpoint was trained as {stored['model_name']} "
                    f"{stored['model_kwargs']}, not {model_name} {model_kwargs}")
    data = open_run_data(module, config)  # every check before the first write
    with run_lock(out):
        if is_writer():
            write_run_config(out / "train_config.json", {
                "model_name": model_name, "model_kwargs": model_kwargs,
                "init": None if init is None else str(init), **config_dict(config),
                "classes": module.hparams["classes"]})
        trainer = fit(module, config, data)
        target = out / "model"
        if trainer.is_global_zero:
            module.model.eval()
            save_model(module.model.float().cpu(), target, model_name, model_kwargs)
    return target
