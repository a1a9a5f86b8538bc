"""ONNX export: parity with PyTorch, a q/k-free graph for static layers, and clean failures."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import hetvit
from hetvit import export as ex
from hetvit.cli import app
from hetvit.plan import Plan

from .conftest import tiny_vit

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

# 4x4 grid at 32/8: layers 0 and 1 static on 17 tokens, then 16 -> 8 patch tokens before layer 2.
PLAN = Plan(static=(0, 1), pyramid=((2, 8),))


@pytest.fixture
def student(images) -> torch.nn.Module:
    model = hetvit.compress(tiny_vit(), PLAN, calibration=images)
    with torch.no_grad():  # move off the initial values so the comparison means something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def checkpoint(student, tmp_path):
    return hetvit.save(student, tmp_path / "ckpt")


def onnx_files(directory) -> list[str]:
    """Every .onnx file or temporary export left in ``directory``."""
    return sorted(p.name for p in directory.rglob("*") if ".onnx" in p.name)


# ----------------------------------------------------------------------------- parity
def test_export_matches_torch_with_a_dynamic_batch(student, tmp_path):
    result = hetvit.export_onnx(student, tmp_path / "m.onnx", opset=17)
    assert result.passed and result.path.is_file()
    assert result.parity[0].images == 8 and result.parity[0].max_abs_diff <= 1e-4
    session = ex.ort_session(result.path)
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]  # static
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        out = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = student(x).numpy()
        assert out.shape == (batch, 10)
        assert np.abs(out - ref).max() <= 1e-4
        assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert student.training is False


def test_export_keeps_the_training_mode_and_drops_teacher_guidance(student, tmp_path):
    static = student.blocks[0].attn
    guide = torch.rand(2, 2, 17, 17).softmax(-1)
    static.guide, static.mix = guide, 0.5
    student.train()
    result = hetvit.export_onnx(student, tmp_path / "m.onnx", batch_size=2)
    assert result.passed
    assert student.training and static.guide is guide and static.mix == 0.5
    static.guide, static.mix = None, 0.0
    student.eval()
    x = torch.randn(3, 3, 32, 32)
    out = ex.ort_session(result.path).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(out - student(x).numpy()).max() <= 1e-4


def test_ort_runner_takes_tensors_and_arrays(student):
    run = ex.ort_runner(student, batch_size=2, threads=1)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = student(x).numpy()
    assert np.abs(run(x) - ref).max() <= 1e-4
    assert np.abs(run(x.numpy()) - ref).max() <= 1e-4


# ----------------------------------------------------------------------------- the graph
def test_static_layers_have_no_attention_matmul(student, tmp_path):
    compressed = hetvit.export_onnx(student, tmp_path / "c.onnx", check=False)
    assert compressed.matmuls == {0: 0, 1: 0, 2: 2, 3: 2}
    baseline = hetvit.export_onnx(tiny_vit(), tmp_path / "b.onnx", check=False)
    assert baseline.matmuls == {0: 2, 1: 2, 2: 2, 3: 2}


def test_static_map_is_a_constant_initializer(student, tmp_path):
    import onnx
    from onnx import numpy_helper

    hetvit.export_onnx(student, tmp_path / "c.onnx", check=False)
    graph = onnx.load(str(tmp_path / "c.onnx")).graph
    maps = [numpy_helper.to_array(t) for t in graph.initializer if list(t.dims) == [2, 17, 17]]
    assert len(maps) == 2  # one per static layer; the logits parameters are not shipped
    expected = [student.blocks[i].attn.static_map().detach().numpy() for i in (0, 1)]
    for got in maps:
        assert any(np.allclose(got, e, atol=1e-7) for e in expected)
    assert not any(t.name.endswith("logits") for t in graph.initializer)


# ----------------------------------------------------------------------------- failures
def test_a_failed_export_leaves_no_file(student, tmp_path, monkeypatch):
    def broken(model, path, opset, batch_size):
        path.write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(ex, "_write_onnx", broken)
    with pytest.raises(ex.ExportError, match="exporter crashed"):
        hetvit.export_onnx(student, tmp_path / "m.onnx")
    assert onnx_files(tmp_path) == []


def test_a_failed_parity_check_writes_nothing(student, tmp_path):
    with pytest.raises(ex.ParityError, match="nothing was written") as info:
        hetvit.export_onnx(student, tmp_path / "m.onnx", atol=1e-12)
    assert not info.value.result.passed and info.value.result.parity[0].max_abs_diff > 0
    assert onnx_files(tmp_path) == []


def test_api_rejects_unsupported_opsets_and_half_precision(student, tmp_path):
    for opset in (13, ex.MAX_OPSET + 1):
        with pytest.raises(ex.ExportError, match=f"opset {opset} is not supported: .* 17 to"):
            hetvit.export_onnx(student, tmp_path / "m.onnx", opset=opset)
    with pytest.raises(ex.ExportError, match="float32"):
        hetvit.export_onnx(student.half(), tmp_path / "m.onnx")
    assert onnx_files(tmp_path) == []


# ----------------------------------------------------------------------------- the CLI
runner = CliRunner()


def test_cli_exports_and_prints_parity(checkpoint, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    out = tmp_path / "out" / "model.onnx"
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--format", "onnx",
                              "--out", str(out), "--images", str(images)])
    assert res.exit_code == 0, res.output
    assert "random images: 8 images" in res.output and "top-1 agree 8/8: ok" in res.output
    assert "real images: 5 images" in res.output and "top-1 agree 5/5: ok" in res.output
    assert out.is_file() and onnx_files(tmp_path) == ["model.onnx"]


def test_cli_parity_failure_exits_non_zero(checkpoint, tmp_path):
    out = tmp_path / "model.onnx"
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out),
                              "--atol", "1e-12"])
    assert res.exit_code == 1
    assert "FAILED" in res.output and "nothing was written" in res.output
    assert onnx_files(tmp_path) == []


def test_cli_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notckpt").mkdir()
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "notckpt"),
                              "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2
    assert "is not a hetvit checkpoint directory" in res.output
    assert onnx_files(tmp_path) == []


@pytest.mark.parametrize("where", ["under_a_file", "a_directory"])
def test_cli_rejects_an_unwritable_output(checkpoint, tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "afile").write_text("")
        out, message = tmp_path / "afile" / "m.onnx", "is a file, not a directory"
    else:
        out, message = tmp_path, "it is a directory"
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert res.exit_code == 2
    assert "cannot write" in res.output and message in res.output
    assert onnx_files(tmp_path) == []


def test_cli_without_onnxruntime(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    out = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert res.exit_code == 2
    assert "onnxruntime is not installed" in res.output and "--no-check" in res.output
    assert onnx_files(tmp_path) == []
    # Exporting without the check does not need onnxruntime.
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out),
                              "--no-check"])
    assert res.exit_code == 0, res.output
    assert "parity not checked" in res.output and out.is_file()


def test_cli_rejects_other_formats(checkpoint, tmp_path):
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--format", "tflite",
                              "--out", str(tmp_path / "m.tflite")])
    assert res.exit_code == 2 and "unsupported export format 'tflite'" in res.output


# ----------------------------------------------------------------------------- nothing left
def tree(directory) -> list[str]:
    """Every file and folder under ``directory``, relative to it."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_a_failed_api_export_removes_the_folders_it_made(student, tmp_path):
    (tmp_path / "kept").mkdir()
    before = tree(tmp_path)
    with pytest.raises(ex.ParityError):
        hetvit.export_onnx(student, tmp_path / "kept" / "new" / "newer" / "m.onnx", atol=1e-12)
    assert tree(tmp_path) == before  # "kept" existed before: it stays


def test_a_failed_cli_export_leaves_the_filesystem_as_it_was(checkpoint, tmp_path, monkeypatch):
    from hetvit import quantize as hq

    out = tmp_path / "runs" / "e1" / "m.onnx"
    before = tree(tmp_path)

    def fails(*args: str, code: int, message: str) -> None:
        res = runner.invoke(app, ["export", "--out", str(out), *args])
        assert res.exit_code == code, res.output
        assert message in " ".join(res.output.split())
        assert tree(tmp_path) == before

    # before the checkpoint is read, after it is read, and after the temporary is written
    fails("--checkpoint", str(tmp_path / "nope"), code=2, message="checkpoint not found")
    fails("--checkpoint", str(checkpoint), "--images", str(tmp_path / "none"), code=2,
          message="cannot read images from")
    fails("--checkpoint", str(checkpoint), "--opset", "99", code=2,
          message="opset 99 is not supported")
    fails("--checkpoint", str(checkpoint), "--atol", "1e-12", code=1,
          message="nothing was written")
    other = hetvit.compress(tiny_vit(), PLAN)  # the int8 graph of another model disagrees
    real_export = hq.export_onnx
    monkeypatch.setattr(hq, "export_onnx", lambda model, path, **kw: real_export(other, path,
                                                                                 **kw))
    fails("--checkpoint", str(checkpoint), "--quantize", "int8", code=1,
          message="nothing was written")


def test_a_bug_in_an_export_keeps_its_traceback(checkpoint, tmp_path, monkeypatch):
    def buggy(*args, **kwargs):
        raise TypeError("a bug, not bad input")

    monkeypatch.setattr(ex, "export_onnx", buggy)
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out",
                              str(tmp_path / "out" / "m.onnx")])
    assert isinstance(res.exception, TypeError)  # raised, not turned into "error: ..."
    assert "error:" not in res.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("quantize, exclude, check", [
    ("int4", None, True), (None, "softmax", True), ("int8", None, False)])
def test_bad_quantization_options_are_usage_errors(quantize, exclude, check):
    from hetvit.cli.deploy import _quantization_config
    from hetvit.errors import UsageError

    with pytest.raises(UsageError):  # a HetvitError, as user errors are; not a bare ValueError
        _quantization_config(quantize, None, 0.98, None, exclude, check)
