"""lookup="exact": every backend returns the float64 oracle's index, row for row, with no tolerance.

The oracle (gsq_kernels.lookup.nearest_code_float64) ranks ||n - c^_j||^2 computed in float64 from
the fp32 vectors, first minimum = lowest index. lookup="dot" keeps the fp32 dot product.
"""

import math

import pytest
import torch

import gsq_kernels
from gsq_kernels import lookup, nearest_code_indices, ops, reference, spherical_init
from gsq_kernels.lookup import lookup_vectors, nearest_code_float64, sorted_search
from parity import assert_close_to_truth, triton_interpreted
from sorted_cases import HARD_CASES, hard_codebook

BACKENDS = [b for b in gsq_kernels.available_backends("cpu")]


def _oracle(z: torch.Tensor, codebook: torch.Tensor, l2_normalize: bool, eps: float = 1e-12) -> torch.Tensor:
    vectors, codes = lookup_vectors(z, codebook, eps, l2_normalize)
    return nearest_code_float64(vectors, codes)


def _exact(z, codebook, backend, l2_normalize=True, lookup_mode="exact"):
    out = nearest_code_indices(z, codebook, 1, backend=backend, l2_normalize=l2_normalize, lookup=lookup_mode)
    return out.reshape(-1)


def _skip_interpreter_dtype(backend, dtype):
    if backend == "triton" and triton_interpreted() and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in Triton's CPU interpreter")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2_normalize", [True, False])
@pytest.mark.parametrize("d, num_codes", [(1, 37), (2, 4099), (3, 2000), (4, 3001), (8, 1025), (16, 517), (64, 300)])
def test_random_rows_match_the_oracle(backend, l2_normalize, d, num_codes):
    codebook = spherical_init(num_codes, d) if l2_normalize else torch.randn(num_codes, d)
    z = torch.randn(1537, d)
    expected = _oracle(z, codebook, l2_normalize)
    assert torch.equal(_exact(z, codebook, backend, l2_normalize), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_headline_setting_d2_v262144(backend):
    """F16-D16-G8-V256k: the fp32 dot product ties ~8 codes per row there; exact must not."""
    codebook = spherical_init(262_144, 2)
    z = torch.randn(600, 2)
    expected = _oracle(z, codebook, True)
    assert torch.equal(_exact(z, codebook, backend), expected)
    # The dot product misses most of these rows: the difference exact makes is real.
    dot = _exact(z, codebook, backend, lookup_mode="dot")
    assert (dot != expected).float().mean() > 0.5


def _one_ulp_case(l2_normalize: bool, nearer_first: bool):
    """Two codes whose fp32 scores tie for the row but whose exact distances differ by ~1e-16."""
    delta = 2.0**-40
    row = torch.tensor([[1.0, 1e-4, 0.0, 0.0]])
    far, near = [1.0, 0.0, 0.0, 0.0], [1.0, delta, 0.0, 0.0]
    codes = [near, far] if nearer_first else [far, near]
    codebook = torch.tensor(codes + [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0]])
    return row, codebook, (0 if nearer_first else 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2_normalize", [True, False])
@pytest.mark.parametrize("nearer_first", [True, False])
def test_codes_one_ulp_apart(backend, l2_normalize, nearer_first):
    row, codebook, nearest = _one_ulp_case(l2_normalize, nearer_first)
    assert int(_oracle(row, codebook, l2_normalize)) == nearest
    assert int(_exact(row, codebook, backend, l2_normalize)) == nearest
    # The fp32 scores tie, so the dot product takes the lower index whichever is nearer.
    assert int(_exact(row, codebook, backend, l2_normalize, "dot")) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2_normalize", [True, False])
def test_forward_patches_the_rows_it_redecides(backend, l2_normalize):
    """The exact forward (one fused scan with the gap, then the re-decided rows recomputed): indices
    of the oracle where the fp32 scores tie, outputs and gradients those of the reference given the
    oracle's indices."""
    row, codebook, _ = _one_ulp_case(l2_normalize, nearer_first=False)
    z = torch.cat([torch.randn(300, 4), row.repeat(5, 1), torch.randn(300, 4)])
    codebook = torch.cat([codebook, spherical_init(200, 4)])
    expected = _oracle(z, codebook, l2_normalize)
    z_in, codebook_in = z.clone().requires_grad_(), codebook.clone().requires_grad_()
    out = gsq_kernels.grouped_spherical_quantize(
        z_in[:, :, None, None], codebook_in, 1, backend=backend, l2_normalize=l2_normalize
    )
    assert torch.equal(out.indices.reshape(-1), expected)
    (out.quantized.square().sum() + out.loss).backward()
    z_ref, codebook_ref = z.clone().requires_grad_(), codebook.clone().requires_grad_()
    quantized, _, loss = reference.quantize(z_ref, codebook_ref, 0.25, 1e-12, l2_normalize, expected)
    (quantized.square().sum() + loss).backward()
    assert torch.equal(out.quantized.reshape(z.shape), quantized.detach())
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z_in.grad, z_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(codebook_in.grad, codebook_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, l2_normalize", [(1, False), (2, True), (2, False), (4, True)])
def test_duplicate_codes_take_the_lowest_index(backend, d, l2_normalize):
    codebook = torch.randn(64, d)
    codebook[40] = codebook[7]
    codebook[9] = codebook[7]
    scale = torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.5]]) if l2_normalize else torch.ones(5, 1)
    z = codebook[7:8].repeat(5, 1) * scale
    assert _exact(z, codebook, backend, l2_normalize).tolist() == [7] * 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 2, 3, 8])
def test_zero_and_non_finite_rows(backend, d):
    """A zero row's distances are ||c^_j||^2: the oracle's pick, not blindly code 0. A row holding
    NaN/inf takes index 0 (check_finite=False)."""
    codebook = spherical_init(300, d)
    z = torch.randn(6, d)
    z[1] = 0
    z[3, 0] = float("nan")
    z[4, -1] = float("inf")
    got = nearest_code_indices(z, codebook, 1, backend=backend, check_finite=False).reshape(-1)
    expected = _oracle(z, codebook, True)
    expected[3] = expected[4] = 0
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup_dot_is_the_fp32_dot_product(backend):
    """lookup="dot" keeps the previous behaviour: the argmax of the fp32 scores, lowest index on ties,
    written here independently of the library (the expanded l2-off form included)."""
    codebook = spherical_init(500, 4)
    z = torch.randn(700, 4)
    normalized = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    codes = codebook / codebook.norm(dim=1, keepdim=True).clamp_min(1e-12)
    expected_cos = (normalized @ codes.T).argmax(dim=1)
    expected_l2_off = ((codebook * codebook).sum(-1) - 2 * (z @ codebook.T)).argmin(dim=1)
    got_cos = _exact(z, codebook, backend, True, "dot")
    got_l2_off = _exact(z, codebook, backend, False, "dot")
    if backend == "reference":
        assert torch.equal(got_cos, expected_cos) and torch.equal(got_l2_off, expected_l2_off)
    else:  # another summation order may flip rows whose fp32 scores are within rounding
        assert (got_cos != expected_cos).sum() <= 2 and (got_l2_off != expected_l2_off).sum() <= 2


@pytest.mark.parametrize("d", [3, 4, 16, 64])
@pytest.mark.parametrize("l2_normalize", [True, False])
def test_scan_error_bound_covers_the_fp32_scores(d, l2_normalize):
    """The refinement trusts a scan whose gap exceeds the bound; the bound must be at least twice
    the worst error of fp32 scores against float64 ones (with l2 on, plus the norm spread)."""
    codebook = spherical_init(400, d) if l2_normalize else torch.randn(400, d) * 3
    z = torch.randn(300, d) * (1 if l2_normalize else 5)
    fp32 = reference.scores(z, codebook, 1e-12, l2_normalize).double()
    vectors, codes = lookup_vectors(z, codebook, 1e-12, l2_normalize)
    v64, c64 = vectors.double(), codes.double()
    exact = v64 @ c64.T - (0.0 if l2_normalize else (c64 * c64).sum(-1) / 2)
    worst = (fp32 - exact).abs().max(dim=1).values
    bound = lookup.scan_error_bound(z, codebook, 1e-12, l2_normalize)
    assert (bound >= 2 * worst).all()
    # ... and tight enough to leave almost every row to the scan
    assert (bound < 1e-4 * exact.abs().max(dim=1).values.clamp_min(1)).all()


def test_refinement_redecides_only_ambiguous_rows():
    codebook = spherical_init(256, 4)
    z = torch.randn(50, 4)
    truth = _oracle(z, codebook, True)
    wrong = (truth + 1) % 256
    small_gap = torch.zeros(50)
    large_gap = torch.ones(50)
    rows, winners = lookup.refine_ambiguous_rows(z, codebook, 1e-12, True, wrong, small_gap)
    assert torch.equal(rows, torch.arange(50)) and torch.equal(winners, truth)
    rows, winners = lookup.refine_ambiguous_rows(z, codebook, 1e-12, True, wrong, large_gap)
    assert rows.numel() == 0 and winners.numel() == 0


@pytest.mark.skipif(gsq_kernels.dispatch.BACKENDS["cpu"].refine is None, reason="extension without the op")
@pytest.mark.parametrize("d", [3, 4, 16, 64])
@pytest.mark.parametrize("l2_normalize", [True, False])
def test_refine_kernel_matches_the_torch_refinement(d, l2_normalize):
    """gsq::refine_nearest_code (the CPU backend's refinement) decides as the torch ops do: every row
    made ambiguous (gap 0), and the kernel alone over all codes (threshold -inf) or none (+inf)."""
    torch.manual_seed(3)
    codebook = spherical_init(3001, d) if l2_normalize else torch.randn(3001, d)
    z = torch.randn(500, d)
    indices, gap = ops.nearest_code_with_gap(z, codebook, 1e-12, l2_normalize)
    ambiguous = torch.zeros_like(gap)
    rows, torch_winners = lookup.refine_ambiguous_rows(z, codebook, 1e-12, l2_normalize, indices, ambiguous)
    kernel = gsq_kernels.dispatch.BACKENDS["cpu"].refine
    same_rows, kernel_winners = lookup.refine_ambiguous_rows(
        z, codebook, 1e-12, l2_normalize, indices, ambiguous, kernel
    )
    assert torch.equal(rows, same_rows) and torch.equal(kernel_winners, torch_winners)
    assert torch.equal(kernel_winners, _oracle(z, codebook, l2_normalize)[rows])
    vectors, codes = lookup_vectors(z, codebook, 1e-12, l2_normalize)
    bias = torch.zeros(3001)
    everything = kernel(vectors, codes.t().contiguous(), bias, torch.full((500,), -math.inf))
    assert torch.equal(everything, nearest_code_float64(vectors, codes))
    nothing = kernel(vectors, codes.t().contiguous(), bias, torch.full((500,), math.inf))
    assert (nothing == -1).all()


# The sorted search (d <= 2): lookup.py's, in torch ops (the reference backend, float64), and
# each backend's kernel.
SORTED_SEARCHES = ["torch"] + [b for b in BACKENDS if gsq_kernels.dispatch.BACKENDS[b].nearest_code_sorted is not None]


def _sorted_search(implementation: str, z: torch.Tensor, codebook: torch.Tensor, l2_normalize: bool = True):
    if implementation == "torch":
        return sorted_search(*lookup_vectors(z, codebook, 1e-12, l2_normalize))
    kernel = gsq_kernels.dispatch.BACKENDS[implementation].nearest_code_sorted
    return kernel(z, codebook, 1e-12, l2_normalize)


@pytest.mark.parametrize("implementation", SORTED_SEARCHES)
@pytest.mark.parametrize("case", HARD_CASES)
def test_sorted_search_hard_codebooks(implementation, case):
    z, codebook = hard_codebook(case, small=implementation == "triton")
    expected = nearest_code_float64(*lookup_vectors(z, codebook, 1e-12, True))
    assert torch.equal(_sorted_search(implementation, z, codebook), expected)


@pytest.mark.parametrize("implementation", SORTED_SEARCHES)
@pytest.mark.parametrize("num_codes", [1, 2, 3, 9, 10, 11, 1000, 70_000])
def test_sorted_search_d1(implementation, num_codes):
    if implementation == "triton" and triton_interpreted() and num_codes > 1000:
        pytest.skip("the interpreter runs each step of a row's scan; 1000 codes already crowd a bucket")
    torch.manual_seed(2)
    codebook = torch.randn(num_codes, 1)
    codebook[num_codes // 2] = codebook[0]  # a duplicate value
    codebook[num_codes // 3 :: 7] = codebook[num_codes // 3].clone()  # a crowded value
    rows_on_codes = codebook[:5] + 0.0  # exact ties of value
    z = torch.cat([torch.randn(800, 1) * 2, rows_on_codes, torch.tensor([[1e3], [-1e3], [0.0], [1e-13]])])
    for l2_normalize in (True, False):
        expected = nearest_code_float64(*lookup_vectors(z, codebook, 1e-12, l2_normalize))
        assert torch.equal(_sorted_search(implementation, z, codebook, l2_normalize), expected)


@pytest.mark.parametrize("implementation", SORTED_SEARCHES[1:])
@pytest.mark.parametrize("d", [1, 2])
def test_sorted_kernel_non_finite_inputs(implementation, d):
    """Rows holding NaN/inf get index 0; NaN/inf codes are never chosen (check_finite=False)."""
    codebook = spherical_init(5000, d)
    codebook[[3, 4000]] = float("nan")
    codebook[10, 0] = float("inf")
    z = torch.randn(400, d)
    z[[0, 7]] = float("nan")
    z[9, -1] = float("-inf")
    got = _sorted_search(implementation, z, codebook)
    assert got[[0, 7, 9]].tolist() == [0, 0, 0]
    assert not bool(torch.isin(got, torch.tensor([3, 4000, 10])).any())
    finite = torch.ones(5000, dtype=torch.bool)
    finite[[3, 4000, 10]] = False
    expected = torch.arange(5000)[finite][nearest_code_float64(*lookup_vectors(z, codebook[finite], 1e-12, True))]
    keep = torch.ones(400, dtype=torch.bool)
    keep[[0, 7, 9]] = False
    assert torch.equal(got[keep], expected[keep])
    all_nan = torch.full((4, d), float("nan"))
    assert _sorted_search(implementation, z[1:4], all_nan).tolist() == [0, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, l2_normalize", [(1, True), (1, False), (2, True)])
def test_sorted_forward_matches_the_reference_at_the_oracle_indices(backend, d, l2_normalize):
    """The exact forward where the sorted search applies (the cpu backend: one op,
    gsq::quantize_forward_sorted, differentiated by its fused backward): the oracle's indices, the
    codes themselves, and loss and gradients within float32 error of the float64 reference at those
    indices."""
    torch.manual_seed(5)
    codebook = spherical_init(3000, d) if l2_normalize else torch.randn(3000, d)
    z = torch.randn(2, d, 17, 13)
    rows = z.permute(0, 2, 3, 1).reshape(-1, d)
    expected = _oracle(rows, codebook, l2_normalize)
    z_in, codebook_in = z.clone().requires_grad_(), codebook.clone().requires_grad_()
    out = gsq_kernels.grouped_spherical_quantize(z_in, codebook_in, 1, backend=backend, l2_normalize=l2_normalize)
    assert torch.equal(out.indices.reshape(-1), expected)
    assert torch.equal(out.quantized.permute(0, 2, 3, 1).reshape(-1, d), codebook[expected])
    (out.quantized.square().sum() + out.loss).backward()
    grad_z = z_in.grad.permute(0, 2, 3, 1).reshape(-1, d)

    def reference_at_oracle(dtype):
        z_ref = rows.detach().to(dtype).clone().requires_grad_()
        codebook_ref = codebook.detach().to(dtype).clone().requires_grad_()
        quantized, _, loss = reference.quantize(z_ref, codebook_ref, 0.25, 1e-12, l2_normalize, expected)
        (quantized.square().sum() + loss).backward()
        return loss.detach(), z_ref.grad, codebook_ref.grad

    loss32, grad_z32, grad_codebook32 = reference_at_oracle(torch.float32)
    loss64, grad_z64, grad_codebook64 = reference_at_oracle(torch.float64)
    # The loss sums (c - n)^2 of near codes: cancellation, so float32 error relative to the sum.
    torch.testing.assert_close(out.loss.double(), loss64, rtol=1e-5, atol=0)
    assert_close_to_truth(grad_z, grad_z32, grad_z64, torch.float32, "grad z")
    assert_close_to_truth(codebook_in.grad, grad_codebook32, grad_codebook64, torch.float32, "grad codebook")


@pytest.mark.skipif("cpu" not in SORTED_SEARCHES, reason="extension without the cpu sorted search")
def test_cpu_sorted_search_reuses_its_arrays_safely():
    """The cpu kernel keeps its arrays between calls, one set per calling thread: calls that grow
    and shrink them, and calls from several threads at once, all return the oracle's indices."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(6)
    cases = []
    for num_codes, rows, d in ((70_000, 300, 2), (5, 40, 2), (150_000, 200, 2), (1000, 7, 1), (70_000, 500, 2)):
        codebook = spherical_init(num_codes, d) if d == 2 else torch.randn(num_codes, 1)
        z = torch.randn(rows, d)
        cases.append((z, codebook, _oracle(z, codebook, True)))
    for z, codebook, expected in cases + cases[::-1]:
        assert torch.equal(_sorted_search("cpu", z, codebook), expected)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: _sorted_search("cpu", case[0], case[1]), cases * 3))
    for got, (_, _, expected) in zip(results, cases * 3):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("implementation", SORTED_SEARCHES[1:])
def test_sorted_kernel_arguments_are_checked(implementation):
    kernel = gsq_kernels.dispatch.BACKENDS[implementation].nearest_code_sorted
    errors = (RuntimeError, ValueError, TypeError)
    with pytest.raises(errors, match="covers d = 1, and d = 2 with l2 on"):
        kernel(torch.randn(4, 3), torch.randn(5, 3), 1e-12, True)
    with pytest.raises(errors, match="covers d = 1, and d = 2 with l2 on"):
        kernel(torch.randn(4, 2), torch.randn(5, 2), 1e-12, False)
    with pytest.raises(errors, match="float64"):
        kernel(torch.randn(4, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64), 1e-12, True)


def test_oracle_is_memory_bounded():
    """The float64 pass is chunked: (M x V) at once would be 8 GB here."""
    codebook = spherical_init(1 << 20, 3)
    z = torch.randn(3, 3)
    assert nearest_code_float64(z, codebook).shape == (3,)


def test_lookup_argument_is_checked():
    codebook = spherical_init(8, 2)
    with pytest.raises(ValueError, match="lookup must be 'exact'"):
        nearest_code_indices(torch.randn(4, 2), codebook, 1, lookup="nearest")
    with pytest.raises(ValueError, match="lookup must be 'exact'"):
        gsq_kernels.GroupedSphericalQuantizer(4, 8, groups=2, lookup="cosine")
