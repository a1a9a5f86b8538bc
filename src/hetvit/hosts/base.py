"""What hetvit needs to know of a ViT library: the :class:`Host` protocol.

Compression, fitting, analysis, MAC counting and export never touch a library's attribute
names (timm's ``blocks``, ``attn``, ``qkv``, ...). They ask the model's host, which answers a
few questions about the model's structure and does the two edits the method makes: swap a
block's attention for a static one, and insert aggregation stages before blocks. Everything
else runs through the host library's own forward, so the compressed model stays a model of
that library.

Plan layers are transformer blocks counted from 0 in forward order; aggregation stages are not
layers. :meth:`Host.layers` is the one place that mapping is made.

The architecture description (``arch``) is a JSON-able dict that rebuilds the model; it always
holds the keys below, which the method and the MAC formula read, plus whatever the host needs:
``host``, ``img_size``, ``patch_size``, ``in_chans``, ``num_classes``, ``embed_dim``,
``depth``, ``num_heads``, ``mlp_ratio``, ``prefix_tokens``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..aggregation import TokenAggregation
from ..attention import Projections
from ..weights import load_strict

__all__ = ["Host", "Projections", "Arch"]

Arch = dict[str, Any]


class Host(ABC):
    """A ViT library hetvit can compress. One instance per library, stateless."""

    name: ClassVar[str]
    supported: ClassVar[str]  # what it compresses, in words, for error messages

    # ------------------------------------------------------------------ the model as a whole
    @abstractmethod
    def claims(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this host's library (supported or not)."""

    @abstractmethod
    def check(self, model: nn.Module) -> None:
        """Raise :class:`~hetvit.errors.UnsupportedModelError` naming what is missing, unless
        the method can compress ``model``."""

    @abstractmethod
    def describe(self, model: nn.Module) -> Arch:
        """The architecture of an uncompressed, supported ``model`` (see the module doc)."""

    @abstractmethod
    def build(self, arch: Mapping[str, Any]) -> nn.Module:
        """An uninitialised model of architecture ``arch``."""

    def load_weights(self, model: nn.Module, state: Mapping[str, torch.Tensor], source: Path
                     ) -> None:
        """Load a state dict read from ``source`` into ``model``, strictly."""
        load_strict(model, state, source)

    @abstractmethod
    def data_config(self, model: nn.Module) -> dict[str, Any]:
        """The model's eval preprocessing, with timm's data-config keys: ``input_size``,
        ``mean``, ``std``, ``interpolation``, ``crop_pct``."""

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What ``model`` outputs for images ``x`` as one tensor (``B x classes``): what
        evaluation, distillation and export compare. Libraries whose forward returns an
        output object say which of its fields it is."""
        return model(x)

    def head_macs(self, arch: Mapping[str, Any]) -> int:
        """MACs per image after the last block: one classifier (two with a distillation
        head) on the pooled token."""
        heads = 2 if arch.get("distilled") else 1
        return heads * int(arch["embed_dim"]) * int(arch["num_classes"])

    @abstractmethod
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The token features before the head (``B x N x D``), by the library's own code."""

    def classifier(self, model: nn.Module) -> nn.Module | None:
        """The module that turns the pooled, normed token into the logits, whose input is the
        model's pre-logit feature (``None``: the model's output is that feature itself)."""
        return None

    # ------------------------------------------------------------------ structure
    @abstractmethod
    def embedding_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters that make the first block's input (patch embedding, prefix tokens,
        position embeddings, any norm before the blocks): exactly those it depends on."""

    @abstractmethod
    def sequence(self, model: nn.Module) -> list[nn.Module]:
        """Blocks and aggregation stages in forward order."""

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks, indexed by plan layer (aggregation stages skipped)."""
        return [b for b in self.sequence(model) if not isinstance(b, TokenAggregation)]

    def stages(self, model: nn.Module) -> list[TokenAggregation]:
        """The aggregation stages, in forward order."""
        return [b for b in self.sequence(model) if isinstance(b, TokenAggregation)]

    @abstractmethod
    def set_sequence(self, model: nn.Module, modules: list[nn.Module]) -> None:
        """Replace the model's block sequence with ``modules`` (blocks and stages)."""

    def insert_stages(self, model: nn.Module, stages: Mapping[int, nn.Module]) -> None:
        """Put ``stages[i]`` right before plan layer ``i``."""
        sequence: list[nn.Module] = []
        for i, block in enumerate(self.layers(model)):
            if i in stages:
                sequence.append(stages[i])
            sequence.append(block)
        self.set_sequence(model, sequence)

    @abstractmethod
    def attention(self, block: nn.Module) -> nn.Module:
        """A block's attention module (dynamic, or a static one hetvit put there)."""

    @abstractmethod
    def set_attention(self, block: nn.Module, attention: nn.Module) -> None:
        """Swap a block's attention module."""

    @abstractmethod
    def is_dynamic(self, attention: nn.Module) -> bool:
        """Whether ``attention`` is this library's softmax attention, which hetvit can read."""

    @abstractmethod
    def attention_map(self, attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention map (``B x H x N x N``) ``attention`` computes for input ``x``,
        from its query and key projections (whatever fused kernel its forward uses)."""

    @abstractmethod
    def projections(self, attention: nn.Module) -> Projections:
        """Copies of the value and output projections of a dynamic ``attention``."""

    def sequence_position(self, node_name: str) -> int | None:
        """The position in :meth:`sequence` of the module an exported ONNX node belongs to,
        from its scoped name (the exporter scopes node names by module path; each host knows
        how its path reads), or None."""
        return None

    def module_of_node(self, model: nn.Module, node_name: str) -> nn.Module | None:
        """The block or aggregation stage of :meth:`sequence` an exported ONNX node belongs to,
        or None (the stem, the head)."""
        position = self.sequence_position(node_name)
        sequence = self.sequence(model)
        return sequence[position] if position is not None and position < len(sequence) else None

    def layer_of_node(self, model: nn.Module, node_name: str) -> int | None:
        """The plan layer an exported ONNX node belongs to, or None (not in a block, or in an
        aggregation stage)."""
        position = self.sequence_position(node_name)
        sequence = self.sequence(model)
        if position is None or position >= len(sequence) or isinstance(sequence[position],
                                                                        TokenAggregation):
            return None
        return sum(not isinstance(b, TokenAggregation) for b in sequence[:position])

    # ------------------------------------------------------------------ geometry of an arch
    def prefix_tokens(self, arch: Mapping[str, Any]) -> int:
        """Tokens before the patch tokens (cls, distillation, registers): never aggregated."""
        return int(arch["prefix_tokens"])

    def token_grid(self, arch: Mapping[str, Any]) -> tuple[int, int]:
        """The patch token grid ``(rows, cols)``."""
        (h, w), (ph, pw) = arch["img_size"], arch["patch_size"]
        return h // ph, w // pw

    def input_size(self, arch: Mapping[str, Any]) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one input image."""
        return (int(arch["in_chans"]), *map(int, arch["img_size"]))
