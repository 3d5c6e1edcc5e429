"""The pure-PyTorch reference for Grouped Spherical Quantization: the ground truth every backend is
tested against. Written for clarity, not speed: the lookup forms the full (M x V) similarity
matrix, and autograd supplies the gradients. See docs/spec.md, section "Quantizer".

All functions take flattened group vectors z of shape (M, d) (M = positions x groups) and the
codebook (V, d); layouts are handled by gsq_kernels.functional.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(z: Tensor) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other dtype is computed in float32."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def l2(x: Tensor, eps: float) -> Tensor:
    """x / max(||x||, eps) over the last dimension."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def scores(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    """(M, V) scores, larger is nearer, as every fused scan ranks them:

    l2 on : s_j = <l2(z), l2(c_j)>             (||n - c^_j||^2 = 2 - 2 s_j for unit vectors)
    l2 off: s_j = <z, c_j> - ||c_j||^2 / 2     (||z - c_j||^2 = ||z||^2 - 2 s_j)
    """
    if l2_normalize:
        return l2(z, eps) @ l2(codebook, eps).T
    return z @ codebook.T - (codebook * codebook).sum(dim=-1) / 2


def nearest_code_with_gap(z: Tensor, codebook: Tensor, eps: float = 1e-12, l2_normalize: bool = True):
    """(argmax_j s_j with the lowest index on ties, s_best - s_second): the fp32 dot-product lookup
    and its margin over the runner-up, +inf for V = 1 and for rows holding NaN/inf (index 0)."""
    dtype = compute_dtype(z)
    # Autocast would run the matmul in bf16/fp16 and change which code wins.
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        similarity = scores(z, codebook.to(dtype), eps, l2_normalize)
        indices = similarity.argmax(dim=-1)  # the first maximum: the lowest index
        best = similarity.gather(1, indices[:, None]).squeeze(1)
        # The two largest values (equal on a tie), without a second M x V matrix; -inf when V = 1.
        if similarity.shape[1] > 1:
            second = similarity.topk(2, dim=-1).values[:, 1]
        else:
            second = torch.full_like(best, -math.inf)
        finite = torch.isfinite(z).all(dim=-1)
        gap = torch.where(finite, best - second, math.inf)
        return torch.where(finite, indices, 0), gap


def nearest_code(z: Tensor, codebook: Tensor, eps: float = 1e-12, l2_normalize: bool = True) -> Tensor:
    """Index of each row's best fp32 score (see `scores`), the lowest index on ties; index 0 for a
    row holding NaN or inf, which has no meaningful nearest code (every backend agrees on this).
    This is lookup="dot"; the exact nearest code is gsq_kernels.lookup.exact_nearest_code.
    """
    return nearest_code_with_gap(z, codebook, eps, l2_normalize)[0]


def quantize(
    z: Tensor,
    codebook: Tensor,
    beta: float = 0.25,
    eps: float = 1e-12,
    l2_normalize: bool = True,
    indices: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(quantized, indices, loss) as docs/spec.md, section "Quantizer", states them.

    n = l2(z) (or z);  idx = indices if given, else nearest_code(z) (the fp32 dot lookup);
    c = codebook[idx]
    quantized = n + sg(c - n)      (forward value: exactly the raw code; gradient: to n, then z)
    loss = mean((c - sg(n))^2) + beta * mean((sg(c) - n)^2)
    quantized is returned in z's dtype, loss in float32 (float64 for float64 z).
    """
    dtype = compute_dtype(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z_c = z.to(dtype)
        codebook_c = codebook.to(dtype)
        n = l2(z_c, eps) if l2_normalize else z_c
        if indices is None:
            indices = nearest_code(z_c, codebook_c, eps, l2_normalize)
        code = F.embedding(indices, codebook_c)
        if n.numel() == 0:
            loss = n.sum() + code.sum()  # zero, still connected to the graph
        else:
            loss = F.mse_loss(code, n.detach()) + beta * F.mse_loss(code.detach(), n)
        # n + sg(c - n), written so that the forward value is exactly c: in floating point
        # n + (c - n) can differ from c in the last bit. The gradient is the same: all to n. A row
        # holding NaN/inf returns its code's row like every fused backend (NaN - NaN would not).
        straight_through = n - n.detach()
        straight_through = torch.where(torch.isfinite(n), straight_through, 0)
        quantized = code.detach() + straight_through
    return quantized.to(z.dtype), indices, loss
