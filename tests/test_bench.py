"""The side-by-side benchmark and the `hetvit plan` / `hetvit bench` commands.

Nothing here asserts a speed: timings on shared machines are noise. The tests check that the
result is well formed and self-consistent, and that bad input fails cleanly.
"""

import io
import json
import statistics

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import hetvit
from hetvit import bench
from hetvit.cli import app
from hetvit.flops import formula_macs
from hetvit.plan import Plan
from hetvit.surgery import describe

from .conftest import tiny_vit

PLAN = Plan(static=(0, 1), pyramid=((1, 8), (3, 4)))
QUICK = dict(rounds=3, warmup=1, min_time=0.0, threads=1)  # one thread: steady on busy CPUs
TINY = ["--model", "deit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8",
        "--embed-dim", "32", "--depth", "4", "--num-heads", "2", "--num-classes", "10"]
FAST_BENCH = ["--rounds", "2", "--latency-rounds", "2", "--warmup", "1", "--min-time", "0",
              "--threads", "1", "--batch-size", "4"]


@pytest.fixture
def pair():
    model = tiny_vit()
    return model, hetvit.compress(model, PLAN).eval()


def test_compare_returns_a_consistent_result(pair):
    model, student = pair
    result = bench.compare(model, student, batch_size=4, latency=True, **QUICK)
    tp, lat = result.throughput, result.latency
    assert tp.unit == "img/s" and lat.unit == "ms"
    for series in (tp.baseline, tp.compressed, lat.baseline, lat.compressed):
        assert len(series) == 3 and all(v > 0 for v in series)
    # Each round's speedup is the ratio of that round's figures; the result is their median.
    pairs = list(zip(tp.baseline, tp.compressed, strict=True))
    assert tp.ratios == pytest.approx([c / b for b, c in pairs])
    pairs = list(zip(lat.baseline, lat.compressed, strict=True))
    assert lat.ratios == pytest.approx([b / c for b, c in pairs])  # latency: lower is better
    assert result.speedup == pytest.approx(statistics.median(tp.ratios))
    assert tp.spread[0] <= tp.iqr[0] <= result.speedup <= tp.iqr[1] <= tp.spread[1]
    assert result.latency_speedup == pytest.approx(statistics.median(lat.ratios))

    arch = describe(model)
    assert result.baseline.gmacs == pytest.approx(formula_macs(arch) / 1e9)
    assert result.compressed.gmacs == pytest.approx(formula_macs(arch, PLAN) / 1e9)
    assert result.baseline.macs_agree and result.compressed.macs_agree
    assert result.gmac_reduction == pytest.approx(result.baseline.gmacs / result.compressed.gmacs)
    assert result.efficiency == pytest.approx(result.speedup / result.gmac_reduction)
    assert result.baseline.params == sum(p.numel() for p in model.parameters())
    assert result.compressed.plan == PLAN.describe()


def test_result_records_the_conditions_and_serialises(pair):
    result = bench.compare(*pair, batch_size=2, **QUICK)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["settings"] == {"batch_size": 2, "dtype": "fp32", "device": "cpu",
                             "compile": False, "runtime": "torch"}
    for key in ("torch", "timm", "threads", "cpu", "rounds"):
        assert key in d["env"]
    assert d["env"]["threads"] == 1
    assert d["latency"] is None and d["latency_speedup"] is None
    assert d["throughput"]["speedup"] == pytest.approx(result.speedup)
    assert len(d["throughput"]["rounds"]["speedup"]) == 3
    assert d["speedup"] == pytest.approx(d["throughput"]["speedup"])


def test_threads_are_restored(pair):
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1  # a count that differs, or the test could not fail
    bench.compare(*pair, batch_size=1, **{**QUICK, "threads": other})
    assert torch.get_num_threads() == before


def test_bf16_times_copies_and_leaves_the_models_alone(pair):
    model, student = pair
    result = bench.compare(model, student, batch_size=2, dtype="bf16", **QUICK)
    assert result.settings.dtype == "bf16" and result.speedup > 0
    assert next(model.parameters()).dtype == next(student.parameters()).dtype == torch.float32


def test_a_registered_runtime_is_what_gets_timed(pair, monkeypatch):
    calls = {"made": 0, "runs": 0}

    def factory(model, inputs, settings):
        calls["made"] += 1
        assert not model.training and settings.runtime == "counting"

        def run():
            calls["runs"] += 1
            return model(inputs)

        return run

    monkeypatch.setitem(bench.RUNTIMES, "counting", factory)
    result = bench.compare(*pair, batch_size=2, runtime="counting", **QUICK)
    assert calls["made"] == 2 and calls["runs"] >= 2 * (1 + 1 + 3)  # warm-up, sizing, rounds
    assert result.settings.runtime == "counting"


def test_render_shows_both_models_and_the_ratio(pair):
    result = bench.compare(*pair, batch_size=2, latency=True, **QUICK)
    buf = io.StringIO()
    Console(file=buf, width=200).print(bench.render(result, title="tiny"))
    text = buf.getvalue()
    for word in ("baseline", "compressed", "speedup", "GMACs", "efficiency", "thread(s)",
                 "latency", PLAN.describe()):
        assert word in text


@pytest.mark.parametrize("kwargs,message", [
    ({"dtype": "fp16"}, "unknown dtype"),
    ({"runtime": "tensorrt"}, "unknown runtime"),
    ({"batch_size": 0}, "at least 1"),
])
def test_compare_rejects_bad_settings(pair, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.compare(*pair, **{**QUICK, **kwargs})


def test_compare_rejects_models_of_different_input_sizes():
    with pytest.raises(ValueError, match="different input sizes"):
        bench.compare(tiny_vit(), tiny_vit(img_size=48), **QUICK)


# ----------------------------------------------------------------------------- steadiness
def _result(baseline_ms: list[float], latency_ms: list[float] | None = None,
            batch: int = 64, plan: str = "p") -> bench.BenchResult:
    """A hand-built result whose baseline took ``baseline_ms`` per batch in its rounds."""
    info = bench.ModelInfo(gmacs=1.0, gmacs_counted=1.0, params=1, plan=plan)
    tp = bench.Paired("img/s", [1e3 * batch / t for t in baseline_ms], [1.0] * len(baseline_ms))
    lat = None if latency_ms is None else bench.Paired("ms", latency_ms, [1.0] * len(latency_ms))
    return bench.BenchResult(info, info, tp, lat, bench.Settings(batch_size=batch))


def test_baseline_drift_is_none_when_the_baseline_holds_steady():
    results = [_result([100.0, 104.0, 98.0]), _result([105.0, 109.0]), _result([108.0])]
    assert bench.baseline_drift(results) is None  # 104 vs 107: 3% apart
    assert bench.baseline_drift(results[:1]) is None  # one pairing: nothing to compare


def test_baseline_drift_names_the_pairings_at_either_end():
    results = [_result([96.0, 101.0, 98.0], [10.0, 10.2]), _result([117.0, 169.0, 140.0]),
               _result([100.0], [10.1])]
    message = bench.baseline_drift(results, labels=["hetvit fast", "tome r=4", "evit 0.7"])
    assert message is not None
    assert "batch 64 43% apart over 3 pairings" in message  # medians 98 and 140 ms
    assert "98.0 ms beside hetvit fast" in message and "140.0 ms beside tome r=4" in message
    assert "batch 1" not in message  # latency moved 1%
    assert bench.baseline_drift(results, tolerance=0.5) is None
    # Latency is checked as well, on the pairings that measured it.
    results[2].latency = bench.Paired("ms", [13.0], [1.0])
    assert "at batch 1 29% apart over 2 pairings" in bench.baseline_drift(results, labels=[
        "a", "b", "c"])
    with pytest.raises(ValueError, match="2 labels for 3 results"):
        bench.baseline_drift(results, labels=["a", "b"])


def test_baseline_drift_labels_default_to_the_plans():
    message = bench.baseline_drift([_result([100.0], plan="fast"), _result([130.0], plan="tome")])
    assert "100.0 ms beside fast" in message and "130.0 ms beside tome" in message


def test_baseline_unsteady_within_one_pairing():
    assert bench.baseline_unsteady(_result([100.0, 105.0, 102.0], [10.0, 10.5])) is None
    message = bench.baseline_unsteady(_result([100.0, 125.0, 102.0], [10.0, 10.5]))
    assert "100.0-125.0 ms at batch 64 (25% apart)" in message and "batch 1" not in message
    unsteady = _result([100.0, 125.0], [10.0, 10.5])
    assert bench.baseline_unsteady(unsteady, tolerance=0.3) is None
    assert unsteady.to_dict()["warnings"] == [bench.baseline_unsteady(unsteady)]
    buf = io.StringIO()
    Console(file=buf, width=300).print(bench.render(unsteady))
    assert "rounds disagree" in buf.getvalue()


def test_a_result_survives_to_dict_and_from_dict(pair):
    result = bench.compare(*pair, batch_size=2, latency=True, **QUICK)
    again = bench.BenchResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.throughput == result.throughput and again.latency == result.latency
    assert again.baseline == result.baseline and again.settings == result.settings
    assert again.to_dict() == result.to_dict()


# ----------------------------------------------------------------------------- CLI
runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _fails(args, *messages):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    for message in messages:
        assert message in text, text
    return result


def test_cli_plan_prints_layers_and_gmacs():
    out = _ok(["plan", *TINY, "--preset", "balanced"]).output
    assert "static attention" in out and "aggregate 16 -> 8" in out
    assert "GMACs: baseline" in out and "fewer" in out


def test_cli_plan_json_and_out_file(tmp_path):
    target = tmp_path / "plan.json"
    data = json.loads(_ok(["plan", *TINY, "--preset", "fast", "--json", "--out",
                           str(target)]).stdout)
    plan = Plan.load(target)
    assert Plan.from_dict(data["plan"]) == plan and plan.label == "fast"
    arch = describe(tiny_vit(distilled=False))
    assert data["gmacs"]["baseline"] == pytest.approx(formula_macs(arch) / 1e9)
    assert data["gmacs"]["plan"] == pytest.approx(formula_macs(arch, plan) / 1e9)
    assert sum(r["macs"] for r in data["layers"]) < formula_macs(arch, plan)  # + embed, head
    kinds = [r["kind"] for r in data["layers"]]
    assert kinds.count("aggregate") == len(plan.pyramid)
    assert kinds.count("static") == len(plan.static)


def test_cli_bench_json(tmp_path):
    target = tmp_path / "bench.json"
    res = _ok(["bench", *TINY, "--plan", "fast", *FAST_BENCH, "--latency", "--json",
               "--out", str(target)])
    data = json.loads(res.stdout)
    assert data == json.loads(target.read_text())
    assert data["model"] == "deit_tiny_patch16_224"
    assert data["plan"]["label"] == "fast"
    assert data["settings"]["batch_size"] == 4 and data["env"]["threads"] == 1
    assert data["throughput"]["baseline"] > 0 and data["throughput"]["compressed"] > 0
    assert data["latency"]["baseline"] > 0 and data["latency_speedup"] > 0
    assert data["gmac_reduction"] > 1
    assert "random" in res.stderr and "warning" not in res.stderr.lower()


def test_cli_bench_table():
    out = _ok(["bench", *TINY, "--plan", "balanced", *FAST_BENCH]).output
    assert "speedup" in out and "efficiency" in out and "weights are random" in out


def test_cli_bench_compressed_checkpoint_dir(tmp_path):
    model = tiny_vit()
    model.pretrained_cfg = {}
    hetvit.save(hetvit.compress(model, PLAN), tmp_path / "ckpt")
    data = json.loads(_ok(["bench", "--checkpoint", str(tmp_path / "ckpt"), *FAST_BENCH,
                           "--json"]).stdout)
    assert data["compressed"]["plan"] == PLAN.describe()
    assert data["baseline"]["gmacs"] == pytest.approx(formula_macs(describe(model)) / 1e9)
    _fails(["bench", "--checkpoint", str(tmp_path / "ckpt"), "--plan", "fast", *FAST_BENCH],
           "already compressed", "drop --plan")


def test_cli_unknown_model_lists_what_is_supported():
    _fails(["plan", "--model", "deit_smal_patch16_224"], "unknown timm model",
           "Did you mean deit_small_patch16_224", "deit_base_patch16_224")
    _fails(["bench", "--model", "not_a_model", *FAST_BENCH], "unknown timm model", "DeiT")
    # the same help wherever a model is named by the user
    _fails(["compress", "--model", "deit_smal_patch16_224", "--plan", "fast", "--out", "x"],
           "Did you mean deit_small_patch16_224")


def test_cli_model_that_is_not_a_vit():
    _fails(["plan", "--model", "resnet18"], "ResNet is not supported", "DeiT")


def test_cli_bad_plan_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    _fails(["plan", *TINY, "--preset", str(broken)], "not valid JSON")
    _fails(["bench", *TINY, "--plan", str(broken), *FAST_BENCH], "not valid JSON")
    _fails(["bench", *TINY, "--plan", "quickest", *FAST_BENCH], "--plan 'quickest' is neither")
    # plan takes the option as --preset or --plan, and names both
    _fails(["plan", *TINY, "--preset", "quickest"], "--preset/--plan 'quickest' is neither")


def test_cli_plan_that_does_not_fit(tmp_path):
    wide = tmp_path / "wide.json"
    Plan(static=(0, 9)).save(wide)
    _fails(["plan", *TINY, "--preset", str(wide)], "static layer 9 is out of range")
    _fails(["bench", *TINY, "--plan", str(wide), *FAST_BENCH], "out of range")
    grows = tmp_path / "grows.json"
    Plan(pyramid=((1, 40),)).save(grows)
    _fails(["bench", *TINY, "--plan", str(grows), *FAST_BENCH], "larger than the 16 patch")


def test_cli_bench_bad_settings():
    _fails(["bench", *TINY, *FAST_BENCH, "--dtype", "fp16"], "--dtype", "fp32")
    _fails(["bench", *TINY, *FAST_BENCH, "--runtime", "tensorrt"], "available: torch")
    _fails(["bench", *FAST_BENCH], "give --model NAME")
    if not torch.cuda.is_available():
        _fails(["bench", *TINY, *FAST_BENCH, "--device", "cuda"], "no CUDA device")


def test_cli_bench_missing_checkpoint(tmp_path):
    _fails(["bench", *TINY, "--checkpoint", str(tmp_path / "nope.pth"), *FAST_BENCH],
           "checkpoint not found")


def test_cli_bench_weights_file_and_uncompressed_checkpoint_dir(tmp_path):
    from safetensors.torch import save_file

    model = tiny_vit()
    save_file(model.state_dict(), str(tmp_path / "tiny.safetensors"))
    res = _ok(["bench", *TINY, "--checkpoint", str(tmp_path / "tiny.safetensors"),
               *FAST_BENCH, "--json"])
    assert "weights from" in res.stderr and "random" not in res.stderr.split("calibrated")[0]
    model.pretrained_cfg = {}
    hetvit.save(model, tmp_path / "base")  # uncompressed: it is the baseline, --plan applies
    data = json.loads(_ok(["bench", "--checkpoint", str(tmp_path / "base"), "--plan",
                           "balanced", *FAST_BENCH, "--json"]).stdout)
    assert data["plan"]["label"] == "balanced"
    # The same weights on the full-size model: a clear, short error.
    _fails(["bench", "--model", "deit_tiny_patch16_224", "--checkpoint",
            str(tmp_path / "tiny.safetensors"), *FAST_BENCH], "does not fit the model",
           "differ in shape", "--embed-dim")


def test_a_registered_runtime_times_both_models(pair, monkeypatch):
    """``register_runtime`` plugs a runner in: compare() times both models through it, on
    their own inputs, and unknown names stay refused."""
    model, student = pair
    seen: list[tuple[torch.nn.Module, tuple[int, ...]]] = []

    def counting(net: torch.nn.Module, inputs: torch.Tensor, settings: object):
        seen.append((net, tuple(inputs.shape)))
        return lambda: net(inputs)

    monkeypatch.setattr(bench, "RUNTIMES", dict(bench.RUNTIMES))  # the registration is undone
    bench.register_runtime("counting", counting)
    result = bench.compare(model, student, batch_size=3, runtime="counting", **QUICK)
    assert result.speedup > 0
    assert {shape for _, shape in seen} == {(3, 3, 32, 32)}
    assert len({id(net) for net, _ in seen}) == 2  # the baseline and the compressed model
    with pytest.raises(bench.BenchError, match="unknown runtime 'nope'"):
        bench.compare(model, student, runtime="nope", **QUICK)
