"""Fixtures and options of the benchmark suite: the device list, the machine's matmul rate, peak-memory
probes in separate processes, the record of every case (timed, out of memory, unsupported), which
goes into the pytest-benchmark JSON ("gsq_not_run", "gsq_machine") for the report, and the compact
summary printed at the end of the run (100 columns: per setting and mode, time, speed-up over the
reference and over each peer, peak memory).

pytest-benchmark's own tables (one per group, about 220 columns wide, ratios against the fastest
case) are switched off unless --gsq-tables is given; garbage collection is off while timing
(--benchmark-disable-gc) unless --gsq-keep-gc is given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from . import machine

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN: list[dict] = []
TIMED: list[dict] = []
MACHINE: dict = {}


def pytest_addoption(parser):
    group = parser.getgroup("gsq", "gsq_kernels benchmarks")
    group.addoption(
        "--gsq-quick",
        action="store_true",
        default=False,
        help="benchmark a few small cases only (to check the suite itself)",
    )
    group.addoption(
        "--gsq-full",
        action="store_true",
        default=False,
        help="also the sweeps of V and d, every mode of every peer and both lookup modes of the "
        "reference (about 15 min on 2 CPU cores; the default set takes about 5)",
    )
    group.addoption(
        "--gsq-tables",
        action="store_true",
        default=False,
        help="also print pytest-benchmark's own tables (wide; ratios against the fastest case)",
    )
    group.addoption(
        "--gsq-keep-gc", action="store_true", default=False, help="leave Python's garbage collector on while timing"
    )
    group.addoption(
        "--gsq-memory-budget-gib",
        type=float,
        default=None,
        help="address space a CPU case may add before it counts as out of memory",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before pytest-benchmark's own pytest_configure reads these options into its session.
    if not config.getoption("--gsq-tables", default=False):
        config.option.benchmark_quiet = True
    if not config.getoption("--gsq-keep-gc", default=False):
        config.option.benchmark_disable_gc = True


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def matmul_rates() -> dict:
    if not MACHINE:
        for device in devices():
            MACHINE[device] = {**machine.describe(device), "matmul_gflops": machine.matmul_gflops(device)}
    return MACHINE


def _budget_bytes(config) -> int:
    option = config.getoption("--gsq-memory-budget-gib")
    if option is not None:
        return int(option * 2**30)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(16 * 2**30, 0.6 * total - 2**30))


@pytest.fixture(scope="session")
def memory_probe(request):
    """probe(implementation, mode, setting, device, lookup) -> dict: CPU cases in a child forked by
    one probe server (a fresh Python that has only imported torch), CUDA cases in a fresh Python process."""
    budget = _budget_bytes(request.config)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = None  # `python -m benchmarks.probe --serve`: forks one child per CPU case

    def probe(implementation, mode, setting, device, lookup=None):
        nonlocal server
        spec = {
            "implementation": implementation,
            "mode": mode,
            "setting": asdict(setting),
            "device": device,
            "lookup": lookup,
            "budget_bytes": budget,
            "warmup": implementation in ("reference-compiled", "triton") or device == "cuda",
        }
        if device == "cpu":
            if server is None or server.poll() is not None:
                server = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.probe", "--serve"],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            server.stdin.write(json.dumps(spec) + "\n")
            server.stdin.flush()
            line = server.stdout.readline()
            if line.startswith("{"):
                return json.loads(line)
            return {"status": "error", "error": "the probe server died"}
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.probe", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            killed = done.returncode in (-9, 137)
            return {
                "status": "oom" if killed else "error",
                "error": "killed (out of memory)" if killed else done.stderr[-500:],
            }
        return json.loads(lines[-1])

    yield probe
    if server is not None and server.poll() is None:
        server.stdin.close()
        server.wait(timeout=60)


def record_not_run(entry: dict) -> None:
    NOT_RUN.append(entry)


def record_timed(entry: dict) -> None:
    TIMED.append(entry)


def _default_lookup() -> str | None:
    from .implementations import default_lookup

    return default_lookup()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gsq"] = MACHINE


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["gsq_not_run"] = NOT_RUN
    output_json["gsq_machine"] = MACHINE
    output_json["gsq_default_lookup"] = _default_lookup()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    """The compact summary, after pytest-benchmark's tables when those are shown."""
    if not TIMED and not NOT_RUN:
        return
    from .report import compact_summary

    run = {"rows": TIMED + NOT_RUN, "machine": MACHINE, "default_lookup": _default_lookup()}
    terminalreporter.write_line("")
    terminalreporter.write_line("=" * 36 + " gsq benchmark summary " + "=" * 37)
    for line in compact_summary(run).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line("Tables and plots: pytest benchmarks/ --benchmark-only --benchmark-json=run.json, then")
    terminalreporter.write_line("python -m benchmarks.report run.json (--update-docs rewrites docs/ and README.md)")
