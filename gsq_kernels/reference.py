"""The pure-PyTorch reference for Grouped Spherical Quantization: the ground truth every backend is
tested against. Written for clarity, not speed: the lookup forms the full (M x V) similarity
matrix, and autograd supplies the gradients. See ../shared/GSQ.md, section 1.

All functions take flattened group vectors z of shape (M, d) (M = positions x groups) and the
codebook (V, d); layouts are handled by gsq_kernels.functional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(z: Tensor) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other dtype is computed in float32."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def l2(x: Tensor, eps: float) -> Tensor:
    """x / max(||x||, eps) over the last dimension."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def nearest_code(z: Tensor, codebook: Tensor, eps: float = 1e-12, l2_normalize: bool = True) -> Tensor:
    """Index of each row's nearest code: cosine (l2 on) or Euclidean (l2 off). Ties: lowest index.

    l2 on : argmax_j <l2(z), l2(c_j)>   (= argmin_j ||l2(z) - l2(c_j)||^2)
    l2 off: argmin_j ||c_j||^2 - 2 <z, c_j>   (= argmin_j ||z - c_j||^2; ||z||^2 is common)
    torch.argmax/argmin return the first extreme value, i.e. the lowest index. A row holding a NaN
    or inf has no meaningful nearest code; it gets index 0 (every backend agrees on this).
    """
    dtype = compute_dtype(z)
    # Autocast would run the matmul in bf16/fp16 and change which code wins.
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        codebook = codebook.to(dtype)
        if l2_normalize:
            similarity = l2(z, eps) @ l2(codebook, eps).T
            indices = similarity.argmax(dim=-1)
        else:
            distance = (codebook * codebook).sum(dim=-1) - 2 * (z @ codebook.T)
            indices = distance.argmin(dim=-1)
        return torch.where(torch.isfinite(z).all(dim=-1), indices, 0)


def quantize(
    z: Tensor,
    codebook: Tensor,
    beta: float = 0.25,
    eps: float = 1e-12,
    l2_normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(quantized, indices, loss) exactly as GSQ.md section 1.

    n = l2(z) (or z);  idx = nearest_code(z);  c = codebook[idx]
    quantized = n + sg(c - n)      (forward value: exactly the raw code; gradient: to n, then z)
    loss = mean((c - sg(n))^2) + beta * mean((sg(c) - n)^2)
    quantized is returned in z's dtype, loss in float32 (float64 for float64 z).
    """
    dtype = compute_dtype(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z_c = z.to(dtype)
        codebook_c = codebook.to(dtype)
        n = l2(z_c, eps) if l2_normalize else z_c
        indices = nearest_code(z_c, codebook_c, eps, l2_normalize)
        code = F.embedding(indices, codebook_c)
        if n.numel() == 0:
            loss = n.sum() + code.sum()  # zero, still connected to the graph
        else:
            loss = F.mse_loss(code, n.detach()) + beta * F.mse_loss(code.detach(), n)
        # n + sg(c - n), written so that the forward value is exactly c: in floating point
        # n + (c - n) can differ from c in the last bit. The gradient is the same: all to n.
        quantized = code.detach() + (n - n.detach())
    return quantized.to(z.dtype), indices, loss
