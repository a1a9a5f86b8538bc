"""The order a run reads its images in: reproducible per epoch, and split over DDP processes.

Both samplers are :class:`~torch.utils.data.DistributedSampler` subclasses, which is how
Lightning knows to leave them in place instead of wrapping them in its own (whose shuffle
would not follow hetvit's seeds, and whose validation shards repeat images to even out their
lengths). They read the shard, ``(rank, world size)``, from the process group each time they
are iterated, because a run builds its loaders before Lightning has started the processes.
Outside a process group they are one shard holding everything.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from .distributed import shard

__all__ = ["EpochShuffleSampler", "InOrderShards", "seed_everything_quietly"]


def seed_everything_quietly(seed: int) -> None:
    """Seed ``random``, numpy and torch (Lightning's ``seed_everything`` without its log)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class _Shards(DistributedSampler):
    """What both samplers share: the shard from the process group, and no base ``__init__``
    (which would fix the shard when the loader is built, before the processes exist)."""

    def __init__(self, size: int) -> None:
        self.size = size

    @property
    def rank(self) -> int:  # type: ignore[override]
        return shard()[0]

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return shard()[1]


class EpochShuffleSampler(_Shards):
    """A shuffle, and a random stream for augmentation, that depend only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before each epoch. When the epoch's indices are drawn, the
    global ``random`` / numpy / torch generators are reseeded from ``(seed, epoch, rank)``, and
    so is ``generator`` (the DataLoader's, from which worker seeds derive). The epoch's random
    numbers (crops, flips, drop-path) thus start from a known state exactly where its data
    starts, and a run resumed from a checkpoint draws the same ones as an uninterrupted run. A
    reseed in an ``on_train_epoch_start`` hook would not do: on resume Lightning creates the
    data iterator, and prefetches a batch, before that hook runs.

    Under DDP every process draws the same permutation of the whole set and takes every
    ``world``-th index of it, from its rank on; the tail that would leave the shards uneven
    (fewer than ``world`` images) is left out of that epoch, as DDP needs every process to
    take the same number of steps. So with a per-process batch ``b``, step ``k`` of the
    processes together reads exactly batch ``k`` of a single process with batch ``world * b``.

    Iterated twice without a ``set_epoch`` in between (a plain loop), the sampler moves to the
    next epoch by itself, so epochs never repeat the same order and augmentations.
    """

    def __init__(self, size: int, seed: int = 0, reseed: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(size)
        self.seed, self.reseed, self.epoch = seed, reseed, 0
        self.generator = generator
        self.set_epoch(0)

    def epoch_seed(self) -> int:
        return (self.seed * 1_000_003 + self.epoch * 1009) % (2**31)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._used = False
        if self.generator is not None:
            self.generator.manual_seed(self.epoch_seed())

    def __len__(self) -> int:
        return self.size // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        if self._used:
            self.set_epoch(self.epoch + 1)
        self._used = True
        rank, world = shard()
        seed = self.epoch_seed()
        if self.reseed:
            seed_everything_quietly(seed + 7919 * rank)
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed))
        return iter(order[: world * (self.size // world)][rank::world].tolist())


class InOrderShards(_Shards):
    """Every image exactly once, in order, split over the processes (validation).

    Process ``r`` of ``world`` takes indices ``r, r + world, ...``; shards may differ in length
    by one, which validation allows (no gradients are synchronised) and which keeps the
    reduced metrics equal to a single process's: no image is repeated or left out.
    """

    def set_epoch(self, epoch: int) -> None:  # the order is the same every epoch
        pass

    def __len__(self) -> int:
        rank, world = shard()
        return len(range(rank, self.size, world))

    def __iter__(self) -> Iterator[int]:
        rank, world = shard()
        return iter(range(rank, self.size, world))
