"""The ``--method`` options of ``bench`` and ``evaluate``: run a training-free baseline (ToMe,
EViT from :mod:`hetvit.baselines`) instead of a hetvit plan, to compare against it."""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import typer

from .app import fail, user_errors


def _method_options(
    method: Annotated[str | None, typer.Option(
        "--method", help="Reduce the model's tokens with a training-free baseline, to compare "
        "hetvit against: tome (token merging in every block, Bolya et al. 2023; needs --r) or "
        "evit (cls-attention pruning with a fused token, Liang et al. 2022; --keep-rate, "
        "--prune-layers). Written from the papers, for comparison.")] = None,
    r: Annotated[int | None, typer.Option(
        "--r", help="tome: tokens merged per block (clipped to half the patch tokens a block "
        "receives), e.g. 4 on the 65-token CIFAR-10 teacher.")] = None,
    schedule: Annotated[str | None, typer.Option(
        "--schedule", help="tome: constant (r in every block, default) or decreasing (2r in "
        "the first block down to 0 in the last, as many merges in all).")] = None,
    keep_rate: Annotated[float | None, typer.Option(
        "--keep-rate", help="evit: fraction of the patch tokens a pruning block keeps, in "
        "(0, 1]; the rest are fused into one token (default 0.7).")] = None,
    prune_layers: Annotated[str | None, typer.Option(
        "--prune-layers", help="evit: the blocks that prune, 0-based and comma-separated, e.g. "
        "3,6,9 (the default: a quarter, half and three quarters of the depth).")] = None,
) -> None:
    """The options choosing a baseline method: a signature, never called."""


METHOD_KEYS = tuple(inspect.signature(_method_options).parameters)


def pop_method_options(options: dict[str, Any]) -> dict[str, Any]:
    """Take the ``--method`` options out of a command's ``options`` (checked, one-line errors).

    Returns them; ``method`` is ``None`` when no baseline was asked for.
    """
    given = {k: options.pop(k, None) for k in METHOD_KEYS}
    method = given["method"]
    from ..baselines import METHODS, SCHEDULES

    if method is not None and method not in METHODS:
        fail(f"--method {method!r}: choose {' or '.join(METHODS)}")
    tome_only = [f"--{k.replace('_', '-')}" for k in ("r", "schedule") if given[k] is not None]
    evit_only = [f"--{k.replace('_', '-')}" for k in ("keep_rate", "prune_layers")
                 if given[k] is not None]
    if method != "tome" and tome_only:
        fail(f"{', '.join(tome_only)} go(es) with --method tome")
    if method != "evit" and evit_only:
        fail(f"{', '.join(evit_only)} go(es) with --method evit")
    if method == "tome" and given["r"] is None:
        fail("--method tome needs --r N (tokens merged per block)")
    if given["schedule"] is not None and given["schedule"] not in SCHEDULES:
        fail(f"--schedule {given['schedule']!r}: choose {' or '.join(SCHEDULES)}")
    if given["prune_layers"] is not None:
        try:
            given["prune_layers"] = [int(v) for v in given["prune_layers"].split(",")]
        except ValueError:
            fail(f"--prune-layers {given['prune_layers']!r}: give block indices like 3,6,9")
    return given


def apply_method(model: Any, options: dict[str, Any]) -> Any:
    """``model`` with the baseline of ``options`` (from :func:`pop_method_options`) applied,
    in eval mode; ``model`` itself when no method was asked for."""
    from .. import baselines
    from ..hosts import describe

    method = options["method"]
    if method is None:
        return model
    with user_errors():
        if method == "tome":
            return baselines.tome(model, options["r"], options["schedule"] or "constant").eval()
        depth = describe(model)["depth"]
        layers = options["prune_layers"] or sorted({depth // 4, depth // 2, 3 * depth // 4})
        keep = 0.7 if options["keep_rate"] is None else options["keep_rate"]
        return baselines.evit(model, keep, layers).eval()
