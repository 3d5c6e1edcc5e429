"""The CUDA C++ backend: the build registers it whenever the extension was built with CUDA, and on
a GPU it runs the shared parity suite (tests/test_quantize_parity.py, device "cuda") plus what only a
GPU shows: CUDA-graph capture, torch.compile, determinism, O(N) memory at the paper's scale."""

import json
from pathlib import Path

import pytest
import torch

import gsq_kernels
from gsq_kernels import GroupedSphericalQuantizer, _build_config, dispatch, grouped_spherical_quantize

BUILD_INFO = Path(gsq_kernels.__file__).resolve().parent / _build_config.BUILD_INFO_FILE
OPS = ("gsq::quantize_forward", "gsq::quantize_backward", "gsq::nearest_code")
needs_gpu = pytest.mark.skipif(not dispatch.BACKENDS["cuda"].available,
                               reason=f"cuda backend unavailable: {dispatch.BACKENDS['cuda'].reason}")


def test_cuda_kernels_are_registered_when_built_with_cuda():
    if not BUILD_INFO.is_file():
        pytest.skip("no prebuilt extension (built at import)")
    info = json.loads(BUILD_INFO.read_text())
    if not info["with_cuda"]:
        pytest.skip(f"extension built without CUDA against torch {info['torch_version']}")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), f"{op} has no CPU kernel"


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype):
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    for d in (1, 4, 16, 64):
        z = torch.randn(300, d, device="cuda").to(dtype).requires_grad_()
        codebook = torch.randn(129, d, device="cuda", dtype=compute, requires_grad=True)
        torch.library.opcheck(torch.ops.gsq.quantize_forward.default, (z, codebook, 0.25, 1e-12, True))
        torch.library.opcheck(torch.ops.gsq.nearest_code.default, (z.detach(), codebook.detach(), 1e-12, False))


@needs_gpu
def test_torch_compile_fullgraph():
    quantizer = GroupedSphericalQuantizer(16, 256, groups=4, backend="cuda").cuda()
    z = torch.randn(4, 16, 8, 8, device="cuda")
    eager = quantizer(z)
    compiled = torch.compile(quantizer, fullgraph=True)
    out = compiled(z)
    assert torch.equal(out.indices, eager.indices)
    assert torch.equal(out.quantized, eager.quantized)


@needs_gpu
@pytest.mark.parametrize("d", [4, 16])
def test_cuda_graph_capture(d):
    z = torch.randn(4096, d, device="cuda")
    codebook = torch.randn(1000, d, device="cuda")
    expected = torch.ops.gsq.quantize_forward(z, codebook, 0.25, 1e-12, True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.gsq.quantize_forward(z, codebook, 0.25, 1e-12, True)  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = torch.ops.gsq.quantize_forward(z, codebook, 0.25, 1e-12, True)
        grads = torch.ops.gsq.quantize_backward(torch.ones_like(z), torch.ones(z.shape[0], device="cuda"), z,
                                                codebook, captured[1], 0.25, 1e-12, True)
    z.copy_(torch.randn_like(z))
    graph.replay()
    torch.cuda.synchronize()
    fresh = torch.ops.gsq.quantize_forward(z, codebook, 0.25, 1e-12, True)
    assert torch.equal(captured[1], fresh[1]) and not torch.equal(captured[1], expected[1])
    fresh_grads = torch.ops.gsq.quantize_backward(torch.ones_like(z), torch.ones(z.shape[0], device="cuda"), z,
                                                  codebook, fresh[1], 0.25, 1e-12, True)
    assert torch.equal(grads[0], fresh_grads[0]) and torch.equal(grads[1], fresh_grads[1])


@needs_gpu
def test_backward_is_deterministic():
    z = torch.randn(200_000, 4, device="cuda")
    codebook = torch.randn(512, 4, device="cuda")
    results = []
    for _ in range(3):
        c = codebook.clone().requires_grad_()
        zz = z.clone().requires_grad_()
        out = grouped_spherical_quantize(zz, c, 1, backend="cuda")
        (out.quantized.square().sum() + out.loss).backward()
        results.append((zz.grad, c.grad))
    for grad_z, grad_codebook in results[1:]:
        assert torch.equal(grad_z, results[0][0]) and torch.equal(grad_codebook, results[0][1])


@needs_gpu
def test_headline_setting_runs_in_linear_memory():
    """16x down-sampling, D=16, G=8, V=262,144 at batch 64 of 256x256 images: the reference would need
    a 131,072 x 262,144 float32 matrix (137 GB); the fused kernels need O(N d + V d)."""
    quantizer = GroupedSphericalQuantizer(16, 262_144, groups=8, backend="cuda").cuda()
    z = torch.randn(64, 16, 16, 16, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = quantizer(z)
    (out.quantized.sum() + out.loss).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 256 * 2**20, f"peak extra memory {peak / 2**20:.0f} MiB"
    assert out.indices.shape == (64, 16, 16, 8)
