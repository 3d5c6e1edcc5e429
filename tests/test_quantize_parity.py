"""Every available backend against the reference: indices, forward values, loss and gradients.

Inputs are drawn without near-ties (tests/parity.py), so indices must be identical, the forward
value (a raw codebook row cast to z's dtype) bit-identical, and the loss and gradients within the
error bound of tests/parity.py (at most 2x the reference's own error in the same precision,
measured against a float64 run of the reference). Random-input index agreement with near-ties left in is
tested separately with the documented gap exclusion.
"""

import pytest
import torch

from gsq_kernels import grouped_spherical_quantize, nearest_code_indices, spherical_init
from parity import (
    DTYPES_CPU,
    assert_close_to_truth,
    assert_indices_match,
    backends_for,
    separated_latent,
    triton_interpreted,
)

# (device, backend): every non-reference backend available for each device present. The
# reference (the oracle) always runs on the CPU.
DEVICE_BACKENDS = [("cpu", b) for b in backends_for("cpu")]
if torch.cuda.is_available():
    DEVICE_BACKENDS += [("cuda", b) for b in backends_for("cuda")]
DTYPES = DTYPES_CPU  # float32, float16, bfloat16

# (shape, groups, V): every d the issue names, odd sizes, V not a multiple of any block size.
CASES = [
    ((2, 8, 5, 7), 2, 1000),  # image maps, d=4
    ((3, 13, 16), 16, 37),  # sequences, d=1
    ((2, 11, 8), 4, 1001),  # d=2 (V ~ 1000: on a circle, denser codebooks leave no row untied)
    ((1, 12, 3, 3), 4, 129),  # image, d=3
    ((2, 7, 64), 8, 257),  # d=8
    ((1, 9, 64), 4, 517),  # d=16
    ((1, 5, 64), 1, 300),  # d=64
    ((2, 9, 4), 1, 2),  # V=2
    ((2, 5, 64), 16, 1),  # V=1: everything maps to code 0
]


def _skip_unsupported(device: str, backend: str, dtype: torch.dtype) -> None:
    if device == "cpu" and backend == "triton" and triton_interpreted() and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in Triton's CPU interpreter; checked on a GPU")


def _run(z, codebook, groups, backend, l2_normalize, beta=0.25, device="cpu"):
    """Forward + backward on `device`; results come back to the CPU."""
    z = z.detach().clone().to(device).requires_grad_()
    codebook = codebook.detach().clone().to(device).requires_grad_()
    out = grouped_spherical_quantize(z, codebook, groups, beta=beta, l2_normalize=l2_normalize, backend=backend)
    # An upstream gradient on the output plus a scaled loss exercises both surrogate paths.
    weights = torch.linspace(-1, 1, out.quantized.numel(), dtype=torch.float64, device=device)
    total = (out.quantized.double() * weights.reshape(out.quantized.shape)).sum() + 3.0 * out.loss.double()
    total.backward()
    out = type(out)(*(t.detach().cpu() for t in out))
    return out, z.grad.cpu(), codebook.grad.cpu()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,num_codes", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("l2_normalize", [True, False], ids=["l2", "raw"])
def test_matches_reference(device, backend, dtype, shape, groups, num_codes, l2_normalize):
    _skip_unsupported(device, backend, dtype)
    channels = shape[1] if len(shape) == 4 else shape[-1]
    codebook = spherical_init(num_codes, channels // groups)
    if not l2_normalize:  # codes of different lengths make the Euclidean lookup differ from cosine
        codebook = codebook * torch.rand(num_codes, 1).add(0.5)
    z = separated_latent(shape, groups, codebook, dtype, l2_normalize=l2_normalize)

    out, grad_z, grad_codebook = _run(z, codebook, groups, backend, l2_normalize, device=device)
    ref, ref_grad_z, ref_grad_codebook = _run(z, codebook, groups, "reference", l2_normalize)
    truth, true_grad_z, true_grad_codebook = _run(z.double(), codebook.double(), groups, "reference", l2_normalize)

    assert out.indices.dtype == torch.int64 and out.indices.shape == ref.indices.shape
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(truth.indices, ref.indices)
    assert out.quantized.dtype == dtype and out.quantized.shape == z.shape
    assert torch.equal(out.quantized, ref.quantized)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close_to_truth(out.loss, ref.loss, truth.loss, dtype, "loss")
    assert grad_z.dtype == dtype
    assert_close_to_truth(grad_z, ref_grad_z, true_grad_z, dtype, "dL/dz")
    assert_close_to_truth(grad_codebook, ref_grad_codebook, true_grad_codebook, dtype, "dL/dcodebook")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=lambda x: str(x))
@pytest.mark.parametrize("d", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("l2_normalize", [True, False], ids=["l2", "raw"])
def test_random_inputs_agree_except_near_ties(device, backend, d, l2_normalize):
    """Plain random latents (near-ties left in): only rows with a top-2 gap < gap_tolerance(d) may differ."""
    groups = 4
    z = torch.randn(3, 33, groups * d)
    codebook = torch.randn(4099, d)  # not normalized: the lookup normalizes it
    expected = nearest_code_indices(z, codebook, groups, l2_normalize=l2_normalize, backend="reference")
    z_dev, codebook_dev = z.to(device), codebook.to(device)
    got = nearest_code_indices(z_dev, codebook_dev, groups, l2_normalize=l2_normalize, backend=backend).cpu()
    assert_indices_match(got, expected, z.reshape(-1, d), codebook, 1e-12, l2_normalize)
    out = grouped_spherical_quantize(z_dev, codebook_dev, groups, l2_normalize=l2_normalize, backend=backend)
    assert_indices_match(out.indices.cpu(), expected, z.reshape(-1, d), codebook, 1e-12, l2_normalize)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=lambda x: str(x))
def test_large_codebook(device, backend):
    """V = 2^20 codes, a handful of rows: streamed in tiles, never an N x V matrix."""
    generator = torch.Generator().manual_seed(5)
    codebook = spherical_init(1 << 20, 4, generator=generator)
    z = torch.randn(1, 6, 8, generator=generator)
    got = nearest_code_indices(z.to(device), codebook.to(device), 2, backend=backend).cpu()
    expected = nearest_code_indices(z, codebook, 2, backend="reference")
    assert_indices_match(got, expected, z.reshape(-1, 4), codebook, 1e-12, True)
    assert int(got.max()) < (1 << 20)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=lambda x: str(x))
@pytest.mark.parametrize("groups", [1, 4, 16])
def test_groups_share_one_codebook(device, backend, groups):
    """Splitting D into G groups is the same as quantizing the G group vectors as separate rows."""
    d = 2
    codebook = spherical_init(50, d).to(device)
    z = separated_latent((2, 3, groups * d), groups, codebook.cpu(), torch.float32).to(device)
    out = grouped_spherical_quantize(z, codebook, groups, backend=backend)
    as_rows = grouped_spherical_quantize(z.reshape(-1, d), codebook, 1, backend=backend)
    assert torch.equal(out.indices.reshape(-1), as_rows.indices.reshape(-1))
    assert torch.equal(out.quantized.reshape(-1, d), as_rows.quantized)


@pytest.mark.parametrize("num_codes", [3000, 70_000, 5_000_000])
def test_codebook_gradient_with_few_rows_for_many_codes(num_codes):
    """Few rows against many codes (rows are grouped by a radix sort, 1 to 3 passes): each chosen
    code gets 2 sum_i w_i (c_j - n_i) over its rows, every other code zero."""
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(40, 3, generator=generator)
    codebook = torch.randn(num_codes, 3, generator=generator)
    # Shared codes, and codes that differ only in their high bits (the later passes decide them).
    chosen = torch.tensor([num_codes - 1, 0, 2047, 2048, 2047 + 2048 * 2, num_codes // 2]) % num_codes
    indices = chosen[torch.randint(0, len(chosen), (40,), generator=generator)]
    grad_loss_rows = torch.randn(40, generator=generator)
    _, grad_codebook = torch.ops.gsq.quantize_backward(
        torch.zeros_like(z), grad_loss_rows, z, codebook, indices, 0.25, 1e-12, True
    )
    n = torch.nn.functional.normalize(z.double(), dim=1)
    expected = torch.zeros(num_codes, 3, dtype=torch.float64)
    expected.index_add_(0, indices, 2 * grad_loss_rows.double()[:, None] * (codebook.double()[indices] - n))
    torch.testing.assert_close(grad_codebook.double(), expected, rtol=1e-6, atol=1e-6)
    assert int(grad_codebook.abs().sum(dim=1).count_nonzero()) == len(indices.unique())
