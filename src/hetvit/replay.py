"""Replaying the teacher's front into its student during a fit.

A fit runs the frozen teacher on every view it shows the student. With the front of the
student frozen too (``FitConfig.freeze_early``, the default: the embeddings and every block
before the plan's first change keep the teacher's weights), the student's front computes on
that same view exactly the tokens the teacher's front just computed, and no gradient flows
into it. :func:`replaying_front` hands the student those tokens instead of computing them a
second time: for a plan whose first stage sits at block 5 of 12, that is five of the
student's blocks a step, about a fifth of a step's work; for a plan that changes block 0,
nothing.

The front's blocks are wrapped for the scope (:class:`ReplayedBlock`), so the host's own
forward still runs and every other module is untouched; a wrapper replays only while
:meth:`FrontReplay.tokens` is set, so any forward outside a step (timing, the agreement check,
a loss that shows the student another view than the teacher's) computes as before. While it
replays, the student's front runs as the teacher's does, in eval mode: a dropout in a frozen
front, which only noised the tokens a fit compares, is left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .hosts import host_of

__all__ = ["FrontReplay", "ReplayedBlock", "replaying_front"]


class FrontReplay:
    """What the student's front is handed during a step: the teacher's output of the last
    block before the first change (in whatever form the host's blocks return), or ``None``
    outside a step."""

    def __init__(self, depth: int, teacher_block: nn.Module) -> None:
        self.depth = depth
        self.teacher_block = teacher_block
        self.output: Any = None

    @contextmanager
    def tokens(self, output: Any) -> Iterator[None]:
        """For the scope, every front block of the student returns ``output``."""
        self.output = output
        try:
            yield
        finally:
            self.output = None


class ReplayedBlock(nn.Module):
    """A block of the student's front, which returns the teacher's front output while its
    replay has one and runs the block otherwise. Every front block returns the same output, so
    whatever the host's loop does with a block's result, the first block after the front gets
    exactly the teacher's tokens."""

    def __init__(self, block: nn.Module, replay: FrontReplay) -> None:
        super().__init__()
        self.block = block
        self.replay = replay

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.replay.output is not None:
            return self.replay.output
        return self.block(*args, **kwargs)


def _front(model: nn.Module, depth: int) -> list[torch.Tensor]:
    """The parameters and buffers that make a model's first ``depth`` blocks' output."""
    host = host_of(model)
    blocks = host.layers(model)[:depth]
    return [*host.embedding_parameters(model),
            *(t for b in blocks for t in (*b.parameters(), *b.buffers()))]


def _same_front(student: nn.Module, teacher: nn.Module, depth: int) -> bool:
    """Whether ``student``'s front is frozen and holds ``teacher``'s very values, so that on
    the same view it computes the teacher's tokens. (A student compressed from another
    checkpoint of the same architecture, distilled from this teacher, does not.)"""
    mine, theirs = _front(student, depth), _front(teacher, depth)
    return (not any(t.requires_grad for t in mine) and len(mine) == len(theirs)
            and all(a.shape == b.shape and torch.equal(a, b)
                    for a, b in zip(mine, theirs, strict=True)))


@contextmanager
def replaying_front(student: nn.Module, teacher: nn.Module, depth: int
                    ) -> Iterator[FrontReplay | None]:
    """For the scope, the first ``depth`` blocks of ``student`` can replay ``teacher``'s.

    Yields the :class:`FrontReplay` to feed, or ``None`` where replaying would change what the
    student computes: no front (``depth`` 0), a front with a weight that trains, or one whose
    weights are not the teacher's. ``student`` is a compressed model of ``teacher``'s
    architecture (:func:`hetvit.fitting.check_student`); its block sequence is put back as it
    was when the scope ends, also on error.
    """
    host = host_of(student)
    sequence = host.sequence(student)
    front = host.layers(student)[:depth]
    if depth < 1 or not _same_front(student, teacher, depth):
        yield None
        return
    replay = FrontReplay(depth, host_of(teacher).layers(teacher)[depth - 1])
    wrapped = {id(block): ReplayedBlock(block, replay) for block in front}
    host.set_sequence(student, [wrapped.get(id(m), m) for m in sequence])
    try:
        yield replay
    finally:
        host.set_sequence(student, sequence)
