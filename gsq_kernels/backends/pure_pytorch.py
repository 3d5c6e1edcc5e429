"""The backend named "reference": gsq_kernels/reference.py, the pure-PyTorch oracle, on any device
(it forms the full similarity matrix)."""

from __future__ import annotations

from .. import reference
from .base import Backend

BACKEND = Backend(
    name="reference",
    device_types=("cpu", "cuda", "mps", "xpu"),
    available=True,
    status="pure PyTorch (forms the M x V similarity matrix)",
    how_to_get="always available",
    quantize=reference.quantize,
    nearest_code=reference.nearest_code,
    nearest_code_with_gap=reference.nearest_code_with_gap,
)
