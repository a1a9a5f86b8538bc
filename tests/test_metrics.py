"""Top-k accuracy against a reference by sorting, and its edge cases."""

import torch

from hetvit.metrics import topk_correct


def test_topk_matches_a_reference_by_sorting():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=gen)
    target = torch.randint(0, 10, (200,), generator=gen)
    order = logits.argsort(dim=-1, descending=True)
    for k, hit in zip((1, 3, 5), topk_correct(logits, target, (1, 3, 5)), strict=True):
        rank = (order == target[:, None]).float().argmax(-1)  # position of the target
        assert torch.equal(hit, rank < k)


def test_topk_with_fewer_classes_than_k_counts_every_target():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    target = torch.tensor([0, 0])
    top1, top5 = topk_correct(logits, target)
    assert top1.tolist() == [False, True] and top5.tolist() == [True, True]
