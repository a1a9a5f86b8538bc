"""Training with Lightning: a ViT from scratch now, distillation fine-tuning on the same base.

:class:`BaseModule` holds what every run shares: AdamW with no decay on norms, biases and
position/class tokens; a per-step linear warm-up then cosine schedule; label-smoothed
cross-entropy; validation top-1/top-5. (A resumed run draws the same augmentations as an
uninterrupted one because the training loader reseeds per epoch, see ``hetvit.data``.)
:class:`TrainModule` adds a timm model built from ``(model_name, model_kwargs)``, both saved
as hyper-parameters, so a ``last.ckpt`` is enough to rebuild the model. :func:`fit` wires
data, checkpoints, logs and the final export.

Checkpoint layout (kept stable, runs are resumed across sessions): ``state_dict`` keys are
``model.<timm key>``; ``hyper_parameters`` hold the fields of :class:`TrainModule`'s
``__init__``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from .data import (
    DataError,
    ImageDataset,
    make_loader,
    make_transform,
    open_dataset,
    open_for_model,
    random_subset,
)
from .files import pid_alive
from .hosts import host_of
from .losses import kd_loss

__all__ = [
    "TrainConfig",
    "FinetuneModule",
    "finetune",
    "BaseModule",
    "TrainModule",
    "fit",
    "create_model",
    "warmup_cosine",
    "check_precision",
    "save_model",
    "CHECKPOINT_NAME",
    "TrainingError",
    "train",
    "load_checkpoint_model",
    "read_run_checkpoint",
    "check_run",
    "run_lock",
    "open_run_data",
    "RunData",
    "LOCK_NAME",
]

CHECKPOINT_NAME = "last.ckpt"
LOCK_NAME = ".lock"
# What only a hetvit run directory holds: its settings, or (for a bare `fit`) its checkpoints.
RUN_MARKERS = ("train_config.json", "finetune_config.json", "checkpoints")


class TrainingError(ValueError):
    """A training run that cannot start as asked (bad precision, checkpoint conflicts, ...)."""


def create_model(model_name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A fresh (randomly initialised) timm model whose data config matches its input size.

    The ``pretrained_cfg`` of a model built with an ``img_size`` override still describes the
    family's default input; it is corrected here so that transforms, ``hetvit.io.save`` and
    ``hetvit evaluate`` all see the size the model was trained at (with its family's
    ``crop_pct``, see :func:`hetvit.data.data_config`).
    """
    from .data import data_config
    from .hosts.timm import create_timm_model

    model = create_timm_model(model_name, **(model_kwargs or {}))
    cfg = data_config(model)
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}),
                            "input_size": cfg["input_size"], "crop_pct": cfg["crop_pct"]}
    return model


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear from ~0 to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BaseModule(L.LightningModule):
    """Optimiser, schedule, loss and validation shared by training and distillation.

    Subclasses set ``self.model`` (the network being trained) and implement
    ``training_step``; they may override :meth:`trainable_parameters` (e.g. to leave a frozen
    teacher out of the optimiser). ``seed`` is only recorded (as a hyper-parameter); the
    seeding itself is done by :func:`fit` and the training loader.
    """

    model: nn.Module

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: float = 1.0,
                 min_lr: float = 1e-5, label_smoothing: float = 0.1, seed: int | None = 0,
                 mixup: float = 0.0, cutmix: float = 0.0) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.warmup_epochs = lr, weight_decay, warmup_epochs
        self.min_lr, self.label_smoothing, self.seed = min_lr, label_smoothing, seed
        self.mixup, self.cutmix = mixup, cutmix
        self._mixer: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def trainable_parameters(self) -> nn.Module:
        """The module whose parameters the optimiser updates."""
        return self.model

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay except on norms, biases and tokens."""
        from timm.optim import param_groups_weight_decay

        module = self.trainable_parameters()
        skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
        return param_groups_weight_decay(module, self.weight_decay, no_weight_decay_list=skip)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.lr)
        total = int(self.trainer.estimated_stepping_batches)
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        warmup = int(round(self.warmup_epochs * total / max_epochs))
        min_ratio = self.min_lr / self.lr if self.lr > 0 else 0.0

        def multiplier(step: int) -> float:
            return warmup_cosine(step, warmup, total, min_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def classification_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Label-smoothed cross-entropy; ``target`` holds class indices or, after
        :meth:`mix_batch`, class probabilities."""
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def mix_batch(self, images: torch.Tensor, target: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup / CutMix (DeiT's recipe) when ``mixup`` or ``cutmix`` (Beta alphas) is set.

        timm's ``Mixup`` draws one lambda per batch (mixup or cutmix, half the time each when
        both are on) and pairs each image with the batch reversed; the targets become class
        probabilities. Its draws come from numpy's global generator, which the training loader
        reseeds every epoch, so a resumed run mixes exactly like an uninterrupted one. Label
        smoothing is left to :meth:`classification_loss`. A batch of odd size (an unreadable
        image was dropped) loses its last image, as ``Mixup`` pairs images.
        """
        if not (self.mixup > 0 or self.cutmix > 0):
            return images, target
        if self._mixer is None:
            from timm.data import Mixup

            self._mixer = Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix,
                                label_smoothing=0.0, num_classes=self.model.num_classes)
        even = images.shape[0] - images.shape[0] % 2
        return self._mixer(images[:even], target[:even])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch is None:
            return
        images, target = batch
        logits = self(images)
        loss = F.cross_entropy(logits, target)
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        top1 = (topk[:, 0] == target).float().mean()
        top5 = (topk == target[:, None]).any(-1).float().mean()
        size = target.shape[0]
        self.log("val/loss", loss, batch_size=size, sync_dist=True)
        self.log("val/top1", top1, batch_size=size, sync_dist=True, prog_bar=True)
        self.log("val/top5", top5, batch_size=size, sync_dist=True)


class TrainModule(BaseModule):
    """Supervised training of a timm classifier from scratch."""

    def __init__(self, model_name: str, model_kwargs: dict[str, Any] | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: float = 1.0,
                 min_lr: float = 1e-5, label_smoothing: float = 0.1, seed: int | None = 0,
                 augment: dict[str, Any] | None = None, mixup: float = 0.0,
                 cutmix: float = 0.0) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                         min_lr=min_lr, label_smoothing=label_smoothing, seed=seed,
                         mixup=mixup, cutmix=cutmix)
        self.save_hyperparameters()
        self.model = create_model(model_name, model_kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable
            return None
        images, target = self.mix_batch(*batch)
        logits = self(images)
        loss = self.classification_loss(logits, target)
        size = target.shape[0]
        self.log("train/loss", loss, batch_size=size, prog_bar=True, on_step=True, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size,
                 prog_bar=False, on_step=True, on_epoch=False)
        return loss


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model; the CLI fills it from its flags."""

    data: Path
    out: Path
    val_data: Path | None = None
    epochs: int = 16
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    auto_augment: str | None = None
    reprob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    workers: int = 0
    seed: int = 0
    devices: int = 1
    accelerator: str = "auto"
    precision: str = "32-true"
    resume: bool = False
    class_map: str | None = None
    skip_unknown: bool = False
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    threads: int | None = None
    progress: bool = True
    extra_callbacks: list[Any] = field(default_factory=list)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_precision(precision: str, accelerator: str) -> None:
    """Fail early, and clearly, on a precision the hardware cannot run."""
    allowed = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
    if precision not in allowed:
        raise TrainingError(f"precision must be one of {', '.join(allowed)}, not {precision!r}")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto"
                                                and torch.cuda.is_available())
    if precision == "16-mixed" and not on_gpu:
        raise TrainingError("precision 16-mixed needs a CUDA GPU (none is used here); "
                         "use bf16-mixed or 32-true")
    if precision.startswith("bf16") and on_gpu and not torch.cuda.is_bf16_supported():
        raise TrainingError("this GPU has no bfloat16 support; use 16-mixed or 32-true")


class EpochSummary(L.Callback):
    """One plain line per epoch (time, train loss, val top-1), printed for a ``nohup`` log and
    appended to ``<out>/epochs.log``, whose plot ``<out>/curves.png`` is redrawn each epoch."""

    def __init__(self, out: Path | None = None) -> None:
        self.out = out

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from .curves import CURVES_PNG, EPOCHS_LOG, format_epoch, plot_epochs

        if trainer.global_rank != 0:
            return
        metrics = {key: float(trainer.callback_metrics[key])
                   for key in ("train/loss_epoch", "val/loss", "val/top1", "val/top5")
                   if key in trainer.callback_metrics}
        line = format_epoch(trainer.current_epoch + 1, int(trainer.max_epochs or 0),
                            time.perf_counter() - self._start, trainer.global_step, metrics)
        print(line, file=sys.stderr, flush=True)
        if self.out is None:
            return
        with open(self.out / EPOCHS_LOG, "a") as f:
            f.write(line + "\n")
        try:
            plot_epochs(self.out / EPOCHS_LOG, self.out / CURVES_PNG, title=self.out.name)
        except Exception as err:  # noqa: BLE001 - a plot must never stop hours of training
            warnings.warn(f"could not draw {self.out / CURVES_PNG}: {err!r}", stacklevel=2)


def save_model(model: nn.Module, directory: Path, model_name: str,
               model_kwargs: dict[str, Any]) -> Path:
    """Write the trained model as a loadable directory with ``hetvit.io.save``.

    ``config.json`` beside it records how to rebuild the bare timm model without hetvit.
    """
    config = json.dumps({"model_name": model_name, "model_kwargs": model_kwargs}, indent=2)
    try:
        from . import io

        path = Path(io.save(model, directory))
    except Exception as err:  # noqa: BLE001 - never lose hours of training to an export bug
        from safetensors.torch import save_file

        warnings.warn(f"hetvit.io.save failed ({err!r}); writing plain safetensors instead",
                      stacklevel=2)
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(config + "\n")
    return path


def check_run(config: TrainConfig, marker: str | None = None) -> None:
    """Raise a clear error for a run that cannot start as asked.

    Called before anything is written: a mistaken command must not touch the run directory
    (its ``train_config.json`` is the record of how a model was trained). ``marker`` is the
    settings file of the run's kind (``train_config.json``, ``finetune_config.json``): a
    directory holding the other kind's run is refused too.
    """
    for name, least in (("epochs", 1), ("batch_size", 1), ("devices", 1), ("workers", 0)):
        if getattr(config, name) < least:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least {least}, got "
                                f"{getattr(config, name)}")
    if config.threads is not None and config.threads < 1:
        raise TrainingError(f"--threads must be at least 1, got {config.threads}")
    check_precision(config.precision, config.accelerator)
    check_run_directory(Path(config.out), marker)
    last = Path(config.out) / "checkpoints" / CHECKPOINT_NAME
    if config.resume and not last.is_file():
        raise TrainingError(f"--resume: no checkpoint at {last}")
    if not config.resume and last.is_file():
        raise TrainingError(f"{last} exists: pass --resume to continue that run, or choose "
                              "another --out")
    for path in (config.data, config.val_data):
        if path is not None and not Path(path).exists():
            raise DataError(f"data path not found: {path}")
    for name in ("mixup", "cutmix", "reprob"):
        if getattr(config, name) < 0:
            raise TrainingError(f"--{name} must be >= 0, got {getattr(config, name)}")
    if config.reprob > 1:
        raise TrainingError(f"--reprob is a probability, got {config.reprob}")
    if config.auto_augment:
        from timm.data import create_transform

        try:  # timm checks the policy string only when it builds the transform
            create_transform(input_size=(3, 32, 32), is_training=True,
                             auto_augment=config.auto_augment)
        except (AssertionError, ValueError, KeyError) as err:
            raise TrainingError(f"--auto-augment {config.auto_augment!r}: {err} (timm policies: "
                                "rand-m9-mstd0.5-inc1, original, v0, augmix-m5, ...)") from None


def check_run_directory(out: Path, marker: str | None = None) -> None:
    """Refuse an ``--out`` that holds something other than a hetvit run (of ``marker``'s kind).

    A run appends to ``epochs.log``, writes ``checkpoints/`` and replaces ``model/``; in a
    folder of other files (a mistyped ``--out``) it would mix its files with the user's, so
    that is refused before any work. A live lock (another run on the directory) is refused
    here too, so that a second run stops before hours of work rather than at the first write.
    """
    from .files import check_replaceable
    from .io import SOURCE_FILE

    if not out.exists():
        return
    if not out.is_dir():
        raise TrainingError(f"--out {out} exists and is not a directory; choose another --out")
    entries = {p.name for p in out.iterdir()} - {LOCK_NAME}
    if entries and not entries & set(RUN_MARKERS):
        shown = ", ".join(sorted(entries)[:3]) + (" ..." if len(entries) > 3 else "")
        raise TrainingError(f"--out {out} holds files that are not a hetvit run ({shown}); "
                            "refusing to write into it: choose another --out")
    others = [m for m in RUN_MARKERS[:2] if m in entries and m != marker]
    if marker is not None and others and marker not in entries:
        raise TrainingError(f"--out {out} holds another kind of run ({others[0]}, no {marker}): "
                            "choose another --out")
    try:
        check_replaceable(out / "model", SOURCE_FILE)
    except FileExistsError as err:
        raise TrainingError(f"{err} (the run writes its model to {out / 'model'})") from None
    holder = lock_holder(out / LOCK_NAME)
    if holder is not None and Path(out).resolve() not in _HELD_LOCKS:
        raise TrainingError(_locked_message(out / LOCK_NAME, holder))


_HELD_LOCKS: set[Path] = set()


def lock_holder(path: Path) -> dict[str, Any] | None:
    """Who holds the run lock ``path``, or ``None`` when it is free or stale.

    A lock is stale when its process is gone: same host, no such pid (a killed run leaves its
    lock behind). On another host (a shared file system) nothing can be told, so it holds.
    """
    try:
        holder = json.loads(path.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return {"pid": "?", "host": "?", "since": "?"}  # unreadable: only a person can tell
    if host == socket.gethostname() and not _pid_alive(pid):
        return None
    return holder


def _pid_alive(pid: int) -> bool:
    # our own pid, not in _HELD_LOCKS: a lock left by an earlier process that had our pid
    return pid != os.getpid() and pid_alive(pid)


def _locked_message(path: Path, holder: dict[str, Any]) -> str:
    return (f"{path.parent} is in use by another run (pid {holder.get('pid')} on host "
            f"{holder.get('host')}, since {holder.get('since')}): wait for it to finish, or, if "
            f"that run is dead, delete {path}")


@contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``<out>/.lock`` (pid, host, start time) while a run writes into ``out``.

    Two runs on one directory would interleave ``epochs.log`` and overwrite ``last.ckpt``.
    The lock is created atomically (``O_EXCL``); a stale one (its pid dead on this host) is
    taken over with a warning, a live one is a :class:`TrainingError` naming its holder and
    how to clear it. Re-entrant within a process (``train`` holds it around ``fit``). If the
    directory was created here and the run fails before its first checkpoint, the directory
    is removed: a failed start leaves nothing behind.
    """
    out = Path(out)
    key = out.resolve()
    if key in _HELD_LOCKS or os.environ.get("LOCAL_RANK", "0") != "0":  # DDP workers: rank 0
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock_holder(path)
            if holder is not None:
                raise TrainingError(_locked_message(path, holder)) from None
            warnings.warn(f"taking over the stale lock {path} (its process is gone)",
                          stacklevel=3)
            path.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    _HELD_LOCKS.add(key)
    try:
        yield
    except BaseException:
        if created and not (out / "checkpoints" / CHECKPOINT_NAME).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        _HELD_LOCKS.discard(key)
        path.unlink(missing_ok=True)


@dataclass
class RunData:
    """A run's datasets and loaders, opened and checked before anything is written."""

    train_set: ImageDataset
    train_loader: Any
    val_set: ImageDataset | None = None
    val_loader: Any = None


def open_run_data(module: BaseModule, config: TrainConfig) -> RunData:
    """Open and check the training (and validation) data of ``module``'s run.

    Labels are the model's output indices: a model that records class names (a fine-tuned
    teacher, a resumed run) maps the folders through them, and a fresh model takes the
    training set's names, which are then recorded in its checkpoints and in ``model/``. The
    validation images are put in a fixed random order, so that ``--limit-val-batches`` sees
    every class instead of the first folders.
    """
    from .labels import class_names

    model = module.model
    last = Path(config.out) / "checkpoints" / CHECKPOINT_NAME
    if config.resume and last.is_file():
        stored = read_run_checkpoint(last).get("hyper_parameters", {}).get("classes")
        if stored is not None:
            model.hetvit_classes = list(stored)  # the run's classes, whatever --data holds
    train_tf = make_transform(model, training=True, scale=config.scale, hflip=config.hflip,
                              auto_augment=config.auto_augment, re_prob=config.reprob)
    train_set = open_for_model(config.data, model, train_tf, class_map=config.class_map,
                               skip_unknown=config.skip_unknown, purpose="training on")
    if class_names(model) is None and len(train_set.classes) == getattr(model, "num_classes",
                                                                        None):
        model.hetvit_classes = list(train_set.classes)
    module.hparams["classes"] = class_names(model)
    if len(train_set) < config.batch_size * config.devices:
        raise DataError(f"{config.data} holds {len(train_set)} images, fewer than one batch "
                        f"({config.batch_size} x {config.devices} device(s)); lower --batch-size")
    train_loader = make_loader(train_set, config.batch_size, shuffle=True,
                               workers=config.workers, seed=config.seed, drop_last=True)
    if config.val_data is None:
        return RunData(train_set, train_loader)
    val_set = open_for_model(config.val_data, model, make_transform(model, training=False),
                             class_map=config.class_map, skip_unknown=config.skip_unknown,
                             purpose="validating on")
    if val_set.classes != train_set.classes:
        raise DataError("the validation set's classes differ from the training set's: "
                        f"{val_set.classes[:5]} vs {train_set.classes[:5]}")
    val_loader = make_loader(random_subset(val_set, len(val_set), config.seed),
                             config.batch_size * 2, workers=config.workers)
    return RunData(train_set, train_loader, val_set, val_loader)


def fit(module: BaseModule, config: TrainConfig, data: RunData | None = None) -> L.Trainer:
    """Train ``module`` on ``config.data``; checkpoints go to ``<out>/checkpoints/last.ckpt``.

    With ``config.resume`` the run continues from that checkpoint (optimizer, schedule, epoch,
    step). Without it an existing checkpoint is an error rather than being overwritten. torch
    uses ``config.threads`` (default: every core this process may use) while it trains.
    ``data`` is what :func:`open_run_data` opened (default: opened here). The run holds
    :func:`run_lock` on ``config.out`` while it writes.
    """
    check_run(config)
    data = data or open_run_data(module, config)
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads or available_cores())
    try:
        with run_lock(config.out), _quiet_lightning():
            return _fit(module, config, data)
    finally:
        torch.set_num_threads(previous)


# Lightning's info lines ("GPU available: False, used: False", "TPU available", tips to install
# its cloud services, "max_epochs reached") say nothing a hetvit user can act on and bury the
# epoch lines. They are logged at INFO; its warnings go through `warnings` and still show.
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                          "lightning.fabric.utilities.rank_zero",
                          "lightning.pytorch.accelerators.cuda",
                          "lightning.pytorch.trainer.connectors.accelerator_connector")


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's INFO chatter silenced for a run, the levels restored afterwards."""
    import logging

    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _fit(module: BaseModule, config: TrainConfig, data: RunData) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    out = Path(config.out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / CHECKPOINT_NAME

    L.seed_everything(config.seed, workers=True, verbose=False)
    train_set, train_loader = data.train_set, data.train_loader
    val_set, val_loader = data.val_set, data.val_loader

    out.mkdir(parents=True, exist_ok=True)
    refresh = 1 if sys.stderr.isatty() else 25
    callbacks: list[Any] = [
        # Without a monitor, top-1 keeps the newest epoch; Lightning writes "last" only when a
        # top-k checkpoint was saved, so the top-k file itself is named last.ckpt.
        ModelCheckpoint(dirpath=ckpt_dir, filename=Path(CHECKPOINT_NAME).stem, save_top_k=1,
                        every_n_epochs=1, save_on_train_epoch_end=True,
                        enable_version_counter=False),
        EpochSummary(out),
        *config.extra_callbacks,
    ]
    if config.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=refresh))
    extra: dict[str, Any] = {}
    if config.limit_train_batches is not None:
        extra["limit_train_batches"] = config.limit_train_batches
    if config.limit_val_batches is not None:
        extra["limit_val_batches"] = config.limit_val_batches
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy="ddp" if config.devices > 1 else "auto",
        precision=config.precision,
        callbacks=callbacks,
        logger=CSVLogger(save_dir=str(out), name="logs"),
        log_every_n_steps=10,
        enable_progress_bar=config.progress,
        enable_model_summary=not config.resume,
        num_sanity_val_steps=0,
        **extra,
    )
    with warnings.catch_warnings():
        # Lightning suggests workers on 2-core machines where they only steal compute.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        try:
            trainer.fit(module, train_loader, val_loader,
                        ckpt_path=str(last) if config.resume else None)
        except MisconfigurationException as err:  # e.g. a --limit-*-batches fraction of 0 batches
            raise TrainingError(str(err)) from None
    for name, dataset in (("training", train_set), ("validation", val_set)):
        if dataset is not None and dataset.skipped:
            print(f"warning: {dataset.skipped} unreadable {name} image(s) were skipped",
                  file=sys.stderr)
    return trainer


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The run's settings as JSON-friendly values (written to ``<out>/train_config.json``)."""
    values = asdict(config)
    values.pop("extra_callbacks", None)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


def write_run_config(path: Path, values: dict[str, Any]) -> None:
    """Record a run's settings in ``path`` (JSON).

    A resumed run with other settings (more epochs, say) rewrites the file and appends the
    settings it replaces, time-stamped, to ``config_history.jsonl`` beside it, so the record
    of how a model was trained stays complete.
    """
    values = json.loads(json.dumps(values))  # as read back: tuples become lists

    def differs(old: dict[str, Any]) -> bool:
        return ({k: v for k, v in old.items() if k != "resume"}
                != {k: v for k, v in values.items() if k != "resume"})

    if path.exists():
        old = json.loads(path.read_text())
        if not differs(old):
            return
        with open(path.parent / "config_history.jsonl", "a") as f:
            f.write(json.dumps({"replaced_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "file": path.name, "settings": old}) + "\n")
    path.write_text(json.dumps(values, indent=2) + "\n")


def train(model_name: str, model_kwargs: dict[str, Any], config: TrainConfig,
          init: str | os.PathLike | None = None) -> Path:
    """Train a timm model and write it to ``<out>/model``; returns that path.

    From scratch, or from the weights in ``init`` (a weights file or a hetvit checkpoint
    directory of the same architecture) with a fresh optimizer and schedule: a second phase
    with other settings, such as a short fine-tune at the test-time crop. A resumed run must
    name the same model and model flags as the checkpoint, and takes every weight from it;
    other settings (more epochs, say) may change and are recorded by :func:`write_run_config`.
    """
    check_run(config, "train_config.json")
    out = Path(config.out)
    module = TrainModule(model_name, model_kwargs, lr=config.lr,
                         weight_decay=config.weight_decay, warmup_epochs=config.warmup_epochs,
                         min_lr=config.min_lr, label_smoothing=config.label_smoothing,
                         seed=config.seed, mixup=config.mixup, cutmix=config.cutmix,
                         augment={"scale": list(config.scale), "hflip": config.hflip,
                                  "auto_augment": config.auto_augment, "reprob": config.reprob})
    if init is not None:
        from .surgery import load_weights

        init = Path(init)
        load_weights(module.model, init / "model.safetensors" if init.is_dir() else init)
        names = _recorded_classes(init)
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


def _recorded_classes(init: Path) -> list[str] | None:
    """The class names recorded with ``--init`` weights (a checkpoint directory or a run's
    ``.ckpt``), if any."""
    from .io import SOURCE_FILE

    try:
        if init.is_dir():
            return json.loads((init / SOURCE_FILE).read_text()).get("classes")
        if init.suffix == ".ckpt":
            return read_run_checkpoint(init).get("hyper_parameters", {}).get("classes")
    except (OSError, ValueError, TrainingError):
        return None  # the weights loaded; an unreadable record only loses the names
    return None


def load_checkpoint_model(path: str | os.PathLike) -> nn.Module:
    """The model inside a ``hetvit train`` Lightning checkpoint (e.g. a run's ``last.ckpt``).

    Rebuilt from the checkpoint's own hyper-parameters, so evaluating a run in progress needs
    no model flags.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint not found: {path}")
    ckpt = read_run_checkpoint(path)
    params = ckpt.get("hyper_parameters", {})
    if "model_name" not in params and "plan" in params:  # FinetuneModule's hyper-parameters
        raise TrainingError(_finetune_checkpoint_message(path))
    if "model_name" not in params or "state_dict" not in ckpt:
        raise TrainingError(f"{path} is not a hetvit train checkpoint (no model_name in its "
                            "hyper-parameters, or no state_dict)")
    model = create_model(params["model_name"], params.get("model_kwargs"))
    if params.get("classes") is not None:
        model.hetvit_classes = list(params["classes"])
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise TrainingError(f"{path}: its weights do not fit {params['model_name']} "
                            f"{params.get('model_kwargs')}: {str(err).splitlines()[0]}") from None
    return model.eval()


def _finetune_checkpoint_message(path: Path) -> str:
    """Where the model of a fine-tune run is: its ``last.ckpt`` holds the student's weights but
    not the compressed architecture (the plan is applied to a teacher that is not saved)."""
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    model = run / "model"
    where = (f"use {model} (the run's model)" if model.is_dir() else
             f"use RUN/model ({model}), written when the run ends; resume an unfinished run "
             "with hetvit finetune --resume")
    return (f"{path} is a hetvit finetune checkpoint, which holds the student's weights but not "
            f"its compressed architecture: {where}")


def read_run_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A ``hetvit train`` / ``finetune`` Lightning checkpoint as a dict.

    Read with ``weights_only`` (tensors and plain values; nothing in a file from elsewhere gets
    to run code), and a damaged file is a one-line :class:`TrainingError`, not a traceback.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors all mean the same to a user
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrainingError(f"cannot read the checkpoint {path} ({first}): is it damaged, or "
                            "not from hetvit train / finetune?") from None

# --------------------------------------------------------------------------------------------
# dynamic-guided fine-tuning with distillation


@contextmanager
def capture_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of ``modules`` (in that order) during the forward passes inside."""
    found: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, k=k: found.__setitem__(k, out))
             for k, m in enumerate(modules)]
    outputs: list[torch.Tensor] = []
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()
    outputs.extend(found[k] for k in range(len(modules)) if k in found)


def aggregation_path(student: nn.Module) -> dict[int, torch.Tensor | None]:
    """For each block of ``student``, the product of the aggregation matrices before it.

    ``None`` where no stage precedes the block (tokens are the original ones). The matrices are
    detached: they map teacher targets onto the student's tokens, and a target must not pull
    the aggregation towards itself.
    """
    from .aggregation import TokenAggregation

    path: dict[int, torch.Tensor | None] = {}
    total: torch.Tensor | None = None
    layer = 0
    for blk in student.blocks:
        if isinstance(blk, TokenAggregation):
            p = blk.matrix().detach()
            total = p if total is None else p @ total
            continue
        path[layer] = total
        layer += 1
    return path


def project_map(attn_map: torch.Tensor, p: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """A teacher attention map (``B x H x N x N``) seen through aggregation ``p`` (``M x N_p``).

    Query rows are aggregated like tokens (``P A``); the attention an old key token received is
    shared among the new tokens it went into, in proportion to its weights (columns of ``P``
    normalised to one), so every row still sums to one.
    """
    if p is None:
        return attn_map
    m, n = p.shape
    full = torch.zeros(prefix + m, prefix + n, dtype=attn_map.dtype, device=attn_map.device)
    full[:prefix, :prefix] = torch.eye(prefix, dtype=attn_map.dtype, device=attn_map.device)
    full[prefix:, prefix:] = p.to(attn_map.dtype)
    share = full / full.sum(0, keepdim=True).clamp_min(1e-12)
    return full @ attn_map @ share.T


def guidance_kl(dynamic: torch.Tensor, static_logits: torch.Tensor) -> torch.Tensor:
    """``KL(A_dyn || softmax(logits))`` averaged over batch, heads and query rows.

    ``dynamic``: ``B x H x N x N`` teacher maps; ``static_logits``: ``H x N x N``.
    """
    log_static = static_logits.log_softmax(-1).unsqueeze(0)
    kl = torch.xlogy(dynamic, dynamic) - dynamic * log_static
    return kl.sum(-1).mean()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, p: torch.Tensor | None,
                 prefix: int) -> torch.Tensor:
    """Relative squared error of the student's tokens against the teacher's, aggregated by ``p``.

    ``student``: ``B x (prefix + M) x D``; ``teacher``: ``B x (prefix + N_p) x D``; ``p``:
    ``M x N_p`` or ``None`` (no stage before this layer). Divided by the teacher tokens' mean
    square, so the weight means the same at every depth and width.
    """
    if p is not None:
        teacher = torch.cat([teacher[:, :prefix], p.to(teacher.dtype) @ teacher[:, prefix:]], 1)
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)


def stage_ends(plan: Any, depth: int) -> list[int]:
    """The last layer of every pyramid stage: where feature distillation compares tokens."""
    starts = [layer for layer, _ in plan.pyramid]
    return [nxt - 1 for nxt in starts[1:]] + [depth - 1] if starts else []


class FinetuneModule(BaseModule):
    """Fine-tune a compressed student under a frozen teacher.

    Loss = ``ce * CE(labels) + kd * KD(teacher logits) + guidance * mean_l KL(A_dyn || A_static)``
    over the student's static layers, with the teacher's dynamic maps seen through the
    student's aggregation where tokens were reduced before a static layer; ``features`` adds
    :func:`feature_loss` at the end of every pyramid stage (DESIGN.md's optional feature
    distillation: the teacher's tokens, aggregated like the student's, supervise them).
    ``freeze_aggregation`` keeps the pooling matrices at their initial average pooling (an
    ablation). With ``mix_epochs`` the static layers first run on ``lambda * A_dyn +
    (1 - lambda) * A_static``, lambda going linearly from 1 to 0 over that many epochs (the
    curriculum).

    The teacher is held outside the module's children: it is neither trained nor saved in
    checkpoints (it is rebuilt from its source on resume).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, ce: float = 1.0, kd: float = 1.0,
                 guidance: float = 1.0, temperature: float = 1.0, mix_epochs: float = 0.0,
                 map_lr_scale: float = 10.0, freeze_aggregation: bool = False,
                 features: float = 0.0, lr: float = 5e-4, weight_decay: float = 0.05,
                 warmup_epochs: float = 0.2, min_lr: float = 1e-6, label_smoothing: float = 0.1,
                 seed: int | None = 0, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                         min_lr=min_lr, label_smoothing=label_smoothing, seed=seed,
                         mixup=mixup, cutmix=cutmix)
        self.save_hyperparameters(ignore=["student", "teacher"])
        from .surgery import num_prefix_tokens, plan_of

        plan = plan_of(student)
        self.hparams["plan"] = plan.to_dict()
        self.map_lr_scale = map_lr_scale
        # A copy of a frozen model comes frozen, and compress() returns it in its source's mode.
        self.model = student.requires_grad_(True).train()
        if freeze_aggregation:
            from .aggregation import TokenAggregation

            for m in student.modules():
                if isinstance(m, TokenAggregation):
                    m.requires_grad_(False)
        self._teacher = [teacher.eval()]  # run under no_grad; the caller's flags stay as they are
        self.ce, self.kd, self.guidance = ce, kd, guidance
        self.temperature, self.mix_epochs = temperature, mix_epochs
        self.static_layers = list(plan.static)
        self.prefix = num_prefix_tokens(student.hetvit_source)
        self._layer_blocks = [b for b in student.blocks if hasattr(b, "attn")]
        self.features = features
        self.feature_layers = stage_ends(plan, len(self._layer_blocks)) if features > 0 else []

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def param_groups(self) -> list[dict[str, Any]]:
        """The static logits and aggregation weights learn faster and are never decayed.

        Both live in log space, where decay would pull the maps towards uniform, and they
        start far from where a few epochs of a small learning rate could move them.
        """
        from .aggregation import TokenAggregation
        from .attention import StaticAttention

        maps = [p for m in self.model.modules() if isinstance(m, (StaticAttention,
                                                                   TokenAggregation))
                for name, p in m.named_parameters(recurse=False) if p.requires_grad]
        ids = {id(p) for p in maps}
        groups = []
        for group in super().param_groups():
            params = [p for p in group["params"] if id(p) not in ids]
            if params:
                groups.append({**group, "params": params})
        if maps:
            groups.append({"params": maps, "weight_decay": 0.0,
                           "lr": self.lr * self.map_lr_scale})
        return groups

    def on_fit_start(self) -> None:
        self._teacher[0] = self.teacher.to(self.device)

    def on_train_epoch_start(self) -> None:
        # Lightning keeps each module's mode and puts back what it found after validation; if
        # the student ever came back in eval mode, its static maps and pooling matrices would
        # take their cached, detached inference paths and learn from the guidance loss alone.
        self.model.train()

    def mix(self) -> float:
        """The curriculum's lambda for the current step: 1 -> 0 over ``mix_epochs``."""
        if self.mix_epochs <= 0:
            return 0.0
        trainer = self._trainer
        steps = max(1, int(trainer.num_training_batches)) if trainer is not None else 1
        return max(0.0, 1.0 - self.global_step / (self.mix_epochs * steps))

    @torch.no_grad()
    def teacher_forward(self, images: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Teacher logits, its dynamic maps at the student's static layers (seen through the
        student's aggregation) and its block outputs at :attr:`feature_layers`."""
        maps: dict[int, torch.Tensor] = {}
        hooks = []
        if self.guidance > 0 or self.mix_epochs > 0:
            for i in self.static_layers:
                attn = self.teacher.blocks[i].attn
                hooks.append(attn.register_forward_pre_hook(
                    lambda m, a, i=i: maps.__setitem__(
                        i, host_of(self.teacher).attention_map(m, a[0]))))
        with capture_outputs([self.teacher.blocks[i] for i in self.feature_layers]) as tokens:
            try:
                logits = self.teacher(images)
            finally:
                for h in hooks:
                    h.remove()
        path = aggregation_path(self.model)
        maps = {i: project_map(a, path[i], self.prefix) for i, a in maps.items()}
        return logits, maps, dict(zip(self.feature_layers, tokens, strict=True))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:
            return None
        images, target = batch
        if target is not None:  # teacher and student see the same mixed images
            images, target = self.mix_batch(images, target)
        t_logits, maps, t_tokens = self.teacher_forward(images)
        lam = self.mix()
        for i in self.static_layers:
            attn = self._layer_blocks[i].attn
            attn.guide, attn.mix = (maps.get(i), lam) if lam > 0 else (None, 0.0)
        try:
            with capture_outputs([self._layer_blocks[i] for i in self.feature_layers]) as tokens:
                logits = self.model(images)
        finally:
            for i in self.static_layers:
                self._layer_blocks[i].attn.guide = None
        size = images.shape[0]
        loss = logits.new_zeros(())
        if self.ce > 0 and target is not None:
            ce = self.classification_loss(logits, target)
            loss = loss + self.ce * ce
            self.log("train/ce", ce, batch_size=size)
        if self.kd > 0:
            kd = kd_loss(logits, t_logits, self.temperature)
            loss = loss + self.kd * kd
            self.log("train/kd", kd, batch_size=size)
        if self.guidance > 0 and maps:
            g = torch.stack([guidance_kl(maps[i], self._layer_blocks[i].attn.logits)
                             for i in self.static_layers]).mean()
            loss = loss + self.guidance * g
            self.log("train/guidance", g, batch_size=size, prog_bar=True)
        if self.feature_layers:
            path = aggregation_path(self.model)
            f = torch.stack([feature_loss(s, t_tokens[i], path[i], self.prefix) for i, s in
                             zip(self.feature_layers, tokens, strict=True)]).mean()
            loss = loss + self.features * f
            self.log("train/features", f, batch_size=size)
        self.log("train/loss", loss, batch_size=size, prog_bar=True, on_step=True, on_epoch=True)
        self.log("mix", lam, batch_size=size)
        return loss


def finetune(teacher: nn.Module, plan: Any, config: TrainConfig, *, ce: float = 1.0,
             kd: float = 1.0, guidance: float = 1.0, temperature: float = 1.0,
             mix_epochs: float = 0.0, map_lr_scale: float = 10.0,
             freeze_aggregation: bool = False, features: float = 0.0,
             calibration_images: int = 256, aggregation_init: str = "pool",
             student: nn.Module | None = None) -> Path:
    """Compress ``teacher`` with ``plan`` and fine-tune the student; returns ``<out>/model``.

    ``student``: start from this compressed model of ``teacher`` instead (e.g. one made by
    :func:`hetvit.fit`); ``plan`` is then its plan, and no calibration runs.

    The static maps start from the teacher's mean attention over ``calibration_images``
    training images drawn at random (eval transform); with ``aggregation_init="cluster"`` the
    pyramid stages start from k-means of the tokens over the same images (see
    :func:`hetvit.compress`). On ``resume`` the student's structure is
    rebuilt from the plan and every weight comes from the checkpoint.
    """
    from . import io
    from .surgery import compress

    if student is not None:
        from .fitting import check_student

        check_student(student, teacher)
        plan = student.hetvit_plan
    check_run(config, "finetune_config.json")
    if features > 0 and not plan.pyramid:
        raise TrainingError("feature distillation compares tokens at the end of each pyramid "
                            "stage, and this plan has no pyramid: drop --features")
    cluster = aggregation_init == "cluster" and bool(plan.pyramid)
    if cluster and calibration_images <= 0:
        raise TrainingError("--aggregation-init cluster groups tokens over calibration images: "
                            "give --calibration-images > 0")
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
        student = compress(teacher, plan, init="none")
    elif student is not None:
        student = copy.deepcopy(student)
        student.__dict__.pop("hetvit_fit", None)  # the fit made the start, not this model
    else:
        calib = None
        if (plan.static or cluster) and calibration_images > 0:
            ds = open_dataset(config.data, make_transform(teacher), class_map=config.class_map,
                              skip_unknown=config.skip_unknown)
            calib = make_loader(random_subset(ds, calibration_images, config.seed),
                                batch_size=config.batch_size, workers=config.workers)
        student = compress(teacher, plan, calibration=calib, aggregation_init=aggregation_init)
    module = FinetuneModule(student, teacher, ce=ce, kd=kd, guidance=guidance,
                            temperature=temperature, mix_epochs=mix_epochs,
                            map_lr_scale=map_lr_scale, freeze_aggregation=freeze_aggregation,
                            features=features, lr=config.lr, weight_decay=config.weight_decay,
                            warmup_epochs=config.warmup_epochs,
                            min_lr=config.min_lr, label_smoothing=config.label_smoothing,
                            seed=config.seed, mixup=config.mixup, cutmix=config.cutmix)
    data = open_run_data(module, config)  # every check before the first write
    with run_lock(out):
        write_run_config(out / "finetune_config.json", {
            "plan": plan.to_dict(), "ce": ce, "kd": kd, "guidance": guidance,
            "temperature": temperature, "mix_epochs": mix_epochs, "map_lr_scale": map_lr_scale,
            "freeze_aggregation": freeze_aggregation, "features": features,
            "calibration_images": calibration_images, "aggregation_init": aggregation_init,
            **config_dict(config), "classes": module.hparams["classes"]})
        trainer = fit(module, config, data)
        target = out / "model"
        if trainer.is_global_zero:
            io.save(module.model.float().cpu().eval(), target)
    return target
