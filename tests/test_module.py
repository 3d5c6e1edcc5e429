"""GroupedSphericalQuantizer as a drop-in module: layouts, memory formats, decoding, usage metrics,
dtypes, autocast, state, and edge cases (zero vectors, empty batches, non-finite latents)."""

import math

import pytest
import torch

from gsq_kernels import GroupedSphericalQuantizer, usage_perplexity
from gsq_kernels.lookup import lookup_l2
from parity import backends_for

BACKENDS = ["reference"] + backends_for("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_and_sequence_layouts(backend):
    quantizer = GroupedSphericalQuantizer(12, 50, groups=3, backend=backend)
    image = torch.randn(2, 12, 5, 4)
    out = quantizer(image)
    assert out.quantized.shape == (2, 12, 5, 4) and out.quantized.is_contiguous()
    assert out.indices.shape == (2, 5, 4, 3) and out.indices.dtype == torch.int64
    # group g of position (b, h, w) is channels [4g, 4g+4) of image[b, :, h, w]
    sequence = image.permute(0, 2, 3, 1).reshape(2, 20, 12)
    seq_out = quantizer(sequence)
    assert seq_out.indices.shape == (2, 20, 3)
    assert torch.equal(seq_out.indices.reshape(2, 5, 4, 3), out.indices)
    assert torch.equal(seq_out.quantized.reshape(2, 5, 4, 12).permute(0, 3, 1, 2), out.quantized)
    flat = quantizer(sequence.reshape(40, 12))
    assert flat.indices.shape == (40, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_non_contiguous_inputs(backend):
    quantizer = GroupedSphericalQuantizer(8, 40, groups=2, backend=backend)
    image = torch.randn(2, 8, 6, 5)
    expected = quantizer(image)
    channels_last = image.contiguous(memory_format=torch.channels_last)
    out = quantizer(channels_last)
    assert torch.equal(out.indices, expected.indices)
    assert torch.equal(out.quantized, expected.quantized)
    assert out.quantized.is_contiguous(memory_format=torch.channels_last)
    strided = torch.randn(2, 8, 12, 5)[:, :, ::2]  # non-contiguous view
    assert torch.equal(quantizer(strided).indices, quantizer(strided.contiguous()).indices)
    transposed = torch.randn(2, 8, 9).transpose(1, 2)  # (B, N, D) view with D not innermost
    assert torch.equal(quantizer(transposed).indices, quantizer(transposed.contiguous()).indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_flow_through_non_contiguous_inputs(backend):
    quantizer = GroupedSphericalQuantizer(8, 40, groups=2, backend=backend)
    base = torch.randn(2, 8, 6, 5)
    a = base.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    b = base.clone().requires_grad_()
    for x in (a, b):
        out = quantizer(x)
        (out.quantized.sum() + out.loss).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_indices_reproduces_the_forward_value(backend):
    quantizer = GroupedSphericalQuantizer(12, 30, groups=4, backend=backend)
    image = torch.randn(2, 12, 3, 5)
    out = quantizer(image)
    assert torch.equal(quantizer.decode_indices(out.indices), out.quantized)
    sequence = torch.randn(3, 7, 12)
    seq_out = quantizer(sequence)
    assert torch.equal(quantizer.decode_indices(seq_out.indices), seq_out.quantized)
    assert torch.equal(quantizer.encode(sequence), seq_out.indices)


def test_forward_value_is_the_raw_codebook_row():
    quantizer = GroupedSphericalQuantizer(4, 10, groups=1)
    with torch.no_grad():
        quantizer.codebook.mul_(torch.arange(1, 11).float()[:, None])  # codes of different lengths
    out = quantizer(torch.randn(5, 4))
    assert torch.equal(out.quantized, quantizer.codebook.detach()[out.indices[:, 0]])


def test_spherical_init_and_parameters():
    quantizer = GroupedSphericalQuantizer(64, 8192, groups=16)
    assert quantizer.codebook.shape == (8192, 4) and quantizer.codebook.dtype == torch.float32
    torch.testing.assert_close(quantizer.codebook.norm(dim=-1), torch.ones(8192))
    assert [name for name, _ in quantizer.named_parameters()] == ["codebook"]
    assert list(quantizer.state_dict()) == ["codebook"]  # usage counts are metrics, not state
    text = repr(quantizer)
    assert "codebook_size=8192" in text and "groups=16 (d=4)" in text and "beta=0.25" in text
    uniform = GroupedSphericalQuantizer(8, 100, init="uniform")
    assert uniform.codebook.abs().max() <= 1 / 100


def test_usage_and_perplexity():
    quantizer = GroupedSphericalQuantizer(2, 4, groups=1)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    quantizer(torch.tensor([[1.0, 0.1], [0.1, 1.0], [2.0, 0.0], [0.0, 3.0]]))
    assert quantizer.usage_histogram().tolist() == [2, 2, 0, 0]
    assert quantizer.codebook_usage() == 50.0
    assert math.isclose(quantizer.perplexity(), 2.0, rel_tol=1e-9)
    quantizer.reset_usage()
    assert quantizer.codebook_usage() == 0.0 and quantizer.perplexity() == 0.0
    assert math.isclose(usage_perplexity(torch.tensor([5, 5, 5, 5])), 4.0, rel_tol=1e-9)


def test_usage_pools_groups():
    quantizer = GroupedSphericalQuantizer(4, 2, groups=2)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    quantizer(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))  # group 0 -> code 0, group 1 -> code 1
    assert quantizer.usage_histogram().tolist() == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_latents(backend, dtype):
    quantizer = GroupedSphericalQuantizer(8, 33, groups=2, backend=backend)
    z = torch.randn(2, 8, 3, 3).to(dtype).requires_grad_()
    out = quantizer(z)
    assert out.quantized.dtype == dtype and out.loss.dtype == torch.float32
    (out.quantized.float().sum() + out.loss).backward()
    assert z.grad.dtype == dtype and quantizer.codebook.grad.dtype == torch.float32
    # the lookup happens in float32 on the (exactly representable) low-precision values
    assert torch.equal(out.indices, quantizer(z.detach().float()).indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_lower_the_lookup_precision(backend):
    quantizer = GroupedSphericalQuantizer(16, 4096, groups=2, backend=backend)
    z = torch.randn(4, 16, 6, 6)
    expected = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
    assert torch.equal(out.indices, expected.indices)
    assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lookup", ["exact", "dot"])
def test_zero_vectors(backend, lookup):
    """l2(0) = 0 / eps = 0. Its distance to code j is ||c^_j||^2, so the exact lookup takes the code
    of smallest normalized norm (lowest index among equals); the dot product scores 0 against every
    code, an exact tie broken to index 0. Either way the gradient stays finite."""
    quantizer = GroupedSphericalQuantizer(6, 20, groups=3, backend=backend, lookup=lookup)
    z = torch.randn(2, 4, 6)
    z[0, 1] = 0
    z[1, 2, 2:4] = 0
    z.requires_grad_()
    out = quantizer(z)
    # The lookup's normalized codes (norm taken in float64, docs/spec.md "Lookup").
    codes = lookup_l2(quantizer.codebook.detach(), 1e-12).double()
    expected = int(codes.square().sum(1).argmin()) if lookup == "exact" else 0
    assert out.indices[0, 1].tolist() == [expected] * 3
    assert out.indices[1, 2, 1].item() == expected
    (out.quantized.sum() + out.loss).backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_codes_resolve_to_the_lowest_index(backend):
    quantizer = GroupedSphericalQuantizer(4, 300, groups=2, backend=backend)
    with torch.no_grad():
        quantizer.codebook[7] = quantizer.codebook[250]  # a later duplicate of code 7
        quantizer.codebook[100] = 3 * quantizer.codebook[7]  # same direction, 3x longer
    targets = quantizer.codebook.detach()[[7, 7]].reshape(1, 4) * 2
    out = quantizer(targets)
    assert out.indices.tolist() == [[7, 7]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend):
    quantizer = GroupedSphericalQuantizer(8, 10, groups=2, backend=backend)
    z = torch.randn(0, 8, 4, 4, requires_grad=True)
    out = quantizer(z)
    assert out.quantized.shape == (0, 8, 4, 4) and out.indices.shape == (0, 4, 4, 2)
    assert out.loss.item() == 0.0
    (out.quantized.sum() + out.loss).backward()
    assert z.grad.shape == z.shape
    assert quantizer(torch.randn(3, 0, 8)).indices.shape == (3, 0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_latents(backend):
    quantizer = GroupedSphericalQuantizer(4, 10, groups=2, backend=backend)
    z = torch.randn(3, 5, 4)
    z[0, 0, 0] = float("nan")
    z[1, 2, 3] = float("inf")
    z[2, 4, 1] = float("-inf")
    with pytest.raises(ValueError, match="z contains 3 non-finite values"):
        quantizer(z)
    unchecked = GroupedSphericalQuantizer(4, 10, groups=2, backend=backend, check_finite=False)
    out = unchecked(z)
    assert out.indices.min() >= 0 and out.indices.max() < 10
    # group vectors holding a NaN/inf take index 0 on every backend
    assert out.indices[0, 0, 0] == 0 and out.indices[1, 2, 1] == 0 and out.indices[2, 4, 0] == 0
    finite_positions = torch.isfinite(z.reshape(-1, 2)).all(-1)
    assert torch.isfinite(out.quantized.reshape(-1, 2)[finite_positions]).all()


def test_module_moves_its_usage_counts_with_it():
    quantizer = GroupedSphericalQuantizer(4, 10).to(torch.float64)
    assert quantizer.codebook.dtype == torch.float64
    assert quantizer._usage_counts.dtype == torch.int64
    out = quantizer(torch.randn(3, 4, dtype=torch.float64))
    assert out.quantized.dtype == torch.float64
