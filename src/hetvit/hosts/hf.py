"""The Hugging Face host: ``transformers`` ViT and DeiT models.

``ViTForImageClassification``, ``ViTModel``, ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher`` (cls and distillation tokens). A compressed model
stays that class: static layers put a :class:`StaticSlot` where the layer's ``attention`` was,
and aggregation stages go into the base model's ``layers`` inside a :class:`StageSlot`. Both
slots speak HF's layer protocol (positional attention mask, keyword arguments, the
``(output, weights)`` pair an attention returns), so ``forward(pixel_values=...)`` and its
output object keep working.

The layout is that of ``transformers`` 5 (``layers`` of layers whose ``attention`` holds
``q_proj``/``k_proj``/``v_proj``/``o_proj``); transformers 4 nested it differently and is refused
with a line saying so. ``transformers`` is optional (``pip install 'hetvit[hf]'``): this module
imports it only when an HF model is built or loaded.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..aggregation import TokenAggregation
from ..attention import StaticAttention
from ..errors import UnsupportedModelError, UsageError
from .base import Arch, Host, Projections

__all__ = ["HFHost", "StaticSlot", "StageSlot", "load_hf", "transformers_module",
           "CLASSES", "MIN_VERSION"]

MIN_VERSION = "5.18"  # the oldest release checked (5.17 builds a full-length mask when tracing)
CLASSES = ("ViTForImageClassification", "ViTModel", "DeiTForImageClassification",
           "DeiTForImageClassificationWithTeacher")
_LAYER_SCOPE = re.compile(r"/layers\.(\d+)/")
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's codes
_NAMES = {v: k for k, v in _RESAMPLE.items()}
# What transformers' own image processors do when a directory has no preprocessor_config.json.
_PROCESSOR_DEFAULTS = {
    "vit": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
            "do_center_crop": False},
    "deit": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
             "do_center_crop": True, "size": {"height": 256, "width": 256},
             "crop_size": {"height": 224, "width": 224}},
}
_PROCESSOR_KEYS = ("image_mean", "image_std", "resample", "size", "crop_size", "do_center_crop",
                   "do_normalize")


def transformers_module() -> Any:
    """``transformers``, or a one-line :class:`UnsupportedModelError` saying how to get it."""
    try:
        import transformers
    except ImportError:
        raise UnsupportedModelError("Hugging Face models need the transformers package: pip "
                                    f"install 'hetvit[hf]' (transformers>={MIN_VERSION})"
                                    ) from None
    return transformers


class StaticSlot(nn.Module):
    """A static attention in an HF layer's ``attention`` place.

    HF layers call ``attention(hidden_states, attention_mask, **kwargs)`` and unpack an
    ``(output, attention weights)`` pair; a static map has no per-image weights to give.
    """

    def __init__(self, static: StaticAttention) -> None:
        super().__init__()
        self.static = static

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> tuple[torch.Tensor, None]:
        if attention_mask is not None and not _allows_all(attention_mask):
            raise UsageError("static attention cannot apply an attention mask that hides "
                             "tokens: its map is the same for every image")
        return self.static(hidden_states), None


def _allows_all(mask: torch.Tensor) -> bool:
    """Whether an HF attention mask (boolean: True attends; additive: 0 attends) hides nothing.

    Some transformers releases build such a mask for every forward (while tracing, say) even
    when none was given; images have no padding, so it is all-visible.
    """
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


class StageSlot(nn.Module):
    """An aggregation stage among HF layers, which are called with the attention mask (for
    all tokens: none is given to ViTs) and keyword arguments a stage has no use for."""

    def __init__(self, stage: TokenAggregation) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, hidden_states: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return self.stage(hidden_states)


def _base(model: nn.Module) -> nn.Module:
    """The ``ViTModel``/``DeiTModel`` inside a classifier (or the model itself)."""
    for name in ("vit", "deit"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _size(d: Any, fallback: list[int]) -> list[int]:
    """A processor ``size``/``crop_size`` dict (height/width, or shortest_edge) as [h, w]."""
    if isinstance(d, Mapping):
        if "height" in d and "width" in d:
            return [int(d["height"]), int(d["width"])]
        if "shortest_edge" in d:
            return [int(d["shortest_edge"])] * 2
    if isinstance(d, int):
        return [d, d]
    return fallback


class HFHost(Host):
    name = "hf"
    supported = ("Hugging Face transformers ViTForImageClassification, ViTModel, "
                 "DeiTForImageClassification and DeiTForImageClassificationWithTeacher")

    # ------------------------------------------------------------------ the model as a whole
    def claims(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.")

    def check(self, model: nn.Module) -> None:
        kind = type(model).__name__
        if kind not in CLASSES:
            raise UnsupportedModelError(f"{kind} is not supported: hetvit compresses "
                                        f"{self.supported}")
        base = _base(model)
        layers = getattr(base, "layers", None)
        if layers is None and hasattr(getattr(base, "encoder", None), "layer"):
            raise UnsupportedModelError(f"this {kind} has the layout of transformers 4 "
                                        "(encoder.layer, attention.attention.query): hetvit "
                                        f"needs transformers>={MIN_VERSION}")
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UnsupportedModelError(f"{kind} has no layers: there is no attention to "
                                        "compress")
        for i, layer in enumerate(self.layers(model)):
            attention = self.attention(layer)
            if not (isinstance(attention, StaticAttention) or self.is_dynamic(attention)):
                raise UnsupportedModelError(f"layer {i} ({type(layer).__name__}) has no "
                                            "q_proj/k_proj/v_proj/o_proj attention; hetvit "
                                            f"compresses {self.supported}")
        embeddings = base.embeddings
        if getattr(embeddings, "mask_token", None) is not None:
            raise UnsupportedModelError("a ViT built with a mask token (masked image modelling) "
                                        "is not supported: build it with use_mask_token=False")

    def describe(self, model: nn.Module) -> Arch:
        self.check(model)
        config = model.config
        kind = type(model).__name__
        pooler = getattr(_base(model), "pooler", None)
        cfg = config.to_dict()
        return {
            "host": self.name,
            "name": None,
            "class": kind,
            "config": cfg,
            "pooler": pooler is not None,
            "pooler_size": pooler.dense.out_features if pooler is not None else 0,
            "distilled": kind == "DeiTForImageClassificationWithTeacher",
            "prefix_tokens": 2 if config.model_type == "deit" else 1,
            "img_size": _pair(config.image_size),
            "patch_size": _pair(config.patch_size),
            "in_chans": int(config.num_channels),
            "num_classes": 0 if kind == "ViTModel" else int(config.num_labels),
            "embed_dim": int(config.hidden_size),
            "depth": len(self.layers(model)),
            "num_heads": int(config.num_attention_heads),
            "mlp_ratio": config.intermediate_size / config.hidden_size,
            "preprocess": self._preprocess(model),
        }

    def _preprocess(self, model: nn.Module) -> dict[str, Any]:
        """The image processor settings of ``model`` (from its directory's
        ``preprocessor_config.json`` when it was loaded from one, else transformers' defaults
        for its family)."""
        settings = copy.deepcopy(_PROCESSOR_DEFAULTS.get(model.config.model_type,
                                                         _PROCESSOR_DEFAULTS["vit"]))
        h, w = _pair(model.config.image_size)
        settings.setdefault("size", {"height": h, "width": w})
        settings.update(copy.deepcopy(dict(getattr(model, "hetvit_preprocess", None) or {})))
        return settings

    def build(self, arch: Mapping[str, Any]) -> nn.Module:
        """The class and config of the description: the same HF model, with fresh weights."""
        transformers = transformers_module()
        kind = arch["class"]
        if kind not in CLASSES:
            raise UnsupportedModelError(f"{kind} is not supported: hetvit compresses "
                                        f"{self.supported}")
        cls = getattr(transformers, kind)
        config = cls.config_class.from_dict(dict(arch["config"]))
        model = cls(config, add_pooling_layer=bool(arch["pooler"])) if kind == "ViTModel" \
            else cls(config)
        model.hetvit_preprocess = copy.deepcopy(dict(arch["preprocess"]))
        return model.eval()

    def data_config(self, model: nn.Module) -> dict[str, Any]:
        """timm's data-config keys from the image processor's settings.

        The processor resizes to ``size`` and, when it centre-crops, cuts ``crop_size`` out of
        that: timm says the same with ``crop_pct = crop / size``. The input size is always the
        model's (its position embeddings fix it).
        """
        arch = self._arch(model)
        p = arch["preprocess"]
        img = arch["img_size"]
        size = _size(p.get("size"), img)
        crop_pct = 1.0
        if p.get("do_center_crop"):
            crop = _size(p.get("crop_size"), img)
            # timm resizes to floor(crop / crop_pct): half a pixel of slack keeps the float
            # division from landing one pixel short of ``size``
            crop_pct = crop[0] / (size[0] + 0.5)
        normalize = p.get("do_normalize", True)
        return {
            "input_size": (arch["in_chans"], *img),
            "mean": tuple(p["image_mean"]) if normalize else (0.0,) * arch["in_chans"],
            "std": tuple(p["image_std"]) if normalize else (1.0,) * arch["in_chans"],
            "interpolation": _RESAMPLE.get(int(p.get("resample", 2)), "bilinear"),
            "crop_pct": crop_pct,
            "crop_mode": "center",
        }

    def _arch(self, model: nn.Module) -> Arch:
        source = getattr(model, "hetvit_source", None)
        return source if source is not None else self.describe(model)

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _base(model)(pixel_values=x).last_hidden_state

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A classifier's ``logits``; a ``ViTModel``'s pooled output (or its cls token)."""
        out = model(pixel_values=x)
        if hasattr(out, "logits"):
            return out.logits
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def classifier(self, model: nn.Module) -> nn.Module | None:
        """``classifier`` (``cls_classifier`` for DeiT with a distillation head); a bare
        ``ViTModel`` has none."""
        head = getattr(model, "classifier", None)
        return head if head is not None else getattr(model, "cls_classifier", None)

    def head_macs(self, arch: Mapping[str, Any]) -> int:
        pooler = arch["embed_dim"] * arch.get("pooler_size", 0) if arch.get("pooler") else 0
        return super().head_macs(arch) + pooler

    # ------------------------------------------------------------------ structure
    def embedding_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(_base(model).embeddings.parameters())

    def sequence(self, model: nn.Module) -> list[nn.Module]:
        return [m.stage if isinstance(m, StageSlot) else m for m in _base(model).layers]

    def set_sequence(self, model: nn.Module, modules: list[nn.Module]) -> None:
        _base(model).layers = nn.ModuleList(
            StageSlot(m) if isinstance(m, TokenAggregation) else m for m in modules)

    def attention(self, block: nn.Module) -> nn.Module:
        attention = block.attention
        return attention.static if isinstance(attention, StaticSlot) else attention

    def set_attention(self, block: nn.Module, attention: nn.Module) -> None:
        block.attention = StaticSlot(attention) if isinstance(attention, StaticAttention) \
            else attention

    def is_dynamic(self, attention: nn.Module | None) -> bool:
        """HF's ViT/DeiT attention: separate q, k, v and o projections and a head width."""
        return (all(isinstance(getattr(attention, n, None), nn.Linear)
                    for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
                and hasattr(attention, "head_dim"))

    def attention_map(self, attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        d = attention.head_dim
        q = attention.q_proj(x).view(b, n, -1, d).transpose(1, 2)
        k = attention.k_proj(x).view(b, n, -1, d).transpose(1, 2)
        scale = getattr(attention, "scaling", d**-0.5)
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def projections(self, attention: nn.Module) -> Projections:
        if not self.is_dynamic(attention):
            raise UnsupportedModelError(f"cannot make static attention from "
                                        f"{type(attention).__name__}: expected HF attention with "
                                        "q_proj/k_proj/v_proj/o_proj")
        v: nn.Linear = attention.v_proj
        # The layer applies its dropout after the attention itself: nothing to carry over.
        return Projections(value=copy.deepcopy(v), output=copy.deepcopy(attention.o_proj),
                           num_heads=v.out_features // attention.head_dim,
                           norm=nn.Identity(), drop=nn.Identity())

    def sequence_position(self, node_name: str) -> int | None:
        """The exporter scopes nodes ``/vit/layers.<position>/...`` (``deit`` for DeiT);
        positions count stages too."""
        match = _LAYER_SCOPE.search(node_name)
        return int(match.group(1)) if match else None


def _read_preprocess(directory: Path) -> dict[str, Any] | None:
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"{path} cannot be read: {e}") from e
    if isinstance(settings.get("resample"), str):  # some processors name the filter
        settings["resample"] = _NAMES.get(settings["resample"].lower(), 2)
    return {k: settings[k] for k in _PROCESSOR_KEYS if k in settings}


def load_hf(directory: str | Path) -> nn.Module:
    """An HF model from a local directory (``save_pretrained``'s, no hub), in eval mode.

    The class is the first of the config's ``architectures`` (``ViTModel`` if none); the
    directory's ``preprocessor_config.json``, if any, gives the eval transform. A directory
    with a ``config.json`` but no weights builds the model with random weights, with a
    warning (speed does not depend on them).
    """
    transformers = transformers_module()
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError(f"{directory} is not a Hugging Face model directory (no "
                                    "config.json): write one with model.save_pretrained(DIR)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{config_file} cannot be read: {e}") from e
    kind = (config.architectures or ["ViTModel"])[0]
    if kind not in CLASSES:
        raise UnsupportedModelError(f"{directory} holds a {kind}: hetvit compresses "
                                    f"{HFHost.supported}")
    cls = getattr(transformers, kind)
    weights = any((directory / f).is_file() for f in ("model.safetensors", "pytorch_model.bin",
                                                      "model.safetensors.index.json"))
    if weights:
        model = cls.from_pretrained(str(directory), local_files_only=True)
    else:
        warnings.warn(f"{directory}: no weights, only a config: the weights are random (speed "
                      "does not depend on them, accuracy does)", stacklevel=2)
        model = cls(config)
    preprocess = _read_preprocess(directory)
    if preprocess is not None:
        model.hetvit_preprocess = preprocess
    return model.eval()
