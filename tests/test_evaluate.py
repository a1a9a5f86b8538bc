"""Evaluation: metrics against hand computations, class maps, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from hetvit.cli import app
from hetvit.data import make_loader, make_transform, open_dataset
from hetvit.evaluation import evaluate

from .conftest import write_images

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


class Lookup(torch.nn.Module):
    """A 'model' whose logits for input ``i`` are row ``i`` of a fixed table."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long()]


def test_metrics_match_a_hand_computation():
    # 6 classes; rows give the true class rank 1, 2, 1, 6 and 5 among the logits
    table = torch.tensor([
        [9.0, 1, 2, 3, 4, 5],   # target 0: top-1
        [5.0, 9, 1, 2, 3, 4],   # target 0: 2nd
        [1.0, 2, 9, 3, 4, 5],   # target 2: top-1
        [1.0, 2, 3, 4, 5, 6],   # target 0: last
        [6.0, 5, 4, 3, 2, 1],   # target 4: 5th
    ])
    targets = torch.tensor([0, 0, 2, 0, 4])
    loader = [(torch.tensor([0, 1]), targets[:2]), None, (torch.tensor([2, 3, 4]), targets[2:])]
    result = evaluate(Lookup(table), loader)
    loss = -sum(math.log(torch.softmax(table[i], -1)[int(t)]) for i, t in enumerate(targets))
    assert result["n"] == 5
    assert result["top1"] == pytest.approx(2 / 5)
    assert result["top5"] == pytest.approx(4 / 5)
    assert result["loss"] == pytest.approx(loss / 5, rel=1e-6)


def test_top1_on_a_partial_class_map_set_matches_a_manual_loop(tmp_path):
    names = [f"n{i:02d}" for i in range(5)]
    write_images(tmp_path / "val", ["n01", "n03", "n04"])
    (tmp_path / "synsets.txt").write_text("\n".join(names) + "\n")
    torch.manual_seed(0)
    model = VisionTransformer(**TINY, num_classes=5).eval()
    ds = open_dataset(tmp_path, make_transform(model), class_map="auto")
    assert sorted(set(ds.targets)) == [1, 3, 4]
    hits = 0
    with torch.no_grad():
        for path, target in ds.samples:
            x = make_transform(model)(Image.open(path).convert("RGB"))[None]
            hits += int(model(x).argmax(-1).item() == target)
    result = evaluate(model, make_loader(ds, batch_size=4))
    assert result["n"] == 9
    assert result["top1"] == pytest.approx(hits / 9)
    assert model.training is False


def test_evaluate_restores_training_mode_and_rejects_empty_loaders():
    model = Lookup(torch.eye(3)).train()
    evaluate(model, [(torch.tensor([0, 1]), torch.tensor([0, 1]))])
    assert model.training
    with pytest.raises(ValueError, match="no images"):
        evaluate(model, [])


def test_cli_evaluate_json_agrees_with_the_api(tmp_path):
    write_images(tmp_path / "data", ["a", "b", "c"], per_class=2)
    torch.manual_seed(1)
    # the timm name, not the bare class: its pretrained_cfg (mean/std 0.5) sets the transform
    model = timm.create_model("vit_tiny_patch16_224", **TINY, num_classes=3).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    expected = evaluate(model, make_loader(open_dataset(tmp_path / "data",
                                                        make_transform(model)), 4))
    runner = CliRunner()
    args = ["evaluate", "--model", "vit_tiny_patch16_224", "--weights",
            str(tmp_path / "w.safetensors"), "--data", str(tmp_path / "data"), "--img-size",
            "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
            "--num-classes", "3", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["n"] == 6 and got["skipped"] == 0
    assert got["top1"] == pytest.approx(expected["top1"])
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    # the spelling, as in compress and finetune: --model NAME --checkpoint FILE
    args[args.index("--weights")] = "--checkpoint"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loss"] == pytest.approx(expected["loss"], rel=1e-5)

    from hetvit import io

    io.save(model, tmp_path / "saved")
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "saved"), "--data",
                                 str(tmp_path / "data"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_cli_errors_are_clear(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--model", "vit_tiny_patch16_224", "--data",
                                 str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "data path not found" in result.output and "nope" in result.output
    result = runner.invoke(app, ["evaluate", "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "give --checkpoint DIR|FILE, or --model NAME" in result.output
    write_images(tmp_path / "imgs", ["a", "b"], per_class=1)
    for command in (["train", "--out", str(tmp_path / "run")], ["evaluate"], ["analyze"]):
        # timm's assert (128 is not divisible by 5 heads) must not surface as a traceback
        result = runner.invoke(app, [*command, "--model", "vit_tiny_patch16_224", "--data",
                                     str(tmp_path / "imgs"), "--embed-dim", "128",
                                     "--num-heads", "5"])
        assert result.exit_code == 2, (command, result.output)
        assert "cannot build vit_tiny_patch16_224" in result.output
    assert not (tmp_path / "run").exists()
