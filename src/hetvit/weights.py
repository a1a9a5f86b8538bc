"""Reading state dicts from weight files, whatever wrote them, with one-line errors.

Official DeiT ``.pth`` files keep the state dict under ``model``, Lightning ``.ckpt`` files
under ``state_dict`` (with a ``model.`` prefix from the module's attribute), EMA checkpoints
under ``model_ema``, timm files at the top level, ``.safetensors`` files as they are. Every
reader of a weights file goes through :func:`read_state_dict`, so all of them accept the same
files and say the same thing about a wrong one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import CheckpointError, MisshapenWeightsError

__all__ = ["read_state_dict", "load_strict"]

_NESTED = ("model", "state_dict", "model_ema")
_PREFIX = "model."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in the weights file ``path`` (on the CPU), unwrapped and unprefixed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}", path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors each raise their own
        raise CheckpointError(f"cannot read checkpoint {path}: {e}", path) from e
    for key in _NESTED:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds no state dict", path)
    if state and all(k.startswith(_PREFIX) for k in state):
        state = {k[len(_PREFIX):]: v for k, v in state.items()}
    return state


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or misshapen tensor is a
    :class:`CheckpointError` naming ``source`` (what a user must fix)."""
    own = model.state_dict()
    misshapen = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                 if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if misshapen:
        shown = "; ".join(f"{k}: {list(a)} in the checkpoint, {list(b)} in the model"
                          for k, a, b in misshapen[:2])
        raise MisshapenWeightsError(
            f"checkpoint {source} does not fit the model: {len(misshapen)} tensors differ in "
            f"shape ({shown}); it holds another architecture or size, so build the model it "
            "was saved from", Path(source))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # anything else the shapes did not show
        raise CheckpointError(f"checkpoint {source} does not fit the model: {e}",
                              Path(source)) from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {source} does not fit the model: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}",
                              Path(source))
