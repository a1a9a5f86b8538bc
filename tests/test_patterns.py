"""Attention-pattern analysis: metrics on constructed layers, streaming exactness, the plan
recommended from them and its reasons, the saved report."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

import hetvit
from hetvit.flops import formula_macs
from hetvit.grid import token_grid
from hetvit.hosts import HOSTS
from hetvit.patterns import PatternReport, analyze
from hetvit.plan import Plan
from hetvit.recommend import PYRAMID_GAP, Recommendation, explain_plan, recommend, token_ladder
from hetvit.render import save_report
from hetvit.surgery import describe

from .conftest import tiny_vit

attention_map = HOSTS["timm"].attention_map

pytestmark = pytest.mark.filterwarnings("ignore:the model looks untrained")

D = 32  # the tiny ViT's width
N = 17  # its tokens: cls + a 4x4 grid


def zero_qk(model, layer: int) -> None:
    """q = k = 0 in ``layer``: every logit is 0, so every row of every map is uniform."""
    qkv = model.blocks[layer].attn.qkv
    with torch.no_grad():
        qkv.weight[: 2 * D].zero_()
        qkv.bias[: 2 * D].zero_()


def sharpen_qk(model, layer: int, scale: float = 3.0, seed: int = 0) -> None:
    """Large random q and k weights: peaked maps that depend on the image."""
    qkv = model.blocks[layer].attn.qkv
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        qkv.weight[: 2 * D] = torch.randn(2 * D, D, generator=gen) * scale / math.sqrt(D)


def test_zero_qk_layer_is_uniform_identical_and_rank_one():
    model = tiny_vit()
    zero_qk(model, 1)
    torch.manual_seed(0)
    report = analyze(model, torch.randn(6, 3, 32, 32), progress=False)
    np.testing.assert_allclose(report.mean_maps[1], 1 / N, atol=1e-7)
    np.testing.assert_allclose(report.similarity[1], 1.0, atol=1e-9)
    np.testing.assert_allclose(report.js[1], 0.0, atol=1e-9)
    np.testing.assert_allclose(report.static_kl[1], 0.0, atol=1e-9)
    np.testing.assert_allclose(report.effective_rank[1], 1 / N, atol=1e-6)
    np.testing.assert_allclose(report.rank90[1], 1 / N)
    np.testing.assert_allclose(report.rank99[1], 1 / N)


def test_large_random_qk_layer_differs_between_images():
    model = tiny_vit()
    zero_qk(model, 1)
    sharpen_qk(model, 2)
    torch.manual_seed(0)
    report = analyze(model, torch.randn(8, 3, 32, 32), progress=False)
    assert report.similarity[2].max() < 0.5
    assert report.js[2].min() > 0.3
    assert report.static_kl[2].min() > 0.5
    assert (report.effective_rank[2] > 5 * report.effective_rank[1]).all()
    assert (report.rank90[2] > report.rank90[1]).all()


# --------------------------------------------------------------------------- streaming exactness
def reference(model, images, prefix: int = 1) -> dict[str, np.ndarray]:
    """Every metric from all maps at once, by direct (quadratic) formulas."""
    maps, tokens = {}, {}
    hooks = []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_pre_hook(
            lambda m, a, i=i: tokens.__setitem__(i, a[0].double())))
        hooks.append(blk.attn.register_forward_pre_hook(
            lambda m, a, i=i: maps.__setitem__(i, attention_map(m, a[0]).double())))
    with torch.no_grad():
        model.forward_features(images)
    for h in hooks:
        h.remove()
    out: dict[str, list] = {k: [] for k in ("similarity", "js", "static_kl", "effective_rank",
                                            "rank90", "rank99", "redundancy", "mean_maps")}
    n = images.shape[0]
    off_diag = ~torch.eye(n, dtype=torch.bool)
    for i in range(len(model.blocks)):
        a = maps[i]  # n x H x N x N
        flat = a.flatten(2).transpose(0, 1)  # H x n x N*N
        unit = flat / flat.norm(dim=-1, keepdim=True)
        gram = unit @ unit.transpose(1, 2)  # H x n x n
        out["similarity"].append((gram[:, off_diag]).mean(-1))

        def kl(p, q):
            return (p * (p / q).log()).sum(-1)

        p, q = a[:-1], a[1:]
        m = (p + q) / 2
        js = (0.5 * kl(p, m) + 0.5 * kl(q, m)) / math.log(2)  # pairs x H x N, bits
        out["js"].append(js.mean(-1).mean(0))
        mean = a.mean(0)
        out["static_kl"].append(kl(a, mean[None].expand_as(a)).mean(-1).mean(0))
        out["mean_maps"].append(mean)

        s = torch.linalg.svdvals(a)
        pn = s / s.sum(-1, keepdim=True)
        out["effective_rank"].append(torch.exp(-(pn * pn.log()).sum(-1)).mean(0) / a.shape[-1])
        for name, level in (("rank90", 0.9), ("rank99", 0.99)):
            e = s.square()
            frac = e.cumsum(-1) / e.sum(-1, keepdim=True)
            k = torch.tensor([[int(np.searchsorted(f.numpy(), level - 1e-12)) + 1
                               for f in img] for img in frac], dtype=torch.float64)
            out[name].append(k.mean(0) / a.shape[-1])

        t = tokens[i][:, prefix:]
        u = t / t.norm(dim=-1, keepdim=True)
        g = u @ u.transpose(1, 2)
        mp = t.shape[1]
        out["redundancy"].append((g.sum((1, 2)) - mp) / (mp * (mp - 1)))
    res = {k: torch.stack(v).numpy() for k, v in out.items()}
    res["redundancy"] = res["redundancy"].mean(1)
    return res


def test_streaming_statistics_equal_all_at_once():
    model = tiny_vit()
    sharpen_qk(model, 0, scale=1.5)
    sharpen_qk(model, 3, scale=3.0, seed=1)
    torch.manual_seed(3)
    images = torch.randn(10, 3, 32, 32)
    want = reference(model, images)
    # Uneven batches (3, 3, 3, 1), one that splits consecutive pairs across batches.
    got = analyze(model, images, batch_size=3, progress=False)
    whole = analyze(model, images, batch_size=10, progress=False)
    for name in ("similarity", "js", "static_kl", "effective_rank", "rank90", "rank99",
                 "redundancy", "mean_maps"):
        np.testing.assert_allclose(getattr(got, name), want[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)
        np.testing.assert_allclose(getattr(got, name), getattr(whole, name), rtol=1e-9,
                                   atol=1e-9, err_msg=name)
    assert got.num_images == 10 and got.rank_images == 10


def test_loader_batches_limits_and_rank_images():
    model = tiny_vit()
    sharpen_qk(model, 2)
    torch.manual_seed(4)
    images = torch.randn(9, 3, 32, 32)
    loader = [(images[:4], torch.zeros(4)), None, (images[4:], torch.zeros(5))]
    report = analyze(model, loader, num_images=7, rank_images=3, progress=False)
    assert report.num_images == 7 and report.rank_images == 3
    want = analyze(model, images[:7], rank_images=3, progress=False)
    np.testing.assert_allclose(report.similarity, want.similarity, rtol=1e-9)
    np.testing.assert_allclose(report.rank90, want.rank90, rtol=1e-9)
    first3 = analyze(model, images[:3], progress=False)
    np.testing.assert_allclose(report.effective_rank, first3.effective_rank, rtol=1e-9)
    with pytest.raises(ValueError, match="at least 2 images"):
        analyze(model, images[:1], progress=False)


def test_fused_and_unfused_attention_capture_the_same_maps():
    reports, timm_maps = [], []
    torch.manual_seed(5)
    images = torch.randn(5, 3, 32, 32)
    for fused in (True, False):
        model = tiny_vit()
        sharpen_qk(model, 1)
        for blk in model.blocks:
            blk.attn.fused_attn = fused
        reports.append(analyze(model, images, progress=False))
        if not fused:  # timm's own softmax output, for the absolute check
            seen = {}
            attn = model.blocks[1].attn
            h = attn.attn_drop.register_forward_hook(
                lambda m, a, o, seen=seen: seen.setdefault("a", o))
            with torch.no_grad():
                model(images)
            h.remove()
            timm_maps.append(seen["a"].mean(0).numpy())
    fused_r, unfused_r = reports
    # Fused and unfused layers before layer 1 round differently (float32), and the sharp layer
    # amplifies that a little; the maps agree to float precision, not bit for bit.
    np.testing.assert_allclose(fused_r.mean_maps, unfused_r.mean_maps, atol=1e-5)
    np.testing.assert_allclose(fused_r.examples, unfused_r.examples, atol=1e-5)
    np.testing.assert_allclose(fused_r.similarity, unfused_r.similarity, atol=1e-5)
    np.testing.assert_allclose(fused_r.mean_maps[1], timm_maps[0], atol=1e-6)


def test_untrained_model_warns_and_compressed_model_is_refused():
    model = tiny_vit()
    with pytest.warns(UserWarning, match="looks untrained"):
        analyze(model, torch.randn(2, 3, 32, 32), progress=False)
    with torch.no_grad():
        model.norm.weight.add_(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analyze(model, torch.randn(2, 3, 32, 32), progress=False)
    compressed = hetvit.compress(model, Plan(static=(0,)))
    with pytest.raises(ValueError, match="already compressed"):
        analyze(compressed, torch.randn(2, 3, 32, 32), progress=False)


# --------------------------------------------------------------------------- recommend
def synthetic_report(similarity: list[float], rank90: list[float]) -> PatternReport:
    """A report with chosen per-layer numbers, for a depth-8 ViT on an 8x8 token grid."""
    depth = len(similarity)
    arch = describe(tiny_vit(img_size=64, depth=depth))
    heads, n = 2, 65
    sim = np.array(similarity)[:, None].repeat(heads, 1)
    sim[:, 1] += 0.01  # the plan must follow the worst head
    r90 = np.array(rank90)[:, None].repeat(heads, 1)
    r90[:, 0] -= 0.01
    zeros = np.zeros((depth, heads))
    return PatternReport(arch=arch, num_images=10, rank_images=10, similarity=sim, js=zeros,
                         static_kl=zeros, effective_rank=r90 / 2, rank90=r90, rank99=r90,
                         redundancy=np.zeros(depth), spectra=np.zeros((depth, heads, n)))


SIM = [0.99, 0.97, 0.95, 0.5, 0.96, 0.4, 0.3, 0.3]  # layer 4 passes but breaks the run
RANK = [0.9, 0.9, 0.8, 0.6, 0.45, 0.3, 0.2, 0.2]


def test_recommend_static_is_the_leading_run_and_respects_max_static():
    report = synthetic_report(SIM, RANK)
    rec = recommend(report, similarity=0.9)
    assert rec.plan.static == (0, 1, 2)
    assert rec.passed_similarity == [0, 1, 2, 4]
    assert rec.leading_run == 3
    assert recommend(report, max_static=2).plan.static == (0, 1)
    assert recommend(report, max_static=0).plan.static == ()
    assert recommend(report, similarity=0.98).plan.static == (0,)
    # head 1 passes, head 0 does not
    assert recommend(report, similarity=0.995).plan.static == ()
    assert recommend(report, similarity=0.9, max_static=10).plan.static == (0, 1, 2)


def test_recommend_pyramid_follows_rank_and_the_token_grid():
    report = synthetic_report(SIM, RANK)
    rec = recommend(report)
    plan = rec.plan
    arch = report.arch
    grid = token_grid(arch)
    ladder = token_ladder(grid)
    assert ladder == [64, 32, 16, 9, 4]
    plan.validate(arch["depth"], grid, tuple(arch["img_size"]))
    assert plan.label == "recommended"
    need = [c.need for c in rec.layers]
    for layer, m in plan.pyramid:
        assert layer >= len(plan.static) and m in ladder
        assert m >= need[layer] * 64  # margin 1: at least the rank need
    # Rank 0.45 from layer 4 on needs 29 of 64 tokens, so the half grid (32) from layer 4, and
    # 0.3 from layer 5 needs 19.2, still 32; 0.2 from layer 6 needs 12.8 -> 16.
    assert plan.pyramid == ((4, 32), (6, 16))


def test_recommend_builds_a_pyramid_even_where_the_rank_collapses():
    """Rank 0.05 everywhere asks for 4 tokens at once; the plan steps down the ladder instead."""
    report = synthetic_report([0.5] * 8, [0.05] * 8)
    rec = recommend(report)
    assert rec.plan.pyramid == ((1, 32), (3, 16), (5, 9), (7, 4))
    reasons = {c.layer: c.reason for c in rec.layers}
    assert "one ladder step down from 64 at a time" in reasons[1]
    assert f"the earliest layer at least {PYRAMID_GAP} layers after the stage at layer 1" \
        in reasons[3]


@pytest.mark.parametrize("target", [1.2, 1.6, 2.2])
def test_recommend_reaches_the_speed_target(target):
    report = synthetic_report(SIM, RANK)
    rec = recommend(report, speedup=target, max_static=2)
    plan = rec.plan
    assert plan.static == (0, 1)
    base = formula_macs(report.arch)
    achieved = base / formula_macs(report.arch, plan)
    assert achieved >= target
    assert rec.target_reached is True
    assert rec.speedup == pytest.approx(achieved)
    # The most conservative plan that reaches the target: a slightly larger margin misses it.
    first = Plan(static=plan.static, pyramid=rec.pyramid_before_delay,
                 img_size=plan.img_size, source=plan.source, label=plan.label)
    if rec.margin is not None:
        looser = recommend(report, max_static=2, margin=rec.margin * 1.1).plan
        assert base / formula_macs(report.arch, looser) < target or looser == first
    # Then its stages sit as late as the target allows: no stage can move one layer later
    # (past the last layer: dropped) without missing the target.
    assert achieved <= base / formula_macs(report.arch, first)
    depth = report.arch["depth"]
    for i, (at, m) in enumerate(plan.pyramid):
        if i + 1 < len(plan.pyramid) and plan.pyramid[i + 1][0] - (at + 1) < PYRAMID_GAP:
            continue
        later = [*plan.pyramid[:i], *([(at + 1, m)] if at + 1 < depth else []),
                 *plan.pyramid[i + 1:]]
        moved = Plan(static=plan.static, pyramid=later)
        assert base / formula_macs(report.arch, moved) < target, (plan.pyramid, later)


def test_recommend_says_where_a_stage_was_moved_from():
    report = synthetic_report([0.5] * 8, [0.05] * 8)
    rec = recommend(report, speedup=2.0)
    # The margin's plan puts the second stage at layer 3; it moves to 6 while 2x still holds.
    assert rec.pyramid_before_delay == ((1, 32), (3, 16))
    assert rec.plan.pyramid == ((1, 32), (6, 16))
    assert "moved later from layer 3" in rec.layers[6].reason
    assert "2.00x target still holds" in rec.layers[6].reason
    assert "moved" not in rec.layers[1].reason
    assert "stages moved later to come closer to the target: 1:32 3:16 -> 1:32 6:16" in str(rec)


def test_recommend_warns_when_the_target_is_out_of_reach():
    report = synthetic_report(SIM, RANK)
    with pytest.warns(UserWarning, match="out of reach"):
        rec = recommend(report, speedup=50.0)
    assert rec.target_reached is False
    # the fastest plan: one ladder step every PYRAMID_GAP layers from the end of the static run
    assert rec.plan.pyramid == ((3, 32), (5, 16), (7, 9))
    text = rec.explain()
    assert "NOT reached" in text and "GMACs: baseline" in text


def test_recommend_rejects_bad_settings():
    report = synthetic_report(SIM, RANK)
    with pytest.raises(ValueError, match="rank must be one of"):
        recommend(report, rank="rank50")
    with pytest.raises(ValueError, match="speedup must be positive"):
        recommend(report, speedup=0)
    with pytest.raises(ValueError, match="max_static must be >= 0"):
        recommend(report, max_static=-1)


def test_explain_covers_every_layer_and_any_plan():
    report = synthetic_report(SIM, RANK)
    text = recommend(report).explain()
    assert len([ln for ln in text.splitlines() if ln.strip()[:1].isdigit()]) == 8
    assert "stage -> 32 tokens" in text
    preset = Plan(static=(0, 1, 2, 3, 4), pyramid=((2, 16),))
    other = explain_plan(report, preset)
    assert "kept < need" in other  # the preset keeps fewer tokens than layer 2's rank needs
    base, macs = formula_macs(report.arch), formula_macs(report.arch, preset)
    assert f"({base / macs:.2f}x)" in other
    assert "recommended with" not in other and "why:" not in other  # nothing to justify


# --------------------------------------------------------------------------- Recommendation
def test_input_independent_early_layers_are_recommended_static_with_the_reason():
    """q = k = 0 in layers 0 and 1 makes their maps uniform for every image (similarity 1);
    large random q, k in layers 2 and 3 make theirs image-dependent."""
    model = tiny_vit()
    zero_qk(model, 0)
    zero_qk(model, 1)
    sharpen_qk(model, 2, seed=1)
    sharpen_qk(model, 3, seed=2)
    torch.manual_seed(7)
    images = torch.randn(8, 3, 32, 32)
    report = analyze(model, images, progress=False)
    rec = recommend(report)
    assert rec.plan.static == (0, 1)
    assert rec.leading_run == 2 and rec.passed_similarity == [0, 1]
    for c in rec.layers[:2]:
        assert c.static and c.passes and c.similarity == pytest.approx(1.0, abs=1e-9)
        assert c.reason.startswith("static: worst-head similarity 1.0000 >= 0.900, in the "
                                   "leading run from layer 0")
    for c in rec.layers[2:]:
        assert not c.static and not c.passes
        assert c.reason.startswith(f"dynamic: worst-head similarity {c.similarity:.4f} < 0.900")
    assert rec.first_stage_layer == 2
    assert all(layer >= 2 for layer, _ in rec.plan.pyramid)

    # The plan fits the model it was measured on, and compresses it.
    arch = describe(model)
    rec.plan.validate(arch["depth"], token_grid(arch), tuple(arch["img_size"]))
    student = hetvit.compress(model, rec.plan, calibration=images)
    assert student(images).shape == (8, 10)

    # Every static layer and every stage layer is named, with its reason, in the explanation.
    text = str(rec)
    assert text == rec.explain()
    chosen = {*rec.plan.static, *(layer for layer, _ in rec.plan.pyramid)}
    for layer in chosen:
        assert f"  layer {layer}: {rec.layers[layer].reason}" in text.splitlines()
    assert "\n  layer 0: static:" in text and "\n  layer 1: static:" in text


def test_max_static_and_a_broken_run_are_stated_as_reasons():
    report = synthetic_report(SIM, RANK)
    rec = recommend(report, max_static=1)
    assert rec.plan.static == (0,)
    # layers 1 and 2 pass but the cap stops them; layer 4 passes but layer 3 broke the run
    assert "max_static=1 caps the static run" in rec.layers[1].reason
    assert "max_static=1 caps the static run" in rec.layers[2].reason
    assert "layer 3 before it fails" in rec.layers[4].reason
    assert rec.layers[3].reason.startswith("dynamic: worst-head similarity 0.5000 < 0.900")


def test_recommendation_is_a_frozen_consistent_value():
    report = synthetic_report(SIM, RANK)
    rec = recommend(report, speedup=1.6)
    with pytest.raises(AttributeError):
        rec.plan = Plan()
    assert recommend(report, speedup=1.6) == rec  # the policy is deterministic
    d = rec.to_dict()
    assert Plan.from_dict(d["plan"]) == rec.plan
    assert d["static"] == list(rec.plan.static)
    assert d["worst_head_similarity"] == pytest.approx(report.similarity.min(axis=1).tolist())
    assert d["rank_need"] == pytest.approx(
        np.maximum.accumulate(report.rank90.max(axis=1)[::-1])[::-1].tolist())
    assert d["gmacs_baseline"] == pytest.approx(formula_macs(report.arch) / 1e9)
    assert d["speedup"] == pytest.approx(
        formula_macs(report.arch) / formula_macs(report.arch, rec.plan))
    # layers that contradict the plan are refused
    wrong = list(rec.layers)
    wrong[5] = replace(wrong[5], static=True)
    with pytest.raises(ValueError, match="marked static"):
        replace(rec, layers=tuple(wrong))
    with pytest.raises(ValueError, match="pyramid"):
        replace(rec, plan=replace(rec.plan, pyramid=()))
    with pytest.raises(ValueError, match="one LayerChoice per layer"):
        replace(rec, layers=rec.layers[1:])
    assert isinstance(rec, Recommendation)


# --------------------------------------------------------------------------- output
def test_save_writes_json_markdown_and_plots_atomically(tmp_path):
    model = tiny_vit()
    sharpen_qk(model, 3)
    torch.manual_seed(6)
    report = analyze(model, torch.randn(4, 3, 32, 32), progress=False)
    rec = recommend(report, speedup=1.3)
    (tmp_path / "patterns").mkdir()
    (tmp_path / "patterns" / "stale.txt").write_text("from an older run")
    with pytest.raises(FileExistsError):  # not a report: refused, left alone
        save_report(report, rec, tmp_path / "patterns")
    assert [p.name for p in (tmp_path / "patterns").iterdir()] == ["stale.txt"]
    (tmp_path / "patterns" / "patterns.json").write_text("{}")  # an older report
    out = save_report(report, rec, tmp_path / "patterns")  # replaces the old directory whole
    names = sorted(p.name for p in out.iterdir())
    assert names == ["heatmaps.png", "maps.png", "patterns.json", "patterns.md", "rank.png",
                     "similarity.png", "spectra.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patterns"]  # no temp dir left
    data = json.loads((out / "patterns.json").read_text())
    assert Plan.from_dict(data["plan"]) == rec.plan
    assert data["recommendation"] == json.loads(json.dumps(rec.to_dict()))
    assert data["explanation"] == rec.explain()
    assert np.allclose(data["similarity"], report.similarity, atol=1e-6)
    md = (out / "patterns.md").read_text()
    assert "## Recommended plan" in md and rec.explain() in md
    loaded = PatternReport.load(out)
    assert recommend(loaded, speedup=1.3).plan == rec.plan


def test_report_round_trips_through_json_and_refuses_bad_shapes(tmp_path):
    report = synthetic_report(SIM, RANK)
    back = PatternReport.from_dict(json.loads(json.dumps(report.to_dict())))
    for name in ("similarity", "js", "static_kl", "effective_rank", "rank90", "rank99",
                 "redundancy", "spectra"):
        np.testing.assert_allclose(getattr(back, name), getattr(report, name), atol=1e-6)
    assert back.arch == report.arch and back.mean_maps is None
    path = report.save_json(tmp_path / "r.json", note="extra")
    assert json.loads(path.read_text())["note"] == "extra"
    np.testing.assert_allclose(PatternReport.load(path).rank90, report.rank90, atol=1e-6)
    with pytest.raises(ValueError, match="missing similarity"):
        PatternReport.from_dict({k: v for k, v in report.to_dict().items()
                                 if k != "similarity"})
    with pytest.raises(ValueError, match="redundancy must have one value per layer"):
        replace(report, redundancy=np.zeros(3))
    with pytest.raises(ValueError, match="rank90 has shape"):
        replace(report, rank90=report.rank90[:, :1])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        PatternReport.load(tmp_path / "bad.json")


# --------------------------------------------------------------------------- CLI
def image_folder(root, per_class: int = 4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((40, 40, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_cli_analyze_checkpoint_writes_report(tmp_path):
    from typer.testing import CliRunner

    from hetvit.cli import app

    model = tiny_vit()
    sharpen_qk(model, 3)
    with torch.no_grad():
        model.norm.weight.add_(0.1)  # not at its initial value: no "untrained" warning
    hetvit.save(model, tmp_path / "model")
    data = image_folder(tmp_path / "data")
    result = CliRunner().invoke(app, [
        "analyze", "--checkpoint", str(tmp_path / "model"), "--data", str(data),
        "--num-images", "6", "--batch-size", "4", "--max-static", "1",
        "--recommend-speedup", "1.3", "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "random" not in result.output
    assert "GMACs: baseline" in result.output
    report = json.loads((tmp_path / "report" / "patterns.json").read_text())
    assert report["num_images"] == 6
    plan = Plan.from_dict(report["plan"])
    assert plan.static == (0,)
    assert report["recommendation"]["target_reached"] is True
    assert "why:" in result.output and "  layer 0: static: worst-head similarity" in result.output


def test_cli_analyze_warns_without_weights(tmp_path):
    from typer.testing import CliRunner

    from hetvit.cli import app

    data = image_folder(tmp_path / "data", per_class=2)
    result = CliRunner().invoke(app, [
        "analyze", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8",
        "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--num-classes", "2",
        "--data", str(data), "--num-images", "3"])
    assert result.exit_code == 0, result.output
    assert "the model is random" in result.output
    assert not (tmp_path / "report").exists()
    bad = CliRunner().invoke(app, ["analyze", "--data", str(data)])
    assert bad.exit_code == 2
