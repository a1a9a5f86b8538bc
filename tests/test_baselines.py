"""The training-free baselines (ToMe, EViT): real behaviour on tiny random ViTs.

A 32x32 ViT with patch 4 has 64 patch tokens plus cls (plus dist when distilled), four blocks.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from typer.testing import CliRunner

import hetvit
from hetvit import baselines
from hetvit.baselines import BaselineError, evit, token_counts, tome
from hetvit.baselines.tome import MergingBlock, _Sizes
from hetvit.cli import app
from hetvit.flops import count_macs
from hetvit.hosts import HOSTS

from .conftest import exports_with_parity, write_images

attention_map = HOSTS["timm"].attention_map

ARCH = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)


def vit(distilled: bool = False, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return cls(**{**ARCH, **kwargs}).eval()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def entering(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """Tokens entering each block in a real forward pass, read by forward pre-hooks."""
    seen: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
             for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@torch.no_grad()
def test_nothing_to_reduce_gives_the_model_s_own_outputs(x):
    model = vit()
    expected = model(x)
    for same in (tome(model, 0), tome(model, 0, "decreasing"), evit(model, 1.0, (1, 2))):
        assert torch.equal(same(x), expected)
    # A rewritten block that merges nothing computes exactly what timm's block does.
    tokens = torch.randn(2, 65, 64)
    blk = model.blocks[1]
    merging = MergingBlock(blk, r=0, sizes=_Sizes(), prefix=1, prop_attn=True, first=True)
    torch.testing.assert_close(merging(tokens), blk(tokens), rtol=0, atol=1e-6)


@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("r", [3, 20])
def test_tome_constant_schedule_token_counts(x, distilled, r):
    model = vit(distilled)
    prefix = 2 if distilled else 1
    merged = tome(model, r)
    n, expected = 64 + prefix, []
    for _ in range(4):
        expected.append(n)
        n -= min(r, (n - prefix) // 2)  # clipped to half the patch tokens (r = 20 clips)
    assert entering(merged, x) == token_counts(merged) == expected
    assert merged.hetvit_baseline["tokens_out"] == n
    assert merged(x).shape == (3, 10)


@pytest.mark.parametrize("r", [2, 5])
def test_tome_decreasing_schedule_token_counts(x, r):
    model = vit(depth=6)
    merged = tome(model, r, "decreasing")
    per_layer = merged.hetvit_baseline["per_layer"]
    exact = [2 * r * (5 - i) / 5 for i in range(6)]  # 2r in the first block, 0 in the last
    assert sum(per_layer) == r * 6  # as many merges as the constant schedule
    assert all(abs(p - e) < 1 for p, e in zip(per_layer, exact, strict=True))
    assert per_layer == sorted(per_layer, reverse=True) and per_layer[-1] == 0
    expected = [65 - sum(per_layer[:i]) for i in range(6)]
    assert entering(merged, x) == token_counts(merged) == expected
    # An explicit list is taken as given.
    listed = tome(model, [4, 0, 3, 0, 1, 0])
    assert entering(listed, x) == [65, 61, 61, 58, 58, 57]


@torch.no_grad()
def test_merging_identical_tokens_with_proportional_attention_changes_nothing():
    model = vit()
    torch.manual_seed(2)
    seq = torch.randn(2, 65, 64)
    seq[:, 1 + 5] = seq[:, 1 + 4]  # patch 4 is in set A, patch 5 in set B: a perfect match
    expected = model.blocks(seq)

    merged = tome(model, [1, 0, 0, 0])  # block 0 merges one pair, the rest attend by size
    got = merged.blocks(seq)
    assert got.shape[1] == 64
    assert merged.blocks[0].sizes.size.max() == 2  # the duplicate pair became one size-2 token
    torch.testing.assert_close(got[:, 0], expected[:, 0], rtol=0, atol=1e-5)

    # Without proportional attention the merged token counts once instead of twice.
    plain = tome(model, [1, 0, 0, 0], prop_attn=False)
    assert not torch.allclose(plain.blocks(seq)[:, 0], expected[:, 0], atol=1e-5)

    # Block level: N tokens, one of size 2, against N + 1 tokens with that token twice.
    blk = model.blocks[2]
    sizes = _Sizes()
    rewritten = MergingBlock(blk, r=0, sizes=sizes, prefix=1, prop_attn=True, first=False)
    sizes.size = torch.ones(2, 64, 1)
    sizes.size[:, 5] = 2
    short = torch.cat([seq[:, :6], seq[:, 7:]], dim=1)  # token 6 (= token 5) removed
    full = blk(seq)
    torch.testing.assert_close(rewritten(short), torch.cat([full[:, :6], full[:, 7:]], dim=1),
                               rtol=0, atol=1e-5)


@torch.no_grad()
def test_evit_fused_token_is_the_cls_attention_weighted_mean_of_the_dropped():
    model = vit()
    torch.manual_seed(3)
    seq = torch.randn(2, 65, 64)
    blk = model.blocks[1]
    # Reference: the block's own attention, by timm, then EViT's selection by hand.
    mid = seq + blk.attn(blk.norm1(seq))
    cls_attn = attention_map(blk.attn, blk.norm1(seq))[:, :, 0, 1:].mean(1)  # B x 64
    order = cls_attn.argsort(-1, descending=True)
    kept, dropped = order[:, :32], order[:, 32:]
    patches = mid[:, 1:]
    w = cls_attn.gather(1, dropped)
    fused = (patches.gather(1, dropped[..., None].expand(-1, -1, 64)) * w[..., None]).sum(1)
    fused = fused / w.sum(1, keepdim=True)

    pruned = evit(model, 0.5, (1,))
    seen = {}
    pruned.blocks[1].norm2.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    pruned.blocks[1](seq)
    got = seen["x"]
    assert got.shape[1] == 1 + 32 + 1
    torch.testing.assert_close(got[:, 0], mid[:, 0])
    torch.testing.assert_close(got[:, 1:33], patches.gather(1, kept[..., None].expand(-1, -1, 64)))
    torch.testing.assert_close(got[:, -1], fused)


def test_evit_token_counts(x):
    model = vit(depth=6)
    pruned = evit(model, 0.7, (1, 3))
    # 64 -> ceil(0.7 * 64) = 45 + 1 fused; 46 -> ceil(0.7 * 46) = 33 + 1 fused
    assert entering(pruned, x) == token_counts(pruned) == [65, 65, 47, 47, 35, 35]
    assert pruned.hetvit_baseline["tokens_out"] == 35


@torch.no_grad()
def test_input_untouched_and_distilled_models_keep_cls_and_dist(x):
    model = vit(distilled=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)
    reduced = [tome(model, 8), tome(model, 4, "decreasing"), evit(model, 0.5, (1, 2))]
    assert all(type(b) is Block for b in model.blocks) and not hasattr(model, "hetvit_baseline")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(model(x), expected)
    for net in reduced:
        assert net.hetvit_baseline["tokens"][0] == 66 and net(x).shape == (3, 10)
    # Reducing only in the last block, after its attention: cls and dist leave the model
    # exactly as they would unreduced, so the distilled head (tokens 0 and 1) gives the
    # model's logits. A merged or moved prefix token would not.
    for net in (tome(model, [0, 0, 0, 30]), evit(model, 0.3, (3,))):
        torch.testing.assert_close(net.forward_features(x)[:, :2],
                                   model.forward_features(x)[:, :2])
        torch.testing.assert_close(net(x), expected)


def test_macs_agree_with_a_count_of_what_runs():
    model = vit()
    base = baselines.formula_macs(model)
    assert base == count_macs(model)
    for net in (tome(model, 4), tome(model, 4, "decreasing"), evit(model, 0.7, (1, 2))):
        assert baselines.formula_macs(net) == count_macs(net) + baselines.selection_macs(net)
        assert baselines.formula_macs(net) < base
    info = hetvit.bench.model_info(tome(model, 4))
    assert info.macs_agree and info.plan.startswith("tome r=4 (constant)")


def test_bad_settings_give_clear_errors():
    model = vit()
    bad = [
        (lambda: tome(model, -1), "r must be an integer >= 0"),
        (lambda: tome(model, 1.5), "r must be an integer >= 0"),
        (lambda: tome(model, 2, "linear"), "schedule must be one of constant, decreasing"),
        (lambda: tome(model, [1, 2]), "needs 4 integers"),
        (lambda: tome(model, [1, -1, 0, 0]), "at least 0"),
        (lambda: evit(model, 0.0), r"keep_rate must be in \(0, 1\]"),
        (lambda: evit(model, 1.5), r"keep_rate must be in \(0, 1\]"),
        (lambda: evit(model, 0.7, (1, 4)), r"layers \[4\] out of range: the model has blocks 0-3"),
        (lambda: evit(model, 0.7, (-1,)), "out of range"),
        (lambda: evit(model, 0.7, (1, 1)), "repeat"),
        (lambda: tome(vit(global_pool="avg"), 2), "global_pool='token'"),
        (lambda: tome(tome(model, 2), 2), "already runs tome"),
        (lambda: evit(hetvit.compress(model, hetvit.Plan(static=(0,))), 0.5),
         "already compressed"),
        (lambda: tome(torch.nn.Linear(2, 2), 2), "Linear is not supported"),
    ]
    with pytest.raises(ValueError, match="runs the evit baseline, which a checkpoint does not"):
        hetvit.save(evit(model, 0.5, (1,)), "never-written")
    for call, message in bad:
        with pytest.raises(BaselineError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert issubclass(BaselineError, ValueError)


TINY = ["--img-size", "32", "--patch-size", "4", "--embed-dim", "64", "--depth", "4",
        "--num-heads", "4", "--num-classes", "3"]
QUICK_BENCH = ["--rounds", "1", "--warmup", "0", "--min-time", "0", "--threads", "1",
               "--batch-size", "2"]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64,
                              depth=4, num_heads=4, num_classes=3).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    return model, ["--model", "vit_tiny_patch16_224", "--checkpoint",
                   str(tmp_path / "w.safetensors"), *TINY]


@pytest.mark.parametrize("reduce", [lambda m: tome(m, 5), lambda m: tome(m, 4, "decreasing"),
                                    lambda m: evit(m, 0.5, (1, 2))],
                         ids=["tome-constant", "tome-decreasing", "evit"])
def test_baselines_export_to_onnx_with_parity(tmp_path, reduce):
    """Both peers trace to ONNX (traced at batch 1, checked at batch 8), so that they can be
    timed in onnxruntime beside hetvit's exports (``bench --runtime onnxruntime``)."""
    pytest.importorskip("onnxruntime")
    assert exports_with_parity(reduce(vit()), tmp_path / "m.onnx")


def test_cli_bench_method_tome_and_evit(tiny_checkpoint):
    model, args = tiny_checkpoint
    runner = CliRunner()
    for extra, expected in ((["--method", "tome", "--r", "2"], tome(model, 2)),
                            (["--method", "tome", "--r", "3", "--schedule", "decreasing"],
                             tome(model, 3, "decreasing")),
                            (["--method", "evit", "--keep-rate", "0.5", "--prune-layers", "1,2"],
                             evit(model, 0.5, (1, 2)))):
        result = runner.invoke(app, ["bench", *args, *extra, *QUICK_BENCH, "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["plan"] is None and data["method"] == expected.hetvit_baseline
        assert data["compressed"]["gmacs"] == pytest.approx(
            baselines.formula_macs(expected) / 1e9)
        assert data["compressed"]["gmacs"] == pytest.approx(data["compressed"]["gmacs_counted"])
        assert data["gmac_reduction"] > 1 and data["speedup"] > 0
    result = runner.invoke(app, ["bench", *args, "--method", "tome", "--r", "2", *QUICK_BENCH])
    assert result.exit_code == 0, result.output
    assert "compressed: tome r=2 (constant), tokens 65 -> 57" in result.output


def test_cli_evaluate_method_tome_agrees_with_the_api(tmp_path, tiny_checkpoint):
    from hetvit.data import make_loader, make_transform, open_dataset
    from hetvit.evaluation import evaluate

    model, args = tiny_checkpoint
    write_images(tmp_path / "data", ["a", "b", "c"], per_class=2)
    loader = make_loader(open_dataset(tmp_path / "data", make_transform(model)), 4)
    runner = CliRunner()
    for extra, net in ((["--method", "tome", "--r", "2"], tome(model, 2)),
                       (["--method", "evit", "--keep-rate", "0.3"], evit(model, 0.3, (1, 2, 3)))):
        expected = evaluate(net, loader)
        result = runner.invoke(app, ["evaluate", *args, "--data", str(tmp_path / "data"), *extra,
                                     "--json"])
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout)
        assert got["n"] == 6 and got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert extra[1] in got["model"]


def test_cli_method_errors_are_clear(tiny_checkpoint, tmp_path):
    _, args = tiny_checkpoint
    runner = CliRunner()
    for extra, message in ((["--r", "2"], "--r go(es) with --method tome"),
                           (["--method", "tome"], "--method tome needs --r N"),
                           (["--method", "tome", "--r", "2", "--plan", "fast"], "drop --plan"),
                           (["--method", "merge"], "choose tome or evit"),
                           (["--method", "evit", "--keep-rate", "2"], "keep_rate must be in"),
                           (["--method", "evit", "--prune-layers", "1,x"], "3,6,9"),
                           (["--method", "evit", "--prune-layers", "9"], "out of range"),
                           (["--method", "tome", "--r", "-1"], "r must be an integer >= 0")):
        result = runner.invoke(app, ["bench", *args, *extra, *QUICK_BENCH])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output
