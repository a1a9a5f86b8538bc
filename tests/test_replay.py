"""Replaying the teacher's front into a fitting student: the same loss, gradients and fit, with
the front's blocks not run."""

from __future__ import annotations

import pytest
import torch
import transformers

import hetvit
from hetvit import fitting
from hetvit.distill import kd_loss
from hetvit.fitting import FitConfig, first_change, param_groups
from hetvit.hosts import host_of, logits
from hetvit.plan import Plan
from hetvit.replay import ReplayedBlock, replaying_front

from .conftest import confident_vit, tiny_vit

PLAN = Plan(pyramid=((2, 8), (3, 4)))  # the first change at block 2 of 4: a front of two


def _hf_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                    num_hidden_layers=4, num_attention_heads=2,
                                    intermediate_size=64, num_labels=10)
    return transformers.ViTForImageClassification(config).eval()


def _student(teacher: torch.nn.Module, config: FitConfig) -> torch.nn.Module:
    student = hetvit.compress(teacher, PLAN)
    param_groups(student, config)  # freezes what the fit freezes
    return student.train()


def _counted(blocks: list[torch.nn.Module]) -> list[int]:
    calls = [0]
    for block in blocks:
        block.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("make", [confident_vit, lambda: tiny_vit(global_pool="avg"), _hf_vit],
                         ids=["timm", "timm-avg-pool", "hf"])
@pytest.mark.parametrize("config", [FitConfig(), FitConfig(pre_logits=2.0)],
                         ids=["logits", "pre-logits"])
def test_a_replayed_step_has_the_loss_and_gradients_of_the_plain_one(make, config):
    teacher = make()
    student = _student(teacher, config)
    x = torch.randn(6, 3, 32, 32)
    reference = fitting._Loss(student, teacher, config)(x)  # no replay: every block runs
    if not config.pre_logits:  # and that is the distillation of the logits alone
        torch.testing.assert_close(
            reference, kd_loss(logits(student, x), logits(teacher, x).detach(), 1.0))
    expected = torch.autograd.grad(reference, [p for p in student.parameters()
                                               if p.requires_grad])
    front = host_of(student).layers(student)[:2]
    calls = _counted(front)
    with replaying_front(student, teacher, first_change(student)) as replay:
        assert replay is not None
        loss = fitting._Loss(student, teacher, config, replay)(x)
    assert calls[0] == 0  # the front's blocks did not run
    got = torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_the_scope_puts_the_sequence_back_and_runs_the_blocks_outside_a_step():
    teacher = confident_vit()
    student = _student(teacher, FitConfig())
    host = host_of(student)
    before = host.sequence(student)
    x = torch.randn(3, 3, 32, 32)
    expected = logits(student.eval(), x)
    with pytest.raises(RuntimeError, match="inside"):
        with replaying_front(student, teacher, 2):
            wrapped = host.sequence(student)
            assert [type(m) for m in wrapped[:2]] == [ReplayedBlock, ReplayedBlock]
            # no tokens handed over: the wrapped front computes as the blocks do
            torch.testing.assert_close(logits(student, x), expected)
            raise RuntimeError("inside")
    assert all(a is b for a, b in zip(host.sequence(student), before, strict=True))
    assert not any(isinstance(m, ReplayedBlock) for m in student.modules())


@pytest.mark.parametrize("config, depth", [
    (FitConfig(freeze_early=False), 2),  # the front trains: its tokens are not the teacher's
    (FitConfig(), 0),                     # no front
])
def test_no_replay_where_it_would_change_what_the_student_computes(config, depth):
    teacher = confident_vit()
    student = _student(teacher, config)
    with replaying_front(student, teacher, depth) as replay:
        assert replay is None
        assert not any(isinstance(m, ReplayedBlock) for m in student.modules())


def test_a_fit_with_replay_ends_where_the_fit_without_it_does(monkeypatch):
    teacher = confident_vit()
    student = hetvit.compress(teacher, PLAN)
    images = torch.randn(16, 3, 32, 32)
    config = FitConfig(passes=2, batch_size=8, features=0.5)
    replayed = fitting.fit(student, teacher, images, config)

    def never(*_):
        return replaying_front(student, teacher, 0)  # yields None: the plain step

    monkeypatch.setattr(fitting, "replaying_front", never)
    plain = fitting.fit(student, teacher, images, config)
    assert (replayed.hetvit_fit.replayed_blocks, plain.hetvit_fit.replayed_blocks) == (2, 0)
    assert replayed.hetvit_fit.loss_per_pass == pytest.approx(plain.hetvit_fit.loss_per_pass,
                                                              rel=1e-5)
    for (name, a), b in zip(replayed.state_dict().items(), plain.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_no_replay_for_a_student_of_another_checkpoint_of_the_teacher_s_architecture():
    teacher = confident_vit()
    other = confident_vit()
    with torch.no_grad():
        host_of(other).layers(other)[1].mlp.fc1.weight.add_(0.1)
    student = _student(other, FitConfig())  # distilled from `teacher`, its front is other's
    with replaying_front(student, teacher, first_change(student)) as replay:
        assert replay is None
