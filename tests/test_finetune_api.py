"""The loader-first Python API: hetvit.finetune(teacher, plan, loader) -> a fine-tuned student."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hetvit
from hetvit.configs import DistillConfig, OptimConfig, TrainingError
from hetvit.distill import kd_loss
from hetvit.plan import Plan

from .conftest import tiny_vit

PLAN = Plan(static=(0,), pyramid=((2, 4),))
RUN = dict(accelerator="cpu", threads=1, progress=False)


def _loader(teacher: torch.nn.Module) -> DataLoader:
    """32 generated images, labelled with the teacher's own predictions (4 batches of 8)."""
    torch.manual_seed(0)
    images = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        labels = teacher(images).argmax(-1)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def _loss(student: torch.nn.Module, teacher: torch.nn.Module, loader: DataLoader) -> float:
    """The fine-tuning objective's task part on the loader: CE on the labels + KD."""
    student.eval()
    with torch.no_grad():
        return sum(torch.nn.functional.cross_entropy(student(x), y).item()
                   + kd_loss(student(x), teacher(x), 1.0).item() for x, y in loader)


def test_finetune_on_loaders_lowers_the_loss_and_leaves_the_teacher_alone(tmp_path, monkeypatch):
    teacher = tiny_vit().train()  # a mode the caller chose: it must be given back
    loader = _loader(teacher)
    before = copy.deepcopy(teacher.state_dict())
    flags = [p.requires_grad for p in teacher.parameters()]
    # where the start comes from by default: the first 16 images of the training loader
    start = hetvit.compress(teacher.eval(), PLAN,
                            calibration=torch.cat([x for x, _ in loader])[:16])
    teacher.train()
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    student = hetvit.finetune(teacher, PLAN, loader, loader, epochs=4,
                              distill=DistillConfig(calibration_images=16),
                              optim=OptimConfig(lr=3e-3, min_lr=3e-4), **RUN)

    assert _loss(student, teacher, loader) < 0.8 * _loss(start, teacher, loader)
    assert student is not start and not student.training
    assert (student.hetvit_plan.static, student.hetvit_plan.pyramid) == (PLAN.static,
                                                                         PLAN.pyramid)
    moved = {n for n, p in student.named_parameters()
             if not torch.equal(p, start.get_parameter(n))}
    assert {"blocks.0.attn.logits", "head.weight"} <= moved
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert [p.requires_grad for p in teacher.parameters()] == flags and teacher.training
    # out=None: nothing kept, neither in the working directory nor in the temporary one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    assert not any((tmp_path / "tmp").iterdir())


def test_finetune_with_out_writes_a_run_whose_model_is_the_returned_student(tmp_path):
    teacher = tiny_vit()
    loader = _loader(teacher)
    student = hetvit.finetune(teacher, PLAN, loader, epochs=1, out=tmp_path / "run",
                              distill=DistillConfig(calibration_images=8), **RUN)
    saved = hetvit.load(tmp_path / "run" / "model")
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in saved.state_dict().items())
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "finetune_config.json").is_file()
    with pytest.raises(TrainingError, match="exists: choose another out"):
        hetvit.finetune(teacher, PLAN, loader, epochs=1, out=tmp_path / "run", **RUN)


@pytest.mark.parametrize("make, message", [
    (lambda: OptimConfig(lr=-1.0), "--lr must be >= 0, got -1.0"),
    (lambda: OptimConfig(label_smoothing=1.0), "--label-smoothing must be below 1"),
    (lambda: OptimConfig(mixup=float("nan")), "--mixup must be >= 0, got nan"),
    (lambda: DistillConfig(temperature=0.0), "--temperature must be > 0"),
    (lambda: DistillConfig(guidance=-0.5), "--guidance must be >= 0"),
    (lambda: DistillConfig(calibration_images=-1), "--calibration-images must be >= 0"),
    (lambda: DistillConfig(calibration_images=2.5), "--calibration-images must be a whole"),
    (lambda: DistillConfig(aggregation_init="kmeans"), "--aggregation-init must be one of"),
])
def test_bad_settings_are_one_line_training_errors(make, message):
    with pytest.raises(TrainingError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "--epochs must be at least 1, got 0"),
    ({"plan": None}, "give a plan"),
    ({"distill": DistillConfig(features=1.0), "plan": Plan(static=(0,))}, "no pyramid"),
    ({"precision": "8-bit"}, "precision must be one of"),
])
def test_finetune_refuses_bad_arguments_before_any_work(tmp_path, change, message):
    teacher = tiny_vit()
    args = {"plan": PLAN, "out": tmp_path / "run", **RUN, **change}
    plan = args.pop("plan")
    with pytest.raises(TrainingError, match=message):
        hetvit.finetune(teacher, plan, _loader(teacher), **args)
    assert not (tmp_path / "run").exists()


def test_finetune_takes_a_plan_as_compress_does(tmp_path):
    """A preset name (scaled to the teacher) or a plan file, not only a Plan; anything else is a
    usage error before any work."""
    teacher = tiny_vit()
    PLAN.save(tmp_path / "plan.json")
    for plan, expected in (("fast", hetvit.surgery.preset("fast", teacher)),
                           (tmp_path / "plan.json", PLAN)):
        student = hetvit.finetune(teacher, plan, _loader(teacher), epochs=1, **RUN)
        assert (student.hetvit_plan.static, student.hetvit_plan.pyramid) == (
            expected.static, expected.pyramid)
    with pytest.raises(hetvit.errors.UsageError, match="plan must be a hetvit.Plan, a preset"):
        hetvit.finetune(teacher, 3, _loader(teacher), epochs=1, **RUN)


def test_the_api_is_at_the_top_level():
    assert {"finetune", "DistillConfig", "OptimConfig"} <= set(hetvit.__all__)
    from hetvit.training import finetune

    assert hetvit.finetune is finetune and hetvit.OptimConfig is OptimConfig
