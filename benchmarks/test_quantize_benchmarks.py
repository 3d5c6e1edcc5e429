"""Time and peak memory of every implementation on the shared settings (benchmarks/shapes.py):
lookup, forward, forward+backward. `pytest benchmarks/ --benchmark-only --benchmark-json=run.json`,
then `python -m benchmarks.report run.json`.

Each case first runs once in a separate process (benchmarks/probe.py) for its peak memory; a case
that runs out of memory there is recorded as such and not timed. Timing runs in this process with
a fixed number of rounds chosen from the first call's duration (about 3 s per case, at least 3 rounds).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import pytest

from . import shapes
from .conftest import devices, record_not_run
from .implementations import make_case, supports

SECONDS_PER_CASE = 3.0


def _cases(quick: bool):
    cases = []
    for device in devices():
        fused = ["cpu"] if device == "cpu" else ["cuda", "triton"]
        if quick:
            small = shapes.Setting("quick", 2, 64, 8, 8, 16, 1024)
            cases += [(small, impl, mode, device) for impl in ["reference", *fused, "faiss"]
                      for mode in ("lookup", "forward_backward")]
            continue
        for setting in shapes.core_settings(device):
            for impl in ["reference", "reference-compiled", *fused, "vqtorch", "faiss"]:
                cases += [(setting, impl, mode, device) for mode in shapes_modes()]
        for setting in shapes.paper_settings(device):
            for impl in ["reference", *fused, "vqtorch", "faiss"]:
                cases += [(setting, impl, mode, device) for mode in shapes_modes()]
        for setting in shapes.v_sweep(device) + shapes.d_sweep(device):
            for impl in ["reference", *fused, "faiss"]:
                cases += [(setting, impl, mode, device) for mode in ("lookup", "forward_backward")]
    return cases


def shapes_modes():
    return ("lookup", "forward", "forward_backward")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config.getoption("--gsq-quick"))
        metafunc.parametrize("case", cases, ids=[f"{s.name}-{i}-{m}-{d}" for s, i, m, d in cases])


def test_quantize(benchmark, case, memory_probe, matmul_rates):
    setting, implementation, mode, device = case
    benchmark.group = f"{device} {setting.label()} {mode}"
    entry = {"setting": asdict(setting), "implementation": implementation, "mode": mode, "device": device}
    reason = supports(implementation, mode, device)
    if reason is not None:
        record_not_run({**entry, "status": "unsupported", "reason": reason})
        pytest.skip(reason)

    probe = memory_probe(implementation, mode, setting, device)
    if probe["status"] != "ok":
        record_not_run({**entry, "status": probe["status"], "reason": probe.get("error", "")})
        pytest.skip(f"{probe['status']}: {probe.get('error', '')}"[:300])

    fn = make_case(implementation, mode, setting, device)
    start = time.perf_counter()
    fn()  # warm-up: compilation, autotuning, first-touch allocation
    first = time.perf_counter() - start
    rounds = int(max(3, min(50, SECONDS_PER_CASE / max(first, 1e-4))))
    benchmark.extra_info.update(
        entry,
        setting_label=setting.label(),
        rows=setting.rows,
        code_dim=setting.code_dim,
        codebook_size=setting.codebook_size,
        lookup_flops=setting.lookup_flops,
        peak_extra_bytes=probe["peak_extra_bytes"],
        matmul_gflops=matmul_rates[device]["matmul_gflops"],
    )
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if first < 1 else 0)
