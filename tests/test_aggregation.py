import pytest
import torch
import torch.nn.functional as F

from hetvit.aggregation import TokenAggregation, cluster_matrix, clustering_cost, pooling_matrix

from .conftest import within_cluster_error


def test_identity_aggregation_is_a_no_op():
    agg = TokenAggregation(16, 16, num_prefix_tokens=1, grid_in=(4, 4))
    agg.set_matrix(torch.eye(16), eps=1e-9)
    x = torch.randn(3, 17, 8)
    torch.testing.assert_close(agg(x), x, atol=1e-5, rtol=0)


def _pool_tokens(x: torch.Tensor, grid, kernel) -> torch.Tensor:
    """Reference: avg_pool2d on the token grid, back to a raster token sequence."""
    b, n, d = x.shape
    img = x.transpose(1, 2).reshape(b, d, *grid)
    return F.avg_pool2d(img, kernel).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("grid,m,kernel", [((4, 4), 4, (2, 2)), ((14, 14), 49, (2, 2)),
                                           ((14, 14), 98, (1, 2)), ((8, 8), 32, (1, 2)),
                                           ((6, 4), 6, (2, 2))])
def test_pooling_init_equals_avg_pool2d(grid, m, kernel):
    n = grid[0] * grid[1]
    agg = TokenAggregation(n, m, num_prefix_tokens=2, grid_in=grid)
    x = torch.randn(2, 2 + n, 5)
    out = agg(x)
    torch.testing.assert_close(out[:, :2], x[:, :2])  # prefix tokens untouched
    torch.testing.assert_close(out[:, 2:], _pool_tokens(x[:, 2:], grid, kernel), atol=1e-5, rtol=0)


def test_pooling_matrix_rows_are_convex_and_grids_follow_the_shape():
    p, grid = pooling_matrix((7, 7), 25)  # 7x7 -> 5x5: overlapping adaptive windows
    assert grid == (5, 5)
    torch.testing.assert_close(p.sum(1), torch.ones(25))
    assert (p >= 0).all()
    _, grid = pooling_matrix((14, 14), 98)
    assert grid == (14, 7)
    p, grid = pooling_matrix((4, 4), 13)  # prime: no fitting grid, 1-D pooling of the raster
    assert grid == (1, 13) and p.shape == (13, 16)


def test_aggregation_matrix_is_row_stochastic_and_trainable():
    agg = TokenAggregation(16, 4, grid_in=(4, 4)).train()
    agg(torch.randn(2, 17, 3)).sum().backward()
    assert agg.weight.grad is not None
    torch.testing.assert_close(agg.matrix().sum(-1), torch.ones(4))


def test_wrong_token_count_is_a_clear_error():
    agg = TokenAggregation(16, 4, num_prefix_tokens=1, grid_in=(4, 4))
    with pytest.raises(ValueError, match="expects 1 prefix \\+ 16 patch tokens, got 10"):
        agg(torch.randn(1, 10, 3))


def test_clustering_cost_is_the_squared_distance_to_each_centroid():
    torch.manual_seed(0)
    feats = torch.randn(12, 7, dtype=torch.float64)
    p, _ = pooling_matrix((3, 4), 4)  # overlapping windows: soft centroids are fine too
    reference = torch.cdist(p.double() @ feats, feats) ** 2
    torch.testing.assert_close(clustering_cost(feats @ feats.T, p), reference)


def test_clustering_finds_the_tokens_that_are_alike():
    torch.manual_seed(0)
    pairs = [(0, 7), (1, 6), (2, 5), (3, 4)]  # alike tokens that no 2x4 pooling window holds
    feats = torch.zeros(8, 20)
    for a, b in pairs:
        feats[a] = feats[b] = torch.randn(20)
    start, _ = pooling_matrix((2, 4), 4)
    p = cluster_matrix(feats @ feats.T, start)
    found = {tuple(row.nonzero().flatten().tolist()) for row in p}
    assert found == set(pairs)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    assert within_cluster_error(feats, p) < 1e-9 < within_cluster_error(feats, start)


def test_clustering_never_does_worse_than_the_pooling_it_starts_from():
    torch.manual_seed(0)
    feats = torch.randn(64, 30)
    start, _ = pooling_matrix((8, 8), 16)  # 2x2 windows: a hard partition too
    p = cluster_matrix(feats @ feats.T, start)
    assert within_cluster_error(feats, p) < within_cluster_error(feats, start)


def test_clustering_leaves_no_cluster_empty():
    feats = torch.ones(6, 3)  # all alike: plain k-means would put every token in one cluster
    start, _ = pooling_matrix((2, 3), 3)
    p = cluster_matrix(feats @ feats.T, start)
    assert ((p > 0).sum(0) == 1).all()  # every token in exactly one cluster
    assert ((p > 0).sum(1) >= 1).all()
    torch.testing.assert_close(p.sum(1), torch.ones(3))
