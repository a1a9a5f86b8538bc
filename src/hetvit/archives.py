"""Image archives (``.tar.gz`` and kin), unpacked once into a content-addressed cache.

An archive is unpacked into ``<cache>/<sha256[:16]>``, so every later open (and every process)
reuses the same files, and a changed archive never reuses stale ones.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from .errors import DataError
from .files import clean_stale_temps, sha256, temp_prefix

__all__ = ["ARCHIVE_SUFFIXES", "cache_root", "is_archive", "extract_archive"]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


def cache_root() -> Path:
    """Where unpacked archives live: ``$HETVIT_CACHE/data`` or ``~/.cache/hetvit/data``."""
    base = os.environ.get("HETVIT_CACHE") or os.path.join("~", ".cache", "hetvit")
    return Path(base).expanduser() / "data"


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                    ) -> Path:
    """Unpack ``archive`` once and return the directory holding its contents.

    The target is ``<cache>/<sha256[:16]>``: content-addressed, so a changed archive never
    reuses stale files. Extraction goes to a temporary directory beside the target that is then
    renamed into place; ``rename`` is atomic, so a target that exists is always complete, and of
    two processes racing the loser just removes its own copy. A killed extraction's temporary
    is removed by the next extraction into the cache once its writer is gone
    (:func:`hetvit.files.clean_stale_temps`); a running one's is never touched.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"archive not found: {archive}")
    if not hasattr(tarfile, "data_filter"):  # added in 3.10.12 / 3.11.4: no safe unpacking
        raise DataError(f"unpacking {archive} safely needs Python >= 3.10.12 or 3.11.4 (tarfile "
                        "filters); unpack it yourself and pass the folder instead")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / sha256(archive)[:16]
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(root)  # killed extractions of any archive: tens of MB each
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"cannot unpack {archive}: {err}") from err
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
