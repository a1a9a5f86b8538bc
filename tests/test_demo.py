"""The demo: its report agrees with direct measurements, and broken inputs fail cleanly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset
from typer.testing import CliRunner

import hetvit
from hetvit.baselines import tome
from hetvit.cli import app
from hetvit.data import make_loader, make_transform, open_dataset
from hetvit.demo import FITTED, STUDENT, TEACHER, TOME_R, TOME_SCHEDULE, DemoError, run, tome_name
from hetvit.demo_inputs import CIFAR10_CLASSES, sample_indices
from hetvit.evaluation import evaluate
from hetvit.flops import formula_macs
from hetvit.plan import Plan
from hetvit.surgery import describe

from .conftest import tiny_vit, write_images


def _teacher() -> torch.nn.Module:
    """A tiny teacher, its norms moved off their init so that it reads as trained."""
    teacher = tiny_vit()
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.mul_(1.1)
    return teacher


def _make_assets(root: Path) -> Path:
    """A tiny teacher, its student and a fitted student (a real fit, on 8 noise images).

    One thread: tiny ops on two threads stall for milliseconds each on a shared, busy CPU.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _save_assets(root)
    finally:
        torch.set_num_threads(previous)


def _save_assets(root: Path) -> Path:
    teacher = _teacher()
    hetvit.save(teacher, root / TEACHER)
    plan = Plan(static=(0,), pyramid=((2, 4),), label="fast")
    student = hetvit.compress(teacher, plan, calibration=torch.randn(4, 3, 32, 32))
    hetvit.save(student, root / STUDENT)
    fitted = hetvit.fit(student, teacher, torch.randn(8, 3, 32, 32),
                        hetvit.FitConfig(passes=2, batch_size=4, mixup=0.5, temperature=2.0))
    hetvit.save(fitted, root / FITTED)
    return root


def _make_cifar(root: Path) -> Path:
    write_images(root / "test", CIFAR10_CLASSES, per_class=3)
    return root


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    return _make_assets(tmp_path / "assets")


@pytest.fixture
def cifar(tmp_path: Path) -> Path:
    return _make_cifar(tmp_path / "cifar")


def _busy_load(busy: bool) -> float:
    return (os.cpu_count() or 1) * 0.5 + 1.0 if busy else 0.0


def _demo_run(root: Path, busy: bool, tome_r: int = TOME_R, slow_teacher_beside_tome=False):
    """One demo on fresh tiny inputs under ``root``, with the load average made to read
    ``_busy_load(busy)``; with ``slow_teacher_beside_tome`` the teacher's rounds beside ToMe
    are made three to nine times slower (unsteady, and off the other pairings' scale)."""
    import hetvit.bench

    real = hetvit.bench.compare

    def compare(teacher, model, **kw):
        result = real(teacher, model, **kw)
        if hetvit.baselines.is_baseline(model):
            tp = result.throughput
            tp.baseline = [v / 3 for v in tp.baseline]
            tp.baseline[0] /= 3
        return result

    logged: list[str] = []
    load = _busy_load(busy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "getloadavg", lambda: (load, load, load))
        if slow_teacher_beside_tome:
            mp.setattr(hetvit.demo, "compare", compare)
        assets, cifar = _make_assets(root / "assets"), _make_cifar(root / "cifar")
        result = _run(root / "report", assets, cifar, tome_r=tome_r, log=logged.append)
    return result, assets, cifar, (root / "report" / "report.md").read_text(), logged


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    """The demo on an idle machine (load average 0), shared by the tests that read it: each
    demo run costs seconds, so the report's tests look at one."""
    return _demo_run(tmp_path_factory.mktemp("quiet"), busy=False)


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """The demo on a busy machine, its teacher unsteady and slower beside ToMe, with r = 0."""
    return _demo_run(tmp_path_factory.mktemp("busy"), busy=True, tome_r=0,
                     slow_teacher_beside_tome=True)


def _run(out: Path, assets: Path, images: Path, **kw):
    kw.setdefault("log", lambda line: None)
    return run(out, assets=assets, images=images, eval_images=20, analysis_images=8,
               bench_rounds=2, bench_time=0.01, threads=1, progress=False, **kw)


def test_sample_takes_the_first_images_of_each_class():
    targets = [0, 0, 0, 1, 1, 2, 0, 2, 2, 2]
    assert sample_indices(targets, 2) == [0, 1, 3, 4, 5, 7]


def _sample_loader(teacher: torch.nn.Module, cifar: Path):
    """The demo's 20 images (2 a class), batched differently from the demo on purpose."""
    ds = open_dataset(cifar, make_transform(teacher))
    return make_loader(Subset(ds, sample_indices(ds.targets, 2)), batch_size=7)


def test_report_holds_what_direct_measurements_give(quiet):
    result, assets, cifar, report, _ = quiet
    out = result.report
    assert {p.name for p in out.iterdir()} == {"report.md", "summary.png", "analysis"}
    assert (out / "analysis" / "similarity.png").stat().st_size > 0
    saved = json.loads((out / "analysis" / "patterns.json").read_text())
    assert saved["num_images"] == 8

    teacher, student = hetvit.load(assets / TEACHER), hetvit.load(assets / STUDENT)
    fitted = hetvit.load(assets / FITTED)
    loader = _sample_loader(teacher, cifar)
    direct = {"teacher": teacher, "fine-tuned": student, "fitted": fitted,
              "tome": tome(teacher, r=TOME_R, schedule=TOME_SCHEDULE)}
    assert list(result.accuracy) == list(direct)
    for key, model in direct.items():
        assert result.accuracy[key] == pytest.approx(evaluate(model, loader))
        assert result.accuracy[key]["n"] == 20
    assert result.plan == student.hetvit_plan
    for key, name in (("teacher", "teacher"), ("fine-tuned", "fine-tuned"),
                      ("fitted", "fitted"), ("tome", tome_name(TOME_R, TOME_SCHEDULE))):
        assert result.names[key] == name
        assert f"| {name} | {100 * result.accuracy[key]['top1']:.1f}% |" in report
    assert list(result.bench) == ["fine-tuned", "fitted", "tome"]
    for key, bench in result.bench.items():
        assert f"| {result.names[key]} | {bench.compressed.plan} |" in report
        assert f"**{bench.speedup:.2f}x**" in report
        assert bench.latency is not None and len(bench.throughput.ratios) == 2
    sim = np.asarray(saved["similarity"]).mean(axis=1)  # the measured premise, as numbers
    assert f"similarity (mean over heads): {sim[0]:.2f} at layer 0" in report
    arch = describe(teacher)
    assert result.bench["fine-tuned"].gmac_reduction == pytest.approx(
        formula_macs(arch) / formula_macs(arch, result.plan))


def test_report_says_how_each_model_was_made(quiet):
    """The fitted model's line and its `hetvit fit` command come from its own fit.json."""
    _, assets, cifar, report, _ = quiet
    record = json.loads((assets / FITTED / "fit.json").read_text())
    assert (f"- **fitted**: the `fast` plan, fitted without labels (`hetvit fit`; "
            f"assets/{FITTED}): 8 unlabeled images, 2 passes, {record['seconds']:.0f} s "
            "(its fit.json)") in report
    assert "- **fine-tuned**: the `fast` plan, fine-tuned with labels" in report
    assert (f"- **ToMe r={TOME_R} ({TOME_SCHEDULE})**: token merging (ToMe) of the teacher, "
            f"{TOME_R} tokens merged per block on average") in report
    assert (f"hetvit fit --teacher assets/{TEACHER} --plan fast --images "
            f"../shared/data/cifar10-train.tar.gz --out runs/{FITTED} --num-images 8 "
            "--passes 2 --batch-size 4 --temperature 2 --mixup 0.5\n") in report
    assert (f"hetvit evaluate --checkpoint assets/{TEACHER} --data {cifar} --method tome "
            f"--r {TOME_R} --schedule {TOME_SCHEDULE}\n") in report


def test_the_fit_command_of_an_older_record_says_what_it_ran_with():
    """A fit.json from before ``freeze_early`` existed was fitted without it, which is no longer
    the default; a setting with no flag is named in the comment."""
    from hetvit.demo import fit_command

    old = {"passes": 20, "batch_size": 64, "lr": 3e-4, "lr_new": 5e-2, "temperature": 1.0,
           "mixup": 1.0, "flip": False, "trainable": "all", "warmup": 0.1, "seed": 0}
    command = fit_command({"config": old, "images": 2048}, Plan(pyramid=((2, 8),),
                                                                 label="pyramid-2.5x"))
    assert command.endswith("--num-images 2048 --no-freeze-early # and flip=False (FitConfig; "
                            "no flag)")
    # a label that is no preset names no file: the plan saved beside the model does
    assert f"--plan assets/{FITTED}/plan.json " in command and "pyramid-2.5x" not in command
    now = {**old, "flip": True, "freeze_early": True, "crop": 4}
    assert fit_command({"config": now, "images": 2048}, Plan()).endswith(
        "--num-images 2048 --crop 4")


def test_the_fit_flags_are_the_settings_hetvit_fit_takes():
    """What the demo prints as flags is what ``hetvit fit`` has: a setting given a flag (or
    losing one) is named the same way in both."""
    import dataclasses
    import inspect

    from hetvit.cli.fit import fit_command as cli_fit
    from hetvit.demo import FIT_FLAGS
    from hetvit.fitting import FitConfig

    settings = {f.name for f in dataclasses.fields(FitConfig)}
    flags = set(inspect.signature(cli_fit).parameters)
    assert FIT_FLAGS == settings & flags - {"minutes"}


def test_the_token_merging_row_is_tome_of_the_teacher(quiet, busy):
    """The default setting changes the teacher's outputs; r = 0 merges nothing."""
    merged, same = quiet[0], busy[0]
    assert TOME_R > 0
    assert merged.accuracy["tome"]["loss"] != pytest.approx(merged.accuracy["teacher"]["loss"])
    assert merged.bench["tome"].compressed.plan.startswith(f"tome r={TOME_R} ({TOME_SCHEDULE}")
    assert same.names["tome"] == f"ToMe r=0 ({TOME_SCHEDULE})"
    assert same.accuracy["tome"] == pytest.approx(same.accuracy["teacher"])


@pytest.mark.parametrize("machine", ["busy", "quiet"])
def test_a_busy_machine_is_warned_about(request, machine):
    result, _, _, report, logged = request.getfixturevalue(machine)
    busy = machine == "busy"
    said = [w for w in result.warnings if w.startswith("the machine was busy")]
    assert len(said) == busy
    assert ("> **Warning:** the machine was busy" in report) == busy
    assert any(line.startswith("warning: the machine was busy") for line in logged) == busy
    assert result.load == (_busy_load(busy), _busy_load(busy))
    if busy:
        assert "speed figures are unreliable on this run" in report  # at the top as well
        assert f"load average {_busy_load(True):.2f} at the start" in said[0]


def test_pairings_that_disagree_are_warned_about(busy):
    """The teacher slower and unsteady beside ToMe: both bench helpers' warnings show."""
    result, _, _, report, _ = busy
    unsteady = (f"beside {result.names['tome']}, the teacher's own rounds disagree by more "
                "than 10%")
    assert any(w.startswith(unsteady) for w in result.warnings)
    drift = [w for w in result.warnings if w.startswith("the teacher's median time moved")]
    assert len(drift) == 1 and f"beside {result.names['tome']}" in drift[0]
    assert f"> **Warning:** {unsteady}" in report and f"> **Warning:** {drift[0]}" in report


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


@pytest.mark.parametrize("breakage", ["missing", "foreign", "no fit record"])
def test_a_missing_or_foreign_fitted_model_is_one_clear_line(tmp_path, assets, cifar, breakage):
    import shutil

    import hetvit.patterns

    fitted = assets / FITTED
    if breakage == "missing":
        shutil.rmtree(fitted)
        expected = f"checkpoint directory not found: {fitted}"
    elif breakage == "foreign":
        other = tiny_vit(embed_dim=48)
        hetvit.save(hetvit.compress(other, Plan(static=(0,), label="fast"),
                                    calibration=torch.randn(2, 3, 32, 32)), fitted)
        expected = f"{fitted} was not compressed from {assets / TEACHER}"
    else:
        (fitted / "fit.json").unlink()
        expected = f"{fitted / 'fit.json'} is missing: {fitted} is not a model made by hetvit fit"
    out = tmp_path / "report"
    with pytest.raises(DemoError) as err:
        _run(out, assets, cifar)
    message = str(err.value)
    assert message.startswith(expected) and "restore" in message and "\n" not in message
    assert not out.exists()
    result = CliRunner().invoke(app, ["demo", "--assets", str(assets), "--images", str(cifar),
                                      "--out", str(out), "--eval-images", "20"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in result.output  # one line: printed whole


def test_cli_prints_every_model_and_the_warnings_under_the_table(tmp_path, assets, cifar,
                                                                 monkeypatch):
    import hetvit.demo

    real = hetvit.demo.run
    monkeypatch.setattr(hetvit.demo, "run", lambda *a, **k: real(
        *a, **{**k, "bench_rounds": 2, "bench_time": 0.01, "threads": 1}))
    monkeypatch.setattr(os, "getloadavg", lambda: (_busy_load(True),) * 3)
    result = CliRunner().invoke(app, ["demo", "--assets", str(assets), "--images", str(cifar),
                                      "--out", str(tmp_path / "r"), "--eval-images", "20",
                                      "--analysis-images", "8"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    names = ["teacher", "fine-tuned", "fitted", tome_name(TOME_R, TOME_SCHEDULE)]
    assert [r.split("│")[1].strip() for r in rows if r.split("│")[1].strip()] == names
    warned = result.output.index("warning: the machine was busy")
    assert warned > result.output.index(names[-1])  # under the figures it is about
    assert result.output.count("warning: the machine was busy") == 1


@pytest.mark.parametrize("width", [80, 200])
def test_the_table_shows_the_plans_only_where_they_fit(quiet, width):
    """Each model's numbers stay on one line; the plans join them on a wide terminal."""
    from rich.console import Console

    from hetvit.cli.analysis import _demo_table

    result = quiet[0]
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(_demo_table(result, console))
    rows = [line for line in console.export_text().splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == list(result.names.values())
    wide = width == 200
    assert [c.header for c in _demo_table(result, console).columns][:2] == (
        ["model", "plan"] if wide else ["model", "GMACs"])
    assert all((b.compressed.plan.split()[0] in r) == wide
               for b, r in zip(result.bench.values(), rows[1:], strict=True))
    speedups = [f"{b.speedup:.2f}x" for b in result.bench.values()]
    assert all(s in r for s, r in zip(speedups, rows[1:], strict=True))


def test_the_committed_fitted_model_belongs_to_the_committed_teacher():
    """The demo's real inputs: the fitted model is a student of the teacher, with its record."""
    from hetvit.demo_inputs import check_source, find_assets, fit_record

    root = find_assets()  # the suite runs in the clone: its assets/
    teacher = hetvit.load(root / TEACHER)
    check_source(root / FITTED, hetvit.load(root / FITTED), teacher, root / TEACHER)
    record = fit_record(root / FITTED)
    assert record["images"] >= 1 and record["seconds"] > 0


def test_failure_mid_run_leaves_no_report(tmp_path, assets, cifar, monkeypatch):
    import hetvit.bench

    def broken_compare(*a, **k):
        raise RuntimeError("benchmark failed")

    monkeypatch.setattr(hetvit.demo, "compare", broken_compare)
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

    monkeypatch.setattr(hetvit.demo, "analyze", no_analysis)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("mine\n")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        _run(out, assets, cifar)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_the_demos_own_threads_do_not_make_the_machine_busy():
    """The load average at the end counts the demo's own threads: only other work is busy."""
    from hetvit.demo import speed_warnings

    assert not speed_warnings({}, {}, (0.2, 2.1), cpus=2, own=2)
    (busy,) = speed_warnings({}, {}, (0.2, 2.1), cpus=2, own=0)
    assert "2.10 at the end" in busy
    (busy,) = speed_warnings({}, {}, (1.5, 2.1), cpus=2, own=2)
    assert "1.50 at the start" in busy and "end" not in busy.split(",")[0]


def test_assets_are_found_in_the_clone_the_demo_runs_in(tmp_path, monkeypatch):
    """Not through the package's own path alone (a wheel install has no assets beside it): the
    working directory's assets/ come first, and a missing folder is a one-line error."""
    from hetvit.demo_inputs import DemoError, find_assets

    monkeypatch.delenv("HETVIT_ASSETS", raising=False)
    (tmp_path / "clone" / "assets").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "clone")
    assert find_assets() == tmp_path / "clone" / "assets"
    with pytest.raises(DemoError, match="give --assets DIR"):
        find_assets(tmp_path / "nowhere")
