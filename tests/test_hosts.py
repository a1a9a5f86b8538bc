"""The host contract: what every supported model family must do, one row a family.

Adding a host (or a family of one) is one file in ``hetvit/hosts`` and one row in ``ROWS``.
Every row is a tiny random model with a 4x4 patch grid, so each check runs in well under a
second.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
from timm.layers import LayerScale
from torch import nn

import hetvit
from hetvit.capture import attention_maps, module_inputs
from hetvit.errors import UnsupportedModelError
from hetvit.flops import count_macs, formula_macs
from hetvit.hosts import describe, host_of, logits
from hetvit.plan import Plan

transformers = pytest.importorskip("transformers")

PLAN = Plan(static=(0, 1), pyramid=((2, 8), (3, 4)))  # 16 patches -> 8 -> 4
DEPTH = 4


def _timm(name: str, img: int = 32, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, img_size=img, patch_size=img // 4,
                                  embed_dim=32, depth=DEPTH, num_heads=2, num_classes=10,
                                  **kwargs).eval()
        # Some families start near the identity (LayerScale 1e-5) or with a near-zero head:
        # outputs of order one make the comparisons below mean something.
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LayerScale):
                    m.gamma.fill_(1.0)
            nn.init.normal_(model.head.weight)
        return model
    return make


def _hf(cls_name: str, config_cls: str, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=DEPTH,
            num_attention_heads=2, intermediate_size=64, num_labels=10)
        return getattr(transformers, cls_name)(config, **kwargs).eval()
    return make


@dataclass(frozen=True)
class Row:
    family: str
    make: Callable[[], nn.Module]
    prefix: int  # cls, distillation and register tokens the family has


ROWS = [
    Row("timm-deit", _timm("deit_tiny_patch16_224"), 1),
    Row("timm-deit-distilled", _timm("deit_tiny_distilled_patch16_224"), 2),
    Row("timm-registers", _timm("vit_small_patch14_reg4_dinov2", img=28,
                                dynamic_img_size=False), 5),
    Row("timm-dinov2-layerscale", _timm("vit_small_patch14_dinov2", img=28,
                                        dynamic_img_size=False), 1),
    Row("timm-clip-prenorm", _timm("vit_base_patch16_clip_224"), 1),
    Row("timm-avg-pool", _timm("vit_base_patch16_224", global_pool="avg"), 1),
    Row("hf-vit", _hf("ViTForImageClassification", "ViTConfig"), 1),
    Row("hf-vit-model", _hf("ViTModel", "ViTConfig"), 1),
    Row("hf-deit", _hf("DeiTForImageClassification", "DeiTConfig"), 2),
    Row("hf-deit-teacher", _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig"), 2),
]


@pytest.fixture(params=ROWS, ids=[r.family for r in ROWS])
def row(request) -> Row:
    return request.param


def _images(model: nn.Module, n: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *host_of(model).input_size(describe(model)), generator=gen)


def test_prefix_tokens_are_the_family_s(row):
    model = row.make()
    assert host_of(model).prefix_tokens(describe(model)) == row.prefix


def test_embedding_parameters_are_what_the_first_block_reads(row):
    model = row.make()
    host, seen = host_of(model), {}
    with module_inputs(host.layers(model)[:1], lambda _, x: seen.setdefault("x", x)):
        logits(model, _images(model, 2))
    params = list(model.parameters())
    grads = torch.autograd.grad((seen["x"] * torch.randn_like(seen["x"])).sum(), params,
                                allow_unused=True)
    reads = {id(p) for p, g in zip(params, grads, strict=True) if g is not None and g.any()}
    assert reads == {id(p) for p in host.embedding_parameters(model)}


def test_identity_plan_gives_the_source_output(row):
    model = row.make()
    x = _images(model)
    same = hetvit.compress(model, Plan())
    assert torch.equal(logits(same, x), logits(model, x))


def test_static_map_of_one_image_reproduces_its_layer(row):
    """Layer 1 made static with layer 1's dynamic map for image 0 computes what the dynamic
    layer computes for that image (so the whole output is the source's), and not for another
    image (the check can fail)."""
    model = row.make()
    x = _images(model, 2)
    maps: dict[int, torch.Tensor] = {}
    with torch.no_grad(), attention_maps(model, [1], lambda i, a: maps.setdefault(i, a)):
        logits(model, x[:1])
    static = hetvit.compress(model, Plan(static=(1,)), init="none")
    host = host_of(static)
    host.attention(host.layers(static)[1]).set_map(maps[1][0])
    with torch.no_grad():
        torch.testing.assert_close(logits(static, x[:1]), logits(model, x[:1]), atol=1e-5,
                                   rtol=1e-4)
        assert not torch.allclose(logits(static, x[1:]), logits(model, x[1:]), atol=1e-4)
    calibrated = hetvit.compress(model, Plan(static=(1,)), calibration=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(logits(calibrated, x[:1]), logits(model, x[:1]), atol=1e-5,
                                   rtol=1e-4)


def test_token_counts_follow_the_plan(row):
    model = row.make()
    compressed = hetvit.compress(model, PLAN)
    host = host_of(compressed)
    seen: dict[int, int] = {}
    with module_inputs(host.layers(compressed), lambda k, x: seen.setdefault(k, x.shape[1])):
        with torch.no_grad():
            logits(compressed, _images(model))
    assert seen == {0: row.prefix + 16, 1: row.prefix + 16, 2: row.prefix + 8, 3: row.prefix + 4}
    stages = host.stages(compressed)
    assert [(s.num_in, s.num_out, s.num_prefix_tokens) for s in stages] == [(16, 8, row.prefix),
                                                                           (8, 4, row.prefix)]
    # the prefix tokens (cls, distillation, registers) pass every stage untouched
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [s.register_forward_hook(lambda m, a, out: pairs.append((a[0], out)))
             for s in stages]
    with torch.no_grad():
        logits(compressed, _images(model))
    for h in hooks:
        h.remove()
    for given, out in pairs:
        assert torch.equal(out[:, :row.prefix], given[:, :row.prefix])


def test_save_load_gives_identical_outputs(row, tmp_path):
    model = row.make()
    x = _images(model)
    compressed = hetvit.compress(model, PLAN, calibration=x)
    loaded = hetvit.load(hetvit.save(compressed, tmp_path / "m"))
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(logits(loaded, x), logits(compressed, x))

    def same_kinds(cfg: dict) -> dict:  # JSON gives lists where timm has tuples
        return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}

    assert same_kinds(hetvit.data.data_config(loaded)) == same_kinds(
        hetvit.data.data_config(model))


def test_analyze_runs(row):
    model = row.make()
    report = hetvit.analyze(model, _images(model, 8))
    assert report.depth == DEPTH
    assert report.num_tokens == row.prefix + 16


def test_onnx_export_passes_parity(row, tmp_path):
    pytest.importorskip("onnxruntime")
    compressed = hetvit.compress(row.make(), PLAN)
    result = hetvit.export_onnx(compressed, tmp_path / "m.onnx")
    assert result.passed
    assert result.matmuls == {0: 0, 1: 0, 2: 2, 3: 2}  # q k^T and A V only where dynamic


def test_formula_macs_equal_counted_macs(row):
    model = row.make()
    compressed = hetvit.compress(model, PLAN)
    assert formula_macs(describe(model)) == count_macs(model)
    assert formula_macs(describe(compressed), PLAN) == count_macs(compressed)
    assert count_macs(compressed) < count_macs(model)


def test_fit_runs_a_pass(row):
    model = row.make()
    x = _images(model, 8)
    student = hetvit.compress(model, PLAN, calibration=x)
    fitted = hetvit.fit(student, model, x, hetvit.FitConfig(passes=1, batch_size=4))
    assert fitted.hetvit_fit.steps == 2
    assert type(fitted) is type(model)
    with torch.no_grad():
        assert not torch.equal(logits(fitted, x), logits(student, x))  # it trained


def test_eval_transform_runs(row):
    from PIL import Image

    model = row.make()
    c, h, w = host_of(model).input_size(describe(model))
    image = Image.new("RGB", (3 * w, 2 * h), (120, 30, 200))
    assert hetvit.data.make_transform(model)(image).shape == (c, h, w)


# ----------------------------------------------------------------------------- the HF host
def test_hf_compressed_model_keeps_hf_s_interface():
    """The installed transformers' ViTAttention returns ``(output, weights)`` and ViTLayer a
    tensor: the slots hetvit puts in their places must return the same kinds."""
    model = _hf("ViTForImageClassification", "ViTConfig")()
    x = torch.randn(2, 3, 32, 32)
    tokens = torch.randn(2, 17, 32)
    layer = model.vit.layers[0]
    dynamic = layer.attention(tokens)
    compressed = hetvit.compress(model, PLAN)
    static = compressed.vit.layers[0].attention(tokens)
    assert isinstance(dynamic, tuple) and len(dynamic) == 2
    assert isinstance(static, tuple) and len(static) == 2 and static[0].shape == dynamic[0].shape
    assert isinstance(layer(tokens), torch.Tensor)
    slot = compressed.vit.layers[0].attention
    visible = torch.ones(2, 1, 17, 17, dtype=torch.bool)
    torch.testing.assert_close(slot(tokens, visible)[0], static[0])  # a mask hiding nothing
    with pytest.raises(hetvit.errors.UsageError, match="mask"):
        slot(tokens, visible.tril())
    stage = compressed.vit.layers[2]
    assert stage(torch.randn(2, 17, 32), None).shape == (2, 9, 32)  # HF's call, a mask slot
    out = compressed(pixel_values=x)
    assert type(out) is type(model(pixel_values=x)) and out.logits.shape == (2, 10)


def test_hf_attention_map_is_sdpa_s(tmp_path):
    """The map read from q_proj and k_proj is the one HF's eager attention computes, while
    the model itself runs SDPA."""
    model = _hf("ViTForImageClassification", "ViTConfig")()
    assert model.config._attn_implementation == "sdpa"
    tokens = torch.randn(2, 17, 32)
    attention = model.vit.layers[0].attention
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        _, weights = attention(tokens)
    model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(host_of(model).attention_map(attention, tokens), weights)


def test_hf_directory_and_processor(tmp_path):
    model = _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig")()
    model.save_pretrained(tmp_path / "deit")
    processor = transformers.DeiTImageProcessor(size={"height": 40, "width": 40},
                                                crop_size={"height": 32, "width": 32},
                                                image_mean=[0.1, 0.2, 0.3],
                                                image_std=[0.4, 0.5, 0.6])
    processor.save_pretrained(tmp_path / "deit")
    loaded = hetvit.surgery.load_model(f"hf:{tmp_path / 'deit'}")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits(loaded, x), logits(model, x))
    cfg = hetvit.data.data_config(loaded)
    assert cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (0.4, 0.5, 0.6)
    assert cfg["interpolation"] == "bicubic"
    resize = hetvit.data.make_transform(loaded).transforms[0]
    assert resize.size == 40  # the processor's size, then its 32 px centre crop
    assert cfg["input_size"] == (3, 32, 32)
    with pytest.raises(hetvit.errors.UsageError, match="config.json"):
        hetvit.surgery.load_model(f"hf:{tmp_path / 'deit'}", img_size=64)


def test_hf_config_only_directory_builds_random_weights(tmp_path):
    _hf("ViTModel", "ViTConfig")().config.save_pretrained(tmp_path / "cfg")
    with pytest.warns(UserWarning, match="random"):
        model = hetvit.surgery.load_model(f"hf:{tmp_path / 'cfg'}")
    assert type(model).__name__ == "ViTModel"


def test_hf_cli_compress(tmp_path):
    from typer.testing import CliRunner

    from hetvit.cli import app

    model = _hf("ViTForImageClassification", "ViTConfig")()
    model.save_pretrained(tmp_path / "vit")
    result = CliRunner().invoke(app, ["compress", "--model", f"hf:{tmp_path / 'vit'}",
                                      "--plan", "fast", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    compressed = hetvit.load(tmp_path / "out")
    assert type(compressed).__name__ == "ViTForImageClassification"
    assert compressed.hetvit_plan.static or compressed.hetvit_plan.pyramid


def test_hf_cli_plan_reads_the_directory(tmp_path):
    """``plan --model hf:DIR`` shows the plan for the directory's own sizes, as compress would
    make it."""
    from typer.testing import CliRunner

    from hetvit.cli import app
    from hetvit.flops import formula_macs

    model = _hf("ViTForImageClassification", "ViTConfig")()
    model.save_pretrained(tmp_path / "vit")
    result = CliRunner().invoke(app, ["plan", "--model", f"hf:{tmp_path / 'vit'}", "--plan",
                                      "fast", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)  # transformers draws its loading bar on stderr
    plan = hetvit.surgery.preset("fast", model)
    assert shown["plan"]["static"] == list(plan.static)
    assert shown["gmacs"]["plan"] == pytest.approx(formula_macs(describe(model), plan) / 1e9)
    assert shown["gmacs"]["baseline"] == pytest.approx(formula_macs(describe(model)) / 1e9)


def test_without_transformers_an_hf_model_is_one_clear_line(tmp_path, monkeypatch):
    model = _hf("ViTForImageClassification", "ViTConfig")()
    model.save_pretrained(tmp_path / "vit")
    arch = describe(model)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    for attempt in (lambda: hetvit.surgery.load_model(f"hf:{tmp_path / 'vit'}"),
                    lambda: hetvit.surgery.build_model(arch)):
        with pytest.raises(UnsupportedModelError, match=r"pip install 'hetvit\[hf\]'") as e:
            attempt()
        assert "\n" not in str(e.value)


def test_hf_transformers_4_layout_is_refused():
    """transformers 4 kept the layers in ``encoder.layer``: refused with the version needed."""
    class ViTModel(nn.Module):
        pass

    ViTModel.__module__ = "transformers.models.vit.modeling_vit"
    old = ViTModel()
    old.encoder = nn.Module()
    old.encoder.layer = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(UnsupportedModelError, match="transformers 4.*transformers>="):
        describe(old)


# ----------------------------------------------------------------------------- timm families
def test_avg_pool_counts_every_patch_once():
    """With blocks that pass tokens through (zero residual branches), a stage that averages
    groups of unequal size keeps timm's ``global_pool='avg'`` output, which an unweighted
    mean over the new tokens would not."""
    model = _timm("vit_base_patch16_224", global_pool="avg")()
    for block in model.blocks:
        for linear in (block.attn.proj, block.mlp.fc2):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
    compressed = hetvit.compress(model, Plan(pyramid=((1, 3),)))
    stage = host_of(compressed).stages(compressed)[0]
    groups = [0] * 1 + [1] * 5 + [2] * 10  # of the 16 patches
    p = torch.zeros(3, 16)
    for j, g in enumerate(groups):
        p[g, j] = 1.0
    stage.set_matrix(p / p.sum(1, keepdim=True))
    x = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), model(x), atol=1e-5, rtol=1e-4)
        unweighted = copy.deepcopy(compressed)
        unweighted.norm = unweighted.norm.norm
        assert not torch.allclose(unweighted(x), model(x), atol=1e-3)


@pytest.mark.parametrize(("name", "kwargs", "missing"), [
    ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, embed_dim=32, depth=2,
                                    num_heads=2), "rotary position embedding"),
    ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                   num_heads=2), "relative position bias"),
    ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=32, depths=(2,),
                                          num_heads=(2,), window_size=4), "shifted windows"),
    ("vit_tiny_r_s16_p8_224", dict(img_size=32), "CNN stem"),
])
def test_refused_timm_families_name_what_is_missing(name, kwargs, missing):
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    with pytest.raises(UnsupportedModelError, match=missing) as e:
        hetvit.compress(model, Plan(static=(0,)))
    assert "\n" not in str(e.value)
