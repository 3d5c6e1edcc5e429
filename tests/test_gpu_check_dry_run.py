"""The GPU check (benchmarks/gpu_check.py) and the report it feeds (benchmarks/report.py), without a GPU:
the check's --dry-run runs every step that needs no GPU and leaves all its files; its verdict parsers
and goals judge synthetic results right; the report writes tracked files (docs/, benchmarks/results/,
README.md) only with --update-docs, and its compact summary fits 100 columns."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check, report

ROOT = Path(__file__).resolve().parents[1]


def _setting(name="core-target", batch=32, channels=64, side=16, groups=16, codebook=16_384):
    return {
        "name": name,
        "batch": batch,
        "channels": channels,
        "height": side,
        "width": side,
        "groups": groups,
        "codebook_size": codebook,
    }


def _row(impl, mode, seconds, setting=None, lookup="exact", status="ok", peak=2**20):
    setting = setting or _setting()
    rows = setting["batch"] * setting["height"] * setting["width"] * setting["groups"]
    flops = 2 * rows * setting["codebook_size"] * (setting["channels"] // setting["groups"])
    row = {
        "setting": setting,
        "implementation": impl,
        "lookup": lookup,
        "mode": mode,
        "device": "cuda",
        "status": status,
        "lookup_flops": flops,
        "matmul_gflops": 50_000.0,
    }
    if status == "ok":
        row.update(median_s=seconds, peak_extra_bytes=peak, times_s=[seconds] * 3)
    else:
        row["reason"] = "CUDA out of memory"
    return row


def synthetic_results(dry_run: bool = False) -> dict:
    paper = _setting("F16-D16-G8-V256k", 64, 16, 16, 8, 262_144)
    rows = [
        _row("reference", "forward_backward", 0.050),
        _row("cuda", "forward_backward", 0.001),
        _row("triton", "forward_backward", 0.004),
        _row("cuda", "lookup", 0.0005),
        _row("reference", "forward_backward", 0.0, paper, status="oom"),
        _row("cuda", "forward_backward", 0.010, paper, peak=8 * 2**20),
        _row("triton", "forward_backward", 0.012, paper, peak=16 * 2**20),
    ]
    for distribution, seconds in (("uniform", 0.001), ("zipf", 0.002), ("code0", 0.100)):
        crowded = {**_setting(f"core-target-{distribution}"), "distribution": distribution}
        rows += [_row(impl, "backward", seconds, crowded, lookup=None) for impl in ("cuda", "triton")]
    return {
        "format": gpu_check.FORMAT,
        "version": 1,
        "datetime": "2026-01-01T00:00:00+00:00",
        "dry_run": dry_run,
        "default_lookup": "exact",
        "rows": rows,
        "machine": {
            "cuda": {
                "gpu": "NVIDIA H100 80GB HBM3",
                "cores": 16,
                "torch": "2.11.0+cu130",
                "matmul_gflops": 50_000.0,
                "fp32_peak_gflops": 66_900.0,
            }
        },
        "training": [
            {
                "backend": "auto",
                "status": "ok",
                "batch": 4,
                "step_s": 0.2,
                "step_times_s": [0.2] * 5,
                "peak_bytes": 2**34,
                "resolved_backend": "cuda",
                "quantizer_s": 0.004,
                "quantizer_share": 0.02,
            }
        ],
        "checks": [{"name": "timings", "status": "PASS", "verdict": "14 of 14 cases", "seconds": 1, "budget_s": 9}],
    }


def _fingerprints() -> dict:
    files = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").rglob("*")),
        *sorted((ROOT / "benchmarks" / "results").rglob("*")),
    ]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def test_report_leaves_tracked_files_alone_without_update_docs(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(synthetic_results()))
    before = _fingerprints()
    monkeypatch.setattr(report, "DEFAULT_OUT", tmp_path / "default")
    report.main([str(results)])  # the default output folder
    report.main([str(results), "--out", str(tmp_path / "chosen"), "--quiet"])
    with pytest.raises(SystemExit):
        report.main([str(results), "--out", str(report.DOCS)])  # a tracked folder needs --update-docs
    assert _fingerprints() == before
    for folder in ("default", "chosen"):
        text = (tmp_path / folder / "benchmarks.md").read_text()
        assert "NVIDIA H100" in text and "| cuda:exact | fwd+bwd | 1.0 ms | 50.0x |" in text
        assert "Training steps" in text and list((tmp_path / folder).glob("benchmark-gpu-*-settings.png"))
    assert "x ref" in capsys.readouterr().out


def test_update_docs_rewrites_the_docs_and_refuses_dry_runs(tmp_path, monkeypatch):
    docs, results_dir, readme = tmp_path / "docs", tmp_path / "results", tmp_path / "README.md"
    readme.write_text("# gsq\n\n<!-- benchmarks:start -->\nold\n<!-- benchmarks:end -->\n\n## Tests\n")
    for name, value in (("DOCS", docs), ("RESULTS", results_dir), ("README", readme)):
        monkeypatch.setattr(report, name, value)
    dry = tmp_path / "dry.json"
    dry.write_text(json.dumps(synthetic_results(dry_run=True)))
    with pytest.raises(SystemExit, match="dry-run"):
        report.main([str(dry), "--update-docs", "--quiet"])
    assert not docs.exists() and not results_dir.exists() and "old" in readme.read_text()
    run = tmp_path / "run.json"
    run.write_text(json.dumps(synthetic_results()))
    docs.mkdir()
    (docs / "benchmark-old-layout.png").write_bytes(b"")
    report.main([str(run), "--update-docs", "--quiet"])
    assert (results_dir / "gpu-nvidia-h100-80gb-hbm3.json").is_file()
    assert sorted(p.name for p in docs.glob("*.png")) == ["benchmark-gpu-nvidia-h100-80gb-hbm3-settings.png"]
    assert "core-target" in (docs / "benchmarks.md").read_text()
    text = readme.read_text()
    assert "old" not in text and "NVIDIA H100" in text and text.endswith("## Tests\n")


def test_compact_summary_fits_100_columns_and_compares_with_reference_and_peers():
    run = report.load_dict(synthetic_results())
    peer = {**_row("faiss", "lookup", 0.002), "lookup": None}
    long_name = _setting("a-setting-with-a-rather-long-name-to-check-the-width-of-every-line-of-the-summary" * 2)
    run["rows"] += [
        peer,
        _row("reference", "lookup", 0.02),
        _row("reference-compiled", "lookup", 0.01),
        _row("vqtorch", "forward_backward", 0.5, lookup=None),
        _row("cuda", "lookup", 0.001, long_name),
    ]
    text = report.compact_summary(run)
    assert max(len(line) for line in text.splitlines()) <= 100
    cuda_lookup = next(line for line in text.splitlines() if line.startswith("lookup") and "cuda:exact" in line)
    assert cuda_lookup.split()[-4:] == ["40.0x", "20.0x", "-", "4.00x"]  # over reference, compiled, vqtorch, faiss
    assert "OOM" in text


def test_goals_judge_the_targets():
    rows = synthetic_results()["rows"]
    machine = synthetic_results()["machine"]["cuda"]
    speedup, memory, fma, crowded = gpu_check.goal_checks(rows, machine, "cuda")
    assert speedup.status == "FAIL" and "cuda 50.0x" in speedup.verdict and "triton 12.5x" in speedup.verdict
    assert memory.status == "PASS" and "reference: oom" in memory.verdict  # 64 and 128 B per group vector
    assert fma.status == "PASS" and "51% of the fp32 FMA peak" in fma.verdict  # 34.4 of 66.9 TFLOP/s
    assert crowded.status == "FAIL" and "code0 100.0 ms (100.0x)" in crowded.verdict


def test_sanitizer_and_junit_parsers(tmp_path):
    log = tmp_path / "sanitizer.log"
    log.write_text(
        "========= COMPUTE-SANITIZER\nsweep cuda on cuda: 14 of 14 cases passed\n========= ERROR SUMMARY: 0 errors\n"
    )
    assert gpu_check.sanitizer_verdict("sanitizer-memcheck", log, 0).status == "PASS"
    log.write_text(
        "========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 4 bytes\n"
        "=========     at gsq_cuda::lookup_tiled_kernel+0x1d0\n========= ERROR SUMMARY: 3 errors\n"
    )
    failed = gpu_check.sanitizer_verdict("sanitizer-memcheck", log, 99)
    assert failed.status == "FAIL" and "3 errors" in failed.verdict and "Invalid __global__ read" in failed.verdict
    log.write_text("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n")
    assert gpu_check.sanitizer_verdict("sanitizer-racecheck", log, 99).status == "FAIL"
    log.write_text("Segmentation fault\n")
    assert gpu_check.sanitizer_verdict("sanitizer-initcheck", log, -11).status == "ERROR"
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_x" name="test_b"/>'
        '<testcase classname="tests.test_x" name="test_c"><skipped/></testcase></testsuite></testsuites>'
    )
    counts = gpu_check.junit_counts(junit)
    assert (counts["tests"], counts["failures"], counts["skipped"]) == (3, 1, 1)
    assert counts["failed"] == ["tests.test_x::test_a (boom)"]


def test_a_step_that_outruns_its_budget_is_stopped(tmp_path):
    log = tmp_path / "slow.log"
    code = gpu_check.run_command(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
        log,
        timeout=3,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert code is None and "stopped after its budget of 3 s" in log.read_text() and "started" in log.read_text()


@pytest.mark.slow
def test_dry_run_executes_every_step_that_needs_no_gpu(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = (out / "summary.md").read_text()
    assert done.returncode == 0, summary + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    statuses = {c["name"]: c["status"] for c in results["checks"]}
    expected = [
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
        "sanitizer-memcheck",
        "sanitizer-racecheck",
        "sanitizer-initcheck",
        "sanitizer-synccheck",
        "report",
    ]
    assert list(statuses) == expected
    assert statuses["timings"] == statuses["sanitizer-sweep"] == statuses["report"] == "PASS"
    assert statuses["training"] == "INFO" and statuses["tests-backends"] == "INFO"
    cases = {(r["implementation"], r["mode"], r["lookup"]) for r in results["rows"] if r["status"] == "ok"}
    assert {("reference", "forward_backward"), ("cpu", "lookup"), ("cpu", "backward")} <= {c[:2] for c in cases}
    assert [t["backend"] for t in results["training"]] == ["reference", "auto"]
    assert all(t["status"] == "ok" and t["quantizer_share"] > 0 for t in results["training"])
    for name in ("junit-backends.xml", "junit-parity.xml", "report/benchmarks.md", "timings.jsonl", "machine.json"):
        assert (out / name).is_file(), name
    assert all(f"{c} " in summary for c in expected)


def test_default_benchmark_set_is_representative_and_full_adds_the_sweeps():
    from benchmarks.test_quantize_benchmarks import _cases

    default, full = _cases(quick=False, full=False), _cases(quick=False, full=True)
    names = {s.name for s, *_ in default}
    assert {"core-target", "F8-D64-G16-V8k", "F16-D16-G8-V256k", "F16-D16-G1-V256k", "F8-D8-G1-V256k"} <= names
    assert not any(name.startswith(("V-sweep", "d-sweep")) for name in names)
    assert {s.name for s, *_ in full} >= names | {"V-sweep-1024", "d-sweep-64"}
    cpu = [(s.name, impl, mode, lookup) for s, impl, mode, device, lookup in default if device == "cpu"]
    assert {mode for _, impl, mode, _ in cpu if impl == "reference-compiled"} == {"forward_backward"}
    assert {(impl, mode) for name, impl, mode, _ in cpu if name == "core-target" and impl in ("cpu", "reference")} == {
        (impl, mode) for impl in ("cpu", "reference") for mode in ("lookup", "forward", "forward_backward")
    }
    assert len(cpu) < len([c for c in full if c[3] == "cpu"]) / 2
