"""The CUDA kernels' logic, tested on the CPU: csrc/cuda/gsq_cuda_kernels.cu compiled as C++ against
csrc/cuda/gsq_cuda_emulation.h (each block's threads run as CPU threads; barriers and warp
shuffles are real synchronization), then compared with the reference like any backend.

This checks indexing, tiling, tie-breaking, masking, the warp reductions, the runner-up tracking
of nearest_code_with_gap and the deterministic codebook-gradient reduction without a GPU, plus
what the emulation records and a GPU would not report: the launch configurations and counters the
kernels bump (how often the lazy lookup resolves a chunk exactly, how many rows one warp sums).
It does not check what only hardware shows (memory races the emulation serializes, real shuffle
semantics under divergence, speed): tests/test_cuda_backend.py runs the compiled kernels on a GPU,
and compute-sanitizer recipes are in the .cu file.
"""

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from gsq_kernels import reference, spherical_init
from gsq_kernels.lookup import lookup_vectors, nearest_code_float64
from parity import assert_close_to_truth, assert_indices_match, gap_tolerance, separated_group_rows
from sorted_cases import HARD_CASES, hard_codebook

ROOT = Path(__file__).resolve().parents[1]
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the emulated CUDA kernels")
    library = tmp_path_factory.mktemp("cuda_emulation") / "gsq_cuda_emulated.so"
    command = [
        compiler,
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        "-pthread",
        "-DGSQ_CUDA_EMULATION",
        f"-I{ROOT / 'csrc' / 'cuda'}",
        f"-I{ROOT / 'csrc'}",
        "-x",
        "c++",
        str(ROOT / "csrc" / "cuda" / "gsq_cuda_kernels.cu"),
        "-x",
        "c++",
        str(ROOT / "tests" / "cuda_emulation" / "gsq_cuda_emulated_api.cpp"),
        "-o",
        str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    i64, dbl, ptr, cint = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    lib.gsq_emulated_forward.argtypes = [ptr, cint, i64, cint, ptr, i64, dbl, dbl, cint, ptr, ptr, ptr]
    lib.gsq_emulated_backward.argtypes = [ptr, ptr, cint, ptr, ptr, ptr, i64, i64, cint, dbl, dbl, cint, ptr, ptr]
    lib.gsq_emulated_lookup.argtypes = [ptr, cint, i64, cint, ptr, i64, dbl, cint, ptr, ptr]
    lib.gsq_emulated_sorted_search.argtypes = [ptr, i64, cint, ptr, i64, dbl, cint, ptr]
    lib.gsq_emulated_reset_records.argtypes = []
    lib.gsq_emulated_launches.argtypes = [ctypes.c_char_p, i64]
    lib.gsq_emulated_launches.restype = i64
    lib.gsq_emulated_probe.argtypes = [ctypes.c_char_p]
    lib.gsq_emulated_probe.restype = i64
    return lib


def _compute(z):
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def emulated_forward(lib, z, codebook, beta, eps, l2_normalize):
    rows, dim = z.shape
    quantized = torch.full_like(z, float("nan"))  # poisoned: every element must be written
    indices = torch.full((rows,), -1, dtype=torch.int64)
    loss_rows = torch.full((rows,), float("nan"), dtype=_compute(z))
    status = lib.gsq_emulated_forward(
        z.data_ptr(),
        DTYPE_TAGS[z.dtype],
        rows,
        dim,
        codebook.data_ptr(),
        codebook.shape[0],
        beta,
        eps,
        int(l2_normalize),
        quantized.data_ptr(),
        indices.data_ptr(),
        loss_rows.data_ptr(),
    )
    assert status == 0
    return quantized, indices, loss_rows


def emulated_lookup(lib, z, codebook, eps, l2_normalize, with_gap=True):
    """(indices, gap) of the fused lookup; gap is None when not asked for (the nearest_code path)."""
    rows, dim = z.shape
    indices = torch.full((rows,), -1, dtype=torch.int64)
    gap = torch.full((rows,), float("nan"), dtype=_compute(z)) if with_gap else None
    status = lib.gsq_emulated_lookup(
        z.data_ptr(),
        DTYPE_TAGS[z.dtype],
        rows,
        dim,
        codebook.data_ptr(),
        codebook.shape[0],
        eps,
        int(l2_normalize),
        indices.data_ptr(),
        gap.data_ptr() if with_gap else None,
    )
    assert status == 0
    return indices, gap


def launches(lib):
    """[(kernel, blocks, threads)] since the last reset_records."""
    size = lib.gsq_emulated_launches(None, 0)
    text = ctypes.create_string_buffer(size)
    lib.gsq_emulated_launches(text, size)
    return [
        (name, int(blocks), int(threads))
        for name, blocks, threads in (line.split() for line in text.value.decode().splitlines())
    ]


def emulated_backward(lib, grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize):
    grad_z = torch.full_like(z, float("nan"))
    grad_codebook = torch.full_like(codebook, float("nan"))
    status = lib.gsq_emulated_backward(
        z.data_ptr(),
        grad_quantized.data_ptr(),
        DTYPE_TAGS[z.dtype],
        grad_loss_rows.data_ptr(),
        codebook.data_ptr(),
        indices.data_ptr(),
        z.shape[0],
        codebook.shape[0],
        z.shape[1],
        beta,
        eps,
        int(l2_normalize),
        grad_z.data_ptr(),
        grad_codebook.data_ptr(),
    )
    assert status == 0
    return grad_z, grad_codebook


def _reference_with_grads(z, codebook, weights, loss_weight, beta, eps, l2_normalize):
    z = z.detach().clone().requires_grad_()
    codebook = codebook.detach().clone().requires_grad_()
    quantized, indices, loss = reference.quantize(z, codebook, beta, eps, l2_normalize)
    ((quantized.double() * weights).sum() + loss_weight * loss.double()).backward()
    return quantized, indices, loss, z.grad, codebook.grad


# d in {1, 2, 3, 4, 8} takes the small-d kernel; 5, 16, 64 the tiled kernel. Row and code counts
# straddle the block sizes (small-d: 192 rows / 256-code tiles / 8-code chunks; tiled: 64 rows / 128 codes).
CASES = [
    (1, 300, 37),
    (2, 260, 101),
    (3, 70, 129),
    (4, 513, 300),
    (8, 90, 257),
    (5, 66, 130),
    (16, 130, 129),
    (64, 65, 200),
    (4, 40, 2),
    (16, 30, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("d,rows,codes", CASES, ids=str)
@pytest.mark.parametrize("l2_normalize", [True, False], ids=["l2", "raw"])
def test_emulated_cuda_kernels_match_reference(kernels, dtype, d, rows, codes, l2_normalize):
    beta, eps, loss_weight = 0.25, 1e-12, 3.0
    codebook = spherical_init(codes, d).to(_compute(torch.empty(0, dtype=dtype)))
    if not l2_normalize:
        codebook = codebook * torch.rand(codes, 1, dtype=codebook.dtype).add(0.5)
    z = separated_group_rows(torch.randn(rows, d, dtype=torch.float64).to(dtype), codebook, eps, l2_normalize)

    quantized, indices, loss_rows = emulated_forward(kernels, z, codebook, beta, eps, l2_normalize)
    weights = torch.linspace(-1, 1, z.numel(), dtype=torch.float64).reshape(z.shape)
    ref_q, ref_idx, ref_loss, ref_gz, ref_gc = _reference_with_grads(
        z, codebook, weights, loss_weight, beta, eps, l2_normalize
    )
    true_q, true_idx, true_loss, true_gz, true_gc = _reference_with_grads(
        z.double(), codebook.double(), weights, loss_weight, beta, eps, l2_normalize
    )
    assert torch.equal(indices, ref_idx)
    assert torch.equal(quantized, ref_q)
    loss = loss_rows.sum() / z.numel()
    assert_close_to_truth(loss, ref_loss, true_loss, dtype, "loss")

    # upstream gradients as autograd would deliver them for the same total
    grad_quantized = weights.to(dtype)
    grad_loss_rows = torch.full((rows,), loss_weight / z.numel(), dtype=_compute(z))
    grad_z, grad_codebook = emulated_backward(
        kernels, grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize
    )
    assert_close_to_truth(grad_z, ref_gz, true_gz, dtype, "dL/dz")
    assert_close_to_truth(grad_codebook, ref_gc, true_gc, dtype, "dL/dcodebook")


def test_emulated_ties_zero_vectors_and_non_finite_rows(kernels):
    codebook = spherical_init(300, 4)
    codebook[250] = codebook[7]  # a later duplicate
    z = torch.randn(20, 4)
    z[0] = codebook[7] * 3
    z[1] = 0  # ties with everything -> 0
    z[2, 1] = float("nan")
    z[3, 0] = float("inf")
    for l2 in (True, False):
        _, indices, _ = emulated_forward(kernels, z, codebook, 0.25, 1e-12, l2)
        assert indices[0].item() == 7
        assert indices[2].item() == 0 and indices[3].item() == 0  # non-finite rows
        assert ((indices >= 0) & (indices < 300)).all()
        assert torch.equal(indices, reference.nearest_code(z, codebook, 1e-12, l2))
    _, indices, _ = emulated_forward(kernels, z, codebook, 0.25, 1e-12, True)
    assert indices[1].item() == 0
    wide = torch.zeros(5, 16)  # tiled path
    wide_codebook = spherical_init(200, 16)
    wide_codebook[150] = wide_codebook[3]
    wide[0] = wide_codebook[3]
    _, indices, _ = emulated_forward(kernels, wide, wide_codebook, 0.25, 1e-12, True)
    assert indices.tolist() == [3, 0, 0, 0, 0]


def test_emulated_codebook_gradient_is_deterministic(kernels):
    codebook = -torch.randn(50, 4).abs()
    codebook[9] = 1.0  # every row below picks code 9: one long segment
    z = torch.rand(700, 4) + 0.5
    _, indices, _ = emulated_forward(kernels, z, codebook, 0.25, 1e-12, True)
    assert (indices == 9).all()
    grad_loss_rows = torch.rand(700)
    runs = [
        emulated_backward(
            kernels,
            torch.randn(700, 4, generator=torch.Generator().manual_seed(1)),
            grad_loss_rows,
            z,
            codebook,
            indices,
            0.25,
            1e-12,
            True,
        )[1]
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    n = reference.l2(z.double(), 1e-12)
    expected = 2 * (grad_loss_rows.double()[:, None] * (codebook[9].double() - n)).sum(0)
    torch.testing.assert_close(runs[0][9].double(), expected, rtol=1e-5, atol=1e-6)
    assert (runs[0][torch.arange(50) != 9] == 0).all()


def test_emulated_codebook_gradient_is_parallel_over_the_rows_of_one_code(kernels):
    """Every row on code 0 (a collapsed codebook): the rows are summed by many warps in chunks of
    at most 256 sorted rows, never by the single warp that owns the code."""
    rows, d = 5000, 4
    codebook = -torch.rand(20, d) - 1
    codebook[0] = 1.0
    z = torch.rand(rows, d) + 0.5
    indices = torch.zeros(rows, dtype=torch.int64)
    grad_loss_rows = torch.rand(rows)
    grad_quantized = torch.randn(rows, d)
    kernels.gsq_emulated_reset_records()
    first = emulated_backward(kernels, grad_quantized, grad_loss_rows, z, codebook, indices, 0.25, 1e-12, True)[1]
    assert kernels.gsq_emulated_probe(b"grad_rows_per_warp_sum") <= 256
    chunk_warps = sum(
        blocks * threads // 32 for name, blocks, threads in launches(kernels) if name == "codebook_grad_chunks"
    )
    assert chunk_warps >= math.ceil(rows / 256)
    second = emulated_backward(kernels, grad_quantized, grad_loss_rows, z, codebook, indices, 0.25, 1e-12, True)[1]
    assert torch.equal(first, second)
    n = reference.l2(z.double(), 1e-12)
    expected = 2 * (grad_loss_rows.double()[:, None] * (codebook[0].double() - n)).sum(0)
    torch.testing.assert_close(first[0].double(), expected, rtol=1e-5, atol=1e-5)
    assert (first[1:] == 0).all()


# nearest_code_with_gap ------------------------------------------------------------------------


def _fp32_scores(z, codebook, eps, l2_normalize):
    """The reference's scores in the compute dtype, and per row the largest |term| sum that bounds
    their rounding error (sum_k |n_k c_jk| + |bias_j|, maximized over j)."""
    compute = _compute(z)
    zc, cc = z.to(compute), codebook.to(compute)
    n = reference.l2(zc, eps) if l2_normalize else zc
    c = reference.l2(cc, eps) if l2_normalize else cc
    bias = torch.zeros(c.shape[0], dtype=compute) if l2_normalize else -(c * c).sum(-1) / 2
    magnitude = (n.abs().double() @ c.abs().double().T + bias.abs().double()).amax(-1)
    return reference.scores(zc, cc, eps, l2_normalize), magnitude


def _assert_gap_matches_reference(indices, gap, z, codebook, eps, l2_normalize):
    scores, magnitude = _fp32_scores(z, codebook, eps, l2_normalize)
    top = torch.topk(scores, 2, dim=-1).values
    expected = top[:, 0] - top[:, 1]
    unit = 2.0**-52 if z.dtype == torch.float64 else 2.0**-24
    # Each score carries at most (d + 4) roundings of `magnitude` in either implementation (the
    # normalizations plus a d-term dot product): gap_tolerance scales that by 4 for two scores.
    tolerance = gap_tolerance(z.shape[1]) / 2.0**-24 * unit * (1 + magnitude)
    err = (gap.double() - expected.double()).abs()
    assert (err <= tolerance).all(), f"gap off by {err.max().item():.3e} > {tolerance[err.argmax()].item():.3e}"


GAP_CASES = [
    (1, 301, 37),
    (2, 259, 1001),
    (3, 71, 129),
    (4, 193, 300),
    (8, 97, 257),
    (5, 67, 131),
    (16, 65, 129),
    (64, 33, 200),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("d,rows,codes", GAP_CASES, ids=str)
@pytest.mark.parametrize("l2_normalize", [True, False], ids=["l2", "raw"])
def test_emulated_gap_matches_reference_scores(kernels, dtype, d, rows, codes, l2_normalize):
    generator = torch.Generator().manual_seed(d * 1000 + rows)
    codebook = torch.randn(codes, d, generator=generator).to(_compute(torch.empty(0, dtype=dtype)))
    z = torch.randn(rows, d, generator=generator).to(dtype)
    indices, gap = emulated_lookup(kernels, z, codebook, 1e-12, l2_normalize)
    plain, _ = emulated_lookup(kernels, z, codebook, 1e-12, l2_normalize, with_gap=False)
    assert torch.equal(indices, plain)  # nearest_code's indices, bit for bit
    assert gap.dtype == _compute(z) and (gap >= 0).all()
    assert_indices_match(
        indices, reference.nearest_code(z, codebook, 1e-12, l2_normalize), z, codebook, 1e-12, l2_normalize
    )
    _assert_gap_matches_reference(indices, gap, z, codebook, 1e-12, l2_normalize)


@pytest.mark.parametrize("d", [2, 16], ids=["small_d", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("where", ["first", "same_chunk", "next_lane", "last"])
def test_emulated_runner_up_is_found_wherever_it_lies(kernels, d, dtype, where):
    """Code 300 is every row's best, a near copy the runner-up, every other code far worse. A lazy
    scan that resolved a chunk only when it beat the best would miss a runner-up in a later chunk."""
    codebook = -torch.rand(517, d, dtype=dtype) - 1
    codebook[300] = 0
    codebook[300, 0] = 1
    runner_up = {"first": 0, "same_chunk": 301, "next_lane": 304, "last": 516}[where]
    codebook[runner_up] = 0
    codebook[runner_up, :2] = torch.tensor([1.0, 0.5], dtype=dtype)
    z = torch.zeros(70, d, dtype=dtype)
    z[:, 0] = torch.rand(70, dtype=dtype) + 0.5
    indices, gap = emulated_lookup(kernels, z, codebook, 1e-12, True)
    assert (indices == 300).all()
    expected = 1 - codebook[runner_up, 0] / codebook[runner_up].norm()  # n = e_0 exactly: scores exact
    assert torch.equal(gap, expected.expand(70))


@pytest.mark.parametrize("d", [4, 16], ids=["small_d", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("l2_normalize", [True, False], ids=["l2", "raw"])
def test_emulated_ties_give_gap_zero_and_the_lower_index(kernels, d, dtype, l2_normalize):
    generator = torch.Generator().manual_seed(d)
    codebook = torch.randn(300, d, generator=generator, dtype=dtype)
    z = torch.randn(65, d, generator=generator, dtype=dtype)
    doubled = torch.cat([codebook, codebook])  # copies 300 codes apart: other chunks and tiles
    indices, gap = emulated_lookup(kernels, z, doubled, 1e-12, l2_normalize)
    assert torch.equal(indices, emulated_lookup(kernels, z, codebook, 1e-12, l2_normalize, with_gap=False)[0])
    assert torch.equal(gap, torch.zeros_like(gap))


@pytest.mark.parametrize("d", [4, 16], ids=["small_d", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("l2_normalize", [True, False], ids=["l2", "raw"])
def test_emulated_single_code_and_non_finite_rows(kernels, d, dtype, l2_normalize):
    z = torch.randn(20, d, dtype=dtype)
    z[2, 1] = float("nan")
    z[5, 0] = float("inf")
    z[7, d - 1] = -float("inf")
    bad = torch.tensor([2, 5, 7])
    for codebook in (torch.randn(1, d, dtype=dtype), torch.randn(40, d, dtype=dtype)):
        indices, gap = emulated_lookup(kernels, z, codebook, 1e-12, l2_normalize)
        assert (indices[bad] == 0).all() and (gap[bad] == math.inf).all()
        if codebook.shape[0] == 1:
            assert (indices == 0).all() and (gap == math.inf).all()
        else:
            assert torch.isfinite(gap[[0, 1, 3]]).all()
    if dtype == torch.float32:  # every score overflows alike (l2 off, huge codes): a tie, never NaN
        indices, gap = emulated_lookup(kernels, z[:2], torch.full((3, d), 3e38), 1e-12, False)
        assert (gap == 0).all()


def test_emulated_small_d_lookup_resolves_few_chunks_exactly(kernels):
    """At V = 8192 on random unit vectors, the small-d scan must resolve (offer code by code) at
    most a quarter of the (row, code) pairs it scores, for nearest_code and for the gap. Deciding
    per whole warp and per 256-code tile, as the first version did, re-scored about 65%."""
    generator = torch.Generator().manual_seed(0)
    codebook = reference.l2(torch.randn(8192, 2, generator=generator), 1e-12)
    z = torch.randn(384, 2, generator=generator)
    for with_gap in (False, True):
        kernels.gsq_emulated_reset_records()
        emulated_lookup(kernels, z, codebook, 1e-12, True, with_gap=with_gap)
        scanned = kernels.gsq_emulated_probe(b"small_d_scanned")
        resolved = kernels.gsq_emulated_probe(b"small_d_resolved")
        assert scanned >= 384 // 32 * 8192 and 0 < resolved <= scanned / 4, (with_gap, resolved / scanned)


def test_emulated_small_d_launch_gives_each_thread_several_rows(kernels):
    """Several rows per thread (each shared-memory read of a code feeds all of them), while the
    headline size (M = 131,072 group vectors on a 132-SM H100) still gets 8-16 warps per SM."""
    rows = 3 * 4 * 64 * 5  # divisible by any rows-per-block this kernel could use
    z = torch.randn(rows, 4)
    kernels.gsq_emulated_reset_records()
    emulated_lookup(kernels, z, torch.randn(10, 4), 1e-12, True)
    ((blocks, threads),) = [(b, t) for name, b, t in launches(kernels) if name == "lookup_small_d"]
    rows_per_thread = rows / (blocks * threads)
    assert rows_per_thread >= 3
    warps_per_sm = 131_072 / rows_per_thread / 32 / 132
    assert 8 <= warps_per_sm <= 16


# The sorted search (d <= 2) ------------------------------------------------------------------


def emulated_sorted_search(lib, z, codebook, l2_normalize=True):
    rows, dim = z.shape
    indices = torch.full((rows,), -7, dtype=torch.int64)  # poisoned: every row must be written
    z, codebook = z.float().contiguous(), codebook.float().contiguous()
    status = lib.gsq_emulated_sorted_search(
        z.data_ptr(), rows, dim, codebook.data_ptr(), codebook.shape[0], 1e-12, int(l2_normalize), indices.data_ptr()
    )
    assert status == 0
    return indices


def _oracle(z, codebook, l2_normalize=True):
    return nearest_code_float64(*lookup_vectors(z, codebook, 1e-12, l2_normalize))


@pytest.mark.parametrize("case", HARD_CASES)
def test_sorted_search_hard_codebooks(kernels, case):
    z, codebook = hard_codebook(case, small=True)
    assert torch.equal(emulated_sorted_search(kernels, z, codebook), _oracle(z, codebook))


@pytest.mark.parametrize("num_codes", [1, 2, 3, 11, 1000])
@pytest.mark.parametrize("l2_normalize", [True, False])
def test_sorted_search_d1(kernels, num_codes, l2_normalize):
    torch.manual_seed(2)
    codebook = torch.randn(num_codes, 1)
    codebook[num_codes // 2] = codebook[0]
    z = torch.cat([torch.randn(300, 1) * 2, codebook[:5] + 0.0, torch.tensor([[1e3], [-1e3], [0.0]])])
    got = emulated_sorted_search(kernels, z, codebook, l2_normalize)
    assert torch.equal(got, _oracle(z, codebook, l2_normalize))


def test_sorted_search_random_rows_and_non_finite(kernels):
    codebook = spherical_init(4099, 2)
    codebook[[3, 50]] = float("nan")
    z = torch.randn(700, 2)
    z[[0, 5]] = float("inf")
    got = emulated_sorted_search(kernels, z, codebook)
    assert got[[0, 5]].tolist() == [0, 0]
    finite = torch.isfinite(codebook).all(1)
    expected = torch.arange(4099)[finite][_oracle(z, codebook[finite])]
    assert torch.equal(got[2:5], expected[2:5]) and torch.equal(got[6:], expected[6:])


def test_sorted_search_rejects_what_it_does_not_cover(kernels):
    """d = 2 with l2 off has no angle to sort by; the launcher refuses it (the glue says why)."""
    indices = torch.zeros(3, dtype=torch.int64)
    z, codebook = torch.randn(3, 2), torch.randn(5, 2)
    status = kernels.gsq_emulated_sorted_search(
        z.data_ptr(), 3, 2, codebook.data_ptr(), 5, 1e-12, 0, indices.data_ptr()
    )
    assert status != 0
