"""The GPU check: one command that runs on one GPU (an H100 or H200) in under 8 minutes and leaves in
one folder everything needed to judge the kernels, with a one-line verdict per check.

    python -m benchmarks.gpu_check --setup --out DIR [--archive FILE.tar.gz]   # on the GPU machine
    python -m benchmarks.gpu_check --dry-run --out DIR                         # anywhere, CPU only, < 1 min

No network is needed. --setup builds gsq_kernels._C for the torch found there
(`pip install --no-build-isolation --no-deps --no-index -e .`, MAX_JOBS = all cores, about 1-2
minutes) when the extension is missing or was built for another torch; without it such a machine
gets a failing "setup" verdict and the other steps run without the compiled kernels.

Steps, each with a time budget (a step that overruns it is stopped, and says so), each in its own
process so that a crash or a poisoned CUDA context stops nothing else; the whole check stops
starting steps when --budget-s is spent and always writes its results:

  setup              the compiled extension loads for this torch (built first with --setup)
  machine            GPU, SMs, clocks, versions; fp32 matmul rate (TF32 off); fp32 FMA peak
  timings            CUDA-event medians and peak memory of reference / cuda / triton: lookup, forward,
                     forward+backward at the core target and at F16-D16-G8-V256k batch 64, in each
                     lookup mode; the collapsed-codebook backward (uniform, Zipf, all rows on code 0)
  goal-*             the targets: fused fwd+bwd >= 20x the reference at the core target, O(N) memory at
                     F16-D16-G8-V256k batch 64, >= 50% of the fp32 FMA peak, a collapsed codebook
                     backward within 3x of the uniform one
  training           a few F16-D16-G8-V256k training steps in bf16 autocast with the DINO discriminator
                     (random local weights): quantizer_backend reference vs auto; step time, peak memory,
                     the quantizer's share of the step
  then, side by side (correctness only, nothing timed):
  tests-backends     pytest tests/test_cuda_backend.py tests/test_triton_backend.py
  tests-parity       pytest tests/test_quantize_parity.py -k cuda (the parity suite on the cuda device)
  tests-marked       pytest -m gpu on any other test file that marks tests gpu
  sanitizer-sweep    benchmarks/sanitizer_sweep.py on its own, and the same sweep under compute-sanitizer:
  sanitizer-memcheck, -racecheck, -initcheck, -synccheck (our kernels and the cub sort they launch)

DIR then holds summary.md (the verdicts, the compact timing table, the training table), results.json
(machine-readable: `python -m benchmarks.report DIR/results.json [--update-docs]` turns it into the
GPU table and plots of docs/benchmarks.md), report/ (that Markdown and its plots, already rendered),
junit-*.xml, and one log per step.

--dry-run runs every step that needs no GPU on the CPU, with tiny sizes: the machine description,
the timing and training code on CPU tensors (the cpu backend standing in for the GPU ones, one
thread), the pytest steps as --collect-only, the sanitizer sweep without compute-sanitizer, and the
report; tests/test_gpu_check_dry_run.py runs it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "gsq-gpu-check"
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
# Step budgets in seconds. The timed steps run first and alone, then the correctness lanes (LANES) side
# by side. The lanes' budgets leave room for Triton's first compiles (seen on an H200: the backend
# tests and the sanitizer runs overran 75 s and 25-45 s once Triton compiled every variant). Worst
# case without --setup: 25 + 110 + 90 + the longest lane (165) + the report, under 7 minutes; a build
# (--setup) adds up to 150 s, and --budget-s then cuts the lanes short rather than overrun 8 minutes.
BUDGETS = {
    "setup": 150,
    "machine": 25,
    "timings": 110,
    "training": 90,
    "tests-backends": 150,
    "tests-parity": 120,
    "tests-marked": 40,
    "sanitizer-sweep": 45,
    "sanitizer-memcheck": 60,
    "sanitizer-racecheck": 70,
    "sanitizer-initcheck": 60,
    "sanitizer-synccheck": 50,
}
TEST_STEPS = {
    "tests-backends": (["tests/test_cuda_backend.py", "tests/test_triton_backend.py"], []),
    "tests-parity": (["tests/test_quantize_parity.py"], ["-k", "cuda"]),
}
GOAL_SPEEDUP, GOAL_FMA_FRACTION, GOAL_BYTES_PER_ROW, GOAL_CROWDED_SLOWDOWN = 20.0, 0.5, 256, 3.0
KILL_GRACE_S = 10


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL, ERROR, TIMEOUT, SKIP or INFO (a measurement with no target)
    verdict: str
    seconds: float = 0.0
    budget_s: float = 0.0


@dataclass
class Context:
    out: Path
    dry_run: bool
    setup: bool
    deadline: float  # time.monotonic() after which no step starts (the report still runs)
    train_batch: int
    budget_s: float
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def wanted(self, name: str) -> bool:
        matches = lambda names: any(name == n or name.startswith(n + "-") for n in names)  # noqa: E731
        return not matches(self.skip) and (not self.only or matches(self.only))

    def time_left(self, name: str) -> float:
        # A dry run checks code paths on whatever CPU runs CI, loaded or not: its steps get slack.
        budget = BUDGETS.get(name, 60) * (4 if self.dry_run else 1)
        return max(0.0, min(budget, self.deadline - time.monotonic()))


# ------------------------------------------------------------------------------------------------
# Running things


def run_command(cmd: list[str], log: Path, timeout: float, env: dict) -> int | None:
    """Runs cmd with its output in `log`; None if it outran `timeout` (then SIGINT to its process
    group, so pytest still writes its report, and SIGKILL after a grace period)."""
    with open(log, "ab") as sink:
        sink.write(("$ " + " ".join(cmd) + "\n").encode())
        sink.flush()
        process = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, 30)):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            sink.write(f"\n[gpu_check: stopped after its budget of {timeout:.0f} s]\n".encode())
            return None


def tail(path: Path, lines: int = 3) -> str:
    if not path.is_file():
        return ""
    text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])[-400:]


def run_step(ctx: Context, name: str, step) -> list[Check]:
    """Runs one step within its budget; any exception becomes an ERROR verdict."""
    if not ctx.wanted(name):
        return [Check(name, "SKIP", "not selected (--skip / --only)")]
    budget = ctx.time_left(name)
    if budget < 5:
        return [Check(name, "SKIP", "not run: the check's time budget (--budget-s) is spent")]
    started = time.monotonic()
    try:
        checks = step(ctx, name, budget)
    except Exception as error:  # the next step must still run
        checks = [Check(name, "ERROR", f"{type(error).__name__}: {str(error).strip()[:300]}")]
    checks = checks if isinstance(checks, list) else [checks]
    checks[0].seconds, checks[0].budget_s = time.monotonic() - started, budget
    for check in checks:
        print(verdict_line(check), flush=True)
    return checks


def verdict_line(check: Check) -> str:
    timing = f" [{check.seconds:.0f} s of {check.budget_s:.0f} s]" if check.budget_s else ""
    return f"{check.status:<7} {check.name:<20} {check.verdict}{timing}"


def worker_command(ctx: Context, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.gpu_check",
        "--worker",
        name,
        "--out",
        str(ctx.out),
        "--train-batch",
        str(ctx.train_batch),
    ] + (["--dry-run"] if ctx.dry_run else [])


def run_worker(ctx: Context, name: str, budget: float) -> int | None:
    """A Python step: in its own process on a GPU; in this one (one thread) in a dry run."""
    if not ctx.dry_run:
        return run_command(worker_command(ctx, name), ctx.out / f"{name}.log", budget, ctx.env)
    import torch

    if "GSQ_NO_COMPILE" in ctx.env:  # set by a failed setup step: never compile at import here either
        os.environ["GSQ_NO_COMPILE"] = ctx.env["GSQ_NO_COMPILE"]
    torch.set_num_threads(1)
    WORKERS[name](ctx)
    return 0


# ------------------------------------------------------------------------------------------------
# setup and machine

EXTENSION_PROBE = """
import json, torch, gsq_kernels
from gsq_kernels import _extension, dispatch
print(json.dumps({"torch": torch.__version__, "loaded": _extension.STATUS.loaded,
                  "with_cuda": _extension.STATUS.with_cuda, "origin": _extension.STATUS.origin,
                  "backends": {n: [b.available, b.status] for n, b in dispatch.BACKENDS.items()}}))
"""
BUILD = ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]


def extension_status(ctx: Context, timeout: float) -> dict | None:
    """What `import gsq_kernels` finds, asked in a fresh process that must not compile anything."""
    log = ctx.out / "setup.log"
    env = {**ctx.env, "GSQ_NO_COMPILE": "1"}
    with open(log, "a") as sink:
        done = subprocess.run(
            [sys.executable, "-c", EXTENSION_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        sink.write(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def step_setup(ctx: Context, name: str, budget: float) -> Check:
    started = time.monotonic()
    status = extension_status(ctx, min(budget, 60))
    if status is None:
        return Check(name, "ERROR", f"import gsq_kernels failed: {tail(ctx.out / 'setup.log')}")
    good = status["loaded"] and (status["with_cuda"] or ctx.dry_run)
    if good:
        return Check(
            name,
            "PASS",
            f"gsq_kernels._C loads ({status['origin']}, torch {status['torch']}, CUDA kernels: {status['with_cuda']})",
        )
    if not ctx.setup or ctx.dry_run:
        ctx.env["GSQ_NO_COMPILE"] = "1"  # no step may spend its budget compiling at import
        how = "dry run: not built" if ctx.dry_run else "rerun with --setup to build it"
        return Check(
            name, "FAIL", f"gsq_kernels._C unusable ({status['origin']}); {how} (`python {' '.join(BUILD[1:])}`)"
        )
    env = {**ctx.env, "MAX_JOBS": str(os.cpu_count() or 4), "GSQ_REQUIRE_CUDA": "1"}
    code = run_command([sys.executable, *BUILD], ctx.out / "setup.log", budget - (time.monotonic() - started), env)
    status = extension_status(ctx, 60) if code == 0 else None
    if status and status["loaded"] and status["with_cuda"]:
        return Check(
            name,
            "PASS",
            f"built gsq_kernels._C for torch {status['torch']} in {time.monotonic() - started:.0f} s (setup.log)",
        )
    ctx.env["GSQ_NO_COMPILE"] = "1"
    what = "timed out" if code is None else f"failed (exit {code})" if code else "built but does not load"
    return Check(name, "TIMEOUT" if code is None else "FAIL", f"the build {what}: {tail(ctx.out / 'setup.log')}")


def worker_machine(ctx: Context) -> None:
    import torch

    import gsq_kernels
    from gsq_kernels import dispatch

    from . import machine

    info = machine.describe(ctx.device)
    if ctx.device == "cuda":
        info.update(machine.gpu_details())
    info["matmul_gflops"] = machine.matmul_gflops(ctx.device, size=None if ctx.device == "cuda" else 256, repeats=3)
    info["backends"] = {n: [b.available, b.status] for n, b in dispatch.BACKENDS.items()}
    info["gsq_kernels"] = gsq_kernels.__version__
    info["cuda_available"] = torch.cuda.is_available()
    (ctx.out / "machine.json").write_text(json.dumps(info, indent=1))


def step_machine(ctx: Context, name: str, budget: float) -> Check:
    code = run_worker(ctx, name, budget)
    path = ctx.out / "machine.json"
    if code is None or not path.is_file():
        return Check(
            name, "TIMEOUT" if code is None else "ERROR", f"no machine description: {tail(ctx.out / 'machine.log')}"
        )
    info = json.loads(path.read_text())
    fused = [n for n, (ok, _) in info["backends"].items() if ok and n != "reference"]
    if "gpu" in info:
        text = (
            f"{info['gpu']}, {info['sm_count']} SMs, cc {info['compute_capability']}, torch {info['torch']}, "
            f"triton {info.get('triton')}, CUDA {info.get('cuda_runtime')}, driver {info.get('driver')}"
        )
    else:
        text = f"{info.get('cpu')}, {info.get('cores')} cores, torch {info['torch']}"
    text += f"; fp32 matmul {info['matmul_gflops']:.0f} GFLOP/s (TF32 off)"
    if info.get("fp32_peak_gflops"):
        text += (
            f" = {100 * info['matmul_gflops'] / info['fp32_peak_gflops']:.0f}% of the fp32 FMA peak "
            f"{info['fp32_peak_gflops']:.0f} GFLOP/s"
        )
    if ctx.dry_run:
        return Check(name, "INFO", text + f"; backends: {', '.join(fused) or 'none'}")
    missing = [f"{n}: {info['backends'][n][1]}" for n in ("cuda", "triton") if not info["backends"].get(n, [0])[0]]
    return Check(
        name,
        "FAIL" if missing else "PASS",
        text + (f"; unavailable: {'; '.join(missing)}" if missing else f"; backends: {', '.join(fused)}"),
    )


# ------------------------------------------------------------------------------------------------
# timings, goals, training


def worker_timings(ctx: Context) -> None:
    from . import gpu_timings

    machine = json.loads((ctx.out / "machine.json").read_text()) if (ctx.out / "machine.json").is_file() else {}
    gpu_timings.run(ctx.out / "timings.jsonl", ctx.device, machine.get("matmul_gflops"), quick=ctx.dry_run)


def timing_rows(ctx: Context) -> list[dict]:
    path = ctx.out / "timings.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def timing_plan(ctx: Context) -> dict:
    """The timing worker's plan (number of cases, default lookup): this process never imports
    gsq_kernels, which could start compiling it here, outside any budget."""
    path = ctx.out / "timings-plan.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def step_timings(ctx: Context, name: str, budget: float) -> list[Check]:
    for stale in ("timings.jsonl", "timings-plan.json"):
        (ctx.out / stale).unlink(missing_ok=True)
    code = run_worker(ctx, name, budget)
    rows = timing_rows(ctx)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "oom", "unsupported", "error")}
    text = f"{len(rows)} of {timing_plan(ctx).get('cases', '?')} cases: " + ", ".join(
        f"{n} {s}" for s, n in counts.items() if n
    )
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        first = errors[0]
        text += (
            f"; first error: {first['setting']['name']} {first['implementation']} {first['mode']}: {first['reason']}"
        )
    status = "TIMEOUT" if code is None else "ERROR" if code else "FAIL" if errors else "PASS"
    machine = json.loads((ctx.out / "machine.json").read_text()) if (ctx.out / "machine.json").is_file() else {}
    goals = goal_checks(rows, machine, ctx.device)
    if ctx.dry_run:
        goals = [Check(g.name, "INFO", f"{g.verdict} (dry run: CPU stand-ins, not the goal)") for g in goals]
    return [Check(name, status, text)] + goals


def _find(rows: list[dict], setting: str, implementation: str, mode: str, lookup="default") -> dict | None:
    for row in rows:
        if (
            (row["setting"]["name"], row["implementation"], row["mode"]) == (setting, implementation, mode)
            and (lookup == "default" or row.get("lookup") == lookup)
            and row["status"] != "unsupported"
        ):
            return row
    return None


def _seconds(row: dict | None) -> str:
    from .report import fmt_time

    return fmt_time(row["median_s"]) if row and row["status"] == "ok" else (row or {}).get("status", "missing")


def goal_checks(rows: list[dict], machine: dict, device: str) -> list[Check]:
    from .gpu_timings import fused_backends

    fused = fused_backends(device)
    checks = [goal_speedup(rows, fused), goal_memory(rows, fused), goal_fma(rows, fused, machine)]
    return checks + [goal_crowded(rows, fused)]


def goal_speedup(rows: list[dict], fused: list[str]) -> Check:
    parts, ok = [], True
    for impl in fused:
        row = _find(rows, "core-target", impl, "forward_backward")
        reference = _find(rows, "core-target", "reference", "forward_backward", row.get("lookup") if row else "default")
        if row and reference and row["status"] == reference["status"] == "ok":
            speedup = reference["median_s"] / row["median_s"]
            ok &= speedup >= GOAL_SPEEDUP
            parts.append(
                f"{impl} {speedup:.1f}x ({_seconds(row)} vs {_seconds(reference)}, lookup={row.get('lookup')})"
            )
        else:
            ok = False
            parts.append(f"{impl}: {_seconds(row)}, reference: {_seconds(reference)}")
    return Check(
        "goal-speedup",
        "PASS" if ok else "FAIL",
        f"core target fwd+bwd over the reference: {'; '.join(parts)} [goal >= {GOAL_SPEEDUP:.0f}x]",
    )


def goal_memory(rows: list[dict], fused: list[str]) -> Check:
    from .report import fmt_bytes

    parts, ok = [], True
    for impl in fused:
        row = _find(rows, "F16-D16-G8-V256k", impl, "forward_backward")
        if row and row["status"] == "ok" and row.get("peak_extra_bytes") is not None:
            s = row["setting"]
            per_row = row["peak_extra_bytes"] / (s["batch"] * s["height"] * s["width"] * s["groups"])
            ok &= per_row <= GOAL_BYTES_PER_ROW
            parts.append(f"{impl} {fmt_bytes(row['peak_extra_bytes'])} ({per_row:.0f} B per group vector)")
        else:
            ok = False
            parts.append(f"{impl}: {_seconds(row)}")
    reference = _find(rows, "F16-D16-G8-V256k", "reference", "forward_backward")
    ref_ok = reference and reference["status"] == "ok"
    ref_text = fmt_bytes(reference.get("peak_extra_bytes")) if ref_ok else _seconds(reference)
    return Check(
        "goal-memory",
        "PASS" if ok else "FAIL",
        f"F16-D16-G8-V256k fwd+bwd peak extra memory: {'; '.join(parts)}; reference: {ref_text} "
        f"[goal: O(N), <= {GOAL_BYTES_PER_ROW} B per group vector]",
    )


def goal_fma(rows: list[dict], fused: list[str], machine: dict) -> Check:
    peak = machine.get("fp32_peak_gflops") or machine.get("matmul_gflops")
    basis = "fp32 FMA peak" if machine.get("fp32_peak_gflops") else "measured fp32 matmul rate"
    best = None
    for row in rows:
        if (
            row["setting"]["name"] == "core-target"
            and row["implementation"] in fused
            and row["mode"] == "lookup"
            and row["status"] == "ok"
        ):
            rate = row["lookup_flops"] / row["median_s"] / 1e9
            if best is None or rate > best[0]:
                best = (rate, row)
    if best is None or not peak:
        return Check("goal-fma", "FAIL", f"no fused lookup timed at the core target (or no {basis})")
    rate, row = best
    fraction = rate / peak
    return Check(
        "goal-fma",
        "PASS" if fraction >= GOAL_FMA_FRACTION else "FAIL",
        f"best core-target lookup: {row['implementation']} lookup={row.get('lookup')} {rate:.0f} GFLOP/s = "
        f"{100 * fraction:.0f}% of the {basis} ({peak:.0f} GFLOP/s) [goal >= {100 * GOAL_FMA_FRACTION:.0f}%]",
    )


def goal_crowded(rows: list[dict], fused: list[str]) -> Check:
    parts, ok = [], True
    for impl in fused:
        uniform = _find(rows, "core-target-uniform", impl, "backward")
        cells = []
        for distribution in ("zipf", "code0"):
            row = _find(rows, f"core-target-{distribution}", impl, "backward")
            if row and uniform and row["status"] == uniform["status"] == "ok":
                slowdown = row["median_s"] / uniform["median_s"]
                ok &= slowdown <= GOAL_CROWDED_SLOWDOWN
                cells.append(f"{distribution} {_seconds(row)} ({slowdown:.1f}x)")
            else:
                ok = False
                cells.append(f"{distribution} {_seconds(row)}")
        parts.append(f"{impl}: uniform {_seconds(uniform)}, " + ", ".join(cells))
    reference = _find(rows, "core-target-code0", "reference", "backward")
    return Check(
        "goal-collapsed",
        "PASS" if ok else "FAIL",
        f"core-target backward alone, rows crowded onto few codes: {'; '.join(parts)}; reference code0 "
        f"{_seconds(reference)} [goal: <= {GOAL_CROWDED_SLOWDOWN:.0f}x the uniform backward]",
    )


def worker_training(ctx: Context) -> None:
    from . import gpu_training

    work = Path(tempfile.mkdtemp(prefix="gsq-gpu-check-train-"))  # images, weights, checkpoints: not in DIR
    try:
        steps = {"warmup": 1, "timed": 1} if ctx.dry_run else {"warmup": 3, "timed": 4}
        rows = gpu_training.run(work, ctx.device, min(ctx.train_batch, 2) if ctx.dry_run else ctx.train_batch, **steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (ctx.out / "training.json").write_text(json.dumps(rows, indent=1))


def step_training(ctx: Context, name: str, budget: float) -> Check:
    from .report import fmt_bytes, fmt_time

    (ctx.out / "training.json").unlink(missing_ok=True)
    code = run_worker(ctx, name, budget)
    path = ctx.out / "training.json"
    if code is None or not path.is_file():
        return Check(name, "TIMEOUT" if code is None else "ERROR", f"no result: {tail(ctx.out / 'training.log')}")
    rows = {r["backend"]: r for r in json.loads(path.read_text())}
    parts = []
    for backend, row in rows.items():
        if row["status"] != "ok":
            parts.append(f"{backend}: {row['status']} ({row.get('reason', '')[:120]})")
            continue
        share = row.get("quantizer_share")
        quantizer = (
            f"quantizer fwd+bwd {fmt_time(row['quantizer_s'])} = {100 * share:.1f}% of the step"
            if share is not None
            else "quantizer not timed"
        )
        parts.append(
            f"{backend} ({row['resolved_backend']}): {fmt_time(row['step_s'])}/step, peak "
            f"{fmt_bytes(row.get('peak_bytes'))}, {quantizer}"
        )
    auto, reference = rows.get("auto", {}), rows.get("reference", {})
    if auto.get("status") == reference.get("status") == "ok":
        parts.append(f"auto steps {reference['step_s'] / auto['step_s']:.2f}x as fast as reference")
    batch = next(iter(rows.values()), {}).get("batch")
    status = "PASS" if auto.get("status") == "ok" else "FAIL"
    return Check(
        name,
        "INFO" if ctx.dry_run and status == "PASS" else status,
        f"F16-D16-G8-V256k, batch {batch}: " + "; ".join(parts),
    )


WORKERS = {"machine": worker_machine, "timings": worker_timings, "training": worker_training}


# ------------------------------------------------------------------------------------------------
# tests and sanitizers


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped summed over the file's test suites, and the failed tests."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    if not path.is_file():
        return counts
    root = ET.parse(path).getroot()
    for suite in root.iter("testsuite"):
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").strip().splitlines()
            counts["failed"].append(
                f"{case.get('classname')}::{case.get('name')}" + (f" ({message[0][:120]})" if message else "")
            )
    return counts


def marked_test_files() -> list[str]:
    """Test files, besides those the other test steps run, that mark tests `gpu`."""
    taken = {f for files, _ in TEST_STEPS.values() for f in files}
    return [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "tests").glob("test_*.py"))
        if str(p.relative_to(ROOT)) not in taken and "mark.gpu" in p.read_text(errors="replace")
    ]


def pytest_command(ctx: Context, files: list[str], selection: list[str], junit: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *selection,
        *files,
    ]
    if ctx.dry_run:
        return cmd + ["--collect-only"]
    if find_spec("xdist") is not None:
        cmd += ["-n", str(max(2, min(6, (os.cpu_count() or 4) // 3)))]  # Triton compiles in parallel
    if find_spec("pytest_timeout") is not None:
        cmd += ["--timeout=120"]
    return cmd


def step_tests(ctx: Context, name: str, budget: float) -> Check:
    if name == "tests-marked":
        files, selection = marked_test_files(), ["-m", "gpu"]
        if not files:
            return Check(name, "SKIP", "no other test file marks tests gpu")
    else:
        files, selection = TEST_STEPS[name]
    junit, log = ctx.out / f"junit-{name[len('tests-') :]}.xml", ctx.out / f"{name}.log"
    junit.unlink(missing_ok=True)
    code = run_command(pytest_command(ctx, files, selection, junit), log, budget, ctx.env)
    counts = junit_counts(junit)
    if ctx.dry_run:
        collected = re.findall(
            r"^((?:no tests|\d+(?:/\d+)? tests?) collected.*?) in [\d.]+s", log.read_text(errors="replace"), re.M
        )
        ok = code in (0, 5)  # 5: every test deselected (no cuda device here)
        found = collected[-1] if collected else tail(log)
        return Check(
            name, "INFO" if ok else "FAIL", f"dry run, not executed: {found}" + ("" if ok else f" (pytest exit {code})")
        )
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    text = f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    if counts["failed"]:
        text += "; " + "; ".join(counts["failed"][:4]) + (" ..." if len(counts["failed"]) > 4 else "")
    if code is None:
        return Check(name, "TIMEOUT", f"stopped at its budget: {text} so far")
    if code == 5 or counts["tests"] == 0:
        return Check(name, "FAIL", f"no test ran (pytest exit {code}): {tail(log)}")
    return Check(name, "PASS" if code == 0 else "FAIL", text + ("" if code in (0, 1) else f" (pytest exit {code})"))


def step_sweep(ctx: Context, name: str, budget: float) -> Check:
    log = ctx.out / f"{name}.log"
    code = run_command(
        [sys.executable, "-m", "benchmarks.sanitizer_sweep", "--device", ctx.device], log, budget, ctx.env
    )
    summary = "; ".join(re.findall(r"^sweep (.*)$", log.read_text(errors="replace"), re.M)) or tail(log)
    failed = re.findall(r"^FAIL (.*)$", log.read_text(errors="replace"), re.M)
    status = "TIMEOUT" if code is None else "PASS" if code == 0 else "FAIL"
    return Check(name, status, summary + (f"; first failure: {failed[0][:200]}" if failed else ""))


def sanitizer() -> tuple[str | None, str]:
    """compute-sanitizer's path and its --help text ("" if it is missing)."""
    path = shutil.which("compute-sanitizer") or next(
        (
            str(p)
            for p in (
                Path("/usr/local/cuda/bin/compute-sanitizer"),
                Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "bin" / "compute-sanitizer",
            )
            if p.is_file()
        ),
        None,
    )
    if path is None:
        return None, ""
    try:
        return path, subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return path, ""


def sanitizer_command(path: str, help_text: str, tool: str) -> list[str]:
    cmd = [path, "--tool", tool]
    if "--error-exitcode" in help_text:
        cmd += ["--error-exitcode", "99"]
    if "--print-limit" in help_text:
        cmd += ["--print-limit", "20"]
    # Only our kernels (gsq_cuda::*, gsq_*_kernel) and the cub sort our CUDA backward launches:
    # instrumenting every torch kernel a Python process loads would spend the budget elsewhere. Not
    # for initcheck: it marks memory initialized only when an instrumented kernel (or a copy/memset)
    # writes it, so with a filter every read of a torch kernel's output (a .item(), torch.nonzero's
    # cub pass) is reported as uninitialized, as seen on an H200.
    option = next((o for o in ("--kernel-name", "--kernel-regex") if o in help_text), None)
    if option and tool != "initcheck":
        cmd += [option, "kns=gsq", option, "kns=cub"]
    return cmd + [sys.executable, "-m", "benchmarks.sanitizer_sweep", "--device", "cuda", "--cycle-triton-configs"]


def step_sanitizer(ctx: Context, name: str, budget: float) -> Check:
    tool = name.split("-", 1)[1]
    path, help_text = sanitizer()
    if path is None:
        return Check(name, "SKIP", "compute-sanitizer not found (PATH, /usr/local/cuda/bin, $CUDA_HOME/bin)")
    if ctx.dry_run:
        return Check(name, "SKIP", f"dry run: would run {' '.join(sanitizer_command(path, help_text, tool)[:6])} ...")
    log = ctx.out / f"{name}.log"
    # Without the caching allocator every tensor is its own cudaMalloc, so an access past a tensor's
    # end is past an allocation's end, which memcheck reports and initcheck tracks.
    env = {**ctx.env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    code = run_command(sanitizer_command(path, help_text, tool), log, budget, env)
    return sanitizer_verdict(name, log, code)


def sanitizer_verdict(name: str, log: Path, code: int | None) -> Check:
    text = log.read_text(errors="replace") if log.is_file() else ""
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    sweep = "; ".join(re.findall(r"^sweep (.*)$", text, re.M))
    findings = [
        line.strip("= ").strip()
        for line in text.splitlines()
        if line.startswith("=========")
        and not re.search(r"COMPUTE-SANITIZER|SUMMARY|^=+\s*$|Saved host backtrace|Host Frame|at 0x", line)
    ]
    if "not supported" in text.lower() and not errors:
        return Check(name, "SKIP", f"compute-sanitizer cannot check this device: {tail(log, 2)}")
    if code is None:
        return Check(
            name,
            "TIMEOUT",
            f"stopped at its budget; {sweep or 'sweep unfinished'}; findings so far: "
            f"{len(findings)}" + (f", first: {findings[0][:160]}" if findings else ""),
        )
    found = sum(errors) + sum(int(e) for _, e, _ in hazards)
    warnings = sum(int(w) for _, _, w in hazards)
    if not errors and not hazards:
        return Check(name, "ERROR", f"no sanitizer summary (exit {code}): {tail(log)}")
    status = "PASS" if found == 0 and code == 0 else "FAIL"
    detail = (
        f"{found} errors" + (f", {warnings} race warnings" if hazards else "") + f"; {sweep or 'sweep did not finish'}"
    )
    return Check(
        name,
        status,
        detail
        + (f"; first: {findings[0][:200]}" if findings and status == "FAIL" else "")
        + ("" if code in (0, 99) else f" (exit {code})"),
    )


# ------------------------------------------------------------------------------------------------
# results, summary, report


def assemble(ctx: Context, checks: list[Check], started: str) -> dict:
    """results.json: the format `python -m benchmarks.report` reads (benchmarks/report.py)."""
    machine = json.loads((ctx.out / "machine.json").read_text()) if (ctx.out / "machine.json").is_file() else {}
    training = json.loads((ctx.out / "training.json").read_text()) if (ctx.out / "training.json").is_file() else []
    return {
        "format": FORMAT,
        "version": 1,
        "datetime": started,
        "dry_run": ctx.dry_run,
        "default_lookup": timing_plan(ctx).get("default_lookup"),
        "machine": {ctx.device: machine},
        "rows": timing_rows(ctx),
        "training": training,
        "checks": [asdict(c) for c in checks],
    }


def write_report(ctx: Context, results: dict) -> Check:
    from . import report

    run = report.load(ctx.out / "results.json")
    folder = ctx.out / "report"
    folder.mkdir(exist_ok=True)
    entries = [(run, device, {}) for device in sorted({r["device"] for r in run["rows"]})]
    plots = report.write_plots(entries, folder) if entries else {}
    (folder / "benchmarks.md").write_text(report.render(entries, plots) + "\n")
    written = ["report/benchmarks.md"] + [f"report/{p.name}" for ps in plots.values() for p in ps]
    return Check(
        "report",
        "PASS" if results["rows"] else "FAIL",
        f"wrote {', '.join(written)}" + ("" if results["rows"] else " (no timing results)"),
    )


def summary_markdown(ctx: Context, results: dict, checks: list[Check], seconds: float) -> str:
    from . import report

    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "ERROR", "TIMEOUT", "SKIP", "INFO")}
    machine = results["machine"].get(ctx.device, {})
    title = "dry run on the CPU (code paths only)" if ctx.dry_run else machine.get("gpu", "GPU")
    lines = [
        f"# GPU check: {title}",
        "",
        f"{results['datetime']}; {seconds:.0f} s in all (budget {ctx.budget_s:.0f} s); "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        "",
        "## Verdicts",
        "",
        "```",
        *[verdict_line(c) for c in checks],
        "```",
        "",
    ]
    if results["rows"]:
        run = {"rows": results["rows"], "machine": results["machine"], "default_lookup": results["default_lookup"]}
        lines += ["## Timings", "", "```", report.compact_summary(run).rstrip(), "```", ""]
    if results["training"]:
        lines += ["## Training steps", "", report.training_table(results["training"]), ""]
    lines += [
        "## Files",
        "",
        "results.json (every number; `python -m benchmarks.report results.json --update-docs` puts it into "
        "docs/benchmarks.md and README.md), report/ (that Markdown and its plots), junit-*.xml, *.log "
        "(one per step), machine.json, timings.jsonl (+ its plan), training.json.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The check


TIMED_STEPS = (("setup", step_setup), ("machine", step_machine), ("timings", step_timings), ("training", step_training))
# Correctness steps, four lanes side by side (each lane in order): nothing in them is timed, the GPU
# has room for all, and the longest lane (at most 165 s) sets the wall time instead of their sum.
LANES = (
    (("tests-backends", step_tests),),
    (("tests-parity", step_tests), ("tests-marked", step_tests)),
    (("sanitizer-sweep", step_sweep), ("sanitizer-memcheck", step_sanitizer), ("sanitizer-initcheck", step_sanitizer)),
    (("sanitizer-racecheck", step_sanitizer), ("sanitizer-synccheck", step_sanitizer)),
)
CHECK_ORDER = (
    "setup",
    "machine",
    "timings",
    "goal-speedup",
    "goal-memory",
    "goal-fma",
    "goal-collapsed",
    "training",
    "tests-backends",
    "tests-parity",
    "tests-marked",
    "sanitizer-sweep",
    *(f"sanitizer-{tool}" for tool in SANITIZER_TOOLS),
    "report",
)


def run_lanes(ctx: Context) -> list[Check]:
    """The correctness steps, LANES side by side."""
    results: list[list[Check]] = [[] for _ in LANES]

    def lane(index: int) -> None:
        for name, step in LANES[index]:
            results[index] += run_step(ctx, name, step)

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(len(LANES))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted((check for lane_checks in results for check in lane_checks), key=lambda c: CHECK_ORDER.index(c.name))


def run_check(ctx: Context) -> int:
    """Every step, then results.json, report/ and summary.md. Exit status 1 if any check failed."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.monotonic()
    checks: list[Check] = []
    for name, step in TIMED_STEPS:
        checks += run_step(ctx, name, step)
    checks += run_lanes(ctx)
    results = assemble(ctx, checks, started_at)
    (ctx.out / "results.json").write_text(json.dumps(results, indent=1))
    try:
        checks.append(write_report(ctx, results))
    except Exception as error:  # the summary must still be written
        checks.append(Check("report", "ERROR", f"{type(error).__name__}: {error}"[:300]))
    print(verdict_line(checks[-1]), flush=True)
    results["checks"] = [asdict(c) for c in checks]
    (ctx.out / "results.json").write_text(json.dumps(results, indent=1))
    summary = summary_markdown(ctx, results, checks, time.monotonic() - started)
    (ctx.out / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    return 1 if any(c.status in ("FAIL", "ERROR", "TIMEOUT") for c in checks) else 0


def archive(folder: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    print(f"archived {folder} -> {target} ({target.stat().st_size / 2**20:.1f} MiB)", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the results (created)")
    parser.add_argument(
        "--setup",
        action="store_true",
        help="build gsq_kernels._C for this torch first if it is missing or stale (pip, offline)",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU only: every step that needs no GPU, tiny sizes")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=465.0,
        help="no step starts after this many seconds (default 465: the check ends within 8 minutes)",
    )
    parser.add_argument("--train-batch", type=int, default=4, help="batch of the training steps (default 4)")
    parser.add_argument(
        "--skip", default="", help="comma-separated steps or step prefixes to leave out (e.g. sanitizer)"
    )
    parser.add_argument("--only", default="", help="comma-separated steps or prefixes to run (e.g. machine,timings)")
    parser.add_argument("--archive", type=Path, default=None, help="also pack the folder into this .tar.gz")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_batch < 1:
        parser.error(f"--train-batch must be >= 1, got {args.train_batch}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    if args.dry_run:
        env["OMP_NUM_THREADS"] = "1"  # code paths, not speed: one thread each keeps a shared machine responsive
    ctx = Context(
        args.out.resolve(),
        args.dry_run,
        args.setup,
        time.monotonic() + args.budget_s,
        args.train_batch,
        args.budget_s,
        tuple(filter(None, args.skip.split(","))),
        tuple(filter(None, args.only.split(","))),
        env,
    )
    if args.worker:
        WORKERS[args.worker](ctx)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device is visible; on a CPU-only machine use --dry-run", file=sys.stderr)
            return 2
    code = run_check(ctx)
    if args.archive:
        archive(ctx.out, args.archive)
    return code


if __name__ == "__main__":
    sys.exit(main())
