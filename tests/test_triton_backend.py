"""Triton backend specifics (the shared parity suite already runs it against the reference):
torch.library registration, torch.compile, nearest_code_with_gap, the codebook gradient's fixed
summation order, the device guard, size limits and CUDA-graph capture. Runs on the CPU through
Triton's interpreter when no GPU is present (tests/conftest.py)."""

import contextlib
import math

import pytest
import torch

from gsq_kernels import GroupedSphericalQuantizer, dispatch, grouped_spherical_quantize
from parity import triton_interpreted

BACKEND = dispatch.BACKENDS.get("triton")
pytestmark = pytest.mark.skipif(
    BACKEND is None or not BACKEND.available,
    reason=f"triton backend unavailable: {BACKEND.status if BACKEND else 'not importable'}",
)
if BACKEND is not None and BACKEND.available:
    from gsq_kernels.backends import triton as triton_backend
    from gsq_kernels.backends import triton_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16) if triton_interpreted() else (torch.float32, torch.float16, torch.bfloat16)
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
EPS = 1e-12
# The interpreter scans 1024 codes per tile: 1500 codes make two tiles, the second partial.
CODES = 1500


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [4, 16])
def test_opcheck(dtype, d):
    z = torch.randn(37, d, device=DEVICE).to(dtype).requires_grad_()
    codebook = torch.randn(19, d, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        torch.ops.gsq_triton.quantize_forward.default, (z, codebook, 0.25, 1e-12, True), test_utils=OPCHECK_TESTS
    )
    for op in (torch.ops.gsq_triton.nearest_code.default, torch.ops.gsq_triton.nearest_code_with_gap.default):
        torch.library.opcheck(op, (z.detach(), codebook.detach(), 1e-12, False), test_utils=OPCHECK_TESTS)
    z, codebook = z.detach(), codebook.detach()
    quantized, indices, loss_rows = torch.ops.gsq_triton.quantize_forward(z, codebook, 0.25, 1e-12, True)
    torch.library.opcheck(
        torch.ops.gsq_triton.quantize_backward.default,
        (torch.randn_like(quantized), torch.randn_like(loss_rows), z, codebook, indices, 0.25, 1e-12, True),
        test_utils=OPCHECK_TESTS,
    )


def test_torch_compile_fullgraph():
    """Inductor; on a GPU it compiles the kernels into the graph, under the interpreter it calls the ops."""
    quantizer = GroupedSphericalQuantizer(16, 64, groups=4, backend="triton", lookup="dot").to(DEVICE)
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

    quantizer = GroupedSphericalQuantizer(8, 32, groups=2, backend="triton", lookup="dot").to(DEVICE)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(quantizer, backend=counter, fullgraph=True)
    z = torch.randn(2, 8, 4, 4, device=DEVICE)
    assert torch.equal(compiled(z).indices, quantizer(z).indices)
    assert counter.frame_count == 1
    graph_ops = [str(node.target) for graph in counter.graphs for node in graph.graph.nodes]
    assert any("gsq_triton.quantize_forward" in op for op in graph_ops), graph_ops


def test_float64_is_refused_with_a_pointer():
    with pytest.raises(TypeError, match="triton backend takes float32, float16 or bfloat16 z, got torch.float64"):
        grouped_spherical_quantize(
            torch.randn(3, 4, dtype=torch.float64, device=DEVICE),
            torch.randn(5, 4, dtype=torch.float64, device=DEVICE),
            backend="triton",
        )


@pytest.mark.parametrize("d", [1, 2, 3, 4, 8, 16, 64])
def test_lookup_only_matches_forward(d):
    from gsq_kernels import nearest_code_indices

    z = torch.randn(3, 11, 2 * d, device=DEVICE)
    codebook = torch.randn(1023, d, device=DEVICE)
    out = grouped_spherical_quantize(z, codebook, 2, backend="triton", lookup="dot")
    assert torch.equal(nearest_code_indices(z, codebook, 2, backend="triton", lookup="dot"), out.indices)


# nearest_code_with_gap -------------------------------------------------------------------------------


def _scores(z, codebook, l2_normalize):
    """The op's scores, computed by torch in float32 (another summation order)."""
    if l2_normalize:
        n = z / z.norm(dim=1, keepdim=True).clamp_min(EPS)
        return n @ (codebook / codebook.norm(dim=1, keepdim=True).clamp_min(EPS)).T
    return z @ codebook.T - (codebook * codebook).sum(1) / 2


def _gap_tolerance(z, codebook, l2_normalize):
    """4 first-order bounds on |computed - exact| of a score: each computed top-two gap is within 2
    of the exact gap (max is 1-Lipschitz), so two computations are within 4 of each other. A score's
    bound, in units of the row's largest sum of |terms|: the d-term dot product and its bias (d + 1
    roundings) plus, with l2 on, two normalizations (a d-term sum of squares, a square root and a
    division each)."""
    if l2_normalize:
        z = z / z.norm(dim=1, keepdim=True).clamp_min(EPS)
        codebook = codebook / codebook.norm(dim=1, keepdim=True).clamp_min(EPS)
    magnitude = z.abs() @ codebook.abs().T
    if not l2_normalize:
        magnitude = magnitude + (codebook * codebook).sum(1) / 2
    return 4 * (2 * z.shape[1] + 6) * 2.0**-24 * magnitude.max(dim=1).values


@pytest.mark.parametrize("l2_normalize", [True, False])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 8, 16, 64])
def test_gap_op_matches_nearest_code_and_the_reference_gap(d, l2_normalize):
    z = torch.randn(37, d, device=DEVICE)  # odd M: a partial row tile
    for codes in (2, 7, CODES):  # none a multiple of a tile width
        codebook = torch.randn(codes, d, device=DEVICE)
        indices, gap = triton_backend.nearest_code_with_gap(z, codebook, EPS, l2_normalize)
        assert indices.dtype == torch.int64 and gap.dtype == torch.float32
        assert torch.equal(indices, triton_backend.nearest_code(z, codebook, EPS, l2_normalize))
        top = _scores(z, codebook, l2_normalize).topk(2, dim=1).values
        error = (gap - (top[:, 0] - top[:, 1])).abs()
        assert (error <= _gap_tolerance(z, codebook, l2_normalize)).all(), (codes, error.max())


@pytest.mark.parametrize("l2_normalize", [True, False])
@pytest.mark.parametrize("d", [3, 16])
def test_forward_with_gap_is_the_forward_and_the_gap_in_one_scan(d, l2_normalize):
    z = torch.randn(37, d, device=DEVICE)
    z[4, 0] = float("nan")
    codebook = torch.randn(CODES, d, device=DEVICE)
    quantized, indices, loss_rows, gap = triton_backend.quantize_forward_with_gap(z, codebook, 0.25, EPS, l2_normalize)
    expected = torch.ops.gsq_triton.quantize_forward(z, codebook, 0.25, EPS, l2_normalize)
    assert torch.equal(quantized, expected[0]) and torch.equal(indices, expected[1])
    assert torch.equal(loss_rows.nan_to_num(-1.0), expected[2].nan_to_num(-1.0))
    assert torch.equal(gap, triton_backend.nearest_code_with_gap(z, codebook, EPS, l2_normalize)[1])


@pytest.mark.parametrize("d", [1, 3, 16, 64])
def test_gap_is_exact_when_every_score_is_exact(d):
    """Small integers with l2 off: every product and partial sum is an integer or a half below 2^24,
    so scores, winner and gap are exact in any summation order. The codebook repeats 700 of its codes
    (the copies in the next tile), so ties within and across tiles occur."""
    z = torch.randint(-16, 17, (149, d), device=DEVICE).float()
    if d == 1:  # 800 distinct values, or every best would have a copy
        codes = (torch.randperm(2048, device=DEVICE)[:800] - 1024).float()[:, None]
    else:
        codes = torch.randint(-16, 17, (800, d), device=DEVICE).float()
    codebook = torch.cat([codes, codes[:700]])
    indices, gap = triton_backend.nearest_code_with_gap(z, codebook, EPS, False)
    scores = _scores(z, codebook, False)
    top = scores.topk(2, dim=1).values
    assert torch.equal(indices, scores.argmax(dim=1))  # argmax returns the first maximum
    assert torch.equal(gap, top[:, 0] - top[:, 1])
    assert (gap == 0).any() and (gap > 0).any()


@pytest.mark.parametrize("where", ["same_tile", "later_tile", "earlier_tile"])
def test_the_runner_up_is_found_wherever_it_lies(where):
    """Code 500 is every row's best, a near copy of it the runner-up, all other codes far worse: the
    runner-up in the best's tile, in the next tile, or in the tile before the best's."""
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0]], device=DEVICE).repeat(5, 1)
    codebook = -torch.rand(CODES, 4, device=DEVICE) - 1  # negative scores along +x
    best = 1200 if where == "earlier_tile" else 500
    runner_up = {"same_tile": 501, "later_tile": 1400, "earlier_tile": 3}[where]
    codebook[best] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    codebook[runner_up] = torch.tensor([1.0, 0.5, 0.0, 0.0])
    indices, gap = triton_backend.nearest_code_with_gap(z, codebook, EPS, True)
    assert (indices == best).all()
    expected = 1.0 - (codebook[runner_up] / codebook[runner_up].norm())[0]
    torch.testing.assert_close(gap, expected.expand(5), rtol=0, atol=4 * 2.0**-24)


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_a_duplicated_best_code_gives_gap_zero_and_the_lower_index(l2_normalize):
    z = torch.randn(65, 4, device=DEVICE)
    codebook = torch.randn(1100, 4, device=DEVICE)
    doubled = torch.cat([codebook, codebook])  # copies 1100 codes apart: different tiles
    indices, gap = triton_backend.nearest_code_with_gap(z, doubled, EPS, l2_normalize)
    assert torch.equal(indices, triton_backend.nearest_code(z, codebook, EPS, l2_normalize))
    assert torch.equal(gap, torch.zeros_like(gap))


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_a_single_code_and_non_finite_rows_give_infinite_gap(l2_normalize):
    z = torch.randn(10, 4, device=DEVICE)
    for codebook in (torch.randn(1, 4, device=DEVICE), torch.full((1, 4), 3e38, device=DEVICE)):
        indices, gap = triton_backend.nearest_code_with_gap(z, codebook, EPS, l2_normalize)
        assert torch.equal(indices, torch.zeros_like(indices))
        assert torch.equal(gap, torch.full_like(gap, float("inf")))  # the second code overflows its score
    z[2, 1], z[5, 0], z[7, 3] = float("nan"), float("inf"), -float("inf")
    codebook = torch.randn(50, 4, device=DEVICE)
    indices, gap = triton_backend.nearest_code_with_gap(z, codebook, EPS, l2_normalize)
    bad, good = torch.tensor([2, 5, 7]), torch.tensor([0, 1, 3, 4, 6, 8, 9])
    assert (indices[bad] == 0).all() and (gap[bad] == float("inf")).all()
    assert torch.equal(indices[good], triton_backend.nearest_code(z[good], codebook, EPS, l2_normalize))
    assert torch.isfinite(gap[good]).all() and (gap[good] >= 0).all()


def test_scores_that_overflow_alike_are_a_tie():
    """l2 off with huge codes: every bias -||c||^2/2 overflows to -inf; the gap says 'tie', not NaN."""
    indices, gap = triton_backend.nearest_code_with_gap(
        torch.randn(6, 2, device=DEVICE), torch.full((3, 2), 3e38, device=DEVICE), EPS, False
    )
    assert torch.equal(indices, torch.zeros_like(indices)) and torch.equal(gap, torch.zeros(6, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_gap_op_with_half_inputs_and_no_rows(dtype):
    z = torch.randn(33, 8, device=DEVICE).to(dtype)
    codebook = torch.randn(70, 8, device=DEVICE)
    indices, gap = triton_backend.nearest_code_with_gap(z, codebook, EPS, True)
    assert gap.dtype == torch.float32
    assert torch.equal(indices, triton_backend.nearest_code(z, codebook, EPS, True))
    top = _scores(z.float(), codebook, True).topk(2, dim=1).values
    assert ((gap - (top[:, 0] - top[:, 1])).abs() <= _gap_tolerance(z.float(), codebook, True)).all()
    indices, gap = triton_backend.nearest_code_with_gap(z[:0], codebook, EPS, True)
    assert indices.shape == (0,) and gap.shape == (0,)


# codebook gradient -----------------------------------------------------------------------------------


def _codebook_grad_in_documented_order(z, w, codebook, indices):
    """dL/dC_j = sum_i 2 w_i (c_j - z_i) (l2 off), summed as triton_kernels.py documents: each code's
    rows (increasing order) in chunks of chunk_rows(M) rows, each chunk in order, then the chunk sums
    in order; float32 throughout."""
    chunk = triton_backend.chunk_rows(z.shape[0])
    grad = torch.zeros_like(codebook)
    for code in indices.unique().tolist():
        rows = (indices == code).nonzero().squeeze(1)
        terms = (2.0 * w[rows])[:, None] * (codebook[code] - z[rows])
        pieces = terms.split(chunk)
        partial = torch.zeros(len(pieces), codebook.shape[1], device=z.device)
        for step in range(chunk):  # all chunks at once, row by row: each chunk summed in order
            for p, piece in enumerate(pieces):
                if step < piece.shape[0]:
                    partial[p] += piece[step]
        for p in range(len(pieces)):
            grad[code] += partial[p]
    return grad


@pytest.mark.parametrize("collapsed", [True, False])
def test_codebook_gradient_follows_the_documented_order(collapsed):
    """Bit for bit the documented fixed order (so: deterministic, whatever the launch configuration),
    with a collapsed codebook (every row on code 17) and with a few codes of hundreds of rows each."""
    rows, d = 3000, 4
    z = torch.randn(rows, d, device=DEVICE)
    codebook = torch.randn(300, d, device=DEVICE)
    w = torch.randn(rows, device=DEVICE)
    indices = torch.full((rows,), 17, device=DEVICE) if collapsed else torch.randint(0, 5, (rows,), device=DEVICE) * 60
    _, grad = torch.ops.gsq_triton.quantize_backward(torch.zeros_like(z), w, z, codebook, indices, 0.25, EPS, False)
    expected = _codebook_grad_in_documented_order(z, w, codebook, indices)
    assert torch.equal(grad, expected)


def test_codebook_gradient_of_a_collapsed_codebook_is_correct_and_parallel():
    """All rows on one code: the result matches the float64 truth within the fixed order's proven
    bound, and the serial depth (a chunk, then the chunk sums) is ~2 sqrt(M), not M."""
    codebook = -torch.randn(300, 4, device=DEVICE).abs()  # every code but 17 points away from z
    codebook[17] = torch.tensor([1.0, 1.0, 1.0, 1.0]) * 10
    z = torch.rand(20000, 4, device=DEVICE) + 0.5
    results = []
    for _ in range(2):
        c = codebook.clone().requires_grad_()
        out = grouped_spherical_quantize(z, c, 1, backend="triton", lookup="dot")
        assert (out.indices == 17).all()
        (out.quantized.sum() + out.loss).backward()
        results.append(c.grad)
    assert torch.equal(results[0], results[1])
    n = (z / z.norm(dim=1, keepdim=True)).double()
    weight = 2.0 / z.numel()
    truth = (weight * (codebook[17].double() - n)).sum(0)
    chunk = triton_backend.chunk_rows(z.shape[0])
    serial = chunk + math.ceil(z.shape[0] / chunk)
    assert serial <= 3 * math.sqrt(z.shape[0])
    # First order: each term 2 w (c - n) carries (2d + 12) roundings of |2 w| (|c| + |n|) at most (n's
    # norm, root and division; the difference; the product), the two-level sum `serial` of the running
    # sums, each at most the sum of |terms|.
    magnitude = (weight * (codebook[17].double().abs() + n.abs())).sum(0)
    bound = (serial + 2 * 4 + 12) * 2.0**-24 * magnitude
    assert ((results[0][17].double() - truth).abs() <= bound).all()
    assert (results[0][torch.arange(300, device=DEVICE) != 17] == 0).all()


# device guard, limits, capture --------------------------------------------------------------------


def test_every_launch_runs_under_the_device_guard_of_z(monkeypatch):
    """Launches go to the current CUDA device: each must run inside _device_guard(z.device)."""
    active, launched, guarded_devices = [], [], []

    @contextlib.contextmanager
    def recording_guard(device):
        guarded_devices.append(device)
        active.append(device)
        yield
        active.pop()

    real_launch = triton_backend._launch

    def checking_launch(kernel, grid, *args, **meta):
        launched.append((kernel, list(active)))
        real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(triton_backend, "_device_guard", recording_guard)
    monkeypatch.setattr(triton_backend, "_launch", checking_launch)
    z = torch.randn(20, 4, device=DEVICE)
    codebook = torch.randn(9, 4, device=DEVICE, requires_grad=True)
    triton_backend.nearest_code_with_gap(z, codebook.detach(), EPS, True)
    quantized, _, loss = triton_backend.quantize(z, codebook, 0.25, EPS, True)
    (quantized.sum() + loss).backward()
    assert len(launched) >= 6  # normalize + scan twice, then backward_z and the two codebook-gradient passes
    assert all(guards == [z.device] for _, guards in launched), launched
    assert set(guarded_devices) == {z.device}


def test_the_device_guard_selects_the_tensors_cuda_device():
    guard = triton_backend._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(triton_backend._device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_z_on_another_device_than_the_current_one():
    z = torch.randn(300, 8, device="cuda:1")
    codebook = torch.randn(1000, 8, device="cuda:1")
    with torch.cuda.device(1):
        expected = triton_backend.nearest_code_with_gap(z, codebook, EPS, True)
    with torch.cuda.device(0):
        got = triton_backend.nearest_code_with_gap(z, codebook, EPS, True)
        quantized, indices, _ = triton_backend.quantize(z, codebook, 0.25, EPS, True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(indices, expected[0]) and torch.equal(quantized, codebook[indices])


def test_sizes_past_int32_are_refused_before_any_allocation():
    z = torch.empty(2**31, 4, device="meta")  # meta tensors: shapes only, nothing allocated
    with pytest.raises(ValueError, match=r"z may hold at most 2\^31-1 group vectors per call, got 2147483648"):
        triton_backend.nearest_code_with_gap(z, torch.empty(5, 4, device="meta"), EPS, True)
    with pytest.raises(ValueError, match=r"the codebook may hold at most 2\^31-1 codes"):
        triton_backend.quantize(torch.empty(5, 4, device="meta"), torch.empty(2**31, 4, device="meta"), 0.25, EPS, True)


def test_the_autotune_key_buckets_m():
    assert "ROWS_BUCKET" in triton_kernels.gsq_forward_kernel.keys
    assert [triton_backend.rows_bucket(m) for m in (1, 37, 64, 65, 5000)] == [1, 64, 64, 128, 8192]
    assert triton_backend.rows_bucket(3 * 2**30) == triton_kernels.ROWS_BUCKET_CAP


def test_a_first_call_inside_a_cuda_graph_capture_skips_benchmarking(monkeypatch):
    """The autotuner asks prune_forward_configs for its candidates: all of the width's tile shapes
    normally, only the default one while a capture is active (a single candidate is never benchmarked)."""
    assert triton_kernels.gsq_forward_kernel.early_config_prune is triton_kernels.prune_forward_configs
    monkeypatch.setattr(triton_kernels, "INTERPRETED", False)  # the GPU's candidate lists
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for block_d in (8, 64):
        gpu_configs = triton_kernels.forward_configs(block_d)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        assert triton_kernels.prune_forward_configs([], {}, BLOCK_D=block_d) == gpu_configs
        assert len(gpu_configs) > 1
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert triton_kernels.prune_forward_configs([], {}, BLOCK_D=block_d) == gpu_configs[:1]


def _kernel_name(kernel) -> str:
    while not hasattr(kernel, "__name__"):
        kernel = kernel.fn
    return kernel.__name__


def test_warmup_launches_every_kernel_in_every_mode(monkeypatch):
    """warmup (call it before a CUDA graph capture) compiles and tunes every launch the ops make."""
    seen = set()
    real_launch = triton_backend._launch

    def recording_launch(kernel, grid, *args, **meta):
        seen.add((_kernel_name(kernel), meta.get("WRITE_OUTPUTS"), meta.get("WITH_GAP")))
        real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(triton_backend, "_launch", recording_launch)
    triton_backend.warmup(torch.randn(2, 6, 4, device=DEVICE), torch.randn(40, 4, device=DEVICE))
    assert seen == {
        ("gsq_normalize_rows_kernel", None, None),
        ("gsq_forward_kernel", True, False),  # quantize_forward
        ("gsq_forward_kernel", False, False),  # nearest_code
        ("gsq_forward_kernel", False, True),  # nearest_code_with_gap
        ("gsq_forward_kernel", True, True),  # quantize_forward_with_gap (the exact lookup's forward)
        ("gsq_backward_z_kernel", None, None),
        ("gsq_codebook_grad_chunks_kernel", None, None),
        ("gsq_codebook_grad_combine_kernel", None, None),
    }
