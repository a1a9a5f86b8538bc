import pytest
import torch

import hetvit
from hetvit.attention import StaticAttention
from hetvit.hosts import HOSTS
from hetvit.plan import Plan

from .conftest import tiny_vit

attention_map = HOSTS["timm"].attention_map


def _attn_input(model, layer, x):
    """The tensor entering block ``layer``'s attention module."""
    seen = {}
    h = model.blocks[layer].attn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen["x"]


@pytest.mark.parametrize("fused", [True, False])
def test_static_map_of_one_input_reproduces_dynamic_attention(fused, images):
    model = tiny_vit()
    attn = model.blocks[1].attn
    attn.fused_attn = fused
    x = _attn_input(model, 1, images[:1])
    static = StaticAttention.from_projections(HOSTS["timm"].projections(attn), x.shape[1]).eval()
    static.set_map(attention_map(attn, x)[0], eps=0.0)
    with torch.no_grad():
        torch.testing.assert_close(static(x), attn(x), atol=1e-5, rtol=0)


def test_attention_map_matches_unfused_timm(images):
    model = tiny_vit()
    attn = model.blocks[0].attn
    x = _attn_input(model, 0, images)
    captured = {}
    attn.fused_attn = False
    h = attn.attn_drop.register_forward_hook(lambda m, a, out: captured.setdefault("a", out))
    with torch.no_grad():
        attn(x)
    h.remove()
    torch.testing.assert_close(attention_map(attn, x), captured["a"], atol=1e-6, rtol=0)


def test_calibration_on_one_image_gives_that_images_attention(images):
    model = tiny_vit()
    one = images[:1]
    expected = {i: attention_map(model.blocks[i].attn, _attn_input(model, i, one))[0]
                for i in (0, 1)}
    student = hetvit.compress(model, Plan(static=(0, 1)), calibration=one)
    for i in (0, 1):
        torch.testing.assert_close(student.blocks[i].attn.static_map(), expected[i],
                                   atol=1e-5, rtol=0)


def test_calibration_accepts_a_loader_of_labelled_batches(images):
    model = tiny_vit()
    # None: a loader batch whose images were all unreadable (data.collate_skipping)
    loader = [(images[:2], torch.zeros(2)), None, (images[2:], torch.zeros(2))]
    a = hetvit.compress(model, Plan(static=(0,)), calibration=loader)
    b = hetvit.compress(model, Plan(static=(0,)), calibration=images)
    torch.testing.assert_close(a.blocks[0].attn.static_map(), b.blocks[0].attn.static_map())


def test_uniform_start_without_calibration_warns():
    model = tiny_vit()
    with pytest.warns(UserWarning, match="uniform"):
        student = hetvit.compress(model, Plan(static=(0,)))
    a = student.blocks[0].attn.static_map()
    torch.testing.assert_close(a, torch.full_like(a, 1 / a.shape[-1]))


def test_static_layer_has_no_query_or_key():
    student = hetvit.compress(tiny_vit(), Plan(static=(0,)))
    names = [n for n, _ in student.blocks[0].attn.named_parameters()]
    assert sorted(names) == ["logits", "proj.bias", "proj.weight", "v.bias", "v.weight"]


def test_eval_cache_follows_the_weights(images):
    student = hetvit.compress(tiny_vit(), Plan(static=(0,))).eval()
    attn = student.blocks[0].attn
    with torch.no_grad():
        first = student(images)
        assert attn._map() is attn._map()  # cached: computed once
        attn.logits.normal_()  # an in-place change must not serve a stale map
        second = student(images)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(attn._map(), attn.static_map().detach())


def test_training_mode_gets_gradients_into_the_logits(images):
    student = hetvit.compress(tiny_vit(), Plan(static=(0,))).train()
    student(images).sum().backward()
    assert student.blocks[0].attn.logits.grad.abs().sum() > 0


def test_curriculum_mix_with_guide_equal_to_static_is_a_no_op(images):
    student = hetvit.compress(tiny_vit(), Plan(static=(0,)), calibration=images).eval()
    attn = student.blocks[0].attn
    with torch.no_grad():
        plain = student(images)
        attn.guide = attn.static_map().expand(len(images), -1, -1, -1)
        attn.mix = 0.5
        mixed = student(images)
        attn.guide = torch.zeros_like(attn.guide)
        zeroed = student(images)
    torch.testing.assert_close(mixed, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(zeroed, plain)


def test_wrong_token_count_is_a_clear_error():
    static = StaticAttention(dim=32, num_heads=2, num_tokens=17)
    with pytest.raises(ValueError, match="built for 17 tokens but got 5"):
        static(torch.randn(1, 5, 32))
