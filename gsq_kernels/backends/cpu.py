"""The fused CPU kernels (csrc/cpu, C++ with OpenMP and a per-CPU SIMD variant)."""

from __future__ import annotations

from .. import ops
from .._extension import STATUS
from .base import Backend


def _describe() -> str:
    if not ops.OPS_AVAILABLE:
        return f"compiled extension not loaded: {STATUS.origin}"
    return f"C++/OpenMP, {ops.cpu_isa()} kernels, {STATUS.origin}"


BACKEND = Backend(
    name="cpu",
    device_types=("cpu",),
    available=ops.OPS_AVAILABLE,
    status=_describe(),
    how_to_get="install a C++ compiler and reinstall with `pip install --no-build-isolation -e .`",
    quantize=ops.quantize,
    nearest_code=ops.nearest_code,
    nearest_code_with_gap=ops.nearest_code_with_gap,
    quantize_forward_with_gap=ops.quantize_forward_with_gap,
    nearest_code_sorted=ops.nearest_code_sorted if ops.has_op("nearest_code_sorted") else None,
    quantize_sorted=ops.quantize_sorted if ops.has_op("quantize_forward_sorted") else None,
    refine=ops.refine_nearest_code if ops.has_op("refine_nearest_code") else None,
    backward=ops.backward,
)
