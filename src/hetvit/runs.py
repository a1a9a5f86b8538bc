"""Run bookkeeping: a run directory's checks, lock, settings record, checkpoints and model.

A run (``hetvit train`` / ``finetune``) owns its ``--out``: ``checkpoints/last.ckpt``,
``logs/``, ``epochs.log``, ``curves.png``, its settings (``train_config.json`` or
``finetune_config.json``) and, at the end, ``model/``. Everything here guards that directory:
a mistaken command is refused before it writes, two runs never share one, and the record of
how a model was trained stays complete across resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.data import create_transform
from torch import nn

from . import io
from .configs import TrainConfig, TrainingError
from .data import DataError
from .distributed import Processes, check_processes, is_writer, uses_gpu
from .files import check_replaceable, pid_alive
from .io import SOURCE_FILE
from .lightning_modules import create_model

__all__ = ["check_precision", "check_run", "check_run_directory", "lock_holder", "run_lock",
           "config_dict", "write_run_config", "save_model", "read_run_checkpoint",
           "load_checkpoint_model", "recorded_classes", "run_processes", "RUN_MARKERS",
           "CHECKPOINT_NAME", "LOCK_NAME"]

CHECKPOINT_NAME = "last.ckpt"
LOCK_NAME = ".lock"
# What only a hetvit run directory holds: its settings, or (for a bare `fit`) its checkpoints.
RUN_MARKERS = ("train_config.json", "finetune_config.json", "checkpoints")


def check_precision(precision: str, accelerator: str) -> None:
    """Fail early, and clearly, on a precision the hardware cannot run."""
    allowed = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
    if precision not in allowed:
        raise TrainingError(f"--precision must be one of {', '.join(allowed)}, not "
                            f"{precision!r}")
    on_gpu = uses_gpu(accelerator)
    if precision == "16-mixed" and not on_gpu:
        raise TrainingError("precision 16-mixed needs a CUDA GPU (none is used here); "
                            "use bf16-mixed or 32-true")
    if precision.startswith("bf16") and on_gpu and not torch.cuda.is_bf16_supported():
        raise TrainingError("this GPU has no bfloat16 support; use 16-mixed or 32-true")


def save_model(model: nn.Module, directory: Path, model_name: str,
               model_kwargs: dict[str, Any]) -> Path:
    """Write the trained model as a loadable directory with ``hetvit.io.save``.

    ``config.json`` beside it records how to rebuild the bare timm model without hetvit.
    """
    config = json.dumps({"model_name": model_name, "model_kwargs": model_kwargs}, indent=2)
    try:
        path = Path(io.save(model, directory))
    except Exception as err:  # noqa: BLE001 - never lose hours of training to an export bug
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
    for name, least in (("epochs", 1), ("batch_size", 1), ("workers", 0)):
        if getattr(config, name) < least:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least {least}, got "
                                f"{getattr(config, name)}")
    run_processes(config)
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
    for name, value in (("reprob", config.reprob), ("hflip", config.hflip)):
        if not 0 <= value <= 1:
            raise TrainingError(f"--{name} is a probability in [0, 1], got {value}")
    if not 0 < config.scale[0] <= config.scale[1] <= 1:
        raise TrainingError(f"--scale-min is an area fraction in (0, 1], got {config.scale[0]}")
    for name in ("limit_train_batches", "limit_val_batches"):
        check_batch_limit(name, getattr(config, name))
    if config.auto_augment:
        try:  # timm checks the policy string only when it builds the transform
            create_transform(input_size=(3, 32, 32), is_training=True,
                             auto_augment=config.auto_augment)
        except (AssertionError, ValueError, KeyError) as err:
            raise TrainingError(f"--auto-augment {config.auto_augment!r}: {err} (timm policies: "
                                "rand-m9-mstd0.5-inc1, original, v0, augmix-m5, ...)") from None


def check_batch_limit(name: str, value: int | float | None) -> None:
    """A ``limit_*_batches`` is Lightning's: a count of batches (0 or more) or a fraction of
    the loader in (0, 1]; refused here, before the run directory is touched, rather than by
    Lightning once the trainer is built."""
    if value is None:
        return
    if isinstance(value, int) and value >= 0 or isinstance(value, float) and 0 < value <= 1:
        return
    raise TrainingError(f"--{name.replace('_', '-')} is a batch count (0 or more) or a fraction "
                        f"in (0, 1], got {value}")


def run_processes(config: TrainConfig) -> Processes:
    """The processes of a path-based run, checked (its batch is over all of them)."""
    return check_processes(config.devices, config.num_nodes, config.strategy,
                           config.accelerator, config.batch_size, config.threads)


def check_run_directory(out: Path, marker: str | None = None) -> None:
    """Refuse an ``--out`` that holds something other than a hetvit run (of ``marker``'s kind).

    A run appends to ``epochs.log``, writes ``checkpoints/`` and replaces ``model/``; in a
    folder of other files (a mistyped ``--out``) it would mix its files with the user's, so
    that is refused before any work. A live lock (another run on the directory) is refused
    here too, so that a second run stops before hours of work rather than at the first write.
    """
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
    if holder is not None and Path(out).resolve() not in _HELD_LOCKS and is_writer():
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
    # Our own pid, in a lock not in _HELD_LOCKS, is a lock left by an earlier process that had
    # our pid (containers reuse low pids): stale, unlike what io.pid_alive says of our pid.
    if host == socket.gethostname() and (pid == os.getpid() or not pid_alive(pid)):
        return None
    return holder


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
    if key in _HELD_LOCKS or not is_writer():  # under DDP the first process holds it
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


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The run's settings as JSON-friendly values (written to ``<out>/train_config.json``)."""
    values = asdict(config)
    values.pop("extra_callbacks", None)
    values.update(values.pop("optim"))  # flat, as the files of earlier runs are
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


def recorded_classes(init: Path) -> list[str] | None:
    """The class names recorded with ``--init`` weights (a checkpoint directory or a run's
    ``.ckpt``), if any."""
    try:
        if init.is_dir():
            return json.loads((init / SOURCE_FILE).read_text()).get("classes")
        if init.suffix == ".ckpt":
            return read_run_checkpoint(init).get("hyper_parameters", {}).get("classes")
    except (OSError, ValueError, TrainingError):
        return None  # the weights loaded; an unreadable record only loses the names
    return None
