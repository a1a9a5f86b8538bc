"""Issue 22: no silent wrong answers, protected run directories, one-line errors for bad input.

Every case asserts the message and that nothing was written.
"""

from __future__ import annotations

import json
import os
import re
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
    from hetvit.demo import STUDENT, TEACHER
    from hetvit.demo_inputs import CIFAR10_CLASSES, find_assets

    for name in (TEACHER, STUDENT):
        model = hetvit.load(find_assets() / name)
        assert model.hetvit_classes == CIFAR10_CLASSES
        assert model.pretrained_cfg["num_classes"] == 10


def _config(tmp_path: Path, out: str, **changes):
    from hetvit.configs import TrainConfig

    values = dict(data=tmp_path / "data", out=tmp_path / out, epochs=1, batch_size=8,
                  threads=1, progress=False, accelerator="cpu")
    return TrainConfig(**{**values, **changes})


@pytest.fixture
def colours(tmp_path: Path) -> Path:
    from .test_training import write_colours

    return write_colours(tmp_path / "data", per_class=3)


def test_training_records_the_classes_and_finetuning_maps_through_them(tmp_path, colours):
    from hetvit.data import DataError
    from hetvit.training import finetune_run, train

    from .test_training import NAME, TINY

    teacher_dir = train(NAME, TINY, _config(tmp_path, "teacher"))
    assert hetvit.load(teacher_dir).hetvit_classes == ["c0", "c1", "c2"]
    record = json.loads((tmp_path / "teacher" / "train_config.json").read_text())
    assert record["classes"] == ["c0", "c1", "c2"]
    (colours / "c2").rename(colours / "zebra")  # renamed folders: refused, nothing written
    with pytest.raises(DataError, match="not in the model's recorded classes: zebra"):
        finetune_run(hetvit.load(teacher_dir), hetvit.Plan(static=(0,)),
                     _config(tmp_path, "student"), hetvit.DistillConfig(calibration_images=0))
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


@pytest.mark.parametrize("start", [[], ["--plan", "fast", "--student", "student"]],
                         ids=["neither", "both"])
def test_finetune_needs_one_of_plan_and_student_before_loading_anything(tmp_path, colours,
                                                                        start):
    """Said before the teacher is read: the (missing) teacher is not what is wrong."""
    result = CliRunner().invoke(app, ["finetune", "--teacher", str(tmp_path / "no-teacher"),
                                      "--data", str(colours), "--out", str(tmp_path / "run"),
                                      *start])
    assert result.exit_code == 2, result.output
    assert "give --plan" in one_line(result.output) and "Traceback" not in result.output
    assert "neither" in result.output if not start else "both" in result.output
    assert not (tmp_path / "run").exists()


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
    ("compress", ["--calibration-images", "-1"]),
    ("export", ["--limit", "-1"]),
    ("bench", ["--batch-size", "0"]),
    ("bench", ["--rounds", "0"]),
    ("bench", ["--warmup", "-1"]),
    ("bench", ["--min-time", "-0.5"]),
    ("fit", ["--minutes", "0"]),
    ("fit", ["--trainable", "al"]),
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
            "export": ["--checkpoint", str(tmp_path / "m"), "--out", str(out)],
            "bench": ["--checkpoint", str(tmp_path / "m"), "--plan", "fast", "--out",
                      str(out)],
            "fit": ["--teacher", str(tmp_path / "m"), "--plan", "fast", "--images",
                    str(tmp_path / "data"), "--out", str(out)]}[command]
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
    with pytest.raises(hetvit.errors.PlanError, match=message):
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
    from hetvit.errors import UnsupportedModelError
    from hetvit.hosts.timm import create_timm_model

    with pytest.raises(UnsupportedModelError, match="no blocks \\(depth 0\\)"):
        hetvit.compress(small_vit(depth=0), hetvit.Plan())
    with pytest.raises(UnsupportedModelError, match="cannot build vit_tiny_patch16_224"):
        create_timm_model("vit_tiny_patch16_224", num_heads=0)
    with pytest.raises(UnsupportedModelError, match="larger than the image"):
        hetvit.save(small_vit(patch_size=64), tmp_path / "m")
    assert listing(tmp_path) == []


# --- 5. no silent overwrites, no late failures, no stale temporaries ---------------------------

TINY_PLAN = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "4"]
QUICK_BENCH = [*TINY_PLAN, "--depth", "2", "--batch-size", "2", "--rounds", "1", "--warmup",
               "0", "--min-time", "0", "--threads", "1"]


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_plan_out_refuses_a_foreign_file_replaces_its_own_and_force_overwrites(tmp_path):
    out = tmp_path / "notes.json"
    out.write_text('{"mine": 1}\n')
    result = _invoke("plan", *TINY_PLAN, "--out", str(out))
    assert result.exit_code == 2
    assert (f"{out} exists and is not an earlier output of this command; refusing to overwrite "
            "it: choose another path, or pass --force") in one_line(result.output)
    assert out.read_text() == '{"mine": 1}\n'
    assert _invoke("plan", *TINY_PLAN, "--out", str(out), "--force").exit_code == 0
    assert hetvit.Plan.load(out).label == "fast"
    result = _invoke("plan", *TINY_PLAN, "--plan", "balanced", "--out", str(out))
    assert result.exit_code == 0 and hetvit.Plan.load(out).label == "balanced"  # its own
    assert listing(tmp_path) == ["notes.json"]  # no temporary left


def test_bench_out_refuses_a_foreign_file_before_timing_and_replaces_its_own(tmp_path):
    out = tmp_path / "result.json"
    out.write_text("my results\n")
    result = _invoke("bench", *QUICK_BENCH, "--out", str(out))
    assert result.exit_code == 2 and "pass --force" in one_line(result.output)
    assert "timing" not in result.output and out.read_text() == "my results\n"
    assert _invoke("bench", *QUICK_BENCH, "--out", str(out), "--force").exit_code == 0
    first = json.loads(out.read_text())
    assert _invoke("bench", *QUICK_BENCH, "--out", str(out)).exit_code == 0  # its own result
    assert json.loads(out.read_text())["model"] == first["model"] == "vit_tiny_patch16_224"


def test_export_out_refuses_a_foreign_file_but_replaces_an_earlier_export(tmp_path):
    from hetvit.export import is_onnx_export

    hetvit.save(small_vit(), tmp_path / "m")
    out = tmp_path / "model.onnx"
    out.write_bytes(b"not onnx")
    args = ["export", "--checkpoint", str(tmp_path / "m"), "--out", str(out), "--no-check"]
    result = _invoke(*args)
    assert result.exit_code == 2 and "refusing to overwrite it" in one_line(result.output)
    assert out.read_bytes() == b"not onnx"
    assert _invoke(*args, "--force").exit_code == 0 and is_onnx_export(out)
    assert _invoke(*args).exit_code == 0  # an earlier export is replaced without --force
    assert listing(tmp_path).count("model.onnx") == 1 and not is_onnx_export(tmp_path / "m"
                                                                               / "plan.json")


@pytest.mark.parametrize("command", ["plan", "bench", "export", "analyze"])
def test_an_unwritable_out_is_one_line_naming_it_before_any_work(tmp_path, command):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / ("report" if command == "analyze" else "out.json")
    # a model that does not exist: had the command started its work, it would fail on that
    model = ["--model", "no_such_model"]
    args = {"plan": ["plan", *model, "--out", str(out)],
            "bench": ["bench", *model, "--out", str(out)],
            "export": ["export", "--checkpoint", str(tmp_path / "none"), "--out", str(out),
                       "--no-check"],
            "analyze": ["analyze", *model, "--data", str(tmp_path), "--out", str(out)]}[command]
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert f"cannot write {out}: {tmp_path / 'afile'} is a file, not a directory" in one_line(
        result.output)
    assert "Traceback" not in result.output and ".tmp" not in result.output
    assert listing(tmp_path) == ["afile"]


def test_a_read_only_out_directory_is_refused_before_the_bench(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro and real_access(p, mode))
    out = ro / "result.json"
    result = _invoke("bench", "--model", "no_such_model", "--out", str(out))
    assert result.exit_code == 2
    assert f"cannot write {out}: {ro} is not writable" in one_line(result.output)
    assert listing(tmp_path) == ["ro"]


def _temps(directory: Path, name: str, dead: int) -> dict[str, Path]:
    """One temporary of each kind beside ``name``: of a killed writer, of a live one (this
    test's parent process), an old and a fresh one of an older hetvit, an unrelated file."""
    host = socket.gethostname().replace(".", "-")
    paths = {"dead": directory / f".{name}.{host}-{dead}.abcdefgh.tmp",
             "live": directory / f".{name}.{host}-{os.getppid()}.abcdefgh.tmp",
             "old": directory / f".{name}.abcdefgh.tmp",
             "fresh": directory / f".{name}.ijklmnop.tmp",
             "other host": directory / f".{name}.elsewhere-{dead}.abcdefgh.tmp",
             "unrelated": directory / f".{name}.notes"}
    for path in paths.values():
        path.mkdir(parents=True)
        (path / "chunk").write_bytes(b"x" * 1000)
    day_ago = os.path.getmtime(paths["old"]) - 2 * 24 * 3600
    os.utime(paths["old"], (day_ago, day_ago))
    return paths


def _left(paths: dict[str, Path]) -> set[str]:
    return {kind for kind, p in paths.items() if p.exists()}


def test_stale_temporaries_of_killed_writes_are_cleaned_and_live_ones_kept(tmp_path):
    import tarfile

    from hetvit.archives import extract_archive
    from hetvit.export import temp_beside
    from hetvit.files import sha256

    kept = {"live", "fresh", "other host", "unrelated"}
    dead = _dead_pid()
    beside_export = _temps(tmp_path / "out", "model.onnx", dead)
    temp_beside(tmp_path / "out" / "model.onnx").unlink()  # what an export does first
    assert _left(beside_export) == kept
    beside_save = _temps(tmp_path / "out", "ckpt", dead)
    hetvit.save(small_vit(), tmp_path / "out" / "ckpt")
    assert _left(beside_save) == kept
    write_images(tmp_path / "set", ["a", "b"], per_class=1)
    with tarfile.open(tmp_path / "set.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "set", arcname="set")
    cache = tmp_path / "cache"
    in_cache = _temps(cache, sha256(tmp_path / "set.tar.gz")[:16], dead)
    extract_archive(tmp_path / "set.tar.gz", cache)
    assert _left(in_cache) == kept


# --- 7. API and help paper cuts ----------------------------------------------------------------


def test_compress_takes_a_preset_name_and_an_image_folder(tmp_path):
    write_images(tmp_path / "images", ["a", "b"], per_class=2)
    model = small_vit()
    student = hetvit.compress(model, "fast", calibration=tmp_path / "images")
    assert student.hetvit_plan == hetvit.surgery.preset("fast", model)
    assert student.hetvit_plan.static  # and its static maps were calibrated from the images
    with pytest.raises(hetvit.errors.UsageError,
                       match=r"plan must be a hetvit.Plan, a preset name \(balanced, "
                             r"fast, fastest\) or a plan JSON file, not 'quick'"):
        hetvit.compress(model, "quick")
    with pytest.raises(hetvit.errors.UsageError, match="not 3"):
        hetvit.compress(model, 3)


def test_plan_errors_name_the_plan_file(tmp_path):
    plan = tmp_path / "my-plan.json"
    plan.write_text(json.dumps({"static": [7]}))
    with pytest.raises(hetvit.errors.PlanError, match=f"{plan}: static layer 7 is out of range"):
        hetvit.compress(small_vit(), plan)
    hetvit.save(small_vit(), tmp_path / "m")
    result = _invoke("compress", "--checkpoint", str(tmp_path / "m"), "--plan", str(plan),
                     "--out", str(tmp_path / "s"))
    assert result.exit_code == 2
    assert f"{plan}: static layer 7 is out of range" in one_line(result.output)
    plan.write_text("{static")
    result = _invoke("plan", *TINY_PLAN, "--plan", str(plan))
    assert result.exit_code == 2 and f"{plan}: plan is not valid JSON" in one_line(result.output)
    assert not (tmp_path / "s").exists()


def test_calibration_images_do_not_advise_a_class_map_flag(tmp_path):
    write_images(tmp_path / "images", ["a", "b"], per_class=2)
    (tmp_path / "images" / "classes.txt").write_text("a\nb\n")
    hetvit.save(small_vit(), tmp_path / "m")
    result = _invoke("compress", "--checkpoint", str(tmp_path / "m"), "--plan", "fast",
                     "--calibration", str(tmp_path / "images"), "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert "--class-map" not in result.output


def test_compress_refuses_calibration_images_that_are_all_unreadable(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    for k in range(2):
        (tmp_path / "images" / "a" / f"{k}.png").write_text("not an image")
    hetvit.save(small_vit(), tmp_path / "m")
    result = _invoke("compress", "--checkpoint", str(tmp_path / "m"), "--plan", "fast",
                     "--calibration", str(tmp_path / "images"), "--out", str(tmp_path / "s"))
    assert result.exit_code == 2, result.output
    assert "no readable image" in one_line(result.output) and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_flags_are_shown_as_flags_in_the_help():
    result = CliRunner().invoke(app, ["plan", "--help"], env={"COLUMNS": "200"})
    row = next(line for line in result.output.splitlines() if "--json" in line)
    assert "<bool>" not in row and "Print the plan" in row
    assert "hybrid CNN stems and attention-pooling heads are refused" in one_line(result.output)
    assert "any timm ViT" not in result.output


@pytest.mark.parametrize("args, message", [
    (["fit", "--bogus"], "No such option: --bogus"),
    (["fit"], "Missing option '--plan'"),
    (["fitt"], "No such command 'fitt'"),
])
def test_usage_errors_are_one_line(args, message):
    result = CliRunner().invoke(app, args, prog_name="hetvit", env={"COLUMNS": "200"})
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    command = "hetvit fit" if args[0] == "fit" else "hetvit"
    assert line.startswith(f"error: {message}") and line.endswith(f"(see '{command} --help')")


@pytest.mark.parametrize("command", [[], ["fit"], ["bench"]])
def test_help_in_a_narrow_terminal_is_plain_and_fits(command):
    """typer's boxed help squeezes descriptions to a word a line at 80 columns; there (and in a
    pipe) the help is click's plain layout, every line within the width."""
    narrow = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    wide = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert narrow.exit_code == wide.exit_code == 0
    assert "╭" not in narrow.output and "╭" in wide.output
    assert max(len(line) for line in narrow.output.splitlines()) <= 80
    assert "Options:" in narrow.output and "Show this message" in narrow.output
    if command:
        # one option, its type and the start of its help on one line, as at any width
        assert re.search(r"^  --plan <str> +\w", narrow.output, re.M), narrow.output


def test_no_help_labels_a_flag_as_wanting_a_bool():
    """``--help`` itself and the ``--a/--b`` pairs too: typer's default label is ``<bool>``."""
    import typer

    group = typer.main.get_command(app)
    for name in ["", *group.commands]:
        result = CliRunner().invoke(app, [name, "--help"] if name else ["--help"],
                                    env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "Show this message" in result.output, name
        assert "<bool>" not in result.output, name


def test_export_of_a_weights_file_does_not_advise_model(tmp_path):
    torch.save(small_vit().state_dict(), tmp_path / "weights.pth")
    result = _invoke("export", "--checkpoint", str(tmp_path / "weights.pth"), "--out",
                     str(tmp_path / "m.onnx"), "--no-check")
    assert result.exit_code == 2
    assert "holds weights but not the architecture" in one_line(result.output)
    assert "--model" not in result.output.replace("compress --model", "")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_finetune_checkpoint_points_to_the_runs_model(tmp_path, command):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": {"plan": {"static": [0]}}, "state_dict": {}}, ckpt)
    extra = (["--data", str(tmp_path)] if command == "evaluate" else
             ["--out", str(tmp_path / "m.onnx"), "--no-check"])
    result = _invoke(command, "--checkpoint", str(ckpt), *extra)
    assert result.exit_code == 2
    assert (f"{ckpt} is a hetvit finetune checkpoint, which holds the student's weights but not "
            f"its compressed architecture: use RUN/model ({tmp_path / 'run' / 'model'})"
            ) in one_line(result.output)
    assert listing(tmp_path) == ["run", "run/checkpoints", "run/checkpoints/last.ckpt"]


def test_lightning_info_lines_are_silenced_during_a_run_only(tmp_path, colours, capfd,
                                                             caplog):
    import logging

    from hetvit.trainer import LIGHTNING_INFO_LOGGERS
    from hetvit.training import train

    from .test_training import NAME, TINY

    train(NAME, TINY, _config(tmp_path, "run"))
    err = capfd.readouterr().err + caplog.text
    assert "GPU available" not in err and "Tip:" not in err
    assert all(logging.getLogger(n).level == logging.NOTSET for n in LIGHTNING_INFO_LOGGERS)


def test_version_is_printed_without_a_command():
    from hetvit import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"hetvit {__version__}"


@pytest.mark.parametrize("verb", ["compress", "fit", "finetune"])
def test_an_unknown_aggregation_init_is_refused_before_anything_is_read(tmp_path, verb):
    """The images named do not exist: the flag's error must come first, and nothing is made."""
    args = {"compress": ["--checkpoint", str(tmp_path / "m"), "--calibration",
                         str(tmp_path / "none")],
            "fit": ["--teacher", str(tmp_path / "m"), "--images", str(tmp_path / "none")],
            "finetune": ["--teacher", str(tmp_path / "m"), "--data", str(tmp_path / "none")]}
    result = CliRunner().invoke(app, [verb, *args[verb], "--plan", "fast", "--aggregation-init",
                                      "kmeans", "--out", str(tmp_path / "out")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "one of pool, cluster, not 'kmeans'" in result.output
    assert "not found" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


# --- a user's own timm model, and an --out that is the input ----------------------------------
OWN = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "4",
       "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--num-classes", "5"]


def test_compress_and_fit_build_the_user_s_own_architecture_from_its_options(tmp_path):
    from safetensors.torch import save_file

    model = small_vit()
    save_file(model.state_dict(), str(tmp_path / "own.safetensors"))
    write_images(tmp_path / "imgs", NAMES, per_class=2)
    weights = ["--checkpoint", str(tmp_path / "own.safetensors")]
    r = CliRunner().invoke(app, ["compress", *OWN, *weights, "--plan", "fast", "--out",
                            str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["fit", *OWN, *weights, "--plan", "fast", "--images",
                            str(tmp_path / "imgs"), "--passes", "1", "--batch-size", "4",
                            "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    assert "holds 10 images, fewer than the 2048 asked" in one_line(r.output)
    fitted = hetvit.load(tmp_path / "f")
    # the inherited weights are the user's: the embedding before the first change is theirs
    torch.testing.assert_close(fitted.patch_embed.proj.weight, model.patch_embed.proj.weight)
    record = json.loads((tmp_path / "f" / "fit.json").read_text())
    assert record["inputs"]["calibration_images"] == 10  # all there were, not the 256 asked


def test_weights_of_another_shape_name_the_options_in_one_line(tmp_path):
    from safetensors.torch import save_file

    save_file(small_vit().state_dict(), str(tmp_path / "own.safetensors"))
    r = CliRunner().invoke(app, ["compress", "--model", "vit_tiny_patch16_224", "--checkpoint",
                            str(tmp_path / "own.safetensors"), "--plan", "fast", "--out",
                            str(tmp_path / "c")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    text = one_line(r.output)
    assert "tensors differ in shape" in text and "--embed-dim" in text, text
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("verb", ["compress", "fit"])
def test_an_out_that_is_the_input_model_is_refused_and_the_model_kept(tmp_path, verb):
    hetvit.save(small_vit(), tmp_path / "teacher")
    write_images(tmp_path / "imgs", NAMES, per_class=1)
    before = {p: p.read_bytes() for p in (tmp_path / "teacher").iterdir()}
    source = ["--checkpoint" if verb == "compress" else "--teacher", str(tmp_path / "teacher")]
    extra = [] if verb == "compress" else ["--images", str(tmp_path / "imgs"), "--passes", "1"]
    r = CliRunner().invoke(app, [verb, *source, "--plan", "fast", *extra, "--out",
                            str(tmp_path / "teacher" / ".." / "teacher")])
    assert r.exit_code == 2 and "would replace it" in one_line(r.output), r.output
    assert {p: p.read_bytes() for p in (tmp_path / "teacher").iterdir()} == before


def test_a_teacher_directory_with_model_options_is_refused(tmp_path):
    hetvit.save(small_vit(), tmp_path / "teacher")
    write_images(tmp_path / "imgs", NAMES, per_class=1)
    r = CliRunner().invoke(app, ["fit", "--teacher", str(tmp_path / "teacher"), "--model",
                            "vit_tiny_patch16_224", "--plan", "fast", "--images",
                            str(tmp_path / "imgs"), "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and "not both" in one_line(r.output), r.output
    assert not (tmp_path / "f").exists()


def test_the_api_refuses_no_images_and_calibration_of_another_size():
    model = small_vit()
    with pytest.raises(hetvit.errors.DataError, match="model takes"):
        hetvit.compress(model, "fast", calibration=torch.randn(2, 3, 64, 64))
    student = hetvit.compress(model, "fast")
    with pytest.raises(hetvit.fitting.FitError, match="no images"):
        hetvit.fit(student, model, torch.randn(0, 3, 32, 32))
