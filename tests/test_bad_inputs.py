"""Bad input gives a ValueError/TypeError naming the argument and what was expected."""

import pytest
import torch

from gsq_kernels import (
    BackendUnavailableError,
    GroupedSphericalQuantizer,
    decode_indices,
    dispatch,
    grouped_spherical_quantize,
    nearest_code_indices,
)
from parity import backends_for

BACKENDS = ["reference"] + backends_for("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "z,codebook,groups,error,message",
    [
        (
            torch.randn(2, 10, 4, 4),
            torch.randn(8, 3),
            3,
            ValueError,
            "D=10 channels, which is not divisible by groups=3",
        ),
        (torch.randn(2, 12), torch.randn(8, 6), 1, ValueError, "codebook has width 6, but D / groups = 12 / 1 = 12"),
        (torch.randn(2, 3, 4, 5, 6), torch.randn(8, 3), 1, ValueError, "z must be .B, D, H, W. image maps"),
        (torch.randn(7), torch.randn(8, 7), 1, ValueError, "got a 1-D tensor"),
        (
            torch.randint(0, 5, (2, 4, 8)),
            torch.randn(8, 8),
            1,
            TypeError,
            "z must be float32, float16, bfloat16 or float64, got torch.int64",
        ),
        (
            torch.randn(2, 4, 8),
            torch.randint(0, 5, (8, 8)),
            1,
            TypeError,
            "codebook must be float32, float16, bfloat16 or float64",
        ),
        (torch.randn(2, 4, 8), torch.randn(8, 8, 1), 1, ValueError, "codebook must be .V, d., got shape"),
        (torch.randn(2, 4, 8), torch.randn(0, 8), 1, ValueError, "codebook must hold at least one code"),
        (torch.randn(2, 4, 8), torch.randn(8, 8), 0, ValueError, "groups must be >= 1, got 0"),
        (torch.randn(2, 4, 8), torch.randn(8, 8), 1.0, TypeError, "groups must be an int"),
        ([[1.0, 2.0]], torch.randn(8, 2), 1, TypeError, "z must be a torch.Tensor, got list"),
        (torch.randn(2, 4, 8, dtype=torch.complex64), torch.randn(8, 8), 1, TypeError, "z must be float32"),
    ],
)
def test_functional_bad_inputs(backend, z, codebook, groups, error, message):
    with pytest.raises(error, match=message):
        grouped_spherical_quantize(z, codebook, groups, backend=backend)
    with pytest.raises(error, match=message):
        nearest_code_indices(z, codebook, groups, backend=backend)


def test_bad_scalars():
    z, codebook = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got -1"):
        grouped_spherical_quantize(z, codebook, beta=-1)
    with pytest.raises(ValueError, match=r"eps must be a number in \[1.18e-38, 1\] .*got 0"):
        grouped_spherical_quantize(z, codebook, eps=0)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        grouped_spherical_quantize(z, codebook, beta=float("nan"))
    # An eps that underflows float32 made a zero vector normalize to NaN; a huge one overflowed.
    for eps in (1e-50, 1e300, float("inf")):
        with pytest.raises(ValueError, match="eps must be a number in"):
            grouped_spherical_quantize(z, codebook, eps=eps)
        with pytest.raises(ValueError, match="eps must be a number in"):
            GroupedSphericalQuantizer(4, 5, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_codebook_raises_on_every_backend(backend, bad):
    """A NaN code poisoned the reference's every index and loss while cpu skipped it silently."""
    codebook = torch.randn(6, 4)
    codebook[3, 1] = bad
    with pytest.raises(ValueError, match="codebook contains 1 non-finite value"):
        grouped_spherical_quantize(torch.randn(5, 4), codebook, backend=backend)
    with pytest.raises(ValueError, match="codebook contains 1 non-finite value"):
        nearest_code_indices(torch.randn(5, 4), codebook, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lookup", ["exact", "dot"])
def test_unchecked_non_finite_rows_agree_across_backends(backend, lookup):
    """check_finite=False: a row holding NaN/inf takes index 0 and returns code 0's row (the
    reference returned NaN there while cpu returned the code)."""
    codebook = torch.randn(6, 4)
    z = torch.randn(3, 4)
    z[1, 2] = float("nan")
    out = grouped_spherical_quantize(z, codebook, backend=backend, check_finite=False, lookup=lookup)
    assert int(out.indices[1, 0]) == 0
    assert torch.equal(out.quantized[1], codebook[0])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lookup", ["exact", "dot"])
def test_compile_dynamic_shapes(backend, lookup):
    """torch.compile(dynamic=True) traced the module's floats as symbolic values, which the
    argument checks (math.isfinite) could not take."""
    quantizer = GroupedSphericalQuantizer(8, 16, groups=2, backend=backend, lookup=lookup)
    compiled = torch.compile(quantizer, dynamic=True, fullgraph=True)
    for batch in (2, 3):
        z = torch.randn(batch, 8, 3, 5, requires_grad=True)
        quantized, indices, loss = compiled(z)
        (quantized.sum() + loss).backward()
        eager = quantizer(z)
        assert torch.equal(indices, eager.indices)
        assert torch.allclose(quantized, eager.quantized) and torch.allclose(loss, eager.loss)
    functional = torch.compile(nearest_code_indices, dynamic=True, fullgraph=True)
    z = torch.randn(4, 8)
    assert torch.equal(
        functional(z, quantizer.codebook.detach(), 2, backend=backend, lookup=lookup),
        nearest_code_indices(z, quantizer.codebook.detach(), 2, backend=backend, lookup=lookup),
    )


@pytest.mark.skipif(
    not torch.cuda.is_available() and not torch.backends.mps.is_available(), reason="needs a second device"
)
def test_tensors_on_different_devices():
    device = "cuda" if torch.cuda.is_available() else "mps"
    with pytest.raises(ValueError, match="z is on .* but codebook is on"):
        grouped_spherical_quantize(torch.randn(2, 4), torch.randn(5, 4, device=device))


def test_tensors_on_different_devices_meta():
    """Device mismatch without a GPU: a meta codebook stands in for another device."""
    with pytest.raises(ValueError, match="z is on cpu but codebook is on meta"):
        grouped_spherical_quantize(torch.randn(2, 4), torch.randn(5, 4, device="meta"))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(dim=10, codebook_size=8, groups=3), ValueError, "dim=10 is not divisible by groups=3"),
        (dict(dim=0, codebook_size=8), ValueError, "dim must be >= 1, got 0"),
        (dict(dim=8, codebook_size=0), ValueError, "codebook_size must be >= 1, got 0"),
        (dict(dim=8, codebook_size=8.5), TypeError, "codebook_size must be an int, got float"),
        (dict(dim=8, codebook_size=8, beta=-0.1), ValueError, "beta must be a finite number >= 0"),
        (dict(dim=8, codebook_size=8, backend="cudnn"), ValueError, "backend must be 'auto' or one of"),
        (dict(dim=8, codebook_size=8, backend=3), TypeError, "backend must be a string"),
        (dict(dim=8, codebook_size=8, init="kmeans"), ValueError, "init must be 'spherical' or 'uniform'"),
    ],
)
def test_module_bad_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        GroupedSphericalQuantizer(**kwargs)


@pytest.mark.parametrize("name", ["cuda", "triton", "cpu"])
def test_missing_backend_says_how_to_get_it(name):
    backend = dispatch.BACKENDS.get(name)
    if backend is not None and backend.available:
        pytest.skip(f"{name} is available on this machine")
    with pytest.raises(BackendUnavailableError, match=f"backend '{name}' is not available: .*"):
        GroupedSphericalQuantizer(8, 8, backend=name)
    with pytest.raises(BackendUnavailableError):
        grouped_spherical_quantize(torch.randn(2, 8), torch.randn(4, 8), backend=name)


def test_backend_for_the_wrong_device():
    if "cpu" not in dispatch.available_backends("cpu"):
        pytest.skip("cpu backend not built")
    with pytest.raises(ValueError, match="backend 'cpu' runs on cpu tensors, but z is on meta"):
        dispatch.resolve("cpu", torch.device("meta"))


def test_decode_indices_bad_inputs():
    quantizer = GroupedSphericalQuantizer(8, 10, groups=2)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\), got values in \[0, 10\]"):
        quantizer.decode_indices(torch.tensor([[[[0, 10]]]]))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\), got values in \[-1, 3\]"):
        quantizer.decode_indices(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="indices must be an integer tensor, got torch.float32"):
        quantizer.decode_indices(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="indices must end in G=2 groups"):
        quantizer.decode_indices(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="indices must be a torch.Tensor"):
        decode_indices([[0, 1]], quantizer.codebook)
