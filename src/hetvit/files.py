"""Files that are never seen half-written: atomic writes, checksums, stale temporaries.

Every output hetvit writes (a checkpoint directory, a plan, a report, an ONNX file, an unpacked
dataset) goes through a temporary beside its target that is renamed into place, so an
interrupted command leaves the old output or none, never a broken one. The temporaries carry
their writer's host and pid, which is what lets a later run remove those of killed writes.

A leaf module: it imports nothing of hetvit.
"""

from __future__ import annotations

import hashlib
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

__all__ = ["sha256", "check_replaceable", "check_writable", "check_file_replaceable",
           "atomic_write_text", "atomic_directory", "temp_prefix", "clean_stale_temps",
           "pid_alive", "current_umask", "STALE_AFTER_S"]

# A temporary whose writer cannot be asked (another host, or an older hetvit that did not put
# its pid in the name) is stale only once it is this old: no write takes a day.
STALE_AFTER_S = 24 * 3600


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
    with new_parents_removed_on_error(directory):
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
            _replace_directory(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _replace_directory(new: Path, directory: Path) -> None:
    """Rename ``new`` to ``directory``, an earlier one moved aside first and removed after; if
    the rename fails, the earlier one is put back, so a failed write leaves it as it was."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.rename(directory, old)
    try:
        os.rename(new, directory)
    except BaseException:
        if old is not None:
            os.rename(old, directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def new_parents_removed_on_error(path: str | os.PathLike) -> Iterator[None]:
    """Remove again, if the body fails, the folders above ``path`` that did not exist before it.

    A temporary beside an output needs its folder, but a failed write must leave nothing: without
    this, a typo in ``--out`` or a failed check would leave empty folders behind. Only empty
    folders are removed, deepest first, so whatever else was put in them meanwhile stays.
    """
    missing = [p for p in Path(path).parents if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:  # not empty: someone else's now
                pass
        raise
