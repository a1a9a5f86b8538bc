"""Issue 22: no silent wrong answers, protected run directories, one-line errors for bad input.

Every case asserts the message and that nothing was written.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

import hetvit
from hetvit.cli import app

from .conftest import write_images

NAMES = ["ant", "bee", "cat", "dog", "eel"]


def small_vit(num_classes: int = 5, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                num_classes=num_classes)
    return VisionTransformer(**{**args, **kwargs}).eval()


def predicts(model: VisionTransformer, index: int) -> VisionTransformer:
    """``model`` made to answer class ``index`` for every image."""
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[index] = 10.0
    return model


def one_line(output: str) -> str:
    return " ".join(output.split())


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- 1. class names are recorded and checked ----------------------------------------------------


def test_checkpoints_record_class_names_and_compress_keeps_them(tmp_path):
    model = small_vit()
    hetvit.save(model, tmp_path / "m", classes=NAMES)
    source = json.loads((tmp_path / "m" / "source.json").read_text())
    assert source["classes"] == NAMES
    loaded = hetvit.load(tmp_path / "m")
    assert loaded.hetvit_classes == NAMES
    student = hetvit.compress(loaded, hetvit.Plan(static=(0,)))
    hetvit.save(student, tmp_path / "s")
    assert hetvit.load(tmp_path / "s").hetvit_classes == NAMES
    with pytest.raises(ValueError, match="4 class names for a model with 5 outputs"):
        hetvit.save(model, tmp_path / "bad", classes=NAMES[:4])
    with pytest.raises(ValueError, match="class names repeat: ant"):
        hetvit.save(model, tmp_path / "bad", classes=["ant"] * 5)
    assert not (tmp_path / "bad").exists()


def test_an_older_checkpoint_without_names_still_loads(tmp_path):
    hetvit.save(small_vit(), tmp_path / "m")
    source = json.loads((tmp_path / "m" / "source.json").read_text())
    del source["classes"]
    (tmp_path / "m" / "source.json").write_text(json.dumps(source))
    assert getattr(hetvit.load(tmp_path / "m"), "hetvit_classes", None) is None


def _evaluate(model_dir: Path, data: Path, *extra: str):
    return CliRunner().invoke(app, ["evaluate", "--checkpoint", str(model_dir), "--data",
                                    str(data), "--json", *extra])


def test_evaluating_a_subset_of_the_classes_says_so_and_scores_by_name(tmp_path):
    hetvit.save(predicts(small_vit(), NAMES.index("dog")), tmp_path / "m", classes=NAMES)
    write_images(tmp_path / "data", ["bee", "dog"], per_class=3)
    with pytest.warns(UserWarning, match="evaluating 2 of the model's 5 classes"):
        result = _evaluate(tmp_path / "m", tmp_path / "data")
    assert result.exit_code == 0, result.output
    # labels follow the names (bee 1, dog 3), not the sorted folders (0, 1): the dogs are right
    assert json.loads(result.stdout)["top1"] == pytest.approx(0.5)


def test_an_unknown_or_renamed_class_folder_is_refused_naming_it(tmp_path):
    hetvit.save(small_vit(), tmp_path / "m", classes=NAMES)
    write_images(tmp_path / "data", ["ant", "zebra"], per_class=1)
    result = _evaluate(tmp_path / "m", tmp_path / "data")
    assert result.exit_code == 2
    assert "not in the model's recorded classes: zebra" in one_line(result.output)
    assert "Traceback" not in result.output
    (tmp_path / "map.txt").write_text("\n".join(reversed(NAMES)) + "\n")
    result = _evaluate(tmp_path / "m", tmp_path / "data", "--class-map",
                       str(tmp_path / "map.txt"), "--skip-unknown")
    assert result.exit_code == 2
    assert "disagrees with the model's recorded classes: class 0 is 'eel'" in one_line(
        result.output)


def test_a_model_without_names_warns_when_the_folders_do_not_match(tmp_path):
    hetvit.save(small_vit(), tmp_path / "m")  # no names, as the older checkpoints
    write_images(tmp_path / "data", ["bee", "dog"], per_class=1)
    with pytest.warns(UserWarning, match="records no class names .* 2 class folders for its 5"):
        result = _evaluate(tmp_path / "m", tmp_path / "data")
    assert result.exit_code == 0, result.output
    write_images(tmp_path / "many", [f"c{i}" for i in range(6)], per_class=1)
    result = _evaluate(tmp_path / "m", tmp_path / "many")
    assert result.exit_code == 2 and "has 6 classes but the model outputs 5" in result.output


def test_the_committed_checkpoints_record_the_cifar10_classes():
    from hetvit.demo import CIFAR10_CLASSES, STUDENT, TEACHER, find_assets

    for name in (TEACHER, STUDENT):
        model = hetvit.load(find_assets() / name)
        assert model.hetvit_classes == CIFAR10_CLASSES
        assert model.pretrained_cfg["num_classes"] == 10


def _config(tmp_path: Path, out: str, **changes):
    from hetvit.training import TrainConfig

    values = dict(data=tmp_path / "data", out=tmp_path / out, epochs=1, batch_size=8,
                  threads=1, progress=False, accelerator="cpu")
    return TrainConfig(**{**values, **changes})


@pytest.fixture
def colours(tmp_path: Path) -> Path:
    from .test_training import write_colours

    return write_colours(tmp_path / "data", per_class=3)


def test_training_records_the_classes_and_finetuning_maps_through_them(tmp_path, colours):
    from hetvit.data import DataError
    from hetvit.training import finetune, train

    from .test_training import NAME, TINY

    teacher_dir = train(NAME, TINY, _config(tmp_path, "teacher"))
    assert hetvit.load(teacher_dir).hetvit_classes == ["c0", "c1", "c2"]
    record = json.loads((tmp_path / "teacher" / "train_config.json").read_text())
    assert record["classes"] == ["c0", "c1", "c2"]
    (colours / "c2").rename(colours / "zebra")  # renamed folders: refused, nothing written
    with pytest.raises(DataError, match="not in the model's recorded classes: zebra"):
        finetune(hetvit.load(teacher_dir), hetvit.Plan(static=(0,)),
                 _config(tmp_path, "student"), calibration_images=0)
    assert not (tmp_path / "student").exists()
    before = listing(tmp_path / "teacher")
    with pytest.raises(DataError, match="not in the model's recorded classes: zebra"):
        train(NAME, TINY, _config(tmp_path, "teacher", epochs=2, resume=True))
    assert listing(tmp_path / "teacher") == before
    assert not (tmp_path / "teacher" / "config_history.jsonl").exists()


# --- 3. run directories are protected ------------------------------------------------------


def test_finetune_refuses_a_foreign_out_before_any_work(tmp_path, colours):
    hetvit.save(small_vit(num_classes=3), tmp_path / "teacher")
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("my notes")
    (out / "epochs.log").write_text("my log\n")
    before = {p: p.read_text() for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["finetune", "--teacher", str(tmp_path / "teacher"),
                                      "--plan", "fast", "--data", str(colours), "--out", str(out),
                                      "--threads", "1", "--accelerator", "cpu"])
    assert result.exit_code == 2
    assert "holds files that are not a hetvit run (epochs.log, model)" in one_line(result.output)
    assert {p: p.read_text() for p in out.rglob("*") if p.is_file()} == before


def test_a_failed_check_leaves_no_run_directory(tmp_path, colours):
    from hetvit.data import DataError
    from hetvit.training import train

    from .test_training import NAME, TINY

    with pytest.raises(DataError, match="fewer than one batch"):
        train(NAME, TINY, _config(tmp_path, "run", batch_size=64))
    assert not (tmp_path / "run").exists()


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_is_refused_naming_its_holder_and_a_stale_one_is_taken_over(tmp_path,
                                                                                colours):
    from hetvit.training import TrainingError, train

    from .test_training import NAME, TINY

    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lock"
    host = socket.gethostname()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": host, "since": "earlier"}))
    with pytest.raises(TrainingError, match=f"in use by another run \\(pid {os.getppid()} on "
                                            f"host {host}.*delete {lock}"):
        train(NAME, TINY, _config(tmp_path, "run"))
    assert listing(out) == [".lock"]
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": host, "since": "earlier"}))
    with pytest.warns(UserWarning, match="taking over the stale lock"):
        train(NAME, TINY, _config(tmp_path, "run"))  # its process is gone: the run goes ahead
    assert (out / "model" / "source.json").is_file() and not lock.exists()


def test_a_resume_with_the_same_settings_adds_no_history(tmp_path, colours):
    from hetvit.training import train

    from .test_training import NAME, TINY

    train(NAME, TINY, _config(tmp_path, "run", scale=(0.6, 1.0)))
    record = (tmp_path / "run" / "train_config.json").read_text()
    train(NAME, TINY, _config(tmp_path, "run", scale=(0.6, 1.0), resume=True))
    assert (tmp_path / "run" / "train_config.json").read_text() == record
    assert not (tmp_path / "run" / "config_history.jsonl").exists()


# --- 4. bad numbers -------------------------------------------------------------------------


@pytest.mark.parametrize("command, flag", [
    ("train", ["--epochs", "-1"]),
    ("train", ["--epochs", "0"]),
    ("train", ["--threads", "0"]),
    ("train", ["--depth", "0"]),
    ("train", ["--num-heads", "0"]),
    ("finetune", ["--epochs", "0"]),
    ("evaluate", ["--limit", "-1"]),
    ("evaluate", ["--threads", "0"]),
    ("compress", ["--num-images", "-1"]),
    ("export", ["--limit", "-1"]),
])
def test_a_bad_number_is_a_one_line_error_before_any_work(tmp_path, command, flag):
    write_images(tmp_path / "data", ["a", "b"], per_class=1)
    hetvit.save(small_vit(num_classes=2), tmp_path / "m")
    out = tmp_path / "out"
    args = {"train": ["--model", "vit_tiny_patch16_224", "--data", str(tmp_path / "data"),
                      "--out", str(out)],
            "finetune": ["--teacher", str(tmp_path / "m"), "--plan", "fast", "--data",
                         str(tmp_path / "data"), "--out", str(out)],
            "evaluate": ["--checkpoint", str(tmp_path / "m"), "--data", str(tmp_path / "data")],
            "compress": ["--checkpoint", str(tmp_path / "m"), "--plan", "fast", "--calibration",
                         str(tmp_path / "data"), "--out", str(out)],
            "export": ["--checkpoint", str(tmp_path / "m"), "--out", str(out)]}[command]
    result = CliRunner().invoke(app, [command, *args, *flag])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag[0]}'" in one_line(result.output)
    assert "Traceback" not in result.output and not out.exists()


def test_the_api_refuses_bad_run_numbers_too(tmp_path, colours):
    from hetvit.training import TrainingError, train

    from .test_training import NAME, TINY

    for change, message in (({"epochs": 0}, "--epochs must be at least 1, got 0"),
                            ({"threads": 0}, "--threads must be at least 1, got 0")):
        with pytest.raises(TrainingError, match=message):
            train(NAME, TINY, _config(tmp_path, "run", **change))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, message", [
    ("static", [0.5], "static layer 0.5 is not a whole number"),
    ("static", [True], "static layer True is not a whole number"),
    ("pyramid", [[1, 4.5]], "pyramid M 4.5 is not a whole number"),
])
def test_a_plan_with_a_fractional_layer_is_refused_not_truncated(tmp_path, field, value,
                                                                 message):
    (tmp_path / "plan.json").write_text(json.dumps({field: value}))
    with pytest.raises(hetvit.PlanError, match=message):
        hetvit.Plan.load(tmp_path / "plan.json")
    result = CliRunner().invoke(app, ["plan", "--model", "vit_tiny_patch16_224", "--img-size",
                                      "32", "--patch-size", "4", "--plan",
                                      str(tmp_path / "plan.json"), "--out",
                                      str(tmp_path / "out.json")])
    assert result.exit_code == 2 and message in one_line(result.output)
    assert not (tmp_path / "out.json").exists()


# --- 2. degenerate models ---------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--model", "vit_tiny_r_s16_p8_224"], "hybrid ViTs are not supported: the tokens come from "
                                           "a CNN stem"),
    (["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "64"],
     "the patch (64x64) is larger than the image (32x32)"),
])
def test_a_model_hetvit_cannot_compress_is_refused_before_anything_is_written(tmp_path, flags,
                                                                              message):
    runner = CliRunner()
    result = runner.invoke(app, ["plan", *flags, "--out", str(tmp_path / "plan.json")])
    assert result.exit_code == 2 and message in one_line(result.output), result.output
    if "--img-size" in flags:  # compress takes no size overrides; bench does
        second = ["bench", *flags, "--out", str(tmp_path / "bench.json")]
    else:
        second = ["compress", *flags, "--plan", "fast", "--out", str(tmp_path / "student")]
    result = runner.invoke(app, second)
    assert result.exit_code == 2 and message in one_line(result.output), result.output
    assert "Traceback" not in result.output and listing(tmp_path) == []


def test_the_api_refuses_degenerate_models(tmp_path):
    from hetvit.surgery import UnsupportedModelError, create_timm_model

    with pytest.raises(UnsupportedModelError, match="no blocks \\(depth 0\\)"):
        hetvit.compress(small_vit(depth=0), hetvit.Plan())
    with pytest.raises(UnsupportedModelError, match="cannot build vit_tiny_patch16_224"):
        create_timm_model("vit_tiny_patch16_224", num_heads=0)
    with pytest.raises(UnsupportedModelError, match="larger than the image"):
        hetvit.save(small_vit(patch_size=64), tmp_path / "m")
    assert listing(tmp_path) == []
