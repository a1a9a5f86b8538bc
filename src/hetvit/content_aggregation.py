"""Content-aware GLAD: a pyramid stage whose matrix also reads the image it aggregates.

The paper's stage (:class:`~hetvit.aggregation.TokenAggregation`) uses one matrix for every
image: ``X' = softmax(W) X``. Here each of the ``M`` output tokens also has a learned query
that scores the normed input tokens, as in PatchMerger (Renggli et al., 2022):
``X' = softmax(W + Q LN(X)^T / sqrt(D)) X``. The queries start at zero, so a new stage is
exactly the static one it extends, and fitting or fine-tuning moves it only as far as the data
asks. The shapes stay fixed (one ``M x N`` matrix an image), so the model still exports to
ONNX and stays fast at batch 1; what it adds is a second ``M N D`` product and a softmax per
image, where the static stage reuses one cached matrix.

A plan asks for it with ``"aggregation": "content"`` (:class:`hetvit.Plan`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .aggregation import TokenAggregation

__all__ = ["ContentAggregation"]


class ContentAggregation(TokenAggregation):
    """Aggregate ``num_in`` patch tokens of width ``dim`` to ``num_out`` with
    ``P(X) = softmax(W + Q LN(X)^T / sqrt(D))``, ``Q`` (``num_out x dim``) starting at zero.

    :meth:`matrix` is the static part, ``softmax(W)``: what pooling or k-means set, and what
    the token sizes of a size-weighted head follow, and what maps the teacher's tokens onto
    the student's for token distillation and the guidance of static layers after a stage. An
    image's own matrix moves away from it only as far as its queries do, so those stay close.
    """

    def __init__(self, num_in: int, num_out: int, dim: int, num_prefix_tokens: int = 1,
                 grid_in: tuple[int, int] | None = None, eps: float = 1e-8) -> None:
        super().__init__(num_in, num_out, num_prefix_tokens, grid_in, eps)
        self.dim = dim
        self.query = nn.Parameter(torch.zeros(num_out, dim))

    @classmethod
    def for_plan(cls, num_in: int, num_out: int, dim: int, num_prefix_tokens: int,
                 grid_in: tuple[int, int]) -> ContentAggregation:
        return cls(num_in, num_out, dim, num_prefix_tokens, grid_in)

    def image_matrices(self, patches: torch.Tensor) -> torch.Tensor:
        """``B x M x N_p``: each image's aggregation matrix, from its ``B x N_p x D`` patches."""
        keys = F.layer_norm(patches, (self.dim,))
        scores = torch.matmul(self.query, keys.transpose(1, 2)) * self.dim ** -0.5
        return (self.weight + scores).softmax(dim=-1)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        self.check_tokens(x)
        k = self.num_prefix_tokens
        patches = x[:, k:]
        merged = torch.matmul(self.image_matrices(patches), patches)
        return torch.cat([x[:, :k], merged], dim=1) if k else merged

    @staticmethod
    def cost(num_in: int, num_out: int, dim: int) -> int:
        """The scores ``Q LN(X)^T`` and the product ``P(X) X``: ``2 M N D`` an image."""
        return 2 * num_out * num_in * dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, content-aware (dim {self.dim})"
