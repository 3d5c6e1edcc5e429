"""The functional API: grouped spherical quantization for callers who own their codebook.

Layouts (chosen by the rank of z):
  4-D (B, D, H, W)  image maps, channels second (any memory format: channels_last is read as is)
  3-D (B, N, D)     token sequences, channels last
  2-D (N, D)        flat vectors
D = groups * d; channels [g*d, (g+1)*d) form group g; every group looks up the one shared codebook
(V, d). Indices come back as (B, H, W, G), (B, N, G) or (N, G).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import dispatch, exact, reference
from .lookup import check_lookup
from .ops import loss_from_rows
from .reference import compute_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
EPS_MIN, EPS_MAX = torch.finfo(torch.float32).tiny, 1.0


class GSQOutput(NamedTuple):
    quantized: Tensor  # z's layout and dtype: the raw codebook rows, straight-through to z
    indices: Tensor  # int64, (B, H, W, G) / (B, N, G) / (N, G), values in [0, V)
    loss: Tensor  # scalar: mean((c - sg(n))^2) + beta * mean((sg(c) - n)^2); 0 for empty input


def _check_tensor(name: str, value, floating: bool = True) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")


def _check_groups(groups, channels: int) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if channels % groups != 0:
        raise ValueError(f"z has D={channels} channels, which is not divisible by groups={groups}")
    return channels // groups


def check_scalars(beta, eps) -> None:
    """beta >= 0 and finite; eps a positive float32 normal number no larger than 1 (a smaller eps
    underflows in float32 and a zero vector then normalizes to NaN). torch.compile(dynamic=True)
    traces module floats as symbolic values: under compile they are checked with torch._check."""
    if torch.compiler.is_compiling():
        torch._check(beta >= 0, lambda: "beta must be >= 0")
        torch._check(eps > 0, lambda: "eps must be > 0")
        return
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (EPS_MIN <= eps <= EPS_MAX):
        raise ValueError(f"eps must be a number in [{EPS_MIN:.3g}, {EPS_MAX:g}] (float32's normal range), got {eps!r}")


def check_finite(name: str, tensor: Tensor) -> None:
    """Raises on NaN/inf in z or the codebook: such a vector has no nearest code, and a NaN code
    would poison the loss of every row. check_finite=False skips this: rows holding NaN/inf then
    take index 0, and with a non-finite code the indices stay in [0, V) but which code wins is
    unspecified (a NaN distance has no order)."""
    if torch.compiler.is_compiling():
        # A count would need a host sync, which torch.compile cannot trace without a graph break.
        torch._assert_async(torch.isfinite(tensor).all(), f"{name} contains non-finite values (NaN or inf)")
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):  # the common case; a count of the bool tensor would first widen it to int64
        return
    bad = tensor.numel() - int(finite.sum())
    if bad:
        raise ValueError(
            f"{name} contains {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf) out of "
            f"{tensor.numel()}; pass check_finite=False to skip this check (indices then stay in range "
            "and group vectors holding NaN/inf take index 0)"
        )


def _channels_dim(z: Tensor) -> int:
    if z.dim() == 4:
        return 1
    if z.dim() in (2, 3):
        return z.dim() - 1
    raise ValueError(
        "z must be (B, D, H, W) image maps, (B, N, D) sequences or (N, D) vectors, "
        f"got a {z.dim()}-D tensor of shape {tuple(z.shape)}"
    )


def _to_group_rows(z: Tensor, d: int) -> tuple[Tensor, tuple[int, ...]]:
    """(M, d) group vectors and the channels-last shape they came from."""
    channels_last = z.permute(0, 2, 3, 1) if z.dim() == 4 else z
    return channels_last.reshape(-1, d), tuple(channels_last.shape)


def _from_group_rows(rows: Tensor, channels_last_shape: tuple[int, ...], like: Tensor) -> Tensor:
    out = rows.reshape(channels_last_shape)
    if like.dim() == 4:
        out = out.permute(0, 3, 1, 2)
        if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
            return out  # already channels_last-strided, like the input
        return out.contiguous()
    return out


def check_arguments(z: Tensor, codebook: Tensor, groups: int, beta: float = 0.25, eps: float = 1e-12) -> int:
    """Checks every argument and returns d = D // groups."""
    _check_tensor("z", z)
    _check_tensor("codebook", codebook)
    channels = z.shape[_channels_dim(z)]
    d = _check_groups(groups, channels)
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be (V, d), got shape {tuple(codebook.shape)}")
    if codebook.shape[0] < 1:
        raise ValueError("codebook must hold at least one code")
    if codebook.shape[1] != d:
        raise ValueError(f"codebook has width {codebook.shape[1]}, but D / groups = {channels} / {groups} = {d}")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook is on {codebook.device}; put them on one device")
    check_scalars(beta, eps)
    return d


def _prepare(z, codebook, groups, beta, eps, backend, lookup, check):
    """Validates, picks the backend, and returns it with the (M, d) group rows, their channels-last
    shape and the codebook in the compute dtype: the preamble both entry points share."""
    d = check_arguments(z, codebook, groups, beta, eps)
    check_lookup(lookup)
    chosen = dispatch.resolve(backend, z.device)
    if check:
        check_finite("z", z)
        check_finite("codebook", codebook)
    rows, shape = _to_group_rows(z, d)
    codebook_c = codebook if codebook.dtype == compute_dtype(z) else codebook.to(compute_dtype(z))
    return chosen, rows, shape, codebook_c


def grouped_spherical_quantize(
    z: Tensor,
    codebook: Tensor,
    groups: int = 1,
    *,
    beta: float = 0.25,
    l2_normalize: bool = True,
    eps: float = 1e-12,
    backend: str = "auto",
    check_finite: bool = True,
    lookup: str = "exact",
) -> GSQOutput:
    """Quantize z with one shared codebook per group (docs/spec.md, section "Quantizer"). See the
    module docstring for layouts.

    lookup="exact" (default) picks the truly nearest code, ties to the lowest index (docs/spec.md,
    section "Lookup"); lookup="dot" is the fp32 dot-product lookup of the official code (lowest
    index on exact ties), which at small d and large V misses the nearest code for most rows.
    """
    chosen, rows, shape, codebook_c = _prepare(z, codebook, groups, beta, eps, backend, lookup, check_finite)
    beta, eps, l2_normalize = _scalar(beta), _scalar(eps), bool(l2_normalize)
    quantize_sorted = exact.sorted_op(chosen, "quantize_sorted", rows, l2_normalize)
    if lookup == "dot":
        quantized_rows, index_rows, loss = chosen.quantize(rows, codebook_c, beta, eps, l2_normalize)
    elif quantize_sorted is not None:
        quantized_rows, index_rows, loss = quantize_sorted(rows, codebook_c, beta, eps, l2_normalize)
    elif chosen.backward is None:  # the reference: autograd differentiates its forward
        index_rows = exact.nearest_code_exact(rows, codebook_c.detach(), eps, l2_normalize, chosen.name)
        quantized_rows, _, loss = reference.quantize(rows, codebook_c, beta, eps, l2_normalize, index_rows)
    else:
        quantized_rows, index_rows, loss_rows = exact.quantize_exact(
            rows, codebook_c, beta, eps, l2_normalize, chosen.name
        )
        loss = loss_from_rows(loss_rows, rows)
    quantized = _from_group_rows(quantized_rows, shape, z)
    indices = index_rows.reshape(shape[:-1] + (groups,))
    return GSQOutput(quantized, indices, loss)


def nearest_code_indices(
    z: Tensor,
    codebook: Tensor,
    groups: int = 1,
    *,
    l2_normalize: bool = True,
    eps: float = 1e-12,
    backend: str = "auto",
    check_finite: bool = True,
    lookup: str = "exact",
) -> Tensor:
    """The lookup alone (tokenization): indices shaped as grouped_spherical_quantize returns them."""
    chosen, rows, shape, codebook_c = _prepare(z, codebook, groups, 0.0, eps, backend, lookup, check_finite)
    eps, l2_normalize = _scalar(eps), bool(l2_normalize)
    nearest_sorted = exact.sorted_op(chosen, "nearest_code_sorted", rows, l2_normalize)
    with torch.no_grad():
        if lookup == "dot":
            index_rows = chosen.nearest_code(rows, codebook_c.detach(), eps, l2_normalize)
        elif nearest_sorted is not None:
            index_rows = nearest_sorted(rows, codebook_c.detach(), eps, l2_normalize)
        else:
            index_rows = exact.nearest_code_exact(rows, codebook_c.detach(), eps, l2_normalize, chosen.name)
    return index_rows.reshape(shape[:-1] + (groups,))


def _scalar(value):
    """A Python float, or the symbolic float torch.compile(dynamic=True) traces a module's with."""
    return value if torch.compiler.is_compiling() else float(value)


def decode_indices(indices: Tensor, codebook: Tensor, layout: str = "auto") -> Tensor:
    """Codebook rows for indices (B, H, W, G) -> (B, D, H, W), (B, N, G) -> (B, N, D), (N, G) -> (N, D).

    layout="auto" reads 4-D indices as image maps; pass "sequence" to get (..., D) channels last.
    """
    _check_tensor("indices", indices, floating=False)
    _check_tensor("codebook", codebook)
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.dim() < 2:
        raise ValueError(f"indices must be (..., G), got shape {tuple(indices.shape)}")
    if layout not in ("auto", "image", "sequence"):
        raise ValueError(f"layout must be 'auto', 'image' or 'sequence', got {layout!r}")
    if indices.device != codebook.device:
        raise ValueError(f"indices are on {indices.device} but codebook is on {codebook.device}")
    num_codes = codebook.shape[0]
    if indices.numel() and not torch.compiler.is_compiling():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_codes:
            raise ValueError(f"indices must lie in [0, {num_codes}), got values in [{low}, {high}]")
    codes = torch.nn.functional.embedding(indices.long(), codebook)  # (..., G, d)
    flat = codes.reshape(indices.shape[:-1] + (indices.shape[-1] * codebook.shape[1],))
    if (layout == "image") or (layout == "auto" and indices.dim() == 4):
        if flat.dim() != 4:
            raise ValueError(f"image layout needs (B, H, W, G) indices, got shape {tuple(indices.shape)}")
        return flat.permute(0, 3, 1, 2).contiguous()
    return flat
