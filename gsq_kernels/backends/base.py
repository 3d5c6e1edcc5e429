"""What every backend provides. Inputs are flattened group vectors: z (M, d), codebook (V, d) in the
compute dtype (float32, or float64 for float64 z); layouts and validation live in functional.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    available: bool
    reason: str  # why it is unavailable, or a short description of what runs
    how_to_get: str
    # (z, codebook, beta, eps, l2_normalize) -> (quantized, indices, loss), differentiable in z and codebook
    quantize: Callable[[Tensor, Tensor, float, float, bool], tuple[Tensor, Tensor, Tensor]]
    # (z, codebook, eps, l2_normalize) -> indices
    nearest_code: Callable[[Tensor, Tensor, float, bool], Tensor]
