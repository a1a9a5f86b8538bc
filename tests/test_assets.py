"""The committed teacher: it loads, its training record is whole, and it is trained.

It is the README's accuracy proxy and the demo's input, so a commit that breaks it (weights
from another run, an LFS pointer instead of weights, a partial record) must fail here rather
than in front of a newcomer.
"""

import json
from pathlib import Path

import pytest

import hetvit
from hetvit.curves import read_epochs
from hetvit.demo import TEACHER, find_assets, sample_indices

CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test.tar.gz"


def test_teacher_run_record_is_committed_with_it():
    training = find_assets() / TEACHER / "training"
    rows = read_epochs(training / "epochs.log")
    config = json.loads((training / "train_config.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(1, config["epochs"] + 1))  # the whole run
    assert (training / "curves.png").stat().st_size > 0


@pytest.mark.skipif(not CIFAR_TEST.exists(), reason="needs ../shared/data beside the repository")
def test_teacher_is_trained():
    """Well above chance (10%) on the first 20 test images of every class."""
    from torch.utils.data import Subset

    from hetvit.data import make_loader, make_transform, open_dataset
    from hetvit.evaluate import evaluate

    teacher = hetvit.load(find_assets() / TEACHER)
    dataset = open_dataset(CIFAR_TEST, make_transform(teacher))
    loader = make_loader(Subset(dataset, sample_indices(dataset.targets, 20)), batch_size=100)
    assert evaluate(teacher, loader)["top1"] > 0.6
