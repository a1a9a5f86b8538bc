"""Levers on a fit that ``hetvit fit`` lacks: an exponential moving average of the weights,
stochastic depth, a flip-averaged teacher, weight averages ("soups") of fits that differ only in
their augmentation seed, and three more targets per image than the logits' ten numbers: the
pre-logit features (``--pre-logits W``), the cls token after every block from the first stage on
(``--prefix-tokens W``), and views moved adversarially towards where student and teacher
disagree (``--adversarial EPS``). Four more ask whether the fit's few images can be made to
teach more: colour views (``--jitter S``), two images mixed patch by patch (``--patch-mix P``),
less to memorise them with (``--keep-mlps`` keeps the teacher's MLP weights) and a student shown
its view with patches blanked (``--mask-student R``). Two more ask for minima that hold
beyond the fit's images: sharpness-aware steps (``--sharpness RHO``) and mixtures of the
hidden tokens where the plan's first change begins (``--token-mix P``), and one a start
that does not bend the inherited weights to a crude aggregation: the new parameters fitted
alone first (``--probe-passes N``, as LP-FT does with a head). And one between training the
norms only, which underfits, and everything, which memorises: each changed block's weights
moved only by a low-rank update (``--low-rank R``, as LoRA adapts a model on little data).
``--crop``, ``--cutmix`` and ``--freeze-early`` are ``hetvit fit``'s, to combine them with the
rest. ``--plan`` fits another plan than the committed one, and ``--content`` makes its pyramid
content-aware (``"aggregation": "content"``, :mod:`hetvit.content_aggregation`), to measure that
option at the full budget with the rest; ``--static-stages K`` keeps its first K stages static.

``fit`` runs the committed model's fit (``pyramid-2.5x``, the 2,048 images ``hetvit fit
--num-images 2048 --seed 0`` draws, 20 passes, mixup 1.0, one thread) with the given changes and
saves the fitted student to OUT/final and the EMA of its weights at each decay to OUT/ema<d>.
``evaluate`` prints top-1 on the 10,000 test images of saved students, where ``A+B`` is the
average of their weights (the same plan, so the same parameters) and ``A*0.8+B*0.2`` a weighted
one: with B the fit's start (``hetvit compress``), a fit pulled back towards the teacher after
the fact (as WiSE-FT does).

    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --aug-seed 1 --out runs/w/s1
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --drop-path 0.1 --out runs/w/dp
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --freeze-early --out runs/w/fz
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --teacher-flips --passes 14 \\
        --out runs/w/tta
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --freeze-early --pre-logits 10 \\
        --out runs/w/pl10
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --freeze-early --keep-mlps \\
        --out runs/w/km
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --freeze-early --sharpness 0.05 \\
        --out runs/w/sam05
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --freeze-early --low-rank 8 \\
        --out runs/w/lr8
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --freeze-early --content \\
        --plan benchmarks/plans/late-1.7x.json --out runs/w/content17
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py evaluate \\
        s1=runs/w/s1/final soup=assets/cifar10-fitted+runs/w/s1/final
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from timm.layers import DropPath
from torch.nn.utils import parametrize
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import hetvit
from hetvit import fitting
from hetvit.cli.common import resolve_plan
from hetvit.content_aggregation import ContentAggregation
from hetvit.data import make_loader, make_transform, open_dataset, sample_images
from hetvit.hosts import host_of

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
DECAYS = (0.99, 0.995, 0.998)
COMMITTED_PLAN = ROOT / "benchmarks" / "plans" / "pyramid-2.5x.json"


class WeightAverages:
    """EMAs of every parameter an optimiser steps, at several decays, kept by torch's global
    optimiser hook so the fit itself runs unchanged."""

    def __init__(self, decays: tuple[float, ...]) -> None:
        self.shadows: dict[float, dict[int, torch.Tensor]] = {d: {} for d in decays}
        self.handle = register_optimizer_step_post_hook(self.update)

    @torch.no_grad()
    def update(self, opt: torch.optim.Optimizer, *_: object) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                for decay, shadow in self.shadows.items():
                    if id(p) in shadow:
                        shadow[id(p)].lerp_(p.detach(), 1 - decay)
                    else:
                        shadow[id(p)] = p.detach().clone()

    def averaged(self, model: torch.nn.Module, decay: float) -> torch.nn.Module:
        """A copy of ``model`` holding the EMA at ``decay`` (untrained parameters as they are).
        The copy's parameters line up with the model's, whose ids the shadows are keyed by."""
        out = copy.deepcopy(model)
        with torch.no_grad():
            for p, q in zip(model.parameters(), out.parameters(), strict=True):
                if id(p) in self.shadows[decay]:
                    q.copy_(self.shadows[decay][id(p)])
        return out


def set_drop_path(model: torch.nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly to ``rate`` in the last block (0: off); the token
    aggregations between the blocks have no residual branch to drop."""
    blocks = [b for b in model.blocks if hasattr(b, "drop_path1")]
    for i, block in enumerate(blocks):
        r = rate * i / (len(blocks) - 1)
        block.drop_path1 = block.drop_path2 = DropPath(r) if r else torch.nn.Identity()


def flip_averaged_teacher(teacher: torch.nn.Module) -> None:
    """Make fits distil from the teacher's probabilities averaged over each view and its mirror
    (a test-time-augmented teacher, 78.91% where the teacher alone is 78.47%), for the price of
    a second teacher forward a step."""
    plain = fitting.logits

    def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if model is not teacher:
            return plain(model, x)
        probs = (plain(model, x).softmax(-1) + plain(model, x.flip(-1)).softmax(-1)) / 2
        return probs.log()

    fitting.logits = logits


class PrefixLoss(fitting._Loss):
    """The fit's loss plus the relative squared error of the prefix (cls) tokens at the output
    of every block from ``first`` on: a pyramid never aggregates them, so the teacher's are a
    target at every depth with no projection, D numbers a block and an image."""

    weight = 0.0
    first = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t_layers, s_layers = self.teacher_layers[self.first:], self.student_layers[self.first:]
        with torch.no_grad(), fitting.capture_outputs(t_layers) as targets:
            target = fitting.logits(self.teacher, x)
        with fitting.capture_outputs(s_layers) as tokens:
            loss = fitting.kd_loss(fitting.logits(self.model, x), target, self.config.temperature)
        p = self.prefix
        errors = [(s[:, :p] - t[:, :p]).pow(2).mean() / t[:, :p].pow(2).mean()
                  for s, t in zip(tokens, targets, strict=True)]
        return loss + self.weight * sum(errors) / len(errors)


class AdversarialLoss(fitting._Loss):
    """The fit's loss on a view moved ``eps`` (sign of the gradient, in normalised pixel units)
    towards where the student disagrees with the teacher most: the fit's images are matched
    long before unseen ones are, and their neighbourhood is where the mismatch still is."""

    eps = 0.0
    share = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = round(self.share * len(x))
        probe = x[:n].detach().requires_grad_(True)
        with torch.no_grad():
            target = fitting.logits(self.teacher, probe)
        gap = fitting.kd_loss(fitting.logits(self.model, probe), target, 1.0)
        (grad,) = torch.autograd.grad(gap, probe)
        x = torch.cat([(x[:n] + self.eps * grad.sign()).detach(), x[n:]])
        return super().__call__(x)


def photometric(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Each image's own brightness, contrast and saturation, each drawn in ``1 +- strength``
    (brightness as an offset of up to ``strength`` standard deviations): views of colours the
    geometric views never give, on the normalised images the fit holds."""
    b = x.shape[0]

    def draw(*shape: int) -> torch.Tensor:
        return (1 + strength * (2 * torch.rand(b, *shape, generator=gen) - 1)).to(x)

    grey = x.mean(1, keepdim=True)
    x = grey + draw(1, 1, 1) * (x - grey)  # saturation
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + draw(1, 1, 1) * (x - mean)  # contrast
    return x + (draw(1, 1, 1) - 1)  # brightness


def patch_mask(x: torch.Tensor, patch: int, share: float | torch.Tensor,
               gen: torch.Generator | None = None) -> torch.Tensor:
    """A ``B x 1 x H x W`` mask of ``x``'s shape that picks each patch of the ViT's grid with
    probability ``share`` (a number, or one per image as ``B x 1 x 1 x 1``)."""
    b, _, h, w = x.shape
    grid = torch.rand(b, 1, h // patch, w // patch, generator=gen) < share
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3).to(x.device)


def patch_mix(x: torch.Tensor, other: torch.Tensor, patch: int, gen: torch.Generator
              ) -> torch.Tensor:
    """Each patch of the ViT's grid from ``x`` or ``other``, by a random mask of a random share
    (uniform) per image: many more distinct mixtures of two images than one CutMix box."""
    share = torch.rand(x.shape[0], 1, 1, 1, generator=gen)
    return torch.where(patch_mask(x, patch, share, gen), other, x)


def extra_views(jitter: float, patch_share: float, patch: int) -> None:
    """Make fits draw ``photometric`` views and, on ``patch_share`` of the steps, a
    ``patch_mix`` in place of mixup."""
    plain = fitting.augment

    def augment(x: torch.Tensor, config: fitting.FitConfig, gen: torch.Generator
                ) -> torch.Tensor:
        if jitter:
            x = photometric(x, jitter, gen)
        if patch_share and float(torch.rand(1, generator=gen)) < patch_share:
            x = plain(x, dataclasses.replace(config, mixup=0.0), gen)
            return patch_mix(x, x[torch.randperm(len(x), generator=gen)], patch, gen)
        return plain(x, config, gen)

    fitting.augment = augment


def keep_mlps() -> None:
    """Make fits keep the teacher's MLP weights (two thirds of a block's) with the early
    blocks': the fit then trains attention, norms, biases, head and the new parameters, a
    capacity between ``trainable="norms"``, which underfits, and everything, which memorises
    the fit's images."""
    plain = fitting.early_parameters

    def early_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        mlps = [p for b in model.blocks if hasattr(b, "mlp") for n, p in b.mlp.named_parameters()
                if n.endswith("weight")]
        return [*plain(model), *mlps]

    fitting.early_parameters = early_parameters


class LowRankDelta(torch.nn.Module):
    """A weight's parametrisation ``W + B A`` with ``A`` (``r x in``) drawn small and ``B``
    (``out x r``) zero, so the fit starts from the teacher's weights exactly (LoRA, Hu et al.,
    ICLR 2022)."""

    def __init__(self, weight: torch.Tensor, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.a = torch.nn.Parameter(torch.randn(rank, in_features, generator=gen)
                                    / in_features ** 0.5)
        self.b = torch.nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.b @ self.a


def low_rank(student: torch.nn.Module, rank: int, lr: float) -> None:
    """Give every linear layer of the blocks from the plan's first change on a rank-``rank``
    update, and make fits train those updates (at ``lr``) instead of the weights themselves;
    biases, norms, the head and the new parameters train as before."""
    gen = torch.Generator().manual_seed(0)
    first = fitting.first_change(student)
    for block in host_of(student).layers(student)[first:]:
        for linear in [m for m in block.modules() if isinstance(m, torch.nn.Linear)]:
            parametrize.register_parametrization(
                linear, "weight", LowRankDelta(linear.weight, rank, gen))
    plain = fitting.param_groups

    def param_groups(model: torch.nn.Module, config: fitting.FitConfig) -> list[dict[str, Any]]:
        groups = plain(model, config)
        deltas = [p for m in model.modules() if isinstance(m, LowRankDelta)
                  for p in m.parameters()]
        kept = {id(p) for n, p in model.named_parameters()
                if n.endswith("parametrizations.weight.original")}
        moved = kept | {id(p) for p in deltas}
        for p in model.parameters():
            if id(p) in kept:
                p.requires_grad_(False)
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in moved]
        return [*(g for g in groups if g["params"]),
                {"params": deltas, "lr": lr, "name": "low-rank"}]

    fitting.param_groups = param_groups


def merge_low_rank(model: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``plain`` (the student before :func:`low_rank`) holding ``model``'s weights with
    every low-rank update folded in. Copying the weights out, rather than removing the
    parametrisations, leaves ``model`` and its copies whole: torch removes them from the
    module's class, which every deep copy of the model shares."""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    with torch.no_grad():
        state |= {f"{name}.weight": m.weight for name, m in model.named_modules()
                  if parametrize.is_parametrized(m, "weight")}
    out = copy.deepcopy(plain)
    out.load_state_dict(state)
    return out


class MaskedStudentLoss(fitting._Loss):
    """The fit's loss with the student shown its view with ``share`` of its patches blanked
    (the normalised mean, 0) and the teacher the whole view: a noised student, as in Noisy
    Student, with a noise that makes the fit's few images harder to memorise."""

    share = 0.0
    patch = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = fitting.logits(self.teacher, x)
        keep = ~patch_mask(x, self.patch, self.share)
        student = fitting.logits(self.model, x * keep.to(x))
        return fitting.kd_loss(student, target, self.config.temperature)


class SharpLoss(fitting._Loss):
    """The fit's loss at the weights moved ``rho`` (in units of the gradient's norm) up its own
    gradient, as sharpness-aware minimisation (Foret et al., ICLR 2021) takes it: a step then
    lowers the loss over a neighbourhood of the weights, towards flat minima, the cure that
    paper gives for fits on few examples. The move is undone (``undo``, run by an optimiser
    pre-step hook) before the step applies the gradient taken there. Twice the student's
    forward and backward a step; the teacher's targets are computed once."""

    rho = 0.0
    moved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = fitting.logits(self.teacher, x)
        t = self.config.temperature
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(fitting.kd_loss(fitting.logits(self.model, x), target, t),
                                    params, allow_unused=True)
        pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        scale = self.rho / (torch.stack([g.norm() for _, g in pairs]).norm() + 1e-12)
        with torch.no_grad():
            SharpLoss.moved = [(p, g * scale) for p, g in pairs]
            for p, e in SharpLoss.moved:
                p.add_(e)
        return fitting.kd_loss(fitting.logits(self.model, x), target, t)

    @staticmethod
    @torch.no_grad()
    def undo(*_: object) -> None:
        for p, e in SharpLoss.moved:
            p.sub_(e)
        SharpLoss.moved = []


class TokenMix:
    """Mixup of the hidden tokens instead of the pixels, on ``share`` of the steps (manifold
    mixup, Verma et al., ICML 2019): where the plan's first change begins, both models' tokens
    (the same ones: the blocks before it keep the teacher's weights) are replaced by the same
    mixture of two images' tokens, and the teacher labels what its own later blocks make of it.
    The mixtures are of what the early blocks computed, which no mixture of pixels gives. The
    hook sits on the teacher alone: the student's frozen front is handed the teacher's tokens,
    mixed ones included (:mod:`hetvit.replay`).

    The hooks are closures, not bound methods, so that they keep this object's state and not a
    copy of it."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, share: float) -> None:
        first = fitting.first_change(student)
        if first < 1:
            raise SystemExit("--token-mix needs a plan whose first change is after block 0")
        state: dict[str, Any] = {"mix": None, "left": 0}
        plain = fitting.augment

        def augment(x: torch.Tensor, config: fitting.FitConfig, gen: torch.Generator
                    ) -> torch.Tensor:
            if float(torch.rand(1, generator=gen)) >= share:
                return plain(x, config, gen)
            lam = torch.distributions.Beta(config.mixup, config.mixup).sample((len(x), 1, 1))
            state.update(mix=(lam.to(x), torch.randperm(len(x), generator=gen)), left=1)
            return plain(x, dataclasses.replace(config, mixup=0.0), gen)

        def mix(module: torch.nn.Module, inputs: object, out: torch.Tensor
                ) -> torch.Tensor | None:
            if not state["left"]:  # the teacher's forward of a mixed step: the student's
                return None      # frozen front replays its tokens (hetvit.replay)
            state["left"] -= 1
            lam, perm = state["mix"]
            return lam * out + (1 - lam) * out[perm.to(out.device)]

        host_of(teacher).layers(teacher)[first - 1].register_forward_hook(mix)
        fitting.augment = augment


def static_first_stages(student: torch.nn.Module, count: int) -> None:
    """Keep the first ``count`` content-aware stages static: their queries stay at zero (where
    they start, so those stages compute their one matrix, exactly GLAD's), and only the later
    stages score the tokens. The queries bought nothing where the first stage sits early; this
    asks whether content-awareness helps in the later stages alone."""
    stages = [m for m in student.modules() if isinstance(m, ContentAggregation)]
    if count > len(stages):
        raise SystemExit(f"--static-stages {count}: the plan has {len(stages)} content stages")
    for stage in stages[:count]:
        stage.query.requires_grad_(False)


def run_fit(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    teacher = hetvit.load(ROOT / "assets" / "cifar10-teacher").eval()
    plan = resolve_plan(str(args.plan), teacher, "content" if args.content else None)
    images = fitting.collect_images(sample_images(DATA / "cifar10-train.tar.gz", teacher, 2048,
                                                  seed=0, batch_size=256))
    student = hetvit.compress(teacher, plan, calibration=images[:256])
    set_drop_path(student, args.drop_path)
    if args.static_stages:
        static_first_stages(student, args.static_stages)
    if args.teacher_flips:
        flip_averaged_teacher(teacher)
    if args.keep_mlps:
        if not args.freeze_early:
            raise SystemExit("--keep-mlps works through --freeze-early: give both")
        keep_mlps()
    if args.jitter or args.patch_mix:
        extra_views(args.jitter, args.patch_mix, teacher.patch_embed.patch_size[0])
    if sum(map(bool, (args.prefix_tokens, args.adversarial, args.mask_student,
                      args.sharpness))) > 1:
        raise SystemExit("--prefix-tokens, --adversarial, --mask-student and --sharpness "
                         "replace the same loss: give one")
    if args.pre_logits and any((args.prefix_tokens, args.adversarial, args.mask_student,
                                args.sharpness)):
        raise SystemExit("--pre-logits is hetvit.fit's own loss term, which those replace")
    if args.token_mix:
        if not args.freeze_early:
            raise SystemExit("--token-mix mixes the teacher's own early tokens: give "
                             "--freeze-early too")
        TokenMix(student, teacher, args.token_mix)
    if args.sharpness:
        SharpLoss.rho = args.sharpness
        register_optimizer_step_pre_hook(SharpLoss.undo)
        fitting._Loss = SharpLoss
    if args.mask_student:
        MaskedStudentLoss.share = args.mask_student
        MaskedStudentLoss.patch = teacher.patch_embed.patch_size[0]
        fitting._Loss = MaskedStudentLoss
    if args.prefix_tokens:
        PrefixLoss.weight = args.prefix_tokens
        PrefixLoss.first = min(layer for layer, _ in plan.pyramid)
        fitting._Loss = PrefixLoss
    if args.adversarial:
        AdversarialLoss.eps, AdversarialLoss.share = args.adversarial, args.adversarial_share
        fitting._Loss = AdversarialLoss
    config = fitting.FitConfig(passes=args.passes, mixup=args.mixup, lr_new=args.lr_new,
                               crop=args.crop, cutmix=args.cutmix, pre_logits=args.pre_logits,
                               freeze_early=args.freeze_early, seed=args.aug_seed)
    if args.probe_passes:
        # LP-FT (Kumar et al., ICLR 2022): fit the new parameters alone first, so the inherited
        # weights are not bent to a crude start of them; then everything, as always.
        probe = dataclasses.replace(config, passes=args.probe_passes, trainable="new")
        student = fitting.fit(student, teacher, images, probe)
        print(f"new parameters fitted in {student.hetvit_fit.seconds:.0f} s", flush=True)
    plain = None  # with --low-rank, the student before its parametrisation, to fold into
    if args.low_rank:
        plain = copy.deepcopy(student)
        low_rank(student, args.low_rank, args.low_rank_lr)
    averages = WeightAverages(DECAYS)
    fitted = fitting.fit(student, teacher, images, config)
    averages.handle.remove()
    set_drop_path(fitted, 0.0)
    print(f"fitted in {fitted.hetvit_fit.seconds:.0f} s", flush=True)
    if plain is not None:
        final = merge_low_rank(fitted, plain)
        final.hetvit_fit = fitted.hetvit_fit
        emas = {d: merge_low_rank(averages.averaged(fitted, d), plain) for d in DECAYS}
    else:
        final, emas = fitted, {d: averages.averaged(fitted, d) for d in DECAYS}
    hetvit.save(final, args.out / "final")
    for decay, averaged in emas.items():
        hetvit.save(averaged, args.out / f"ema{decay}")


def soup(models: list[torch.nn.Module], shares: list[float] | None = None) -> torch.nn.Module:
    """The first model holding the mean of all models' weights, or their mean weighted by
    ``shares`` (which sum to 1)."""
    shares = shares or [1 / len(models)] * len(models)
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(w * s[k].float() for w, s in zip(shares, states, strict=True))
                         for k in states[0]})
    return out


def parse_soup(dirs: str) -> tuple[list[str], list[float]]:
    """``A+B`` (equal shares) or ``A*0.8+B*0.2`` (the given shares, normalised)."""
    parts = [part.rpartition("*") if "*" in part else (part, "", "1") for part in dirs.split("+")]
    weights = [float(w) for _, _, w in parts]
    return [d for d, _, _ in parts], [w / sum(weights) for w in weights]


@torch.no_grad()
def run_evaluate(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    teacher = hetvit.load(ROOT / "assets" / "cifar10-teacher")
    batches = list(make_loader(open_dataset(DATA / "cifar10-test.tar.gz",
                                            make_transform(teacher)), batch_size=500))
    for spec in args.models:
        name, _, dirs = spec.partition("=")
        paths, shares = parse_soup(dirs)
        model = soup([hetvit.load(d) for d in paths], shares).eval()
        correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in batches)
        print(f"{name}: {100 * correct / sum(len(y) for _, y in batches):.2f}%", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--aug-seed", type=int, default=0, help="FitConfig.seed (the images stay)")
    f.add_argument("--drop-path", type=float, default=0.0)
    f.add_argument("--mixup", type=float, default=1.0)
    f.add_argument("--lr-new", type=float, default=5e-2)
    f.add_argument("--passes", type=int, default=20)
    f.add_argument("--crop", type=int, default=0, help="as hetvit fit --crop")
    f.add_argument("--cutmix", type=float, default=0.0, help="as hetvit fit --cutmix")
    f.add_argument("--freeze-early", action="store_true", help="as hetvit fit --freeze-early")
    f.add_argument("--teacher-flips", action="store_true",
                   help="distil from the teacher averaged over each view and its mirror")
    f.add_argument("--pre-logits", type=float, default=0.0,
                   help="as hetvit fit --pre-logits")
    f.add_argument("--prefix-tokens", type=float, default=0.0,
                   help="weight of the cls tokens' error at every block from the first stage on")
    f.add_argument("--adversarial", type=float, default=0.0,
                   help="eps of an adversarial step on each view (normalised pixel units)")
    f.add_argument("--adversarial-share", type=float, default=1.0,
                   help="share of each batch moved adversarially")
    f.add_argument("--jitter", type=float, default=0.0,
                   help="strength of per-image brightness, contrast and saturation views")
    f.add_argument("--patch-mix", type=float, default=0.0,
                   help="share of steps mixing two images patch by patch instead of mixup")
    f.add_argument("--keep-mlps", action="store_true",
                   help="keep the teacher's MLP weights (with --freeze-early)")
    f.add_argument("--mask-student", type=float, default=0.0,
                   help="share of patches blanked in the student's view (not the teacher's)")
    f.add_argument("--sharpness", type=float, default=0.0,
                   help="rho of sharpness-aware minimisation (0: off)")
    f.add_argument("--token-mix", type=float, default=0.0,
                   help="share of steps mixing the tokens at the first change instead of the "
                   "pixels (with --freeze-early)")
    f.add_argument("--probe-passes", type=int, default=0,
                   help="passes fitting only the new parameters before the fit (as LP-FT)")
    f.add_argument("--low-rank", type=int, default=0,
                   help="train a rank-R update of each changed block's weights instead of them")
    f.add_argument("--low-rank-lr", type=float, default=1e-3,
                   help="the learning rate of the low-rank updates")
    f.add_argument("--plan", type=Path, default=COMMITTED_PLAN,
                   help="the plan to fit (default: the committed model's)")
    f.add_argument("--content", action="store_true",
                   help="content-aware aggregation (the plan's aggregation set to content)")
    f.add_argument("--static-stages", type=int, default=0,
                   help="with --content, keep the first K stages static (their queries at zero)")
    e = sub.add_parser("evaluate")
    e.add_argument("models", nargs="+", help="NAME=DIR, NAME=DIR+DIR+... (weight average) or "
                   "NAME=DIR*0.8+DIR*0.2 (weighted)")
    args = ap.parse_args()
    run_fit(args) if args.command == "fit" else run_evaluate(args)


if __name__ == "__main__":
    main()
