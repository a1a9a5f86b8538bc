"""``hetvit analyze``: bad flags end in one line naming the flag, before any work; flat image
folders are read, since the analysis uses no labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import hetvit
from hetvit.cli import app
from hetvit.errors import AnalysisError
from hetvit.recommend import check_settings, explain_plan, recommend

from .conftest import tiny_vit, write_images
from .test_patterns import RANK, SIM, synthetic_report

WIDE = {"COLUMNS": "200"}  # typer's error box would wrap a long message at 80 columns


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained-looking ViT saved as a hetvit checkpoint directory."""
    model = tiny_vit()
    with torch.no_grad():
        model.norm.weight.add_(0.1)  # not at its initial value: no "untrained" warning
    path = tmp_path_factory.mktemp("analyze") / "model"
    hetvit.save(model, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("analyze") / "data"
    write_images(root, ["a", "b"], per_class=3)
    return root


def analyze(checkpoint: Path, data: Path, *args: str):
    return CliRunner().invoke(app, ["analyze", "--checkpoint", str(checkpoint), "--data",
                                    str(data), "--batch-size", "4", *args], env=WIDE)


def assert_clean_error(result, *needles: str) -> str:
    """Exit status 2 with no traceback, and one line of the output holding every needle."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize(("flag", "value", "bound"), [
    ("--workers", "-1", "0"),
    ("--rank-images", "0", "1"),
    ("--num-images", "1", "2"),
])
def test_out_of_range_counts_are_refused_by_the_parser(checkpoint, images, flag, value, bound):
    # --workers -1 reached DataLoader (a ValueError traceback); --rank-images 0 was refused
    # by analyze() as "rank_images", after the model was loaded.
    result = analyze(checkpoint, images, "--num-images", "4", flag, value)
    line = assert_clean_error(result, f"'{flag}'")
    assert "Invalid value" in line and bound in line


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--recommend-speedup", "-2", "--recommend-speedup must be positive, got -2.0"),
    ("--recommend-speedup", "0", "--recommend-speedup must be positive, got 0.0"),
    ("--max-static", "-3", "--max-static must be >= 0, got -3"),
    ("--similarity", "1.5", "--similarity must be in (0, 1], got 1.5"),
    ("--similarity", "0", "--similarity must be in (0, 1], got 0.0"),
])
def test_recommend_settings_are_refused_before_the_data_is_opened(tmp_path, checkpoint, flag,
                                                                  value, message):
    # --data does not exist: the flag's error must come first, as it does before the minutes
    # an analysis of real data takes; and nothing is written.
    out = tmp_path / "report"
    result = analyze(checkpoint, tmp_path / "missing", "--out", str(out), flag, value)
    assert_clean_error(result, message)
    assert "not found" not in result.output
    assert not out.exists()


def test_recommend_keeps_its_own_checks_under_its_parameter_names():
    report = synthetic_report(SIM, RANK)
    with pytest.raises(AnalysisError, match=r"^similarity must be in \(0, 1\], got 1.5$"):
        recommend(report, similarity=1.5)
    with pytest.raises(AnalysisError, match=r"^speedup must be positive, got nan$"):
        recommend(report, speedup=float("nan"))
    with pytest.raises(AnalysisError, match=r"^similarity must be in \(0, 1\], got -0.1$"):
        explain_plan(report, hetvit.Plan(), similarity=-0.1)
    with pytest.raises(AnalysisError, match=r"^--top must be >= 0, got -1$"):
        check_settings(max_static=-1, names={"max_static": "--top"})
    check_settings(2.0, 0, 1.0)  # the edges that make sense pass


def test_a_flat_folder_of_images_is_analysed(tmp_path, checkpoint):
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(2)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            flat / f"{i}.png")
    out = tmp_path / "report"
    result = analyze(checkpoint, flat, "--num-images", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "sub-folder" not in result.output
    assert json.loads((out / "patterns.json").read_text())["num_images"] == 4


def test_demo_help_names_the_fitted_plan_and_the_rounding():
    result = CliRunner().invoke(app, ["demo", "--help"], env=WIDE)
    text = " ".join(result.output.split())
    assert "pyramid-2.5x student fitted without labels" in text
    assert "fast student fitted" not in text
    assert "rounded down to a multiple of 10" in text
