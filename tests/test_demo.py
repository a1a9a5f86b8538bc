"""The demo: its report agrees with direct measurements, and broken inputs fail cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset
from typer.testing import CliRunner

import hetvit
from hetvit.cli import app
from hetvit.data import make_loader, make_transform, open_dataset
from hetvit.demo import CIFAR10_CLASSES, STUDENT, TEACHER, DemoError, run, sample_indices
from hetvit.evaluate import evaluate
from hetvit.flops import formula_macs
from hetvit.plan import Plan
from hetvit.surgery import describe

from .conftest import tiny_vit, write_images


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """A tiny teacher (norms moved off their init, so it reads as trained) and its student."""
    teacher = tiny_vit()
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.mul_(1.1)
    root = tmp_path / "assets"
    hetvit.save(teacher, root / TEACHER)
    student = hetvit.compress(teacher, Plan(static=(0,), pyramid=((2, 4),), label="fast"),
                              calibration=torch.randn(4, 3, 32, 32))
    hetvit.save(student, root / STUDENT)
    return root


@pytest.fixture
def cifar(tmp_path: Path) -> Path:
    write_images(tmp_path / "cifar" / "test", CIFAR10_CLASSES, per_class=3)
    return tmp_path / "cifar"


def _run(out: Path, assets: Path, images: Path, **kw):
    return run(out, assets=assets, images=images, eval_images=20, analysis_images=8,
               bench_rounds=2, bench_time=0.01, progress=False, log=lambda line: None, **kw)


def test_sample_takes_the_first_images_of_each_class():
    targets = [0, 0, 0, 1, 1, 2, 0, 2, 2, 2]
    assert sample_indices(targets, 2) == [0, 1, 3, 4, 5, 7]


def test_report_holds_what_direct_measurements_give(tmp_path, assets, cifar):
    result = _run(tmp_path / "report", assets, cifar)
    out = tmp_path / "report"
    assert {p.name for p in out.iterdir()} == {"report.md", "summary.png", "analysis"}
    assert (out / "analysis" / "similarity.png").stat().st_size > 0
    saved = json.loads((out / "analysis" / "patterns.json").read_text())
    assert saved["num_images"] == 8

    teacher, student = hetvit.load(assets / TEACHER), hetvit.load(assets / STUDENT)
    ds = open_dataset(cifar, make_transform(teacher))
    loader = make_loader(Subset(ds, sample_indices(ds.targets, 2)), batch_size=7)
    for name, model in (("teacher", teacher), ("student", student)):
        assert result.accuracy[name] == pytest.approx(evaluate(model, loader))
        assert result.accuracy[name]["n"] == 20
    assert result.plan == student.hetvit_plan
    report = (out / "report.md").read_text()
    assert f"| teacher | {100 * result.accuracy['teacher']['top1']:.1f}% |" in report
    assert f"**{result.bench.speedup:.2f}x**" in report
    sim = np.asarray(saved["similarity"]).mean(axis=1)  # the measured premise, as numbers
    assert f"similarity (mean over heads): {sim[0]:.2f} at layer 0" in report
    arch = describe(teacher)
    assert result.bench.gmac_reduction == pytest.approx(
        formula_macs(arch) / formula_macs(arch, result.plan))


def _damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("breakage", ["truncated weights", "missing plan"])
def test_broken_asset_names_the_file_and_keeps_the_old_report(tmp_path, assets, cifar, breakage):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("old report\n")
    if breakage == "truncated weights":
        broken = assets / STUDENT / "model.safetensors"
        _damage(broken)
    else:
        broken = assets / TEACHER / "plan.json"
        broken.unlink()
    with pytest.raises(DemoError) as err:
        _run(out, assets, cifar)
    assert broken.name in str(err.value) and "restore" in str(err.value)
    assert (out / "report.md").read_text() == "old report\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []


def test_failure_mid_run_leaves_no_report(tmp_path, assets, cifar, monkeypatch):
    import hetvit.bench

    def broken_compare(*a, **k):
        raise RuntimeError("benchmark failed")

    monkeypatch.setattr(hetvit.bench, "compare", broken_compare)
    with pytest.raises(RuntimeError, match="benchmark failed"):
        _run(tmp_path / "report", assets, cifar)
    assert list(tmp_path.glob("*report*")) == []


def test_wrong_or_missing_images_are_clear_errors(tmp_path, assets):
    with pytest.raises(DemoError, match="--images"):
        _run(tmp_path / "r", assets, tmp_path / "nowhere.tar.gz")
    write_images(tmp_path / "other", ["cats", "dogs"], per_class=1)
    with pytest.raises(DemoError, match="CIFAR-10 classes"):
        _run(tmp_path / "r", assets, tmp_path / "other")


def test_cli_reports_a_missing_asset_without_a_traceback(tmp_path, assets, cifar):
    (assets / STUDENT / "model.safetensors").unlink()
    result = CliRunner().invoke(app, ["demo", "--assets", str(assets), "--images", str(cifar),
                                      "--out", str(tmp_path / "r"), "--eval-images", "20"])
    assert result.exit_code == 2
    assert "model.safetensors is missing" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_a_foreign_out_folder_is_refused_before_any_work(tmp_path, assets, cifar, monkeypatch):
    import hetvit.patterns

    def no_analysis(*a, **k):
        raise AssertionError("the demo worked before checking --out")

    monkeypatch.setattr(hetvit.patterns, "analyze", no_analysis)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("mine\n")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        _run(out, assets, cifar)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
