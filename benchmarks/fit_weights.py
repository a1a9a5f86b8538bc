"""Levers on the weights of a fit that ``hetvit fit`` lacks: an exponential
moving average of the weights, stochastic depth, a flip-averaged teacher, and weight averages
("soups") of fits that differ only in their augmentation seed; ``--crop``, ``--cutmix`` and
``--freeze-early`` are ``hetvit fit``'s, to combine them with the rest.

``fit`` runs the committed model's fit (``pyramid-2.5x``, the 2,048 images ``hetvit fit
--num-images 2048 --seed 0`` draws, 20 passes, mixup 1.0, one thread) with the given changes and
saves the fitted student to OUT/final and the EMA of its weights at each decay to OUT/ema<d>.
``evaluate`` prints top-1 on the 10,000 test images of saved students, where ``A+B`` is the
average of their weights (the same plan, so the same parameters).

    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --aug-seed 1 --out runs/w/s1
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --drop-path 0.1 --out runs/w/dp
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --freeze-early --out runs/w/fz
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py fit --teacher-flips --passes 14 \\
        --out runs/w/tta
    PYTHONPATH=src .venv/bin/python benchmarks/fit_weights.py evaluate \\
        s1=runs/w/s1/final soup=assets/cifar10-fitted+runs/w/s1/final
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from timm.layers import DropPath
from torch.optim.optimizer import register_optimizer_step_post_hook

import hetvit
from hetvit import fitting
from hetvit.cli.common import resolve_plan
from hetvit.data import make_loader, make_transform, open_dataset, sample_images

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
DECAYS = (0.99, 0.995, 0.998)


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


def run_fit(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    teacher = hetvit.load(ROOT / "assets" / "cifar10-teacher").eval()
    plan = resolve_plan(str(ROOT / "benchmarks" / "plans" / "pyramid-2.5x.json"), teacher)
    images = fitting.collect_images(sample_images(DATA / "cifar10-train.tar.gz", teacher, 2048,
                                                  seed=0, batch_size=256))
    student = hetvit.compress(teacher, plan, calibration=images[:256])
    set_drop_path(student, args.drop_path)
    if args.teacher_flips:
        flip_averaged_teacher(teacher)
    config = fitting.FitConfig(passes=args.passes, mixup=args.mixup, lr_new=args.lr_new,
                               crop=args.crop, cutmix=args.cutmix,
                               freeze_early=args.freeze_early, seed=args.aug_seed)
    averages = WeightAverages(DECAYS)
    fitted = fitting.fit(student, teacher, images, config)
    averages.handle.remove()
    set_drop_path(fitted, 0.0)
    print(f"fitted in {fitted.hetvit_fit.seconds:.0f} s", flush=True)
    hetvit.save(fitted, args.out / "final")
    for decay in DECAYS:
        hetvit.save(averages.averaged(fitted, decay), args.out / f"ema{decay}")


def soup(models: list[torch.nn.Module]) -> torch.nn.Module:
    """The first model holding the mean of all models' weights."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(s[k].float() for s in states) / len(states) for k in states[0]})
    return out


@torch.no_grad()
def run_evaluate(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    teacher = hetvit.load(ROOT / "assets" / "cifar10-teacher")
    batches = list(make_loader(open_dataset(DATA / "cifar10-test.tar.gz",
                                            make_transform(teacher)), batch_size=500))
    for spec in args.models:
        name, _, dirs = spec.partition("=")
        model = soup([hetvit.load(d) for d in dirs.split("+")]).eval()
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
    e = sub.add_parser("evaluate")
    e.add_argument("models", nargs="+", help="NAME=DIR or NAME=DIR+DIR+... (weight average)")
    args = ap.parse_args()
    run_fit(args) if args.command == "fit" else run_evaluate(args)


if __name__ == "__main__":
    main()
