"""How far a fitted student matches its teacher on the images it was fitted on, and on unseen
ones: KL(teacher || student) and top-1 agreement on 2,048 CIFAR-10 training images (the draw
``hetvit fit --num-images 2048 --seed 0`` takes), 2,048 other training images and 2,048 test
images, plain and mixed (``hetvit fit --held-out N`` records the same on held-out images of any
fit). Other training images separate the two causes of a gap: the fit's images memorised (the
other training images sit with the test images) or a shift between the teacher's training
images and unseen ones (they sit with the fit's).

    PYTHONPATH=src .venv/bin/python benchmarks/fit_gap.py assets/cifar10-fitted
"""

import argparse
from pathlib import Path

import torch

import hetvit
from hetvit.data import sample_images
from hetvit.fitting import collect_images, teacher_match

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def gap(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor) -> str:
    match = teacher_match(student, teacher, x)
    return f"KL {match['kl']:.4f}, agreement {100 * match['agreement']:.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student", type=Path)
    ap.add_argument("--teacher", type=Path, default=ROOT / "assets" / "cifar10-teacher")
    args = ap.parse_args()
    torch.set_num_threads(2)
    teacher, student = hetvit.load(args.teacher).eval(), hetvit.load(args.student).eval()
    torch.manual_seed(0)
    lam = torch.distributions.Beta(1.0, 1.0).sample((2048, 1, 1, 1))

    def draw(split: str, count: int, seed: int) -> torch.Tensor:
        return collect_images(sample_images(DATA / f"cifar10-{split}.tar.gz", teacher, count,
                                            seed=seed, batch_size=256))

    fitted = draw("train", 2048, 0)
    seen = {x.numpy().tobytes() for x in fitted}
    others = torch.stack([x for x in draw("train", 4096, 1) if x.numpy().tobytes() not in seen])
    for name, x in (("train, the fit's images", fitted), ("train, other images", others[:2048]),
                    ("test", draw("test", 2048, 0))):
        print(f"{name}: {gap(teacher, student, x)}; mixed pairs: "
              f"{gap(teacher, student, lam * x + (1 - lam) * x.flip(0))}")


if __name__ == "__main__":
    main()
