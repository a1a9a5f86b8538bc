"""Merging GLAD: a pyramid stage that merges each image's most alike tokens, to a fixed count.

The paper's stage (:class:`~hetvit.aggregation.TokenAggregation`) averages the same windows of
every image, so a model compressed with it loses 8-30 points until it is fitted. Token merging
(Bolya et al., 2023) loses far less without any training, because it averages only tokens that
already carry the same content. This stage brings that to GLAD's place in the network: the
patch tokens are split in two alternating sets ``A`` (even positions) and ``B`` (odd), every
token of ``A`` finds its most similar token of ``B`` (cosine of the tokens), and the ``r = N - M``
best-matched ones are averaged into their match; the rest of ``A`` and all of ``B`` go on. The
output count ``M`` is fixed by the plan, so the shapes stay fixed and the model exports to
ONNX. A stage can at most halve the tokens (``r <= |A|``). It costs a few dozen small ops, which
show at batch 1 (docs/fitting.md, "Merging stages", has what it measured).

Who merges with whom is a discrete choice, so no gradient flows through it; the merged values
are plain averages of the inputs, so gradients reach every block before the stage. For the same
reason small changes in the tokens flip it: an int8 model no longer merges as the fp32 one does.
The stage has no parameters of its own. Its :meth:`matrix` is the average pooling the static
stage starts from: what the bookkeeping that needs one matrix for every image (the token sizes
of a size-weighted head, the teacher-to-student token map of token distillation) falls back on.

A plan asks for it with ``"aggregation": "merge"`` (:class:`hetvit.Plan`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .aggregation import TokenAggregation
from .errors import PlanError

__all__ = ["MergeAggregation"]


class MergeAggregation(TokenAggregation):
    """Merge ``num_in`` patch tokens to ``num_out`` by bipartite matching on cosine similarity.

    The output is the ``|B|`` tokens of ``B`` (each averaged with the tokens of ``A`` merged
    into it), then the unmerged tokens of ``A`` in their input order. Prefix tokens pass through.
    """

    def __init__(self, num_in: int, num_out: int, num_prefix_tokens: int = 1,
                 grid_in: tuple[int, int] | None = None, eps: float = 1e-8) -> None:
        super().__init__(num_in, num_out, num_prefix_tokens, grid_in, eps)
        self.num_a, self.num_b = _halves(num_in)
        self.merges = num_in - num_out
        if self.merges > self.num_a:
            raise PlanError(f"a merging stage can at most halve the tokens: {num_in} -> {num_out} "
                            f"needs at least {num_in - self.num_a}")
        # Not learned: the pooling the static stage would start from, kept for matrix().
        pool = self.weight.detach()
        del self.weight
        self.register_buffer("weight", pool)

    def destinations(self, patches: torch.Tensor) -> torch.Tensor:
        """``B x |A|``: the output token each token of ``A`` goes to.

        A merged token goes to its match's row (``0 .. |B|-1``); a kept one to ``|B| + j``,
        ``j`` its place among the kept tokens of ``A`` in input order. Written with ranks,
        cumulative sums and ``where`` rather than scatters, so it exports as it is.
        """
        feats = F.normalize(patches, dim=-1)
        similarity = torch.matmul(feats[:, 0::2], feats[:, 1::2].transpose(1, 2))
        best, match = similarity.max(dim=-1)
        rank = best.argsort(dim=-1, descending=True).argsort(dim=-1)
        merged = rank < self.merges
        kept_place = torch.cumsum((~merged).long(), dim=-1) - 1 + self.num_b
        return torch.where(merged, match, kept_place)

    def _members(self, patches: torch.Tensor) -> torch.Tensor:
        """``B x M x |A|``, one-hot: which output token each token of ``A`` goes to."""
        rows = torch.arange(self.num_out, device=patches.device)
        return (rows[None, :, None] == self.destinations(patches)[:, None, :]).to(patches.dtype)

    def image_matrices(self, patches: torch.Tensor) -> torch.Tensor:
        """``B x M x N_p``: each image's aggregation matrix (rows average their members)."""
        b, n = patches.shape[:2]
        p = patches.new_zeros(b, self.num_out, n)
        p[:, :, 0::2] = self._members(patches)
        p[:, :self.num_b, 1::2] = torch.eye(self.num_b, dtype=patches.dtype, device=patches.device)
        return p / p.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        self.check_tokens(x)
        k = self.num_prefix_tokens
        patches = x[:, k:]
        a, b = patches[:, 0::2], patches[:, 1::2]
        onehot = self._members(patches)
        sums = torch.matmul(onehot, a)
        counts = onehot.sum(dim=-1, keepdim=True)
        sums = torch.cat([sums[:, :self.num_b] + b, sums[:, self.num_b:]], dim=1)
        counts = torch.cat([counts[:, :self.num_b] + 1, counts[:, self.num_b:]], dim=1)
        merged = sums / counts
        return torch.cat([x[:, :k], merged], dim=1) if k else merged

    @staticmethod
    def cost(num_in: int, num_out: int, dim: int) -> int:
        """The similarities (``|A| |B| D``) and the one-hot sums (``M |A| D``) an image."""
        num_a, num_b = _halves(num_in)
        return (num_a * num_b + num_out * num_a) * dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merging"


def _halves(num_in: int) -> tuple[int, int]:
    """Sizes of the alternating sets ``A`` (even positions) and ``B`` (odd) of ``num_in`` tokens."""
    return (num_in + 1) // 2, num_in // 2
