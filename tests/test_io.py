import json
from pathlib import Path

import pytest
import torch

import hetvit
from hetvit.io import CheckpointError
from hetvit.plan import Plan

from .conftest import tiny_vit

PLAN = Plan(static=(0, 1), pyramid=((2, 4),))


@pytest.mark.parametrize("distilled", [False, True])
def test_round_trip_gives_identical_outputs(distilled, tmp_path, images):
    student = hetvit.compress(tiny_vit(distilled=distilled), PLAN, calibration=images)
    with torch.no_grad():  # train a little so that nothing is at its initial value
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.eval()
    hetvit.save(student, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors", "plan.json", "source.json"]
    loaded = hetvit.load(tmp_path / "ckpt")
    assert loaded.hetvit_plan.static == PLAN.static and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images), student(images))


def test_uncompressed_model_round_trip(tmp_path, images):
    model = tiny_vit()
    hetvit.save(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "plan.json").read_text())["static"] == []
    with torch.no_grad():
        assert torch.equal(hetvit.load(tmp_path / "m")(images), model(images))


def test_saved_files_follow_the_umask_not_private_temp_modes(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        hetvit.save(tiny_vit(), tmp_path / "m")
    finally:
        os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "m").iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "plan.json", "source.json"], 0o644)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


def test_truncated_weights_give_a_clear_error(tmp_path):
    hetvit.save(hetvit.compress(tiny_vit(), PLAN), tmp_path / "c")
    w = tmp_path / "c" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is damaged or truncated"):
        hetvit.load(tmp_path / "c")
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        hetvit.load(tmp_path / "c", verify=False)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        hetvit.load(tmp_path / "nothing")
    hetvit.save(tiny_vit(), tmp_path / "c")
    (tmp_path / "c" / "plan.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="plan.json is damaged"):
        hetvit.load(tmp_path / "c")
    (tmp_path / "c" / "plan.json").unlink()
    with pytest.raises(CheckpointError, match="plan.json is missing"):
        hetvit.load(tmp_path / "c")


@pytest.mark.parametrize("edit", ["arch", "plan", "width"])
def test_files_that_parse_but_do_not_fit_name_the_file_at_fault(tmp_path, edit):
    """Hand-edited or mixed-up files: a CheckpointError naming the file, never a traceback."""
    hetvit.save(hetvit.compress(tiny_vit(), PLAN), tmp_path / "c")
    source = json.loads((tmp_path / "c" / "source.json").read_text())
    if edit == "arch":  # timm cannot build it (its assert: width not divisible by heads)
        source["arch"]["num_heads"] = 5
        (tmp_path / "c" / "source.json").write_text(json.dumps(source))
        expected = "source.json"
    elif edit == "plan":  # a layer the model does not have
        (tmp_path / "c" / "plan.json").write_text(json.dumps({"static": [9], "pyramid": []}))
        expected = "plan.json"
    else:  # another width: every weight has the wrong shape
        source["arch"]["embed_dim"] = 64
        (tmp_path / "c" / "source.json").write_text(json.dumps(source))
        expected = "model.safetensors"
    with pytest.raises(CheckpointError) as err:
        hetvit.load(tmp_path / "c", verify=False)
    assert err.value.path.name == expected
    assert len(str(err.value)) < 400


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch, images):
    model = tiny_vit()
    hetvit.save(model, tmp_path / "c")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hetvit.io, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        hetvit.save(hetvit.compress(model, PLAN), tmp_path / "c")
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary left behind
    with torch.no_grad():
        assert torch.equal(hetvit.load(tmp_path / "c")(images), model(images))


def test_a_save_that_fails_at_the_last_rename_keeps_the_old_checkpoint(tmp_path, monkeypatch,
                                                                       images):
    """The earlier checkpoint is moved aside before the new one is renamed into place: if that
    rename fails, it is put back (and a save into new folders takes them away again)."""
    import os

    model = tiny_vit()
    hetvit.save(model, tmp_path / "c")
    rename = os.rename

    def failing(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError("disk gone")
        rename(src, dst)

    monkeypatch.setattr(hetvit.files.os, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        hetvit.save(hetvit.compress(model, PLAN), tmp_path / "c")
    with pytest.raises(OSError, match="disk gone"):
        hetvit.save(model, tmp_path / "new" / "deeper" / "c")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    with torch.no_grad():
        assert torch.equal(hetvit.load(tmp_path / "c")(images), model(images))


def test_save_replaces_a_checkpoint_but_never_a_folder_of_other_files(tmp_path):
    model = tiny_vit()
    hetvit.save(model, tmp_path / "c")
    hetvit.save(hetvit.compress(model, PLAN), tmp_path / "c")  # an earlier checkpoint: replaced
    assert hetvit.load(tmp_path / "c").hetvit_plan.static == PLAN.static
    (tmp_path / "empty").mkdir()
    hetvit.save(model, tmp_path / "empty")  # an empty folder: used
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write"):
        hetvit.save(model, tmp_path / "home")
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="not a directory"):
        hetvit.save(model, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "empty", "file", "home"]


def test_cli_compress_refuses_a_foreign_out_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from hetvit.cli import app

    hetvit.save(tiny_vit(), tmp_path / "teacher")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["compress", "--checkpoint", str(tmp_path / "teacher"),
                                      "--plan", "fast", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "refusing to replace" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
