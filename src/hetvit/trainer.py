"""Running a Lightning module: on data loaders (:func:`fit_loaders`, what the Python API
uses), or as a path-based run in a directory (:func:`fit`, what the CLI uses, with checks,
lock and resume around the same trainer)."""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from .configs import TrainConfig, TrainingError
from .data import (
    DataError,
    ImageDataset,
    make_loader,
    make_transform,
    open_for_model,
    random_subset,
)
from .distributed import Processes, check_processes, is_writer
from .labels import class_names
from .lightning_modules import BaseModule, EpochSummary
from .runs import CHECKPOINT_NAME, check_run, read_run_checkpoint, run_lock, run_processes

__all__ = ["fit", "fit_loaders", "open_run_data", "RunData", "LIGHTNING_INFO_LOGGERS"]

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
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def fit_loaders(module: BaseModule, train_loader: Any, val_loader: Any = None, *, epochs: int,
                out: Path | None = None, resume: bool = False, seed: int = 0,
                accelerator: str = "auto", devices: int = 1, num_nodes: int = 1,
                strategy: str = "auto", precision: str = "32-true",
                limit_train_batches: int | float | None = None,
                limit_val_batches: int | float | None = None, threads: int | None = None,
                progress: bool = True, callbacks: Sequence[Any] = ()) -> L.Trainer:
    """Train ``module`` on ``train_loader`` for ``epochs`` (validating on ``val_loader``).

    With ``out``, checkpoints go to ``<out>/checkpoints/last.ckpt`` (``resume`` continues from
    it: optimizer, schedule, epoch and step), CSV logs to ``<out>/logs`` and the epoch lines
    to ``<out>/epochs.log``; without it nothing is kept: Lightning works in a temporary
    directory, removed afterwards. torch uses ``threads`` (default: this process's share of
    the cores) while it trains. The caller checks its arguments and holds any lock.

    With ``devices * num_nodes`` above 1 (or ``strategy="ddp"``) Lightning runs DDP: this
    function returns in every process, and each iterates its shard of the loaders (hetvit's
    samplers shard themselves, see :mod:`hetvit.samplers`; Lightning gives other loaders a
    ``DistributedSampler``). Only global rank 0 writes.
    """
    processes = check_processes(devices, num_nodes, strategy, accelerator, threads=threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(processes.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="hetvit-fit-") as scratch, _quiet_lightning():
            L.seed_everything(seed, workers=True, verbose=False)
            last = None if out is None else out / "checkpoints" / CHECKPOINT_NAME
            with warnings.catch_warnings():
                # Lightning suggests workers on 2-core machines where they only steal compute.
                warnings.filterwarnings("ignore", message=".*does not have many workers.*")
                try:  # Lightning refuses some settings (a limit of 0 batches) only here
                    trainer = _trainer(processes, epochs=epochs, out=out, resume=resume,
                                       accelerator=accelerator, precision=precision,
                                       scratch=Path(scratch), progress=progress,
                                       callbacks=callbacks,
                                       limit_train_batches=limit_train_batches,
                                       limit_val_batches=limit_val_batches)
                    trainer.fit(module, train_loader, val_loader,
                                ckpt_path=str(last) if resume and last is not None else None)
                except MisconfigurationException as err:
                    raise TrainingError(str(err)) from None
            return trainer
    finally:
        torch.set_num_threads(previous)


def _trainer(processes: Processes, *, epochs: int, out: Path | None, resume: bool,
             accelerator: str, precision: str, scratch: Path, progress: bool,
             callbacks: Sequence[Any], **limits: int | float | None) -> L.Trainer:
    """The Lightning trainer of :func:`fit_loaders`: its callbacks, logger and processes."""
    kept: list[Any] = []
    if out is not None:
        if is_writer():
            out.mkdir(parents=True, exist_ok=True)
        # Without a monitor, top-1 keeps the newest epoch; Lightning writes "last" only
        # when a top-k checkpoint was saved, so the top-k file itself is last.ckpt.
        kept.append(ModelCheckpoint(
            dirpath=out / "checkpoints", filename=Path(CHECKPOINT_NAME).stem,
            save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=True,
            enable_version_counter=False))
    every: list[Any] = [*kept, EpochSummary(out), *callbacks]
    if progress:  # Lightning shows it in the rank-0 process only
        every.append(TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 25))
    return L.Trainer(
        max_epochs=epochs, accelerator=accelerator, devices=processes.devices,
        num_nodes=processes.num_nodes, strategy=processes.lightning_strategy(),
        precision=precision, callbacks=every,
        default_root_dir=str(scratch) if out is None else str(out),
        logger=CSVLogger(save_dir=str(out), name="logs") if out is not None else False,
        enable_checkpointing=out is not None, log_every_n_steps=10,
        enable_progress_bar=progress, enable_model_summary=not resume,
        num_sanity_val_steps=0, **{k: v for k, v in limits.items() if v is not None})


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
    if len(train_set) < config.batch_size:
        raise DataError(f"{config.data} holds {len(train_set)} images, fewer than one batch "
                        f"({config.batch_size}); lower --batch-size")
    per_process = run_processes(config).per_process_batch
    train_loader = make_loader(train_set, per_process, shuffle=True, workers=config.workers,
                               seed=config.seed, drop_last=True)
    if config.val_data is None:
        return RunData(train_set, train_loader)
    val_set = open_for_model(config.val_data, model, make_transform(model, training=False),
                             class_map=config.class_map, skip_unknown=config.skip_unknown,
                             purpose="validating on")
    if val_set.classes != train_set.classes:
        raise DataError("the validation set's classes differ from the training set's: "
                        f"{val_set.classes[:5]} vs {train_set.classes[:5]}")
    val_loader = make_loader(random_subset(val_set, len(val_set), config.seed),
                             per_process * 2, workers=config.workers, shard=True)
    return RunData(train_set, train_loader, val_set, val_loader)


def fit(module: BaseModule, config: TrainConfig, data: RunData | None = None) -> L.Trainer:
    """Train ``module`` on ``config.data``; checkpoints go to ``<out>/checkpoints/last.ckpt``.

    With ``config.resume`` the run continues from that checkpoint (optimizer, schedule, epoch,
    step). Without it an existing checkpoint is an error rather than being overwritten.
    ``data`` is what :func:`open_run_data` opened (default: opened here). The run holds
    :func:`~hetvit.runs.run_lock` on ``config.out`` while it writes.
    """
    check_run(config)
    data = data or open_run_data(module, config)
    with run_lock(config.out):
        trainer = fit_loaders(
            module, data.train_loader, data.val_loader, epochs=config.epochs,
            out=Path(config.out), resume=config.resume, seed=config.seed,
            accelerator=config.accelerator, devices=config.devices,
            num_nodes=config.num_nodes, strategy=config.strategy, precision=config.precision,
            limit_train_batches=config.limit_train_batches,
            limit_val_batches=config.limit_val_batches, threads=config.threads,
            progress=config.progress, callbacks=config.extra_callbacks)
    for name, dataset in (("training", data.train_set), ("validation", data.val_set)):
        if dataset is not None and dataset.skipped and is_writer():
            print(f"warning: {dataset.skipped} unreadable {name} image(s) were skipped",
                  file=sys.stderr)
    return trainer
