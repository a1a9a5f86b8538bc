"""Speed of a baseline ViT and its compressed version, measured side by side in one process.

Machines are noisy (other processes, frequency scaling, thermal drift), so an absolute img/s
figure says little and two figures taken minutes apart say less. What is reported is the ratio,
measured the way that cancels most of the noise: both models are warmed up, then timed in
alternating runs (baseline, compressed, compressed, baseline, ...) over several rounds, and the
speedup is the median of the per-round ratios, with its spread. Cost is reported as GMACs from
the closed-form count, cross-checked against a count of the modules a forward pass runs.

How a model is turned into something to time is a *runtime*: ``"torch"`` (eager or
``torch.compile``) and ``"onnxruntime"`` are built in; others plug in with
:func:`register_runtime`.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import baselines
from .bench_results import (
    BenchResult,
    ModelInfo,
    Paired,
    Settings,
    baseline_drift,
    baseline_unsteady,
    render,
)
from .errors import BenchError
from .export import ort_runner
from .flops import count_macs, formula_macs
from .hosts import describe, input_size
from .surgery import compress, plan_of

__all__ = ["Settings", "Paired", "ModelInfo", "BenchResult", "compare", "model_info",
           "register_runtime", "RUNTIMES", "DTYPES", "render", "environment",
           "baseline_drift", "baseline_unsteady"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

Runner = Callable[[], object]
"""Runs the model once on its fixed input and returns when the result is ready."""


RunnerFactory = Callable[[nn.Module, torch.Tensor, Settings], Runner]
"""``factory(model, inputs, settings) -> runner``.

``model`` is in eval mode, already on ``settings.device`` in ``settings.dtype``; ``inputs`` is
the batch to run it on. The factory may do slow one-off work (compilation, export); the runner
it returns is what gets timed, after warm-up calls. It should use ``torch.get_num_threads()``
threads (set from ``compare(threads=...)``), which is the figure the result records.
"""


def _torch_runner(model: nn.Module, inputs: torch.Tensor, settings: Settings) -> Runner:
    fn: Callable[[torch.Tensor], Any] = model
    if settings.compile:
        # Static shapes: each batch size gets its own graph, compiled during warm-up.
        fn = torch.compile(model, dynamic=False)
    cuda = inputs.device.type == "cuda"

    def run() -> object:
        with torch.inference_mode():
            out = fn(inputs)
        if cuda:
            torch.cuda.synchronize()
        return out

    return run


def _onnxruntime_runner(model: nn.Module, inputs: torch.Tensor, settings: Settings) -> Runner:
    """Export to ONNX (fp32, CPU) and time the onnxruntime session on the same inputs."""
    if inputs.device.type != "cpu" or inputs.dtype != torch.float32:
        raise BenchError("the onnxruntime runtime times fp32 on the CPU: use --dtype fp32 "
                         "--device cpu")
    if settings.compile:
        raise BenchError("--compile applies to the torch runtime, not onnxruntime")
    run = ort_runner(model, inputs.shape[0], threads=torch.get_num_threads())
    array = inputs.numpy()
    return lambda: run(array)


RUNTIMES: dict[str, RunnerFactory] = {"torch": _torch_runner,
                                      "onnxruntime": _onnxruntime_runner}


def register_runtime(name: str, factory: RunnerFactory) -> None:
    """Make ``compare(..., runtime=name)`` use ``factory`` (the CLI's ``--runtime`` offers the
    built-in runtimes only).

    A factory takes ``(model, inputs, settings)`` and returns a function that runs one
    forward pass on ``inputs``; the built-in ``"onnxruntime"`` entry is one, for example::

        def traced(model, inputs, settings):
            fn = torch.jit.trace(model, inputs)
            return lambda: fn(inputs)

        register_runtime("torchscript", traced)
    """
    RUNTIMES[name] = factory


# ----------------------------------------------------------------------------- measuring
def compress_for_speed(model: nn.Module, plan: Any) -> nn.Module:
    """A compressed copy of ``model`` for timing only.

    Its static maps are calibrated on two random images: enough to give them realistic
    (non-uniform) values, and time does not depend on the values anyway.
    """
    c, h, w = input_size(model)
    images = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibration notes on random data: irrelevant to time
        return compress(model.eval(), plan, calibration=images).eval()


def model_info(model: nn.Module) -> ModelInfo:
    """GMACs (closed form and counted) and parameters of a ViT of a supported host, compressed
    or not."""
    if getattr(model, "hetvit_baseline", None) is not None:  # ToMe, EViT: hetvit.baselines
        return ModelInfo(gmacs=baselines.formula_macs(model) / 1e9,
                         gmacs_counted=(count_macs(model) + baselines.selection_macs(model)) / 1e9,
                         params=sum(p.numel() for p in model.parameters()),
                         plan=baselines.describe_baseline(model))
    plan = plan_of(model)
    return ModelInfo(gmacs=formula_macs(describe(model), plan) / 1e9,
                     gmacs_counted=count_macs(model) / 1e9,
                     params=sum(p.numel() for p in model.parameters()),
                     plan=plan.describe() if plan.static or plan.pyramid else "baseline")


def _cpuinfo(key: str, path: str = "/proc/cpuinfo") -> str | None:
    """The value of the first ``key`` line of Linux's ``/proc/cpuinfo``; None where unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
"""The CPU flags int8 speed depends on: without a VNNI (or AMX) flag, onnxruntime's int8
kernels gain little over fp32 (measured: 1.1x against 1.5-1.8x with VNNI; ``docs/int8.md``)."""


def cpu_flags(wanted: tuple[str, ...] = INT8_FLAGS, cpuinfo: str = "/proc/cpuinfo"
              ) -> list[str] | None:
    """Which of ``wanted`` the CPU reports (Linux ``/proc/cpuinfo``); None where unknown."""
    flags = _cpuinfo("flags", cpuinfo)
    if flags is None:
        return None
    have = set(flags.split())
    return [flag for flag in wanted if flag in have]


def has_int8_dot(flags: list[str] | None) -> bool | None:
    """Whether the CPU has int8 dot-product instructions (VNNI or AMX); None where unknown."""
    return None if flags is None else any("vnni" in f or f.startswith("amx") for f in flags)


def environment(device: str = "cpu") -> dict[str, Any]:
    """What a speed figure depends on besides the models: versions, threads, hardware, load."""
    import timm

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "python": platform.python_version(),
    }
    knobs = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                            "KMP_BLOCKTIME", "GOMP_SPINCOUNT") if k in os.environ}
    if knobs:
        env["threading_env"] = knobs
    if hasattr(os, "getloadavg"):
        # Other work on the machine makes absolute figures meaningless; record how much there was.
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def _prepare(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``model`` in eval mode on ``device`` in ``dtype``; a copy, so the caller's is untouched."""
    param = next(model.parameters())
    if param.device != device or param.dtype != dtype:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model.eval()


def _timed(runner: Runner, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        runner()
    return time.perf_counter() - start


def _per_call_ms(runner: Runner, iters: int) -> float:
    """Median time of single calls: robust to a call that another process happened to slow."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        runner()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _iterations(runners: list[Runner], min_time: float) -> list[int]:
    """Calls per timed run so that each run lasts about ``min_time`` seconds."""
    return [max(1, math.ceil(min_time / max(_timed(r, 1), 1e-6))) for r in runners]


def _rotate(runners: list[Runner], iters: list[int], rounds: int,
            measure: Callable[[Runner, int], float]) -> list[list[float]]:
    """``measure`` every runner once a round, forward order in even rounds and backward in odd
    (A B, B A, ... for two): drift over the run cancels out of the ratios."""
    values: list[list[float]] = [[] for _ in runners]
    for r in range(rounds):
        order = range(len(runners)) if r % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            values[i].append(measure(runners[i], iters[i]))
    return values


def timed_rounds(runners: list[Runner], batch: int, rounds: int, unit: str, *, warmup: int,
                 min_time: float) -> list[list[float]]:
    """Each runner's ``rounds`` measurements, in ``unit`` (``"ms"`` per call or ``"img/s"`` at
    ``batch``): after ``warmup`` calls, with iteration counts sized to ``min_time`` and the
    garbage collector off while timing (its pauses would land on whichever model ran)."""
    for r in runners:
        for _ in range(warmup):
            r()
    iters = _iterations(runners, min_time)
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        if unit == "ms":
            return _rotate(runners, iters, rounds, _per_call_ms)
        return _rotate(runners, iters, rounds, lambda r, k: k * batch / _timed(r, k))
    finally:
        if gc_was:
            gc.enable()


def compare(baseline: nn.Module, compressed: nn.Module, batch_size: int = 32, *,
            rounds: int = 7, warmup: int = 2, min_time: float = 1.0, latency: bool = False,
            latency_rounds: int | None = None, compile: bool = False, dtype: str = "fp32",
            device: str = "cpu", runtime: str = "torch", threads: int | None = None,
            seed: int = 0) -> BenchResult:
    """Throughput (and optionally batch-1 latency) of two models, side by side.

    Args:
        baseline, compressed: ViTs of a supported host taking the same input size (the
            compressed one usually from :func:`hetvit.compress`). They are not modified: a
            converted copy is timed when ``device`` or ``dtype`` differ from theirs.
        batch_size: images per call for the throughput measurement.
        rounds: alternating timed runs per model; the speedup is the median over rounds.
        warmup: untimed calls per model first (they also cover ``torch.compile``).
        min_time: seconds each timed run lasts at least (several calls when one is quicker).
        latency: also measure batch-1 latency (median ms per call).
        latency_rounds: rounds for the latency measurement (default: ``rounds``).
        compile: run both models under ``torch.compile``.
        dtype: ``"fp32"`` or ``"bf16"`` (the models and inputs are cast).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
        runtime: a key of :data:`RUNTIMES`.
        threads: torch CPU threads for the measurement (restored afterwards).
        seed: seed of the random input images.
    """
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if runtime not in RUNTIMES:
        raise BenchError(f"unknown runtime {runtime!r}; available: {sorted(RUNTIMES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("device 'cuda' was asked for but torch sees no CUDA device")
    if batch_size < 1 or rounds < 1 or warmup < 0:
        raise BenchError("batch_size and rounds must be at least 1, warmup at least 0")
    settings = Settings(batch_size=batch_size, dtype=dtype, device=device, compile=compile,
                        runtime=runtime)
    sizes = [input_size(m) for m in (baseline, compressed)]
    if sizes[0] != sizes[1]:
        raise BenchError(f"the models take different input sizes: {sizes[0][1:]} and "
                         f"{sizes[1][1:]}")

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        infos = [model_info(baseline), model_info(compressed)]
        env = environment(device)
        dev, dt = torch.device(device), DTYPES[dtype]
        models = [_prepare(m, dev, dt) for m in (baseline, compressed)]
        gen = torch.Generator().manual_seed(seed)

        def measure(batch: int, n_rounds: int, what: str) -> Paired:
            x = torch.randn(batch, *sizes[0], generator=gen).to(device=dev, dtype=dt)
            runners = [RUNTIMES[runtime](m, x, settings) for m in models]
            values = timed_rounds(runners, batch, n_rounds, what, warmup=warmup,
                                  min_time=min_time)
            return Paired(what, values[0], values[1])

        throughput = measure(batch_size, rounds, "img/s")
        lat = measure(1, latency_rounds or rounds, "ms") if latency else None
        env["threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    env.update(rounds=rounds, latency_rounds=(latency_rounds or rounds) if latency else None,
               warmup=warmup, min_time=min_time)
    return BenchResult(infos[0], infos[1], throughput, lat, settings, env)
