"""The timm host: ``timm.models.vision_transformer.VisionTransformer`` and its DeiT variants.

A compressed timm model stays a ``VisionTransformer``: static layers swap their ``attn``
module, and aggregation stages are inserted into ``blocks``. So ``forward_features``,
``forward_head``, ``pretrained_cfg`` and everything built on them keep working.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.layers import LayerScale
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..aggregation import SizeWeightedTokens, TokenAggregation
from ..attention import StaticAttention
from ..errors import UnsupportedModelError
from .base import Arch, Host, Projections

__all__ = ["TimmHost", "create_timm_model", "EXAMPLE_MODELS"]

EXAMPLE_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                  "deit_small_distilled_patch16_224", "vit_base_patch16_224",
                  "deit3_small_patch16_224")

# The keyword arguments of ``VisionTransformer`` that a description holds.
_ARCH_KWARGS = ("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim",
                "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values",
                "class_token", "reg_tokens", "no_embed_class", "pre_norm", "fc_norm")
_BLOCK_SCOPE = re.compile(r"/blocks\.(\d+)/")
# What the method lacks for timm's other ViT families, by class.
_REFUSED = {
    "Eva": (" (EVA): its rotary position embedding (rope) turns q and k by each token's grid "
            "position in every block, and an aggregated token has no grid position"),
    "Beit": (" (BEiT): every attention adds a relative position bias looked up by pairs of grid "
             "positions, which aggregated tokens do not have"),
    "SwinTransformer": (" (Swin): it attends within shifted windows of a feature map that patch "
                        "merging shrinks, so there is neither one global attention map per "
                        "layer nor one token sequence to aggregate"),
}


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with one-line errors.

    An unknown name gets the closest timm names and what hetvit supports; impossible settings
    (a width the heads do not divide, say: timm asserts) say which settings. Both are
    :class:`UnsupportedModelError`.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnsupportedModelError(f"unknown timm model {name!r}.{hint} hetvit supports "
                                    f"{TimmHost.supported}, e.g. {', '.join(EXAMPLE_MODELS)}.")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (AssertionError, TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        settings = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise UnsupportedModelError(f"timm cannot build {name} with {settings or 'defaults'}: "
                                    f"{e or type(e).__name__}") from e


class TimmHost(Host):
    name = "timm"
    supported = ("timm VisionTransformer models with a fixed input size: DeiT (tiny/small/base "
                 "and the distilled variants), ViT (augreg, global_pool 'token' or 'avg'), "
                 "DeiT-3 and DINOv2 (LayerScale), register tokens, CLIP-style pre-norm")

    # ------------------------------------------------------------------ the model as a whole
    def claims(self, model: nn.Module) -> bool:
        """Every timm model: those it cannot compress get :meth:`check`'s reason."""
        return isinstance(model, VisionTransformer) or type(model).__module__.startswith("timm.")

    def check(self, model: nn.Module) -> None:
        if not isinstance(model, VisionTransformer):
            reason = _REFUSED.get(type(model).__name__, "")
            raise UnsupportedModelError(f"{type(model).__name__} is not supported{reason}: "
                                        f"hetvit compresses {self.supported}")
        if getattr(model, "dynamic_img_size", False):
            raise UnsupportedModelError("this ViT takes a dynamic image size; static attention "
                                        "and token aggregation need a fixed token count. Create "
                                        "the model with dynamic_img_size=False.")
        if getattr(model, "attn_pool", None) is not None:
            raise UnsupportedModelError(f"ViTs with an attention-pooling head are not supported: "
                                        f"hetvit compresses {self.supported}")
        if len(model.blocks) == 0:
            raise UnsupportedModelError("the model has no blocks (depth 0): there is no "
                                        "attention to compress")
        self._check_patch_grid(model)
        for i, blk in enumerate(model.blocks):
            if isinstance(blk, TokenAggregation):
                continue
            attn = getattr(blk, "attn", None)
            if not (isinstance(attn, StaticAttention) or self.is_dynamic(attn)):
                raise UnsupportedModelError(f"block {i} ({type(blk).__name__}) has no timm-style "
                                            f"attention; hetvit compresses {self.supported}")

    def _check_patch_grid(self, model: VisionTransformer) -> None:
        """Refuse a patch embedding whose tokens are not the ``img_size / patch_size`` grid.

        Plans, pooling windows and GMACs all follow that grid, so it must be what the
        embedding really outputs: one zero image (on the model's device, so a meta model costs
        nothing) goes through it and its tokens are counted. A hybrid ViT (a CNN stem, e.g.
        timm's ``vit_tiny_r_s16_p8_224``) gives a coarser grid than its patch size says, and a
        patch larger than the image gives none.
        """
        embed = model.patch_embed
        if getattr(embed, "backbone", None) is not None:
            raise UnsupportedModelError(f"hybrid ViTs are not supported: the tokens come from a "
                                        f"CNN stem ({type(embed.backbone).__name__}), not from "
                                        f"patches; hetvit compresses {self.supported}")
        (h, w), (ph, pw) = embed.img_size, embed.patch_size
        if ph > h or pw > w:
            raise UnsupportedModelError(f"the patch ({ph}x{pw}) is larger than the image "
                                        f"({h}x{w}): the model has no patch tokens")
        param = next(embed.parameters())
        with torch.no_grad():
            tokens = embed(torch.zeros(1, embed.proj.in_channels, h, w, device=param.device,
                                       dtype=param.dtype))
        found = tokens.shape[1] * (tokens.shape[2] if tokens.ndim == 4 else 1)  # NLC or NHWC
        if found != (h // ph) * (w // pw):
            raise UnsupportedModelError(f"the patch embedding gives {found} tokens, not the "
                                        f"{h // ph}x{w // pw} grid of its {h}x{w} input and "
                                        f"{ph}x{pw} patches; hetvit compresses {self.supported}")

    def describe(self, model: nn.Module) -> Arch:
        self.check(model)
        blk = model.blocks[0]
        attn = blk.attn
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return {
            "host": self.name,
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

    def build(self, arch: Mapping[str, Any]) -> nn.Module:
        """A timm model name is rebuilt through ``timm.create_model`` so that what the
        description does not hold (activation, norm layers, pretrained_cfg) comes from timm."""
        kwargs = {k: arch[k] for k in _ARCH_KWARGS if k in arch}
        kwargs["img_size"] = tuple(kwargs["img_size"])
        kwargs["patch_size"] = tuple(kwargs["patch_size"])[0]
        name = arch.get("name")
        if name:
            return create_timm_model(name, **kwargs)
        kwargs["weight_init"] = "skip"
        cls = VisionTransformerDistilled if arch.get("distilled") else VisionTransformer
        return cls(**kwargs)

    def data_config(self, model: nn.Module) -> dict[str, Any]:
        """timm's data config for ``model``, corrected to the size the model really takes.

        A model created with an ``img_size`` override keeps the ``pretrained_cfg`` of its
        family (e.g. 224 px, crop_pct 0.9), and feeding it 224 px would fail: the input size
        becomes the model's. The family's ``crop_pct`` stays: it is part of the recipe the
        family was trained with (random resized crops show objects larger than a whole image
        does, and the eval centre crop matches that). Measured on the CIFAR-10 teacher,
        trained with crops of 60-100% of the area: 77.3% top-1 on whole images, 79.3% at
        crop_pct 0.9 (3,000 test images).
        """
        cfg = dict(resolve_model_data_config(model))
        size = tuple(int(s) for s in model.patch_embed.img_size)
        if tuple(cfg["input_size"][1:]) != size:
            cfg["input_size"] = (cfg["input_size"][0], *size)
        return cfg

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_features(x)

    def classifier(self, model: nn.Module) -> nn.Module | None:
        """``head``: its input is what ``forward_head(..., pre_logits=True)`` returns (the cls
        head's, for a distilled model)."""
        return model.head

    # ------------------------------------------------------------------ structure
    def embedding_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The model's own parameters (cls, register and position embeddings), the patch
        embedding's and the pre-norm's."""
        return [*model.parameters(recurse=False), *model.patch_embed.parameters(),
                *model.norm_pre.parameters()]

    def sequence(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def set_sequence(self, model: nn.Module, modules: list[nn.Module]) -> None:
        """With ``global_pool='avg'`` and aggregation stages, the final norm also weights each
        patch token by how many patches it stands for (:class:`SizeWeightedTokens`), so
        timm's own mean over tokens counts every patch once."""
        model.blocks = nn.Sequential(*modules)
        if getattr(model, "global_pool", None) != "avg":
            return
        stages = self.stages(model)
        norm = model.norm.norm if isinstance(model.norm, SizeWeightedTokens) else model.norm
        model.norm = SizeWeightedTokens(norm, model.num_prefix_tokens, stages) if stages \
            else norm

    def attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def set_attention(self, block: nn.Module, attention: nn.Module) -> None:
        block.attn = attention

    def is_dynamic(self, attention: nn.Module | None) -> bool:
        """timm-style attention: a fused ``qkv`` Linear, ``num_heads`` and ``proj``."""
        return (isinstance(getattr(attention, "qkv", None), nn.Linear)
                and hasattr(attention, "num_heads")
                and isinstance(getattr(attention, "proj", None), nn.Linear))

    def attention_map(self, attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = attention.num_heads
        d = attention.qkv.out_features // (3 * h)
        qkv = attention.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])
        return ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)

    def projections(self, attention: nn.Module) -> Projections:
        if not self.is_dynamic(attention):
            raise UnsupportedModelError(f"cannot make static attention from "
                                        f"{type(attention).__name__}: expected timm Attention "
                                        "with a fused qkv projection")
        if getattr(attention, "gate", None) is not None:
            raise UnsupportedModelError("gated attention is not supported")
        qkv: nn.Linear = attention.qkv
        width = qkv.out_features // 3
        value = nn.Linear(qkv.in_features, width, bias=qkv.bias is not None)
        value = value.to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        with torch.no_grad():
            value.weight.copy_(qkv.weight[2 * width:])
            if qkv.bias is not None:
                value.bias.copy_(qkv.bias[2 * width:])
        # Scale-norm (an extra LayerNorm before proj) and dropout come along as they are.
        return Projections(value=value, output=copy.deepcopy(attention.proj),
                           num_heads=attention.num_heads,
                           norm=copy.deepcopy(getattr(attention, "norm", nn.Identity())),
                           drop=copy.deepcopy(getattr(attention, "proj_drop", nn.Identity())))

    def sequence_position(self, node_name: str) -> int | None:
        """timm scopes nodes ``/blocks.<position>/...``; positions count stages too."""
        match = _BLOCK_SCOPE.search(node_name)
        return int(match.group(1)) if match else None

    # ------------------------------------------------------------------ geometry of an arch
    def prefix_tokens(self, arch: Mapping[str, Any]) -> int:
        return int(arch["class_token"]) + int(arch["reg_tokens"]) + int(arch["distilled"])
