"""Reading what a model computes inside: attention maps and module inputs, by hooks.

Calibration, analysis, fine-tuning's guidance and fitting all need a layer's dynamic attention
map, which fused attention kernels never materialise. Hooks on the host's attention modules
recompute it from the layer's own q and k (:meth:`hetvit.hosts.base.Host.attention_map`) on
the very input the layer gets, and are removed when the scope ends, also on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .hosts import host_of

__all__ = ["attention_maps", "StopForward", "module_inputs", "capture_outputs"]


class StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of the forward pass."""


@contextmanager
def module_inputs(modules: Iterable[nn.Module],
                  on_input: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """For the scope, ``on_input(k, x)`` gets the first input of the ``k``-th of ``modules`` at
    each of its forwards (it may raise :class:`StopForward` to end the pass there)."""
    handles = []
    for k, module in enumerate(modules):
        def hook(mod: nn.Module, args: tuple, k: int = k) -> None:
            on_input(k, args[0])
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def attention_maps(model: nn.Module, layers: Iterable[int],
                   on_map: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """For the scope, every forward of ``model`` calls ``on_map(layer, map)`` with the dynamic
    attention map (``B x H x N x N``) of each plan layer in ``layers``."""
    host = host_of(model)
    blocks, layers = host.layers(model), list(layers)
    attentions = [host.attention(blocks[i]) for i in layers]

    def on_input(k: int, x: torch.Tensor) -> None:
        on_map(layers[k], host.attention_map(attentions[k], x))

    with module_inputs(attentions, on_input):
        yield


@contextmanager
def capture_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of ``modules`` (in that order) during the forward passes inside.

    The list is filled when the block exits, after the hooks are gone.
    """
    found: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, k=k: found.__setitem__(k, out))
             for k, m in enumerate(modules)]
    outputs: list[torch.Tensor] = []
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()
    outputs.extend(found[k] for k in range(len(modules)) if k in found)
