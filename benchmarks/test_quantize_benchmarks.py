"""Time and peak memory of every implementation on the shared settings (benchmarks/shapes.py):
lookup, forward, forward+backward. `pytest benchmarks/ --benchmark-only` ends with a compact summary;
add `--benchmark-json=run.json`, then `python -m benchmarks.report run.json` for tables and plots.

The default set is representative and takes about 5 minutes on 2 CPU cores: the core target and the
paper's settings at small batch, every gsq_kernels backend in every mode (both lookup modes where
gsq_kernels has them), the reference in its default lookup, and each peer in the modes that compare
(torch.compile of the reference, at the core target, and vector-quantize-pytorch: forward+backward;
FAISS: lookup). `--gsq-full` adds the V and d sweeps, every mode of
the compiled reference and the reference's second lookup mode (about 15 minutes). On a GPU the
reference runs both lookup modes in the default set too (it costs milliseconds there).

Each case first runs once in a separate process (benchmarks/probe.py) for its peak memory; a case
that runs out of memory there is recorded as such and not timed. Timing runs in this process with
a fixed number of rounds chosen from the first call's duration (about 1 s per case, at least 3 rounds;
2 for a call over 2 s).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import pytest

from . import shapes
from .conftest import devices, record_not_run, record_timed
from .implementations import MODES, label, lookup_modes, make_case, supports

SECONDS_PER_CASE = 1.0
SLOW_CASE_S = 2.0
PEER_MODES = {"vqtorch": ("forward", "forward_backward"), "faiss": ("lookup",)}
# Slow peers time only forward+backward by default (the rest of their modes need --gsq-full).
DEFAULT_MODES = {"reference-compiled": ("forward_backward",), "vqtorch": ("forward_backward",)}


def _variants(implementations, modes, device: str, full: bool):
    """(implementation, mode, lookup) to time for one setting."""
    for impl in implementations:
        for mode in modes:
            if mode not in PEER_MODES.get(impl, MODES) or (not full and mode not in DEFAULT_MODES.get(impl, MODES)):
                continue
            lookups = lookup_modes(impl, mode)
            if impl.startswith("reference") and not full and device == "cpu":
                lookups = lookups[:1]  # the default lookup: a second one costs minutes on a CPU
            for lookup in lookups:
                yield impl, mode, lookup


def _cases(quick: bool, full: bool):
    cases = []
    for device in devices():
        fused = ["cpu"] if device == "cpu" else ["cuda", "triton"]
        if quick:
            small = shapes.Setting("quick", 2, 64, 8, 8, 16, 1024)
            cases += [
                (small, i, m, device, lk)
                for i, m, lk in _variants(["reference", *fused, "faiss"], ("lookup", "forward_backward"), device, True)
            ]
            continue
        for setting in shapes.core_settings(device):
            impls = ["reference", "reference-compiled", *fused, "vqtorch", "faiss"]
            cases += [(setting, i, m, device, lk) for i, m, lk in _variants(impls, MODES, device, full)]
        for setting in shapes.paper_settings(device):
            impls = ["reference", *fused, "vqtorch", "faiss"]
            cases += [(setting, i, m, device, lk) for i, m, lk in _variants(impls, MODES, device, full)]
        if full:
            for setting in shapes.v_sweep(device) + shapes.d_sweep(device):
                impls = ["reference", *fused, "faiss"]
                cases += [
                    (setting, i, m, device, lk)
                    for i, m, lk in _variants(impls, ("lookup", "forward_backward"), device, full)
                ]
    return cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        config = metafunc.config
        cases = _cases(config.getoption("--gsq-quick"), config.getoption("--gsq-full"))
        metafunc.parametrize("case", cases, ids=[f"{s.name}-{label(i, lk)}-{m}-{d}" for s, i, m, d, lk in cases])


def test_quantize(benchmark, case, memory_probe, matmul_rates):
    setting, implementation, mode, device, lookup = case
    benchmark.group = f"{device} {setting.label()} {mode}"
    entry = {
        "setting": asdict(setting),
        "implementation": implementation,
        "lookup": lookup,
        "mode": mode,
        "device": device,
    }
    reason = supports(implementation, mode, device)
    if reason is not None:
        record_not_run({**entry, "status": "unsupported", "reason": reason})
        pytest.skip(reason)

    probe = memory_probe(implementation, mode, setting, device, lookup)
    if probe["status"] != "ok":
        record_not_run({**entry, "status": probe["status"], "reason": probe.get("error", "")})
        pytest.skip(f"{probe['status']}: {probe.get('error', '')}"[:300])

    fn = make_case(implementation, mode, setting, device, lookup=lookup)
    start = time.perf_counter()
    fn()  # warm-up: compilation, autotuning, first-touch allocation
    first = time.perf_counter() - start
    # Cases over SLOW_CASE_S (the reference at the core target, vector-quantize-pytorch at V=256k)
    # vary little between calls: two rounds keep the default run near 5 minutes.
    rounds = 2 if first > SLOW_CASE_S else int(max(3, min(50, SECONDS_PER_CASE / max(first, 1e-4))))
    info = dict(
        entry,
        setting_label=setting.label(),
        rows=setting.rows,
        code_dim=setting.code_dim,
        codebook_size=setting.codebook_size,
        lookup_flops=setting.lookup_flops,
        peak_extra_bytes=probe["peak_extra_bytes"],
        matmul_gflops=matmul_rates[device]["matmul_gflops"],
    )
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if first < 0.5 else 0)
    if benchmark.stats is not None:  # None under --benchmark-disable
        record_timed({**info, "status": "ok", "median_s": benchmark.stats.stats.median})
