"""The Lightning modules: a ViT trained from scratch, and a compressed student fine-tuned
under its teacher on the same base.

:class:`BaseModule` holds what every run shares (an :class:`~hetvit.configs.OptimConfig`):
AdamW with no decay on norms, biases and position/class tokens; a per-step linear warm-up
then cosine schedule; label-smoothed cross-entropy with optional Mixup / CutMix; validation
top-1/top-5. (A resumed run draws the same augmentations as an uninterrupted one because the
training loader reseeds per epoch, see ``hetvit.data``.)

Checkpoint layout (kept stable, runs are resumed across sessions): ``state_dict`` keys are
``model.<timm key>``; ``hyper_parameters`` are flat: the optimiser's fields, ``seed`` and, for
:class:`TrainModule`, ``model_name``/``model_kwargs``/``augment`` (enough to rebuild the
model from a ``last.ckpt``), for :class:`FinetuneModule` the distillation weights and the
``plan``.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.optim import param_groups_weight_decay
from torch import nn

from .aggregation import TokenAggregation
from .attention import StaticAttention
from .capture import attention_maps, capture_outputs
from .configs import TRAIN_OPTIM, DistillConfig, OptimConfig
from .curves import CURVES_PNG, EPOCHS_LOG, format_epoch, plot_epochs
from .data import data_config
from .distill import (
    aggregation_path,
    feature_loss,
    guidance_kl,
    kd_loss,
    project_map,
    stage_ends,
)
from .hosts import host_of
from .hosts.timm import create_timm_model
from .metrics import topk_correct
from .surgery import plan_of

__all__ = ["BaseModule", "TrainModule", "FinetuneModule", "EpochSummary", "create_model",
           "warmup_cosine"]


def create_model(model_name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A fresh (randomly initialised) timm model whose data config matches its input size.

    The ``pretrained_cfg`` of a model built with an ``img_size`` override still describes the
    family's default input; it is corrected here so that transforms, ``hetvit.io.save`` and
    ``hetvit evaluate`` all see the size the model was trained at (with its family's
    ``crop_pct``, see :func:`hetvit.data.data_config`).
    """
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


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels)`` of a batch; a loader of bare images has no labels."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    images, target = batch
    return images, target


class BaseModule(L.LightningModule):
    """Optimiser, schedule, loss and validation shared by training and distillation.

    Subclasses set ``self.model`` (the network being trained) and implement
    ``training_step``; they may override :meth:`trainable_parameters` (e.g. to leave a frozen
    teacher out of the optimiser). ``seed`` is only recorded (as a hyper-parameter); the
    seeding itself is done by the trainer and the training loader.
    """

    model: nn.Module

    def __init__(self, optim: OptimConfig = OptimConfig(), seed: int | None = 0) -> None:
        super().__init__()
        self.optim, self.seed = optim, seed
        self._mixer: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def trainable_parameters(self) -> nn.Module:
        """The module whose parameters the optimiser updates."""
        return self.model

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay except on norms, biases and tokens."""
        module = self.trainable_parameters()
        skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
        return param_groups_weight_decay(module, self.optim.weight_decay,
                                         no_weight_decay_list=skip)

    def configure_optimizers(self) -> dict[str, Any]:
        lr = self.optim.lr
        optimizer = torch.optim.AdamW(self.param_groups(), lr=lr)
        total = int(self.trainer.estimated_stepping_batches)
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        warmup = int(round(self.optim.warmup_epochs * total / max_epochs))
        min_ratio = self.optim.min_lr / lr if lr > 0 else 0.0

        def multiplier(step: int) -> float:
            return warmup_cosine(step, warmup, total, min_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def classification_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Label-smoothed cross-entropy; ``target`` holds class indices or, after
        :meth:`mix_batch`, class probabilities."""
        return F.cross_entropy(logits, target, label_smoothing=self.optim.label_smoothing)

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
        if not (self.optim.mixup > 0 or self.optim.cutmix > 0):
            return images, target
        if self._mixer is None:
            self._mixer = Mixup(mixup_alpha=self.optim.mixup, cutmix_alpha=self.optim.cutmix,
                                label_smoothing=0.0, num_classes=self.model.num_classes)
        even = images.shape[0] - images.shape[0] % 2
        return self._mixer(images[:even], target[:even])

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch is None:
            return
        images, target = batch
        logits = self(images)
        top1, top5 = topk_correct(logits, target, (1, 5))
        loss = F.cross_entropy(logits, target, reduction="sum")
        self._val_sums += torch.stack([loss.double(), top1.sum().double(), top5.sum().double(),
                                       torch.tensor(target.shape[0], dtype=torch.float64,
                                                    device=self.device)])

    def on_validation_epoch_end(self) -> None:
        """Loss, top-1 and top-5 over every validation image of every process.

        Sums, not means, are reduced across processes (their shards may differ in length),
        so the figures are exactly those of one process evaluating the whole set.
        """
        loss, top1, top5, n = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        if n == 0:
            return
        # The values are equal in every process already; sync_dist only says so to Lightning.
        for name, value in (("val/loss", loss), ("val/top1", top1), ("val/top5", top5)):
            self.log(name, (value / n).float(), sync_dist=True, prog_bar=name == "val/top1")


class TrainModule(BaseModule):
    """Supervised training of a timm classifier from scratch."""

    def __init__(self, model_name: str, model_kwargs: dict[str, Any] | None = None,
                 optim: OptimConfig = TRAIN_OPTIM, seed: int | None = 0,
                 augment: dict[str, Any] | None = None) -> None:
        super().__init__(optim, seed)
        self.save_hyperparameters({"model_name": model_name, "model_kwargs": model_kwargs,
                                   **asdict(optim), "seed": seed, "augment": augment})
        self.model = create_model(model_name, model_kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable
            return None
        images, target = self.mix_batch(*batch)
        logits = self(images)
        loss = self.classification_loss(logits, target)
        size = target.shape[0]
        self.log("train/loss", loss, batch_size=size, prog_bar=True, on_step=True, on_epoch=True,
                 sync_dist=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size,
                 prog_bar=False, on_step=True, on_epoch=False)
        return loss


class FinetuneModule(BaseModule):
    """Fine-tune a compressed student under a frozen teacher, as ``distill`` says.

    Loss = ``ce * CE(labels) + kd * KD(teacher logits) + guidance * mean_l KL(A_dyn || A_static)``
    over the student's static layers, with the teacher's dynamic maps seen through the
    student's aggregation where tokens were reduced before a static layer; ``features`` adds
    :func:`~hetvit.distill.feature_loss` at the end of every pyramid stage (the teacher's
    tokens, aggregated like the student's, supervise them). ``freeze_aggregation`` keeps the
    pooling matrices at their start (an ablation). With ``mix_epochs`` the static layers first
    run on ``lambda * A_dyn + (1 - lambda) * A_static``, lambda going linearly from 1 to 0 over
    that many epochs (the curriculum). Batches without labels (bare image tensors, or
    ``(images, None)``) train on the teacher alone.

    The teacher is held outside the module's children: it is neither trained nor saved in
    checkpoints (it is rebuilt from its source on resume).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 distill: DistillConfig = DistillConfig(), optim: OptimConfig = OptimConfig(),
                 seed: int | None = 0) -> None:
        super().__init__(optim, seed)
        plan = plan_of(student)
        self.save_hyperparameters({**distill.loss_settings(), **asdict(optim), "seed": seed,
                                   "plan": plan.to_dict()})
        self.distill = distill
        # A copy of a frozen model comes frozen, and compress() returns it in its source's mode.
        self.model = student.requires_grad_(True).train()
        if distill.freeze_aggregation:
            for m in student.modules():
                if isinstance(m, TokenAggregation):
                    m.requires_grad_(False)
        self._teacher = [teacher.eval()]  # run under no_grad; the caller's flags stay as they are
        self.static_layers = list(plan.static)
        self.host = host_of(student)
        self.prefix = self.host.prefix_tokens(student.hetvit_source)
        self._layer_blocks = self.host.layers(student)
        self.feature_layers = (stage_ends(plan, len(self._layer_blocks))
                               if distill.features > 0 else [])

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def param_groups(self) -> list[dict[str, Any]]:
        """The static logits and aggregation weights learn faster and are never decayed.

        Both live in log space, where decay would pull the maps towards uniform, and they
        start far from where a few epochs of a small learning rate could move them.
        """
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
                           "lr": self.optim.lr * self.distill.map_lr_scale})
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
        if self.distill.mix_epochs <= 0:
            return 0.0
        trainer = self._trainer
        steps = max(1, int(trainer.num_training_batches)) if trainer is not None else 1
        return max(0.0, 1.0 - self.global_step / (self.distill.mix_epochs * steps))

    @torch.no_grad()
    def teacher_forward(self, images: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Teacher logits, its dynamic maps at the student's static layers (seen through the
        student's aggregation) and its block outputs at :attr:`feature_layers`."""
        maps: dict[int, torch.Tensor] = {}
        guided = self.distill.guidance > 0 or self.distill.mix_epochs > 0
        blocks = self.host.layers(self.teacher)
        with (attention_maps(self.teacher, self.static_layers if guided else (),
                             maps.__setitem__),
              capture_outputs([blocks[i] for i in self.feature_layers]) as tokens):
            logits = self.teacher(images)
        path = aggregation_path(self.model)
        maps = {i: project_map(a, path[i], self.prefix) for i, a in maps.items()}
        return logits, maps, dict(zip(self.feature_layers, tokens, strict=True))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:
            return None
        images, target = _split(batch)
        if target is not None:  # teacher and student see the same mixed images
            images, target = self.mix_batch(images, target)
        t_logits, maps, t_tokens = self.teacher_forward(images)
        lam = self.mix()
        for i in self.static_layers:
            attn = self.host.attention(self._layer_blocks[i])
            attn.guide, attn.mix = (maps.get(i), lam) if lam > 0 else (None, 0.0)
        try:
            with capture_outputs([self._layer_blocks[i] for i in self.feature_layers]) as tokens:
                logits = self.model(images)
        finally:
            for i in self.static_layers:
                self.host.attention(self._layer_blocks[i]).guide = None
        d, size = self.distill, images.shape[0]
        loss = logits.new_zeros(())
        if d.ce > 0 and target is not None:
            ce = self.classification_loss(logits, target)
            loss = loss + d.ce * ce
            self.log("train/ce", ce, batch_size=size)
        if d.kd > 0:
            kd = kd_loss(logits, t_logits, d.temperature)
            loss = loss + d.kd * kd
            self.log("train/kd", kd, batch_size=size)
        if d.guidance > 0 and maps:
            g = torch.stack([guidance_kl(maps[i], self.host.attention(self._layer_blocks[i]).logits)
                             for i in self.static_layers]).mean()
            loss = loss + d.guidance * g
            self.log("train/guidance", g, batch_size=size, prog_bar=True)
        if self.feature_layers:
            path = aggregation_path(self.model)
            f = torch.stack([feature_loss(s, t_tokens[i], path[i], self.prefix) for i, s in
                             zip(self.feature_layers, tokens, strict=True)]).mean()
            loss = loss + d.features * f
            self.log("train/features", f, batch_size=size)
        self.log("train/loss", loss, batch_size=size, prog_bar=True, on_step=True, on_epoch=True,
                 sync_dist=True)
        self.log("mix", lam, batch_size=size)
        return loss


class EpochSummary(L.Callback):
    """One plain line per epoch (time, train loss, val top-1, throughput), printed for a
    ``nohup`` log and, with ``out``, appended to ``<out>/epochs.log``, whose plot
    ``<out>/curves.png`` is redrawn each epoch.

    Throughput is the training images per second of one process (rank 0's, over the epoch's
    training steps, validation excluded) and the number of processes; their product is the
    run's. Only global rank 0 prints and writes.
    """

    def __init__(self, out: Path | None = None) -> None:
        self.out = out
        self._start = self._val_start = self._validating = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images, self._validating = time.perf_counter(), 0, 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch is not None:
            self._images += _split(batch)[0].shape[0]

    def on_validation_epoch_start(self, trainer: L.Trainer,
                                  pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validating += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        metrics = {key: float(trainer.callback_metrics[key])
                   for key in ("train/loss_epoch", "val/loss", "val/top1", "val/top5")
                   if key in trainer.callback_metrics}
        seconds = time.perf_counter() - self._start
        training = max(seconds - self._validating, 1e-9)
        metrics["images/s/process"] = self._images / training
        metrics["processes"] = trainer.world_size
        line = format_epoch(trainer.current_epoch + 1, int(trainer.max_epochs or 0),
                            seconds, trainer.global_step, metrics)
        print(line, file=sys.stderr, flush=True)
        if self.out is None:
            return
        with open(self.out / EPOCHS_LOG, "a") as f:
            f.write(line + "\n")
        try:
            plot_epochs(self.out / EPOCHS_LOG, self.out / CURVES_PNG, title=self.out.name)
        except Exception as err:  # noqa: BLE001 - a plot must never stop hours of training
            warnings.warn(f"could not draw {self.out / CURVES_PNG}: {err!r}", stacklevel=2)
