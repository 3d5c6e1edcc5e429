"""The Triton kernels compile for a Hopper GPU (sm_90a) without one (tests/triton_sm90_compile.py:
triton.compile to PTX, then Triton's bundled ptxas and nvdisasm). Catches what the CPU interpreter
accepts but a GPU rejects, register spills in any forward tile shape the autotuner may pick, and
approximate square roots or divisions (sqrt.approx.ftz / div.full, which tl.sqrt and '/' produce)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(
    not (PTXAS.exists() and PTXAS.with_name("nvdisasm").exists()), reason="Triton's bundled ptxas/nvdisasm are missing"
)
# One width per padded class of the scan (BLOCK_D = 8, the paper's group sizes; 16; 32; 64 and up,
# whose widest epilogue is at 256). `python tests/triton_sm90_compile.py` without options compiles
# every width, mode and dtype (~375 variants).
DIMS = (3, 8, 16, 32, 64, 256)
# Autotuner candidates per width (triton_kernels.forward_configs; its GPU lists, which the
# interpreter this test process runs under does not expose).
CANDIDATES = {3: 6, 8: 6, 16: 3, 32: 2, 64: 3, 256: 3}


@pytest.fixture(scope="module")
def records():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("triton_sm90_compile.py")),
            "--quick",
            "--dims",
            ",".join(map(str, DIMS)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_hopper(records):
    forward = [r for r in records if r["kernel"].startswith("forward")]
    assert len(forward) == 2 * sum(CANDIDATES.values())  # --quick: 2 variants per candidate
    assert len(records) - len(forward) == 7 * len(DIMS)  # 7 fixed-shape variants per width
    failures = [r for r in records if "error" in r]
    assert not failures, failures[:3]


def test_no_spills(records):
    """The forward spills nothing in any tile shape. No kernel spills inside a loop; outside, ptxas may
    save a register or three once per program around the slow-path calls of correctly rounded sqrt
    and division (the codebook-gradient kernel at some small d)."""
    assert not [r for r in records if r["kernel"].startswith("forward") and r["spill_bytes"] > 0]
    assert not [r for r in records if r["loop_spills"] > 0]


def test_square_roots_and_divisions_are_correctly_rounded(records):
    approximate = [r for r in records if r["approx"]]
    assert not approximate, approximate[:3]
