"""Commands on a model's shape and speed: plan, compress, bench."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .app import app, fail, flag, user_errors
from .common import (
    AggregationInitOpt,
    AggregationOpt,
    ForceOpt,
    TorchThreadsOpt,
    _overrides,
    _size_options,
    check_out_is_not_an_input,
    load_by_name,
    open_model,
    resolve_plan,
    with_options,
)
from .methods import _method_options, apply_method, pop_method_options

MODEL_HELP = ("timm model name of a plain ViT with a fixed input size (DeiT, DeiT-3, ViT augreg; "
              "hybrid CNN stems and attention-pooling heads are refused), e.g. "
              "deit_small_patch16_224 (also DINOv2, register tokens, CLIP), or hf:DIR for a "
              "Hugging Face save_pretrained directory (ViT, DeiT)")


def _is_plan_file(path: Path) -> bool:
    """An earlier ``plan --out``: a file that reads as a plan."""
    from ..plan import Plan, PlanError

    try:
        Plan.load(path)
    except (PlanError, OSError, UnicodeDecodeError):
        return False
    return True


def _is_bench_result(path: Path) -> bool:
    """An earlier ``bench --out``: a JSON object with the keys bench writes."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and {"model", "notes", "throughput", "settings"} <= set(data)


def _named_model(name: str, overrides: dict, weights: Path | None = None, meta: bool = False
                 ) -> Any:
    """A ViT that hetvit can compress, by ``--model`` (a timm name or ``hf:DIR``), with clear
    errors; ``meta`` builds a timm model without memory or init (enough for shapes; an HF
    directory is read as it is, since its sizes are in its files)."""
    import warnings

    import torch

    from ..hosts import describe
    from ..hosts.timm import create_timm_model
    from ..surgery import HF_PREFIX

    with user_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": said once, by the caller
        if meta and not name.startswith(HF_PREFIX):
            with torch.device("meta"):
                net = create_timm_model(name, **overrides)
        else:
            net = load_by_name(name, weights, overrides)
        describe(net)  # raises UnsupportedModelError for what hetvit cannot compress
    return net


@app.command("plan")
@with_options(_size_options)
def plan_command(
    model: Annotated[str, typer.Option(
        "--model", help=MODEL_HELP + ".")],
    preset: Annotated[str, typer.Option(
        "--preset", "--plan", help="fast, balanced or fastest (scaled to the model's depth "
        "and token grid), or a plan.json file to check against the model and show.")] = "fast",
    as_json: Annotated[bool, flag(
        "--json", help="Print the plan, its layers and GMACs as JSON instead of a table.")
    ] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Also write the plan to this file (for --plan of compress, bench, fit and "
        "finetune); an earlier plan there is replaced, another file only with --force.")
    ] = None,
    force: ForceOpt = False,
    **sizes: Any,
) -> None:
    """Show a compression plan for a model, layer by layer, with its GMACs.

    The static layers, the pyramid stages with their token counts and grids, and the GMACs
    against the uncompressed model.
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from .. import files
    from ..flops import formula_macs, plan_layers
    from ..grid import token_grid
    from ..hosts import describe

    if out is not None:
        with user_errors():
            files.check_file_replaceable(out, _is_plan_file, force)
    overrides = _overrides(sizes)
    net = _named_model(model, overrides, meta=True)
    arch = describe(net)
    with user_errors():
        the_plan = resolve_plan(preset, net, flag="--preset/--plan")
        the_plan.validate(arch["depth"], token_grid(arch), tuple(arch["img_size"]))
        if the_plan.img_size is None:
            the_plan = type(the_plan).from_dict({**the_plan.to_dict(),
                                                 "img_size": arch["img_size"]})
        if out is not None:
            files.atomic_write_text(out, the_plan.to_json() + "\n")
    base, new = formula_macs(arch), formula_macs(arch, the_plan)
    rows = plan_layers(arch, the_plan)
    if as_json:
        print(json.dumps({"model": model, "plan": the_plan.to_dict(), "layers": rows,
                          "gmacs": {"baseline": base / 1e9, "plan": new / 1e9,
                                    "reduction": base / new}}, indent=2))
    else:
        h, w = arch["img_size"]
        table = Table(title=f"{model} at {h}x{w}: {the_plan.label or preset} plan",
                      title_justify="left")
        for col, just in (("layer", "right"), ("runs", "left"), ("tokens", "right"),
                          ("grid", "right"), ("GMACs", "right")):
            table.add_column(col, justify=just)
        for r in rows:
            grid = "x".join(map(str, r["grid"]))
            if r["kind"] == "aggregate":
                table.add_row("", f"[cyan]aggregate {r['tokens_in']} -> {r['tokens']}[/]",
                              str(r["tokens"]), grid, f"{r['macs'] / 1e9:.4g}", style="cyan")
            else:
                kind = "[bold]static[/] attention" if r["kind"] == "static" else "attention"
                table.add_row(str(r["layer"]), kind, f"{r['prefix']}+{r['tokens']}", grid,
                              f"{r['macs'] / 1e9:.4g}")
        console = Console()
        console.print(table)
        console.print(f"{the_plan.describe()}", highlight=False)
        console.print(f"GMACs: baseline {base / 1e9:.4g} -> plan {new / 1e9:.4g} "
                      f"([bold]{base / new:.2f}x fewer[/], {100 * (1 - new / base):.0f}% saved)",
                      highlight=False)
    if out is not None:
        Console(stderr=True).print(f"plan written to {out}", highlight=False)


@app.command()
@with_options(_size_options)
def compress(
    plan: Annotated[str, typer.Option(
        help="A preset (balanced, fast, fastest), scaled to the model, or a plan.json file.")],
    out: Annotated[Path, typer.Option(
        help="Directory to write the compressed checkpoint to (an earlier checkpoint there is "
        "replaced; a folder of other files, or the model read, is refused).")],
    model: Annotated[str | None, typer.Option(
        help="timm model name, e.g. deit_small_patch16_224, or hf:DIR (a Hugging Face "
        "model directory).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Weights for --model (.pth/.safetensors/.ckpt), or a hetvit checkpoint directory "
        "(then --model is not needed).")] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="Images (ImageFolder dir or .tar.gz) whose mean attention initialises the static "
        "maps. Without it the maps start uniform.")] = None,
    num_images: Annotated[int, typer.Option(
        "--calibration-images", "--num-images", min=1, help="Calibration images to use, drawn "
        "at random (seeded) from the set (--calibration-images, as in export, fit and "
        "finetune).")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Calibration batch size.")] = 64,
    aggregation_init: AggregationInitOpt = "pool",
    aggregation: AggregationOpt = None,
    **sizes: Any,
) -> None:
    """Compress a ViT with a plan and save it as a hetvit checkpoint directory.

    The static maps start from the mean attention of the calibration images; fine-tune the
    result with `hetvit finetune` to recover accuracy.
    """
    from rich.console import Console

    from .. import files, io
    from ..flops import formula_macs
    from ..hosts import describe
    from ..surgery import compress as do_compress

    console = Console()
    with user_errors():
        check_out_is_not_an_input(out, checkpoint=checkpoint)
        files.check_replaceable(out, io.SOURCE_FILE)
        source = open_model(model, checkpoint, _overrides(sizes))
        the_plan = resolve_plan(plan, source, aggregation)
        loader = None
        if calibration is not None:
            from ..data import sample_images

            loader = sample_images(calibration, source, num_images, batch_size=batch_size)
        student = do_compress(source.eval(), the_plan, calibration=loader,
                              aggregation_init=aggregation_init)
        io.save(student, out)
    arch = describe(source)
    base, new = formula_macs(arch), formula_macs(arch, student.hetvit_plan)
    console.print(f"compressed [bold]{arch.get('name') or 'model'}[/] with "
                  f"{student.hetvit_plan.describe()}: {base / 1e9:.4g} -> {new / 1e9:.4g} GMACs "
                  f"({base / new:.2f}x fewer); saved to [bold]{out}[/]")


def _bench_models(model: str | None, checkpoint: Path | None, plan: str | None,
                  overrides: dict, method: dict[str, Any] | None = None
                  ) -> tuple[Any, Any, str, list[str]]:
    """Baseline, compressed model, a name, and notes on where their weights came from.

    ``--checkpoint DIR`` holding a compressed model: the baseline is its source architecture
    with random weights. Holding an uncompressed model: it is the baseline, compressed with
    ``--plan``. Otherwise ``--model NAME`` with optional ``--checkpoint FILE`` weights. With
    ``--method`` (``method``) the model is reduced by that baseline instead of a plan.
    """
    method = method or {"method": None}
    if method["method"] is not None and plan is not None:
        fail(f"--method {method['method']} runs instead of a plan: drop --plan")
    from ..bench import compress_for_speed
    from ..hosts import describe
    from ..io import is_checkpoint, load
    from ..surgery import build_model, is_compressed

    notes: list[str] = []
    if checkpoint is not None and not checkpoint.exists():
        fail(f"checkpoint not found: {checkpoint}")
    if checkpoint is not None and checkpoint.is_dir():
        if not is_checkpoint(checkpoint):
            fail(f"{checkpoint} is a directory but not a hetvit checkpoint (no source.json); "
                 "a weights file goes with --model NAME")
        if model is not None or overrides:
            fail("--checkpoint DIR names its own architecture: drop --model and the size "
                 "overrides")
        with user_errors():
            net = load(checkpoint)
        name = describe(net).get("name") or str(checkpoint)
        if is_compressed(net):
            if method["method"] is not None:
                fail(f"{checkpoint} is already compressed ({net.hetvit_plan.describe()}): "
                     f"--method {method['method']} needs an uncompressed model")
            if plan is not None:
                fail(f"{checkpoint} is already compressed ({net.hetvit_plan.describe()}): "
                     "drop --plan")
            arch = describe(net)
            baseline = build_model(arch)
            if not arch.get("name"):
                baseline.init_weights()  # build_model leaves a nameless ViT uninitialised
            notes.append(f"baseline: {name} rebuilt with random weights; compressed: weights "
                         f"from {checkpoint}")
            return baseline.eval(), net.eval(), name, notes
        baseline = net
        notes.append(f"baseline: weights from {checkpoint}")
    else:
        if model is None:
            fail("give --model NAME (a timm ViT; --checkpoint FILE for its weights) or "
                 "--checkpoint DIR (a hetvit checkpoint)")
        baseline = _named_model(model, overrides, weights=checkpoint)
        name = model
        notes.append(f"weights from {checkpoint}" if checkpoint else
                     "weights are random: speed does not depend on them")
    if method["method"] is not None:
        return baseline.eval(), apply_method(baseline.eval(), method), name, notes
    with user_errors():
        compressed = compress_for_speed(baseline.eval(), resolve_plan(plan or "fast", baseline))
    if checkpoint is not None:
        notes.append("compressed: static maps calibrated on 2 random images (enough for speed, "
                     "not for accuracy)")
    return baseline.eval(), compressed.eval(), name, notes


@app.command("bench")
@with_options(_method_options)
@with_options(_size_options)
def bench_command(
    model: Annotated[str | None, typer.Option(
        "--model", help=MODEL_HELP + ". Random weights unless --checkpoint FILE gives "
        "them.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="Weights for --model (.pth/.safetensors/.ckpt), or a hetvit "
        "checkpoint directory: if compressed, it is timed against its source architecture "
        "(random weights); if not, it is the baseline and --plan compresses it.")] = None,
    plan: Annotated[str | None, typer.Option(
        "--plan", help="fast, balanced or fastest (scaled to the model) or a plan.json file. "
        "Default: fast (not allowed with an already compressed --checkpoint DIR).")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Images per call for the throughput measurement.")] = 32,
    latency: Annotated[bool, flag(
        "--latency", help="Also measure batch-1 latency (median ms per image).")] = False,
    rounds: Annotated[int, typer.Option(
        min=1, help="Timed runs per model at --batch-size, alternating baseline and "
        "compressed; the speedup is the median over rounds.")] = 7,
    latency_rounds: Annotated[int, typer.Option(
        min=1, help="Alternating rounds for --latency (each run lasts --min-time).")] = 9,
    warmup: Annotated[int, typer.Option(
        min=0, help="Untimed calls per model first (they also cover --compile's "
        "compilation).")] = 2,
    min_time: Annotated[float, typer.Option(
        min=0.0, help="Seconds each timed run lasts at least (several calls when one is "
        "quicker).")
    ] = 1.0,
    compile: Annotated[bool, flag(
        "--compile", help="Run both models under torch.compile.")] = False,
    dtype: Annotated[str, typer.Option(
        help="fp32, or bf16 (models and inputs cast to bfloat16).")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu, or cuda when a GPU is present.")] = "cpu",
    threads: TorchThreadsOpt = None,
    runtime: Annotated[str, typer.Option(
        help="What runs the models: torch (eager, or compiled with --compile) or "
        "onnxruntime (both models exported to ONNX, fp32 on the CPU).")] = "torch",
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="int8 (with --runtime onnxruntime): time baseline and compressed, "
        "each in fp32 and int8, side by side, as speedups over baseline fp32.")] = None,
    quantize_mode: Annotated[str, typer.Option(
        "--quantize-mode", help="With --quantize: dynamic, or static (QDQ, calibrated on random "
        "images: right for speed only).")] = "dynamic",
    as_json: Annotated[bool, flag(
        "--json", help="Print the result as JSON (for machines) instead of the table.")
    ] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Also write the result as JSON to this file (an earlier bench result "
        "there is replaced, another file only with --force).")] = None,
    force: ForceOpt = False,
    **sizes: Any,
) -> None:
    """Time a model and its compressed version side by side in one process.

    Throughput, speedup (median and spread over alternating rounds), GMACs, and speedup per
    GMAC saved (efficiency). With --method tome or evit the "compressed" model is that
    training-free baseline instead of a hetvit plan, for comparison.
    """

    from rich.console import Console

    from .. import files
    from ..bench import DTYPES, RUNTIMES, compare, render

    err = Console(stderr=True)
    if out is not None:  # before the timing, which takes minutes
        with user_errors():
            files.check_file_replaceable(out, _is_bench_result, force)
    if dtype not in DTYPES:
        fail(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if runtime not in RUNTIMES:
        fail(f"--runtime {runtime!r}: available: {', '.join(RUNTIMES)}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: torch sees no CUDA device here")
    elif device != "cpu":
        fail(f"--device {device!r}: use cpu or cuda")
    method = pop_method_options(sizes)
    if quantize is not None:
        if quantize.lower() != "int8" or runtime != "onnxruntime":
            fail("--quantize int8 goes with --runtime onnxruntime")
        if method["method"] is not None or compile or dtype != "fp32" or device != "cpu":
            fail("--quantize int8 times hetvit plans in fp32 and int8 on the CPU: drop --method, "
                 "--compile, --dtype and --device")
    overrides = _overrides(sizes)
    baseline, compressed, name, notes = _bench_models(model, checkpoint, plan, overrides, method)
    if quantize is not None:
        _bench_int8(baseline, compressed, name, notes, out, as_json, batch_size,
                    dict(mode=quantize_mode, rounds=rounds, warmup=warmup, min_time=min_time,
                         latency=latency, latency_rounds=latency_rounds, threads=threads))
        return
    with user_errors():
        with err.status("timing the baseline and the compressed model side by side..."):
            result = compare(baseline, compressed, batch_size, rounds=rounds, warmup=warmup,
                             min_time=min_time, latency=latency, latency_rounds=latency_rounds,
                             compile=compile, dtype=dtype, device=device, runtime=runtime,
                             threads=threads)
    reduced = getattr(compressed, "hetvit_baseline", None)
    data = {"model": name, "plan": None if reduced else compressed.hetvit_plan.to_dict(),
            **({"method": reduced} if reduced else {}), "notes": notes, **result.to_dict()}
    _show_bench(data, out, as_json, lambda title: render(result, title=title), compressed,
                name, notes)


def _bench_int8(baseline: Any, compressed: Any, name: str, notes: list[str], out: Path | None,
                as_json: bool, batch_size: int, options: dict[str, Any]) -> None:
    """``bench --quantize int8``: the four models of :func:`hetvit.bench_int8.compare_int8`."""
    from rich.console import Console

    from ..bench_int8 import compare_int8, render_int8

    with user_errors():
        with Console(stderr=True).status("quantizing, then timing four models side by side..."):
            result = compare_int8(baseline, compressed, batch_size, **options)
    data = {"model": name, "plan": compressed.hetvit_plan.to_dict(), "notes": notes,
            **result.to_dict()}
    _show_bench(data, out, as_json, lambda title: render_int8(result, title=title), compressed,
                name, notes)


def _show_bench(data: dict[str, Any], out: Path | None, as_json: bool,
                table: Any, compressed: Any, name: str, notes: list[str]) -> None:
    """What every bench prints: ``data`` written to ``out``, then as JSON or as the ``table``
    of the result (titled with the model and its input size), then the notes."""
    import json

    from rich.console import Console

    from .. import files
    from ..hosts import input_size

    if out is not None:
        with user_errors():
            files.atomic_write_text(out, json.dumps(data, indent=2) + "\n")
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        _, h, w = input_size(compressed)
        Console().print(table(f"{name} at {h}x{w}"))
    for note in notes:
        Console(stderr=True).print(f"note: {note}", highlight=False)
