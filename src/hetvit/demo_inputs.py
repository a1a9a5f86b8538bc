"""What the demo reads: the committed models and the CIFAR-10 test images, found in the clone
the demo runs in, and checked, so that a missing or foreign file is one line saying how to
restore it (never a traceback, never a report comparing unrelated models)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import CheckpointError, DemoError
from .io import FIT_FILE, load
from .surgery import source_mismatch

__all__ = ["CIFAR10_CLASSES", "find_assets", "find_images", "load_model", "check_source",
           "fit_record", "finetune_epochs", "sample_indices"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _clones() -> list[Path]:
    """Where a hetvit clone may be: the working directory, then the source tree of an editable
    install (the package's ``__file__`` two levels up, only when that is a clone: a wheel's
    ``site-packages`` has no ``pyproject.toml``)."""
    source = Path(__file__).resolve().parents[2]
    found = [Path.cwd()]
    if (source / "pyproject.toml").is_file() and source != Path.cwd():
        found.append(source)
    return found


def find_assets(assets: str | os.PathLike | None = None) -> Path:
    """The directory holding the committed models: ``assets``, ``$HETVIT_ASSETS``, or the
    ``assets/`` folder of the clone the demo runs in (:func:`_clones`)."""
    given = assets or os.environ.get("HETVIT_ASSETS")
    tried = [Path(given)] if given else [clone / "assets" for clone in _clones()]
    for path in tried:
        if path.is_dir():
            return path
    raise DemoError(f"the demo models were not found: {tried[0]} is not a directory. They are "
                    "committed in the hetvit repository's assets/ folder: run the demo from a "
                    "clone of it (restore a deleted folder with: git checkout -- assets), or "
                    "give --assets DIR.")


def find_images(images: str | os.PathLike | None = None) -> Path:
    """CIFAR-10 test images: ``images``, ``$HETVIT_DEMO_IMAGES`` or
    ``../shared/data/cifar10-test.tar.gz`` beside the clone the demo runs in."""
    given = images or os.environ.get("HETVIT_DEMO_IMAGES")
    tried = [Path(given)] if given else [clone.parent / "shared" / "data" / "cifar10-test.tar.gz"
                                         for clone in _clones()]
    for path in tried:
        if path.exists():
            return path
    raise DemoError(f"CIFAR-10 test images not found at {tried[0]}. Give --images PATH: the "
                    "cifar10-test.tar.gz archive or an ImageFolder directory with the ten "
                    f"class folders ({', '.join(CIFAR10_CLASSES)}).")


def _restore_hint(path: Path) -> str:
    for clone in _clones():
        try:
            rel = path.resolve().relative_to(clone.resolve())
        except ValueError:
            continue
        return f"restore it with: git checkout -- {rel}"
    return f"restore {path} from the hetvit repository's assets/ folder"


def load_model(directory: Path) -> nn.Module:
    """A committed model, with an error that names the broken file and how to restore it."""

    try:
        return load(directory)
    except CheckpointError as err:  # one line: the CLI prints it as it is, logs grep it
        raise DemoError(f"{err}; {_restore_hint(err.path)}") from err


def check_source(directory: Path, model: nn.Module, teacher: nn.Module, teacher_dir: Path
                 ) -> None:
    """Refuse a compressed model that was not made from the teacher: its accuracy and speed
    beside the teacher would compare two unrelated networks."""
    if source_mismatch(model, teacher):
        raise DemoError(f"{directory} was not compressed from {teacher_dir}: their "
                        "architectures differ; restore both with: git checkout -- assets")


def fit_record(directory: Path) -> dict[str, Any]:
    """The fitted model's ``fit.json`` (settings, images, seconds): the report says how the
    model was made from it, so a model without one is not the demo's fitted model."""

    path = directory / FIT_FILE
    try:
        record = json.loads(path.read_text())
        int(record["images"]), float(record["seconds"]), dict(record["config"])
    except FileNotFoundError:
        raise DemoError(f"{path} is missing: {directory} is not a model made by hetvit fit; "
                        f"{_restore_hint(path)}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DemoError(f"{path} is damaged ({err}); {_restore_hint(path)}") from None
    return record


def finetune_epochs(directory: Path) -> int | None:
    """Epochs of the fine-tune that made the committed student, from its training record."""
    try:
        return int(json.loads((directory / "training" / "finetune_config.json").read_text())
                   ["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sample_indices(targets: list[int], per_class: int) -> list[int]:
    """The first ``per_class`` images of every class, in dataset order: the same sample on
    every machine."""
    taken: dict[int, int] = {}
    chosen = []
    for i, t in enumerate(targets):
        if taken.get(t, 0) < per_class:
            taken[t] = taken.get(t, 0) + 1
            chosen.append(i)
    return chosen
