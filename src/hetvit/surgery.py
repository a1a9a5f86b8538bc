"""Surgery: put DGSSA and GLAD into a ViT, through its host (see :mod:`hetvit.hosts`).

The compressed model stays a model of its library: static layers swap their attention
module, and aggregation stages are inserted into the block sequence, by the host. So the
library's own forward, heads and configs keep working.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .aggregation import TokenAggregation, cluster_matrix
from .attention import StaticAttention, warn_uniform
from .batches import image_batches, is_batches, size_mismatch
from .capture import StopForward, attention_maps, module_inputs
from .configs import AGGREGATION_INITS
from .data import sample_images
from .errors import DataError, PlanError, UsageError
from .grid import token_grid
from .hosts import describe, host_for, host_of, input_size
from .hosts.hf import load_hf
from .hosts.timm import create_timm_model
from .modes import eval_mode
from .plan import PRESETS, Plan
from .stages import make_stage
from .weights import read_state_dict

__all__ = ["compress", "describe", "build_model", "load_model", "load_weights",
           "is_compressed", "plan_of", "plan_for", "preset", "num_prefix_tokens",
           "source_mismatch"]


# ----------------------------------------------------------------------------- describe / build
def num_prefix_tokens(arch: dict[str, Any]) -> int:
    """Tokens before the patches (cls, distillation, registers) in architecture ``arch``."""
    return host_for(arch).prefix_tokens(arch)


def build_model(arch: dict[str, Any]) -> nn.Module:
    """An uninitialised model of architecture ``arch`` (from :func:`describe`)."""
    return host_for(arch).build(arch)


HF_PREFIX = "hf:"  # --model hf:DIR: a Hugging Face model directory


def load_model(name: str, checkpoint: str | Path | None = None, **overrides: Any) -> nn.Module:
    """A timm model by name, or ``hf:DIR`` (a local Hugging Face ``save_pretrained``
    directory), with weights from a local checkpoint file if one is given.

    Reads every file :func:`hetvit.weights.read_state_dict` reads. Without a checkpoint the
    weights of a timm model are random, and a warning says so; an HF directory holds its own.
    ``overrides`` are ``timm.create_model`` keywords; an HF model's sizes are its config's.
    """
    if name.startswith(HF_PREFIX):
        if overrides:
            raise UsageError(f"{', '.join(overrides)}: size options build timm models; an HF "
                             f"model's sizes are in its config.json")
        model = load_hf(name[len(HF_PREFIX):])
        if checkpoint is not None:
            load_weights(model, checkpoint)
        return model
    model = create_timm_model(name, **overrides)
    if checkpoint is None:
        warnings.warn(f"{name}: no checkpoint given, the weights are random (speed does not "
                      "depend on them, accuracy does)", stacklevel=2)
    else:
        load_weights(model, checkpoint)
    return model


def load_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Load a weights file into ``model`` with clear errors for a wrong or broken file."""
    host_of(model).load_weights(model, read_state_dict(checkpoint), Path(checkpoint))


def preset(name: str, model: nn.Module) -> Plan:
    """The preset ``name`` scaled to ``model`` (:meth:`hetvit.Plan.preset` takes its
    architecture)."""
    return Plan.preset(name, describe(model))


# ----------------------------------------------------------------------------- compress
def is_compressed(model: nn.Module) -> bool:
    return getattr(model, "hetvit_plan", None) is not None


def source_mismatch(student: nn.Module, teacher: nn.Module) -> list[str]:
    """How the architecture ``student`` was compressed from differs from ``teacher``'s, one
    ``"key: student's source X, teacher Y"`` a difference (the timm name aside, which a
    rebuilt model may lack); empty when ``teacher`` is the student's source architecture."""
    source, arch = describe(student), describe(teacher)
    return [f"{k}: student's source {source.get(k)!r}, teacher {arch.get(k)!r}"
            for k in sorted(set(source) | set(arch))
            if k != "name" and source.get(k) != arch.get(k)]


def plan_of(model: nn.Module) -> Plan:
    """The plan a model was compressed with (an empty plan for an uncompressed model)."""
    return getattr(model, "hetvit_plan", None) or Plan()


INITS = ("calibrate", "none")
CALIBRATION_IMAGES = 256  # drawn at random from a calibration folder or archive (as the CLI)


def plan_for(model: nn.Module, plan: Any) -> tuple[Plan, Path | None]:
    """``plan`` as a :class:`Plan`, and the file it came from: a preset name is scaled to
    ``model``, a path is loaded. Anything else is a :class:`UsageError` saying what to pass
    (not an ``AttributeError`` from deep inside)."""
    if isinstance(plan, Plan):
        return plan, None
    if isinstance(plan, str) and plan in PRESETS:
        return preset(plan, model), None
    if isinstance(plan, str | os.PathLike) and (str(plan).endswith(".json") or
                                                 Path(plan).exists()):
        return Plan.load(plan), Path(plan)
    raise UsageError(f"plan must be a hetvit.Plan, a preset name ({', '.join(PRESETS)}) or a "
                     f"plan JSON file, not {plan!r}")


def compress(model: nn.Module, plan: Plan | str | os.PathLike, calibration: Any = None, *,
             max_batches: int | None = None, init: str = "calibrate",
             aggregation_init: str = "pool") -> nn.Module:
    """A compressed copy of ``model``: static attention and token aggregation as ``plan`` says.

    Args:
        model: a ViT of a supported host (:func:`hetvit.hosts.supported`); it is not
            modified.
        plan: where to put static layers and pyramid stages, validated against ``model``: a
            :class:`Plan`, a preset name (``"fast"``, scaled to ``model``) or a plan JSON file.
        calibration: images to initialise the static maps from the layers' mean dynamic
            attention: a tensor ``B x C x H x W``, an iterable of tensors or
            ``(images, labels)`` batches (a DataLoader), or the path of an image folder or
            archive (:data:`CALIBRATION_IMAGES` random images, through ``model``'s eval
            transform). Without it the maps start uniform.
        max_batches: use at most this many calibration batches.
        init: ``"calibrate"`` (default), or ``"none"`` to leave the new parameters at their
            defaults (for loading saved weights into the structure).
        aggregation_init: ``"pool"`` starts every pyramid stage as average pooling of the token
            grid; ``"cluster"`` (needs ``calibration``) groups the tokens a stage receives by
            k-means over the calibration images (:func:`hetvit.aggregation.cluster_matrix`),
            stage by stage, before the static maps are calibrated through the result.
    """
    if aggregation_init not in AGGREGATION_INITS:
        raise UsageError(f"aggregation_init must be one of {AGGREGATION_INITS}, not "
                         f"{aggregation_init!r}")
    if init not in INITS:  # a typo would otherwise skip calibration without a word
        raise UsageError(f"init must be one of {INITS}, not {init!r}")
    plan, plan_file = plan_for(model, plan)
    cluster = aggregation_init == "cluster" and init == "calibrate" and bool(plan.pyramid)
    if cluster and calibration is None:
        raise UsageError("aggregation_init='cluster' groups tokens by what calibration images "
                         "show: give calibration images")
    if is_compressed(model):
        raise PlanError("this model is already compressed; compress its source model instead")
    host = host_of(model)
    arch = describe(model)
    grid = token_grid(arch)
    prefix = host.prefix_tokens(arch)
    try:
        plan.validate(arch["depth"], grid, tuple(arch["img_size"]))
    except PlanError as e:
        raise PlanError(f"{plan_file}: {e}" if plan_file else str(e)) from None
    if isinstance(calibration, str | os.PathLike):
        calibration = sample_images(calibration, model, CALIBRATION_IMAGES)
    elif calibration is not None and not is_batches(calibration):
        raise UsageError(f"calibration must be images (a B x C x H x W tensor, an iterable of "
                         f"batches such as a DataLoader) or an image folder or archive, not "
                         f"{type(calibration).__name__}")
    if plan.img_size is None:
        plan = replace(plan, img_size=tuple(arch["img_size"]))
    if not plan.source.get("name") and arch.get("name"):
        plan = plan.with_source(name=arch["name"])

    new = copy.deepcopy(model)
    layers = host.layers(new)
    device = next(new.parameters())
    stages: dict[int, TokenAggregation] = {}
    n, cur_grid = grid[0] * grid[1], grid
    tokens_at: dict[int, int] = {}
    pyramid = dict(plan.pyramid)
    for i in range(len(layers)):
        if i in pyramid:
            stages[i] = make_stage(plan.aggregation, n, pyramid[i], arch["embed_dim"],
                                   prefix, cur_grid).to(device)
            n, cur_grid = pyramid[i], stages[i].grid_out
        tokens_at[i] = prefix + n
    host.insert_stages(new, stages)

    if calibration is not None and iter(calibration) is calibration:
        calibration = list(calibration)  # a one-shot iterator; calibration may take several passes
    if cluster:
        _cluster_stages(new, prefix, calibration, max_batches)
    maps: dict[int, torch.Tensor | None] = dict.fromkeys(plan.static)
    if init == "calibrate" and plan.static and calibration is not None:
        maps = _calibrate(new, plan.static, calibration, max_batches)
    for i in plan.static:
        static = StaticAttention.from_projections(host.projections(host.attention(layers[i])),
                                                  tokens_at[i])
        if maps[i] is not None:
            static.set_map(maps[i])
        elif init == "calibrate":
            warn_uniform(i)
        host.set_attention(layers[i], static)

    new.hetvit_plan = plan
    new.hetvit_source = arch
    new.train(model.training)
    return new


@torch.no_grad()
def _calibrate(model: nn.Module, layers: Iterable[int], calibration: Any,
               max_batches: int | None) -> dict[int, torch.Tensor | None]:
    """Mean dynamic attention map of each layer in ``layers`` over the calibration images.

    Aggregation stages are already in place and attention is still dynamic, so each map has the
    token count the static layer will see.
    """
    sums: dict[int, torch.Tensor] = {}

    def add(i: int, attn_map: torch.Tensor) -> None:
        sums[i] = attn_map.sum(0) if i not in sums else sums[i] + attn_map.sum(0)

    with attention_maps(model, layers, add):
        count = _run_images(model, calibration, max_batches)
    if count == 0:  # given, but empty or all unreadable: not the same as giving none
        raise DataError("the calibration images hold no readable image: give images, or no "
                        "calibration to start the static maps uniform")
    return {i: sums[i] / count for i in layers}


@torch.no_grad()
def _cluster_stages(model: nn.Module, prefix: int, calibration: Any,
                    max_batches: int | None) -> None:
    """Start every aggregation stage from k-means of the patch tokens it receives.

    Stage by stage, since a stage's input depends on the stages before it. A token's
    descriptor is its layer-normalised feature in every calibration image (what the next
    block's attention sees, up to its affine), so the clusters are tokens that are alike
    across images; only their Gram matrix is accumulated.
    """
    for agg in host_of(model).stages(model):
        gram = torch.zeros(agg.num_in, agg.num_in, dtype=torch.float64)

        def add(_: int, x: torch.Tensor, gram: torch.Tensor = gram) -> None:
            x = x[:, prefix:].double()
            x = F.layer_norm(x, x.shape[-1:])
            gram.add_(torch.einsum("bnd,bmd->nm", x, x).cpu())
            raise StopForward

        with module_inputs([agg], add):
            count = _run_images(model, calibration, max_batches)
        if count == 0:
            raise DataError("aggregation_init='cluster': the calibration set holds no images")
        agg.set_matrix(cluster_matrix(gram, agg.matrix().detach().cpu()))


def _run_images(model: nn.Module, images: Any, max_batches: int | None) -> int:
    """Run ``images`` through ``model``'s features in eval mode; the number of images run."""
    host = host_of(model)
    count = 0
    param = next(model.parameters())
    want = input_size(model)
    with eval_mode(model):
        for b, x in enumerate(image_batches(images)):
            if max_batches is not None and b >= max_batches:
                break
            wrong = size_mismatch(x, want, "the calibration images")
            if wrong:
                raise DataError(wrong)
            try:
                host.features(model, x.to(param))
            except StopForward:
                pass
            count += x.shape[0]
    return count
