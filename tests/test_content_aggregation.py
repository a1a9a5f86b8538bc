"""Content-aware aggregation: the static stage at its start, the formula after, and a plan
option that every path (compress, save and load, MACs, ONNX, fit, the CLI) carries."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import hetvit
from hetvit.aggregation import TokenAggregation
from hetvit.cli import app
from hetvit.content_aggregation import ContentAggregation
from hetvit.fitting import FitConfig, fit
from hetvit.flops import count_macs, formula_macs
from hetvit.plan import Plan, PlanError
from hetvit.surgery import describe

from .conftest import confident_vit, exports_with_parity, tiny_vit

PLAN = Plan(pyramid=((1, 8), (3, 4)), aggregation="content")


def _stages(model: torch.nn.Module) -> list[TokenAggregation]:
    return [b for b in model.blocks if isinstance(b, TokenAggregation)]


def _move(model: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """Queries (and the static logits) away from their start, so that they matter."""
    torch.manual_seed(3)
    with torch.no_grad():
        for stage in _stages(model):
            stage.query.add_(scale * torch.randn_like(stage.query))
            stage.weight.add_(0.1 * torch.randn_like(stage.weight))
    return model.eval()


@pytest.mark.parametrize("training", [True, False])
def test_zero_queries_give_the_static_stage_exactly(training):
    static = TokenAggregation(16, 4, num_prefix_tokens=2, grid_in=(4, 4))
    with torch.no_grad():
        static.weight.add_(torch.randn_like(static.weight))
    content = ContentAggregation(16, 4, dim=8, num_prefix_tokens=2, grid_in=(4, 4))
    content.load_state_dict({**static.state_dict(), "query": torch.zeros(4, 8)})
    x = torch.randn(3, 18, 8)
    torch.testing.assert_close(content.train(training)(x), static.train(training)(x))


def test_each_image_is_aggregated_by_its_own_matrix():
    stage = ContentAggregation(16, 4, dim=8, num_prefix_tokens=1, grid_in=(4, 4))
    with torch.no_grad():
        stage.query.normal_()
    x = torch.randn(2, 17, 8)
    out = stage.eval()(x)
    for i in range(2):  # reference: the formula, image by image
        scores = stage.query @ F.layer_norm(x[i, 1:], (8,)).T / math.sqrt(8)
        p = (stage.weight + scores).softmax(-1)
        torch.testing.assert_close(out[i, 1:], p @ x[i, 1:])
        torch.testing.assert_close(p.sum(-1), torch.ones(4))
    torch.testing.assert_close(out[:, :1], x[:, :1])  # the prefix passes through
    assert not torch.allclose(stage.image_matrices(x[:1, 1:]), stage.image_matrices(x[1:, 1:]))


def test_queries_learn_and_a_wrong_length_is_a_clear_error():
    stage = ContentAggregation(16, 4, dim=8, grid_in=(4, 4)).train()
    stage(torch.randn(2, 17, 8)).pow(2).sum().backward()
    assert stage.query.grad is not None and stage.query.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expects 1 prefix \\+ 16 patch tokens, got 10"):
        stage(torch.randn(1, 10, 8))


def test_the_plan_carries_the_option_and_refuses_an_unknown_one(tmp_path):
    assert Plan.from_json(PLAN.to_json()) == PLAN
    assert Plan.from_dict({"pyramid": [[1, 8]]}).aggregation == "static"  # plans from before
    assert "pyramid content [1:8 3:4]" in PLAN.describe()
    assert "content" not in replace(PLAN, aggregation="static").describe()
    with pytest.raises(PlanError,
                       match="aggregation must be one of static, content, merge, not 'soft'"):
        Plan(pyramid=((1, 8),), aggregation="soft")
    assert PLAN.with_source(name="x").aggregation == "content"


def test_a_fresh_content_model_is_the_static_model_and_reloads_once_moved(tmp_path, images):
    vit = tiny_vit()
    content = hetvit.compress(vit, PLAN, calibration=images)
    static = hetvit.compress(vit, replace(PLAN, aggregation="static"), calibration=images)
    assert all(isinstance(s, ContentAggregation) for s in _stages(content))
    assert not any(isinstance(s, ContentAggregation) for s in _stages(static))
    with torch.no_grad():
        torch.testing.assert_close(content(images), static(images))
    _move(content)
    loaded = hetvit.load(hetvit.save(content, tmp_path / "ckpt"))
    assert loaded.hetvit_plan.aggregation == "content"
    with torch.no_grad():
        assert torch.equal(loaded(images), content(images))
        assert not torch.allclose(loaded(images), static(images), atol=1e-3)


@pytest.mark.parametrize("plan", [PLAN, replace(PLAN, static=(0, 2))])
def test_counted_macs_equal_the_formula_with_one_more_product_a_stage(plan):
    model = tiny_vit()
    arch, dim = describe(model), model.embed_dim
    assert count_macs(hetvit.compress(model, plan)) == formula_macs(arch, plan)
    extra = sum(m * n * dim for n, m in ((16, 8), (8, 4)))  # the scores: M N D a stage
    static = replace(plan, aggregation="static")
    assert formula_macs(arch, plan) == formula_macs(arch, static) + extra


def test_a_content_model_exports_to_onnx_with_parity(tmp_path, images):
    pytest.importorskip("onnxruntime")
    student = _move(hetvit.compress(tiny_vit(), PLAN, calibration=images))
    assert exports_with_parity(student, tmp_path / "m.onnx")


def test_fit_moves_the_queries(images):
    teacher = confident_vit()
    student = hetvit.compress(teacher, PLAN, calibration=images)
    torch.manual_seed(2)
    fitted = fit(student, teacher, torch.randn(32, 3, 32, 32), FitConfig(passes=1, batch_size=16))
    assert fitted.hetvit_plan.aggregation == "content"
    assert all(s.query.abs().sum() > 0 for s in _stages(fitted))


def test_cli_compress_takes_the_option_and_refuses_a_bad_one(tmp_path):
    teacher = hetvit.save(tiny_vit(), tmp_path / "teacher")
    out = tmp_path / "student"
    ok = CliRunner().invoke(app, ["compress", "--checkpoint", str(teacher), "--plan", "fast",
                                  "--aggregation", "content", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert json.loads((out / "plan.json").read_text())["aggregation"] == "content"
    assert all(isinstance(s, ContentAggregation) for s in _stages(hetvit.load(out)))
    bad = CliRunner().invoke(app, ["compress", "--checkpoint", str(teacher), "--plan", "fast",
                                   "--aggregation", "soft", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "one of static, content, merge, not 'soft'" in bad.output
    assert not (tmp_path / "bad").exists()
    with_student = CliRunner().invoke(app, [
        "finetune", "--teacher", str(teacher), "--student", str(out), "--aggregation", "content",
        "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert with_student.exit_code != 0 and "--aggregation goes with --plan" in with_student.output
    assert not (tmp_path / "run").exists()
