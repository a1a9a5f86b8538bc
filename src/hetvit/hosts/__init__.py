"""The ViT libraries hetvit compresses, and how to find a model's.

Adding a library is one file here (a :class:`~hetvit.hosts.base.Host`), one entry in
:data:`HOSTS`, and one row in the host contract test (``tests/test_hosts.py``); see
``docs/design.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import Arch, Host
from .hf import HFHost
from .timm import TimmHost

__all__ = ["HOSTS", "Host", "Arch", "host_of", "host_for", "describe", "supported", "input_size",
           "logits"]

HOSTS: dict[str, Host] = {h.name: h for h in (TimmHost(), HFHost())}
DEFAULT_HOST = "timm"  # descriptions saved before hosts existed are timm's


def supported() -> str:
    """What hetvit compresses, in words, host by host."""
    return "; ".join(h.supported for h in HOSTS.values())


def host_for(arch: Mapping[str, Any]) -> Host:
    """The host of an architecture description."""
    name = arch.get("host", DEFAULT_HOST)
    if name not in HOSTS:
        raise UnsupportedModelError(f"unknown model host {name!r}; hetvit knows "
                                    f"{', '.join(HOSTS)}")
    return HOSTS[name]


def host_of(model: nn.Module) -> Host:
    """The host of ``model`` (compressed or not)."""
    source = getattr(model, "hetvit_source", None)
    if source is not None:
        return host_for(source)
    for host in HOSTS.values():
        if host.claims(model):
            return host
    raise UnsupportedModelError(f"{type(model).__name__} is not supported: hetvit compresses "
                                f"{supported()}")


def describe(model: nn.Module) -> Arch:
    """The architecture of ``model`` as a JSON-able dict that rebuilds it (see
    :mod:`hetvit.hosts.base`); for a compressed model, its source model's."""
    source = getattr(model, "hetvit_source", None)
    if source is not None:
        return copy.deepcopy(source)
    return host_of(model).describe(model)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one image ``model`` takes."""
    return host_of(model).input_size(describe(model))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s output for images ``x`` as one tensor (its host knows which field of an
    output object that is); a model no host claims is any classifier: ``model(x)``."""
    if getattr(model, "hetvit_source", None) is None and not any(
            h.claims(model) for h in HOSTS.values()):
        return model(x)
    return host_of(model).logits(model, x)
