"""The machine a benchmark ran on, its measured float32 matmul rate (the practical arithmetic limit
the lookup's GFLOP/s are compared with) and, on a GPU, its fp32 FMA peak (SMs x FP32 lanes x 2 x
the SM clock)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import gsq_kernels

        info["gsq_cpu_kernels"] = gsq_kernels.cpu_isa()
    except Exception:  # a description must not fail the run
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def matmul_gflops(device: str, size: int | None = None, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 matmul rate: sgemm on the CPU; FP32 (TF32 off) on a GPU."""
    size = size or (2048 if device == "cpu" else 8192)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a @ b
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return 2 * size**3 / best / 1e9


# FP32 lanes (FMA units) per SM by compute capability: 64 up to Ampere's GA100 (8.0), 128 since
# GA10x (8.6), Ada (8.9), Hopper (9.0) and Blackwell (10.x, 12.x).
FP32_LANES_PER_SM = {
    (7, 0): 64,
    (7, 5): 64,
    (8, 0): 64,
    (8, 6): 128,
    (8, 7): 128,
    (8, 9): 128,
    (9, 0): 128,
    (10, 0): 128,
    (10, 3): 128,
    (12, 0): 128,
}


def _nvidia_smi(query: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0].strip() if done.returncode == 0 and done.stdout.strip() else None


def gpu_details() -> dict:
    """SM count, compute capability, clocks, versions and the fp32 FMA peak of GPU 0."""
    props = torch.cuda.get_device_properties(0)
    info = {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_bytes": props.total_memory,
        "cuda_runtime": torch.version.cuda,
        "driver": _nvidia_smi("driver_version"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    max_clock = _nvidia_smi("clocks.max.sm")  # MHz; the boost clock the peak is quoted at
    clock_mhz = (
        float(max_clock)
        if max_clock and max_clock.replace(".", "").isdigit()
        else (getattr(props, "clock_rate", 0) or 0) / 1e3
    )
    lanes = FP32_LANES_PER_SM.get((props.major, props.minor))
    if clock_mhz and lanes:
        info["fp32_peak_gflops"] = props.multi_processor_count * lanes * 2 * clock_mhz / 1e3
        info["fp32_peak_basis"] = f"{props.multi_processor_count} SMs x {lanes} FP32 lanes x 2 x {clock_mhz:.0f} MHz"
    return info
