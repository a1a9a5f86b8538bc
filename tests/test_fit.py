"""Fitting a compressed model to its teacher on unlabeled images."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import hetvit
from hetvit import fitting
from hetvit.cli import app
from hetvit.fitting import (
    FitConfig,
    FitError,
    augment,
    fit,
    new_parameters,
)
from hetvit.plan import Plan
from hetvit.views import cut_and_paste, resized_crop, translate

from .conftest import confident_vit, tiny_vit, write_images

PLAN = Plan(static=(0,), pyramid=((2, 4),))


def _kd(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.nn.functional.kl_div(student(x).log_softmax(-1), teacher(x).log_softmax(-1),
                                          reduction="batchmean", log_target=True).item()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fit_cli(teacher_dir, images, out, *options: str):
    """``hetvit fit --teacher DIR --plan fast --images IMAGES --out OUT [options]``."""
    return CliRunner().invoke(app, ["fit", "--teacher", str(teacher_dir), "--plan", "fast",
                                    "--images", str(images), "--out", str(out), *options])


@pytest.fixture
def vit() -> torch.nn.Module:
    return confident_vit()


@pytest.fixture
def pool() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(48, 3, 32, 32)


def test_fit_brings_the_student_closer_to_the_teacher(vit, pool):
    student = hetvit.compress(vit, PLAN, calibration=pool[:16])
    before, teacher_before = _state(student), _state(vit)
    fitted = fit(student, vit, pool, FitConfig(passes=6, batch_size=16, lr=3e-5, lr_new=1e-2))
    assert _kd(fitted, vit, pool) < 0.5 * _kd(student, vit, pool)
    # the student and the teacher given are untouched; the copy is in eval mode
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in vit.state_dict().items())
    assert not fitted.training and fitted.hetvit_plan == student.hetvit_plan
    record = fitted.hetvit_fit
    assert record.images == 48 and record.steps == 6 * 3 and len(record.loss_per_pass) == 6
    assert record.loss_per_pass[-1] < record.loss_per_pass[0]


@pytest.mark.parametrize("trainable", ["new", "norms"])
def test_trainable_restricts_what_moves(vit, pool, trainable):
    student = hetvit.compress(vit, PLAN, calibration=pool[:16])
    fitted = fit(student, vit, pool[:32], FitConfig(passes=1, batch_size=16,
                                                    trainable=trainable))
    new_names = {n for n, p in fitted.named_parameters()
                 if any(p is q for q in new_parameters(fitted))}
    moved = {k for k, v in fitted.state_dict().items()
             if not torch.equal(v, student.state_dict()[k])}
    assert new_names <= moved
    weights = {k for k in moved - new_names if k.endswith("weight") and "norm" not in k}
    if trainable == "new":
        assert moved == new_names
    else:  # norms and biases move, the Linear and conv weights do not
        assert not weights and moved - new_names
    assert all(p.requires_grad for p in fitted.parameters())


def test_freeze_early_keeps_the_teacher_up_to_the_plan_s_first_change(vit, pool):
    plan = Plan(static=(3,), pyramid=((2, 4),))  # the first change: a stage before layer 2
    student = hetvit.compress(vit, plan, calibration=pool[:16])

    def moved(config: FitConfig) -> set[str]:
        fitted = fit(student, vit, pool[:32], config)
        assert all(p.requires_grad for p in fitted.parameters())
        return {k for k, v in fitted.state_dict().items()
                if not torch.equal(v, student.state_dict()[k])}

    early = ("cls_token", "pos_embed", "patch_embed.", "blocks.0.", "blocks.1.")
    frozen = moved(FitConfig(passes=1, batch_size=16, freeze_early=True))
    trained = moved(FitConfig(passes=1, batch_size=16, freeze_early=False))
    assert not any(k.startswith(early) for k in frozen)
    assert frozen == {k for k in trained if not k.startswith(early)}  # the rest trains as ever
    assert any(k.startswith("blocks.0.") for k in trained)
    assert {"blocks.2.weight", "blocks.3.attn.qkv.weight", "blocks.4.attn.logits"} <= frozen


def test_fit_is_reproducible(vit, pool):
    student = hetvit.compress(vit, PLAN, calibration=pool[:16])
    config = FitConfig(passes=1, batch_size=16, mixup=0.5, seed=3)
    a, b = fit(student, vit, pool, config), fit(student, vit, pool, config)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_translation_is_a_window_of_the_reflect_padded_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = translate(x, 2, gen)
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="reflect")
    offsets = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(0)).tolist()
    assert out.shape == x.shape
    for k, (i, j) in enumerate(offsets):
        assert torch.equal(out[k], padded[k, :, i:i + 8, j:j + 8])
    # offset (2, 2) is the image itself: zero shift leaves it unchanged
    centred = torch.stack([padded[k, :, 2:10, 2:10] for k in range(2)])
    assert torch.equal(centred, x)


def test_resized_crop_zooms_each_image_into_a_box_of_at_least_the_area_asked():
    # ramps: channel 0 holds each pixel's column, channel 1 its row; bilinear resampling of a
    # ramp is exact, so the output's step per pixel is the box's width (height) as a fraction
    size, min_area = 16, 0.3
    x = torch.zeros(64, 2, size, size)
    x[:, 0], x[:, 1] = torch.arange(size).float(), torch.arange(size).float()[:, None]
    out = resized_crop(x, min_area, torch.Generator().manual_seed(0))
    width = (out[:, 0, :, -2] - out[:, 0, :, 1]) / (size - 3)  # per row, away from the edges
    height = (out[:, 1, -2, :] - out[:, 1, 1, :]) / (size - 3)
    assert torch.allclose(width, width[:, :1], atol=1e-5)  # no shear: one width per image
    width, height = width[:, 0], height[:, 0]
    assert (width * height >= min_area - 1e-4).all() and (width * height <= 1 + 1e-4).all()
    assert ((width / height >= 3 / 4 - 1e-4) & (width / height <= 4 / 3 + 1e-4)).all()
    assert out.amin() >= 0 and out.amax() <= size - 1  # the box stays inside the image
    assert width.max() - width.min() > 0.3  # each image draws its own box


def test_cutmix_pastes_a_box_of_the_other_image_of_the_mixed_area():
    x, other = torch.zeros(2, 3, 10, 10), torch.ones(2, 3, 10, 10)
    out = cut_and_paste(x, other, 0.75, torch.Generator().manual_seed(1))
    assert out.sum() / out.numel() == pytest.approx(0.25)  # a 5 x 5 box of 10 x 10
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(cut_and_paste(x, other, 1.0, torch.Generator()), x)


def test_augment_without_crop_flip_or_mixing_is_the_identity(pool):
    config = FitConfig(mixup=0.0, flip=False, crop=0, cutmix=0.0)
    assert torch.equal(augment(pool, config, torch.Generator()), pool)
    config = FitConfig(mixup=1.0, flip=False, cutmix=1.0)
    mixed = augment(pool, config, torch.Generator().manual_seed(0))
    # CutMix keeps every pixel of one of the batch's images: no value is blended
    values = set(pool.flatten().tolist())
    assert set(mixed.flatten().tolist()) <= values


def test_anchor_keeps_the_inherited_weights_nearer_their_start(vit, pool):
    student = hetvit.compress(vit, PLAN, calibration=pool[:16])
    start = _state(student)
    new = {id(p) for p in new_parameters(student)}
    inherited = [k for k, p in student.named_parameters() if id(p) not in new]

    def drift(model: torch.nn.Module) -> float:
        state = model.state_dict()
        return sum((state[k] - start[k]).norm().item() for k in inherited)

    config = FitConfig(passes=2, batch_size=16, lr=1e-3, mixup=0.0)
    free = fit(student, vit, pool, config)
    held = fit(student, vit, pool, FitConfig(passes=2, batch_size=16, lr=1e-3, mixup=0.0,
                                             anchor=200.0))
    assert 0 < drift(held) < 0.7 * drift(free)
    with pytest.raises(FitError, match="anchor"):
        FitConfig(anchor=-1.0)


def test_token_distillation_adds_a_positive_term_linear_in_its_weight(vit, pool):
    from hetvit.distill import kd_loss
    from hetvit.fitting import _Loss

    student = hetvit.compress(vit, Plan(static=(0,), pyramid=((2, 4), (3, 2))),
                              calibration=pool[:16]).eval()
    x = pool[:8]
    loss = {w: _Loss(student, vit, FitConfig(features=w))(x).item() for w in (0.0, 1.0, 2.0)}
    with torch.no_grad():
        assert loss[0.0] == pytest.approx(kd_loss(student(x), vit(x), 1.0).item(), rel=1e-6)
    assert loss[1.0] > loss[0.0]
    assert loss[2.0] - loss[0.0] == pytest.approx(2 * (loss[1.0] - loss[0.0]), rel=1e-5)
    with pytest.raises(FitError, match="features"):
        FitConfig(features=-1.0)


def test_pre_logit_distillation_adds_the_relative_error_of_the_head_s_input(vit, pool):
    """Against timm's own ``forward_head(..., pre_logits=True)``: the term is
    ``w * mean((s - t)^2) / mean(t^2)`` of the student's and teacher's head inputs."""
    from hetvit.distill import kd_loss
    from hetvit.fitting import _Loss

    student = hetvit.compress(vit, Plan(pyramid=((2, 8), (3, 4))), calibration=pool[:16])
    x = pool[:8]
    with torch.no_grad():
        kd = kd_loss(student(x), vit(x), 1.0)
        s = student.forward_head(student.forward_features(x), pre_logits=True)
        t = vit.forward_head(vit.forward_features(x), pre_logits=True)
        expected = kd + 3.0 * (s - t).pow(2).mean() / t.pow(2).mean()
        got = {w: _Loss(student.eval(), vit, FitConfig(pre_logits=w))(x) for w in (0.0, 3.0)}
    torch.testing.assert_close(got[0.0], kd)
    torch.testing.assert_close(got[3.0], expected)
    assert got[3.0] > got[0.0]
    with pytest.raises(FitError, match="pre_logits"):
        FitConfig(pre_logits=-1.0)


def test_pre_logit_distillation_needs_a_head():
    import transformers

    from hetvit.fitting import _Loss

    torch.manual_seed(0)
    bare = transformers.ViTModel(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64), add_pooling_layer=False).eval()
    student = hetvit.compress(bare, Plan(pyramid=((1, 8),)))
    with pytest.raises(FitError, match="pre_logits needs a classification head.*set it to 0"):
        _Loss(student, bare, FitConfig(pre_logits=1.0))


def test_teacher_match_against_itself_and_a_reference(vit, pool):
    from hetvit.fitting import teacher_match

    same = teacher_match(vit, vit, pool)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["agreement"] == 1.0
    student = hetvit.compress(vit, PLAN, calibration=pool[:16])
    got = teacher_match(student, vit, pool, batch_size=7)  # batches must not change it
    with torch.no_grad():
        agree = (student(pool).argmax(-1) == vit(pool).argmax(-1)).float().mean().item()
    assert got["agreement"] == pytest.approx(agree, abs=1e-5) and got["images"] == 48
    assert got["kl"] == pytest.approx(_kd(student, vit, pool), rel=1e-3)


def test_fit_records_its_match_on_held_out_images(vit, pool):
    student = hetvit.compress(vit, PLAN, calibration=pool[:16])
    config = FitConfig(passes=1, batch_size=16)
    plain = fit(student, vit, pool[:32], config)
    assert list(plain.hetvit_fit.match) == ["fit"]
    fitted = fit(student, vit, pool[:32], config, held_out=pool[32:])
    match = fitted.hetvit_fit.match
    assert match["held_out"]["images"] == 16 and match["fit"]["images"] == 32
    assert match["fit"] == plain.hetvit_fit.match["fit"]  # held-out images never train
    with pytest.raises(FitError, match="takes"):
        fit(student, vit, pool, config, held_out=torch.randn(2, 3, 16, 16))


def test_fit_takes_a_loader_of_labelled_batches_and_ignores_the_labels(vit, pool):
    student = hetvit.compress(vit, PLAN)
    loader = [(pool[i:i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 48, 16)]
    fitted = fit(student, vit, loader, FitConfig(passes=1, batch_size=16), max_images=40)
    assert fitted.hetvit_fit.images == 40


def test_bad_input_is_refused(vit, pool):
    student = hetvit.compress(vit, PLAN)
    with pytest.raises(FitError, match="no images"):
        fit(student, vit, [])
    with pytest.raises(hetvit.errors.DataError, match="iterable of such batches.*got int"):
        fit(student, vit, 5)
    with pytest.raises(hetvit.errors.DataError, match="got str"):
        fit(student, vit, ["a.png", "b.png"])
    with pytest.raises(FitError, match=r"\(3, 16, 16\).*takes \(3, 32, 32\)"):
        fit(student, vit, torch.randn(4, 3, 16, 16))
    with pytest.raises(FitError, match="not a compressed model"):
        fit(vit, vit, pool)
    other = tiny_vit(embed_dim=64)
    with pytest.raises(FitError, match="does not match the student's source.*embed_dim"):
        fit(student, other, pool)
    with pytest.raises(FitError, match="itself compressed"):
        fit(student, student, pool)
    with pytest.raises(FitError, match="passes"):
        FitConfig(passes=0)
    with pytest.raises(FitError, match="trainable"):
        FitConfig(trainable="some")
    with pytest.raises(FitError, match="crop"):
        FitConfig(crop=-1)
    with pytest.raises(FitError, match="scale"):
        FitConfig(scale=0.0)
    with pytest.raises(FitError, match="cutmix"):
        FitConfig(cutmix=1.5)


def test_cli_fit_writes_a_loadable_checkpoint_with_its_record(vit, tmp_path):
    teacher_dir = tmp_path / "teacher"
    hetvit.save(vit, teacher_dir)
    write_images(tmp_path / "imgs", ["a", "b"], per_class=10)  # folder names are never read
    (tmp_path / "imgs" / "loose.png").write_bytes((tmp_path / "imgs" / "a" / "0.png").read_bytes())
    out = tmp_path / "fitted"
    result = CliRunner().invoke(app, ["fit", "--teacher", str(teacher_dir), "--plan", "fast",
                                      "--images", str(tmp_path / "imgs"), "--out", str(out),
                                      "--passes", "2", "--batch-size", "8",
                                      "--calibration-images", "8"])
    assert result.exit_code == 0, result.output
    model = hetvit.load(out)
    assert model.hetvit_plan.label == "fast"
    record = json.loads((out / "fit.json").read_text())
    assert record["images"] == 21 and record["steps"] == 2 * 3
    assert record["config"]["passes"] == 2
    assert record["match"]["fit"]["images"] == 21
    assert "agreement with the teacher" in result.output

    again = tmp_path / "held"
    result = CliRunner().invoke(app, ["fit", "--teacher", str(teacher_dir), "--plan", "fast",
                                      "--images", str(tmp_path / "imgs"), "--out", str(again),
                                      "--passes", "1", "--batch-size", "8", "--held-out", "5",
                                      "--calibration-images", "8", "--no-freeze-early",
                                      "--pre-logits", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads((again / "fit.json").read_text())
    assert record["images"] == 16 and record["match"]["held_out"]["images"] == 5
    assert record["config"]["pre_logits"] == 2.0
    assert not record["config"]["freeze_early"] and json.loads(
        (out / "fit.json").read_text())["config"]["freeze_early"]  # on unless switched off
    assert "on 5 held-out ones" in result.output
    result = _fit_cli(teacher_dir, tmp_path / "imgs", tmp_path / "none", "--held-out", "21")
    assert result.exit_code != 0 and "too few to keep 21" in result.output
    assert not (tmp_path / "none").exists()


def test_cli_fit_on_no_images_fails_in_one_line_and_writes_nothing(vit, tmp_path):
    teacher_dir = tmp_path / "teacher"
    hetvit.save(vit, teacher_dir)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    out = tmp_path / "fitted"
    result = CliRunner().invoke(app, ["fit", "--teacher", str(teacher_dir), "--plan", "fast",
                                      "--images", str(tmp_path / "empty"), "--out", str(out)])
    assert result.exit_code == 2
    assert "no images found" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_fit_checks_out_before_any_work(vit, tmp_path):
    teacher_dir = tmp_path / "teacher"
    hetvit.save(vit, teacher_dir)
    (tmp_path / "file").write_text("not a directory")
    result = CliRunner().invoke(app, ["fit", "--teacher", str(teacher_dir), "--plan", "fast",
                                      "--images", str(tmp_path / "missing"),
                                      "--out", str(tmp_path / "file" / "out")])
    assert result.exit_code == 2  # the --out error comes first: the images are not looked at
    assert "is a file, not a directory" in result.output and "Traceback" not in result.output


def test_a_budget_that_does_not_bind_changes_nothing(vit, pool):
    student = hetvit.compress(vit, PLAN, calibration=pool[:16])
    plain = fit(student, vit, pool, FitConfig(passes=2, batch_size=16, seed=1))
    budgeted = fit(student, vit, pool, FitConfig(passes=2, batch_size=16, seed=1, minutes=60))
    # the timed step leaves the model and the seeded streams as they were
    assert all(torch.equal(v, budgeted.state_dict()[k]) for k, v in plain.state_dict().items())
    assert budgeted.hetvit_fit.passes == plain.hetvit_fit.passes == 2
    assert budgeted.hetvit_fit.step_seconds > 0 and plain.hetvit_fit.step_seconds is None


def test_a_budget_cuts_the_passes_to_what_it_affords(vit, pool, monkeypatch):
    student = hetvit.compress(vit, PLAN, calibration=pool[:16])
    monkeypatch.setattr(fitting, "time_one_step", lambda *_: 1.0)  # a known pace: 3 s a pass
    # 11.5 s, less 1.5 s for the closing check (half a step a batch): 3 passes, not 4
    fitted = fit(student, vit, pool, FitConfig(passes=20, batch_size=16, minutes=11.5 / 60))
    assert fitted.hetvit_fit.passes == 3 and fitted.hetvit_fit.steps == 3 * 3
    assert len(fitted.hetvit_fit.loss_per_pass) == 3
    # a budget too small for one pass still runs one: a fit that anneals, not none
    assert fit(student, vit, pool, FitConfig(passes=20, batch_size=16, minutes=1e-4)
               ).hetvit_fit.passes == 1
    config = FitConfig(passes=20, minutes=1.0)
    assert fitting.affordable_passes(config, pace=0.5, steps_per_pass=10, spent=0.0) == 12
    assert fitting.affordable_passes(config, pace=0.5, steps_per_pass=10, spent=30.0) == 6
    assert fitting.affordable_passes(config, pace=0.01, steps_per_pass=10, spent=0.0) == 20
    with pytest.raises(FitError, match="minutes must be positive"):
        FitConfig(minutes=0)


def test_cli_fit_reports_what_its_budget_afforded(vit, tmp_path):
    teacher_dir = tmp_path / "teacher"
    hetvit.save(vit, teacher_dir)
    write_images(tmp_path / "imgs", ["a", "b"], per_class=8)
    out = tmp_path / "fitted"
    result = _fit_cli(teacher_dir, tmp_path / "imgs", out, "--passes", "2", "--batch-size", "8",
                      "--minutes", "30", "--calibration-images", "8")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "fit.json").read_text())
    assert record["passes"] == 2 and record["inputs"]["minutes"] == 30
    assert 29 < record["config"]["minutes"] < 30  # what the fit had left after loading
    assert "afforded 2 of 2 passes" in result.output
    result = _fit_cli(teacher_dir, tmp_path / "imgs", tmp_path / "none", "--minutes", "-1")
    assert result.exit_code == 2 and "Invalid value for '--minutes'" in result.output
    assert not (tmp_path / "none").exists()
