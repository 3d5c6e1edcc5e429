"""The machine a benchmark ran on, and its measured float32 matmul rate (the practical arithmetic
limit the lookup's GFLOP/s are compared with)."""

from __future__ import annotations

import os
import platform
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
    except Exception:  # noqa: BLE001 - a description must not fail the run
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
