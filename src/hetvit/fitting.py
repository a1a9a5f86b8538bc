"""Fitting: make a compressed model accurate from a few thousand unlabeled images, in minutes.

Most users of token-reduction tools have a pretrained ViT and no labelled training pipeline.
Calibration alone (mean attention maps, pooling windows) leaves a compressed model far under
its teacher, because every replaced layer is fitted to its own input, never to what the rest of
the network needs. Fitting closes most of that gap without labels: the frozen teacher labels
every image itself, so any image of the domain will do, and so will any mix of two images.

The recipe, chosen by measurement on the CIFAR-10 teacher (``docs/fitting.md`` lists every
lever tried, including those that did not help):

1. Knowledge distillation on the teacher's logits (``KL(teacher || student)``), on views
   augmented afresh every step (horizontal flips; mixup of two images, which shows the
   student the teacher's function between images as well as on them);
2. every parameter after the plan's first change trained (AdamW, no weight decay: the
   inherited weights are already where the teacher put them; those before the first change
   compute the teacher's tokens, so they stay), the new ones (static logits, aggregation
   weights) at a higher learning rate since they start from a crude estimate;
3. a one-cycle schedule sized to the number of passes, so a short fit still anneals.

The student and the teacher given are not modified: :func:`fit` returns a fitted copy.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .aggregation import TokenAggregation
from .attention import StaticAttention
from .batches import image_batches, size_mismatch
from .capture import capture_outputs, module_inputs
from .configs import TRAINABLE
from .distill import aggregation_path, feature_loss, kd_loss, relative_error, stage_ends
from .errors import FitError
from .hosts import host_of, input_size, logits
from .modes import eval_mode
from .replay import FrontReplay, replaying_front
from .surgery import is_compressed, plan_of, source_mismatch
from .views import cut_and_paste, resized_crop, translate

__all__ = ["FitConfig", "FitRecord", "FitError", "fit", "collect_images", "check_student",
           "teacher_match", "time_one_step", "affordable_passes", "TRAINABLE"]


@dataclass(frozen=True)
class FitConfig:
    """How a fit runs. Recorded with the fitted model (``fit.json``).

    Attributes:
        passes: passes over the images (each pass sees every image once, freshly augmented).
        batch_size: images per step.
        lr: peak learning rate of the inherited weights.
        lr_new: peak learning rate of the static logits and aggregation weights.
        temperature: distillation temperature (1: match the teacher's probabilities).
        mixup: Beta(mixup, mixup) mixing of image pairs (0: off; 1: the measured default).
        flip: random horizontal flips.
        crop: random translation of each image by up to this many pixels (reflect padding, then
            a crop at the model's size; 0: off).
        scale: smallest area fraction of a random resized crop of each image (a box of that
            fraction or more, of jittered aspect, resampled to the model's size; 1: off). The
            teacher labels every view, so a view need not keep the image's class.
        cutmix: probability that a step pastes a box of another image (CutMix) instead of
            mixing whole images (0: mixup only).
        trainable: one of :data:`TRAINABLE`.
        freeze_early: keep the teacher's weights in the embeddings and in every block before the
            plan's first change (static layer or aggregation stage): those compute the
            teacher's tokens already, and the backward pass stops at the first change (with
            ``[2:32 5:16 8:9]`` 74.20% against 74.01% in 14% less time, with ``[5:32 9:16]``
            76.78% against 76.73% in 27% less; see ``docs/fitting.md``). On by default since; the
            committed ``assets/cifar10-fitted`` was fitted without it. The frozen front is then
            not run at all: it is handed the teacher's tokens of the same view
            (:mod:`hetvit.replay`), the same fit in 7-21% less time a step.
        warmup: fraction of the steps spent rising to the peak learning rate.
        features: weight of token distillation at the end of every pyramid stage (the
            student's tokens against the teacher's, aggregated the same way: many numbers per
            image where the logits give ten; 0: logits only).
        pre_logits: weight of the relative squared error of the head's input (the pooled,
            normed token: D numbers an image, against the logits' ten) to the teacher's. With
            content-aware stages, 10 gained 0.4-0.7 points on each of the five fits compared
            (four plans; ``docs/fitting.md``); with static stages it changed nothing beyond
            noise. 0: off.
        anchor: decay of the inherited weights towards their starting values (decoupled, as
            AdamW's weight decay, but towards the teacher's weights instead of zero: a few
            thousand images are memorised long before they are matched; 0: off).
        seed: seed of the image order and augmentation (a fit is reproducible).
        minutes: a budget of wall time for the whole fit (None: no budget). One step is
            timed before the fit, and the passes are cut to what the budget affords at that
            pace (at least one, at most ``passes``), so that the one-cycle schedule still
            anneals by the end; the agreement check that ends a fit (about half a step's work
            a batch) is reserved from the budget. The record keeps the passes run:
            ``passes=`` of that number remakes the fit exactly, where the budget alone would
            follow the machine's speed.
    """

    passes: int = 20
    batch_size: int = 64
    lr: float = 3e-4
    lr_new: float = 5e-2
    temperature: float = 1.0
    mixup: float = 1.0
    flip: bool = True
    crop: int = 0
    scale: float = 1.0
    cutmix: float = 0.0
    trainable: str = "all"
    freeze_early: bool = True
    warmup: float = 0.1
    features: float = 0.0
    pre_logits: float = 0.0
    anchor: float = 0.0
    seed: int = 0
    minutes: float | None = None

    def __post_init__(self) -> None:
        if self.passes < 1:
            raise FitError(f"passes must be at least 1, got {self.passes}")
        if self.batch_size < 1:
            raise FitError(f"batch_size must be at least 1, got {self.batch_size}")
        for name in ("lr", "lr_new", "temperature"):
            if not getattr(self, name) > 0:
                raise FitError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("mixup", "features", "pre_logits", "anchor"):
            if getattr(self, name) < 0:
                raise FitError(f"{name} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.crop < 0:
            raise FitError(f"crop is a number of pixels, at least 0, got {self.crop}")
        if not 0 < self.scale <= 1:
            raise FitError(f"scale is an area fraction in (0, 1], got {self.scale}")
        if not 0 <= self.cutmix <= 1:
            raise FitError(f"cutmix is a probability in [0, 1], got {self.cutmix}")
        if not 0 <= self.warmup < 1:
            raise FitError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.trainable not in TRAINABLE:
            raise FitError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise FitError(f"minutes must be positive (or None: no budget), got {self.minutes}")


@dataclass
class FitRecord:
    """What a fit did: kept on the model as ``hetvit_fit`` and saved as ``fit.json``."""

    config: dict[str, Any]
    images: int
    steps: int
    seconds: float
    passes: int = 0
    """The passes run: ``config["passes"]``, or fewer where ``minutes`` cut them."""
    step_seconds: float | None = None
    """With ``minutes``, the timed pace of one step that the passes were chosen by."""
    loss_per_pass: list[float] = field(default_factory=list)
    threads: int = 1
    cpu_seconds: float = 0.0
    """CPU time of the fit's process (all threads): on a shared machine, the cost that wall
    time ``seconds`` overstates."""
    match: dict[str, dict[str, float]] = field(default_factory=dict)
    """How closely the fitted student follows its teacher (:func:`teacher_match`) on the fit's
    own images (``"fit"``) and, when held-out images were given, on those (``"held_out"``): a
    fit that matches its own images far better than unseen ones has used up what they tell."""
    inputs: dict[str, Any] = field(default_factory=dict)
    """Where the images and the start came from (the CLI fills it: images, calibration)."""
    replayed_blocks: int = 0
    """Blocks of the student's frozen front handed the teacher's tokens instead of run
    (:mod:`hetvit.replay`; 0: none), which the step's time depends on."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- inputs
def collect_images(images: Any, limit: int | None = None) -> torch.Tensor:
    """All images of ``images`` (a tensor or an iterable of batches) as one tensor.

    A fit takes a few thousand images, which fit in memory at any usual resolution; holding them
    lets every pass draw a fresh order and augmentation without a loader.
    """
    batches: list[torch.Tensor] = []
    count = 0
    for x in image_batches(images):
        if limit is not None and count >= limit:
            break
        batches.append(x if limit is None else x[:limit - count])
        count += batches[-1].shape[0]
    if not count:
        raise FitError("no images to fit on: give at least one batch of unlabeled images")
    return torch.cat(batches)


def check_student(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a student that is not a compressed model of ``teacher``'s architecture."""
    if not is_compressed(student):
        raise FitError("the student is not a compressed model: make it with hetvit.compress "
                       "from the teacher first")
    if is_compressed(teacher):
        raise FitError("the teacher is itself compressed: give the model the student was "
                       "compressed from")
    differ = source_mismatch(student, teacher)
    if differ:
        raise FitError(f"the teacher does not match the student's source model "
                       f"({', '.join(differ[:3])})")


def _check_images(student: nn.Module, images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise FitError(f"images must be B x C x H x W, got shape {tuple(images.shape)}")
    wrong = size_mismatch(images, input_size(student))
    if wrong:
        raise FitError(wrong)


@torch.no_grad()
def teacher_match(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                  batch_size: int = 256) -> dict[str, float]:
    """KL(teacher || student) per image and the share of top-1 agreement on ``images``.

    Needs no labels, so it measures a fit on any held-out images of the domain."""
    kl = agree = 0.0
    with eval_mode(student), eval_mode(teacher):
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            t, s = logits(teacher, x), logits(student, x)
            kl += kd_loss(s, t, 1.0).item() * len(x)  # a batch mean: back to a sum
            agree += (t.argmax(-1) == s.argmax(-1)).sum().item()
    return {"kl": round(kl / len(images), 5), "agreement": round(agree / len(images), 5),
            "images": len(images)}


# ----------------------------------------------------------------------------- parameters
def new_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters compression added: static logits and aggregation weights."""
    found: list[nn.Parameter] = []
    for mod in model.modules():
        if isinstance(mod, StaticAttention):
            found.append(mod.logits)
        elif isinstance(mod, TokenAggregation):
            found += list(mod.parameters(recurse=False))
    return found


def _is_norm_or_bias(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    return name.endswith("bias") or isinstance(module, nn.LayerNorm) or param.ndim == 1


def first_change(model: nn.Module) -> int:
    """The first block a compressed model's plan changes (its first static layer, or the block
    its first stage feeds); 0 when the plan changes nothing. Every block before it computes the
    teacher's tokens."""
    plan = plan_of(model)
    return min((*plan.static, *(layer for layer, _ in plan.pyramid)), default=0)


def early_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The inherited parameters of everything that runs before the first change a compressed
    model's plan made: its embeddings and the blocks before the first static layer or stage."""
    host = host_of(model)
    blocks = host.layers(model)[:first_change(model)]
    return [*host.embedding_parameters(model), *(p for b in blocks for p in b.parameters())]


def param_groups(model: nn.Module, config: FitConfig) -> list[dict[str, Any]]:
    """AdamW groups for ``config.trainable`` and ``config.freeze_early``; what is not trained
    gets ``requires_grad=False``."""
    new = new_parameters(model)
    new_ids = {id(p) for p in new}
    frozen = {id(p) for p in early_parameters(model)} if config.freeze_early else set()
    rest: list[nn.Parameter] = []
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if id(param) in new_ids:
            continue
        owner = modules[name.rpartition(".")[0]]
        keep = id(param) not in frozen and (
            config.trainable == "all" or
            (config.trainable == "norms" and _is_norm_or_bias(name, param, owner)))
        param.requires_grad_(keep)
        if keep:
            rest.append(param)
    groups = [{"params": new, "lr": config.lr_new, "name": "new"},
              {"params": rest, "lr": config.lr, "name": "inherited"}]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- the loop
def augment(x: torch.Tensor, config: FitConfig, gen: torch.Generator) -> torch.Tensor:
    """A fresh view of a batch: a resized crop, translation, flips, then mixup (or CutMix) with
    a shuffled copy of the batch. The teacher labels the view itself, so no label is mixed."""
    b = x.shape[0]
    if config.scale < 1:
        x = resized_crop(x, config.scale, gen)
    if config.crop:
        x = translate(x, config.crop, gen)
    if config.flip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    if config.mixup > 0 and b > 1:
        beta = torch.distributions.Beta(config.mixup, config.mixup)
        other = x[torch.randperm(b, generator=gen).to(x.device)]
        if config.cutmix and float(torch.rand(1, generator=gen)) < config.cutmix:
            return cut_and_paste(x, other, float(beta.sample()), gen)
        lam = beta.sample((b, 1, 1, 1)).to(x)  # torch's Beta takes no generator: seeded below
        x = lam * x + (1 - lam) * other
    return x


def one_cycle(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor of ``step``: linear rise over ``warmup`` steps, cosine to 0.

    A fit is short, so it must anneal within its own steps; a cosine to zero ends each fit at a
    minimum of the loss rather than wherever the last large step left it.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _anchors(params: list[nn.Parameter]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    return [(p, p.detach().clone()) for p in params if p.requires_grad]


@torch.no_grad()
def _pull(anchored: list[tuple[nn.Parameter, torch.Tensor]], rate: float) -> None:
    """Move each weight ``rate`` of the way back to its start (decoupled L2-SP)."""
    for param, start in anchored:
        param.sub_(rate * (param - start))


class _Loss:
    """The fit's loss on a view: KL to the teacher's logits, plus, with ``features``, the
    token error at every stage end (as :class:`hetvit.lightning_modules.FinetuneModule`) and,
    with ``pre_logits``, the relative error of the head's input. With a ``replay``, the
    student's frozen front is handed the teacher's tokens of the same view instead of
    computing them again (:mod:`hetvit.replay`)."""

    def __init__(self, model: nn.Module, teacher: nn.Module, config: FitConfig,
                 replay: FrontReplay | None = None) -> None:
        self.model, self.teacher, self.config, self.replay = model, teacher, config, replay
        host = host_of(model)
        self.student_layers, self.teacher_layers = host.layers(model), host.layers(teacher)
        self.prefix = host.prefix_tokens(model.hetvit_source)
        self.ends = (stage_ends(plan_of(model), len(self.student_layers))
                     if config.features else [])
        self.heads = [classifier(model), classifier(teacher)] if config.pre_logits else []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        front = [] if self.replay is None else [self.replay.teacher_block]
        heads: dict[int, torch.Tensor] = {}  # the head's input: 0 the student's, 1 the teacher's
        with torch.no_grad(), capture_outputs([*(self.teacher_layers[i] for i in self.ends),
                                               *front]) as targets, \
                module_inputs(self.heads[1:], lambda k, f: heads.__setitem__(1, f)):
            target = logits(self.teacher, x)
        replayed = self.replay.tokens(targets.pop()) if front else contextlib.nullcontext()
        with replayed, capture_outputs([self.student_layers[i] for i in self.ends]) as tokens, \
                module_inputs(self.heads[:1], lambda k, f: heads.__setitem__(0, f)):
            loss = kd_loss(logits(self.model, x), target, self.config.temperature)
        if self.heads:
            loss = loss + self.config.pre_logits * relative_error(heads[0], heads[1])
        if self.ends:
            path = aggregation_path(self.model)
            tokens_loss = sum(feature_loss(s, t, path[i], self.prefix)
                              for s, t, i in zip(tokens, targets, self.ends, strict=True))
            loss = loss + self.config.features * tokens_loss / len(self.ends)
        return loss


def classifier(model: nn.Module) -> nn.Module:
    """The head whose input ``pre_logits`` distils, or :class:`FitError`."""
    head = host_of(model).classifier(model)
    if head is None:
        raise FitError(f"pre_logits needs a classification head, and this "
                       f"{type(model).__name__} outputs its features directly: set it to 0")
    return head


def time_one_step(loss_of: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
                  teacher: nn.Module, x: torch.Tensor) -> float:
    """Wall seconds of one step's work on the batch ``x`` (the teacher's forward, the
    student's forward and backward), timed on the second of two runs: the first pays one-off
    costs (allocations, kernel choice). The gradients are dropped, so the model is unchanged."""
    model.train()
    seconds = 0.0
    with eval_mode(teacher):
        for _ in range(2):
            start = time.perf_counter()
            loss_of(x).backward()
            model.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
    return seconds


def affordable_passes(config: FitConfig, pace: float, steps_per_pass: int, spent: float) -> int:
    """How many passes ``config.minutes`` affords at ``pace`` seconds a step, ``spent``
    seconds in: whole passes, at least one, at most ``config.passes``."""
    left = 60 * (config.minutes or 0.0) - spent
    return max(1, min(config.passes, int(left // (pace * steps_per_pass))))


ProgressFn = Callable[[int, int, float], None]
"""``progress(step, total_steps, loss)``, called after every step."""


def _train(model: nn.Module, teacher: nn.Module, x_all: torch.Tensor, config: FitConfig,
           passes: int, opt: torch.optim.Optimizer,
           loss_of: Callable[[torch.Tensor], torch.Tensor],
           progress: ProgressFn | None) -> tuple[list[float], int]:
    """The fit's ``passes`` over ``x_all``: each batch augmented afresh, one optimiser step on
    ``loss_of`` under the one-cycle schedule (and, with ``config.anchor``, a pull of the
    inherited weights back towards their start). Returns the mean loss of each pass and the
    steps taken; the global random state is put back afterwards."""
    inherited = next((g for g in opt.param_groups if g["name"] == "inherited"), None)
    anchored = _anchors(inherited["params"]) if config.anchor and inherited else []
    steps_per_pass = math.ceil(len(x_all) / config.batch_size)
    total = passes * steps_per_pass
    warm = max(1, round(config.warmup * total)) if config.warmup else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: one_cycle(step, warm, total))
    gen = torch.Generator().manual_seed(config.seed)
    rng_state = torch.get_rng_state()
    torch.manual_seed(config.seed)  # mixup's Beta draws from the global generator
    losses: list[float] = []
    step = 0
    model.train()
    with eval_mode(teacher):
        try:
            for _ in range(passes):
                order = torch.randperm(len(x_all), generator=gen)
                running = 0.0
                for i in range(0, len(x_all), config.batch_size):
                    x = augment(x_all[order[i:i + config.batch_size].to(x_all.device)], config, gen)
                    loss = loss_of(x)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if anchored:  # at the scheduled learning rate of the inherited weights
                        _pull(anchored, inherited["lr"] * config.anchor)
                    sched.step()
                    step += 1
                    running += loss.item()
                    if progress is not None:
                        progress(step, total, loss.item())
                losses.append(running / steps_per_pass)
        finally:
            torch.set_rng_state(rng_state)
    return losses, step


def fit(student: nn.Module, teacher: nn.Module, images: Any, config: FitConfig | None = None,
        *, max_images: int | None = None, progress: ProgressFn | None = None,
        held_out: Any = None) -> nn.Module:
    """A copy of ``student`` distilled from ``teacher`` on unlabeled ``images``.

    Args:
        student: a compressed model (:func:`hetvit.compress` of ``teacher``).
        teacher: the model the student was compressed from; frozen, only run.
        images: a ``B x C x H x W`` tensor at the model's input size (its eval transform), or an
            iterable of such batches or of ``(images, labels)`` batches (labels are ignored).
        config: the fit's settings (:class:`FitConfig`).
        max_images: use at most this many images.
        progress: called after every step (the CLI draws a progress bar with it).
        held_out: images kept out of the fit (as ``images``), on which the record's ``match``
            measures how well the fitted student follows the teacher on unseen images.

    Returns the fitted copy, in eval mode, with a :class:`FitRecord` as ``hetvit_fit``.
    """
    config = config or FitConfig()
    if max_images is not None and max_images < 1:
        raise FitError(f"max_images must be at least 1, got {max_images}")
    x_all = collect_images(images, max_images)
    check_student(student, teacher)
    _check_images(student, x_all)
    unseen = None
    if held_out is not None:
        unseen = collect_images(held_out)
        _check_images(student, unseen)
    started, cpu_started = time.perf_counter(), time.process_time()
    param = next(student.parameters())
    x_all = x_all.to(param)
    model = copy.deepcopy(student)
    groups = param_groups(model, config)
    for g in groups:
        g["weight_decay"] = 0.0
    opt = torch.optim.AdamW(groups)
    steps_per_pass = math.ceil(len(x_all) / config.batch_size)
    with replaying_front(model, teacher, first_change(model)) as replay:
        loss_of = _Loss(model, teacher, config, replay)
        passes, pace = config.passes, None
        if config.minutes is not None:
            pace = time_one_step(loss_of, model, teacher, x_all[:config.batch_size])
            checked = len(x_all) + (0 if unseen is None else len(unseen))
            closing = 0.5 * pace * checked / config.batch_size  # forwards only, no backward
            passes = affordable_passes(config, pace, steps_per_pass,
                                       time.perf_counter() - started + closing)
        losses, step = _train(model, teacher, x_all, config, passes, opt, loss_of, progress)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    model.hetvit_fit = FitRecord(config=asdict(config), images=len(x_all), steps=step,
                                 seconds=round(time.perf_counter() - started, 1),
                                 passes=passes,
                                 step_seconds=None if pace is None else round(pace, 4),
                                 loss_per_pass=[round(v, 5) for v in losses],
                                 threads=torch.get_num_threads(),
                                 cpu_seconds=round(time.process_time() - cpu_started, 1),
                                 replayed_blocks=0 if replay is None else replay.depth)
    model.hetvit_fit.match["fit"] = teacher_match(model, teacher, x_all)
    if unseen is not None:
        model.hetvit_fit.match["held_out"] = teacher_match(model, teacher, unseen.to(param))
    return model
