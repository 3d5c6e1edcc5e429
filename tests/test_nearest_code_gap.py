"""gsq::nearest_code_with_gap on the CPU: the winner and its margin over the runner-up.

indices must equal nearest_code's bit for bit; gap = s_best - s_second must equal the gap of the
reference scores (exactly where the scores are exact in float32, within the summation error bound
otherwise), 0 on ties, +inf for V == 1 and for rows holding NaN/inf. Every CPU kernel variant the
machine supports is run (avx512 / avx2 / generic), as each has its own copy of the scan.
"""

import pytest
import torch

import gsq_kernels
from gsq_kernels import ops

pytestmark = pytest.mark.skipif(
    not (ops.OPS_AVAILABLE and hasattr(torch.ops.gsq, "nearest_code_with_gap")),
    reason="compiled extension (with nearest_code_with_gap) not loaded",
)

EPS = 1e-12
DIMS = (1, 2, 3, 4, 8, 16, 64)


def _variants():
    if not ops.OPS_AVAILABLE:
        return ["generic"]  # every test is skipped (pytestmark); just collect
    original = gsq_kernels.cpu_isa()
    supported = []
    for variant in ("generic", "avx2", "avx512"):
        try:
            gsq_kernels.set_cpu_isa(variant)
            supported.append(variant)
        except RuntimeError:
            pass
    gsq_kernels.set_cpu_isa(original)
    return supported


@pytest.fixture(params=_variants())
def isa(request):
    original = gsq_kernels.cpu_isa()
    gsq_kernels.set_cpu_isa(request.param)
    yield request.param
    gsq_kernels.set_cpu_isa(original)


def _scores(z, codebook, l2_normalize):
    """The op's scores computed by torch in z's dtype (another summation order)."""
    if l2_normalize:
        n = z / z.norm(dim=1, keepdim=True).clamp_min(EPS)
        return n @ (codebook / codebook.norm(dim=1, keepdim=True).clamp_min(EPS)).T
    return z @ codebook.T - (codebook * codebook).sum(1) / 2


def _score_error_bound(z, codebook, l2_normalize):
    """Per row, a first-order bound on |computed - exact| of any score, in units of the row's
    largest sum of |terms|: the d-term dot product with its bias (d + 1 roundings) plus, with l2 on,
    the two normalizations (a d-term sum of squares, a square root and a division each: d / 2 + 2
    relative each)."""
    if l2_normalize:
        z = z / z.norm(dim=1, keepdim=True).clamp_min(EPS)
        codebook = codebook / codebook.norm(dim=1, keepdim=True).clamp_min(EPS)
    magnitude = z.abs() @ codebook.abs().T
    if not l2_normalize:
        magnitude = magnitude + (codebook * codebook).sum(1) / 2
    unit = torch.finfo(z.dtype).eps / 2
    return (2 * z.shape[1] + 6) * unit * magnitude.max(dim=1).values


def _gap_tolerance(z, codebook, l2_normalize):
    # The max of a set is 1-Lipschitz, so each computed top-two gap is within 2 score bounds of the
    # exact gap, and two computations of it are within 4 of each other.
    return 4 * _score_error_bound(z, codebook, l2_normalize)


def _reference_gap(z, codebook, l2_normalize):
    top = _scores(z, codebook, l2_normalize).topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


@pytest.mark.parametrize("l2_normalize", [True, False])
@pytest.mark.parametrize("d", DIMS)
def test_indices_match_nearest_code_and_gap_matches_the_reference(isa, d, l2_normalize):
    z = torch.randn(203, d)  # odd M: a partial row block and a partial row group
    for codes in (2, 7, 33, 1029):  # none a multiple of any tile width
        codebook = torch.randn(codes, d)
        indices, gap = ops.nearest_code_with_gap(z, codebook, EPS, l2_normalize)
        assert indices.dtype == torch.int64 and gap.dtype == torch.float32
        assert torch.equal(indices, ops.nearest_code(z, codebook, EPS, l2_normalize))
        expected = _reference_gap(z, codebook, l2_normalize)
        tolerance = _gap_tolerance(z, codebook, l2_normalize)
        assert ((gap - expected).abs() <= tolerance).all(), (codes, (gap - expected).abs().max())


@pytest.mark.parametrize("d", DIMS)
def test_gap_is_exact_when_every_score_is_exact(isa, d):
    """Small integers with l2 off: every product and partial sum is an integer or half below 2^24,
    so the scores are exact in any summation order, and so are the winner and the gap. Ties are
    exercised on purpose: the large codebook repeats its first 514 codes (in later chunks)."""
    z = torch.randint(-16, 17, (149, d)).float()
    small = torch.randint(-16, 17, (23, d)).float()
    large = torch.randint(-16, 17, (515, d)).float()
    gaps = []
    for codebook in (small, torch.cat([large, large[:514]])):
        indices, gap = ops.nearest_code_with_gap(z, codebook, EPS, False)
        scores = _scores(z, codebook, False)
        top = scores.topk(2, dim=1).values
        assert torch.equal(indices, scores.argmax(dim=1))  # argmax returns the first maximum
        assert torch.equal(gap, top[:, 0] - top[:, 1])
        gaps.append(gap)
    gaps = torch.cat(gaps)
    assert (gaps == 0).any() and (gaps > 0).any()  # both ties and clear winners were tested


def test_gap_is_exact_for_d1(isa):
    """d = 1 with l2 on: every normalized value is exactly +-1, so every gap is exactly 0 or 2."""
    z = torch.randn(77, 1)
    codebook = torch.randn(40, 1)
    _, gap = ops.nearest_code_with_gap(z, codebook, EPS, True)
    assert torch.equal(gap, _reference_gap(z, codebook, True))


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_a_duplicated_best_code_gives_gap_zero_and_the_lower_index(isa, l2_normalize):
    z = torch.randn(65, 4)
    codebook = torch.randn(300, 4)
    doubled = torch.cat([codebook, codebook])  # each copy 300 codes apart: different chunks
    indices, gap = ops.nearest_code_with_gap(z, doubled, EPS, l2_normalize)
    assert torch.equal(indices, ops.nearest_code(z, codebook, EPS, l2_normalize))
    assert torch.equal(gap, torch.zeros_like(gap))


# (best, runner-up) code pairs; chunks hold 32, 64 or 128 codes (tiles of 4, 8 or 16 lanes).
RUNNER_UP_PLACES = {
    "in_a_later_chunk": (500, 1028),  # a chunk that never beats the best
    "in_an_earlier_chunk": (500, 0),  # the best so far when the best arrives
    "in_the_same_tile": (500, 501),
    "in_a_later_tile_of_the_same_chunk": (385, 414),  # below the best raised in that chunk
}


@pytest.mark.parametrize("where", RUNNER_UP_PLACES)
def test_the_runner_up_is_found_wherever_it_lies(isa, where):
    """One code is each row's best, a near copy of it the runner-up, every other code far worse;
    the lazy scan visits codes one by one only in chunks that beat the best, so the runner-up must
    be found also where it is never visited."""
    best, runner_up = RUNNER_UP_PLACES[where]
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(5, 1)
    codebook = -torch.rand(1029, 4) - 1  # scores < 0 (l2 on) for z along +x
    codebook[best] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    codebook[runner_up] = torch.tensor([1.0, 0.5, 0.0, 0.0])
    indices, gap = ops.nearest_code_with_gap(z, codebook, EPS, True)
    assert (indices == best).all()
    expected = 1.0 - (codebook[runner_up] / codebook[runner_up].norm())[0]
    torch.testing.assert_close(gap, expected.expand(5), rtol=0, atol=4 * 2.0**-24)


def test_a_nan_code_never_wins_nor_hides_a_better_code(isa):
    """Code 256 is the best (lane 0 of its tile for every tile width); codes 260, 264 and 272 (lane 0
    of the next tile for 4-, 8- and 16-wide tiles, same chunk) are NaN. A running maximum that let a
    NaN score replace a number would lose code 256's score and skip its chunk."""
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(3, 1)
    codebook = -torch.rand(1029, 4) - 1  # scores < 0 for z along +x
    codebook[0] = torch.tensor([0.5, 0.75**0.5, 0.0, 0.0])  # the best of the first chunk: 0.5
    codebook[256] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    codebook[[260, 264, 272]] = float("nan")
    for op in (ops.nearest_code, lambda *args: ops.nearest_code_with_gap(*args)[0]):
        assert (op(z, codebook, EPS, True) == 256).all()
    _, gap = ops.nearest_code_with_gap(z, codebook, EPS, True)
    torch.testing.assert_close(gap, torch.full((3,), 0.5), rtol=0, atol=4 * 2.0**-24)


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_a_single_code_has_infinite_gap(isa, l2_normalize):
    z = torch.randn(9, 3)
    for codebook in (torch.randn(1, 3), torch.full((1, 3), 3e38)):  # the second: its score overflows
        indices, gap = ops.nearest_code_with_gap(z, codebook, EPS, l2_normalize)
        assert torch.equal(indices, torch.zeros(9, dtype=torch.int64))
        assert torch.equal(gap, torch.full((9,), float("inf")))


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_rows_holding_nan_or_inf_give_index_0_and_infinite_gap(isa, l2_normalize):
    z = torch.randn(10, 4)
    z[2, 1] = float("nan")
    z[5, 0] = float("inf")
    z[7, 3] = -float("inf")
    codebook = torch.randn(50, 4)
    indices, gap = ops.nearest_code_with_gap(z, codebook, EPS, l2_normalize)
    bad = torch.tensor([2, 5, 7])
    assert (indices[bad] == 0).all() and (gap[bad] == float("inf")).all()
    good = torch.tensor([0, 1, 3, 4, 6, 8, 9])
    assert torch.equal(indices[good], ops.nearest_code(z[good], codebook, EPS, l2_normalize))
    assert torch.isfinite(gap[good]).all() and (gap[good] >= 0).all()


def test_scores_that_overflow_alike_are_a_tie():
    """l2 off with huge codes: every bias -||c||^2/2 overflows to -inf. float32 cannot rank the
    codes, so the gap says 'tie' (0), never NaN, and the caller re-decides in float64."""
    z = torch.randn(6, 2)
    codebook = torch.full((3, 2), 3e38)
    _, gap = ops.nearest_code_with_gap(z, codebook, EPS, False)
    assert torch.equal(gap, torch.zeros(6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.randn(33, 8).to(dtype)
    codebook = torch.randn(70, 8, dtype=compute)
    indices, gap = ops.nearest_code_with_gap(z, codebook, EPS, True)
    assert gap.dtype == compute
    assert torch.equal(indices, ops.nearest_code(z, codebook, EPS, True))
    z_compute = z.to(compute)
    tolerance = _gap_tolerance(z_compute, codebook, True)
    assert ((gap - _reference_gap(z_compute, codebook, True)).abs() <= tolerance).all()


def test_no_rows():
    indices, gap = ops.nearest_code_with_gap(torch.empty(0, 4), torch.randn(5, 4), EPS, True)
    assert indices.shape == (0,) and gap.shape == (0,) and gap.dtype == torch.float32


def test_bad_inputs_are_rejected_by_name():
    with pytest.raises(RuntimeError, match=r"gsq::nearest_code_with_gap: z has d=4 but the codebook has width 3"):
        ops.nearest_code_with_gap(torch.randn(2, 4), torch.randn(5, 3), EPS, True)
    with pytest.raises(RuntimeError, match=r"gsq::nearest_code_with_gap: the codebook must be Float"):
        ops.nearest_code_with_gap(torch.randn(2, 4), torch.randn(5, 4, dtype=torch.float64), EPS, True)


def test_group_sizes_beyond_the_32_bit_limit_are_rejected():
    """The kernels take d as a 32-bit int: a larger d must be refused, not truncated. Zero rows and
    an untouched (lazily mapped) codebook keep this cheap: only the argument check runs."""
    d = 2**31
    try:
        codebook = torch.empty(1, d)  # 8 GiB of address space, never written
    except RuntimeError:
        pytest.skip("cannot reserve 8 GiB of address space here")
    z = torch.empty(0, d)
    for op in (torch.ops.gsq.nearest_code, torch.ops.gsq.nearest_code_with_gap):
        with pytest.raises(RuntimeError, match=r"d=2147483648 exceeds the CPU kernels' limit of 2147483647"):
            op(z, codebook, EPS, True)


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_opcheck(l2_normalize):
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        for rows, d, codes in ((37, 4, 19), (5, 1, 3), (8, 16, 33), (0, 4, 5), (3, 2, 1)):
            z = torch.randn(rows, d).to(dtype)
            codebook = torch.randn(codes, d, dtype=compute)
            torch.library.opcheck(torch.ops.gsq.nearest_code_with_gap.default, (z, codebook, EPS, l2_normalize))


@pytest.mark.parametrize("l2_normalize", [True, False])
@pytest.mark.parametrize("d", [1, 4, 16])
def test_forward_with_gap_is_the_forward_and_the_gap_in_one_scan(isa, d, l2_normalize):
    """gsq::quantize_forward_with_gap: quantize_forward's outputs and nearest_code_with_gap's gap,
    bit for bit (the same kernel with every output on), NaN rows and V == 1 included."""
    z = torch.randn(203, d)
    z[5, 0] = float("nan")
    for codes in (1, 19, 300):
        codebook = torch.randn(codes, d)
        quantized, indices, loss_rows, gap = torch.ops.gsq.quantize_forward_with_gap(
            z, codebook, 0.25, EPS, l2_normalize
        )
        expected = torch.ops.gsq.quantize_forward(z, codebook, 0.25, EPS, l2_normalize)
        assert torch.equal(quantized, expected[0]) and torch.equal(indices, expected[1])
        assert torch.equal(loss_rows.nan_to_num(-1.0), expected[2].nan_to_num(-1.0))
        assert torch.equal(gap, torch.ops.gsq.nearest_code_with_gap(z, codebook, EPS, l2_normalize)[1])


def test_forward_with_gap_opcheck():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        for rows, d, codes in ((37, 4, 19), (0, 4, 5), (3, 2, 1)):
            z = torch.randn(rows, d).to(dtype)
            codebook = torch.randn(codes, d, dtype=compute)
            args = (z, codebook, 0.25, EPS, True)
            torch.library.opcheck(torch.ops.gsq.quantize_forward_with_gap.default, args)


def test_torch_compile_fullgraph():
    def lookup(z, codebook):
        indices, gap = ops.nearest_code_with_gap(z, codebook, EPS, True)
        return indices, gap.clamp_max(1.0)  # an op after it, so the output is traced through

    torch._dynamo.reset()
    compiled = torch.compile(lookup, fullgraph=True)
    z = torch.randn(14, 4)
    codebook = torch.randn(64, 4)
    indices, gap = compiled(z, codebook)
    expected_indices, expected_gap = lookup(z, codebook)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(gap, expected_gap)
