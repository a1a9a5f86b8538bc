"""What one fit pass costs on a full-size model: DeiT-Small at 224, random weights.

    .venv/bin/python benchmarks/fit_cost.py          # about a minute on the 2-core machine
    .venv/bin/python benchmarks/fit_cost.py --no-freeze-early   # the embeddings trained too

Compresses ``deit_small_patch16_224`` with the ``fast`` preset and fits it for one pass over
256 random images (batch 32, two threads); prints the wall time, from which a fit's total
(images x passes) follows. Weights and images are random: cost does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import timm
import torch

import hetvit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-freeze-early", dest="freeze_early", action="store_false",
                    help="as hetvit fit --no-freeze-early")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": intended
        model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        images = torch.randn(256, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        student = hetvit.compress(model, hetvit.surgery.preset("fast", model),
                                  calibration=images[:32])
        calibration = time.perf_counter() - start
        fitted = hetvit.fit(student, model, images, hetvit.FitConfig(passes=1, batch_size=32,
                                                                    freeze_early=args.freeze_early))
    record = fitted.hetvit_fit
    print(f"load {os.getloadavg()[0]:.2f}; calibration on 32 images {calibration:.1f} s; fit of "
          f"256 images x 1 pass: {record.seconds:.1f} s wall, {record.cpu_seconds:.1f} s CPU "
          f"({record.steps} steps, {record.threads} threads)")


if __name__ == "__main__":
    main()
