"""The one benchmark harness: timing, machine ceilings, rows, and the JSON / markdown / PNG writers.

A benchmark script declares a `Benchmark`: a kernel name, its cases (real shapes from bench/shapes.py, each
with an explicit count of the bytes it must move and the flops it must do) and its providers (our Triton
kernel, the PyTorch reference eager and under torch.compile, the best library on the machine, the CUDA C++
backend). `run_cli` measures the machine's ceilings once, then for every case and provider:

1. makes fresh inputs from a fixed seed (random normal values, never zeros);
2. builds the provider's zero-argument call and runs it once (compilation, JIT, autotuning excluded);
3. checks that output against the reference's output on identical inputs (relative L2 error);
4. times it: on a GPU with CUDA events around every call, the L2 cache flushed before each call (a write
   over a buffer of 4x the L2 size), after a warm-up that is not counted; median and quantiles of the calls;
   on a CPU (`--cpu-smoke`) with a wall clock at tiny sizes, only to exercise the code path;
5. writes one row: machine, versions, date, kernel, shape, provider, median and quantiles, GB/s and
   TFLOP/s from the explicit counts, and the fraction of the measured ceilings.

A provider that fails writes its error into its row and the run goes on.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton reads TRITON_INTERPRET when @triton.jit runs (at import of a kernel module): set it before any
    # trinfer kernel is imported, so that --cpu-smoke runs the kernels under the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "trinfer-bench/1"

CPU_SMOKE_BANNER = (
    "CPU SMOKE RUN: tiny shapes, Triton kernels under the interpreter, wall-clock timing. "
    "These are NOT GPU measurements and say nothing about speed; they only prove the code path runs."
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Relative L2 error above which a provider's output is flagged MISMATCH against the reference.
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


class Skip(Exception):
    """Raised by a provider's build step when it does not apply here; the row says 'skipped' and why."""


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------

def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted sequence (numpy's default 'linear' method)."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Per-call times in milliseconds."""

    median_ms: float
    p10_ms: float
    p20_ms: float
    p80_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    n_reps: int
    timer: str

    @classmethod
    def from_samples(cls, samples_ms: Iterable[float], timer: str) -> "Timing":
        s = sorted(float(x) for x in samples_ms)
        if not s:
            raise ValueError("samples_ms: expected at least one sample, got none")
        return cls(
            median_ms=quantile(s, 0.5), p10_ms=quantile(s, 0.1), p20_ms=quantile(s, 0.2),
            p80_ms=quantile(s, 0.8), p90_ms=quantile(s, 0.9), min_ms=s[0], mean_ms=sum(s) / len(s),
            n_reps=len(s), timer=timer,
        )


class CudaTimer:
    """CUDA-event timing of single calls with a cold L2 cache.

    Before each timed call a buffer of `flush_bytes` (default 4x the device's L2, at least 256 MiB) is
    overwritten, so that the inputs are read from HBM, as they are in a model whose layers stream weights
    and activations through the cache. Events bracket the call alone, not the flush. The flush also keeps
    the GPU busy while the host enqueues the next call, so a call's host launch cost is hidden behind it:
    what is measured is device time (a provider that launches many small kernels, like the eager
    reference, still pays for the gaps between its own kernels).
    """

    timer_name = "cuda-event, L2 flushed"

    def __init__(self, device: torch.device, *, warmup_ms: float = 10.0, rep_ms: float = 40.0,
                 min_reps: int = 10, max_reps: int = 1000, flush_bytes: int | None = None):
        self.device = torch.device(device)
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.min_reps = min_reps
        self.max_reps = max_reps
        if flush_bytes is None:
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 0
            flush_bytes = max(4 * l2, 256 << 20)
        self.flush_bytes = int(flush_bytes)
        self._flush = torch.empty(self.flush_bytes // 4, dtype=torch.int32, device=self.device)

    def __call__(self, fn: Callable[[], Any], *, flush: bool = True) -> Timing:
        sync = torch.cuda.synchronize
        new_event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        flush_buf = self._flush if flush else None
        # Estimate the time of one (flush + call) to size the warm-up and the repetitions.
        sync(self.device)
        start, end = new_event(), new_event()
        start.record()
        for _ in range(3):
            if flush_buf is not None:
                flush_buf.fill_(1)
            fn()
        end.record()
        sync(self.device)
        est_ms = max(start.elapsed_time(end) / 3, 1e-3)
        n_warm = max(1, int(self.warmup_ms / est_ms))
        n_rep = min(max(int(self.rep_ms / est_ms), self.min_reps), self.max_reps)
        for _ in range(n_warm):
            fn()
        starts = [new_event() for _ in range(n_rep)]
        ends = [new_event() for _ in range(n_rep)]
        for i in range(n_rep):
            if flush_buf is not None:
                flush_buf.fill_(i)
            starts[i].record()
            fn()
            ends[i].record()
        sync(self.device)
        return Timing.from_samples((s.elapsed_time(e) for s, e in zip(starts, ends)), self.timer_name)


class WallTimer:
    """Wall-clock timing for --cpu-smoke: a few calls, perf_counter around each. Not a GPU measurement."""

    timer_name = "wall-clock (cpu-smoke)"

    def __init__(self, reps: int = 2, warmup: int = 0):
        self.reps = reps
        self.warmup = warmup

    def __call__(self, fn: Callable[[], Any], *, flush: bool = True) -> Timing:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return Timing.from_samples(samples, self.timer_name)


# ----------------------------------------------------------------------------------------------------------
# Ceilings: the machine's own copy bandwidth and matmul rate, measured in the same run
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float            # device-to-device copy, (bytes read + bytes written) / median time
    copy_bytes: int             # bytes read + written per copy
    copy_ms: float
    matmul_tflops: float        # 2*M*N*K / median time
    matmul_shape: tuple[int, int, int]
    matmul_dtype: str
    matmul_ms: float
    timer: str


def copy_bytes_moved(nbytes: int) -> int:
    """A copy of `nbytes` reads them once and writes them once."""
    return 2 * int(nbytes)


def matmul_flops(m: int, n: int, k: int) -> int:
    """One multiply and one add per (m, n, k) triple."""
    return 2 * int(m) * int(n) * int(k)


def measure_ceilings(device: torch.device, timer: Callable[..., Timing], *, copy_mib: int | None = None,
                     matmul_n: int | None = None, matmul_dtype: torch.dtype | None = None) -> Ceilings:
    """Measure the copy bandwidth and the matmul rate on random data (never zeros).

    GPU defaults: a 1 GiB bf16 buffer copied (2 GiB moved, 17x an H200's L2) and an 8192^3 bf16 matmul.
    CPU (smoke) defaults: 16 MiB and 256^3 fp32, only so the code path runs.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    copy_mib = copy_mib if copy_mib is not None else (1024 if on_gpu else 16)
    matmul_n = matmul_n if matmul_n is not None else (8192 if on_gpu else 256)
    matmul_dtype = matmul_dtype if matmul_dtype is not None else (torch.bfloat16 if on_gpu else torch.float32)
    gen = torch.Generator(device=device).manual_seed(1234)
    src = torch.randn(copy_mib << 19, dtype=torch.bfloat16, device=device, generator=gen)
    dst = torch.empty_like(src)
    t_copy = timer(lambda: dst.copy_(src), flush=False)
    nbytes = copy_bytes_moved(src.numel() * src.element_size())
    del src, dst
    a = torch.randn(matmul_n, matmul_n, dtype=matmul_dtype, device=device, generator=gen)
    b = torch.randn(matmul_n, matmul_n, dtype=matmul_dtype, device=device, generator=gen)
    c = torch.empty_like(a)
    t_mm = timer(lambda: torch.mm(a, b, out=c), flush=False)
    del a, b, c
    return Ceilings(
        copy_gbps=nbytes / (t_copy.median_ms * 1e-3) / 1e9, copy_bytes=nbytes, copy_ms=t_copy.median_ms,
        matmul_tflops=matmul_flops(matmul_n, matmul_n, matmul_n) / (t_mm.median_ms * 1e-3) / 1e12,
        matmul_shape=(matmul_n, matmul_n, matmul_n), matmul_dtype=DTYPE_NAMES.get(matmul_dtype, str(matmul_dtype)),
        matmul_ms=t_mm.median_ms, timer=t_copy.timer,
    )


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_quiet(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device, mode: str) -> dict[str, Any]:
    """Machine, versions and date, written into every row."""
    import triton

    env: dict[str, Any] = {
        "mode": mode,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpu": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "git_commit": _run_quiet(["git", "rev-parse", "--short=12", "HEAD"]),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu": props.name,
            "gpu_cc": f"{props.major}.{props.minor}",
            "gpu_sms": props.multi_processor_count,
            "gpu_mem_gib": round(props.total_memory / 2**30, 1),
            "gpu_l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "driver": _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        })
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


# ----------------------------------------------------------------------------------------------------------
# Benchmarks, cases, providers
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One shape of one kernel.

    `bytes_moved` is the fewest bytes the operation must move through device memory (each input read once,
    each output written once); `flops` the arithmetic it must do (0 where it is negligible).
    `metric` is the headline for tables and plots: "GB/s" (memory-bound) or "TFLOP/s".
    """

    label: str
    group: str
    x: float
    x_name: str
    params: dict[str, Any]
    make_inputs: Callable[[torch.device], dict[str, Any]]
    bytes_moved: int
    flops: int = 0
    metric: str = "GB/s"
    dtype: torch.dtype = torch.bfloat16


@dataclass
class Provider:
    """One implementation of a kernel.

    `build(inputs)` returns a zero-argument callable doing the operation on those inputs (allocate
    outputs in `build`, not in the call, where the API allows); it may raise `Skip`.
    `kind`: "ours" | "reference" | "compiled" | "library" | "cuda".
    """

    name: str
    build: Callable[[dict[str, Any]], Callable[[], Any]]
    kind: str
    requires_cuda: bool = False
    skip: Callable[[Case], str | None] | None = None
    note: str = ""
    costly: bool = False   # compiles per shape (torch.compile, flex): the first to go when time runs short


@dataclass
class Benchmark:
    kernel: str
    description: str
    cases: Callable[[str, torch.dtype], list[Case]]   # (size set "full" | "quick" | "tiny", dtype)
    providers: list[Provider]
    output: Callable[[dict[str, Any], Any], Any] = lambda inputs, ret: ret
    compare: Callable[[Any, Any], float] | None = None     # default: rel_l2_error
    tol: Callable[[torch.dtype], float] | None = None       # default: CHECK_TOL[dtype]
    reference: str = "torch_ref"


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    raise TypeError(f"output: expected tensors (or tuples/lists/dicts of them), got {type(obj).__name__}")


def rel_l2_error(actual: Any, expected: Any) -> float:
    """max over output tensors of ||a - e||_2 / ||e||_2 in float64 (integer tensors: the fraction of elements
    that differ); NaN or inf in `actual` gives inf."""
    a_list, e_list = _tensors(actual), _tensors(expected)
    if len(a_list) != len(e_list):
        raise ValueError(f"output: expected {len(e_list)} tensors, got {len(a_list)}")
    worst = 0.0
    for a, e in zip(a_list, e_list):
        if tuple(a.shape) != tuple(e.shape):
            raise ValueError(f"output: expected shape {tuple(e.shape)}, got {tuple(a.shape)}")
        a64, e64 = a.detach().double(), e.detach().double()
        if not bool(torch.isfinite(a64).all()):
            return math.inf
        if a.dtype in (torch.int32, torch.int64, torch.bool):
            err = float((a64 != e64).double().mean()) if a64.numel() else 0.0
        else:
            denom = float(torch.linalg.vector_norm(e64)) or 1.0
            err = float(torch.linalg.vector_norm(a64 - e64)) / denom
        worst = max(worst, err)
    return worst


def row_rel_errors(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per row (the last dim: one token's head, one norm row), ||a - e||_2 / ||e||_2 in fp32 on the CPU; a row
    the reference leaves at zero scores 0 when `actual`'s is zero too, else inf; NaN or inf in `actual` scores
    inf. What long reductions are judged by: an all-zero output scores 1 whatever the magnitudes."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise ValueError(f"output: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}")
    width = actual.shape[-1] if actual.dim() else 1
    a = actual.detach().float().cpu().reshape(-1, width)
    e = expected.detach().float().cpu().reshape(-1, width)
    num, den = torch.linalg.vector_norm(a - e, dim=1), torch.linalg.vector_norm(e, dim=1)
    err = torch.where(den > 0, num / den.clamp_min(1e-30), torch.where(num > 0, math.inf, 0.0))
    return torch.where(torch.isfinite(a).all(dim=1), err, math.inf)


def _snapshot(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_snapshot(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    return obj


def compiled(fn: Callable) -> Callable[[], Callable]:
    """A getter for `torch.compile(fn)` with torch's defaults (mode "default"; shapes static at first, then
    automatically dynamic once a second shape recompiles), created on first use and then reused: what a
    user gets from a plain `torch.compile`, and two compiles per kernel rather than one per shape."""
    holder: list[Callable] = []

    def get() -> Callable:
        if not holder:
            holder.append(torch.compile(fn))
        return holder[0]

    return get


def raise_recompile_limits(limit: int = 1024) -> None:
    """torch.compile falls back to eager after `recompile_limit` (8) shapes: lift it, or a sweep would
    silently time eager code under the torch_compile label."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, max(int(getattr(cfg, attr)), limit))


def cuda_backend():
    """trinfer.cuda_kernels if its kernels can run here, else `Skip` with the reason.

    With TRINFER_BENCH_JIT=1 (bench/gpu_check.sh sets it after building), `load_jit()` is tried when the
    extension is not already loaded; the build is cached, so this costs little after the first time.
    """
    if not HAS_CUDA:
        raise Skip("CUDA C++ backend needs a CUDA GPU")
    try:
        import trinfer.cuda_kernels as ck
    except ImportError as exc:
        raise Skip(f"trinfer.cuda_kernels not importable ({exc})") from None
    available = getattr(ck, "is_available", lambda: False)
    if not available() and os.environ.get("TRINFER_BENCH_JIT") == "1" and hasattr(ck, "load_jit"):
        try:
            ck.load_jit()
        except Exception as exc:  # noqa: BLE001 - the reason goes into the row
            raise Skip(f"trinfer.cuda_kernels.load_jit() failed: {type(exc).__name__}: {exc}") from None
    if not available():
        why = getattr(ck, "unavailable_reason", lambda: None)()
        raise Skip(f"trinfer.cuda_kernels unavailable: {why or 'is_available() is False'}")
    return ck


def cuda_op(name: str) -> Callable:
    """The CUDA C++ backend's `name` op, or `Skip` saying why it cannot run here."""
    ck = cuda_backend()
    fn = getattr(ck, name, None)
    if fn is None:
        raise Skip(f"trinfer.cuda_kernels has no {name}")
    return fn


def triton_op(name: str) -> Callable:
    """Our Triton op `trinfer.triton_kernels.<name>`; a missing one is an error row (it should exist)."""
    import trinfer.triton_kernels as tk

    fn = getattr(tk, name, None)
    if fn is None:
        raise ImportError(f"trinfer.triton_kernels has no {name} (not landed yet?)")
    return fn


def reference(name: str) -> Callable:
    """The PyTorch reference `trinfer.triton_kernels.references.<name>` (the one the tests use)."""
    from trinfer.triton_kernels import references

    fn = getattr(references, name, None)
    if fn is None:
        raise ImportError(f"trinfer.triton_kernels.references has no {name} (not landed yet?)")
    return fn


def compiled_reference(name: str) -> Callable[[], Callable]:
    """`compiled()` of a reference looked up by name at first use."""
    holder: list[Callable] = []

    def get() -> Callable:
        if not holder:
            holder.append(torch.compile(reference(name)))
        return holder[0]

    return get


def bind(get_fn: Callable[[], Callable], args: Callable[[dict], tuple],
         kwargs: Callable[[dict], dict] | None = None) -> Callable[[dict], Callable[[], Any]]:
    """A `Provider.build` that looks the function up at build time (so a missing op is that row's error)
    and binds it to the case's inputs."""
    def build(inputs: dict) -> Callable[[], Any]:
        return functools.partial(get_fn(), *args(inputs), **(kwargs(inputs) if kwargs else {}))

    return build


def standard_providers(*, ref: str, op: str, args: Callable[[dict], tuple],
                       kwargs: Callable[[dict], dict] | None = None,
                       ref_kwargs: Callable[[dict], dict] | None = None,
                       libraries: Sequence[Provider] = (), cuda: bool = True,
                       ref_skip: Callable[[Case], str | None] | None = None) -> list[Provider]:
    """torch_ref (the oracle, first), triton, torch_compile (of the reference), the libraries, cuda.

    `args(inputs)` gives the positional arguments all of them share; `kwargs(inputs)` the keyword arguments
    of our ops (e.g. a preallocated `out=`); `ref_kwargs` those of the reference.
    """
    provs = [
        Provider("torch_ref", bind(lambda: reference(ref), args, ref_kwargs), "reference", skip=ref_skip),
        Provider("triton", bind(lambda: triton_op(op), args, kwargs), "ours"),
        Provider("torch_compile", bind(compiled_reference(ref), args, ref_kwargs), "compiled", skip=ref_skip,
                 costly=True),
        *libraries,
    ]
    if cuda:
        provs.append(Provider("cuda", bind(lambda: cuda_op(op), args, kwargs), "cuda"))
    return provs


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------

ROW_KEYS = (
    "kernel", "shape", "group", "x", "x_name", "params", "dtype", "provider", "kind", "note", "status", "error",
    "median_ms", "p10_ms", "p20_ms", "p80_ms", "p90_ms", "min_ms", "mean_ms", "n_reps", "timer",
    "bytes", "flops", "metric", "gbps", "tflops", "pct_copy", "pct_matmul", "check", "check_err", "check_vs",
    "speedup_vs_ref",
)


def _error_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(exc).__name__}: {first}"[:400]


@dataclass
class RunConfig:
    mode: str                    # "gpu" | "gpu-quick" | "gpu-tiny" | "cpu-smoke"
    size: str                    # "full" | "quick" | "tiny"
    device: torch.device
    dtype: torch.dtype
    providers: tuple[str, ...] | None = None
    deadline: float | None = None       # time.monotonic() after which no new row starts
    soft_deadline: float | None = None  # after which costly (compiling) providers are skipped (per benchmark)
    env: dict[str, Any] = field(default_factory=dict)
    ceilings: Ceilings | None = None
    timer: Callable[..., Timing] | None = None
    seed: int = 0


def _base_row(cfg: RunConfig, bench: Benchmark, case: Case, prov: Provider) -> dict[str, Any]:
    row = {k: None for k in ROW_KEYS}
    row.update({
        "kernel": bench.kernel, "shape": case.label, "group": case.group, "x": case.x,
        "x_name": case.x_name, "params": dict(case.params), "dtype": DTYPE_NAMES.get(case.dtype, str(case.dtype)),
        "provider": prov.name, "kind": prov.kind, "note": prov.note or None, "bytes": int(case.bytes_moved),
        "flops": int(case.flops), "metric": case.metric,
    })
    # Machine and versions in every row, so a row read alone still says where it came from.
    for k in ("mode", "date", "gpu", "torch", "cuda", "triton", "git_commit"):
        row[k] = cfg.env.get(k)
    return row


def _fill_timing(row: dict[str, Any], t: Timing, cfg: RunConfig) -> None:
    row.update({k: v for k, v in asdict(t).items()})
    sec = t.median_ms * 1e-3
    if sec > 0:
        row["gbps"] = row["bytes"] / sec / 1e9 if row["bytes"] else None
        row["tflops"] = row["flops"] / sec / 1e12 if row["flops"] else None
    if cfg.ceilings is not None:
        if row["gbps"] is not None:
            row["pct_copy"] = 100.0 * row["gbps"] / cfg.ceilings.copy_gbps
        if row["tflops"] is not None:
            row["pct_matmul"] = 100.0 * row["tflops"] / cfg.ceilings.matmul_tflops


def _release(device: torch.device, big: bool) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if big:
            torch.cuda.empty_cache()


def run_benchmark(bench: Benchmark, cfg: RunConfig, log=print) -> list[dict[str, Any]]:
    """All cases x providers of one benchmark; one row each, errors and skips included."""
    rows: list[dict[str, Any]] = []
    providers = [p for p in bench.providers if cfg.providers is None or p.name in cfg.providers]
    compare = bench.compare or rel_l2_error
    for case in bench.cases(cfg.size, cfg.dtype):
        kernel = bench.kernel
        case_rows: list[dict[str, Any]] = []
        outputs: dict[str, Any] = {}   # provider -> snapshot of its first call's output (for the check)
        big = case.bytes_moved > (1 << 28)
        for prov in providers:
            row = _base_row(cfg, bench, case, prov)
            case_rows.append(row)
            reason = None
            now = time.monotonic()
            if cfg.deadline is not None and now > cfg.deadline:
                reason = "time budget of this run exhausted"
            elif prov.costly and cfg.soft_deadline is not None and now > cfg.soft_deadline:
                reason = "time budget short: compiling provider skipped"
            elif prov.requires_cuda and cfg.device.type != "cuda":
                reason = "needs CUDA"
            elif prov.skip is not None:
                reason = prov.skip(case)
            if reason:
                row.update(status="skipped", error=reason)
                continue
            inputs = fn = ret = None
            try:
                torch.manual_seed(cfg.seed)
                inputs = case.make_inputs(cfg.device)
                fn = prov.build(inputs)
                ret = fn()  # first call: compile / JIT / autotune happen here, outside the timing
                if cfg.device.type == "cuda":
                    torch.cuda.synchronize(cfg.device)
                outputs[prov.name] = _snapshot(bench.output(inputs, ret))
                timing = cfg.timer(fn)
                _fill_timing(row, timing, cfg)
                row["status"] = "ok"
            except Skip as exc:
                outputs.pop(prov.name, None)
                row.update(status="skipped", error=str(exc)[:400])
            except Exception as exc:  # noqa: BLE001 - a failing provider must not stop the run
                outputs.pop(prov.name, None)
                row.update(status="error", error=_error_text(exc))
                print(f"[bench] {kernel} {case.label} {prov.name}: {row['error']}", file=sys.stderr)
                if not isinstance(exc, ImportError):
                    tb = traceback.format_exc().strip().splitlines()
                    print("\n".join("    " + line for line in tb[-12:]), file=sys.stderr)
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    big = True
            finally:
                del inputs, fn, ret
                try:
                    _release(cfg.device, big)
                except Exception as exc:  # noqa: BLE001 - a broken context shows in the next rows
                    print(f"[bench] device sync failed after {prov.name}: {_error_text(exc)}", file=sys.stderr)
        _check_outputs(bench, case, case_rows, outputs, compare)
        del outputs
        ref_rows = [r for r in case_rows if r["provider"] == bench.reference and r["status"] == "ok"]
        if ref_rows:
            for r in case_rows:
                if r["status"] == "ok" and r["median_ms"]:
                    r["speedup_vs_ref"] = ref_rows[0]["median_ms"] / r["median_ms"]
        for r in case_rows:
            log(_one_line(r))
        rows.extend(case_rows)
    return rows


def _check_outputs(bench: Benchmark, case: Case, case_rows: list[dict[str, Any]], outputs: dict[str, Any],
                   compare: Callable[[Any, Any], float]) -> None:
    """Compare every provider's first output with the oracle's: the reference, or where it could not run
    (memory, missing), the first library provider that ran."""
    oracle = bench.reference if bench.reference in outputs else next(
        (r["provider"] for r in case_rows if r["kind"] == "library" and r["provider"] in outputs), None)
    tol = bench.tol(case.dtype) if bench.tol else CHECK_TOL.get(case.dtype, 2e-2)
    for r in case_rows:
        name = r["provider"]
        if name not in outputs:
            continue
        if oracle is None:
            r["check"] = "n/a"
        elif name == oracle:
            r.update(check="reference" if name == bench.reference else "oracle", check_err=0.0, check_vs=name)
        else:
            try:
                err = compare(outputs[name], outputs[oracle])
            except Exception as exc:  # noqa: BLE001 - a malformed output is a failed check, not a crash
                r.update(check="MISMATCH", check_err=None, check_vs=oracle, note=f"check failed: {_error_text(exc)}")
                continue
            r.update(check="ok" if err <= tol else "MISMATCH", check_err=err, check_vs=oracle)


def _one_line(row: dict[str, Any]) -> str:
    head = f"{row['kernel']:<22} {row['shape']:<34} {row['provider']:<24}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['error']}"
    speed = f"{row['gbps']:8.1f} GB/s" if row["metric"] == "GB/s" and row["gbps"] else (
        f"{row['tflops']:8.2f} TFLOP/s" if row["tflops"] else "")
    check = f" check={row['check']}" + (f" ({row['check_err']:.1e} vs {row['check_vs']})"
                                         if row["check"] in ("ok", "MISMATCH") and row["check_err"] is not None else "")
    return f"{head} {row['median_ms'] * 1e3:10.2f} us {speed}{check}"


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------

def payload(cfg: RunConfig, rows: list[dict[str, Any]], title: str) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "title": title,
        "mode": cfg.mode,
        "banner": CPU_SMOKE_BANNER if cfg.mode == "cpu-smoke" else None,
        "env": cfg.env,
        "ceilings": asdict(cfg.ceilings) if cfg.ceilings else None,
        "rows": rows,
    }


def _json_safe(obj: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "inf"/"-inf"/"nan"; tuples become lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _fmt(v: Any, spec: str, none: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def markdown(data: dict[str, Any]) -> str:
    env, ceil = data["env"], data["ceilings"]
    lines = [f"# {data['title']}", ""]
    if data.get("banner"):
        lines += [f"> **{data['banner']}**", ""]
    where = env.get("gpu") or f"CPU ({env.get('cpu')})"
    lines.append(
        f"{where} · torch {env.get('torch')} · CUDA {env.get('cuda')} · triton {env.get('triton')} · "
        f"{env.get('date')} · commit {env.get('git_commit')} · mode {data['mode']}"
    )
    if ceil:
        lines.append(
            f"Ceilings measured in this run: copy {ceil['copy_gbps']:.0f} GB/s (read+write, "
            f"{ceil['copy_bytes'] / 2**30:.2f} GiB moved); matmul {ceil['matmul_tflops']:.3g} TFLOP/s "
            f"({ceil['matmul_dtype']} {'x'.join(map(str, ceil['matmul_shape']))}). Timer: {ceil['timer']}."
        )
    lines.append("")
    by_kernel: dict[str, list[dict[str, Any]]] = {}
    for r in data["rows"]:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for kernel, rows in by_kernel.items():
        lines += [f"## {kernel}", "",
                  "| shape | dtype | provider | median us | p10-p90 us | GB/s | % copy | TFLOP/s | % matmul "
                  "| x ref | check | note |",
                  "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|"]
        for r in rows:
            if r["status"] == "ok":
                cells = [
                    _fmt(r["median_ms"] * 1e3, ".2f"),
                    f"{r['p10_ms'] * 1e3:.2f}-{r['p90_ms'] * 1e3:.2f}",
                    _fmt(r["gbps"], ".1f"), _fmt(r["pct_copy"], ".0f"),
                    _fmt(r["tflops"], ".2f"), _fmt(r["pct_matmul"], ".0f"),
                    _fmt(r["speedup_vs_ref"], ".2f"),
                    f"{r['check']}" + (f" ({r['check_err']:.1e})" if r["check"] in ("ok", "MISMATCH") else ""),
                    (r["note"] or "").replace("|", "/"),
                ]
            else:
                msg = (r["error"] or "").replace("|", "/")
                cells = ["", "", "", "", "", "", "", r["status"], msg]
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['provider']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "median/p10/p90: per-call device time over the timed calls (warm-up excluded). GB/s and TFLOP/s: the "
        "case's counted bytes/flops over the median. % copy / % matmul: of the ceilings above. x ref: "
        "torch_ref median / this median. check: relative L2 error of the first call's output against "
        "check_vs (the reference) on identical inputs.", "",
    ]
    return "\n".join(lines)


def write_markdown(path: Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(data))
    return path


def write_plot(path: Path, data: dict[str, Any]) -> Path | None:
    """Speed vs size per provider: one panel per (kernel, group), the measured ceiling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data["rows"]:
        panels.setdefault((r["kernel"], r["group"]), []).append(r)
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    ceil = data["ceilings"]
    for ax, ((kernel, group), rows) in zip(axes.flat, panels.items()):
        metric = rows[0]["metric"]
        key = "gbps" if metric == "GB/s" else "tflops"
        for prov in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r["x"], r[key]) for r in rows if r["provider"] == prov and r["status"] == "ok" and r[key])
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4 if prov != "triton" else 2.4, label=prov)
        if ceil:
            level = ceil["copy_gbps"] if metric == "GB/s" else ceil["matmul_tflops"]
            ax.axhline(level, color="grey", linestyle="--", linewidth=1,
                       label="copy ceiling" if metric == "GB/s" else "matmul ceiling")
        ys_all = [r[key] for r in rows if r["status"] == "ok" and r[key]]
        if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 30:
            ax.set_yscale("log")
        xs_all = [r["x"] for r in rows]
        if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_title(f"{kernel} · {group}", fontsize=9)
        ax.set_xlabel(rows[0]["x_name"], fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    env = data["env"]
    title = f"{data['title']} · {env.get('gpu') or 'CPU'} · torch {env.get('torch')} · triton {env.get('triton')}" \
            f" · {env.get('date')}"
    if data["mode"] == "cpu-smoke":
        title = "CPU SMOKE (wall clock, interpreter, tiny sizes): NOT GPU MEASUREMENTS\n" + title
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out_dir: Path, stem: str, data: dict[str, Any], *, plot: bool = True) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [write_json(out_dir / f"{stem}.json", data), write_markdown(out_dir / f"{stem}.md", data)]
    if plot:
        p = write_plot(out_dir / f"{stem}.png", data)
        if p is not None:
            paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="main shapes only (what bench/gpu_check.sh runs)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (exercises the code path; on a GPU still timed)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on the CPU, Triton under the interpreter, wall clock: NOT a GPU measurement "
                        "(automatic when no CUDA GPU is present)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: bench/results/<date>/ on a GPU, bench/results/tmp/cpu-smoke/ "
                        "for --cpu-smoke)")
    p.add_argument("--providers", default=None, help="comma-separated subset of providers to run")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 for --cpu-smoke)")
    p.add_argument("--warmup-ms", type=float, default=None,
                   help="GPU warm-up per row, milliseconds (default 10; --quick 5; --tiny 2)")
    p.add_argument("--rep-ms", type=float, default=None,
                   help="GPU timed calls per row, milliseconds (default 40; --quick 20; --tiny 5)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new row after this many seconds (later rows are written as skipped)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def configure(args: argparse.Namespace, log=print) -> RunConfig:
    """Mode, device, dtype, timer, environment and ceilings for a run. `--budget-s` counts from here."""
    t_start = time.monotonic()
    smoke = args.cpu_smoke or not HAS_CUDA
    if smoke and not args.cpu_smoke:
        log("[bench] no CUDA GPU: running --cpu-smoke (" + CPU_SMOKE_BANNER + ")")
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        mode, size, device = "cpu-smoke", "tiny", torch.device("cpu")
        timer: Callable[..., Timing] = WallTimer()
    else:
        size = "tiny" if args.tiny else ("quick" if args.quick else "full")
        mode = {"tiny": "gpu-tiny", "quick": "gpu-quick", "full": "gpu"}[size]
        device = torch.device("cuda", torch.cuda.current_device())
        warmup_ms, rep_ms = {"full": (10.0, 40.0), "quick": (5.0, 20.0), "tiny": (2.0, 5.0)}[size]
        timer = CudaTimer(device, warmup_ms=warmup_ms if args.warmup_ms is None else args.warmup_ms,
                          rep_ms=rep_ms if args.rep_ms is None else args.rep_ms)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if smoke else torch.bfloat16)
    cfg = RunConfig(mode=mode, size=size, device=device, dtype=dtype, timer=timer,
                    providers=tuple(p.strip() for p in args.providers.split(",")) if args.providers else None)
    cfg.env = environment(device, mode)
    t0 = time.monotonic()
    cfg.ceilings = measure_ceilings(device, timer)
    log(f"[bench] ceilings ({time.monotonic() - t0:.1f} s): copy {cfg.ceilings.copy_gbps:.0f} GB/s, "
        f"matmul {cfg.ceilings.matmul_tflops:.3g} TFLOP/s [{cfg.ceilings.timer}]")
    raise_recompile_limits()
    if cfg.providers is None or "torch_compile" in cfg.providers:
        # Inductor's one-time start-up (imports, worker pool) should not count against the first kernel.
        t0 = time.monotonic()
        try:
            x = torch.randn(8, device=device)
            torch.compile(lambda t: t * 2 + 1)(x)
        except Exception as exc:  # noqa: BLE001 - the torch_compile rows will carry the error
            log(f"[bench] torch.compile warm-up failed: {_error_text(exc)}")
        log(f"[bench] torch.compile warm-up: {time.monotonic() - t0:.1f} s")
    if args.budget_s is not None:
        cfg.deadline = t_start + args.budget_s
    return cfg


def default_out_dir(mode: str) -> Path:
    if mode == "cpu-smoke":
        return REPO_ROOT / "bench" / "results" / "tmp" / "cpu-smoke"
    return REPO_ROOT / "bench" / "results" / _dt.date.today().isoformat()


def output_stem(stem: str, mode: str) -> str:
    """File names carry the mode unless it is a real GPU sweep, so smoke output is never mistaken for it."""
    return stem if mode in ("gpu", "gpu-quick") else f"{stem}.{mode}"


def run_cli(benchmarks: Sequence[Benchmark], argv: Sequence[str] | None, *, stem: str, title: str,
            description: str) -> dict[str, Any]:
    """Parse the common flags, run `benchmarks` in order, write JSON/markdown/PNG; return the payload."""
    args = arg_parser(description).parse_args(argv)
    cfg = configure(args)
    out_dir = args.out or default_out_dir(cfg.mode)
    name = output_stem(stem, cfg.mode)
    rows: list[dict[str, Any]] = []
    data = payload(cfg, rows, title)
    n = len(benchmarks)
    for i, bench in enumerate(benchmarks):
        if cfg.deadline is not None:
            # Each benchmark gets an equal share of what is left for its compiling providers (torch.compile,
            # flex: seconds per shape); once it is spent they are skipped, while our kernel, the reference
            # and the libraries (a fraction of a second per row) go on until the run's deadline.
            cfg.soft_deadline = time.monotonic() + max(cfg.deadline - time.monotonic(), 0.0) / (n - i)
        t0 = time.monotonic()
        rows.extend(run_benchmark(bench, cfg))
        print(f"[bench] {bench.kernel}: {time.monotonic() - t0:.1f} s", flush=True)
        write_json(out_dir / f"{name}.json", data)  # after every kernel, so a killed run keeps what it did
        write_markdown(out_dir / f"{name}.md", data)
    paths = write_outputs(out_dir, name, data, plot=not args.no_plot)
    print("[bench] wrote " + ", ".join(str(p) for p in paths), flush=True)
    if cfg.mode == "cpu-smoke":
        print("[bench] " + CPU_SMOKE_BANNER, flush=True)
    data["paths"] = [str(p) for p in paths]
    return data


# ----------------------------------------------------------------------------------------------------------
# Helpers for benchmark scripts
# ----------------------------------------------------------------------------------------------------------

def randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """Random normal values (never zeros: they hide unwritten outputs and can run faster than real data).

    Drawn directly in `dtype` (no fp32 temporary: attention caches reach gigabytes)."""
    t = torch.randn(tuple(shape), dtype=dtype, device=device)
    if scale != 1.0:
        t.mul_(scale)
    return t


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def size_set(size: str, full: Sequence, quick: Sequence, tiny: Sequence) -> Sequence:
    """Pick the sweep values of a size set ("full" | "quick" | "tiny")."""
    try:
        return {"full": full, "quick": quick, "tiny": tiny}[size]
    except KeyError:
        raise ValueError(f"size: expected 'full', 'quick' or 'tiny', got {size!r}") from None


def row_sweep(size: str) -> list[tuple[Any, int]]:
    """(model, rows) of the row-wise kernels' cases (RMSNorm, SiLU-and-mul): rows are tokens, decode batches
    then prefill chunks, at each model of the size set (`bench.shapes.ModelShape`)."""
    from bench import shapes as S

    models = size_set(size, S.MODELS, S.QUICK_ROW_MODELS, (S.TINY,))
    rows_list = size_set(size, S.DECODE_BATCHES + S.PREFILL_TOKENS, S.QUICK_DECODE_BATCHES + S.QUICK_PREFILL_TOKENS,
                         S.TINY_BATCHES + S.TINY_TOKENS)
    return [(m, rows) for m in models for rows in rows_list]


def paged_block_tables(seq_lens: Sequence[int], block_size: int, device: torch.device,
                       spare_blocks: int = 0) -> tuple[torch.Tensor, int]:
    """Block tables `[batch, max_blocks]` (int32) giving each sequence its own blocks of one shuffled pool, as a
    block manager does after some churn; returns (tables, num_blocks in the pool). Unused entries are -1."""
    need = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    pool = torch.randperm(max(num_blocks, 1), device="cpu")
    width = max(max(need, default=0), 1)
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    start = 0
    for s, n in enumerate(need):
        tables[s, :n] = pool[start:start + n].to(torch.int32)
        start += n
    return tables.to(device), max(num_blocks, 1)


def slots_of(block_tables: torch.Tensor, seq: int, positions: Sequence[int] | range, block_size: int) -> list[int]:
    """The cache slots of `positions` of sequence `seq` (kv_cache_layout: table[pos // bs] * bs + pos % bs)."""
    row = block_tables[seq].tolist()
    return [row[p // block_size] * block_size + p % block_size for p in positions]
