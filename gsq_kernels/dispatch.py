"""Which backend runs a call. Decided once, at import: every backend module reports whether it can
run here, the result is logged, and `resolve` only looks the answer up.

backend="auto" picks, per device type, the first available backend of AUTO_PREFERENCE. CPU: the
fused kernels, measured 15x+ faster than the reference (docs/benchmarks.md). CUDA: the CUDA C++
kernels, then Triton. Measured on an H200 (`python -m benchmarks.gpu_check`, docs/benchmarks.md):
CUDA C++ is faster than Triton in every mode at the core target (lookup 0.72 ms vs 2.9 ms with
lookup="dot", 1.8 ms vs 5.3 ms with "exact"; backward 0.55 ms vs 1.4 ms), and its backward is
deterministic.
"""

from __future__ import annotations

import importlib
import logging

import torch

from .backends.base import Backend

log = logging.getLogger("gsq_kernels")

# Backend name -> its module in gsq_kernels/backends.
BACKEND_MODULES: dict[str, str] = {"reference": "pure_pytorch", "cpu": "cpu", "cuda": "cuda", "triton": "triton"}
BACKEND_NAMES: tuple[str, ...] = tuple(BACKEND_MODULES)

AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine."""


def _discover() -> dict[str, Backend]:
    found: dict[str, Backend] = {}
    for name, module_name in BACKEND_MODULES.items():
        try:
            module = importlib.import_module(f".backends.{module_name}", __package__)
        except ImportError as error:  # a backend whose module is not there yet, or whose deps are missing
            log.debug("gsq_kernels: backend %s not importable: %s", name, error)
            continue
        found[name] = module.BACKEND
    return found


BACKENDS: dict[str, Backend] = _discover()


def backend_report() -> str:
    lines = []
    for backend in BACKENDS.values():
        state = "available" if backend.available else "unavailable"
        lines.append(f"  {backend.name:9s} {state:11s} {backend.status}")
    return "gsq_kernels backends:\n" + "\n".join(lines)


log.info(backend_report())


def available_backends(device_type: str | None = None) -> list[str]:
    return [b.name for b in BACKENDS.values() if b.available and (device_type is None or device_type in b.device_types)]


def check_backend_name(name: str) -> None:
    """Validates a backend argument before any tensor is seen (module construction)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        return
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKEND_NAMES)}, got {name!r}")
    backend = BACKENDS.get(name)
    if backend is None or not backend.available:
        reason = backend.status if backend is not None else "its module could not be imported"
        how = f" To get it: {backend.how_to_get}." if backend is not None else ""
        raise BackendUnavailableError(f"gsq_kernels backend {name!r} is not available: {reason}.{how}")


def resolve(name: str, device: torch.device) -> Backend:
    """The backend that runs a call on `device`; raises if an explicit choice cannot run there."""
    if name == "auto":
        for candidate in AUTO_PREFERENCE.get(device.type, ("reference",)):
            backend = BACKENDS.get(candidate)
            if backend is not None and backend.available:
                return backend
        return BACKENDS["reference"]
    check_backend_name(name)
    backend = BACKENDS[name]
    if device.type not in backend.device_types:
        raise ValueError(
            f"backend {name!r} runs on {'/'.join(backend.device_types)} tensors, but z is on {device}; "
            "move the tensors or use backend='auto'"
        )
    return backend
