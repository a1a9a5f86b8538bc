import pytest
import torch

import hetvit
from hetvit.aggregation import pooling_matrix
from hetvit.configs import DistillConfig, OptimConfig, TrainConfig, TrainingError
from hetvit.distill import feature_loss, guidance_kl, kd_loss, project_map, stage_ends
from hetvit.hosts import HOSTS
from hetvit.lightning_modules import FinetuneModule
from hetvit.plan import Plan
from hetvit.training import finetune_run

from .conftest import tiny_vit

attention_map = HOSTS["timm"].attention_map


def _teacher_maps(module: FinetuneModule, x: torch.Tensor) -> dict[int, torch.Tensor]:
    return module.teacher_forward(x)[1]


def _sharp_teacher():
    """A tiny ViT whose attention depends clearly on the image (random init is near uniform)."""
    model = tiny_vit()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[:64] *= 6
    return model


def test_guidance_is_zero_at_the_teachers_map_and_positive_elsewhere(images):
    teacher = _sharp_teacher()
    one, other = images[:1], images[1:2]
    student = hetvit.compress(teacher, Plan(static=(0, 1)), calibration=one)
    module = FinetuneModule(student, teacher)
    for i, a in _teacher_maps(module, one).items():
        assert guidance_kl(a, student.blocks[i].attn.logits).abs() < 1e-5
    for i, a in _teacher_maps(module, other).items():
        assert guidance_kl(a, student.blocks[i].attn.logits) > 1e-3


def test_guidance_equals_kl_by_hand():
    torch.manual_seed(0)
    dyn = torch.randn(2, 3, 5, 5).softmax(-1)
    logits = torch.randn(3, 5, 5)
    st = logits.softmax(-1)
    by_hand = (dyn * (dyn.log() - st.log())).sum(-1).mean()
    torch.testing.assert_close(guidance_kl(dyn, logits), by_hand)


def test_kd_loss_is_zero_for_equal_logits_and_matches_kl():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    assert kd_loss(t, t, 2.0).abs() < 1e-6
    pt, ps = (t / 2).softmax(-1), (s / 2).softmax(-1)
    torch.testing.assert_close(kd_loss(s, t, 2.0), 4 * (pt * (pt.log() - ps.log())).sum(-1).mean())


def test_projected_map_keeps_rows_stochastic_and_identity_is_a_no_op():
    a = torch.randn(2, 3, 17, 17).softmax(-1)
    assert project_map(a, None, 1) is a
    torch.testing.assert_close(project_map(a, torch.eye(16), 1), a)
    p, _ = pooling_matrix((4, 4), 4)
    b = project_map(a, p, 1)
    assert b.shape == (2, 3, 5, 5)
    torch.testing.assert_close(b.sum(-1), torch.ones(2, 3, 5))
    # cls row: its attention to the 4 patches of a pooling window is summed
    window = [0, 1, 4, 5]
    torch.testing.assert_close(b[..., 0, 1], a[..., 0, [1 + j for j in window]].sum(-1))


def test_static_layer_after_aggregation_gets_a_guide_of_its_size(images):
    teacher = tiny_vit()
    student = hetvit.compress(teacher, Plan(static=(0, 2), pyramid=((1, 4),)), calibration=images)
    maps = _teacher_maps(FinetuneModule(student, teacher), images)
    assert maps[0].shape == (4, 2, 17, 17) and maps[2].shape == (4, 2, 5, 5)


def test_teacher_maps_are_the_teachers_own(images):
    teacher = tiny_vit()
    student = hetvit.compress(teacher, Plan(static=(1,)), calibration=images)
    seen = {}
    teacher.blocks[1].attn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    maps = _teacher_maps(FinetuneModule(student, teacher), images)
    torch.testing.assert_close(maps[1], attention_map(teacher.blocks[1].attn, seen["x"]))


@pytest.mark.parametrize("mix_epochs", [0.0, 1.0])
def test_training_steps_reduce_the_guidance_loss(mix_epochs, images):
    teacher = _sharp_teacher()
    student = hetvit.compress(teacher, Plan(static=(0, 1), pyramid=((2, 4),)))  # uniform start
    module = FinetuneModule(student, teacher,
                            DistillConfig(ce=0.0, kd=0.0, guidance=1.0, mix_epochs=mix_epochs),
                            OptimConfig(lr=0.05))
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    target = torch.zeros(len(images), dtype=torch.long)

    def loss() -> torch.Tensor:
        maps = _teacher_maps(module, images)
        return torch.stack([guidance_kl(maps[i], student.blocks[i].attn.logits)
                            for i in (0, 1)]).mean()

    # The best a static map can do is the mean of the teacher's maps over the batch.
    best = torch.stack([guidance_kl(a, a.mean(0).log())
                        for a in _teacher_maps(module, images).values()]).mean().item()
    start = loss().item()
    for _ in range(40):
        opt.zero_grad()
        module.training_step((images, target), 0).backward()
        opt.step()
    assert loss().item() - best < 0.25 * (start - best)


@pytest.mark.parametrize("freeze", [False, True])
def test_frozen_aggregation_keeps_its_pooling_while_the_rest_learns(freeze, images):
    from hetvit.aggregation import TokenAggregation

    teacher = _sharp_teacher()
    student = hetvit.compress(teacher, Plan(static=(0,), pyramid=((2, 4),)), calibration=images)
    module = FinetuneModule(student, teacher, DistillConfig(freeze_aggregation=freeze),
                            OptimConfig(lr=0.01))
    agg = next(m for m in student.modules() if isinstance(m, TokenAggregation))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    opt = torch.optim.AdamW(module.param_groups(), lr=0.01)
    target = torch.arange(len(images)) % 10
    student.train()
    for _ in range(3):
        opt.zero_grad()
        module.training_step((images, target), 0).backward()
        opt.step()
    after = dict(student.named_parameters())
    agg_names = {n for n, p in after.items() if any(p is q for q in agg.parameters())}
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert agg_names and (agg_names & moved) == (set() if freeze else agg_names)
    assert "blocks.0.attn.logits" in moved and "head.weight" in moved


def test_feature_loss_is_zero_at_the_aggregated_teacher_and_relative():
    torch.manual_seed(0)
    t = torch.randn(2, 17, 8)
    p, _ = pooling_matrix((4, 4), 4)
    s = torch.cat([t[:, :1], p @ t[:, 1:]], 1)
    assert feature_loss(s, t, p, 1).abs() < 1e-7
    noisy = s + 0.1 * torch.randn_like(s)
    by_hand = (noisy - s).pow(2).mean() / s.pow(2).mean()
    torch.testing.assert_close(feature_loss(noisy, t, p, 1), by_hand)
    torch.testing.assert_close(feature_loss(3 * noisy, 3 * t, p, 1), by_hand)  # scale-free
    torch.testing.assert_close(feature_loss(t + 1, t, torch.eye(16), 1),
                               feature_loss(t + 1, t, None, 1))


def test_features_are_compared_at_the_end_of_every_stage():
    assert stage_ends(Plan(pyramid=((3, 32), (6, 16), (9, 9))), 12) == [5, 8, 11]
    assert stage_ends(Plan(static=(0, 1)), 12) == []


def test_training_steps_reduce_the_feature_loss(images):
    teacher = _sharp_teacher()
    student = hetvit.compress(teacher, Plan(pyramid=((1, 8), (2, 4))))
    module = FinetuneModule(student, teacher,
                            DistillConfig(ce=0.0, kd=0.0, guidance=0.0, features=1.0))
    assert module.feature_layers == [1, 3]
    layers = [b for b in student.blocks if hasattr(b, "attn")]

    def loss() -> torch.Tensor:  # by hand: the teacher's tokens through the student's pooling
        seen: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda m_, a, out, k=k: seen.__setitem__(k, out))
                 for k, m in (("t1", teacher.blocks[1]), ("t3", teacher.blocks[3]),
                              ("s1", layers[1]), ("s3", layers[3]))]
        with torch.no_grad():
            teacher(images), student(images)
        for h in hooks:
            h.remove()
        p1, p2 = (m.matrix() for m in student.blocks if not hasattr(m, "attn"))
        return (feature_loss(seen["s1"], seen["t1"], p1, 1)
                + feature_loss(seen["s3"], seen["t3"], p2 @ p1, 1)) / 2

    student.train()
    torch.testing.assert_close(module.training_step((images, None), 0), loss())
    torch.manual_seed(0)
    with torch.no_grad():  # move the student away from the teacher, then let it find its way back
        for p in layers[1].mlp.parameters():
            p.add_(0.3 * torch.randn_like(p))
    start = loss().item()
    opt = torch.optim.Adam(student.parameters(), lr=0.003)
    for _ in range(30):
        opt.zero_grad()
        module.training_step((images, None), 0).backward()
        opt.step()
    end = loss().item()
    assert end < 0.5 * start


def test_feature_distillation_without_a_pyramid_is_refused_before_writing(tmp_path):
    (tmp_path / "data").mkdir()
    config = TrainConfig(data=tmp_path / "data", out=tmp_path / "run")
    with pytest.raises(TrainingError, match="no pyramid"):
        finetune_run(tiny_vit(), Plan(static=(0,)), config, DistillConfig(features=1.0))
    assert not (tmp_path / "run").exists()


def test_cluster_init_without_calibration_images_is_refused_before_writing(tmp_path):
    (tmp_path / "data").mkdir()
    config = TrainConfig(data=tmp_path / "data", out=tmp_path / "run")
    with pytest.raises(TrainingError, match="calibration-images"):
        finetune_run(tiny_vit(), Plan(pyramid=((1, 8),)), config,
                     DistillConfig(calibration_images=0, aggregation_init="cluster"))
    assert not (tmp_path / "run").exists()
