"""Merging aggregation: a hard partition of each image's tokens into the plan's fixed counts,
lossless on duplicates, and a plan option that compress, save and load, MACs, ONNX and fit carry."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import hetvit
from hetvit.aggregation import TokenAggregation
from hetvit.fitting import FitConfig, fit
from hetvit.flops import count_macs, formula_macs
from hetvit.merge_aggregation import MergeAggregation
from hetvit.plan import Plan, PlanError
from hetvit.surgery import describe

from .conftest import confident_vit, exports_with_parity, tiny_vit

PLAN = Plan(pyramid=((1, 8), (3, 4)), aggregation="merge")


def _stages(model: torch.nn.Module) -> list[TokenAggregation]:
    return [b for b in model.blocks if isinstance(b, TokenAggregation)]


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of a 2-D tensor as a multiset: sorted lexicographically (by a random projection,
    ties impossible for random data)."""
    key = x @ torch.linspace(1.0, 2.0, x.shape[-1])
    return x[key.argsort()]


@pytest.mark.parametrize("num_out", [16, 12, 9, 8])
def test_each_image_is_a_hard_partition_of_its_tokens_into_averages(num_out):
    stage = MergeAggregation(16, num_out, num_prefix_tokens=2, grid_in=(4, 4))
    torch.manual_seed(0)
    x = torch.randn(3, 18, 8)
    out = stage(x)
    assert out.shape == (3, 2 + num_out, 8)
    torch.testing.assert_close(out[:, :2], x[:, :2])  # the prefix passes through
    p = stage.image_matrices(x[:, 2:])
    torch.testing.assert_close(out[:, 2:], p @ x[:, 2:])  # reference: one matrix an image
    members = p > 0
    assert torch.equal(members.sum(1), torch.ones(3, 16, dtype=torch.long))  # each token once
    assert torch.equal(members.sum(2) >= 1, torch.ones(3, num_out, dtype=torch.bool))
    torch.testing.assert_close(p.sum(-1), torch.ones(3, num_out))
    torch.testing.assert_close(p * members.sum(-1, keepdim=True), members.float())  # averages
    # one bipartite round: every token of B leads a row, and a kept token of A is a row alone
    b_rows, a_rows = members[:, :8, 1::2], members[:, 8:]
    assert torch.equal(b_rows.sum(-1), torch.ones(3, 8, dtype=torch.long))
    assert torch.equal(a_rows.sum(-1), torch.ones(3, num_out - 8, dtype=torch.long))
    assert not a_rows[:, :, 1::2].any()


def test_no_merges_only_reorder_the_tokens():
    stage = MergeAggregation(16, 16, grid_in=(4, 4))
    x = torch.randn(2, 17, 8)
    out = stage(x)
    for i in range(2):
        torch.testing.assert_close(_sorted_rows(out[i, 1:]), _sorted_rows(x[i, 1:]))


def test_a_duplicate_is_merged_into_its_twin_and_nothing_else_changes():
    torch.manual_seed(1)
    x = torch.randn(1, 17, 8)
    x[0, 1 + 4] = x[0, 1 + 7]  # patch 4 (in A, even) duplicates patch 7 (in B, odd)
    out = MergeAggregation(16, 15, grid_in=(4, 4))(x)
    rest = torch.cat([x[0, 1:5], x[0, 6:]])  # patch 4 gone, its twin kept as it was
    torch.testing.assert_close(_sorted_rows(out[0, 1:]), _sorted_rows(rest))


def test_more_than_halving_is_a_plan_error_and_the_stage_learns_nothing_itself():
    with pytest.raises(PlanError, match="at most halve the tokens: 16 -> 7 needs at least 8"):
        MergeAggregation(16, 7)
    stage = MergeAggregation(16, 8, grid_in=(4, 4))
    assert list(stage.parameters()) == []
    torch.testing.assert_close(stage.matrix(), TokenAggregation(16, 8, grid_in=(4, 4)).matrix())
    x = torch.randn(2, 17, 8, requires_grad=True)
    stage(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients reach what came before


def test_the_plan_carries_the_option_through_save_and_load(tmp_path, images):
    assert Plan.from_json(PLAN.to_json()) == PLAN
    assert "pyramid merge [1:8 3:4]" in PLAN.describe()
    model = hetvit.compress(tiny_vit(), PLAN, calibration=images)
    assert all(isinstance(s, MergeAggregation) for s in _stages(model))
    loaded = hetvit.load(hetvit.save(model, tmp_path / "ckpt"))
    assert loaded.hetvit_plan.aggregation == "merge"
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
        static = hetvit.compress(tiny_vit(), replace(PLAN, aggregation="static"))
        assert not torch.allclose(model(images), static(images), atol=1e-3)


@pytest.mark.parametrize("plan", [PLAN, replace(PLAN, static=(0, 2))])
def test_counted_macs_equal_the_formula(plan):
    model = tiny_vit()
    arch, dim = describe(model), model.embed_dim
    assert count_macs(hetvit.compress(model, plan)) == formula_macs(arch, plan)
    # 16 -> 8: 8 x 8 similarities and 8 x 8 sums; 8 -> 4: 4 x 4 and 4 x 4
    static = replace(plan, aggregation="static")
    merge = (8 * 8 + 8 * 8 + 4 * 4 + 4 * 4) * dim
    assert formula_macs(arch, plan) == formula_macs(arch, static) - (8 * 16 + 4 * 8) * dim + merge


def test_a_merge_model_exports_to_onnx_with_parity(tmp_path, images):
    pytest.importorskip("onnxruntime")
    student = hetvit.compress(tiny_vit(), replace(PLAN, pyramid=((1, 10), (3, 6))))
    assert exports_with_parity(student, tmp_path / "m.onnx")


def test_fit_trains_the_blocks_around_the_stages(images):
    teacher = confident_vit()
    student = hetvit.compress(teacher, PLAN, calibration=images)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    torch.manual_seed(2)
    fitted = fit(student, teacher, torch.randn(32, 3, 32, 32), FitConfig(passes=1, batch_size=16))
    assert fitted.hetvit_plan.aggregation == "merge"
    after = fitted.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.2"))


def test_every_aggregation_a_plan_names_has_a_stage_kind_with_a_cost():
    from hetvit.plan import AGGREGATIONS
    from hetvit.stages import STAGE_KINDS, make_stage, stage_cost

    assert set(STAGE_KINDS) == set(AGGREGATIONS)
    by_hand = {"static": 8 * 16, "content": 2 * 8 * 16, "merge": 8 * 8 + 8 * 8}  # x D = 32
    for kind in AGGREGATIONS:
        stage = make_stage(kind, 16, 8, 32, 1, (4, 4))
        assert type(stage) is STAGE_KINDS[kind]
        assert stage_cost(kind, 16, 8, 32) == by_hand[kind] * 32
