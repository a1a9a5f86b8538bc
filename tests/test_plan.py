import pytest
import timm

from hetvit.flops import formula_macs
from hetvit.plan import Plan, PlanError, preset_for
from hetvit.surgery import describe, preset

from .conftest import tiny_vit


def test_json_round_trip(tmp_path):
    plan = Plan(static=(0, 1, 2), pyramid=((4, 98), (7, 49)), img_size=(224, 224),
                source={"name": "deit_small_patch16_224"}, label="fast")
    assert Plan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == plan
    assert Plan.from_json('{"static": [0,1,2,3], "pyramid": [[4,98],[7,49],[10,25]]}').pyramid \
        == ((4, 98), (7, 49), (10, 25))


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224",
                                  "deit_base_patch16_224", "vit_small_patch16_224",
                                  "vit_base_patch16_224"])
def test_presets_for_224_models_get_faster_in_order(name):
    model = timm.create_model(name, pretrained=False)
    arch = describe(model)
    base = formula_macs(arch)
    speed = []
    for kind in ("balanced", "fast", "fastest"):
        plan = preset(kind, model)
        plan.validate(12, (14, 14), (224, 224))
        assert plan.img_size == (224, 224) and plan.label == kind
        speed.append(base / formula_macs(arch, plan))
    assert 1.5 < speed[0] < speed[1] < speed[2]
    assert preset("fast", model).pyramid == ((3, 98), (6, 49), (9, 25))


def test_presets_scale_to_other_grids_and_depths():
    # A 12-block ViT on 32x32 images with patch 4 has an 8x8 grid.
    plan = preset_for("fast", depth=12, grid=(8, 8))
    assert plan.pyramid == ((3, 32), (6, 16), (9, 9))
    plan.validate(12, (8, 8))
    for depth in (4, 6, 24):
        for name in ("balanced", "fast", "fastest"):
            p = preset_for(name, depth=depth, grid=(4, 4))
            p.validate(depth, (4, 4))
            assert p.static and p.pyramid


@pytest.mark.parametrize("plan,message", [
    (Plan(static=(4,)), "static layer 4 is out of range: the model has 4 blocks"),
    (Plan(pyramid=((9, 8),)), "layer 9 is out of range"),
    (Plan(pyramid=((1, 8), (2, 8))), "strictly decrease"),
    (Plan(pyramid=((1, 16),)), "keeps all 16 tokens"),
    (Plan(pyramid=((2, 8), (1, 4))), "strictly increase"),
    (Plan(pyramid=((1, 17),)), "M=17 is larger than the 16 patch tokens"),
    (Plan(pyramid=((1, 4), (2, 8))), "M=8 is larger than the 4 patch tokens present"),
    (Plan(static=(0,), img_size=(224, 224)), "made for input size \\(224, 224\\)"),
])
def test_bad_plans_give_clear_errors(plan, message):
    import hetvit

    with pytest.raises(PlanError, match=message):
        hetvit.compress(tiny_vit(), plan)


def test_malformed_plan_files(tmp_path):
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{static: 1")
    with pytest.raises(PlanError, match="unknown plan fields"):
        Plan.from_dict({"static": [0], "layers": [1]})
    with pytest.raises(PlanError, match="repeat"):
        Plan(static=(1, 1))
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="unknown preset"):
        preset_for("turbo", 12, (14, 14))


def test_the_package_api_loads_lazily_and_completely():
    import subprocess
    import sys

    code = ("import sys, hetvit; assert 'torch' not in sys.modules; "
            "[getattr(hetvit, n) for n in hetvit.__all__]; "
            "assert hetvit.flops.formula_macs is sys.modules['hetvit.flops'].formula_macs; "
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
    import hetvit

    with pytest.raises(AttributeError, match="no attribute 'compres'"):
        hetvit.compres  # noqa: B018
