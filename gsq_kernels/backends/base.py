"""What every backend provides. Inputs are flattened group vectors: z (M, d), codebook (V, d) in the
compute dtype (float32, or float64 for float64 z); layouts and validation live in functional.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    available: bool
    # One line for backend_report(): what runs ("C++/OpenMP, avx512 kernels, prebuilt") when the
    # backend is available, why it is not ("no CUDA device is visible") when it is not.
    status: str = ""
    how_to_get: str
    # (z, codebook, beta, eps, l2_normalize) -> (quantized, indices, loss), differentiable in z and
    # codebook: the fused fp32 dot-product lookup (lookup="dot")
    quantize: Callable[[Tensor, Tensor, float, float, bool], tuple[Tensor, Tensor, Tensor]]
    # (z, codebook, eps, l2_normalize) -> indices, the same lookup alone
    nearest_code: Callable[[Tensor, Tensor, float, bool], Tensor]
    # (z, codebook, eps, l2_normalize) -> (indices, gap): the same scan's winner and its score
    # margin over the runner-up, which the exact lookup (lookup.py) refines from
    nearest_code_with_gap: Callable[[Tensor, Tensor, float, bool], tuple[Tensor, Tensor]] | None = None
    # (z, codebook, beta, eps, l2_normalize) -> (quantized, indices, loss_rows, gap): the fused
    # forward (no autograd) plus the gap, in one scan: the exact lookup's forward (exact.py)
    quantize_forward_with_gap: Callable[[Tensor, Tensor, float, float, bool], tuple[Tensor, ...]] | None = None
    # (z, codebook, eps, l2_normalize) -> indices: the exact nearest codes for d = 1, or d = 2
    # with l2 on, for float32 compute (lookup.py's sorted search in one kernel); None: lookup.py's
    # own sorted search runs in torch ops
    nearest_code_sorted: Callable[[Tensor, Tensor, float, bool], Tensor] | None = None
    # (z, codebook, beta, eps, l2_normalize) -> (quantized, indices, loss), differentiable like
    # `quantize`, with nearest_code_sorted's indices (where that applies): the exact forward in one
    # op; None: exact.py's forward
    quantize_sorted: Callable[[Tensor, Tensor, float, float, bool], tuple[Tensor, Tensor, Tensor]] | None = None
    # (vectors, codes_t, bias, threshold) -> indices: the exact lookup's refinement of the rows a
    # scan leaves ambiguous, for float32 (gsq::refine_nearest_code); None: torch ops (lookup.py)
    refine: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None
    # (grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize)
    #   -> (grad_z, grad_codebook): the fused backward for given indices; None for the reference,
    # whose exact-mode forward is differentiated by autograd
    backward: Callable[..., tuple[Tensor, Tensor]] | None = None
