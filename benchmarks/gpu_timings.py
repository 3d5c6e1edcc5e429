"""The timing step of the GPU check (benchmarks/gpu_check.py).

Each case: one call to compile and autotune, one more to estimate its duration, then 3-10 calls
each between two CUDA events (the median is reported; a call over 1 s is timed once), then one call between
torch.cuda.reset_peak_memory_stats() and torch.cuda.max_memory_allocated() for its peak extra
memory. Out of memory is a result ("oom"), as is any other error ("error"); the next case still
runs. Cases: reference, cuda and triton in lookup, forward and forward+backward at the core target
and at F16-D16-G8-V256k batch 64 (benchmarks/shapes.py), in every lookup mode gsq_kernels offers;
then the codebook gradient when the rows crowd onto few codes (the collapsed-codebook backward):
rows drawn near random codes (uniform), near codes drawn from a Zipf law, and all near code 0.

On a CPU (the check's --dry-run) the same code runs on tiny latents: perf_counter instead of CUDA
events, the resident set instead of max_memory_allocated, and the cpu backend standing in for the
fused GPU backends.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import shapes
from .implementations import MODES, gsq_case, lookup_modes, make_case, supports
from .probe import _is_out_of_memory, _reset_peak_rss, _status_kb

DISTRIBUTIONS = ("uniform", "zipf", "code0")
ZIPF_EXPONENT = 1.1
NEAR_CODE_NOISE = 1e-3  # far below the spacing of the codes, so each row keeps the code it was drawn near


def fused_backends(device: str) -> list[str]:
    return ["cuda", "triton"] if device == "cuda" else ["cpu"]


def settings(device: str) -> list[shapes.Setting]:
    """The core target and F16-D16-G8-V256k at batch 64 on a GPU; tiny stand-ins of both on a CPU."""
    paper = next(s for s in shapes.paper_settings("cuda") if s.name == "F16-D16-G8-V256k")
    if device == "cuda":
        return [shapes.CORE_TARGET, paper]
    return [
        replace(shapes.CORE_TARGET, batch=1, height=4, width=4, codebook_size=256),
        replace(paper, batch=1, height=4, width=4, codebook_size=512),
    ]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _one_call(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# Seconds of timed calls aimed at per case, and the most calls timed; the dry run times 3 calls.
TIMING = {"budget_s": 1.0, "max_repeats": 10}
SLOW_CALL_S = 1.0


def timed_calls(fn: Callable[[], object], device: str) -> list[float]:
    """Seconds per call after two warm-up calls: CUDA events on a GPU, perf_counter on a CPU. A call
    slower than SLOW_CALL_S after its warm-up is timed once: its launch overheads do not matter."""
    budget_s, max_repeats = TIMING["budget_s"], TIMING["max_repeats"]
    fn()  # compilation, autotuning, first-touch allocation
    estimate = _one_call(fn, device)
    if estimate > SLOW_CALL_S:
        return [estimate]
    repeats = int(max(3, min(max_repeats, budget_s / max(estimate, 1e-6))))
    if device != "cuda":
        return [_one_call(fn, device) for _ in range(repeats)]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Memory one call adds at its peak: max_memory_allocated on a GPU, the resident set on a CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _status_kb("VmRSS") * 1024
    if not _reset_peak_rss():
        return None
    fn()
    return max(0, _status_kb("VmHWM") * 1024 - before)


def measure(entry: dict, build: Callable[[], Callable[[], object]], device: str) -> dict:
    """Times and measures the call `build()` returns; out of memory and errors become results."""
    fn = None
    try:
        fn = build()
        times = timed_calls(fn, device)
        peak = peak_extra_bytes(fn, device)
        return {
            **entry,
            "status": "ok",
            "median_s": statistics.median(times),
            "times_s": times,
            "peak_extra_bytes": peak,
        }
    except Exception as error:  # every failure is a result of the case
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        status = "oom" if isinstance(error, torch.OutOfMemoryError) or _is_out_of_memory(error) else "error"
        return {**entry, "status": status, "reason": f"{type(error).__name__}: {first_line}"}
    finally:
        del fn
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def case_row(
    implementation: str,
    mode: str,
    setting: shapes.Setting,
    device: str,
    lookup: str | None,
    matmul_gflops: float | None,
) -> dict:
    entry = {
        "setting": asdict(setting),
        "implementation": implementation,
        "lookup": lookup,
        "mode": mode,
        "device": device,
        "lookup_flops": setting.lookup_flops,
        "matmul_gflops": matmul_gflops,
    }
    reason = supports(implementation, mode, device)
    if reason is not None:
        return {**entry, "status": "unsupported", "reason": reason}
    return measure(
        entry, lambda: make_case(implementation, mode, setting, device, lookup=lookup, synchronize=False), device
    )


def crowded_latent(
    setting: shapes.Setting, codebook: torch.Tensor, distribution: str, generator: torch.Generator
) -> torch.Tensor:
    """A latent of `setting` whose group vectors lie near codes drawn from `distribution`:
    "uniform" (any code alike), "zipf" (code of rank k with probability ~ k^-1.1, ranks shuffled
    over the codebook) or "code0" (every row on code 0: a fully collapsed codebook)."""
    rows, num_codes = setting.rows, setting.codebook_size
    if distribution == "uniform":
        picked = torch.randint(num_codes, (rows,), generator=generator)
    elif distribution == "zipf":
        weights = torch.arange(1, num_codes + 1, dtype=torch.float64) ** -ZIPF_EXPONENT
        ranks = torch.multinomial(weights, rows, replacement=True, generator=generator)
        picked = torch.randperm(num_codes, generator=generator)[ranks]
    elif distribution == "code0":
        picked = torch.zeros(rows, dtype=torch.long)
    else:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    vectors = codebook.cpu()[picked] + NEAR_CODE_NOISE * torch.randn(rows, setting.code_dim, generator=generator)
    channels_last = vectors.reshape(setting.batch, setting.height, setting.width, setting.channels)
    return channels_last.permute(0, 3, 1, 2).contiguous()


def crowded_case(implementation: str, mode: str, setting: shapes.Setting, distribution: str, device: str):
    """(call, rows on the most used code): mode "backward" times the backward alone (the graph is
    kept between calls), "forward_backward" the whole step."""
    from gsq_kernels import grouped_spherical_quantize, spherical_init

    generator = torch.Generator().manual_seed(0)
    codebook = spherical_init(setting.codebook_size, setting.code_dim, generator=generator)
    z = crowded_latent(setting, codebook, distribution, generator).to(device)
    codebook = codebook.to(device)
    if mode == "forward_backward":
        with torch.no_grad():
            indices = grouped_spherical_quantize(
                z, codebook, setting.groups, backend=implementation, check_finite=False
            ).indices
        fn = gsq_case(implementation, mode, z, codebook, setting.groups, synchronize=False)
        return fn, int(torch.bincount(indices.flatten()).max())
    z.requires_grad_()
    codebook.requires_grad_()
    out = grouped_spherical_quantize(z, codebook, setting.groups, backend=implementation, check_finite=False)
    total = out.quantized.float().sum() + out.loss

    def backward():
        return torch.autograd.grad(total, (z, codebook), retain_graph=True)

    return backward, int(torch.bincount(out.indices.detach().flatten()).max())


def crowded_row(implementation: str, mode: str, setting: shapes.Setting, distribution: str, device: str) -> dict:
    named = {**asdict(setting), "name": f"{setting.name}-{distribution}", "distribution": distribution}
    entry = {
        "setting": named,
        "implementation": implementation,
        "lookup": None,
        "mode": mode,
        "device": device,
        "lookup_flops": None,
    }
    reason = supports(implementation, "forward_backward", device)
    if reason is not None:
        return {**entry, "status": "unsupported", "reason": reason}
    most = {}

    def build():
        fn, most["rows"] = crowded_case(implementation, mode, setting, distribution, device)
        return fn

    row = measure(entry, build, device)
    return {**row, "rows_on_busiest_code": most.get("rows")}


def all_cases(device: str) -> list[tuple]:
    """("case", implementation, mode, setting, lookup) and ("crowded", implementation, mode, setting,
    distribution), in the order they run."""
    implementations = ["reference", *fused_backends(device)]
    cases = [
        ("case", impl, mode, setting, lookup)
        for setting in settings(device)
        for impl in implementations
        for mode in MODES
        for lookup in lookup_modes(impl, mode)
    ]
    core = settings(device)[0]
    return cases + [
        ("crowded", impl, mode, core, distribution)
        for distribution in DISTRIBUTIONS
        for impl in implementations
        for mode in ("backward", "forward_backward")
    ]


def run(out: Path, device: str, matmul_gflops: float | None, quick: bool = False) -> int:
    """Runs every case, appending one JSON line per result to `out` as it finishes (a step stopped
    at its time budget keeps what it measured). quick: 3 timed calls per case. Returns the number
    of cases."""
    from .implementations import default_lookup

    if quick:
        TIMING.update(budget_s=0.0, max_repeats=3)
    cases = all_cases(device)
    plan = out.with_name(out.stem + "-plan.json")  # what the rows mean, for a reader without gsq_kernels
    plan.write_text(json.dumps({"cases": len(cases), "default_lookup": default_lookup()}))
    with open(out, "a") as f:
        for kind, impl, mode, setting, extra in cases:
            if kind == "case":
                row = case_row(impl, mode, setting, device, extra, matmul_gflops)
            else:
                row = crowded_row(impl, mode, setting, extra, device)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(
                f"timings: {row['setting']['name']} {impl} {mode} {extra or ''}: {row['status']} "
                f"{row.get('median_s', row.get('reason', ''))}",
                flush=True,
            )
    return len(cases)
