"""timm -> Hugging Face conversion: the committed CIFAR-10 teacher computes the same as an HF
``ViTForImageClassification``, and compressing either gives the same accuracy."""

from pathlib import Path

import pytest
import torch

import hetvit
from hetvit.demo import TEACHER, find_assets, sample_indices
from hetvit.errors import UnsupportedModelError
from hetvit.hosts import describe, logits

transformers = pytest.importorskip("transformers")
from hetvit.hosts.convert import timm_to_hf  # noqa: E402

CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test.tar.gz"


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = hetvit.load(find_assets() / TEACHER)
    return teacher, timm_to_hf(teacher)


def test_converted_teacher_gives_the_same_logits(pair):
    teacher, hf = pair
    assert type(hf).__name__ == "ViTForImageClassification"
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(logits(hf, x), teacher(x), atol=1e-4, rtol=1e-4)
    assert hetvit.flops.formula_macs(describe(hf)) == hetvit.flops.formula_macs(
        describe(teacher))


def test_converted_teacher_has_the_same_eval_transform(pair):
    from PIL import Image

    teacher, hf = pair
    image = Image.effect_noise((45, 37), 60).convert("RGB")
    same = [hetvit.data.make_transform(m)(image) for m in pair]
    assert torch.equal(same[0], same[1])


def test_only_plain_vits_convert():
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(UnsupportedModelError, match="reg_tokens=4"):
        timm_to_hf(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                     num_heads=2, reg_tokens=4))


@pytest.mark.skipif(not CIFAR_TEST.exists(), reason="needs ../shared/data beside the repository")
def test_compressing_either_gives_the_same_top1(pair):
    """The ``fast`` plan, calibrated on the same images, through the timm host and the HF host:
    the same top-1 (within 0.1 points) on 10 test images of every class."""
    from torch.utils.data import Subset

    from hetvit.data import make_loader, make_transform, open_dataset
    from hetvit.evaluation import evaluate

    teacher, hf = pair
    dataset = open_dataset(CIFAR_TEST, make_transform(teacher))
    subset = Subset(dataset, sample_indices(dataset.targets, 10))
    calibration = torch.stack([subset[i][0] for i in range(0, len(subset), 3)])
    results = []
    for model in pair:
        compressed = hetvit.compress(model, "fast", calibration)
        results.append(evaluate(compressed, make_loader(subset, batch_size=50)))
    assert results[0]["n"] == results[1]["n"] == 100
    assert abs(results[0]["top1"] - results[1]["top1"]) <= 0.001
    assert results[0]["top1"] > 0.3  # trained (chance: 0.1), not two guesses compared
