"""The exact lookup (docs/spec.md, section "Lookup"): every backend returns the truly nearest code.

    idx = argmin_j ||n - c^_j||^2,  n = l2(z), c^_j = l2(c_j) (raw z and c_j when l2 is off),

over the fp32 vectors n and c^_j (float64 for float64 z; lookup_l2 normalizes), ranked as if the
distances were computed exactly; equal distances go to the lowest index. The fp32 dot product that every fused scan
computes cannot do this alone: at d = 2, V = 262,144 neighbouring codes are ~2.4e-5 rad apart, so
their cosines differ by ~1e-10, far below fp32's resolution near 1 (6e-8), and the per-code
rounding of c^ decides the winner. Two strategies, both exact:

  * d <= 2 with l2 on, and d = 1: a sorted search. The fused backends run it as one kernel
    (csrc/gsq_sorted_search.h: the codes bucket-sorted by angle or value in O(V), then each row's
    window of buckets widened until a distance bound proves its winner); sorted_search below is the
    torch version (the reference backend, float64 z): sort by angle or value, binary-search each
    row, settle the winner among a few neighbours by float64 distance, prove it with the same kind
    of bound, and decide unproven rows over the whole codebook. O((V + M) log V).

  * otherwise (refine_ambiguous_rows): the backend's fused fp32 scan returns its winner and the gap
    to the runner-up score. If the gap exceeds twice the scan's worst-case rounding error (plus,
    with l2 on, the spread of the normalized codes' squared norms, which the dot product ignores),
    no other code can be as near, and the scan's winner is exact. Only the other rows are re-decided
    by float64 distances over the whole codebook: a fraction of a percent of the rows for d >= 3.

The float64 decision is the oracle of the tests (nearest_code_float64), so all backends agree with
it, and with each other, index for index.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .reference import compute_dtype

LOOKUP_MODES = ("exact", "dot")

# Elements of the float64 distance matrix formed at once when rows are decided over the whole
# codebook: 2^22 doubles = 32 MiB, so memory stays O(M + V) however many rows need it.
FLOAT64_CHUNK_ELEMENTS = 1 << 22
# Neighbours on each side of a row's insertion point that the sorted search scores.
SEARCH_HALF_WINDOW = 4


def check_lookup(lookup) -> str:
    if lookup not in LOOKUP_MODES:
        raise ValueError(f"lookup must be 'exact' (the nearest code) or 'dot' (the fp32 dot product), got {lookup!r}")
    return lookup


def lookup_l2(x: Tensor, eps: float) -> Tensor:
    """x / max(r, eps) with r = ||x|| taken in float64 and rounded once to x's dtype.

    The lookup's normalization. For d <= 2 every x_k^2 is exact in float64 and their sum rounds
    once, so r, and the normalized vector, are the same bits on every device and in every kernel
    (torch's own vector_norm rounds differently on a CPU and on a GPU). For larger d it is within
    an ulp of l2(x), which the scan's error bound allows for.
    """
    norm = x.double().square().sum(dim=-1, keepdim=True).sqrt().to(x.dtype)
    return x / norm.clamp_min(eps)


def lookup_vectors(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    """(n, c^) in the compute dtype: the vectors whose distances the lookup ranks."""
    dtype = compute_dtype(z)
    z, codebook = z.to(dtype), codebook.to(dtype)
    if l2_normalize:
        return lookup_l2(z, eps), lookup_l2(codebook, eps)
    return z, codebook


def nearest_code_float64(vectors: Tensor, codes: Tensor) -> Tensor:
    """argmin_j ||vectors_i - codes_j||^2 in float64, lowest index on ties; the oracle.

    Differences of fp32 values are exact in float64, so only the squares and the sum round, at
    2^-53: far below any difference fp32 inputs can make. Chunked over rows: O(M + V) memory.
    """
    codes64 = codes.to(torch.float64)
    rows = vectors.shape[0]
    out = torch.empty(rows, dtype=torch.int64, device=vectors.device)
    step = max(1, FLOAT64_CHUNK_ELEMENTS // max(1, codes64.shape[0] * codes64.shape[1]))
    for start in range(0, rows, step):
        chunk = vectors[start : start + step].to(torch.float64)
        distance = (chunk[:, None, :] - codes64[None, :, :]).square().sum(-1)
        out[start : start + step] = distance.argmin(dim=1)  # first minimum = lowest index
    return out


def exact_nearest_code(
    z: Tensor,
    codebook: Tensor,
    eps: float,
    l2_normalize: bool,
    scan_with_gap: Callable[[Tensor, Tensor, float, bool], tuple[Tensor, Tensor]],
    sorted_kernel: Callable[[Tensor, Tensor, float, bool], Tensor] | None = None,
    refine_kernel: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Exact nearest-code indices (M,) for group vectors z (M, d); rows holding NaN/inf get 0.
    sorted_kernel: a backend's sorted search (d <= 2, float32), else sorted_search below;
    refine_kernel: a backend's refinement (float32; see refine_ambiguous_rows)."""
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        if uses_sorted_search(z.shape[1], l2_normalize):
            if sorted_kernel is not None and sorted_kernel_applies(z, l2_normalize):
                return sorted_kernel(z, codebook.float(), eps, l2_normalize)
            vectors, codes = lookup_vectors(z, codebook, eps, l2_normalize)
            return torch.where(torch.isfinite(z).all(dim=1), sorted_search(vectors, codes), 0)
        # The scans already give NaN/inf rows index 0 and gap +inf, which the refinement leaves alone.
        indices, gap = scan_with_gap(z, codebook, eps, l2_normalize)
        rows, winners = refine_ambiguous_rows(z, codebook, eps, l2_normalize, indices, gap, refine_kernel)
        return indices.index_put((rows,), winners)


def uses_sorted_search(d: int, l2_normalize: bool) -> bool:
    return d == 1 or (d == 2 and l2_normalize)


def sorted_kernel_applies(z: Tensor, l2_normalize: bool) -> bool:
    """Whether a backend's sorted-search kernel covers the group vectors z: the sorted search, in
    float32 compute (float64 z takes sorted_search below)."""
    return uses_sorted_search(z.shape[1], l2_normalize) and compute_dtype(z) == torch.float32


# ----------------------------------------------------------------------------------------------
# The fused scan's winner, kept unless the rounding error could have hidden a nearer code.


def scan_error_bound(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    """A gap at or below which the scan's winner may not be the nearest code: a 0-dim tensor with
    l2 on (the same for every row), one per row of z with it off; float64.

    The scans rank s_j = <n, c^_j> (l2 on) or <z, c_j> - ||c_j||^2 / 2 (l2 off), accumulated in
    the compute precision (unit roundoff u) in any order, with or without FMA. A d-term dot product
    is within gamma_d sum_k |n_k c_k| <= d u |n| |c| of its exact value (Higham, Accuracy and
    Stability, section 3.1), so each score is within E of its exact value, with
      l2 on : E = (d + 8) u |n| max|c^|     (8 u: a backend's own normalization of n and c^ may
                                             differ from ours by a few ulp each)
      l2 off: E = (2d + 4) u (|z| max|c| + max|c|^2 / 2)   (the bias -||c||^2/2 is a d-term sum too)
    A code j beats the scan's winner w only if s_j - ||c^_j||^2/2 >= s_w - ||c^_w||^2/2 exactly
    (the distance is ||n||^2 + ||c^||^2 - 2 s), so only when the scan's gap is <= 2E, plus with l2
    on half the spread of ||c^_j||^2, which the dot product leaves out. 1e-3 of slack covers
    gamma_d's higher-order terms.

    With l2 on nothing is normalized here: x / max(||x||, eps) has norm min(1, ||x|| / eps) exactly
    and within (d + 3) u of it as computed, so |n| <= 1 (+ that), max ||c^||^2 <= 1 (+ twice that)
    and min ||c^||^2 follows from the shortest code. One pass over the codebook (its row norms) and,
    with l2 off, one over z; tensors, not Python floats, so nothing synchronizes with the device.
    """
    dtype = compute_dtype(z)
    unit = torch.finfo(dtype).eps / 2
    d = codebook.shape[1]
    slack = 1 + 1e-3
    # Relative, on squared norms: fl(sqrt(fl(sum c_k^2))) is within (d/2 + 1) u of |c|, and dividing
    # (or multiplying by a reciprocal) adds u or 2u per coordinate, so a normalized code's squared
    # norm is within (d + 6) u of min(1, |c|^2 / eps^2); (d + 8) u covers any backend's variant.
    widen = (d + 8) * unit * slack
    code_norms = torch.linalg.vector_norm(codebook.to(dtype), dim=-1)
    if l2_normalize:
        shortest = (code_norms.min().double() / eps).clamp_max(1.0)
        max_norm_sq, min_norm_sq = 1 + widen, shortest.square() * (1 - widen)
        error = (d + 8) * unit * (1 + widen) * math.sqrt(max_norm_sq)
        return 2 * error * slack + (max_norm_sq - min_norm_sq) / 2
    max_norm_sq = code_norms.max().double().square() * (1 + widen)
    row_norms = torch.linalg.vector_norm(z.to(dtype), dim=-1).double() * (1 + widen)
    error = (2 * d + 4) * unit * (row_norms * max_norm_sq.sqrt() + max_norm_sq / 2)
    return 2 * error * slack


def refine_ambiguous_rows(
    z: Tensor,
    codebook: Tensor,
    eps: float,
    l2_normalize: bool,
    indices: Tensor,
    gap: Tensor,
    refine_kernel: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """(rows, their nearest codes): the rows of a scan whose gap is within the rounding bound,
    decided in float64; every other row keeps the scan's index. One host synchronization (how
    many rows are ambiguous); z and the codebook are normalized only when some row is.
    refine_kernel (vectors, codes_t, bias, threshold) -> indices: a backend's kernel for the
    float32 case of _nearest_among_close_scores (gsq::refine_nearest_code), else torch ops."""
    if z.shape[0] == 0:
        return indices[:0], indices[:0]
    bound = scan_error_bound(z, codebook, eps, l2_normalize)
    rows = (gap <= bound).nonzero().squeeze(1)
    if rows.numel() == 0:
        return rows, indices[:0]
    vectors, codes = lookup_vectors(z[rows], codebook, eps, l2_normalize)
    row_bound = bound if bound.dim() == 0 else bound[rows]
    return rows, _nearest_among_close_scores(vectors, codes, indices[rows], row_bound, l2_normalize, refine_kernel)


def _nearest_among_close_scores(vectors, codes, scan_winner, bound, l2_normalize: bool, kernel=None) -> Tensor:
    """argmin_j ||v - c_j||^2 in float64 over the codes whose fp32 score reaches s_w - bound, with
    s_w the scan winner's score in float64. The nearest code j* is among them: it is at least as
    near as w, so its exact score is >= s_w - (half the norm spread), and our fp32 score of it is
    within E of that (scan_error_bound). There are only a handful per row: the float64 work is
    O(candidates), the fp32 pass one small matrix product per chunk of rows."""
    half_norms = None if l2_normalize else codes.square().sum(-1) / 2
    v64, winners64 = vectors.double(), codes[scan_winner].double()
    winner_score = (v64 * winners64).sum(-1)
    if half_norms is not None:
        winner_score = winner_score - winners64.square().sum(-1) / 2
    # Rounded down into the scores' precision, so the fp32 comparison keeps a superset.
    threshold = (winner_score - bound).to(vectors.dtype)
    threshold = torch.nextafter(threshold, torch.full_like(threshold, -math.inf))
    if kernel is not None and vectors.dtype == torch.float32:
        # One pass per row: the float32 scores of a block of codes, float64 only past the threshold
        # (the torch ops below spend most of their time finding those few codes).
        bias = torch.zeros_like(codes[:, 0]) if half_norms is None else -half_norms
        return kernel(vectors, codes.t().contiguous(), bias, threshold)
    out = torch.empty(vectors.shape[0], dtype=torch.int64, device=vectors.device)
    step = max(1, FLOAT64_CHUNK_ELEMENTS // codes.shape[0])
    for start in range(0, vectors.shape[0], step):
        chunk = vectors[start : start + step]
        scores = codes @ chunk.T if half_norms is None else codes @ chunk.T - half_norms[:, None]
        code, row = (scores >= threshold[None, start : start + step]).nonzero().unbind(1)
        distance = (chunk[row].double() - codes[code].double()).square().sum(-1)
        best = torch.full((chunk.shape[0],), math.inf, dtype=torch.float64, device=chunk.device)
        best = best.scatter_reduce(0, row, distance, "amin")
        tied_index = torch.where(distance == best[row], code, codes.shape[0])
        first = torch.full_like(best, codes.shape[0], dtype=torch.int64)
        out[start : start + step] = first.scatter_reduce(0, row, tied_index, "amin")
    return out


# ----------------------------------------------------------------------------------------------
# d <= 2: a sorted search instead of a scan.

# Rows handled at once by the sorted search; bounds its (rows x window x d) float64 temporaries.
SEARCH_ROW_CHUNK = 1 << 16
# Codes too short to have a reliable angle (|c^| < 1/2, i.e. zero or near-zero codes) are scored
# against every row; past this many, the whole codebook is scanned in float64 instead.
MAX_SHORT_CODES = 256


def _sort_key(x: Tensor) -> Tensor:
    """The coordinate codes are sorted by: the value (d = 1) or the angle in (-pi, pi] (d = 2)."""
    return x[:, 0] if x.shape[1] == 1 else torch.atan2(x[:, 1], x[:, 0])


class _SortedCodes:
    """The codes in key order (ties: index order), duplicates of the previous code dropped: a
    duplicate has the same distance to every row and a higher index, so it never wins, and on a
    coarse codebook (d = 1 with l2 on: every code is +-1) it would fill every window. A duplicate
    that is not adjacent (another code with the same key between) is merely kept: the window
    check then finds its equal distance and sends the row to the full float64 pass."""

    def __init__(self, codes64: Tensor, members: Tensor) -> None:
        keys = _sort_key(codes64[members])
        keys, order = torch.sort(keys, stable=True)  # members ascend, so ties stay in index order
        perm = members[order]
        ordered = codes64[perm]
        first = torch.ones(perm.numel(), dtype=torch.bool, device=perm.device)
        first[1:] = (ordered[1:] != ordered[:-1]).any(dim=1)
        self.index = perm[first]
        self.codes = ordered[first]
        self.key = keys[first]
        self.min_norm = float(torch.linalg.vector_norm(self.codes, dim=1).min()) if self.index.numel() else 0.0


def _window_positions(sorted_codes: _SortedCodes, row_keys: Tensor, circular: bool):
    """Candidate positions (rows, 2W) around each row's insertion point, and the positions of the
    first code outside the window on each side (None where the window covers every code)."""
    count = sorted_codes.key.numel()
    insert = torch.searchsorted(sorted_codes.key, row_keys)
    if count <= 2 * SEARCH_HALF_WINDOW + 1:
        every = torch.arange(count, device=row_keys.device)
        return every.expand(row_keys.numel(), count), None, None
    offsets = torch.arange(-SEARCH_HALF_WINDOW, SEARCH_HALF_WINDOW, device=row_keys.device)
    positions = insert[:, None] + offsets
    left, right = insert - SEARCH_HALF_WINDOW - 1, insert + SEARCH_HALF_WINDOW
    if circular:
        return positions.remainder(count), left.remainder(count), right.remainder(count)
    return positions.clamp(0, count - 1), left, right


def _outside_lower_bound(sorted_codes, rows64, row_keys, left, right, circular: bool) -> Tensor:
    """A lower bound on ||n - c||^2 over every code outside the window.

    d = 1: codes left of the window are <= key[left], right of it >= key[right], so the distance
    is at least the nearer of (n - key[left])^2 and (key[right] - n)^2 (computed exactly as the
    candidates' distances are, and rounding is monotone). d = 2, l2 on: ||n - c||^2 =
    (|n| - |c|)^2 + 2 |n||c| (1 - cos phi) >= 4 |n| |c|_min sin^2(phi / 2), and every outside code
    is at least min(phi_left, phi_right) away in angle (keys are sorted around the circle).
    """
    count = sorted_codes.key.numel()
    inf = torch.full_like(row_keys, math.inf)
    if left is None:
        return inf
    if not circular:
        below = torch.where(left >= 0, (rows64[:, 0] - sorted_codes.key[left.clamp(min=0)]).square(), inf)
        above = torch.where(right < count, (sorted_codes.key[right.clamp(max=count - 1)] - rows64[:, 0]).square(), inf)
        return torch.minimum(below, above)
    two_pi = 2 * math.pi
    phi_left = (row_keys - sorted_codes.key[left]).remainder(two_pi)
    phi_right = (sorted_codes.key[right] - row_keys).remainder(two_pi)
    phi = torch.minimum(torch.minimum(phi_left, phi_right), torch.full_like(phi_left, math.pi))
    row_norms = torch.linalg.vector_norm(rows64, dim=1)
    return 4 * row_norms * sorted_codes.min_norm * torch.sin(phi / 2).square()


def _best_candidate(rows64: Tensor, candidate_codes: Tensor, candidate_index: Tensor, num_codes: int):
    """(distance, index) of each row's nearest candidate; equal distances: lowest index."""
    distance = (rows64[:, None, :] - candidate_codes).square().sum(-1)
    best = distance.min(dim=1).values
    tied = distance == best[:, None]
    return best, torch.where(tied, candidate_index, num_codes).min(dim=1).values


# The last sorted codebook per device, reused while the codes are bit-identical (tokenization and
# evaluation call the lookup again and again with one codebook; training changes it every step).
# Validated by comparing the whole codebook, an O(V) pass against the O(V log V) sort it saves.
_SORTED_CACHE: dict = {}


def _sorted_codes(codes: Tensor) -> tuple[Tensor, _SortedCodes]:
    """(indices of the short codes, the sorted distinct others), cached while `codes` is unchanged."""
    cached = _SORTED_CACHE.get(codes.device)
    if (
        cached is not None
        and cached[0].shape == codes.shape
        and cached[0].dtype == codes.dtype
        and torch.equal(cached[0], codes)
    ):
        return cached[1], cached[2]
    codes64 = codes.double()
    if codes.shape[1] == 2:
        short = torch.linalg.vector_norm(codes64, dim=1) < 0.5
    else:
        short = torch.zeros(codes.shape[0], dtype=torch.bool, device=codes.device)
    short_index = short.nonzero().squeeze(1)
    sorted_codes = _SortedCodes(codes64, (~short).nonzero().squeeze(1))
    _SORTED_CACHE[codes.device] = (codes.clone(), short_index, sorted_codes)
    return short_index, sorted_codes


def sorted_search(vectors: Tensor, codes: Tensor) -> Tensor:
    """Exact nearest codes for d = 1, or d = 2 with l2 on (codes on the unit circle).

    Work O(V log V) to sort (skipped while the codebook is unchanged) plus O(M log V) to search;
    rows whose window cannot be proven to hold the winner (clustered codes, rows of norm < 1/2)
    are decided over the whole codebook.
    """
    rows = vectors.shape[0]
    out = torch.zeros(rows, dtype=torch.int64, device=vectors.device)
    if rows == 0:
        return out
    short_index, sorted_codes = _sorted_codes(codes)
    if sorted_codes.index.numel() == 0 or short_index.numel() > MAX_SHORT_CODES:
        return nearest_code_float64(vectors, codes)
    codes64 = codes.double() if short_index.numel() else None
    circular = codes.shape[1] == 2
    for start in range(0, rows, SEARCH_ROW_CHUNK):
        chunk = slice(start, start + SEARCH_ROW_CHUNK)
        out[chunk] = _search_rows(vectors[chunk], codes, codes64, sorted_codes, short_index, circular)
    return out


def _search_rows(vectors, codes, codes64, sorted_codes, short_index, circular: bool) -> Tensor:
    rows64 = vectors.double()
    row_keys = _sort_key(rows64)
    positions, left, right = _window_positions(sorted_codes, row_keys, circular)
    candidate_index = sorted_codes.index[positions]
    candidate_codes = sorted_codes.codes[positions]
    if short_index.numel():
        candidate_index = torch.cat([candidate_index, short_index.expand(rows64.shape[0], -1)], dim=1)
        candidate_codes = torch.cat([candidate_codes, codes64[short_index].expand(rows64.shape[0], -1, -1)], dim=1)
    best, winner = _best_candidate(rows64, candidate_codes, candidate_index, codes.shape[0])
    bound = _outside_lower_bound(sorted_codes, rows64, row_keys, left, right, circular)
    # Strictly farther than the best candidate, with room for float64 rounding in the angles.
    proven = bound > best if not circular else bound * (1 - 1e-9) > best * (1 + 1e-9)
    if circular:
        proven &= torch.linalg.vector_norm(rows64, dim=1) >= 0.5
    proven |= ~torch.isfinite(rows64).all(dim=1)  # index 0 is set by the caller
    unproven = (~proven).nonzero().squeeze(1)
    if unproven.numel():
        winner[unproven] = nearest_code_float64(vectors[unproven], codes)
    return winner
