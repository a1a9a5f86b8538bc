"""A timm ViT as a Hugging Face ``ViTForImageClassification`` with the same weights.

So that a model trained with timm (the committed CIFAR-10 teacher, say) can be compressed
through either host, and the two paths compared. Only the plain ViT both libraries build the
same way converts: a class token, token pooling, no pre-norm, LayerScale, registers, q/k norm
or distillation head. The eval transform goes along as image processor settings.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .hf import _NAMES, transformers_module
from .timm import TimmHost

__all__ = ["timm_to_hf"]


def _refuse_unless_plain(arch: dict[str, Any]) -> None:
    plain = {"distilled": False, "global_pool": "token", "qk_norm": False, "init_values": None,
             "class_token": True, "reg_tokens": 0, "no_embed_class": False, "pre_norm": False,
             "fc_norm": False}
    differ = [f"{k}={arch.get(k)!r}" for k, v in plain.items() if arch.get(k) != v]
    if differ or arch["img_size"][0] != arch["img_size"][1]:
        raise UnsupportedModelError(f"only a plain square ViT converts to HF's ViT; this one has "
                                    f"{', '.join(differ) or 'a non-square input'}")


@torch.no_grad()
def timm_to_hf(model: nn.Module) -> nn.Module:
    """An HF ``ViTForImageClassification`` computing what the timm ViT ``model`` computes.

    timm's fused ``qkv`` is split into ``q_proj``/``k_proj``/``v_proj``; every other tensor
    maps one to one. timm's plain ViT uses exact GELU and LayerNorm eps 1e-6, which the HF
    config is given. Refuses (:class:`UnsupportedModelError`) what HF's ViT cannot express.
    """
    host = TimmHost()
    arch = host.describe(model)
    _refuse_unless_plain(arch)
    for block in model.blocks:
        if not isinstance(block.norm1, nn.LayerNorm) or block.norm1.eps != 1e-6:
            raise UnsupportedModelError("only ViTs with LayerNorm(eps=1e-6) convert to HF's ViT")
        if not isinstance(block.mlp.act, nn.GELU) or block.mlp.act.approximate != "none":
            raise UnsupportedModelError("only ViTs with exact GELU convert to HF's ViT")
    transformers = transformers_module()
    dim = arch["embed_dim"]
    config = transformers.ViTConfig(
        image_size=arch["img_size"][0], patch_size=arch["patch_size"][0],
        num_channels=arch["in_chans"], hidden_size=dim, num_hidden_layers=arch["depth"],
        num_attention_heads=arch["num_heads"], intermediate_size=round(arch["mlp_ratio"] * dim),
        hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=arch["qkv_bias"],
        num_labels=arch["num_classes"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    hf = transformers.ViTForImageClassification(config).eval()
    emb = hf.vit.embeddings
    emb.cls_token.copy_(model.cls_token)
    emb.position_embeddings.copy_(model.pos_embed)
    emb.patch_embeddings.projection.load_state_dict(model.patch_embed.proj.state_dict())
    for block, layer in zip(model.blocks, hf.vit.layers, strict=True):
        layer.layernorm_before.load_state_dict(block.norm1.state_dict())
        layer.layernorm_after.load_state_dict(block.norm2.state_dict())
        qkv = block.attn.qkv
        for i, proj in enumerate((layer.attention.q_proj, layer.attention.k_proj,
                                  layer.attention.v_proj)):
            proj.weight.copy_(qkv.weight[i * dim:(i + 1) * dim])
            if qkv.bias is not None:
                proj.bias.copy_(qkv.bias[i * dim:(i + 1) * dim])
        layer.attention.o_proj.load_state_dict(block.attn.proj.state_dict())
        layer.mlp.fc1.load_state_dict(block.mlp.fc1.state_dict())
        layer.mlp.fc2.load_state_dict(block.mlp.fc2.state_dict())
    hf.vit.layernorm.load_state_dict(model.norm.state_dict())
    hf.classifier.load_state_dict(model.head.state_dict())
    cfg = host.data_config(model)
    h, w = cfg["input_size"][1:]
    resized = [math.floor(h / cfg["crop_pct"]), math.floor(w / cfg["crop_pct"])]  # as timm
    hf.hetvit_preprocess = {
        "image_mean": list(cfg["mean"]), "image_std": list(cfg["std"]),
        "resample": _NAMES.get(cfg["interpolation"], 3),
        "size": {"height": resized[0], "width": resized[1]},
        "crop_size": {"height": h, "width": w}, "do_center_crop": True,
    }
    classes = getattr(model, "hetvit_classes", None)
    if classes is not None:
        hf.hetvit_classes = list(classes)
    return hf
