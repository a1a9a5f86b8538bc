"""A fine-tune run for tests/test_ddp.py, as a script: Lightning starts each further DDP
process by running the script again, so the run must be one (a test function cannot be).

    python tests/ddp_run.py SETTINGS.json

SETTINGS holds the TrainConfig fields, ``teacher`` and ``plan`` (paths), and optionally
``kill_at_step``: every process then kills itself (SIGKILL, as a preempted machine would
be killed) once that many optimiser steps are done.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L

import hetvit
from hetvit.configs import DistillConfig, OptimConfig, TrainConfig
from hetvit.plan import Plan
from hetvit.training import finetune_run


class KillAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    teacher = hetvit.load(settings.pop("teacher"))
    plan = Plan.load(settings.pop("plan"))
    kill = settings.pop("kill_at_step", None)
    distill = DistillConfig(calibration_images=settings.pop("calibration_images", 16))
    config = TrainConfig(**{**settings, "optim": OptimConfig(), "data": Path(settings["data"]),
                            "out": Path(settings["out"]),
                            "val_data": settings.get("val_data") and Path(settings["val_data"]),
                            "scale": tuple(settings["scale"]),
                            "extra_callbacks": [] if kill is None else [KillAtStep(kill)]})
    finetune_run(teacher, plan, config, distill)


if __name__ == "__main__":
    main()
