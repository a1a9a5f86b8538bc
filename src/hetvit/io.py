"""Save and load compressed models: a directory with the plan, the weights and the source.

``plan.json``, ``model.safetensors`` and ``source.json`` (the source architecture, its timm
``pretrained_cfg``, the class names and a checksum of the weights). Saves are atomic:
everything is written to a temporary directory that is renamed into place, so an interrupted
save never leaves a checkpoint that loads half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .plan import Plan, PlanError

__all__ = ["save", "load", "CheckpointError", "is_checkpoint", "atomic_directory",
           "check_replaceable", "check_file_replaceable", "check_writable", "atomic_write_text",
           "temp_prefix", "clean_stale_temps", "sha256", "class_names", "check_class_names"]

PLAN_FILE, WEIGHTS_FILE, SOURCE_FILE = "plan.json", "model.safetensors", "source.json"
FIT_FILE = "fit.json"
FORMAT = 1
# A temporary whose writer cannot be asked (another host, or an older hetvit that did not put
# its pid in the name) is stale only once it is this old: no write takes a day.
STALE_AFTER_S = 24 * 3600


class CheckpointError(RuntimeError):
    """A hetvit checkpoint directory that is missing, incomplete or damaged.

    ``path`` is the file (or directory) at fault, for callers that say how to restore it.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_replaceable(directory: str | Path, marker: str) -> None:
    """Raise ``FileExistsError`` unless ``directory`` is absent, empty, or an earlier output
    of the same kind (it holds ``marker``, e.g. ``source.json`` for a checkpoint).

    Outputs replace what was there, so a mistyped ``--out`` must not wipe a folder of
    something else; callers check before their work, :func:`atomic_directory` again at the end.
    """
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; choose another "
                              "output path")
    if any(directory.iterdir()) and not (directory / marker).exists():
        raise FileExistsError(f"{directory} already holds files that hetvit did not write "
                              f"(no {marker}); refusing to replace it: choose another output "
                              "path or empty it")


def _host_tag() -> str:
    """This host's name as it may appear inside a temporary's name (no dots or slashes)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def temp_prefix(name: str) -> str:
    """The prefix of a temporary written beside the output ``name``: ``.NAME.HOST-PID.``.

    The writer's host and pid in the name are what lets a later run tell the temporary of a
    killed write (its pid is gone) from that of a write still running (see
    :func:`clean_stale_temps`). Temporaries end in ``.tmp``.
    """
    return f".{name}.{_host_tag()}-{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host; our own pid counts (another thread's write)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def _temp_is_stale(path: Path, host: str | None, pid: int | None, now: float) -> bool:
    """A temporary of this host is stale when its writer's pid is dead (exact); one of another
    host, or without a pid, when older than :data:`STALE_AFTER_S` (its writer cannot be asked).
    A live pid is never stale, even if it was reused: keeping a dead write's file is harmless,
    removing a live write's file is not."""
    if host == _host_tag() and pid is not None:
        return not pid_alive(pid)
    try:
        return now - path.lstat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def clean_stale_temps(directory: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries of killed writes beside the output ``name`` in ``directory`` (any
    output when ``name`` is None: the dataset cache); returns what was removed.

    A killed export or extraction leaves its temporary behind (tens of MB): each write cleans
    the stale ones of its target first. Only names hetvit makes are touched: ``.NAME.HOST-PID.
    XXXXXXXX.tmp``, and ``.NAME.XXXXXXXX.tmp`` of older versions.
    """
    directory = Path(directory)
    target = re.escape(name) if name is not None else r"[^/]+?"
    pattern = re.compile(rf"\.{target}\.(?:(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.)?"
                         r"[A-Za-z0-9_]{8}\.tmp")
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if not _temp_is_stale(entry, match["host"], pid, now):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_writable(path: str | Path) -> None:
    """Raise ``OSError`` naming ``path`` unless it can be created: its nearest existing parent
    is a writable directory (missing parents are created when it is written).

    Commands call it before their work, so that a typo in ``--out`` costs nothing, and the
    message names the path the user gave, not a temporary beside it.
    """
    path = Path(path)
    for parent in path.parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write {path}: {parent} is not writable")
        return


def check_file_replaceable(path: str | Path, is_own: Any, force: bool = False) -> None:
    """Raise ``FileExistsError`` if ``path`` exists and is not an earlier output of the same
    command (``is_own(path)`` is false), unless ``force``; then check it can be written.

    A mistyped ``--out`` must not silently replace someone's file; rewriting one's own plan or
    result is what re-running a command is for.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file name")
    if path.exists() and not force and not is_own(path):
        raise FileExistsError(f"{path} exists and is not an earlier output of this command; "
                              "refusing to overwrite it: choose another path, or pass --force")
    check_writable(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary beside it, renamed into place.

    A reader never sees half a file, and an error names ``path`` (not the temporary).
    """
    path = Path(path)
    check_writable(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent, path.name)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp",
                                    dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; the result is not
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink(missing_ok=True)
    return path


def current_umask() -> int:
    """The process's umask (reading it means setting it: put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(directory: str | Path, marker: str) -> Iterator[Path]:
    """Yield a temporary directory beside ``directory``; on success it replaces ``directory``.

    A reader never sees half a directory: on any error (or an interrupt) the temporary is
    removed and an existing ``directory`` stays as it was. Only an empty ``directory`` or an
    earlier output holding ``marker`` is replaced (see :func:`check_replaceable`).
    """
    directory = Path(directory)
    check_replaceable(directory, marker)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(directory.parent, directory.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(directory.name), suffix=".tmp",
                                dir=directory.parent))
    try:
        yield tmp
        umask = current_umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(f, 0o666 & ~umask)  # some writers (safetensors) make files private
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is not
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.rename(directory, old)
        os.rename(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(err).__name__


def _jsonable(obj: Any) -> Any:
    """``pretrained_cfg`` may hold tuples and other non-JSON values; keep what JSON can say."""
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else None))


def class_names(model: nn.Module) -> list[str] | None:
    """The names of ``model``'s classes (name ``i`` is output ``i``), or ``None`` when unknown.

    Kept on the model as ``hetvit_classes``: :func:`load` and the training runs set it, and
    :func:`hetvit.compress` copies it with the rest of the model.
    """
    names = getattr(model, "hetvit_classes", None)
    return list(names) if names is not None else None


def check_class_names(names: Any, num_classes: int | None) -> list[str]:
    """``names`` as a list of distinct strings, one per output, or ``ValueError`` saying why.

    A wrong list would be worse than none: every label would be mapped to a wrong output.
    """
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class names must be a list of non-empty strings, got {names!r}")
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if list(names).count(n) > 1})
        raise ValueError(f"class names repeat: {', '.join(twice[:5])}")
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model with {num_classes} outputs")
    return list(names)


def save(model: nn.Module, directory: str | Path, plan: Plan | None = None,
         classes: list[str] | None = None) -> Path:
    """Write ``model`` (compressed or not) to ``directory`` atomically; returns the directory.

    ``classes`` (default: the model's own, see :func:`class_names`) are recorded in
    ``source.json``, so that evaluating and fine-tuning map dataset folders to the right
    outputs. An existing checkpoint at ``directory`` is replaced only once the new one is
    complete.
    """
    from safetensors.torch import save_file

    from .surgery import describe, plan_of

    directory = Path(directory)
    if getattr(model, "hetvit_baseline", None) is not None:  # would load as the plain model
        raise ValueError(f"this model runs the {model.hetvit_baseline['method']} baseline, which "
                         "a checkpoint does not record: save the model it was made from and "
                         "apply hetvit.baselines again after loading")
    plan = plan or plan_of(model)
    arch = describe(model)
    classes = class_names(model) if classes is None else classes
    pretrained_cfg = _jsonable(dict(getattr(model, "pretrained_cfg", None) or {}))
    if "num_classes" in pretrained_cfg:  # timm's family default (1000), not this model's
        pretrained_cfg["num_classes"] = arch["num_classes"]
    source = {
        "format": FORMAT,
        "arch": arch,
        "pretrained_cfg": pretrained_cfg,
        "classes": None if classes is None else check_class_names(classes, arch["num_classes"]),
    }
    with atomic_directory(directory, SOURCE_FILE) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        source["sha256"] = sha256(tmp / WEIGHTS_FILE)
        (tmp / PLAN_FILE).write_text(plan.to_json() + "\n")
        record = getattr(model, "hetvit_fit", None)
        if record is not None:  # how a fitted model was made: settings, images, time
            (tmp / FIT_FILE).write_text(json.dumps(record.to_dict(), indent=2) + "\n")
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return directory


def is_checkpoint(path: str | Path) -> bool:
    """True if ``path`` looks like a hetvit checkpoint directory."""
    p = Path(path)
    return p.is_dir() and (p / SOURCE_FILE).is_file()


def load(directory: str | Path, map_location: str | torch.device = "cpu",
         verify: bool = True) -> nn.Module:
    """Rebuild the model saved in ``directory``, in eval mode, with its saved weights.

    Raises :class:`CheckpointError` naming the file when something is missing or damaged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .surgery import build_model, compress

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}", d)
    for name in (PLAN_FILE, WEIGHTS_FILE, SOURCE_FILE):
        if not (d / name).is_file():
            raise CheckpointError(f"{d} is not a complete hetvit checkpoint: {name} is missing",
                                  d / name)
    try:
        source = json.loads((d / SOURCE_FILE).read_text())
        arch = source["arch"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d / SOURCE_FILE} is damaged: {e}", d / SOURCE_FILE) from e
    try:
        plan = Plan.from_json((d / PLAN_FILE).read_text())  # the message below names it
    except PlanError as e:
        raise CheckpointError(f"{d / PLAN_FILE} is damaged: {e}", d / PLAN_FILE) from e
    if verify and source.get("sha256") and sha256(d / WEIGHTS_FILE) != source["sha256"]:
        raise CheckpointError(f"{d / WEIGHTS_FILE} is damaged or truncated (its checksum does not "
                              f"match {SOURCE_FILE}); save the model again", d / WEIGHTS_FILE)
    try:
        state = load_file(str(d / WEIGHTS_FILE), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{d / WEIGHTS_FILE} is damaged or truncated: {e}",
                              d / WEIGHTS_FILE) from e

    try:
        model = build_model(arch)
    except Exception as e:  # timm's asserts and errors for an architecture it cannot build
        raise CheckpointError(f"{d / SOURCE_FILE} describes a model that cannot be built: "
                              f"{_first_line(e)}", d / SOURCE_FILE) from e
    if source.get("pretrained_cfg"):
        model.pretrained_cfg = source["pretrained_cfg"]
        if "num_classes" in model.pretrained_cfg:  # older saves kept the family's 1000
            model.pretrained_cfg["num_classes"] = arch.get("num_classes")
    if source.get("classes") is not None:
        try:
            model.hetvit_classes = check_class_names(source["classes"], arch.get("num_classes"))
        except ValueError as e:
            raise CheckpointError(f"{d / SOURCE_FILE} is damaged: {e}", d / SOURCE_FILE) from e
    if plan.static or plan.pyramid:
        try:
            model = compress(model, plan, init="none")
        except PlanError as e:
            raise CheckpointError(f"{d / PLAN_FILE} does not fit the model of {SOURCE_FILE}: "
                                  f"{e}", d / PLAN_FILE) from e
    model.to(map_location)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{d / WEIGHTS_FILE} does not fit its plan and source: "
                              f"{_first_line(e)}", d / WEIGHTS_FILE) from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{d / WEIGHTS_FILE} does not match its plan and source: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}",
                              d / WEIGHTS_FILE)
    return model.eval()
