"""Shared fixtures: tiny timm ViTs that run in milliseconds on a CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(distilled: bool = False, **kwargs) -> VisionTransformer:
    """A 32x32, patch-8 ViT (a 4x4 grid of 16 patch tokens plus prefix tokens)."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    args.update(kwargs)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    torch.manual_seed(0)
    return cls(**args).eval()


def confident_vit() -> VisionTransformer:
    """A tiny teacher whose predictions differ from image to image (random weights alone give
    nearly uniform logits, which any student matches)."""
    model = tiny_vit()
    with torch.no_grad():
        model.head.weight.mul_(30)
    return model


def exports_with_parity(model: torch.nn.Module, path: Path) -> bool:
    """``model`` exports to ONNX at ``path`` and onnxruntime gives its outputs within 1e-4."""
    import hetvit

    result = hetvit.export_onnx(model, path, opset=17)
    return result.passed and result.parity[0].max_abs_diff <= 1e-4


def within_cluster_error(feats: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Reference: the sum over tokens (rows of ``feats``) of the squared distance to the mean
    of their cluster, for an aggregation matrix ``p`` that is a hard partition."""
    members = p > 1e-3
    centroids = (members.double() / members.sum(1, keepdim=True)) @ feats.double()
    return ((feats.double() - centroids[members.double().argmax(0)]) ** 2).sum()


def write_images(root: Path, folders: list[str], per_class: int = 3) -> None:
    """An ImageFolder of random-noise 32x32 PNGs, ``per_class`` in each of ``folders``."""
    rng = np.random.default_rng(1)
    for name in folders:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture
def vit() -> VisionTransformer:
    return tiny_vit()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


@pytest.fixture(autouse=True)
def _quiet_uniform_init():
    # Most tests compress without calibration on purpose; the warning is tested on its own.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no calibration data")
        yield
