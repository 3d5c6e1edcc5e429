"""Triton backend specifics (the shared parity suite already runs it against the reference):
torch.library registration, torch.compile, determinism of the codebook gradient, float64 refusal.
Runs on the CPU through Triton's interpreter when no GPU is present (tests/conftest.py)."""

import pytest
import torch

from gsq_kernels import GroupedSphericalQuantizer, dispatch, grouped_spherical_quantize

from parity import triton_interpreted

BACKEND = dispatch.BACKENDS.get("triton")
pytestmark = pytest.mark.skipif(BACKEND is None or not BACKEND.available,
                                reason=f"triton backend unavailable: {BACKEND.reason if BACKEND else 'not importable'}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16) if triton_interpreted() else (torch.float32, torch.float16, torch.bfloat16)
# AOTDispatcher decomposes a triton_op into its body and captures the launches through wrap_triton,
# which cannot capture interpreted kernels: that one check needs a GPU.
OPCHECK_TESTS = (("test_schema", "test_autograd_registration", "test_faketensor") if triton_interpreted()
                 else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [4, 16])
def test_opcheck(dtype, d):
    z = torch.randn(37, d, device=DEVICE).to(dtype).requires_grad_()
    codebook = torch.randn(19, d, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.gsq_triton.quantize_forward.default, (z, codebook, 0.25, 1e-12, True),
                          test_utils=OPCHECK_TESTS)
    torch.library.opcheck(torch.ops.gsq_triton.nearest_code.default, (z.detach(), codebook.detach(), 1e-12, False),
                          test_utils=OPCHECK_TESTS)
    quantized, indices, loss_rows = torch.ops.gsq_triton.quantize_forward(z.detach(), codebook.detach(), 0.25, 1e-12, True)
    torch.library.opcheck(
        torch.ops.gsq_triton.quantize_backward.default,
        (torch.randn_like(quantized), torch.randn_like(loss_rows), z.detach(), codebook.detach(), indices, 0.25, 1e-12, True),
        test_utils=OPCHECK_TESTS,
    )


@pytest.mark.skipif(DEVICE == "cpu", reason="inductor compiles user Triton kernels for CUDA devices only; "
                                            "the interpreter run covers eager mode")
def test_torch_compile_fullgraph():
    quantizer = GroupedSphericalQuantizer(16, 64, groups=4, backend="triton").to(DEVICE)
    z = torch.randn(2, 16, 5, 3, device=DEVICE)
    eager_z = z.clone().requires_grad_()
    eager = quantizer(eager_z)
    (eager.quantized.sum() + eager.loss).backward()
    eager_grad_codebook = quantizer.codebook.grad.clone()
    quantizer.codebook.grad = None
    compiled = torch.compile(quantizer, fullgraph=True)
    compiled_z = z.clone().requires_grad_()
    out = compiled(compiled_z)
    (out.quantized.sum() + out.loss).backward()
    assert torch.equal(out.indices, eager.indices)
    torch.testing.assert_close(compiled_z.grad, eager_z.grad)
    torch.testing.assert_close(quantizer.codebook.grad, eager_grad_codebook)


def test_torch_compile_traces_the_triton_op():
    """Without a GPU, check the graph torch.compile captures: the gsq_triton op, no graph break."""
    from torch._dynamo.testing import CompileCounterWithBackend

    quantizer = GroupedSphericalQuantizer(8, 32, groups=2, backend="triton").to(DEVICE)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(quantizer, backend=counter, fullgraph=True)
    z = torch.randn(2, 8, 4, 4, device=DEVICE)
    assert torch.equal(compiled(z).indices, quantizer(z).indices)
    assert counter.frame_count == 1
    graph_ops = [str(node.target) for graph in counter.graphs for node in graph.graph.nodes]
    assert any("gsq_triton.quantize_forward" in op for op in graph_ops), graph_ops


def test_codebook_gradient_is_deterministic_and_handles_collapse():
    """All rows choosing one code (a collapsed codebook) and repeated runs give identical bits."""
    codebook = -torch.randn(300, 4, device=DEVICE).abs()  # every code but 17 points away from z
    codebook[17] = torch.tensor([1.0, 1.0, 1.0, 1.0]) * 10
    z = torch.rand(600, 4, device=DEVICE) + 0.5
    results = []
    for _ in range(2):
        c = codebook.clone().requires_grad_()
        out = grouped_spherical_quantize(z, c, 1, backend="triton")
        assert (out.indices == 17).all()
        (out.quantized.sum() + out.loss).backward()
        results.append(c.grad)
    assert torch.equal(results[0], results[1])
    reference = codebook.clone().requires_grad_()
    ref = grouped_spherical_quantize(z, reference, 1, backend="reference")
    (ref.quantized.sum() + ref.loss).backward()
    torch.testing.assert_close(results[0], reference.grad, rtol=1e-5, atol=1e-7)


def test_float64_is_refused_with_a_pointer():
    with pytest.raises(TypeError, match="triton backend takes float32, float16 or bfloat16 z, got torch.float64"):
        grouped_spherical_quantize(torch.randn(3, 4, dtype=torch.float64, device=DEVICE),
                                   torch.randn(5, 4, dtype=torch.float64, device=DEVICE), backend="triton")


@pytest.mark.parametrize("d", [1, 2, 3, 4, 8, 16, 64])
def test_lookup_only_matches_forward(d):
    from gsq_kernels import nearest_code_indices

    z = torch.randn(3, 11, 2 * d, device=DEVICE)
    codebook = torch.randn(1023, d, device=DEVICE)
    out = grouped_spherical_quantize(z, codebook, 2, backend="triton")
    assert torch.equal(nearest_code_indices(z, codebook, 2, backend="triton"), out.indices)
