"""int8 export: agreement with fp32, a q/k-free int8 graph, the gate, evaluation, clean errors."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import hetvit
from hetvit import export as ex
from hetvit import quantize as hq
from hetvit.bench_int8 import LINEUP, compare_int8, render_int8
from hetvit.cli import app
from hetvit.onnx_model import OnnxClassifier
from hetvit.plan import Plan

from .conftest import tiny_vit, write_images

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

PLAN = Plan(static=(0, 1), pyramid=((2, 8),))  # as in test_export: 2 static, then 16 -> 8 tokens
runner = CliRunner()


def make_student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = hetvit.compress(tiny_vit(), PLAN, calibration=torch.randn(4, 3, 32, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.hetvit_classes = [f"c{i}" for i in range(10)]
    return model.eval()


def generated(n: int, seed: int, labels: bool = False) -> torch.Tensor | tuple:
    """Images of 10 classes: a fixed random prototype per class plus noise."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(42))
    y = torch.randint(0, 10, (n,), generator=gen)
    x = prototypes[y] + 0.8 * torch.randn(n, 3, 32, 32, generator=gen)
    return (x, y) if labels else x


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    """A compressed tiny ViT trained briefly on :func:`generated` (100% accurate there).

    A random model's logits are near ties on any input, so int8 noise flips its top-1 at
    random; agreement is a property of trained models, which this stands in for."""
    torch.manual_seed(0)
    model = make_student()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared CPU
    with torch.enable_grad():
        for step in range(40):
            x, y = generated(32, 1000 + step, labels=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def onnx_files(directory) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".onnx" in p.name)


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def agreement(model: torch.nn.Module, path, x: torch.Tensor) -> float:
    out = ex.ort_session(path).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    return float((out.argmax(-1) == ref.argmax(-1)).mean())


# ----------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("mode", hq.MODES)
def test_int8_export_agrees_with_fp32_top1(student, tmp_path, mode):
    path = tmp_path / "m.int8.onnx"
    cal = generated(32, 5) if mode == "static" else None
    result = hq.quantize_onnx(student, path, mode, calibration=cal, images=generated(16, 6))
    assert result.passed and path.is_file() and onnx_files(tmp_path) == ["m.int8.onnx"]
    assert [p.name for p in result.parity] == ["real images"]
    assert result.quantization == hq.Quantization.default(mode)
    # really int8: onnxruntime's integer MatMuls (dynamic) or quantize/dequantize pairs (QDQ)
    ops = op_types(path)
    assert ("MatMulInteger" in ops) if mode == "dynamic" else {"QuantizeLinear",
                                                               "DequantizeLinear"} <= ops
    # agreement on fresh generated inputs, computed here, is above the default threshold
    assert agreement(student, path, generated(200, 7)) >= hq.MIN_AGREEMENT
    # and the graph is not the fp32 one: int8 moves the logits by more than fp32's tolerance
    assert result.parity[0].max_abs_diff > 1e-4


def test_int8_graph_has_no_activation_matmul_in_static_layers(student, tmp_path):
    for mode in hq.MODES:
        path = tmp_path / f"{mode}.onnx"
        result = hq.quantize_onnx(student, path, mode, calibration=generated(16, 1))
        assert result.graph_ok
        # static layers 0-1: none; dynamic layers 2-3 keep q k^T and A V (fp32 or int8)
        assert ex.layer_matmuls(student, path) == result.matmuls == {0: 0, 1: 0, 2: 2, 3: 2}


def test_layer_matmuls_counts_integer_matmuls_of_two_activations(student, tmp_path):
    """An int8 q k^T (MatMulInteger of two activations) in a block is still counted."""
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("DynamicQuantizeLinear", ["images"], ["q", "s", "z"], name="/dq"),
         h.make_node("MatMulInteger", ["q", "q", "z", "z"], ["y"],
                     name="/blocks/blocks.0/attn/MatMul_quant")],
        "g", [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [4, 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.INT32, [4, 4])])
    path = tmp_path / "g.onnx"
    onnx.save(h.make_model(graph), str(path))
    assert ex.layer_matmuls(student, path)[0] == 1


def test_node_groups_find_the_static_maps_and_the_aggregation(student, tmp_path):
    path = tmp_path / "fp32.onnx"
    ex.export_onnx(student, path, check=False)
    groups = hq.node_groups(student, path)
    maps = groups["static_maps"]  # the exporter's scope: [/model]/blocks/blocks.<i>/attn/MatMul
    assert len(maps) == 2 and [m.endswith(f"/blocks.{i}/attn/MatMul") for i, m in
                               enumerate(maps)] == [True, True]
    assert groups["aggregation"] and all("/blocks.2/" in n for n in groups["aggregation"])
    assert len(groups["layernorm"]) == 2 * 4 + 1 and len(groups["softmax"]) == 2
    # excluded, a MatMul runs in float on its constant operand (the map, the aggregation
    # matrix); quantized, that constant reaches it through a DequantizeLinear of int8 values
    for exclude, quantized in (((), True), (("static_maps", "aggregation"), False)):
        q = tmp_path / "q.onnx"
        config = hq.Quantization("static", exclude=exclude)
        hq.quantize_onnx(student, q, config, calibration=generated(8, 2), source=path)
        graph = onnx.load(str(q)).graph
        floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
        ints = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
        dequantized = {n.output[0] for n in graph.node
                       if n.op_type == "DequantizeLinear" and n.input[0] in ints}
        nodes = {n.name: n for n in graph.node}
        for name in groups["static_maps"] + groups["aggregation"]:
            operands = set(nodes[name].input)
            assert bool(operands & dequantized) == quantized
            assert bool(operands & floats) != quantized


# ----------------------------------------------------------------------------- the gate
def test_an_int8_graph_that_disagrees_fails_and_writes_nothing(student, tmp_path):
    other = tmp_path / "other.onnx"  # a hetvit export of another model: int8 of the wrong graph
    ex.export_onnx(make_student(seed=3), other, check=False)
    target = tmp_path / "out" / "m.onnx"
    with pytest.raises(ex.ParityError, match="nothing was written") as info:
        hq.quantize_onnx(student, target, "dynamic", source=other)
    assert not info.value.result.passed
    assert info.value.result.parity[0].agreement < hq.MIN_AGREEMENT
    assert onnx_files(tmp_path) == ["other.onnx"]
    # the threshold is the gate: at 0 the same graph passes
    lenient = hq.Quantization("dynamic", min_agreement=0.0)
    assert hq.quantize_onnx(student, target, lenient, source=other).passed


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors_and_write_nothing(student, tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    with pytest.raises(hq.QuantizeError, match="is not a model hetvit exports"):
        hq.quantize_onnx(torch.nn.Linear(3, 3), out)
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(hq.QuantizeError, match="not an ONNX export"):
        hq.quantize_onnx(student, out, source=text)
    plain = tmp_path / "plain.onnx"  # ONNX, but torch.onnx's, not hetvit's export
    torch.onnx.export(student, (generated(1, 0),), str(plain), dynamo=False, opset_version=17)
    with pytest.raises(hq.QuantizeError, match="not a hetvit export"):
        hq.quantize_onnx(student, out, source=plain)
    for none in (None, torch.empty(0, 3, 32, 32), []):
        with pytest.raises(hq.QuantizeError, match="needs calibration images"):
            hq.quantize_onnx(student, out, "static", calibration=none)
    with pytest.raises(hq.QuantizeError, match="unknown quantization mode"):
        hq.Quantization("weights")
    with pytest.raises(hq.QuantizeError, match="unknown node group"):
        hq.Quantization(exclude=("gelu",))
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with pytest.raises(hq.QuantizeError, match="quantization tools"):
        hq.quantize_onnx(student, out)
    assert onnx_files(tmp_path) == ["notes.onnx", "plain.onnx"]


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def checkpoint(student, tmp_path):
    return hetvit.save(student, tmp_path / "ckpt")


def test_cli_exports_int8_and_evaluate_runs_it(checkpoint, student, tmp_path):
    write_images(tmp_path / "data", [f"c{i}" for i in range(10)], per_class=2)
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(fp32)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(int8),
                              "--quantize", "int8", "--calibration", str(tmp_path / "data"),
                              "--images", str(tmp_path / "data"), "--min-agreement", "0"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "int8 static" in text and "real images (int8 vs fp32): 20 images" in text
    again = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(int8),
                                "--quantize", "int8"])  # replaces its own int8 export
    assert again.exit_code == 0, again.output
    evaluated = {}
    for path in (checkpoint, fp32, int8):
        res = runner.invoke(app, ["evaluate", "--checkpoint", str(path), "--data",
                                  str(tmp_path / "data"), "--json"])
        assert res.exit_code == 0, res.output
        evaluated[path] = json.loads(res.stdout)
    assert evaluated[fp32]["top1"] == pytest.approx(evaluated[checkpoint]["top1"])
    assert evaluated[fp32]["loss"] == pytest.approx(evaluated[checkpoint]["loss"], rel=1e-4)
    # the int8 figures are the int8 graph's own predictions on the same images
    model = OnnxClassifier(int8)
    from hetvit.data import make_loader, open_for_model

    ds = open_for_model(tmp_path / "data", model, hetvit.data.make_transform(model))
    x, y = next(iter(make_loader(ds, batch_size=64)))
    top1 = float((model(x).argmax(-1) == y).float().mean())
    assert evaluated[int8]["top1"] == pytest.approx(top1) and evaluated[int8]["n"] == 20


def test_cli_int8_failure_exits_1_and_writes_nothing(checkpoint, tmp_path, monkeypatch):
    other = make_student(seed=3)  # the quantizer is handed another model's fp32 graph
    real_export = hq.export_onnx
    monkeypatch.setattr(hq, "export_onnx", lambda model, path, **kw: real_export(other, path, **kw))
    out = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out),
                              "--quantize", "int8"])
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.output and "nothing was written" in res.output
    assert onnx_files(tmp_path) == []


def test_cli_int8_bad_input(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"

    def fails(*args: str, message: str) -> None:
        res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out),
                                  *args])
        assert res.exit_code == 2, res.output
        assert message in " ".join(res.output.split()) and "Traceback" not in res.output

    fails("--quantize", "int4", message="hetvit quantizes to int8")
    fails("--calibration", str(tmp_path), message="go with --quantize int8")
    fails("--quantize", "int8", "--no-check", message="--quantize needs the checks")
    fails("--quantize", "int8", "--exclude", "gelu", message="unknown node group")
    (tmp_path / "empty").mkdir()
    fails("--quantize", "int8", "--calibration", str(tmp_path / "empty"), message="no images")
    res = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert res.exit_code == 0
    res = runner.invoke(app, ["export", "--checkpoint", str(out), "--out",
                              str(tmp_path / "q.onnx"), "--quantize", "int8"])
    assert res.exit_code == 2 and "is an ONNX export, not a hetvit checkpoint" in res.output
    out.unlink()
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    fails("--quantize", "int8", message="onnxruntime's quantization tools")
    assert onnx_files(tmp_path) == []


def test_evaluate_rejects_options_an_onnx_file_cannot_take(checkpoint, tmp_path):
    path = tmp_path / "m.onnx"
    ex.export_onnx(hetvit.load(checkpoint), path, check=False)
    write_images(tmp_path / "data", ["c0"], per_class=1)
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(path), "--data",
                              str(tmp_path / "data"), "--method", "tome", "--r", "2"])
    assert res.exit_code == 2 and "cannot apply" in res.output


# ----------------------------------------------------------------------------- bench
def test_bench_int8_times_four_models_against_baseline_fp32(student):
    base = tiny_vit()
    result = compare_int8(base, student, batch_size=2, rounds=3, warmup=1, min_time=0.0,
                          latency=True, latency_rounds=2, threads=1)
    assert list(result.throughput) == list(LINEUP) and list(result.latency) == list(LINEUP)
    assert result.ratios(LINEUP[0]) == [1.0] * 3
    assert result.ratios(LINEUP[0], "latency") == [1.0] * 2
    fast = result.throughput["compressed int8"]
    ref = result.throughput[LINEUP[0]]
    expected = [f / b for f, b in zip(fast, ref, strict=True)]
    assert result.ratios("compressed int8") == pytest.approx(expected)
    assert result.compressed.gmacs < result.baseline.gmacs
    data = json.loads(json.dumps(result.to_dict()))
    assert data["throughput"]["compressed int8"]["rounds"] == fast
    buf = io.StringIO()
    Console(file=buf, width=300).print(render_int8(result))
    assert all(name in buf.getvalue() for name in LINEUP)
    for flags, noted in ((["avx2"], True), (["avx2", "avx512_vnni"], False), (None, False)):
        result.env["cpu_flags"] = flags
        buf = io.StringIO()
        Console(file=buf, width=300).print(render_int8(result))
        assert ("no int8 dot-product instructions" in buf.getvalue()) is noted


def test_cpu_flags_reads_the_int8_instruction_sets(tmp_path):
    from hetvit.bench import cpu_flags, has_int8_dot

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags\t\t: fpu sse avx avx2 avx512f avx512_vnni\n")
    assert cpu_flags(cpuinfo=str(info)) == ["avx2", "avx512f", "avx512_vnni"]
    assert has_int8_dot(cpu_flags(cpuinfo=str(info))) is True
    info.write_text("flags : fpu avx avx2 sha_ni\n")
    assert has_int8_dot(cpu_flags(cpuinfo=str(info))) is False
    assert cpu_flags(cpuinfo=str(tmp_path / "missing")) is None
    assert has_int8_dot(None) is None


def test_cli_bench_quantize_needs_onnxruntime_runtime():
    res = runner.invoke(app, ["bench", "--model", "deit_tiny_patch16_224", "--quantize", "int8"])
    assert res.exit_code == 2 and "goes with --runtime onnxruntime" in res.output


def test_cli_bench_quantize_prints_four_models(tmp_path):
    tiny = ["--model", "deit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8",
            "--embed-dim", "32", "--depth", "4", "--num-heads", "2", "--num-classes", "10"]
    quick = ["--rounds", "2", "--warmup", "0", "--min-time", "0", "--threads", "1",
             "--batch-size", "2"]
    target = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", *tiny, "--plan", "fast", *quick, "--runtime",
                              "onnxruntime", "--quantize", "int8", "--out", str(target)])
    assert res.exit_code == 0, res.output
    assert all(name in res.output for name in LINEUP) and "int8: onnxruntime dynamic" in res.output
    data = json.loads(target.read_text())
    assert set(data["throughput"]) == set(LINEUP) and data["latency"] is None
    assert data["throughput"]["baseline fp32"]["speedup"] == 1.0
