"""Fixtures for the benchmark suite: the device list, the machine's matmul rate, peak-memory probes
in separate processes, and the record of cases that did not run (out of memory, missing peer),
which is written into the pytest-benchmark JSON under "gsq_not_run" for the report."""

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
MACHINE: dict = {}


def pytest_addoption(parser):
    parser.addoption("--gsq-quick", action="store_true", default=False,
                     help="benchmark a few small cases only (to check the suite itself)")
    parser.addoption("--gsq-memory-budget-gib", type=float, default=None,
                     help="address space a CPU case may add before it counts as out of memory")


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
    """probe(implementation, mode, setting, device) -> dict: CPU cases in a child forked by one probe
    server (a fresh Python that has only imported torch), CUDA cases in a fresh Python process."""
    budget = _budget_bytes(request.config)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = None  # `python -m benchmarks.probe --serve`: forks one child per CPU case

    def probe(implementation, mode, setting, device):
        nonlocal server
        spec = {"implementation": implementation, "mode": mode, "setting": asdict(setting), "device": device,
                "budget_bytes": budget,
                "warmup": implementation in ("reference-compiled", "triton") or device == "cuda"}
        if device == "cpu":
            if server is None or server.poll() is not None:
                server = subprocess.Popen([sys.executable, "-m", "benchmarks.probe", "--serve"], cwd=ROOT, env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            server.stdin.write(json.dumps(spec) + "\n")
            server.stdin.flush()
            line = server.stdout.readline()
            if line.startswith("{"):
                return json.loads(line)
            return {"status": "error", "error": "the probe server died"}
        done = subprocess.run([sys.executable, "-m", "benchmarks.probe", json.dumps(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1800)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            killed = done.returncode in (-9, 137)
            return {"status": "oom" if killed else "error",
                    "error": "killed (out of memory)" if killed else done.stderr[-500:]}
        return json.loads(lines[-1])

    yield probe
    if server is not None and server.poll() is None:
        server.stdin.close()
        server.wait(timeout=60)


def record_not_run(entry: dict) -> None:
    NOT_RUN.append(entry)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gsq"] = MACHINE


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["gsq_not_run"] = NOT_RUN
    output_json["gsq_machine"] = MACHINE
