"""The CUDA C++ backend: the build registers it whenever the extension was built with CUDA, and on
a GPU it runs the shared parity suite (tests/test_quantize_parity.py, device "cuda") plus what only a
GPU shows: CUDA-graph capture, torch.compile, determinism, O(N) memory at the paper's scale.

Without a GPU: the registration, the build's arch list, and the glue's argument checks, reached by
calling the CUDA kernel directly with fake CUDA tensors (shapes and devices, no memory): every check
runs before the first CUDA call."""

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

import gsq_kernels
from gsq_kernels import GroupedSphericalQuantizer, _build_config, dispatch, grouped_spherical_quantize
from gsq_kernels.lookup import lookup_vectors, nearest_code_float64
from sorted_cases import HARD_CASES, hard_codebook

BUILD_INFO = Path(gsq_kernels.__file__).resolve().parent / _build_config.BUILD_INFO_FILE
OPS = (
    "gsq::quantize_forward",
    "gsq::quantize_backward",
    "gsq::nearest_code",
    "gsq::nearest_code_with_gap",
    "gsq::nearest_code_sorted",
    "gsq::quantize_forward_sorted",
)
needs_gpu = pytest.mark.skipif(
    not dispatch.BACKENDS["cuda"].available, reason=f"cuda backend unavailable: {dispatch.BACKENDS['cuda'].status}"
)


def _built_with_cuda() -> bool:
    return BUILD_INFO.is_file() and json.loads(BUILD_INFO.read_text())["with_cuda"]


needs_cuda_build = pytest.mark.skipif(not _built_with_cuda(), reason="extension not built with CUDA kernels")


def test_cuda_kernels_are_registered_when_built_with_cuda():
    if not BUILD_INFO.is_file():
        pytest.skip("no prebuilt extension (built at import)")
    info = json.loads(BUILD_INFO.read_text())
    if not info["with_cuda"]:
        pytest.skip(f"extension built without CUDA against torch {info['torch_version']}")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), f"{op} has no CPU kernel"


def _call_cuda_kernel(op, *args):
    """Runs the op's CUDA kernel: through the dispatcher with a GPU (real tensors); without one, by
    redispatching fake tensors to the CUDA key (the argument checks run before any device work)."""
    if torch.cuda.is_available():
        return op(*args)
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


def _fake_cuda(*specs):
    """CUDA tensors (shape, dtype) for the argument checks: fake ones (real devices and shapes, no
    memory) without a GPU; real, uninitialized ones with one, where a fake tensor handed to the
    kernel's C++ entry point crashes the process."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if torch.cuda.is_available():
        return [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in specs]
    with FakeTensorMode(allow_non_fake_inputs=True):
        return [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in specs]


@needs_cuda_build
@pytest.mark.parametrize("name", ["grad_quantized", "grad_loss_rows", "indices"])
def test_backward_names_an_input_on_another_device(name):
    """The kernels dereference raw pointers: an input on another device must be refused by name,
    not read as device memory."""
    grad_quantized, grad_loss_rows, z, codebook, indices = _fake_cuda(
        ((10, 4), torch.float32),
        ((10,), torch.float32),
        ((10, 4), torch.float32),
        ((5, 4), torch.float32),
        ((10,), torch.int64),
    )
    args = {"grad_quantized": grad_quantized, "grad_loss_rows": grad_loss_rows, "indices": indices}
    args[name] = torch.zeros(args[name].shape, dtype=args[name].dtype)  # on the CPU
    with pytest.raises(
        RuntimeError,
        match=rf"gsq::quantize_backward: {name} must be on z's device \(cuda:0\), "
        rf"got cpu",
    ):
        _call_cuda_kernel(
            torch.ops.gsq.quantize_backward.default,
            args["grad_quantized"],
            args["grad_loss_rows"],
            z,
            codebook,
            args["indices"],
            0.25,
            1e-12,
            True,
        )


@needs_cuda_build
def test_lookup_refuses_what_its_32_bit_offsets_cannot_index():
    z, codebook = _fake_cuda(((3, 2**24 + 1), torch.float32), ((7, 2**24 + 1), torch.float32))
    with pytest.raises(
        RuntimeError,
        match=r"gsq::nearest_code_with_gap: the CUDA kernels take at most 2\^31-1 codes "
        r"and d <= 2\^24, got V=7, d=16777217",
    ):
        _call_cuda_kernel(torch.ops.gsq.nearest_code_with_gap.default, z, codebook, 1e-12, True)


@needs_cuda_build
@pytest.mark.parametrize(
    "d, l2_normalize, dtype, message",
    [
        (3, True, torch.float32, r"covers d = 1, and d = 2 with l2 on; got d=3 with l2_normalize=True"),
        (2, False, torch.float32, r"covers d = 1, and d = 2 with l2 on; got d=2 with l2_normalize=False"),
        (2, True, torch.float64, r"z must be float32, float16 or bfloat16, got Double"),
    ],
)
def test_sorted_search_refuses_what_it_does_not_cover(d, l2_normalize, dtype, message):
    z, codebook = _fake_cuda(((3, d), dtype), ((7, d), dtype))
    with pytest.raises(RuntimeError, match=r"gsq::nearest_code_sorted: .*" + message):
        _call_cuda_kernel(torch.ops.gsq.nearest_code_sorted.default, z, codebook, 1e-12, l2_normalize)


def _fake_toolkit(folder: Path, gpu_codes: list[str]) -> Path:
    """A CUDA_HOME whose nvcc only answers --list-gpu-code."""
    (folder / "bin").mkdir(parents=True)
    (folder / "include").mkdir()
    (folder / "include" / "cuda_runtime.h").write_text("")
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nprintf '" + "\\n".join(gpu_codes) + "\\n'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.mark.parametrize(
    "gpu_codes,expected",
    [
        (
            ["sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_103", "sm_120", "sm_121"],
            "8.0;8.6;8.9;9.0;10.0;12.0+PTX",
        ),  # nvcc 13
        (["sm_80", "sm_86", "sm_89", "sm_90"], "8.0;8.6;8.9;9.0+PTX"),  # an older toolkit: PTX for its newest
    ],
    ids=["nvcc13", "older"],
)
def test_arch_list_without_a_gpu_follows_what_nvcc_can_build(tmp_path, monkeypatch, gpu_codes, expected):
    """No GPU visible at build time: real code for Ampere (8.0, 8.6), Ada (8.9), Hopper (9.0) and
    Blackwell (10.0, 12.0) wherever the toolkit's nvcc supports them, whatever torch itself ships,
    and PTX for the newest so later GPUs can JIT."""
    monkeypatch.setenv("CUDA_HOME", str(_fake_toolkit(tmp_path / "cuda", gpu_codes)))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    _build_config.ensure_cuda_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype):
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    for d in (1, 4, 16, 64):
        z = torch.randn(300, d, device="cuda").to(dtype).requires_grad_()
        codebook = torch.randn(129, d, device="cuda", dtype=compute, requires_grad=True)
        torch.library.opcheck(torch.ops.gsq.quantize_forward.default, (z, codebook, 0.25, 1e-12, True))
        torch.library.opcheck(torch.ops.gsq.nearest_code.default, (z.detach(), codebook.detach(), 1e-12, False))
        torch.library.opcheck(torch.ops.gsq.nearest_code_with_gap.default, (z.detach(), codebook.detach(), 1e-12, True))


@needs_gpu
@pytest.mark.parametrize("d", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("l2_normalize", [True, False], ids=["l2", "raw"])
def test_nearest_code_with_gap_matches_nearest_code_and_the_cpu_gap(d, l2_normalize):
    """Indices bit for bit those of nearest_code; the gap within the rounding of the scores of the
    CPU kernels (same math, another summation order); ties 0, V == 1 and NaN rows +inf."""
    z = torch.randn(1001, d, device="cuda")
    z[3, 0] = float("nan")
    codebook = torch.randn(2050, d, device="cuda")
    codebook[1500] = codebook[7]
    indices, gap = torch.ops.gsq.nearest_code_with_gap(z, codebook, 1e-12, l2_normalize)
    assert torch.equal(indices, torch.ops.gsq.nearest_code(z, codebook, 1e-12, l2_normalize))
    cpu_indices, cpu_gap = torch.ops.gsq.nearest_code_with_gap(z.cpu(), codebook.cpu(), 1e-12, l2_normalize)
    scale = 1 + (z.cpu().abs().nan_to_num() @ codebook.cpu().abs().T).amax(-1) + codebook.cpu().square().sum(-1).max()
    agree = indices.cpu() == cpu_indices
    assert agree.float().mean() > 0.99
    assert torch.equal(gap.cpu().isinf(), cpu_gap.isinf())  # the NaN row (inf - inf would be NaN below)
    close = agree & cpu_gap.isfinite()
    assert ((gap.cpu() - cpu_gap).abs()[close] <= 8 * (d + 4) * 2.0**-24 * scale[close]).all()
    assert gap[3].item() == math.inf and indices[3].item() == 0
    single = torch.ops.gsq.nearest_code_with_gap(z, codebook[:1], 1e-12, l2_normalize)[1]
    assert (single == math.inf).all()


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", HARD_CASES + ["headline", "d1", "d1_raw"])
def test_sorted_search_matches_the_oracle_on_the_gpu(backend, case):
    """The sorted-search kernels (d <= 2) on the GPU: the float64 oracle's index on every row, on the
    codebooks that defeat a naive search and at F16-D16-G8-V256k."""
    chosen = dispatch.BACKENDS[backend]
    if not chosen.available or chosen.nearest_code_sorted is None:
        pytest.skip(f"{backend}: {chosen.status}")
    l2_normalize = case != "d1_raw"
    if case == "headline":
        z, codebook = torch.randn(100_000, 2), gsq_kernels.spherical_init(262_144, 2)
    elif case.startswith("d1"):
        codebook = torch.randn(5000, 1)
        codebook[100::7] = codebook[100].clone()
        z = torch.cat([torch.randn(3000, 1) * 2, codebook[:5] + 0.0])
    else:
        z, codebook = hard_codebook(case)
    expected = nearest_code_float64(*lookup_vectors(z, codebook, 1e-12, l2_normalize))
    got = chosen.nearest_code_sorted(z.cuda(), codebook.cuda(), 1e-12, l2_normalize)
    assert torch.equal(got.cpu(), expected)


@needs_gpu
def test_opcheck_nearest_code_sorted():
    for d, l2_normalize in ((1, True), (1, False), (2, True)):
        z, codebook = torch.randn(300, d, device="cuda"), torch.randn(70_000, d, device="cuda")
        torch.library.opcheck(torch.ops.gsq.nearest_code_sorted.default, (z, codebook, 1e-12, l2_normalize))


@needs_gpu
def test_sorted_forward_on_the_gpu_matches_the_cpu_op():
    """gsq::quantize_forward_sorted on the GPU: the CPU op's indices and codes, its loss rows within
    float32 rounding; opcheck covers the schema and the autograd registration."""
    for d, l2_normalize in ((1, True), (1, False), (2, True)):
        z, codebook = torch.randn(5000, d), gsq_kernels.spherical_init(70_000, d)
        expected = torch.ops.gsq.quantize_forward_sorted(z, codebook, 0.25, 1e-12, l2_normalize)
        got = torch.ops.gsq.quantize_forward_sorted(z.cuda(), codebook.cuda(), 0.25, 1e-12, l2_normalize)
        assert torch.equal(got[1].cpu(), expected[1]) and torch.equal(got[0].cpu(), expected[0])
        torch.testing.assert_close(got[2].cpu(), expected[2], rtol=1e-5, atol=1e-7)
        args = (z[:300].cuda().requires_grad_(), codebook.cuda().requires_grad_(), 0.25, 1e-12, l2_normalize)
        torch.library.opcheck(torch.ops.gsq.quantize_forward_sorted.default, args)


@needs_gpu
def test_collapsed_codebook_gradient_is_deterministic_and_right():
    """Every row on one code (M = 131,072): the chunked reduction, same bits run to run."""
    z = torch.rand(131_072, 4, device="cuda") + 0.5
    codebook = -torch.rand(64, 4, device="cuda") - 1
    codebook[0] = 1
    indices = torch.zeros(131_072, dtype=torch.int64, device="cuda")
    w = torch.rand(131_072, device="cuda")
    grads = [
        torch.ops.gsq.quantize_backward(torch.zeros_like(z), w, z, codebook, indices, 0.25, 1e-12, True)[1]
        for _ in range(3)
    ]
    assert all(torch.equal(g, grads[0]) for g in grads[1:])
    n = torch.nn.functional.normalize(z.double(), dim=1)
    expected = 2 * (w.double()[:, None] * (codebook[0].double() - n)).sum(0)
    torch.testing.assert_close(grads[0][0].double(), expected, rtol=1e-5, atol=1e-3)


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
        grads = torch.ops.gsq.quantize_backward(
            torch.ones_like(z), torch.ones(z.shape[0], device="cuda"), z, codebook, captured[1], 0.25, 1e-12, True
        )
    z.copy_(torch.randn_like(z))
    graph.replay()
    torch.cuda.synchronize()
    fresh = torch.ops.gsq.quantize_forward(z, codebook, 0.25, 1e-12, True)
    assert torch.equal(captured[1], fresh[1]) and not torch.equal(captured[1], expected[1])
    fresh_grads = torch.ops.gsq.quantize_backward(
        torch.ones_like(z), torch.ones(z.shape[0], device="cuda"), z, codebook, fresh[1], 0.25, 1e-12, True
    )
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
