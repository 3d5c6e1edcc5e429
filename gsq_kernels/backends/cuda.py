"""The fused CUDA C++ kernels (csrc/cuda), registered for the CUDA dispatch key of the gsq ops."""

from __future__ import annotations

import torch

from .. import ops
from .._extension import STATUS
from .base import Backend


def _availability() -> tuple[bool, str]:
    if not ops.OPS_AVAILABLE:
        return False, f"compiled extension not loaded: {STATUS.origin}"
    if not STATUS.with_cuda:
        return False, f"the extension was built without CUDA ({STATUS.cuda_skipped or 'CPU-only torch or no nvcc'})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("gsq::quantize_forward", "CUDA"):
        return False, "the extension has no CUDA kernels registered"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return True, f"CUDA C++, {STATUS.origin}"


_available, _status = _availability()

BACKEND = Backend(
    name="cuda",
    device_types=("cuda",),
    available=_available,
    status=_status,
    how_to_get=(
        "install a CUDA build of torch and the CUDA toolkit (nvcc; set CUDA_HOME), then "
        "reinstall with `pip install --no-build-isolation -e .` on a machine with a GPU"
    ),
    quantize=ops.quantize,
    nearest_code=ops.nearest_code,
    nearest_code_with_gap=ops.nearest_code_with_gap,
    quantize_forward_with_gap=ops.quantize_forward_with_gap,
    nearest_code_sorted=ops.nearest_code_sorted if ops.has_op("nearest_code_sorted") else None,
    quantize_sorted=ops.quantize_sorted if ops.has_op("quantize_forward_sorted") else None,
    backward=ops.backward,
)
