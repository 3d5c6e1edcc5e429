"""torch.library registration of the compiled gsq ops (declared in csrc/gsq_ops.cpp): fake (shape)
functions for torch.compile, the autograd formula for Python-level forward ops (the fused forwards
have theirs in C++, csrc/gsq_autograd.cpp), plus the thin Python calls the C++ backends
(backends/cpu.py, backends/cuda.py) share.

quantize_forward's loss_rows output carries the straight-through surrogate gradient: with
loss_rows_i = (1 + beta) ||c_i - n_i||^2 and w_i = dL/dloss_rows_i, the codebook receives
2 w_i (c_i - n_i) and n receives 2 beta w_i (n_i - c_i), which is exactly what
mean((c - sg(n))^2) + beta * mean((sg(c) - n)^2) gives once loss = sum(loss_rows) / (M d).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._extension import STATUS
from .reference import compute_dtype

OPS_AVAILABLE = STATUS.loaded and hasattr(torch.ops.gsq, "quantize_forward")


def has_op(name: str) -> bool:
    """Whether the loaded extension defines gsq::name (an older build still loads without it)."""
    return OPS_AVAILABLE and hasattr(torch.ops.gsq, name)


CPU_ISAS = ("auto", "generic", "avx2", "avx512")  # what set_cpu_isa accepts


def loss_from_rows(loss_rows: Tensor, z: Tensor) -> Tensor:
    """The quantizer loss from a fused forward's per-row terms: sum(loss_rows) / (M d), 0 for an
    empty z (the module docstring derives why this is the loss)."""
    return loss_rows.sum() / max(z.numel(), 1)


def register_quantize_autograd(forward_op: str, backward: Callable[..., tuple[Tensor, Tensor]]) -> None:
    """Differentiate a fused forward op through its fused backward.

    forward_op: the qualified name of an op (z, codebook, beta, eps, l2_normalize, *extra) ->
      (quantized, indices, loss_rows), e.g. "gsq::quantize_forward"; extra inputs (a backend name)
      get no gradient and are passed on to `backward`.
    backward: (grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize, *extra)
      -> (grad_z, grad_codebook), e.g. torch.ops.gsq.quantize_backward. An output that receives no
      gradient is passed as zeros (grad_loss_rows in the compute dtype).
    """

    def setup_context(ctx, inputs, output):
        z, codebook, beta, eps, l2_normalize, *extra = inputs
        _, indices, _ = output
        ctx.save_for_backward(z, codebook, indices)
        ctx.beta, ctx.eps, ctx.l2_normalize, ctx.extra = beta, eps, l2_normalize, extra
        ctx.mark_non_differentiable(indices)

    def differentiate(ctx, grad_quantized, _grad_indices, grad_loss_rows):
        z, codebook, indices = ctx.saved_tensors
        if grad_quantized is None:
            grad_quantized = torch.zeros_like(z)
        if grad_loss_rows is None:
            grad_loss_rows = z.new_zeros((z.shape[0],), dtype=compute_dtype(z))
        grad_z, grad_codebook = backward(
            grad_quantized, grad_loss_rows, z, codebook, indices, ctx.beta, ctx.eps, ctx.l2_normalize, *ctx.extra
        )
        return grad_z, grad_codebook, None, None, None, *(None for _ in ctx.extra)

    torch.library.register_autograd(forward_op, differentiate, setup_context=setup_context)


def _differentiate_fused_forward(forward_op: str) -> None:
    """The fused forwards are differentiated in C++ (csrc/gsq_autograd.cpp); an extension built
    before that existed gets the same formula from Python."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(forward_op, "Autograd"):
        register_quantize_autograd(forward_op, torch.ops.gsq.quantize_backward)


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
            z.new_empty((rows,), dtype=compute_dtype(z)),
        )

    @torch.library.register_fake("gsq::quantize_backward")
    def _quantize_backward_fake(grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize):
        torch._check(grad_quantized.shape == z.shape, lambda: "grad_quantized must match z")
        return z.new_empty(z.shape), codebook.new_empty(codebook.shape)

    @torch.library.register_fake("gsq::nearest_code")
    def _nearest_code_fake(z, codebook, eps, l2_normalize):
        torch._check(z.dim() == 2 and codebook.dim() == 2, lambda: "z and codebook must be 2-D")
        return z.new_empty((z.shape[0],), dtype=torch.int64)

    _differentiate_fused_forward("gsq::quantize_forward")


def quantize(z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(quantized, indices, loss) through the compiled op of z's device."""
    quantized, indices, loss_rows = torch.ops.gsq.quantize_forward(z, codebook, beta, eps, l2_normalize)
    return quantized, indices, loss_from_rows(loss_rows, z)


def nearest_code(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    return torch.ops.gsq.nearest_code(z, codebook, eps, l2_normalize)


def nearest_code_with_gap(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    """(indices, gap): nearest_code's indices and gap = s_best - s_second, the winner's fp32 score minus the
    best score of any other code (0 on a tie, +inf when V == 1 or the row holds NaN/inf); float64 for float64 z."""
    return torch.ops.gsq.nearest_code_with_gap(z, codebook, eps, l2_normalize)


# An extension built before this op existed still loads; it just lacks the op.
if has_op("nearest_code_with_gap"):

    @torch.library.register_fake("gsq::nearest_code_with_gap")
    def _nearest_code_with_gap_fake(z, codebook, eps, l2_normalize):
        torch._check(z.dim() == 2 and codebook.dim() == 2, lambda: "z and codebook must be 2-D")
        rows = z.shape[0]
        return z.new_empty((rows,), dtype=torch.int64), z.new_empty((rows,), dtype=compute_dtype(z))


def nearest_code_sorted(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    """The exact nearest codes for d = 1, or d = 2 with l2 on (the sorted search of lookup.py in
    one kernel: a bucket sort of the codes, then a search per row); float32 compute only."""
    return torch.ops.gsq.nearest_code_sorted(z, codebook, eps, l2_normalize)


def quantize_sorted(
    z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(quantized, indices, loss), differentiable, with nearest_code_sorted's exact indices: the
    exact lookup's forward for d = 1, and d = 2 with l2 on, in one op; float32 compute only."""
    quantized, indices, loss_rows = torch.ops.gsq.quantize_forward_sorted(z, codebook, beta, eps, l2_normalize)
    return quantized, indices, loss_from_rows(loss_rows, z)


def refine_nearest_code(vectors: Tensor, codes_t: Tensor, bias: Tensor, threshold: Tensor) -> Tensor:
    """The exact lookup's refinement on the CPU (float32): per row, the float64-nearest code among
    those whose float32 score <n, c_j> + bias_j reaches threshold; -1 where none does."""
    return torch.ops.gsq.refine_nearest_code(vectors, codes_t, bias, threshold)


if has_op("refine_nearest_code"):

    @torch.library.register_fake("gsq::refine_nearest_code")
    def _refine_nearest_code_fake(vectors, codes_t, bias, threshold):
        return vectors.new_empty((vectors.shape[0],), dtype=torch.int64)


if has_op("nearest_code_sorted"):

    @torch.library.register_fake("gsq::nearest_code_sorted")
    def _nearest_code_sorted_fake(z, codebook, eps, l2_normalize):
        torch._check(z.dim() == 2 and codebook.dim() == 2, lambda: "z and codebook must be 2-D")
        return z.new_empty((z.shape[0],), dtype=torch.int64)


if has_op("quantize_forward_sorted"):
    torch.library.register_fake("gsq::quantize_forward_sorted")(_quantize_forward_fake)
    _differentiate_fused_forward("gsq::quantize_forward_sorted")


def quantize_forward_with_gap(
    z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(quantized, indices, loss_rows, gap): quantize_forward's outputs (no autograd) and
    nearest_code_with_gap's gap, from one scan."""
    return torch.ops.gsq.quantize_forward_with_gap(z, codebook, beta, eps, l2_normalize)


if has_op("quantize_forward_with_gap"):

    @torch.library.register_fake("gsq::quantize_forward_with_gap")
    def _quantize_forward_with_gap_fake(z, codebook, beta, eps, l2_normalize):
        quantized, indices, loss_rows = _quantize_forward_fake(z, codebook, beta, eps, l2_normalize)
        return quantized, indices, loss_rows, z.new_empty((z.shape[0],), dtype=compute_dtype(z))


def backward(
    grad_quantized: Tensor,
    grad_loss_rows: Tensor,
    z: Tensor,
    codebook: Tensor,
    indices: Tensor,
    beta: float,
    eps: float,
    l2_normalize: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_z, grad_codebook) for given indices, through the compiled op of z's device."""
    return torch.ops.gsq.quantize_backward(
        grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize
    )


def _require_extension() -> None:
    if not OPS_AVAILABLE:
        raise RuntimeError("gsq_kernels: the compiled extension is not loaded: " + STATUS.origin)


def cpu_isa() -> str:
    """The CPU kernel variant in use: "avx512", "avx2" or "generic" (set_cpu_isa switches it)."""
    _require_extension()
    return torch.ops.gsq.cpu_isa("")


def set_cpu_isa(name: str) -> str:
    """Run the CPU kernels' `name` variant from now on ("generic", "avx2", "avx512", or "auto": the
    best this CPU supports), for every thread; returns the variant now in use. Raises RuntimeError
    if this CPU or this build cannot run it."""
    if name not in CPU_ISAS:
        raise ValueError(f"name must be one of {', '.join(repr(n) for n in CPU_ISAS)}, got {name!r}")
    _require_extension()
    return torch.ops.gsq.cpu_isa(name)
