"""The CUDA kernels' logic, tested on the CPU: csrc/cuda/gsq_cuda_kernels.cu compiled as C++ against
csrc/cuda/gsq_cuda_emulation.h (each block's threads run as CPU threads; barriers and warp
shuffles are real synchronization), then compared with the reference like any backend.

This checks indexing, tiling, tie-breaking, masking, the warp reductions and the deterministic
codebook-gradient reduction without a GPU. It does not check what only hardware shows (memory
races the emulation serializes, real shuffle semantics under divergence, speed): tests/
test_cuda_backend.py runs the compiled kernels on a GPU, and compute-sanitizer recipes are in the
.cu file.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from gsq_kernels import reference, spherical_init

from parity import assert_close_to_truth, separated_group_rows

ROOT = Path(__file__).resolve().parents[1]
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the emulated CUDA kernels")
    library = tmp_path_factory.mktemp("cuda_emulation") / "gsq_cuda_emulated.so"
    command = [
        compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DGSQ_CUDA_EMULATION",
        f"-I{ROOT / 'csrc' / 'cuda'}", "-x", "c++", str(ROOT / "csrc" / "cuda" / "gsq_cuda_kernels.cu"),
        "-x", "c++", str(ROOT / "tests" / "cuda_emulation" / "gsq_cuda_emulated_api.cpp"), "-o", str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    i64, dbl, ptr, cint = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    lib.gsq_emulated_forward.argtypes = [ptr, cint, i64, cint, ptr, i64, dbl, dbl, cint, ptr, ptr, ptr]
    lib.gsq_emulated_backward.argtypes = [ptr, ptr, cint, ptr, ptr, ptr, i64, i64, cint, dbl, dbl, cint, ptr, ptr]
    return lib


def _compute(z):
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def emulated_forward(lib, z, codebook, beta, eps, l2_normalize):
    rows, dim = z.shape
    quantized = torch.full_like(z, float("nan"))  # poisoned: every element must be written
    indices = torch.full((rows,), -1, dtype=torch.int64)
    loss_rows = torch.full((rows,), float("nan"), dtype=_compute(z))
    status = lib.gsq_emulated_forward(z.data_ptr(), DTYPE_TAGS[z.dtype], rows, dim, codebook.data_ptr(),
                                      codebook.shape[0], beta, eps, int(l2_normalize), quantized.data_ptr(),
                                      indices.data_ptr(), loss_rows.data_ptr())
    assert status == 0
    return quantized, indices, loss_rows


def emulated_backward(lib, grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize):
    grad_z = torch.full_like(z, float("nan"))
    grad_codebook = torch.full_like(codebook, float("nan"))
    status = lib.gsq_emulated_backward(z.data_ptr(), grad_quantized.data_ptr(), DTYPE_TAGS[z.dtype],
                                       grad_loss_rows.data_ptr(), codebook.data_ptr(), indices.data_ptr(),
                                       z.shape[0], codebook.shape[0], z.shape[1], beta, eps,
                                       int(l2_normalize), grad_z.data_ptr(), grad_codebook.data_ptr())
    assert status == 0
    return grad_z, grad_codebook


def _reference_with_grads(z, codebook, weights, loss_weight, beta, eps, l2_normalize):
    z = z.detach().clone().requires_grad_()
    codebook = codebook.detach().clone().requires_grad_()
    quantized, indices, loss = reference.quantize(z, codebook, beta, eps, l2_normalize)
    ((quantized.double() * weights).sum() + loss_weight * loss.double()).backward()
    return quantized, indices, loss, z.grad, codebook.grad


# d in {1, 2, 3, 4, 8} takes the small-d kernel; 5, 16, 64 the tiled kernel. Row and code counts
# straddle the block sizes (256 rows / 256 codes, 64 rows / 128 codes).
CASES = [(1, 300, 37), (2, 260, 101), (3, 70, 129), (4, 513, 300), (8, 90, 257), (5, 66, 130),
         (16, 130, 129), (64, 65, 200), (4, 40, 2), (16, 30, 1)]


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
    ref_q, ref_idx, ref_loss, ref_gz, ref_gc = _reference_with_grads(z, codebook, weights, loss_weight, beta, eps,
                                                                     l2_normalize)
    true_q, true_idx, true_loss, true_gz, true_gc = _reference_with_grads(z.double(), codebook.double(), weights,
                                                                          loss_weight, beta, eps, l2_normalize)
    assert torch.equal(indices, ref_idx)
    assert torch.equal(quantized, ref_q)
    loss = loss_rows.sum() / z.numel()
    assert_close_to_truth(loss, ref_loss, true_loss, dtype, "loss")

    # upstream gradients as autograd would deliver them for the same total
    grad_quantized = weights.to(dtype)
    grad_loss_rows = torch.full((rows,), loss_weight / z.numel(), dtype=_compute(z))
    grad_z, grad_codebook = emulated_backward(kernels, grad_quantized, grad_loss_rows, z, codebook, indices,
                                              beta, eps, l2_normalize)
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
    runs = [emulated_backward(kernels, torch.randn(700, 4, generator=torch.Generator().manual_seed(1)),
                              grad_loss_rows, z, codebook, indices, 0.25, 1e-12, True)[1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    n = reference.l2(z.double(), 1e-12)
    expected = 2 * (grad_loss_rows.double()[:, None] * (codebook[9].double() - n)).sum(0)
    torch.testing.assert_close(runs[0][9].double(), expected, rtol=1e-5, atol=1e-6)
    assert (runs[0][torch.arange(50) != 9] == 0).all()
