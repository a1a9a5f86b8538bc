"""Fine-tuning across processes: DDP on the CPU (gloo), with two processes of a tiny student.

Run alone with ``pytest -m ddp``. The multi-process runs are started as real commands
(``python -m hetvit finetune``, or the script ``tests/ddp_run.py`` where a run must be killed
half-way), because Lightning starts each further process by running the command again.
Each run is shared by the tests that read it (module-scoped fixtures), so the whole module
costs a handful of short runs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hetvit
from hetvit.configs import TrainConfig, TrainingError
from hetvit.curves import read_epochs
from hetvit.data import make_loader, make_transform, open_dataset
from hetvit.distributed import check_processes, cpu_cores
from hetvit.evaluation import evaluate
from hetvit.plan import Plan
from hetvit.samplers import EpochShuffleSampler, InOrderShards

from .conftest import tiny_vit, write_images

pytestmark = pytest.mark.ddp

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["ant", "bee", "cat", "dog"]
# Per process a batch of 4: two processes step on 8 images, as one process with --batch-size 8.
# 48 training images: 6 steps an epoch. Whole-image crops and no flips, so that augmentation
# draws no different pixels in 1 and 2 processes (each process has its own random stream).
RUN = {"epochs": 2, "batch_size": 8, "seed": 3, "accelerator": "cpu", "threads": 1,
       "scale": [1.0, 1.0], "hflip": 0.0, "progress": False, "calibration_images": 16}

needs_two_cores = pytest.mark.skipif(cpu_cores() < 2, reason="DDP on the CPU runs one process "
                                     "per core; this machine gives the tests fewer than 2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    write_images(root / "train", CLASSES, per_class=12)
    write_images(root / "val", CLASSES, per_class=5)  # 20: shards of 10 and 10
    (root / "val" / "ant" / "extra.png").write_bytes((root / "val" / "ant" / "0.png")
                                                     .read_bytes())  # 21: shards of 11 and 10
    teacher = tiny_vit(num_classes=len(CLASSES))
    with torch.no_grad():  # a random head predicts one class for every image; spread them
        teacher.head.weight.mul_(40)
    hetvit.save(teacher, root / "teacher", classes=CLASSES)
    Plan(static=(0,), pyramid=((2, 8),)).save(root / "plan.json")
    return {"root": root, "train": root / "train", "val": root / "val",
            "teacher": root / "teacher", "plan": root / "plan.json"}


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE"):
        env.pop(name, None)  # each run picks its own free port
    return env


def _flags(setup: dict[str, Path], out: Path, devices: int) -> list[str]:
    return ["finetune", "--teacher", str(setup["teacher"]), "--plan", str(setup["plan"]),
            "--data", str(setup["train"]), "--val-data", str(setup["val"]), "--out", str(out),
            "--devices", str(devices), "--epochs", str(RUN["epochs"]),
            "--batch-size", str(RUN["batch_size"]), "--seed", str(RUN["seed"]),
            "--accelerator", "cpu", "--threads", "1", "--scale-min", "1", "--hflip", "0",
            "--calibration-images", str(RUN["calibration_images"])]


def _cli(setup: dict[str, Path], out: Path, devices: int) -> subprocess.CompletedProcess:
    """``hetvit finetune``, with Lightning starting the further processes itself."""
    return subprocess.run([sys.executable, "-m", "hetvit", *_flags(setup, out, devices)],
                          env=_env(), capture_output=True, text=True, timeout=300)


def _script(setup: dict[str, Path], out: Path, devices: int,
            **extra) -> subprocess.CompletedProcess:
    settings = {**RUN, "data": str(setup["train"]), "val_data": str(setup["val"]),
                "out": str(out), "devices": devices, "teacher": str(setup["teacher"]),
                "plan": str(setup["plan"]), **extra}
    path = out.parent / f"{out.name}-settings.json"
    path.write_text(json.dumps(settings))
    return subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_run.py"), str(path)],
                          env=_env(), capture_output=True, text=True, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def two(setup) -> dict:
    """An uninterrupted 2-process fine-tune, from the CLI."""
    out = setup["root"] / "two"
    return {"out": out, "result": _ok(_cli(setup, out, devices=2))}


@pytest.fixture(scope="module")
def one(setup) -> Path:
    """The same run in one process (the same --batch-size: the batch of a step)."""
    out = setup["root"] / "one"
    _ok(_cli(setup, out, devices=1))
    return out


def _without_key_biases(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights less the key third of each qkv bias (see the parity test)."""
    out = {}
    for name, w in weights.items():
        if name.endswith("attn.qkv.bias"):
            third = w.numel() // 3
            w = torch.cat([w[:third], w[2 * third:]])
        out[name] = w
    return out


@needs_two_cores
def test_two_processes_train_like_one_with_their_batches_together(two, one):
    """DDP averages the two processes' gradients of per-sample-mean losses over 4 images each,
    which is the gradient of the same losses over the 8 images of the one process's step.

    They differ only in float32 rounding (a sum over 8 against two sums over 4, then the
    all-reduce): 2.4e-7 at most after 12 steps here, against weights that move by up to 0.1.
    1e-5 separates that from any real difference (a process reading the wrong shard, or
    stepping on its own batch alone, moves weights by 1e-3 or more). One part is left out:
    the key bias, whose gradient is exactly zero in exact arithmetic (softmax does not change
    when every key score of a query moves by the same ``q . b_k``). Its gradient is rounding
    noise, which AdamW's normalised step turns into full-size steps of either sign, so it
    differs by up to lr per step in any two runs that round differently (3e-4 here).
    """
    a, b = _without_key_biases(_weights(two["out"])), _without_key_biases(_weights(one))
    assert a.keys() == b.keys()
    start = _without_key_biases(hetvit.load(two["out"].parent / "teacher").state_dict())
    moved = max((a[k] - start[k]).abs().max().item() for k in start if k in a)
    assert moved > 1e-2  # the runs did train: parity is not that of two untouched models
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


@needs_two_cores
def test_only_the_first_process_writes_and_reports(two):
    out, result = two["out"], two["result"]
    assert result.stdout.count("student written to") + result.stderr.count(
        "student written to") == 1
    assert not (out / "config_history.jsonl").exists()
    assert not (out / ".lock").exists()
    assert json.loads((out / "finetune_config.json").read_text())["devices"] == 2
    lines = (out / "epochs.log").read_text().splitlines()
    assert len(lines) == RUN["epochs"]  # one line an epoch, not one per process
    assert "sync_dist" not in result.stderr  # every epoch-level metric is reduced
    rows = read_epochs(out / "epochs.log")
    assert [r["processes"] for r in rows] == [2, 2]
    assert all(r["images/s/process"] > 0 for r in rows)
    assert rows[-1]["step"] == RUN["epochs"] * 48 // RUN["batch_size"]  # 6 steps an epoch


def _last_validation(run: Path) -> dict[str, float]:
    """The last epoch's validation metrics at full precision (Lightning's CSV log)."""
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/")}


@needs_two_cores
def test_validation_under_ddp_equals_one_process_evaluating_the_same_weights(two, setup):
    """21 validation images: shards of 11 and 10, no image repeated (Lightning's own sampler
    would pad the second shard by repeating one), and sums reduced, not the shards' means
    (which would weight the 10 images of one shard more than the 11 of the other)."""
    model = hetvit.load(two["out"] / "model")
    dataset = open_dataset(setup["val"], make_transform(model), class_map=CLASSES)
    single = evaluate(model, make_loader(dataset, batch_size=5))
    logged = _last_validation(two["out"])
    assert single["n"] == 21 and 0 < single["top1"] < 1
    assert logged["val/top1"] == pytest.approx(single["top1"], abs=1e-6)
    assert logged["val/loss"] == pytest.approx(single["loss"], abs=1e-5)


@needs_two_cores
def test_a_killed_ddp_run_resumes_to_the_uninterrupted_weights(two, setup):
    """Killed (SIGKILL in both processes) 3 steps into the second epoch, then resumed: the run
    continues from the end of the first epoch and ends where the uninterrupted one did."""
    out = setup["root"] / "killed"
    killed = _script(setup, out, devices=2, kill_at_step=9)
    assert killed.returncode != 0 and not (out / "model").exists()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 6)  # the end of epoch 1
    _ok(_script(setup, out, devices=2, resume=True))
    a, b = _weights(out), _weights(two["out"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@needs_two_cores
def test_torchrun_starts_the_same_run(two, setup):
    """torchrun starts both processes; Lightning reads them from its environment."""
    out = setup["root"] / "torchrun"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(_free_port()), "-m", "hetvit"]
    result = _ok(subprocess.run([*torchrun, *_flags(setup, out, devices=2)], env=_env(),
                                capture_output=True, text=True, timeout=300))
    assert (result.stdout + result.stderr).count("student written to") == 1
    a, b = _weights(out), _weights(two["out"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@needs_two_cores
def test_processes_started_as_slurm_tasks_make_the_same_run(two, setup):
    """Two processes started the way ``srun --ntasks-per-node 2`` starts them (its variables
    set by hand): Lightning's SLURM environment joins them, and only task 0 writes."""
    out = setup["root"] / "slurm"
    port = str(_free_port())
    procs = []
    for task in range(2):
        env = {**_env(), "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
               "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), "SLURM_NODEID": "0",
               "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost",
               "SLURM_JOB_NAME": "hetvit-test", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "hetvit",
                                       *_flags(setup, out, devices=2)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert ["student written to" in log for log in logs] == [True, False]
    a, b = _weights(out), _weights(two["out"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_shards_of_an_epoch_are_disjoint_and_make_one_process_batches(monkeypatch):
    """Each process takes every world-th index of the epoch's permutation: the shards are
    disjoint, their union is the set (less a tail shorter than the world), and step k of the
    processes together reads batch k of one process with the batch of all of them."""
    import hetvit.samplers as samplers

    single = EpochShuffleSampler(23, seed=5)
    single.set_epoch(2)
    whole = list(single)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(samplers, "shard", lambda rank=rank: (rank, 3))
        s = EpochShuffleSampler(23, seed=5)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(s) == 7
    assert sorted(sum(shards, [])) == sorted(whole[:21])
    per_process = 2
    for k in range(3):
        together = sorted(i for sh in shards for i in sh[k * per_process:(k + 1) * per_process])
        assert together == sorted(whole[k * 6:(k + 1) * 6])
    monkeypatch.setattr(samplers, "shard", lambda: (1, 2))
    assert list(InOrderShards(5)) == [1, 3] and len(InOrderShards(5)) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"devices": 64, "accelerator": "cpu"}, "one process per device"),
    ({"devices": 2, "accelerator": "cpu", "batch_size": 1}, "at least 2"),
    ({"devices": 2, "accelerator": "cpu", "batch_size": 7}, "multiple of 2"),
    ({"devices": 1, "strategy": "fsdp"}, "--strategy must be one of"),
    ({"devices": 1, "num_nodes": 0}, "--num-nodes"),
    ({"devices": 1, "accelerator": "gpu"}, "CUDA GPU"),
])
def test_bad_process_settings_are_one_line_errors(kwargs, message):
    if kwargs.get("accelerator") == "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if kwargs.get("batch_size") and cpu_cores() < 2:
        pytest.skip("needs 2 cores to get past the device count")
    with pytest.raises(TrainingError, match=message):
        check_processes(**kwargs)


def test_a_missing_distributed_backend_is_an_error_not_a_hang(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    with pytest.raises(TrainingError, match="gloo"):
        check_processes(devices=1, strategy="ddp", accelerator="cpu")
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(TrainingError, match="without torch.distributed"):
        check_processes(devices=1, num_nodes=2, accelerator="cpu")


def test_a_bad_process_setting_stops_the_cli_before_writing(setup, tmp_path):
    from typer.testing import CliRunner

    from hetvit.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "finetune", "--teacher", str(setup["teacher"]), "--plan", str(setup["plan"]),
        "--data", str(setup["train"]), "--out", str(out), "--devices", "2",
        "--accelerator", "cpu", "--batch-size", "3"])
    assert result.exit_code != 0
    assert "--batch-size 3" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_the_run_settings_record_the_processes(tmp_path):
    config = TrainConfig(data=tmp_path, out=tmp_path / "o", devices=2, num_nodes=3,
                         strategy="ddp", batch_size=12)
    from hetvit.runs import config_dict

    values = config_dict(config)
    assert (values["devices"], values["num_nodes"], values["strategy"]) == (2, 3, "ddp")
