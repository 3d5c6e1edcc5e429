"""lookup="exact" as torch.library custom ops, so torch.compile traces it as two opaque ops:

    gsq_kernels::nearest_code_exact   the exact nearest codes (lookup.py) through a backend's scan
    gsq_kernels::quantize_at_indices  quantized = c_idx and loss_rows = (1 + beta) ||c_idx - n||^2
                                      for given indices, differentiated by the backend's fused
                                      backward (it depends only on the chosen indices)

The lookup's refinement sizes its float64 pass from the data (how many rows are ambiguous), so it
synchronizes with the device once per call: capture CUDA graphs with lookup="dot".
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch, lookup
from .reference import compute_dtype, l2


@torch.library.custom_op("gsq_kernels::nearest_code_exact", mutates_args=())
def nearest_code_exact(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool, backend: str) -> Tensor:
    scan = dispatch.BACKENDS[backend].nearest_code_with_gap
    return lookup.exact_nearest_code(z, codebook, eps, l2_normalize, scan)


@nearest_code_exact.register_fake
def _nearest_code_exact_fake(z, codebook, eps, l2_normalize, backend):
    return z.new_empty((z.shape[0],), dtype=torch.int64)


@torch.library.custom_op("gsq_kernels::quantize_at_indices", mutates_args=())
def quantize_at_indices(
    z: Tensor, codebook: Tensor, indices: Tensor, beta: float, eps: float, l2_normalize: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """(quantized in z's dtype, loss_rows in the compute dtype), exactly what the backends' fused
    quantize_forward returns for the same indices."""
    dtype = compute_dtype(z)
    n = z.to(dtype)
    if l2_normalize:
        n = l2(n, eps)
    code = codebook.to(dtype).index_select(0, indices)
    loss_rows = (1 + beta) * (code - n).square().sum(dim=-1)
    return code.to(z.dtype), loss_rows


@quantize_at_indices.register_fake
def _quantize_at_indices_fake(z, codebook, indices, beta, eps, l2_normalize, backend):
    return z.new_empty(z.shape), z.new_empty((z.shape[0],), dtype=compute_dtype(z))


def _setup_context(ctx, inputs, output):
    z, codebook, indices, beta, eps, l2_normalize, backend = inputs
    ctx.save_for_backward(z, codebook, indices)
    ctx.beta, ctx.eps, ctx.l2_normalize, ctx.backend = beta, eps, l2_normalize, backend


def _backward(ctx, grad_quantized, grad_loss_rows):
    z, codebook, indices = ctx.saved_tensors
    if grad_quantized is None:
        grad_quantized = torch.zeros_like(z)
    if grad_loss_rows is None:
        grad_loss_rows = z.new_zeros((z.shape[0],), dtype=compute_dtype(z))
    fused_backward = dispatch.BACKENDS[ctx.backend].backward
    grad_z, grad_codebook = fused_backward(
        grad_quantized.contiguous(),
        grad_loss_rows.contiguous(),
        z,
        codebook,
        indices,
        ctx.beta,
        ctx.eps,
        ctx.l2_normalize,
    )
    return grad_z, grad_codebook, None, None, None, None, None


quantize_at_indices.register_autograd(_backward, setup_context=_setup_context)
