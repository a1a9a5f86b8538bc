import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import hetvit
from hetvit.aggregation import TokenAggregation, pooling_matrix
from hetvit.attention import StaticAttention
from hetvit.errors import CheckpointError, UnsupportedModelError
from hetvit.plan import Plan, PlanError
from hetvit.surgery import describe, load_model

from .conftest import tiny_vit, within_cluster_error

PLAN = Plan(static=(0, 1), pyramid=((1, 8), (3, 4)))


def _tokens_entering_blocks(model, x):
    counts = []
    hooks = [b.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1]))
             for b in model.blocks if not isinstance(b, TokenAggregation)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("distilled,init_values,prefix", [(False, None, 1), (True, None, 2),
                                                          (False, 1e-5, 1)])
def test_token_count_after_each_stage_matches_the_plan(distilled, init_values, prefix, images):
    model = tiny_vit(distilled=distilled, init_values=init_values)
    student = hetvit.compress(model, PLAN, calibration=images).eval()
    assert _tokens_entering_blocks(student, images) == [prefix + n for n in (16, 8, 8, 4)]
    with torch.no_grad():
        assert student(images).shape == model(images).shape == (4, 10)


def test_compress_leaves_the_input_model_untouched(images):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(images)
    hetvit.compress(model, PLAN, calibration=images)
    assert len(model.blocks) == 4 and not any(isinstance(b.attn, StaticAttention)
                                              for b in model.blocks)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        torch.testing.assert_close(model(images), out)


def test_empty_plan_is_the_same_model(images):
    model = tiny_vit()
    student = hetvit.compress(model, Plan())
    with torch.no_grad():
        torch.testing.assert_close(student(images), model(images))


def test_timm_api_keeps_working(images):
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                              depth=4, num_heads=2, num_classes=10).eval()
    student = hetvit.compress(model, PLAN, calibration=images)
    with torch.no_grad():
        feats = student.forward_features(images)
        assert feats.shape == (4, 5, 32)
        torch.testing.assert_close(student.forward_head(feats), student(images))
    assert student.pretrained_cfg["architecture"] == "deit_tiny_patch16_224"
    assert student.hetvit_plan.source["name"] == "deit_tiny_patch16_224"


@pytest.mark.parametrize("fused", [True, False])
def test_fused_and_unfused_attention_compress_alike(fused, images):
    ref = hetvit.compress(tiny_vit(), PLAN, calibration=images).eval()
    model = tiny_vit()
    for b in model.blocks:
        b.attn.fused_attn = fused
    student = hetvit.compress(model, PLAN, calibration=images).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(images), ref(images), atol=1e-5, rtol=0)


def test_a_block_after_aggregation_can_be_static(images):
    plan = Plan(static=(2,), pyramid=((1, 8),))
    student = hetvit.compress(tiny_vit(), plan, calibration=images)
    assert student.blocks[3].attn.logits.shape == (2, 9, 9)


def test_wrong_input_size_is_a_clear_error():
    student = hetvit.compress(tiny_vit(), Plan(static=(0,)))
    with pytest.raises(Exception, match="(?i)input (height|size)|doesn't match"):
        student(torch.randn(1, 3, 64, 64))


def test_unsupported_models_say_what_is_supported():
    with pytest.raises(UnsupportedModelError, match="DeiT .*ViT .*DeiT-3"):
        hetvit.compress(nn.Linear(3, 3), Plan())
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 1))
    with pytest.raises(UnsupportedModelError, match="SwinTransformer is not supported"):
        hetvit.compress(swin, Plan())
    with pytest.raises(UnsupportedModelError, match="dynamic image size"):
        hetvit.compress(tiny_vit(dynamic_img_size=True), Plan())


def test_compressing_twice_is_refused():
    student = hetvit.compress(tiny_vit(), Plan(static=(0,)))
    with pytest.raises(PlanError, match="already compressed"):
        hetvit.compress(student, Plan(static=(1,)))


def test_describe_rebuilds_the_architecture():
    from hetvit.surgery import build_model

    for model in (tiny_vit(), tiny_vit(distilled=True), tiny_vit(init_values=1e-5)):
        rebuilt = build_model(describe(model))
        assert type(rebuilt) is type(model)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()}


KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.mark.parametrize("fmt", ["deit_pth", "timm_pth", "safetensors", "lightning_ckpt"])
def test_load_model_reads_local_checkpoints(fmt, tmp_path, images):
    src = timm.create_model("deit_tiny_patch16_224", **KW).eval()
    state = src.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "deit_pth":
        torch.save({"model": state, "epoch": 3}, path)
    elif fmt == "timm_pth":
        torch.save(state, path)
    elif fmt == "lightning_ckpt":
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    else:
        save_file(state, str(path))
    loaded = load_model("deit_tiny_patch16_224", path, **KW).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), src(images))


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model("deit_tiny_patch16_224", tmp_path / "nope.pth", **KW)
    other = timm.create_model("deit_tiny_patch16_224", **{**KW, "embed_dim": 64})
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_model("deit_tiny_patch16_224", tmp_path / "other.pth", **KW)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model("deit_tiny_patch16_224", tmp_path / "junk.pth", **KW)
    with pytest.raises(UnsupportedModelError, match="unknown timm model"):
        load_model("no_such_vit", None)
    with pytest.warns(UserWarning, match="weights are random"):
        load_model("deit_tiny_patch16_224", None, **KW)


def _stage_inputs(model, x):
    """The layer-normalised patch tokens entering each aggregation stage: one N x (B*D)
    descriptor matrix a stage (a token's features in every image)."""
    seen = []
    hooks = [b.register_forward_pre_hook(
        lambda m, a: seen.append(F.layer_norm(a[0][:, 1:], a[0].shape[-1:])))
        for b in model.blocks if isinstance(b, TokenAggregation)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [t.transpose(0, 1).reshape(t.shape[1], -1) for t in seen]


def test_cluster_init_groups_each_stages_tokens_at_least_as_well_as_pooling(images):
    plan = Plan(static=(3,), pyramid=((1, 8), (2, 4)))  # the static layer sees both stages
    student = hetvit.compress(tiny_vit(), plan, calibration=images, aggregation_init="cluster")
    stages = [b for b in student.blocks if isinstance(b, TokenAggregation)]
    for agg, feats in zip(stages, _stage_inputs(student.eval(), images), strict=True):
        p = agg.matrix().detach()
        assert ((p > 1e-3).sum(0) == 1).all()  # a hard partition: every token in one cluster
        pool, _ = pooling_matrix(agg.grid_in, agg.num_out)  # 2x1 / 1x2 windows: hard too
        assert within_cluster_error(feats, p) <= within_cluster_error(feats, pool)
    # Several calibration passes (one a stage, then the static maps) work on a one-shot iterator.
    again = hetvit.compress(tiny_vit(), plan, calibration=iter([images[:2], images[2:]]),
                            aggregation_init="cluster")
    torch.testing.assert_close(again.state_dict(), student.state_dict())


def test_cluster_init_needs_calibration_and_a_known_name(images):
    plan = Plan(pyramid=((1, 8),))
    with pytest.raises(ValueError, match="give calibration images"):
        hetvit.compress(tiny_vit(), plan, aggregation_init="cluster")
    with pytest.raises(ValueError, match="one of"):
        hetvit.compress(tiny_vit(), plan, calibration=images, aggregation_init="kmeans")


def test_calibration_that_holds_no_image_is_refused_not_taken_for_none(images):
    """Given but empty (every image unreadable, say), calibration is an error: starting the
    static maps uniform, as without calibration, would hide that the images were lost."""
    plan = Plan(static=(0,))
    with pytest.raises(hetvit.errors.DataError, match="no readable image"):
        hetvit.compress(tiny_vit(), plan, calibration=[])
    with pytest.warns(UserWarning, match="uniform"):
        hetvit.compress(tiny_vit(), plan)  # none given: uniform, and said
    with pytest.raises(hetvit.errors.UsageError, match="init must be one of"):
        hetvit.compress(tiny_vit(), plan, calibration=images, init="calbirate")


@pytest.mark.parametrize("bad, error, message", [
    (5, "UsageError", "calibration must be images .* not int"),
    ({"images": 1}, "UsageError", "not dict"),
    (["a.png"], "DataError", "a batch of images must be a B x C x H x W tensor .* got str"),
    ([torch.zeros(3, 32, 32)], "DataError", r"got shape \(3, 32, 32\)"),
])
def test_calibration_that_is_not_images_is_a_clear_error(bad, error, message):
    """Not a TypeError or AttributeError from deep inside: a hetvit error saying what to pass."""
    with pytest.raises(getattr(hetvit.errors, error), match=message):
        hetvit.compress(tiny_vit(), Plan(static=(0,)), calibration=bad)
