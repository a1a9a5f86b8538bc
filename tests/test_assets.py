"""The committed demo models: they load, belong together and are trained.

They are the README's teacher and ``fast`` student and the demo's inputs, so a commit that
breaks them (a stale plan, weights from another run, an LFS pointer instead of weights) must
fail here rather than in front of a newcomer.
"""

import json
import re
from pathlib import Path

import pytest
import torch

import hetvit
from hetvit.curves import read_epochs
from hetvit.demo import FITTED, STUDENT, TEACHER
from hetvit.demo_inputs import find_assets, sample_indices
from hetvit.flops import formula_macs
from hetvit.grid import token_grid
from hetvit.plan import Plan
from hetvit.surgery import describe, preset

CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test.tar.gz"


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    root = find_assets()
    return hetvit.load(root / TEACHER), hetvit.load(root / STUDENT), hetvit.load(root / FITTED)


def test_student_is_the_fast_compression_of_the_teacher(models):
    teacher, student, _ = models
    assert student.hetvit_source == describe(teacher)
    fast = preset("fast", teacher)
    assert (student.hetvit_plan.static, student.hetvit_plan.pyramid) == (fast.static,
                                                                        fast.pyramid)


def test_teacher_run_record_is_committed_with_it():
    training = find_assets() / TEACHER / "training"
    rows = read_epochs(training / "epochs.log")
    config = json.loads((training / "train_config.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(1, config["epochs"] + 1))  # the whole run
    assert (training / "curves.png").stat().st_size > 0


@pytest.mark.skipif(not CIFAR_TEST.exists(), reason="needs ../shared/data beside the repository")
def test_the_models_are_trained(models):
    """Well above chance (10%) on the first 20 test images of every class."""
    from torch.utils.data import Subset

    from hetvit.data import make_loader, make_transform, open_dataset
    from hetvit.evaluation import evaluate

    teacher = models[0]
    dataset = open_dataset(CIFAR_TEST, make_transform(teacher))
    loader = make_loader(Subset(dataset, sample_indices(dataset.targets, 20)), batch_size=100)
    for model in models:
        assert evaluate(model, loader)["top1"] > 0.6


def test_fitted_model_is_a_label_free_fit_of_the_teacher(models):
    teacher, _, fitted = models
    assert fitted.hetvit_source == describe(teacher)
    record = json.loads((find_assets() / FITTED / "fit.json").read_text())
    assert record["images"] <= 2048 and record["steps"] > 0  # the training-free budget
    assert len(record["loss_per_pass"]) == record["config"]["passes"]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "benchmarks"
                                         / "plans").glob("*.json")), ids=lambda p: p.stem)
def test_benchmark_plans_fit_the_teacher_and_are_named_by_their_cost(path, models):
    """The README's fit commands name these files: each must be a valid plan for the teacher,
    and the figure in its name (``pyramid-2.5x``) its MAC reduction to within 5% (the 1.55x
    of ``pyramid-1.5x`` is the furthest)."""
    arch = describe(models[0])
    plan = Plan.load(path)
    plan.validate(arch["depth"], token_grid(arch), tuple(arch["img_size"]))
    named = float(re.search(r"(\d+(?:\.\d+)?)x$", path.stem).group(1))
    assert formula_macs(arch) / formula_macs(arch, plan) == pytest.approx(named, rel=0.05)
