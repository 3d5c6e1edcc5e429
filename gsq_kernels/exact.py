"""lookup="exact" as torch.library custom ops, so torch.compile traces it as opaque ops:

    gsq_kernels::nearest_code_exact  the exact nearest codes (lookup.py) through a backend's scan
    gsq_kernels::quantize_exact      (quantized, indices, loss_rows) with exact indices, differentiated
                                     by the backend's fused backward (it depends only on the indices)

quantize_exact runs the backend's fused forward with the gap to the runner-up in one scan
(quantize_forward_with_gap) and recomputes only the rows the refinement re-decides; at d <= 2 (the
backend's sorted-search kernel) and for a backend without that op it looks up first, then gathers.
Where a backend has the sorted search as one op (sorted_op), functional.py calls it directly.

At d >= 3 the refinement sizes its float64 pass from the data (how many rows are ambiguous), so it
synchronizes with the device once per call: capture CUDA graphs with lookup="dot".
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch, lookup
from .ops import register_quantize_autograd
from .reference import compute_dtype, l2


def _exact_indices(chosen, z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    """lookup.exact_nearest_code through the kernels the backend has."""
    return lookup.exact_nearest_code(
        z, codebook, eps, l2_normalize, chosen.nearest_code_with_gap, chosen.nearest_code_sorted, chosen.refine
    )


def sorted_op(chosen, name: str, z: Tensor, l2_normalize: bool):
    """The backend's one-op sorted search `name` ("nearest_code_sorted" or "quantize_sorted") when
    it applies to the group vectors z (d = 1, or d = 2 with l2 on; float32 compute), else None:
    called directly, it spares the custom op's Python layer that the general path needs."""
    return getattr(chosen, name) if lookup.sorted_kernel_applies(z, l2_normalize) else None


@torch.library.custom_op("gsq_kernels::nearest_code_exact", mutates_args=())
def nearest_code_exact(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool, backend: str) -> Tensor:
    return _exact_indices(dispatch.BACKENDS[backend], z, codebook, eps, l2_normalize)


@nearest_code_exact.register_fake
def _nearest_code_exact_fake(z, codebook, eps, l2_normalize, backend):
    return z.new_empty((z.shape[0],), dtype=torch.int64)


def _at_indices(z: Tensor, codebook: Tensor, indices: Tensor, beta: float, eps: float, l2_normalize: bool):
    """(quantized = c_idx in z's dtype, loss_rows = (1 + beta) ||c_idx - n||^2 in the compute dtype):
    the fused forward's outputs for given indices."""
    dtype = compute_dtype(z)
    n = z.to(dtype)
    if l2_normalize:
        n = l2(n, eps)
    code = codebook.to(dtype).index_select(0, indices)
    return code.to(z.dtype), (1 + beta) * (code - n).square().sum(dim=-1)


@torch.library.custom_op("gsq_kernels::quantize_exact", mutates_args=())
def quantize_exact(
    z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(quantized in z's dtype, indices, loss_rows in the compute dtype) with the exact nearest codes."""
    chosen = dispatch.BACKENDS[backend]
    fused = chosen.quantize_forward_with_gap
    if fused is None or lookup.uses_sorted_search(z.shape[1], l2_normalize):
        indices = _exact_indices(chosen, z, codebook, eps, l2_normalize)
        with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
            quantized, loss_rows = _at_indices(z, codebook, indices, beta, eps, l2_normalize)
        return quantized, indices, loss_rows
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        quantized, indices, loss_rows, gap = fused(z, codebook, beta, eps, l2_normalize)
        rows, winners = lookup.refine_ambiguous_rows(z, codebook, eps, l2_normalize, indices, gap, chosen.refine)
        if rows.numel():
            indices[rows] = winners
            quantized[rows], loss_rows[rows] = _at_indices(z[rows], codebook, winners, beta, eps, l2_normalize)
    return quantized, indices, loss_rows


@quantize_exact.register_fake
def _quantize_exact_fake(z, codebook, beta, eps, l2_normalize, backend):
    rows = z.shape[0]
    return (
        z.new_empty(z.shape),
        z.new_empty((rows,), dtype=torch.int64),
        z.new_empty((rows,), dtype=compute_dtype(z)),
    )


def _backend_backward(grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize, backend):
    """The fused backward of the backend that ran the forward (it depends only on the indices)."""
    return dispatch.BACKENDS[backend].backward(
        grad_quantized.contiguous(), grad_loss_rows.contiguous(), z, codebook, indices, beta, eps, l2_normalize
    )


register_quantize_autograd("gsq_kernels::quantize_exact", _backend_backward)
