"""Save and load compressed models: a directory with the plan, the weights and the source.

``plan.json``, ``model.safetensors`` and ``source.json`` (the source architecture, its timm
``pretrained_cfg``, the class names and a checksum of the weights). Saves are atomic:
everything is written to a temporary directory that is renamed into place, so an interrupted
save never leaves a checkpoint that loads half-written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, UsageError
from .files import atomic_directory, sha256
from .hosts import DEFAULT_HOST, describe
from .labels import check_class_names, class_names
from .plan import Plan, PlanError
from .surgery import build_model, compress, plan_of

__all__ = ["save", "load", "CheckpointError", "is_checkpoint", "class_names", "check_class_names"]

PLAN_FILE, WEIGHTS_FILE, SOURCE_FILE = "plan.json", "model.safetensors", "source.json"
FIT_FILE = "fit.json"
FORMAT = 1


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(err).__name__


def _jsonable(obj: Any) -> Any:
    """``pretrained_cfg`` may hold tuples and other non-JSON values; keep what JSON can say."""
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else None))


def save(model: nn.Module, directory: str | Path, classes: list[str] | None = None) -> Path:
    """Write ``model`` (compressed or not) to ``directory`` atomically; returns the directory.

    ``classes`` (default: the model's own, see :func:`class_names`) are recorded in
    ``source.json``, so that evaluating and fine-tuning map dataset folders to the right
    outputs. An existing checkpoint at ``directory`` is replaced only once the new one is
    complete.
    """
    directory = Path(directory)
    if getattr(model, "hetvit_baseline", None) is not None:  # would load as the plain model
        raise UsageError(f"this model runs the {model.hetvit_baseline['method']} baseline, which "
                         "a checkpoint does not record: save the model it was made from and "
                         "apply hetvit.baselines again after loading")
    plan = plan_of(model)
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

    ``map_location`` is where the weights are put (``torch.load``'s sense). ``verify`` checks
    the weights file against the hash :func:`save` recorded, so a truncated or altered file is
    an error rather than a model with wrong weights; ``False`` skips the hashing (large
    checkpoints read often). Raises :class:`CheckpointError` naming the file when something is
    missing or damaged.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}", d)
    for name in (PLAN_FILE, WEIGHTS_FILE, SOURCE_FILE):
        if not (d / name).is_file():
            raise CheckpointError(f"{d} is not a complete hetvit checkpoint: {name} is missing",
                                  d / name)
    try:
        source = json.loads((d / SOURCE_FILE).read_text())
        arch = dict(source["arch"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d / SOURCE_FILE} is damaged: {e}", d / SOURCE_FILE) from e
    arch.setdefault("host", DEFAULT_HOST)  # saved before there were hosts
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
