"""Image datasets for training and evaluation: ImageFolder directories and ``.tar.gz`` archives.

An archive is unpacked once into a cache directory keyed by its SHA-256, so every later open
(and every process) reuses the same files. Class indices come either from the sorted folder
names or from a class map file (one class name a line, line ``i`` is class ``i``); the latter is
what partial sets such as a 725-class ImageNet sample need, where sorting the folders would give
wrong indices. Broken images are skipped with a warning and counted, never silently dropped.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .archives import ARCHIVE_SUFFIXES, extract_archive, is_archive
from .errors import DataError
from .hosts import host_of
from .labels import class_names
from .samplers import EpochShuffleSampler, InOrderShards

__all__ = [
    "DataError",
    "ImageDataset",
    "open_dataset",
    "open_for_model",
    "make_loader",
    "make_transform",
    "data_config",
    "read_class_map",
    "random_subset",
    "open_images",
    "sample_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".gif", ".tif",
                    ".tiff")
CLASS_MAP_NAMES = ("synsets.txt", "class_map.txt", "classes.txt")

ClassMapArg = str | os.PathLike | Sequence[str] | dict[str, int] | None


# --------------------------------------------------------------------------------------------
# layout and class maps


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_images(path: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir() if p.is_file())


def _find_class_root(top: Path) -> Path:
    """The directory whose sub-folders are the classes.

    An archive unpacks to ``<split>/<class>/<img>``, so descend through single sub-folders until
    one has sub-folders that hold images.
    """
    path = top
    while True:
        subdirs = _visible_dirs(path)
        if any(_has_images(d) for d in subdirs):
            return path
        if len(subdirs) == 1:
            path = subdirs[0]
            continue
        if not subdirs and _has_images(path):
            raise DataError(f"{path} holds images directly: put them in one sub-folder per "
                            "class (ImageFolder layout), or in a single sub-folder if the "
                            "labels do not matter")
        if not subdirs:
            raise DataError(f"no class folders with images under {top} (the dataset is empty)")
        raise DataError(
            f"cannot tell the class folders in {path}: none of its {len(subdirs)} folders holds "
            "images directly; point to the folder whose sub-folders are the classes"
        )


def _find_class_map_file(top: Path, class_root: Path) -> Path | None:
    for directory in dict.fromkeys([top, class_root, class_root.parent]):
        for name in CLASS_MAP_NAMES:
            if (directory / name).is_file():
                return directory / name
    return None


def read_class_map(path: str | os.PathLike) -> list[str]:
    """Class names from a file, one a line: line ``i`` (blank lines ignored) is class ``i``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class map not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"class map {path} is empty")
    if len(set(names)) < len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"class map {path} names a class twice: {', '.join(duplicates[:5])}")
    return names


def _resolve_class_map(class_map: ClassMapArg, top: Path, class_root: Path) -> list[str] | None:
    if class_map is None:
        return None
    if isinstance(class_map, dict):
        order = sorted(class_map, key=class_map.__getitem__)
        if [class_map[n] for n in order] != list(range(len(order))):
            raise DataError("a class map dict must map names to 0..n-1 without gaps")
        return order
    if isinstance(class_map, str | os.PathLike):
        if str(class_map) == "auto":
            found = _find_class_map_file(top, class_root)
            if found is None:
                raise DataError(
                    f"--class-map auto: no {' / '.join(CLASS_MAP_NAMES)} found in {top}")
            return read_class_map(found)
        candidate = Path(class_map)
        if not candidate.is_absolute() and not candidate.exists() and (top / candidate).is_file():
            candidate = top / candidate  # a name relative to the dataset root
        return read_class_map(candidate)
    return [str(n) for n in class_map]


# --------------------------------------------------------------------------------------------
# dataset


class ImageDataset(Dataset):
    """An ImageFolder-style dataset: ``samples`` are ``(path, class index)`` pairs.

    ``classes[i]`` is the name of class ``i`` (all classes of the class map when one is given,
    so ``len(classes)`` is the model's number of outputs). ``skipped`` counts images that failed
    to load; the counter is shared with data-loader worker processes so the total is right
    whatever the number of workers.
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str],
                 transform: Callable | None = None, root: Path | None = None,
                 skipped_folders: Sequence[str] = ()) -> None:
        self.samples = samples
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.transform = transform
        self.root = root
        self.skipped_folders = list(skipped_folders)
        self._skipped = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.samples]

    @property
    def skipped(self) -> int:
        """How many images could not be read so far (each was warned about)."""
        return int(self._skipped.value)

    def load(self, index: int) -> Image.Image | None:
        """The image as RGB, or ``None`` (after a warning) when the file is unreadable."""
        path, _ = self.samples[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            with self._skipped.get_lock():
                self._skipped.value += 1
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
            return None

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        img = self.load(index)
        if img is None:
            return None
        target = self.samples[index][1]
        return (self.transform(img) if self.transform is not None else img), target


def dataset_root(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 what: str = "data") -> Path:
    """The directory holding the images of ``path``: itself, or its archive unpacked into the
    cache (once per archive content)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} path not found: {path}")
    if is_archive(path):
        return extract_archive(path, cache_dir)
    if path.is_dir():
        return path
    kinds = ", ".join(ARCHIVE_SUFFIXES)
    raise DataError(f"{path} is neither a directory nor a tar archive ({kinds})")


def open_dataset(path: str | os.PathLike, transform: Callable | None = None,
                 class_map: ClassMapArg = None, skip_unknown: bool = False,
                 cache_dir: str | os.PathLike | None = None,
                 map_name: str = "the class map") -> ImageDataset:
    """Open an ImageFolder directory or a ``.tar.gz`` of one.

    ``class_map``: ``None`` (sorted folder names), ``"auto"`` (a ``synsets.txt`` /
    ``class_map.txt`` / ``classes.txt`` at the dataset root), a file path, or a list of names.
    With a map, a folder whose name the map lacks is an error, or, with ``skip_unknown``, is
    skipped with a warning; ``map_name`` says in those messages where the map came from.
    """
    top = dataset_root(path, cache_dir)
    class_root = _find_class_root(top)
    folders = _visible_dirs(class_root)
    mapped = _resolve_class_map(class_map, top, class_root)

    if mapped is None:
        found = _find_class_map_file(top, class_root)
        if found is not None:
            # Not used unasked (the spec of --class-map), but sorting the folders of a partial
            # set gives wrong indices, so say so.
            warnings.warn(f"{found} looks like a class map but none was asked for: class "
                          "indices follow the sorted folder names; pass class_map='auto' "
                          "(--class-map auto) to use it", stacklevel=2)
        classes = [f.name for f in folders]
        index_of = {name: i for i, name in enumerate(classes)}
        skipped_folders: list[str] = []
    else:
        classes = mapped
        index_of = {name: i for i, name in enumerate(classes)}
        unknown = [f.name for f in folders if f.name not in index_of]
        if unknown and not skip_unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            known = ", ".join(classes[:5]) + (" ..." if len(classes) > 5 else "")
            raise DataError(
                f"{len(unknown)} folder(s) in {class_root} are not in {map_name}: {shown} "
                f"(it names {known}; pass skip_unknown / --skip-unknown to leave them out)")
        if unknown:
            warnings.warn(f"skipping {len(unknown)} folder(s) not in {map_name}: "
                          f"{', '.join(unknown[:5])}", stacklevel=2)
        skipped_folders = unknown
        folders = [f for f in folders if f.name in index_of]

    samples: list[tuple[Path, int]] = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"class folder {folder} holds no images")
        samples.extend((p, index_of[folder.name]) for p in files)
    if not samples:
        raise DataError(f"no images found under {class_root}")
    return ImageDataset(samples, classes, transform, root=class_root,
                        skipped_folders=skipped_folders)


def open_for_model(path: str | os.PathLike, model: nn.Module, transform: Callable | None = None,
                   class_map: ClassMapArg = None, skip_unknown: bool = False,
                   cache_dir: str | os.PathLike | None = None,
                   purpose: str = "evaluating") -> ImageDataset:
    """Open a dataset whose labels are ``model``'s output indices.

    Sorting the folders gives the right labels only when the folders are exactly the model's
    classes; a subset or renamed folders would score a good model at 0% without a word. So a
    model that records its class names (:func:`hetvit.io.class_names`) maps every folder
    through them: an unknown folder is an error naming it, a given ``class_map`` must agree
    with them, and a subset of the classes is said (``purpose``: "evaluating", "training on").
    A model without names (an older checkpoint, a timm model) falls back to ``class_map`` or
    the sorted folders, with a warning when their count does not match the model's outputs.
    """
    names = class_names(model)
    outputs = getattr(model, "num_classes", None)
    if names is None:
        dataset = open_dataset(path, transform, class_map, skip_unknown, cache_dir)
        found = len(dataset.classes)
        if outputs is not None and found > outputs:
            raise DataError(f"{path} has {found} classes but the model outputs {outputs}; pass "
                            "--class-map if the folders are a subset of the model's classes")
        if outputs is not None and class_map is None and found != outputs:
            warnings.warn(f"the model records no class names and {path} holds {found} class "
                          f"folders for its {outputs} outputs: labels follow the sorted folder "
                          "names, right only if they are its first classes; pass --class-map "
                          "to say which classes they are", stacklevel=2)
        return dataset
    if class_map is not None:
        dataset = open_dataset(path, transform, class_map, skip_unknown, cache_dir)
        if dataset.classes != names:
            pairs = enumerate(zip(dataset.classes, names, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), min(len(dataset.classes), len(names)))
            mine = dataset.classes[at] if at < len(dataset.classes) else "(none)"
            theirs = names[at] if at < len(names) else "(none)"
            raise DataError(f"the class map disagrees with the model's recorded classes: class "
                            f"{at} is {mine!r} in the map, {theirs!r} in the model; drop "
                            "--class-map (the model's names are used)")
    else:
        dataset = open_dataset(path, transform, names, skip_unknown, cache_dir,
                               map_name="the model's recorded classes")
    present = sorted(set(dataset.targets))
    if len(present) < len(names):
        missing = [names[i] for i in range(len(names)) if i not in set(present)]
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        warnings.warn(f"{purpose} {len(present)} of the model's {len(names)} classes (no "
                      f"images of {shown}); labels follow the model's class names",
                      stacklevel=2)
    return dataset


# --------------------------------------------------------------------------------------------
# transforms


def data_config(model: nn.Module) -> dict[str, Any]:
    """The eval preprocessing of ``model`` (timm's data-config keys: ``input_size``,
    ``mean``, ``std``, ``interpolation``, ``crop_pct``), from its host
    (:meth:`hetvit.hosts.base.Host.data_config`), or the one an ONNX model carries
    (:class:`hetvit.onnx_model.OnnxClassifier`)."""
    recorded = getattr(model, "hetvit_data_config", None)
    if recorded is not None:
        return dict(recorded)
    return host_of(model).data_config(model)


def make_transform(model: nn.Module, training: bool = False, scale: tuple[float, float] = (
        0.08, 1.0), hflip: float = 0.5, color_jitter: float | None = None,
        auto_augment: str | None = None, re_prob: float = 0.0) -> Callable:
    """The timm transform for ``model``: light augmentation when ``training``, else eval."""
    from timm.data import create_transform

    cfg = data_config(model)
    if not training:
        return create_transform(**cfg, is_training=False)
    cfg.pop("crop_pct", None)
    cfg.pop("crop_mode", None)
    transform = create_transform(**cfg, is_training=True, scale=tuple(scale), hflip=hflip,
                                 color_jitter=color_jitter, auto_augment=auto_augment,
                                 re_prob=re_prob)
    for op in augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return transform


def augment_ops(transform: Callable) -> list[Any]:
    """The timm ``AugmentOp``s inside a transform's auto-augment step, if it has one."""
    ops: list[Any] = []
    for step in getattr(transform, "transforms", ()):
        ops += getattr(step, "ops", ())  # RandAugment, AugMix
        ops += [op for sub in getattr(step, "policy", ()) for op in sub]  # AutoAugment
    return ops


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, 0 bits included: a black image.

    timm's policies ask for 0 bits (RandAugment ``inc1`` at magnitude 10, which DeiT's
    ``rand-m9-mstd0.5-inc1`` reaches about one draw in forty; AutoAugment ``v0``), which older
    Pillow turned into a black image and Pillow 13 refuses with a ValueError, ending the epoch.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


# --------------------------------------------------------------------------------------------
# loading


def collate_skipping(batch: list[Any]) -> Any:
    """Default collation after dropping unreadable samples; ``None`` if none is left."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)


def random_subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """``n`` images drawn at random (seeded) in random order: classes mixed as in the set.

    The first ``n`` of an ImageFolder set would all come from its first class folders, which
    would bias a calibration or an analysis towards a few classes.
    """
    if n < 0:  # a slice would quietly take all but the last -n
        raise DataError(f"the number of images must be at least 0, got {n}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:n].tolist())


def make_loader(dataset: Dataset, batch_size: int = 128, shuffle: bool = False,
                workers: int = 0, seed: int = 0, drop_last: bool = False,
                shard: bool = False) -> DataLoader:
    """A DataLoader that skips unreadable images; with ``shuffle``, epochs are reproducible.

    The order and the augmentation randomness of epoch ``k`` depend only on ``(seed, k)``
    (see :class:`~hetvit.samplers.EpochShuffleSampler`), which is what makes an interrupted run
    resumable exactly. A shuffled loader is a training loader: under DDP each process reads
    its shard of every epoch. ``shard`` splits an in-order loader the same way, each image
    read once by one process (a run's validation; see :class:`~hetvit.samplers.InOrderShards`).
    """
    generator = torch.Generator() if shuffle else None
    sampler = (EpochShuffleSampler(len(dataset), seed, generator=generator) if shuffle
               else InOrderShards(len(dataset)) if shard else None)
    # Workers are restarted each epoch (not persistent) so that their seeds, drawn from
    # ``generator``, follow the epoch: that keeps resumed runs identical with workers too.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_skipping, drop_last=drop_last, generator=generator,
                      pin_memory=torch.cuda.is_available())


def open_images(path: str | os.PathLike, transform: Callable | None = None,
                cache_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Unlabeled images: every image file under a directory (or a ``.tar.gz`` of one), at any
    depth, in sorted order; the label of every sample is 0.

    What a fit needs: images of the model's domain, with or without class folders, whose names
    are never read (so no class map can be wrong).
    """
    top = dataset_root(path, cache_dir, what="image")
    files = sorted(p for p in top.rglob("*") if p.is_file() and p.suffix.lower() in
                   IMAGE_EXTENSIONS and not any(part.startswith(".") for part in
                                                p.relative_to(top).parts))
    if not files:
        raise DataError(f"no images found under {path} (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS[:4])}, ... at any depth)")
    return ImageDataset([(p, 0) for p in files], ["image"], transform, root=top)


def sample_images(path: str | os.PathLike, model: nn.Module, n: int, *, seed: int = 0,
                  batch_size: int = 64) -> DataLoader:
    """A loader of ``n`` images drawn at random (seeded) from the unlabeled images at ``path``
    (:func:`open_images`), through ``model``'s eval transform: what calibration and fitting
    read, whatever folders the images sit in."""
    dataset = open_images(path, make_transform(model, training=False))
    return make_loader(random_subset(dataset, min(n, len(dataset)), seed), batch_size=batch_size)
