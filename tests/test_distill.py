"""The distillation losses as pure functions, against references written out element by element
(no Lightning involved)."""

from __future__ import annotations

import math

import torch
from torch import nn

import hetvit
from hetvit.aggregation import TokenAggregation, pooling_matrix
from hetvit.capture import capture_outputs
from hetvit.distill import (
    aggregation_path,
    feature_loss,
    guidance_kl,
    kd_loss,
    project_map,
)
from hetvit.plan import Plan

from .conftest import tiny_vit


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over rows of sum_j p_j log(p_j / q_j), by loops (0 log 0 = 0)."""
    rows = p.reshape(-1, p.shape[-1]).tolist()
    qs = q.reshape(-1, q.shape[-1]).tolist()
    total = 0.0
    for pr, qr in zip(rows, qs, strict=True):
        total += sum(a * math.log(a / b) for a, b in zip(pr, qr, strict=True) if a > 0)
    return total / len(rows)


def test_guidance_kl_is_zero_when_the_static_map_is_the_dynamic_one():
    torch.manual_seed(0)
    dyn = torch.randn(1, 3, 6, 6, dtype=torch.float64).softmax(-1)
    assert guidance_kl(dyn, dyn[0].log()).abs() < 1e-12
    # logits are only defined up to a constant per row: the same map, shifted
    assert guidance_kl(dyn, dyn[0].log() + 5.0).abs() < 1e-12


def test_guidance_kl_equals_the_kl_by_loops_also_with_zero_attention():
    torch.manual_seed(1)
    dyn = torch.randn(2, 2, 4, 4, dtype=torch.float64).softmax(-1)
    dyn[0, 0, 1] = torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64)  # exact zeros
    logits = torch.randn(2, 4, 4, dtype=torch.float64)
    static = logits.softmax(-1).expand_as(dyn)
    got = guidance_kl(dyn, logits)
    assert torch.isfinite(got)
    assert math.isclose(got.item(), _kl_rows(dyn, static), rel_tol=1e-10)


def test_kd_loss_at_a_temperature_is_t_squared_times_the_softened_kl():
    torch.manual_seed(2)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    for temp in (1.0, 2.0, 4.0):
        ref = temp * temp * _kl_rows((t / temp).softmax(-1), (s / temp).softmax(-1))
        assert math.isclose(kd_loss(s, t, temp).item(), ref, rel_tol=1e-10)
    assert kd_loss(t, t, 3.0).abs() < 1e-12


def _project_by_loops(a: torch.Tensor, p: torch.Tensor, prefix: int) -> torch.Tensor:
    """B[r, c] = sum_i sum_j P[r, i] A[i, j] P[c, j] / sum_c' P[c', j], with the prefix tokens
    mapped to themselves (weight 1)."""
    m, n = p.shape
    w = [[1.0 if r == i else 0.0 for i in range(prefix + n)] for r in range(prefix)]
    w += [[0.0] * prefix + p[r].tolist() for r in range(m)]
    col = [sum(w[r][j] for r in range(prefix + m)) for j in range(prefix + n)]
    out = torch.zeros(*a.shape[:-2], prefix + m, prefix + m, dtype=a.dtype)
    for r in range(prefix + m):
        for c in range(prefix + m):
            out[..., r, c] = sum(w[r][i] * a[..., i, j] * w[c][j] / col[j]
                                 for i in range(prefix + n) for j in range(prefix + n)
                                 if w[r][i] and w[c][j])
    return out


def test_project_map_matches_the_explicit_sum_for_pooling_and_soft_aggregation():
    torch.manual_seed(3)
    a = torch.randn(2, 2, 17, 17, dtype=torch.float64).softmax(-1)
    pool, _ = pooling_matrix((4, 4), 4)
    soft = torch.randn(3, 16, dtype=torch.float64).softmax(-1)  # soft weighted averages
    for p in (pool.double(), soft):
        got = project_map(a, p, 1)
        torch.testing.assert_close(got, _project_by_loops(a, p, 1))
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1], dtype=a.dtype))


def test_project_map_with_the_identity_or_no_aggregation_is_the_map_itself():
    a = torch.randn(1, 2, 18, 18).softmax(-1)
    assert project_map(a, None, 2) is a
    torch.testing.assert_close(project_map(a, torch.eye(16), 2), a)


def test_feature_loss_without_aggregation_is_the_relative_squared_error():
    torch.manual_seed(4)
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    by_hand = ((s - t) ** 2).sum() / (t ** 2).sum()
    torch.testing.assert_close(feature_loss(s, t, None, 1), by_hand)


def test_aggregation_path_multiplies_the_stages_before_each_block():
    student = hetvit.compress(tiny_vit(), Plan(pyramid=((1, 8), (3, 4))))
    first, second = (m.matrix().detach() for m in student.blocks
                     if isinstance(m, TokenAggregation))
    path = aggregation_path(student)
    assert sorted(path) == [0, 1, 2, 3] and path[0] is None
    torch.testing.assert_close(path[1], first)
    torch.testing.assert_close(path[2], first)
    torch.testing.assert_close(path[3], second @ first)
    assert not path[3].requires_grad


def test_capture_outputs_returns_the_outputs_in_order_and_removes_its_hooks():
    torch.manual_seed(5)
    a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    net = nn.Sequential(a, nn.ReLU(), b)
    x = torch.randn(6, 3)
    with capture_outputs([b, a]) as outs:
        net(x)
    assert len(outs) == 2
    torch.testing.assert_close(outs[0], net(x))
    torch.testing.assert_close(outs[1], a(x))
    assert not a._forward_hooks and not b._forward_hooks
