"""The compiled gsq ops as torch.library ops: schemas, fake tensors, autograd registration
(torch.library.opcheck), and torch.compile(fullgraph=True) over the module."""

import pytest
import torch

import gsq_kernels
from gsq_kernels import GroupedSphericalQuantizer, ops

pytestmark = pytest.mark.skipif(not ops.OPS_AVAILABLE, reason="compiled extension not loaded")


def _samples(device="cpu"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        for rows, d, codes in ((37, 4, 19), (5, 1, 3), (8, 16, 33), (0, 4, 5)):
            z = torch.randn(rows, d, device=device).to(dtype)
            codebook = torch.randn(codes, d, device=device, dtype=compute)
            yield z, codebook


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_opcheck_quantize_forward(l2_normalize):
    for z, codebook in _samples():
        args = (z.requires_grad_(), codebook.requires_grad_(), 0.25, 1e-12, l2_normalize)
        torch.library.opcheck(torch.ops.gsq.quantize_forward.default, args)


def test_opcheck_quantize_backward():
    for z, codebook in _samples():
        quantized, indices, loss_rows = torch.ops.gsq.quantize_forward(z, codebook, 0.25, 1e-12, True)
        args = (torch.randn_like(quantized), torch.randn_like(loss_rows), z, codebook, indices, 0.25, 1e-12, True)
        torch.library.opcheck(torch.ops.gsq.quantize_backward.default, args)


def test_opcheck_nearest_code():
    for z, codebook in _samples():
        torch.library.opcheck(torch.ops.gsq.nearest_code.default, (z, codebook, 1e-12, True))


@pytest.mark.parametrize("d, l2_normalize", [(1, True), (1, False), (2, True)])
def test_opcheck_nearest_code_sorted(d, l2_normalize):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, codes in ((37, 19), (5, 3), (0, 5), (300, 70_000)):
            z = torch.randn(rows, d).to(dtype)
            codebook = torch.randn(codes, d)
            torch.library.opcheck(torch.ops.gsq.nearest_code_sorted.default, (z, codebook, 1e-12, l2_normalize))


@pytest.mark.parametrize("d, l2_normalize", [(1, True), (1, False), (2, True)])
def test_opcheck_quantize_forward_sorted(d, l2_normalize):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, codes in ((37, 19), (5, 3), (0, 5), (300, 70_000)):
            z = torch.randn(rows, d).to(dtype).requires_grad_()
            codebook = torch.randn(codes, d).requires_grad_()
            args = (z, codebook, 0.25, 1e-12, l2_normalize)
            torch.library.opcheck(torch.ops.gsq.quantize_forward_sorted.default, args)


def test_opcheck_refine_nearest_code():
    for rows, d, codes in ((37, 4, 19), (0, 3, 5), (5, 64, 300)):
        vectors, codes_t = torch.randn(rows, d), torch.randn(d, codes)
        args = (vectors, codes_t, torch.randn(codes), torch.randn(rows))
        torch.library.opcheck(torch.ops.gsq.refine_nearest_code.default, args)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout", ["image", "sequence"])
def test_torch_compile_fullgraph(backend, layout):
    torch.manual_seed(0)
    quantizer = GroupedSphericalQuantizer(16, 64, groups=4, backend=backend)
    z = torch.randn(2, 16, 5, 3) if layout == "image" else torch.randn(2, 7, 16)

    def step(module, x):
        out = module(x)
        total = (out.quantized * x.detach()).sum() + out.loss
        total.backward()
        return out

    eager_z = z.clone().requires_grad_()
    eager = step(quantizer, eager_z)
    eager_grad_codebook = quantizer.codebook.grad.clone()
    quantizer.codebook.grad = None
    quantizer.reset_usage()

    compiled = torch.compile(quantizer, fullgraph=True)
    compiled_z = z.clone().requires_grad_()
    out = step(compiled, compiled_z)

    assert torch.equal(out.indices, eager.indices)
    assert torch.equal(out.quantized, eager.quantized)
    torch.testing.assert_close(out.loss, eager.loss)
    torch.testing.assert_close(compiled_z.grad, eager_z.grad)
    torch.testing.assert_close(quantizer.codebook.grad, eager_grad_codebook)
    # the usage histogram is updated inside the compiled graph too
    assert int(quantizer.usage_histogram().sum()) == out.indices.numel()


def test_backward_rejects_out_of_range_indices():
    z = torch.randn(4, 2)
    codebook = torch.randn(3, 2)
    bad = torch.tensor([0, 1, 3, 2])
    with pytest.raises(RuntimeError, match=r"indices\[2\] = 3 is outside \[0, 3\)"):
        torch.ops.gsq.quantize_backward(torch.zeros_like(z), torch.zeros(4), z, codebook, bad, 0.25, 1e-12, True)


def test_every_cpu_kernel_variant_matches_the_reference():
    """The avx512/avx2/generic builds are picked at run time; test every one this CPU can run."""
    from parity import assert_indices_match

    original = gsq_kernels.cpu_isa()
    variants = [v for v in ("generic", "avx2", "avx512") if _supported(v)]
    z = torch.randn(203, 8)
    codebook = torch.randn(1029, 8)
    expected = torch.ops.gsq.nearest_code(z.double(), codebook.double(), 1e-12, True)
    try:
        for variant in variants:
            assert gsq_kernels.set_cpu_isa(variant) == variant
            got = torch.ops.gsq.nearest_code(z, codebook, 1e-12, True)
            assert_indices_match(got, expected, z, codebook, 1e-12, True)
    finally:
        gsq_kernels.set_cpu_isa(original)
    assert gsq_kernels.cpu_isa() == original
    with pytest.raises(ValueError, match="must be one of"):
        gsq_kernels.set_cpu_isa("sse9")


def _supported(variant):
    original = gsq_kernels.cpu_isa()
    try:
        gsq_kernels.set_cpu_isa(variant)
        return True
    except RuntimeError:
        return False
    finally:
        gsq_kernels.set_cpu_isa(original)


@pytest.mark.parametrize("op_name, d", [("quantize_forward", 4), ("quantize_forward_sorted", 2)])
def test_fused_forwards_are_differentiated_in_cpp(op_name, d):
    """The fused forwards carry a C++ autograd kernel (no Python formula per call); its gradients
    equal the reference's, also when only one of the differentiable outputs receives a gradient."""
    op = getattr(torch.ops.gsq, op_name)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op._qualified_op_name, "Autograd")
    torch.manual_seed(0)
    z, codebook = torch.randn(41, d), torch.randn(300, d)
    quantized, indices, loss_rows = op(z.requires_grad_(), codebook.requires_grad_(), 0.25, 1e-12, True)
    assert type(quantized.grad_fn).__name__ == "CppFunction" and not indices.requires_grad
    for use_quantized, use_loss in ((True, True), (True, False), (False, True)):
        quantized, indices, loss_rows = op(z, codebook, 0.25, 1e-12, True)
        weights = torch.randn_like(quantized)
        total = (quantized * weights).sum() * use_quantized + loss_rows.sum() * use_loss
        grad_z, grad_codebook = torch.autograd.grad(total, (z, codebook))
        ref_quantized, _, ref_loss = gsq_kernels.reference.quantize(z, codebook, 0.25, 1e-12, True, indices)
        ref_total = (ref_quantized * weights).sum() * use_quantized + ref_loss * z.numel() * use_loss
        ref_grad_z, ref_grad_codebook = torch.autograd.grad(ref_total, (z, codebook))
        torch.testing.assert_close(grad_z, ref_grad_z)
        torch.testing.assert_close(grad_codebook, ref_grad_codebook)


@pytest.mark.slow
@pytest.mark.parametrize("lookup, groups", [("dot", 4), ("exact", 8)])
def test_torch_compile_differentiates_the_fused_forwards(lookup, groups):
    """fullgraph torch.compile traces the C++ autograd kernel of quantize_forward (lookup="dot")
    and quantize_forward_sorted (d = 2, exact): same indices and gradients as eager."""
    torch.manual_seed(0)
    quantizer = GroupedSphericalQuantizer(16, 512, groups=groups, backend="cpu", lookup=lookup)
    z = torch.randn(2, 16, 5, 3)
    grads = []
    for module in (quantizer, torch.compile(quantizer, fullgraph=True)):
        x = z.clone().requires_grad_()
        out = module(x)
        ((out.quantized * z).sum() + out.loss).backward()
        grads.append((out.indices, x.grad, quantizer.codebook.grad.clone()))
        quantizer.codebook.grad = None
    (eager_indices, *eager_grads), (compiled_indices, *compiled_grads) = grads
    assert torch.equal(compiled_indices, eager_indices)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)
