"""gsq_kernels: fused Grouped Spherical Quantization.

    from gsq_kernels import GroupedSphericalQuantizer
    quantizer = GroupedSphericalQuantizer(dim=64, codebook_size=8192, groups=16)
    quantized, indices, loss = quantizer(z)   # z: (B, 64, H, W) or (B, N, 64)

Backends are discovered once at import (logged on the "gsq_kernels" logger at INFO; see
`gsq_kernels.backend_report()`).
"""

from . import reference
from .dispatch import BackendUnavailableError, available_backends, backend_report
from .functional import GSQOutput, decode_indices, grouped_spherical_quantize, nearest_code_indices
from .module import GroupedSphericalQuantizer, spherical_init, uniform_init, usage_percent, usage_perplexity
from .ops import cpu_isa, set_cpu_isa

__version__ = "0.1.0"

__all__ = [
    "GroupedSphericalQuantizer",
    "GSQOutput",
    "grouped_spherical_quantize",
    "nearest_code_indices",
    "decode_indices",
    "spherical_init",
    "uniform_init",
    "usage_perplexity",
    "usage_percent",
    "available_backends",
    "backend_report",
    "BackendUnavailableError",
    "cpu_isa",
    "set_cpu_isa",
    "reference",
]
