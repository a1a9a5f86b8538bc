"""The settings of a training or fine-tuning run, each hyper-parameter defined once.

:class:`OptimConfig` (optimiser, schedule, loss smoothing, mixing) and :class:`DistillConfig`
(the method's distillation: loss weights, curriculum, how the student starts) are frozen and
validated on construction, so a bad value fails in one line before any work. The CLI reads
its option defaults from them. :class:`TrainConfig` is a path-based run as the CLI describes
it (data folders, ``--out``, devices); the Python API takes data loaders instead
(:func:`hetvit.finetune`).

This module imports nothing heavy: ``hetvit --help`` builds its options from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import TrainingError

__all__ = ["OptimConfig", "DistillConfig", "TrainConfig", "TrainingError", "TRAIN_OPTIM",
           "FINETUNE_EPOCHS", "AGGREGATION_INITS", "TRAINABLE"]

FINETUNE_EPOCHS = 3
AGGREGATION_INITS = ("pool", "cluster")
"""How a pyramid stage may start (:func:`hetvit.compress`'s ``aggregation_init``); here, in a
module the CLI imports at start-up, so that a typo is refused before any model is read."""

TRAINABLE = ("all", "norms", "new")
"""Which parameters a fit trains: everything; the new parameters with every norm and bias (a
few percent of the weights: cheap to store as a delta); or the new parameters alone."""


def _at_least(config: Any, names: tuple[str, ...], least: float) -> None:
    """One-line errors named after the CLI flags, as every run check of hetvit is."""
    for name in names:
        value = getattr(config, name)
        if not value >= least:  # also refuses NaN
            raise TrainingError(f"--{name.replace('_', '-')} must be >= {least:g}, got {value}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a per-step linear warm-up then cosine schedule, label-smoothed
    cross-entropy and optional Mixup / CutMix (DeiT's recipe).

    The defaults are fine-tuning's (a short run from trained weights); training from scratch
    uses :data:`TRAIN_OPTIM`. ``mixup`` and ``cutmix`` are Beta alphas (0: off; with both on
    each batch gets one of the two). ``warmup_epochs`` may be a fraction of an epoch.
    """

    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 0.2
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self) -> None:
        _at_least(self, tuple(f.name for f in fields(self)), 0)
        if not self.label_smoothing < 1:
            raise TrainingError(f"--label-smoothing must be below 1, got {self.label_smoothing}")


# From scratch: a longer warm-up, a higher peak and floor; the rest as in fine-tuning.
TRAIN_OPTIM = replace(OptimConfig(), lr=1e-3, warmup_epochs=1.0, min_lr=1e-5)


@dataclass(frozen=True)
class DistillConfig:
    """How a compressed student learns from its frozen teacher (see ``hetvit.distill``).

    Loss = ``ce * CE(labels) + kd * KD(teacher logits at temperature) + guidance *
    KL(teacher's dynamic maps || static maps) + features * token error at each pyramid
    stage's end``. ``mix_epochs``: the static layers first run on ``lambda * dynamic + (1 -
    lambda) * static``, lambda going 1 -> 0 over that many epochs (0: off).
    ``map_lr_scale`` multiplies the learning rate of the static logits and aggregation weights
    (log-space parameters that start far from their optimum). ``freeze_aggregation`` keeps
    the pyramid at its start (an ablation). The student starts from the teacher's mean
    attention over ``calibration_images`` images (0: uniform maps), its pyramid stages from
    ``aggregation_init`` (``pool`` or ``cluster``, see :func:`hetvit.compress`).
    """

    ce: float = 1.0
    kd: float = 1.0
    guidance: float = 1.0
    temperature: float = 1.0
    mix_epochs: float = 0.0
    map_lr_scale: float = 10.0
    freeze_aggregation: bool = False
    features: float = 0.0
    calibration_images: int = 256
    aggregation_init: str = "pool"

    def __post_init__(self) -> None:
        _at_least(self, ("ce", "kd", "guidance", "mix_epochs", "map_lr_scale", "features",
                         "calibration_images"), 0)
        if not self.temperature > 0:
            raise TrainingError(f"--temperature must be > 0, got {self.temperature}")
        if not isinstance(self.calibration_images, int) or isinstance(
                self.calibration_images, bool):
            raise TrainingError("--calibration-images must be a whole number, got "
                                f"{self.calibration_images!r}")
        if self.aggregation_init not in AGGREGATION_INITS:
            raise TrainingError(f"--aggregation-init must be one of "
                                f"{', '.join(AGGREGATION_INITS)}, not {self.aggregation_init!r}")

    def loss_settings(self) -> dict[str, Any]:
        """The settings the fine-tuning module uses (its checkpoint's hyper-parameters); the
        others only say how the student starts."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("calibration_images", "aggregation_init")}


@dataclass
class TrainConfig:
    """A path-based run (the CLI's ``train`` and ``finetune``): its data, ``--out``,
    augmentation and devices; ``optim`` defaults to training from scratch.

    ``batch_size`` is the batch of one optimiser step over all ``devices * num_nodes``
    processes (see :class:`hetvit.distributed.Processes`).
    """

    data: Path
    out: Path
    val_data: Path | None = None
    epochs: int = 16
    batch_size: int = 128
    optim: OptimConfig = TRAIN_OPTIM
    scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    auto_augment: str | None = None
    reprob: float = 0.0
    workers: int = 0
    seed: int = 0
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
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
