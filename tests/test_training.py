"""Training: it learns, it resumes exactly, and its schedule and guards behave."""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from hetvit.configs import TRAIN_OPTIM, DistillConfig, OptimConfig, TrainConfig, TrainingError
from hetvit.data import DataError, make_loader, make_transform, open_dataset
from hetvit.evaluation import evaluate
from hetvit.lightning_modules import TrainModule, warmup_cosine
from hetvit.runs import check_precision, load_checkpoint_model
from hetvit.trainer import fit

# timm's vit_tiny at the tests' tiny size: VisionTransformer(img_size=32, patch_size=8,
# embed_dim=32, depth=2, num_heads=2, num_classes=3)
NAME = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
        "num_classes": 3}
OPTIM_FIELDS = {f.name for f in fields(OptimConfig)}
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def write_colours(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """Solid colours with pixel noise: learnable in a few steps, not trivially constant."""
    rng = np.random.default_rng(seed)
    for c, rgb in enumerate(COLOURS):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-30, 30, (32, 32, 3))
            pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


def config(tmp_path: Path, out: str, **changes) -> TrainConfig:
    values = dict(data=tmp_path / "data", out=tmp_path / out, epochs=2, batch_size=8, lr=3e-3,
                  warmup_epochs=0.5, min_lr=1e-4, threads=1, progress=False,
                  accelerator="cpu", seed=7)
    values.update(changes)
    optim = {k: values.pop(k) for k in OPTIM_FIELDS if k in values}
    return TrainConfig(**values, optim=replace(TRAIN_OPTIM, **optim))


def module(seed: int = 7, mixup: float = 0.0, cutmix: float = 0.0, **kwargs) -> TrainModule:
    L.seed_everything(seed, verbose=False)
    optim = replace(TRAIN_OPTIM, lr=3e-3, warmup_epochs=0.5, min_lr=1e-4, mixup=mixup,
                    cutmix=cutmix)
    return TrainModule(NAME, {**TINY, **kwargs}, optim, seed=seed)


def eval_loss(model: torch.nn.Module, root: Path) -> dict[str, float]:
    ds = open_dataset(root, make_transform(model))
    return evaluate(model, make_loader(ds, batch_size=16))


def test_a_few_steps_lower_the_loss(tmp_path):
    write_colours(tmp_path / "data")
    mod = module()
    before = eval_loss(mod.model, tmp_path / "data")
    fit(mod, config(tmp_path, "run", epochs=3))  # 9 steps
    after = eval_loss(mod.model, tmp_path / "data")
    assert before["loss"] > math.log(3) * 0.8  # starts near chance
    assert after["loss"] < 0.5 * before["loss"]
    assert after["top1"] == 1.0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "run" / "logs").glob("version_*/metrics.csv"))


DEIT_RECIPE = dict(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0)


@pytest.mark.parametrize("recipe", [{}, DEIT_RECIPE], ids=["light", "deit-recipe"])
def test_resume_after_epoch_one_equals_training_straight(tmp_path, recipe):
    write_colours(tmp_path / "data")
    # augmentation, mixing and drop-path all draw random numbers: the resumed run must draw
    # the same
    common = dict(epochs=2, scale=(0.5, 1.0), hflip=0.5, **recipe)
    mixing = {k: v for k, v in recipe.items() if k in ("mixup", "cutmix")}
    make = partial(module, drop_path_rate=0.1, **mixing)

    straight = make()
    fit(straight, config(tmp_path, "straight", **common))

    class StopAfterFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    first = make()
    fit(first, config(tmp_path, "resumed", extra_callbacks=[StopAfterFirstEpoch()], **common))
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3  # stopped after the first of 2 epochs
    assert not all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                     straight.model.state_dict().values(),
                                                     strict=True))

    # as in a new process, a fresh module; perturbed so only the checkpoint explains a match
    second = make()
    with torch.no_grad():
        for p in second.model.parameters():
            p.add_(1.0)
    trainer = fit(second, config(tmp_path, "resumed", resume=True, **common))
    assert trainer.global_step == 6 and trainer.current_epoch == 2

    expected = straight.model.state_dict()
    for key, value in second.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    # the optimizer state went on too (same Adam moments as the straight run)
    opt_a = trainer.optimizers[0].state_dict()["state"]
    straight_ckpt = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt",
                               weights_only=False)
    opt_b = straight_ckpt["optimizer_states"][0]["state"]
    for idx in opt_b:
        torch.testing.assert_close(opt_a[idx]["exp_avg"], opt_b[idx]["exp_avg"], rtol=0,
                                   atol=1e-6)

    rebuilt = load_checkpoint_model(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    for key, value in rebuilt.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)


def test_mixup_blends_images_and_targets_with_one_lambda():
    mod = module(mixup=0.8)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    np.random.seed(3)
    mixed, soft = mod.mix_batch(x.clone(), y)  # timm mixes in place
    lam = soft[0, 0].item()  # image 0 (class 0) is paired with image 5 (class 2)
    assert 0 < lam < 1 and soft[0, 2].item() == pytest.approx(1 - lam)
    torch.testing.assert_close(soft.sum(-1), torch.ones(6))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    # without mixing, batches pass through untouched
    plain = module()
    assert plain.mix_batch(x, y)[0] is x and plain.mix_batch(x, y)[1] is y


def test_cutmix_pastes_a_box_whose_area_is_the_target_weight():
    mod = module(cutmix=1.0)
    x = torch.rand(5, 3, 32, 32) + 1  # odd batch: the last image is dropped
    y = torch.tensor([0, 1, 2, 0, 1])
    np.random.seed(0)
    mixed, soft = mod.mix_batch(x.clone(), y)  # timm mixes in place
    assert mixed.shape[0] == soft.shape[0] == 4
    own, partner = x[:4], x[:4].flip(0)
    from_own = (mixed == own).all(1)  # pixels (all channels) kept from the image itself
    assert (from_own | (mixed == partner).all(1)).all()  # every pixel is one or the other
    lam = soft[1, 1].item()  # image 1 (class 1) with image 2 (class 2)
    assert from_own[1].float().mean().item() == pytest.approx(lam)
    assert 0 < lam < 1


def test_existing_checkpoint_needs_resume_and_resume_needs_a_checkpoint(tmp_path):
    write_colours(tmp_path / "data", per_class=2)
    with pytest.raises(DataError, match="fewer than one batch"):
        fit(module(), config(tmp_path, "run", epochs=1))
    write_colours(tmp_path / "more" / "data", per_class=3)
    tmp_path = tmp_path / "more"
    with pytest.raises(TrainingError, match="no checkpoint"):
        fit(module(), config(tmp_path, "run", resume=True))
    fit(module(), config(tmp_path, "run", epochs=1))
    with pytest.raises(TrainingError, match="--resume"):
        fit(module(), config(tmp_path, "run", epochs=1))


def test_a_mistaken_train_leaves_the_run_record_alone_and_its_ckpt_loads(tmp_path):
    """Forgetting --resume (or mistyping --data) must not rewrite an existing run's record."""
    from hetvit.training import train

    write_colours(tmp_path / "data", per_class=3)
    train(NAME, TINY, config(tmp_path, "run", epochs=1))
    record = (tmp_path / "run" / "train_config.json").read_text()
    with pytest.raises(TrainingError, match="--resume"):
        train(NAME, TINY, config(tmp_path, "run", epochs=5))
    with pytest.raises(DataError, match="not found"):
        train(NAME, TINY, config(tmp_path, "run", epochs=5, resume=True,
                                 data=tmp_path / "typo"))
    assert (tmp_path / "run" / "train_config.json").read_text() == record
    assert not (tmp_path / "run" / "config_history.jsonl").exists()

    # the run's real last.ckpt (optimizer, loops, callbacks inside) loads as a weights file too
    import hetvit
    from hetvit.surgery import load_model

    x = torch.randn(2, 3, 32, 32)
    saved = hetvit.load(tmp_path / "run" / "model")
    from_ckpt = load_model(NAME, tmp_path / "run" / "checkpoints" / "last.ckpt", **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_ckpt(x), saved(x))


def test_a_damaged_run_checkpoint_is_a_clear_error(tmp_path):
    from hetvit.runs import read_run_checkpoint

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    for read in (read_run_checkpoint, load_checkpoint_model):
        with pytest.raises(TrainingError, match="cannot read the checkpoint"):
            read(bad)
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, bad)
    with pytest.raises(TrainingError, match="not a hetvit train checkpoint"):
        load_checkpoint_model(bad)


def test_warmup_then_cosine_schedule():
    values = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.01) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    # half-way through the cosine part the factor is the mean of the ends
    assert values[12] == pytest.approx((1 + 0.01) / 2)
    assert values[20] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))


def test_unavailable_precision_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only message")
    with pytest.raises(TrainingError, match="16-mixed needs a CUDA GPU"):
        check_precision("16-mixed", "auto")
    with pytest.raises(TrainingError, match="precision must be one of"):
        check_precision("8-bit", "cpu")
    check_precision("bf16-mixed", "cpu")


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_finetune_trains_every_part_of_the_student_and_writes_a_loadable_model(tmp_path,
                                                                            guidance):
    """Static maps and pooling learn from the task loss too, not only from the guidance."""
    import hetvit
    from hetvit.aggregation import TokenAggregation
    from hetvit.plan import Plan
    from hetvit.training import finetune_run

    write_colours(tmp_path / "data")
    teacher = module().model.eval().requires_grad_(False)  # a frozen teacher, as users keep one
    plan = Plan(static=(0,), pyramid=((1, 4),))
    runs = {}
    for lr in (0.0, 3e-3):
        out = f"ft-{lr}"
        path = finetune_run(teacher, plan, config(tmp_path, out, epochs=1, lr=lr, min_lr=0.0),
                            DistillConfig(guidance=guidance, calibration_images=8))
        runs[lr] = hetvit.load(path)
    start, tuned = runs[0.0], runs[3e-3]
    assert (tuned.hetvit_plan.static, tuned.hetvit_plan.pyramid) == (plan.static, plan.pyramid)
    agg = [n for n, m in tuned.named_modules() if isinstance(m, TokenAggregation)]
    moved = {n for n, p in tuned.named_parameters()
             if not torch.equal(p, start.get_parameter(n))}
    assert "blocks.0.attn.logits" in moved and f"{agg[0]}.weight" in moved
    assert "head.weight" in moved


def test_resuming_with_other_settings_keeps_the_earlier_ones(tmp_path):
    from hetvit.runs import write_run_config

    path = tmp_path / "train_config.json"
    write_run_config(path, {"epochs": 16, "resume": False})
    write_run_config(path, {"epochs": 16, "resume": True})  # same run, resumed: no history
    assert not (tmp_path / "config_history.jsonl").exists()
    write_run_config(path, {"epochs": 24, "resume": True})
    assert json.loads(path.read_text()) == {"epochs": 24, "resume": True}
    history = [json.loads(line) for line in
               (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [h["settings"] for h in history] == [{"epochs": 16, "resume": False}]


def test_cli_train_then_finetune_pass_every_shared_option_through(tmp_path):
    """train and finetune share their run options (one definition spliced into both)."""
    from typer.testing import CliRunner

    import hetvit
    from hetvit.cli import app

    write_colours(tmp_path / "data", per_class=4)
    shared = ["--batch-size", "6", "--weight-decay", "0.01", "--label-smoothing", "0.2",
              "--scale-min", "0.9", "--hflip", "0.0", "--workers", "0", "--threads", "1",
              "--seed", "5", "--accelerator", "cpu", "--limit-train-batches", "2",
              "--limit-val-batches", "1", "--auto-augment", "rand-m9-mstd0.5-inc1",
              "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0"]
    expected = {"batch_size": 6, "weight_decay": 0.01, "label_smoothing": 0.2, "scale": [0.9, 1.0],
                "hflip": 0.0, "threads": 1, "seed": 5, "accelerator": "cpu",
                "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8,
                "cutmix": 1.0,
                "limit_train_batches": 2, "limit_val_batches": 1, "resume": False}
    runner = CliRunner()
    sizes = ["--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "2",
             "--num-heads", "2", "--num-classes", "3"]
    result = runner.invoke(app, ["train", "--model", NAME, *sizes, "--data", str(tmp_path / "data"),
                                 "--val-data", str(tmp_path / "data"), "--epochs", "1",
                                 "--out", str(tmp_path / "teacher"), *shared])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "teacher" / "train_config.json").read_text())
    assert {k: written[k] for k in expected} == expected
    assert written["epochs"] == 1 and written["model_kwargs"]["embed_dim"] == 32

    result = runner.invoke(app, ["finetune", "--teacher", str(tmp_path / "teacher" / "model"),
                                 "--plan", "fast", "--data", str(tmp_path / "data"), "--epochs",
                                 "1", "--calibration-images", "4", "--features", "0.5",
                                 "--aggregation-init", "cluster",
                                 "--out", str(tmp_path / "ft"), *shared])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "ft" / "finetune_config.json").read_text())
    assert {k: written[k] for k in expected} == expected
    assert written["calibration_images"] == 4 and written["features"] == 0.5
    assert written["aggregation_init"] == "cluster"
    assert hetvit.load(tmp_path / "ft" / "model").hetvit_plan.static


@pytest.mark.parametrize("flags, message", [
    (["--auto-augment", "rand-q9"], "--auto-augment 'rand-q9'"),
    (["--mixup", "-1"], "--mixup must be >= 0"),
    (["--reprob", "1.5"], "--reprob is a probability"),
    (["--hflip", "2"], "--hflip is a probability"),
    (["--scale-min", "0"], "--scale-min is an area fraction"),
    (["--accelerator", "tpu"], "--accelerator must be one of"),
    (["--limit-train-batches", "-1"], "--limit-train-batches is a batch count"),
    (["--limit-val-batches", "1.5"], "--limit-val-batches is a batch count"),
])
def test_cli_train_refuses_a_bad_setting_before_writing(tmp_path, flags, message):
    from typer.testing import CliRunner

    from hetvit.cli import app

    write_colours(tmp_path / "data", per_class=2)
    result = CliRunner().invoke(app, [
        "train", "--model", NAME, "--img-size", "32", "--patch-size", "8", "--num-classes", "3",
        "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *flags])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_cli_train_reports_a_batch_limit_that_leaves_nothing(tmp_path):
    from typer.testing import CliRunner

    from hetvit.cli import app

    write_colours(tmp_path / "data", per_class=2)
    result = CliRunner().invoke(app, [
        "train", "--model", NAME, "--img-size", "32", "--patch-size", "8", "--embed-dim", "32",
        "--depth", "2", "--num-heads", "2", "--num-classes", "3", "--data", str(tmp_path / "data"),
        "--val-data", str(tmp_path / "data"), "--limit-val-batches", "0.1", "--batch-size", "2",
        "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "limit_val_batches" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "model").exists()


def test_train_from_init_weights_starts_from_them(tmp_path):
    import hetvit
    from hetvit.training import train

    write_colours(tmp_path / "data")
    first = train(NAME, TINY, config(tmp_path, "first", epochs=1))
    still = dict(epochs=1, lr=0.0, min_lr=0.0)  # no step moves a weight: what loads is kept
    for init in (first, tmp_path / "first" / "checkpoints" / "last.ckpt"):
        out = f"from-{init.name}"
        second = train(NAME, TINY, config(tmp_path, out, **still), init=init)
        expected = hetvit.load(first).state_dict()
        for key, value in hetvit.load(second).state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
        written = json.loads((tmp_path / out / "train_config.json").read_text())
        assert written["init"] == str(init)
    with pytest.raises(hetvit.errors.CheckpointError, match="does not fit the model"):
        train(NAME, {**TINY, "embed_dim": 64}, config(tmp_path, "wide", epochs=1), init=first)


def test_finetune_from_a_given_student_starts_from_its_weights(tmp_path):
    """`finetune(student=...)` (e.g. a fitted model) continues from it: at lr 0 the result is
    the student itself, and a student of another teacher is refused before anything is written."""
    import hetvit
    from hetvit.fitting import FitError, FitRecord
    from hetvit.plan import Plan
    from hetvit.training import finetune_run

    write_colours(tmp_path / "data")
    teacher = module().model.eval()
    student = hetvit.compress(teacher, Plan(static=(0,), pyramid=((1, 4),)))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not what compress alone would give
    student.hetvit_fit = FitRecord(config={}, images=8, steps=1, seconds=0.0)
    path = finetune_run(teacher, None, config(tmp_path, "ft", epochs=1, lr=0.0, min_lr=0.0),
                        student=student)
    tuned = hetvit.load(path)
    assert tuned.hetvit_plan.pyramid == student.hetvit_plan.pyramid
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in tuned.state_dict().items())
    assert not (path / "fit.json").exists()  # the fit made the start, not the fine-tuned model
    other = hetvit.compress(module(embed_dim=64).model, Plan(static=(0,)))
    with pytest.raises(FitError, match="does not match the student's source"):
        finetune_run(teacher, None, config(tmp_path, "ft2", epochs=1), student=other)
    assert not (tmp_path / "ft2").exists()


def test_validation_batches_mix_the_classes(tmp_path):
    """`--limit-val-batches` must score a sample of every class, not the first folders: the
    validation loader draws the images in a fixed random order."""
    from hetvit.trainer import open_run_data

    write_colours(tmp_path / "data", per_class=8)
    cfg = config(tmp_path, "run", val_data=tmp_path / "data", batch_size=4)
    data = open_run_data(module(), cfg)
    first = next(iter(data.val_loader))[1]  # 8 images: class-sorted, it would be one class
    assert len(set(first.tolist())) > 1
    labels = torch.cat([y for _, y in data.val_loader]).tolist()
    assert sorted(labels) == sorted(data.val_set.targets)  # every image, once
    again = torch.cat([y for _, y in open_run_data(module(), cfg).val_loader]).tolist()
    assert labels == again  # the same order every run
