"""Surgery: put DGSSA and GLAD into a timm ``VisionTransformer``.

The compressed model stays a timm ``VisionTransformer``: static layers swap their ``attn``
module, and aggregation stages are inserted into ``blocks``. So ``forward_features``,
``forward_head``, ``pretrained_cfg`` and everything built on them keep working.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .aggregation import TokenAggregation, cluster_matrix
from .attention import StaticAttention, attention_map, is_dynamic_attention, warn_uniform
from .data import image_batches
from .plan import Plan, PlanError, token_grid

__all__ = ["compress", "describe", "build_model", "load_model", "create_timm_model",
           "UnsupportedModelError", "is_compressed", "plan_of"]

EXAMPLE_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                  "deit_small_distilled_patch16_224", "vit_base_patch16_224",
                  "deit3_small_patch16_224")
SUPPORTED = ("timm VisionTransformer models with a fixed input size: DeiT (tiny/small/base and "
             "the distilled variants), ViT (augreg) and DeiT-3 (LayerScale)")


class UnsupportedModelError(TypeError):
    """The model is not a ViT that hetvit knows how to compress."""


# ----------------------------------------------------------------------------- describe / build
def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"{type(model).__name__} is not supported: hetvit compresses "
                                    f"{SUPPORTED}")
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError("this ViT takes a dynamic image size; static attention and "
                                    "token aggregation need a fixed token count. Create the model "
                                    "with dynamic_img_size=False.")
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"ViTs with an attention-pooling head are not supported: "
                                    f"hetvit compresses {SUPPORTED}")
    if len(model.blocks) == 0:
        raise UnsupportedModelError("the model has no blocks (depth 0): there is no attention to "
                                    "compress")
    _check_patch_grid(model)
    for i, blk in enumerate(model.blocks):
        if isinstance(blk, TokenAggregation):
            continue
        attn = getattr(blk, "attn", None)
        if not (isinstance(attn, StaticAttention) or is_dynamic_attention(attn)):
            raise UnsupportedModelError(f"block {i} ({type(blk).__name__}) has no timm-style "
                                        f"attention; hetvit compresses {SUPPORTED}")


def _check_patch_grid(model: VisionTransformer) -> None:
    """Refuse a patch embedding whose tokens are not the ``img_size / patch_size`` grid.

    Plans, pooling windows and GMACs all follow that grid, so it must be what the embedding
    really outputs: one zero image (on the model's device, so a meta model costs nothing)
    goes through it and its tokens are counted. A hybrid ViT (a CNN stem, e.g. timm's
    ``vit_tiny_r_s16_p8_224``) gives a coarser grid than its patch size says, and a patch
    larger than the image gives none.
    """
    embed = model.patch_embed
    if getattr(embed, "backbone", None) is not None:
        raise UnsupportedModelError(f"hybrid ViTs are not supported: the tokens come from a CNN "
                                    f"stem ({type(embed.backbone).__name__}), not from patches; "
                                    f"hetvit compresses {SUPPORTED}")
    (h, w), (ph, pw) = embed.img_size, embed.patch_size
    if ph > h or pw > w:
        raise UnsupportedModelError(f"the patch ({ph}x{pw}) is larger than the image ({h}x{w}): "
                                    "the model has no patch tokens")
    param = next(embed.parameters())
    with torch.no_grad():
        tokens = embed(torch.zeros(1, embed.proj.in_channels, h, w, device=param.device,
                                   dtype=param.dtype))
    found = tokens.shape[1] * (tokens.shape[2] if tokens.ndim == 4 else 1)  # NLC or NHWC
    if found != (h // ph) * (w // pw):
        raise UnsupportedModelError(f"the patch embedding gives {found} tokens, not the "
                                    f"{h // ph}x{w // pw} grid of its {h}x{w} input and "
                                    f"{ph}x{pw} patches; hetvit compresses {SUPPORTED}")


def describe(model: nn.Module) -> dict[str, Any]:
    """The architecture of a timm ViT as keyword arguments that rebuild it.

    For a compressed model this is its source model's architecture.
    """
    if getattr(model, "hetvit_source", None) is not None:
        return copy.deepcopy(model.hetvit_source)
    _check_supported(model)
    blk = model.blocks[0]
    attn = blk.attn
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch: dict[str, Any] = {
        "name": cfg.get("architecture"),
        "distilled": isinstance(model, VisionTransformerDistilled),
        "img_size": list(model.patch_embed.img_size),
        "patch_size": list(model.patch_embed.patch_size),
        "in_chans": model.patch_embed.proj.in_channels,
        "num_classes": model.num_classes,
        "global_pool": model.global_pool,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": attn.num_heads,
        "mlp_ratio": blk.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": attn.qkv.bias is not None,
        "qk_norm": not isinstance(attn.q_norm, nn.Identity),
        "init_values": 1.0 if isinstance(blk.ls1, LayerScale) else None,
        "class_token": model.cls_token is not None,
        "reg_tokens": getattr(model, "num_reg_tokens", 0),
        "no_embed_class": model.no_embed_class,
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
    }
    return arch


def num_prefix_tokens(arch: dict[str, Any]) -> int:
    return int(arch["class_token"]) + int(arch["reg_tokens"]) + int(arch["distilled"])


_ARCH_KWARGS = ("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim",
                "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values",
                "class_token", "reg_tokens", "no_embed_class", "pre_norm", "fc_norm")


def build_model(arch: dict[str, Any]) -> VisionTransformer:
    """An uninitialised model of architecture ``arch`` (from :func:`describe`).

    A timm model name is rebuilt through ``timm.create_model`` so that what the description
    does not hold (activation, norm layers, pretrained_cfg) comes from timm itself.
    """
    kwargs = {k: arch[k] for k in _ARCH_KWARGS if k in arch}
    kwargs["img_size"] = tuple(kwargs["img_size"])
    kwargs["patch_size"] = tuple(kwargs["patch_size"])[0]
    name = arch.get("name")
    if name:
        return create_timm_model(name, **kwargs)
    kwargs["weight_init"] = "skip"
    cls = VisionTransformerDistilled if arch.get("distilled") else VisionTransformer
    return cls(**kwargs)


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with one-line errors.

    An unknown name gets the closest timm names and what hetvit supports; impossible settings
    (a width the heads do not divide, say: timm asserts) say which settings. Both are
    :class:`UnsupportedModelError`.
    """
    import difflib

    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnsupportedModelError(f"unknown timm model {name!r}.{hint} hetvit supports "
                                    f"{SUPPORTED}, e.g. {', '.join(EXAMPLE_MODELS)}.")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (AssertionError, TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        settings = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise UnsupportedModelError(f"timm cannot build {name} with {settings or 'defaults'}: "
                                    f"{e or type(e).__name__}") from e


def load_model(name: str, checkpoint: str | Path | None = None, **overrides: Any
               ) -> VisionTransformer:
    """A timm model by name, with weights from a local checkpoint file if one is given.

    Reads official DeiT ``.pth`` files (state dict under ``model``), Lightning ``.ckpt`` files
    (under ``state_dict``) and timm ``.pth`` / ``.safetensors`` files. Without a checkpoint the
    weights are random, and a warning says so.
    """

    model = create_timm_model(name, **overrides)
    if checkpoint is None:
        warnings.warn(f"{name}: no checkpoint given, the weights are random (speed does not "
                      "depend on them, accuracy does)", stacklevel=2)
    else:
        load_weights(model, checkpoint)
    return model


def load_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Load a state dict file into ``model`` with clear errors for a wrong or broken file."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds no state dict")
    prefix = "model."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"checkpoint {path} does not fit the model: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit the model: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


# ----------------------------------------------------------------------------- compress
def is_compressed(model: nn.Module) -> bool:
    return getattr(model, "hetvit_plan", None) is not None


def plan_of(model: nn.Module) -> Plan:
    """The plan a model was compressed with (an empty plan for an uncompressed model)."""
    return getattr(model, "hetvit_plan", None) or Plan()


AGGREGATION_INITS = ("pool", "cluster")
CALIBRATION_IMAGES = 256  # drawn at random from a calibration folder or archive (as the CLI)


def _plan_for(model: nn.Module, plan: Any) -> tuple[Plan, Path | None]:
    """``plan`` as a :class:`Plan`, and the file it came from: a preset name is scaled to
    ``model``, a path is loaded. Anything else is a ``TypeError`` saying what to pass (not an
    ``AttributeError`` from deep inside)."""
    from .plan import PRESETS

    if isinstance(plan, Plan):
        return plan, None
    if isinstance(plan, str) and plan in PRESETS:
        return Plan.preset(plan, model), None
    if isinstance(plan, str | os.PathLike) and (str(plan).endswith(".json") or
                                                 Path(plan).exists()):
        return Plan.load(plan), Path(plan)
    raise TypeError(f"plan must be a hetvit.Plan, a preset name ({', '.join(PRESETS)}) or a "
                    f"plan JSON file, not {plan!r}")


def _calibration_loader(path: str | os.PathLike, model: nn.Module) -> Any:
    """Calibration images from a folder or an archive: :data:`CALIBRATION_IMAGES` of them at
    random (seeded), through ``model``'s eval transform, as ``hetvit compress`` reads them."""
    from .data import sample_images

    return sample_images(path, model, CALIBRATION_IMAGES)


def compress(model: nn.Module, plan: Plan | str | os.PathLike, calibration: Any = None, *,
             max_batches: int | None = None, init: str = "calibrate",
             aggregation_init: str = "pool") -> VisionTransformer:
    """A compressed copy of ``model``: static attention and token aggregation as ``plan`` says.

    Args:
        model: a timm ``VisionTransformer`` (see :data:`SUPPORTED`); it is not modified.
        plan: where to put static layers and pyramid stages, validated against ``model``: a
            :class:`Plan`, a preset name (``"fast"``, scaled to ``model``) or a plan JSON file.
        calibration: images to initialise the static maps from the layers' mean dynamic
            attention: a tensor ``B x C x H x W``, an iterable of tensors or
            ``(images, labels)`` batches (a DataLoader), or the path of an image folder or
            archive (256 random images, through ``model``'s eval transform). Without it the
            maps start uniform.
        max_batches: use at most this many calibration batches.
        init: ``"calibrate"`` (default), or ``"none"`` to leave the new parameters at their
            defaults (for loading saved weights into the structure).
        aggregation_init: ``"pool"`` starts every pyramid stage as average pooling of the token
            grid; ``"cluster"`` (needs ``calibration``) groups the tokens a stage receives by
            k-means over the calibration images (:func:`hetvit.aggregation.cluster_matrix`),
            stage by stage, before the static maps are calibrated through the result.
    """
    if aggregation_init not in AGGREGATION_INITS:
        raise ValueError(f"aggregation_init must be one of {AGGREGATION_INITS}, not "
                         f"{aggregation_init!r}")
    plan, plan_file = _plan_for(model, plan)
    cluster = aggregation_init == "cluster" and init == "calibrate" and bool(plan.pyramid)
    if cluster and calibration is None:
        raise ValueError("aggregation_init='cluster' groups tokens by what calibration images "
                         "show: give calibration images")
    if is_compressed(model):
        raise PlanError("this model is already compressed; compress its source model instead")
    arch = describe(model)
    grid = token_grid(arch)
    prefix = num_prefix_tokens(arch)
    try:
        plan.validate(arch["depth"], grid, tuple(arch["img_size"]))
    except PlanError as e:
        raise PlanError(f"{plan_file}: {e}" if plan_file else str(e)) from None
    if isinstance(calibration, str | os.PathLike):
        calibration = _calibration_loader(calibration, model)
    if plan.img_size is None:
        plan = Plan(plan.static, plan.pyramid, tuple(arch["img_size"]), plan.source, plan.label)
    if not plan.source.get("name") and arch.get("name"):
        plan = plan.with_source(name=arch["name"])

    new = copy.deepcopy(model)
    stages = dict(plan.pyramid)
    blocks: list[nn.Module] = []
    n, cur_grid = grid[0] * grid[1], grid
    tokens_at: dict[int, int] = {}
    for i, blk in enumerate(new.blocks):
        if i in stages:
            agg = TokenAggregation(n, stages[i], prefix, cur_grid)
            agg.to(next(blk.parameters()))
            blocks.append(agg)
            n, cur_grid = stages[i], agg.grid_out
        tokens_at[i] = prefix + n
        blocks.append(blk)
    new.blocks = nn.Sequential(*blocks)

    if calibration is not None and iter(calibration) is calibration:
        calibration = list(calibration)  # a one-shot iterator; calibration may take several passes
    if cluster:
        _cluster_stages(new, prefix, calibration, max_batches)
    maps: dict[int, torch.Tensor | None] = dict.fromkeys(plan.static)
    if init == "calibrate" and plan.static and calibration is not None:
        maps = _calibrate(new, plan.static, calibration, max_batches)
    layer_blocks = [b for b in new.blocks if not isinstance(b, TokenAggregation)]
    for i in plan.static:
        blk = layer_blocks[i]
        static = StaticAttention.from_attention(blk.attn, tokens_at[i])
        if maps[i] is not None:
            static.set_map(maps[i])
        elif init == "calibrate":
            warn_uniform(i)
        blk.attn = static

    new.hetvit_plan = plan
    new.hetvit_source = arch
    new.train(model.training)
    return new


@torch.no_grad()
def _calibrate(model: VisionTransformer, layers: Iterable[int], calibration: Any,
               max_batches: int | None) -> dict[int, torch.Tensor | None]:
    """Mean dynamic attention map of each layer in ``layers`` over the calibration images.

    Aggregation stages are already in place and attention is still dynamic, so each map has the
    token count the static layer will see.
    """
    layer_blocks = [b for b in model.blocks if not isinstance(b, TokenAggregation)]
    sums: dict[int, torch.Tensor] = {}
    hooks = []
    for i in layers:
        def hook(mod: nn.Module, args: tuple, i: int = i) -> None:
            m = attention_map(mod, args[0]).sum(0)
            sums[i] = m if i not in sums else sums[i] + m
        hooks.append(layer_blocks[i].attn.register_forward_pre_hook(hook))
    count = _run_calibration(model, calibration, max_batches, hooks)
    if count == 0:
        return dict.fromkeys(layers)
    return {i: sums[i] / count for i in layers}


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of the forward pass."""


@torch.no_grad()
def _cluster_stages(model: VisionTransformer, prefix: int, calibration: Any,
                    max_batches: int | None) -> None:
    """Start every aggregation stage from k-means of the patch tokens it receives.

    Stage by stage, since a stage's input depends on the stages before it. A token's
    descriptor is its layer-normalised feature in every calibration image (what the next
    block's attention sees, up to its affine), so the clusters are tokens that are alike
    across images; only their Gram matrix is accumulated.
    """
    for agg in [b for b in model.blocks if isinstance(b, TokenAggregation)]:
        gram = torch.zeros(agg.num_in, agg.num_in, dtype=torch.float64)

        def hook(mod: nn.Module, args: tuple, gram: torch.Tensor = gram) -> None:
            x = args[0][:, prefix:].double()
            x = F.layer_norm(x, x.shape[-1:])
            gram.add_(torch.einsum("bnd,bmd->nm", x, x).cpu())
            raise _StopForward

        hooks = [agg.register_forward_pre_hook(hook)]
        count = _run_calibration(model, calibration, max_batches, hooks)
        if count == 0:
            raise ValueError("aggregation_init='cluster': the calibration set holds no images")
        agg.set_matrix(cluster_matrix(gram, agg.matrix().detach().cpu()))


def _run_calibration(model: VisionTransformer, calibration: Any, max_batches: int | None,
                     hooks: list[torch.utils.hooks.RemovableHandle]) -> int:
    """Run the calibration images through ``model`` in eval mode, then remove ``hooks``.

    Returns the number of images run.
    """
    was_training = model.training
    model.eval()
    count = 0
    param = next(model.parameters())
    try:
        for b, x in enumerate(image_batches(calibration)):
            if max_batches is not None and b >= max_batches:
                break
            try:
                model.forward_features(x.to(param))
            except _StopForward:
                pass
            count += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return count
