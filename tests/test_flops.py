"""MAC counts: the closed form agrees with what a forward pass runs, and with a hand count."""

import pytest
import torch

import hetvit
from hetvit.flops import count_macs, formula_macs
from hetvit.plan import Plan
from hetvit.surgery import describe

from .conftest import tiny_vit

PLANS = [
    Plan(),
    Plan(static=(0,)),
    Plan(pyramid=((2, 4),)),
    Plan(static=(0, 1), pyramid=((1, 8), (3, 4))),
    Plan(static=(0, 1, 2, 3), pyramid=((1, 8), (2, 4), (3, 1))),
    Plan(static=(2, 3), pyramid=((1, 12),)),  # static layers after a stage: fewer tokens
]

VARIANTS = {
    "deit": {},
    "distilled": {"distilled": True},
    "layerscale": {"init_values": 1e-5},
    "avgpool-no-cls": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 2},
    "mlp-ratio-3": {"mlp_ratio": 3.0},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.describe().replace(" ", ""))
def test_counted_macs_equal_the_formula(variant, plan):
    model = tiny_vit(**VARIANTS[variant])
    net = hetvit.compress(model, plan) if plan.static or plan.pyramid else model
    assert count_macs(net) == formula_macs(describe(model), plan)


def test_counted_macs_equal_the_formula_with_fused_attention_off(monkeypatch):
    # The count hooks attention modules, so it must not depend on timm's fused-kernel switch.
    model = tiny_vit()
    for blk in model.blocks:
        monkeypatch.setattr(blk.attn, "fused_attn", False)
    assert count_macs(model) == formula_macs(describe(model))


def test_formula_matches_a_hand_count():
    # 32x32 image, 8x8 patches: 16 patch tokens + 1 class token; D = 32, MLP hidden 4D = 128,
    # 4 blocks, 10 classes, RGB input.
    n, d, h = 17, 32, 128
    embed = 16 * (3 * 8 * 8) * d  # one D-wide projection of each 192-value patch: 98,304
    head = d * 10

    def dynamic(t: int) -> int:  # qkv, q k^T, A V, proj, MLP
        return 3 * t * d * d + t * t * d + t * t * d + t * d * d + 2 * t * d * h

    def static(t: int) -> int:  # v, A V, proj, MLP: no q, k or q k^T
        return t * d * d + t * t * d + t * d * d + 2 * t * d * h

    assert dynamic(17) == 227_392 and static(17) == 183_328 and dynamic(5) == 63_040
    arch = describe(tiny_vit())
    assert formula_macs(arch) == embed + 4 * dynamic(n) + head == 1_008_192
    # Block 0 static on 17 tokens, block 1 dynamic, then 16 patches -> 4 (16 x 4 x D MACs),
    # blocks 2 and 3 dynamic on 1 + 4 tokens.
    plan = Plan(static=(0,), pyramid=((2, 4),))
    expected = embed + static(n) + dynamic(n) + 4 * 16 * d + 2 * dynamic(5) + head
    assert formula_macs(arch, plan) == expected == 637_472
    assert count_macs(hetvit.compress(tiny_vit(), plan)) == expected


def test_count_runs_in_the_models_dtype_and_leaves_its_mode():
    model = tiny_vit().train()
    student = hetvit.compress(model, Plan(static=(0,), pyramid=((1, 8),))).to(torch.float64)
    assert student.training
    assert count_macs(student) == formula_macs(describe(model), student.hetvit_plan)
    assert student.training
