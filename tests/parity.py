"""Helpers for comparing a backend with the reference (the oracle).

Index agreement: rows whose best and next lower scores (computed in float64) differ by less than
gap_tolerance(d) * (1 + |best|) may legitimately pick different codes under different float32
summation orders; every other row must pick exactly the reference's code. Gradient comparisons
use inputs redrawn without near-ties (separated_latent), so they compare identical indices.
"""

from __future__ import annotations

import torch

import gsq_kernels
from gsq_kernels import reference


def gap_tolerance(d: int) -> float:
    """Rows whose top-2 score gap is below this may pick different codes in float32: normalizing
    costs a few roundings and a d-term dot product up to d more (unit roundoff 2^-24 each)."""
    return 4 * (d + 4) * 2.0**-24


# Loss and gradients follow flash-attention's rule: against a float64 run of the reference (the
# truth), a backend's worst error may be at most ERROR_FACTOR times the worst error of the
# reference itself run in the same precision, plus one unit of rounding of the dtype at the
# truth's scale. This scales with each case's conditioning (a gradient divided by a small ||z||
# carries a proportionally larger rounding error), where a fixed atol/rtol would not.
ERROR_FACTOR = 2.0
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-52,
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}

DTYPES_CPU = (torch.float32, torch.float16, torch.bfloat16)


def backends_for(device_type: str) -> list[str]:
    """Every available non-reference backend for a device type."""
    return [b for b in gsq_kernels.available_backends(device_type) if b != "reference"]


def top2_gap(rows: torch.Tensor, codebook: torch.Tensor, eps: float, l2_normalize: bool) -> torch.Tensor:
    """(best - next lower score) / (1 + |best|) per row, in float64, for the given lookup."""
    z = rows.detach().double()
    c = codebook.detach().double()
    if l2_normalize:
        scores = reference.l2(z, eps) @ reference.l2(c, eps).T
    else:
        scores = z @ c.T - 0.5 * (c * c).sum(-1)
    # Codes with exactly the best score (duplicates, or d=1 where every unit code is +-1) are
    # exact ties that every backend must break the same way (lowest index); the gap that matters
    # is to the best score strictly below them.
    best = scores.max(dim=-1, keepdim=True).values
    below = scores.masked_fill(scores >= best, float("-inf")).max(dim=-1).values
    return (best.squeeze(-1) - below) / (1 + best.squeeze(-1).abs())


def assert_indices_match(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rows: torch.Tensor,
    codebook: torch.Tensor,
    eps: float,
    l2_normalize: bool,
) -> None:
    actual, expected = actual.reshape(-1), expected.reshape(-1)
    differ = actual != expected
    if not differ.any():
        return
    gaps = top2_gap(rows.reshape(-1, codebook.shape[1]), codebook, eps, l2_normalize)
    bad = differ & (gaps >= gap_tolerance(codebook.shape[1]))
    if bad.any():
        first = bad.nonzero()[:5, 0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {actual.numel()} rows pick a different code with a top-2 gap >= "
            f"{gap_tolerance(codebook.shape[1]):.2e}; first rows {first}: got {actual[first].tolist()}, reference "
            f"{expected[first].tolist()}, gaps {gaps[first].tolist()}"
        )


def assert_close_to_truth(
    actual: torch.Tensor, reference_same_precision: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """Worst |actual - truth| <= ERROR_FACTOR * worst |reference - truth| + roundoff(dtype) * max|truth|.
    NaN/inf never pass."""
    a = actual.detach().double()
    r = reference_same_precision.detach().double()
    t = truth.detach().double()
    assert a.shape == t.shape, f"{what}: shape {tuple(a.shape)} vs reference {tuple(t.shape)}"
    assert torch.isfinite(a).all(), f"{what}: {int((~torch.isfinite(a)).sum())} NaN/inf values"
    error = (a - t).abs()
    allowed = ERROR_FACTOR * float((r - t).abs().max()) + UNIT_ROUNDOFF[dtype] * float(t.abs().max())
    if dtype == torch.float64:
        # The truth is the float64 reference itself, so its own error reads as zero: allow the
        # rounding of a few thousand float64 operations on O(1) terms instead.
        allowed += 1e3 * UNIT_ROUNDOFF[torch.float64] * max(1.0, float(t.abs().max()))
    worst = int(error.flatten().argmax()) if error.numel() else 0
    if error.numel() and float(error.flatten()[worst]) > allowed:
        raise AssertionError(
            f"{what}: worst error {float(error.flatten()[worst]):.3e} > allowed {allowed:.3e} "
            f"({ERROR_FACTOR} x the reference's own {dtype} error + roundoff); at flat index {worst}: "
            f"{a.flatten()[worst].item()} vs truth {t.flatten()[worst].item()}, "
            f"{int((error > allowed).sum())} of {a.numel()} elements over"
        )


def separated_group_rows(
    rows: torch.Tensor,
    codebook: torch.Tensor,
    eps: float,
    l2_normalize: bool,
    min_gap: float | None = None,
    generator: torch.Generator | None = None,
    attempts: int = 20,
) -> torch.Tensor:
    """Redraws the (M, d) group vectors whose top-2 score gap is below min_gap (after rounding to
    the rows' dtype), so that every backend must pick exactly the reference's code for every row."""
    rows = rows.clone()
    min_gap = gap_tolerance(codebook.shape[1]) if min_gap is None else min_gap
    for _ in range(attempts):
        close = top2_gap(rows, codebook, eps, l2_normalize) < min_gap
        if not close.any():
            return rows
        fresh = torch.randn(int(close.sum()), rows.shape[1], generator=generator, dtype=torch.float64)
        rows[close] = fresh.to(rows.dtype)
    raise RuntimeError(f"could not draw group vectors with a top-2 gap >= {min_gap}; use a smaller codebook")


def separated_latent(
    shape: tuple[int, ...],
    groups: int,
    codebook: torch.Tensor,
    dtype: torch.dtype,
    eps: float = 1e-12,
    l2_normalize: bool = True,
    min_gap: float | None = None,
    channels_last_image: bool = False,
) -> torch.Tensor:
    """A random latent (4-D images (B,D,H,W) or 3-D/2-D channels-last) with no near-tie group vector."""
    z = torch.randn(shape, dtype=torch.float64).to(dtype)
    image = len(shape) == 4
    channels_last = z.permute(0, 2, 3, 1).contiguous() if image else z.contiguous()
    d = codebook.shape[1]
    rows = separated_group_rows(channels_last.reshape(-1, d), codebook, eps, l2_normalize, min_gap)
    channels_last = rows.reshape(channels_last.shape)
    if image:
        z = channels_last.permute(0, 3, 1, 2)
        return z.contiguous(memory_format=torch.channels_last) if channels_last_image else z.contiguous()
    return channels_last


def triton_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
