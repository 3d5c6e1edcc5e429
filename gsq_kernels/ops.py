"""torch.library registration of the compiled gsq ops (declared in csrc/gsq_ops.cpp): fake (shape)
functions for torch.compile and the autograd formula, plus the thin Python calls the C++ backends
(backends/cpu.py, backends/cuda.py) share.

quantize_forward's loss_rows output carries the straight-through surrogate gradient: with
loss_rows_i = (1 + beta) ||c_i - n_i||^2 and w_i = dL/dloss_rows_i, the codebook receives
2 w_i (c_i - n_i) and n receives 2 beta w_i (n_i - c_i), which is exactly what
mean((c - sg(n))^2) + beta * mean((sg(c) - n)^2) gives once loss = sum(loss_rows) / (M d).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._extension import STATUS

OPS_AVAILABLE = STATUS.loaded and hasattr(torch.ops.gsq, "quantize_forward")


def _compute_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


if OPS_AVAILABLE:

    @torch.library.register_fake("gsq::quantize_forward")
    def _quantize_forward_fake(z, codebook, beta, eps, l2_normalize):
        torch._check(z.dim() == 2, lambda: f"z must be (M, d), got {tuple(z.shape)}")
        torch._check(codebook.dim() == 2, lambda: f"codebook must be (V, d), got {tuple(codebook.shape)}")
        torch._check(z.shape[1] == codebook.shape[1], lambda: "z and codebook widths differ")
        rows = z.shape[0]
        return (
            z.new_empty(z.shape),
            z.new_empty((rows,), dtype=torch.int64),
            z.new_empty((rows,), dtype=_compute_dtype(z)),
        )

    @torch.library.register_fake("gsq::quantize_backward")
    def _quantize_backward_fake(grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize):
        torch._check(grad_quantized.shape == z.shape, lambda: "grad_quantized must match z")
        return z.new_empty(z.shape), codebook.new_empty(codebook.shape)

    @torch.library.register_fake("gsq::nearest_code")
    def _nearest_code_fake(z, codebook, eps, l2_normalize):
        torch._check(z.dim() == 2 and codebook.dim() == 2, lambda: "z and codebook must be 2-D")
        return z.new_empty((z.shape[0],), dtype=torch.int64)

    def _setup_context(ctx, inputs, output):
        z, codebook, beta, eps, l2_normalize = inputs
        _, indices, _ = output
        ctx.save_for_backward(z, codebook, indices)
        ctx.beta, ctx.eps, ctx.l2_normalize = beta, eps, l2_normalize
        ctx.mark_non_differentiable(indices)

    def _backward(ctx, grad_quantized, _grad_indices, grad_loss_rows):
        z, codebook, indices = ctx.saved_tensors
        if grad_quantized is None:
            grad_quantized = torch.zeros_like(z)
        if grad_loss_rows is None:
            grad_loss_rows = z.new_zeros((z.shape[0],), dtype=_compute_dtype(z))
        grad_z, grad_codebook = torch.ops.gsq.quantize_backward(
            grad_quantized, grad_loss_rows, z, codebook, indices, ctx.beta, ctx.eps, ctx.l2_normalize
        )
        return grad_z, grad_codebook, None, None, None

    torch.library.register_autograd("gsq::quantize_forward", _backward, setup_context=_setup_context)


def quantize(z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool):
    """(quantized, indices, loss) through the compiled op of z's device."""
    quantized, indices, loss_rows = torch.ops.gsq.quantize_forward(z, codebook, beta, eps, l2_normalize)
    loss = loss_rows.sum() / max(z.numel(), 1)
    return quantized, indices, loss


def nearest_code(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    return torch.ops.gsq.nearest_code(z, codebook, eps, l2_normalize)


def cpu_isa(requested: str = "") -> str:
    """The CPU kernel variant in use ("avx512", "avx2" or "generic"); pass a name to switch."""
    if not OPS_AVAILABLE:
        raise RuntimeError("gsq_kernels: the compiled extension is not loaded: " + STATUS.origin)
    return torch.ops.gsq.cpu_isa(requested)
