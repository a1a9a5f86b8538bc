"""Datasets: layouts, class maps, bad data, archive caching, and transforms."""

from __future__ import annotations

import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from hetvit import archives, data
from hetvit.data import DataError, make_loader, make_transform, open_dataset

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def write_folder(root: Path, classes: dict[str, tuple[int, int, int]] = COLOURS,
                 per_class: int = 2) -> Path:
    """An ImageFolder of solid-colour 32x32 PNGs."""
    for name, rgb in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), rgb).save(root / name / f"{i}.png")
    return root


def make_tar(src: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for item in sorted(src.iterdir()):
            tar.add(item, arcname=item.name)
    return archive


def test_folder_classes_and_targets(tmp_path):
    root = write_folder(tmp_path / "train", per_class=3)
    ds = open_dataset(tmp_path)  # the class root is found one level down
    assert ds.classes == ["blue", "green", "red"]
    assert ds.root == root
    assert sorted(ds.targets) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    img, target = ds[0]
    assert isinstance(img, Image.Image)
    assert img.getpixel((5, 5)) == COLOURS[ds.classes[target]]


def test_class_map_gives_map_indices_for_a_partial_folder_set(tmp_path):
    write_folder(tmp_path / "val", {"b": (1, 1, 1), "d": (2, 2, 2)})
    names = ["a", "b", "c", "d", "e"]
    (tmp_path / "synsets.txt").write_text("\n".join(names) + "\n")
    ds = open_dataset(tmp_path, class_map="auto")
    assert ds.classes == names
    # sorted folders would give b -> 0 and d -> 1; the map says 1 and 3
    assert sorted(set(ds.targets)) == [1, 3]
    for path, target in ds.samples:
        assert names[target] == path.parent.name
    explicit = open_dataset(tmp_path / "val", class_map=tmp_path / "synsets.txt")
    assert explicit.samples == ds.samples
    # without a map the folders are numbered by sorting, with a warning that a map is there
    with pytest.warns(UserWarning, match="synsets.txt looks like a class map"):
        assert sorted(set(open_dataset(tmp_path).targets)) == [0, 1]


def test_class_not_in_map_is_an_error_naming_it(tmp_path):
    write_folder(tmp_path, {"a": (1, 1, 1), "zebra": (2, 2, 2)})
    class_map = tmp_path / "map.txt"
    class_map.write_text("a\nb\n")
    with pytest.raises(DataError, match="not in the class map: zebra"):
        open_dataset(tmp_path, class_map=class_map)
    with pytest.warns(UserWarning, match="zebra"):
        ds = open_dataset(tmp_path, class_map=class_map, skip_unknown=True)
    assert ds.skipped_folders == ["zebra"]
    assert set(ds.targets) == {0} and len(ds) == 2


def test_auto_class_map_without_a_file_is_an_error(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(DataError, match="no synsets.txt"):
        open_dataset(tmp_path, class_map="auto")


def test_broken_image_is_warned_counted_and_skipped(tmp_path):
    write_folder(tmp_path, per_class=2)
    (tmp_path / "red" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    ds = open_dataset(tmp_path, transform=make_transform(_tiny_model()))
    assert len(ds) == 7
    loader = make_loader(ds, batch_size=4)
    seen = []
    with pytest.warns(UserWarning, match="broken.jpg"):
        for _images, targets in loader:
            seen.extend(targets.tolist())
    assert ds.skipped == 1
    assert sorted(seen) == [0, 0, 1, 1, 2, 2]  # the 6 good images, none dropped besides


def test_all_broken_batch_is_none(tmp_path):
    write_folder(tmp_path, {"a": (1, 2, 3)}, per_class=1)
    for i in range(2):
        (tmp_path / "a" / f"bad{i}.png").write_bytes(b"garbage")
    ds = open_dataset(tmp_path, transform=make_transform(_tiny_model()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(make_loader(ds, batch_size=2))
    # files sort as 0.png, bad0.png, bad1.png: the second batch holds only broken images
    assert batches[1] is None and ds.skipped == 2


def test_empty_folder_and_empty_dataset_are_errors(tmp_path):
    write_folder(tmp_path / "ds")
    (tmp_path / "ds" / "yellow").mkdir()
    with pytest.raises(DataError, match="yellow holds no images"):
        open_dataset(tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "missing")
    flat = tmp_path / "ds" / "red"  # images with no class folders
    with pytest.raises(DataError, match="holds images directly"):
        open_dataset(flat)


def test_archive_is_extracted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HETVIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    write_folder(src / "train")
    (src / "synsets.txt").write_text("red\ngreen\nblue\n")
    archive = make_tar(src, tmp_path / "set.tar.gz")
    first = open_dataset(archive, class_map="auto")
    assert first.root.parent.parent == tmp_path / "cache" / "data"
    assert first.classes == ["red", "green", "blue"]
    assert {p.parent.name: t for p, t in first.samples}["blue"] == 2

    def no_extraction(*args, **kwargs):
        raise AssertionError("the archive was extracted again")

    monkeypatch.setattr(tarfile, "open", no_extraction)
    second = open_dataset(archive, class_map="auto")
    assert second.samples == first.samples
    assert [p.name for p in (tmp_path / "cache" / "data").iterdir()] == [first.root.parent.name]


def test_extraction_is_safe_when_another_process_wins(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_folder(src / "test")
    archive = make_tar(src, tmp_path / "set.tar.gz")
    cache = tmp_path / "cache"
    real_rename = os.rename

    def lose_the_race(a, b):
        # Another process finishes first: the target appears just before our rename.
        Path(b).mkdir()
        real_rename(src, Path(b) / "from-the-winner")
        return real_rename(a, b)

    monkeypatch.setattr(data.os, "rename", lose_the_race)
    target = archives.extract_archive(archive, cache)
    assert (target / "from-the-winner").is_dir()  # the winner's copy is kept
    assert [p.name for p in cache.iterdir()] == [target.name]  # our temp dir is gone
    monkeypatch.undo()
    # an existing (complete) target is reused without unpacking
    assert archives.extract_archive(archive, cache) == target


def test_eval_transform_is_the_familys_centre_crop_at_the_models_size():
    import math

    from timm.data import resolve_model_data_config
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    model = _tiny_model()
    cfg = data.data_config(model)
    family = resolve_model_data_config(model)
    assert family["input_size"] == (3, 224, 224)  # the family's size would not fit the model
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == family["crop_pct"] < 1
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)

    def reference(crop_pct: float) -> torch.Tensor:
        """Resize the short side to size / crop_pct, centre-crop the size, normalise."""
        resized = TF.resize(image, math.floor(32 / crop_pct),
                            interpolation=InterpolationMode(cfg["interpolation"]))
        return (TF.to_tensor(TF.center_crop(resized, 32)) - mean) / std

    torch.testing.assert_close(make_transform(model)(image), reference(cfg["crop_pct"]),
                               atol=1e-5, rtol=0)
    model.pretrained_cfg = {"crop_pct": 1.0}  # a model that says so keeps every pixel
    whole = make_transform(model)(image)
    torch.testing.assert_close(whole, (TF.to_tensor(image) - mean) / std, atol=1e-5, rtol=0)
    train = make_transform(model, training=True, scale=(0.6, 1.0))
    assert train(image).shape == (3, 32, 32)


def test_shuffle_order_depends_only_on_seed_and_epoch():
    a, b = data.EpochShuffleSampler(50, seed=3), data.EpochShuffleSampler(50, seed=3)
    first = list(a)
    assert list(b) == first and sorted(first) == list(range(50))
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    assert list(data.EpochShuffleSampler(50, seed=4)) != first
    # without set_epoch (a plain loop) each pass is the next epoch, not a repeat
    c = data.EpochShuffleSampler(50, seed=3)
    assert [list(c), list(c)] == [first, second]


def _tiny_model() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=3)


def test_skip_count_is_shared_with_loader_workers(tmp_path):
    write_folder(tmp_path, per_class=2)
    for name in ("bad1.jpg", "bad2.png"):
        (tmp_path / "green" / name).write_bytes(b"not an image")
    ds = open_dataset(tmp_path, transform=make_transform(_tiny_model()))
    n = sum(len(t) for _, t in make_loader(ds, batch_size=3, workers=2))
    assert (n, ds.skipped) == (6, 2)  # counted although the workers did the loading


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "v0"])
def test_posterize_at_zero_bits_gives_a_black_image(policy):
    """timm's policies can ask for 0 bits, which Pillow 13 refuses; hetvit's op blacks out."""
    transform = make_transform(_tiny_model(), training=True, auto_augment=policy)
    ops = [op for op in data.augment_ops(transform) if op.name.startswith("Posterize")]
    assert ops
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for op in ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # RandAugment's 0-bit case
        out = op(image) if op.name == "PosterizeIncreasing" else op.aug_fn(image, 0)
        assert out.size == image.size and np.asarray(out).max() == 0
        np.testing.assert_array_equal(np.asarray(op.aug_fn(image, 3)),
                                      np.asarray(image) & 0b11100000)  # 3 bits kept
        assert op.aug_fn(image, 8) is image
