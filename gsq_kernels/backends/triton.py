"""The Triton backend: ops gsq_triton::{quantize_forward, quantize_backward, nearest_code,
nearest_code_with_gap, quantize_forward_with_gap, nearest_code_sorted} built with
torch.library.triton_op + wrap_triton (so torch.compile traces into the kernels; opaque custom ops
under the interpreter), the autograd formula, warmup (before capturing a CUDA graph) and the Backend
entry. Kernels and their math: triton_kernels.py.

Runs on CUDA tensors, on z's device whatever the current one; on CPU tensors only under
TRITON_INTERPRET=1 (the tests). Computes in float32 for fp32/fp16/bf16 latents; float64 is refused
(use the cpu or reference backend for gradcheck).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import Tensor

from .. import ops
from .base import Backend

# Whether Triton runs in its CPU interpreter; read once, before any kernel is defined. The one place
# that decides it: the rest of gsq_kernels imports it from here.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows per codebook-gradient chunk when M is symbolic: sqrt(M) for M = 64 Ki.
SYMBOLIC_CHUNK_ROWS = 256
# Code indices inside a tile are int32, and the CUDA glue caps rows likewise: beyond this, split the call.
MAX_ROWS = MAX_CODES = 2**31 - 1
# csrc/gsq_sorted_search.h's kCodesPerBucket: the sorted search's buckets hold about this many codes.
SORTED_CODES_PER_BUCKET = 4


def _probe() -> tuple[bool, str]:
    try:
        import triton
    except ImportError as error:
        return False, f"triton is not installed ({error})"
    if INTERPRETED:
        return True, f"Triton {triton.__version__} in the CPU interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (Triton kernels need a GPU, or TRITON_INTERPRET=1)"
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"


AVAILABLE, REASON = _probe()


def _check(op: str, z: Tensor, codebook: Tensor) -> None:
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: the triton backend takes float32, float16 or bfloat16 z, got {z.dtype}; "
            "use backend='cpu' or 'reference' for float64"
        )
    if codebook.dtype != torch.float32:
        raise TypeError(f"{op}: codebook must be float32, got {codebook.dtype}")
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"{op}: expected z (M, d) and codebook (V, d), got {tuple(z.shape)} and {tuple(codebook.shape)}"
        )
    if z.shape[0] > MAX_ROWS:
        raise ValueError(f"{op}: z may hold at most 2^31-1 group vectors per call, got {z.shape[0]}; split the batch")
    if codebook.shape[0] > MAX_CODES:
        raise ValueError(f"{op}: the codebook may hold at most 2^31-1 codes, got {codebook.shape[0]}")


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it z's for the call (z on cuda:1 while
    cuda:0 is current would otherwise run on the wrong device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch(kernel, grid, *args, **meta) -> None:
    """Every launch of the backend, through wrap_triton (torch.compile captures it)."""
    from torch.library import wrap_triton

    wrap_triton(kernel)[grid](*args, **meta)


def _launches(tensor: Tensor) -> bool:
    """False for fake tensors under the interpreter: the op's fake implementation is its own body
    (see _op), and skipping the launch leaves exactly the allocations it needs. On a GPU, wrap_triton
    captures the launch while tracing, and this is always True."""
    if not INTERPRETED:
        return True
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(tensor)


def _op(name: str):
    """Registers an op. On a GPU: torch.library.triton_op, so torch.compile traces into the kernels.
    Under the interpreter: an opaque custom_op whose fake implementation is the same body (launches
    skipped), since wrap_triton cannot capture interpreted kernels: a decomposed op would compile to
    its allocations alone."""
    if not INTERPRETED:
        return torch.library.triton_op(name, mutates_args=())

    def register(fn):
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return register


def prepare_codebook(codebook: Tensor, eps: float, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    """(codes transposed (d, V), bias (V,)): what the lookup streams; see triton_kernels.py."""
    if l2_normalize:
        codes = codebook / torch.linalg.vector_norm(codebook, dim=-1, keepdim=True).clamp_min(eps)
        bias = torch.zeros(codebook.shape[0], dtype=torch.float32, device=codebook.device)
    else:
        codes = codebook
        bias = -0.5 * (codebook * codebook).sum(dim=-1)
    return codes.t().contiguous(), bias.contiguous()


def _block_d(d: int) -> int:
    import triton

    return triton.next_power_of_2(d)


def rows_bucket(rows) -> int:
    """The autotune key's stand-in for M: the next power of two, capped (tile shapes that suit 4 Ki
    rows starve an H100 of programs; past the cap every shape fills it). A symbolic M (torch.compile
    with dynamic shapes, where inductor tunes the kernel itself) gets the cap, with no guard on M."""
    from .triton_kernels import ROWS_BUCKET_CAP

    if not isinstance(rows, int):
        return ROWS_BUCKET_CAP
    return min(_block_d(max(rows, 1)), ROWS_BUCKET_CAP)


def _lookup(z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool, outputs: str):
    """The forward scan. outputs: "all" -> (quantized, indices, loss_rows), "indices" -> indices,
    "gap" -> (indices, gap), "all_gap" -> (quantized, indices, loss_rows, gap)."""
    import triton

    from .triton_kernels import forward_block_d, gsq_forward_kernel, gsq_normalize_rows_kernel, rows_per_program

    z, codebook = z.contiguous(), codebook.contiguous()
    (rows, d), num_codes = z.shape, codebook.shape[0]
    with _device_guard(z.device):
        indices = torch.empty(rows, dtype=torch.int64, device=z.device)
        unused = torch.empty(0, dtype=torch.float32, device=z.device)  # for the pointers a mode never touches
        write_outputs, with_gap = outputs in ("all", "all_gap"), outputs in ("gap", "all_gap")
        quantized = torch.empty_like(z) if write_outputs else unused
        loss_rows = torch.empty(rows, dtype=torch.float32, device=z.device) if write_outputs else unused
        gap = torch.empty(rows, dtype=torch.float32, device=z.device) if with_gap else unused
        if rows > 0 and _launches(z):
            codes_t, bias = prepare_codebook(codebook, eps, l2_normalize)
            n = torch.empty((rows, d), dtype=torch.float32, device=z.device)
            row_denom = torch.empty(rows, dtype=torch.float32, device=z.device)
            block_d = _block_d(d)
            block = rows_per_program(block_d)
            _launch(
                gsq_normalize_rows_kernel,
                (triton.cdiv(rows, block),),
                z,
                n,
                row_denom,
                rows,
                eps,
                D=d,
                BLOCK_D=block_d,
                L2=l2_normalize,
                BLOCK_M=block,
            )
            _launch(
                gsq_forward_kernel,
                lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),),
                z,
                n,
                row_denom,
                codes_t,
                bias,
                codebook,
                quantized,
                indices,
                loss_rows,
                gap,
                rows,
                num_codes,
                rows_bucket(rows),
                1.0 + beta,
                D=d,
                BLOCK_D=forward_block_d(d),
                L2=l2_normalize,
                WRITE_OUTPUTS=write_outputs,
                WITH_GAP=with_gap,
            )
    return {
        "all": (quantized, indices, loss_rows),
        "indices": indices,
        "gap": (indices, gap),
        "all_gap": (quantized, indices, loss_rows, gap),
    }[outputs]


@_op("gsq_triton::quantize_forward")
def quantize_forward(
    z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool
) -> tuple[Tensor, Tensor, Tensor]:
    _check("gsq_triton::quantize_forward", z, codebook)
    return _lookup(z, codebook, beta, eps, l2_normalize, outputs="all")


@_op("gsq_triton::quantize_forward_with_gap")
def quantize_forward_with_gap_op(
    z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check("gsq_triton::quantize_forward_with_gap", z, codebook)
    return _lookup(z, codebook, beta, eps, l2_normalize, outputs="all_gap")


@_op("gsq_triton::nearest_code")
def nearest_code_op(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    _check("gsq_triton::nearest_code", z, codebook)
    return _lookup(z, codebook, 0.0, eps, l2_normalize, outputs="indices")


@_op("gsq_triton::nearest_code_with_gap")
def nearest_code_with_gap_op(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    _check("gsq_triton::nearest_code_with_gap", z, codebook)
    return _lookup(z, codebook, 0.0, eps, l2_normalize, outputs="gap")


def _sorted_max_buckets(num_codes: int) -> int:
    """gsq_sorted::bucket_map's count: a power of two, about V / 4 (csrc/gsq_sorted_search.h)."""
    buckets = 1
    while buckets * 2 * SORTED_CODES_PER_BUCKET <= num_codes:
        buckets *= 2
    return buckets


@_op("gsq_triton::nearest_code_sorted")
def nearest_code_sorted_op(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    """The exact nearest codes for d = 1, and d = 2 with l2 on (triton_kernels.py): the codes'
    bucket keys (a kernel), a stable torch.sort of them, then a search kernel per block of rows."""
    import triton

    from ..lookup import lookup_l2
    from .triton_kernels import gsq_sorted_keys_kernel, gsq_sorted_search_kernel

    _check("gsq_triton::nearest_code_sorted", z, codebook)
    d = z.shape[1]
    if not (d == 1 or (d == 2 and l2_normalize)):
        raise ValueError(
            f"gsq_triton::nearest_code_sorted: the sorted search covers d = 1, and d = 2 with l2 on; "
            f"got d={d} with l2_normalize={l2_normalize}"
        )
    z, codebook = z.float().contiguous(), codebook.contiguous()
    rows, num_codes = z.shape[0], codebook.shape[0]
    with _device_guard(z.device):
        indices = torch.empty(rows, dtype=torch.int64, device=z.device)
        if rows == 0 or not _launches(z):
            return indices
        max_buckets = _sorted_max_buckets(num_codes)
        codes = lookup_l2(codebook, eps) if l2_normalize else codebook
        if d == 1:  # the finite keys' range (a device tensor: nothing synchronizes)
            finite = torch.isfinite(codebook[:, 0])
            low = torch.where(finite, codes[:, 0], math.inf).min()
            key_range = torch.stack([low, torch.where(finite, codes[:, 0], -math.inf).max()]).float()
        else:
            key_range = torch.zeros(2, dtype=torch.float32, device=z.device)
        keys = torch.empty(num_codes, dtype=torch.int64, device=z.device)
        block = 1024
        _launch(
            gsq_sorted_keys_kernel,
            (triton.cdiv(num_codes, block),),
            codebook,
            keys,
            key_range,
            num_codes,
            max_buckets,
            eps,
            D=d,
            L2=l2_normalize,
            BLOCK=block,
        )
        sorted_keys, order = torch.sort(keys, stable=True)
        bucket_start = torch.searchsorted(sorted_keys, torch.arange(max_buckets + 2, device=z.device))
        members = order.to(torch.int32)
        member_codes = codes.index_select(0, order).contiguous()
        search_block = 1024 if INTERPRETED else 128
        _launch(
            gsq_sorted_search_kernel,
            (triton.cdiv(rows, search_block),),
            z,
            members,
            member_codes,
            bucket_start,
            key_range,
            indices,
            rows,
            max_buckets,
            eps,
            D=d,
            L2=l2_normalize,
            EXACT_ROUNDING=not INTERPRETED,
            BLOCK=search_block,
        )
    return indices


def nearest_code_sorted(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    return torch.ops.gsq_triton.nearest_code_sorted(z, codebook, eps, l2_normalize)


def chunk_rows(rows) -> int:
    """Rows per chunk of the codebook gradient: about sqrt(M), so a collapsed codebook (every row on
    one code) costs ~2 sqrt(M) serial steps (a chunk, then the chunk sums). A function of M alone,
    so the summation order, hence the bits, depend on nothing else; a symbolic M (torch.compile with
    dynamic shapes) takes SYMBOLIC_CHUNK_ROWS rather than a guard on M."""
    if not isinstance(rows, int):
        return SYMBOLIC_CHUNK_ROWS
    return max(16, _block_d(math.isqrt(max(rows, 1))))


def _codebook_grad(
    z: Tensor,
    grad_loss_rows: Tensor,
    codebook: Tensor,
    indices: Tensor,
    eps: float,
    l2_normalize: bool,
    grad_codebook: Tensor,
) -> None:
    """dL/dC_j = sum_{i: idx_i = j} 2 w_i (c_j - n_i), summed in a fixed order (triton_kernels.py)."""
    import triton

    from .triton_kernels import gsq_codebook_grad_chunks_kernel, gsq_codebook_grad_combine_kernel, rows_per_program

    (rows, d), num_codes = z.shape, codebook.shape[0]
    chunk = chunk_rows(rows)
    # Bucket rows by code: a stable sort keeps each code's rows in increasing order. Then cut each
    # code's rows into chunks; every size below is known without reading the data (no host sync).
    rows_by_code = torch.argsort(indices, stable=True)
    counts = torch.zeros(num_codes, dtype=torch.int64, device=z.device).index_add_(0, indices, torch.ones_like(indices))
    bucket_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    chunk_start = torch.cat([counts.new_zeros(1), ((counts + chunk - 1) // chunk).cumsum(0)])
    num_chunks = rows // chunk + num_codes  # >= sum_j ceil(count_j / chunk)
    chunk_code = torch.searchsorted(chunk_start[1:], torch.arange(num_chunks, device=z.device), right=True)
    partial = torch.empty((num_chunks, d), dtype=torch.float32, device=z.device)
    block_d = _block_d(d)
    block = rows_per_program(block_d)
    _launch(
        gsq_codebook_grad_chunks_kernel,
        (triton.cdiv(num_chunks, block),),
        z,
        grad_loss_rows,
        codebook,
        rows_by_code,
        bucket_start,
        chunk_start,
        chunk_code,
        partial,
        num_chunks,
        num_codes,
        eps,
        CHUNK=chunk,
        D=d,
        BLOCK_D=block_d,
        L2=l2_normalize,
        BLOCK_Q=block,
    )
    _launch(
        gsq_codebook_grad_combine_kernel,
        (triton.cdiv(num_codes, block),),
        partial,
        chunk_start,
        grad_codebook,
        num_codes,
        D=d,
        BLOCK_D=block_d,
        BLOCK_C=block,
    )


@_op("gsq_triton::quantize_backward")
def quantize_backward(
    grad_quantized: Tensor,
    grad_loss_rows: Tensor,
    z: Tensor,
    codebook: Tensor,
    indices: Tensor,
    beta: float,
    eps: float,
    l2_normalize: bool,
) -> tuple[Tensor, Tensor]:
    import triton

    from .triton_kernels import gsq_backward_z_kernel, rows_per_program

    _check("gsq_triton::quantize_backward", z, codebook)
    z, codebook, indices = z.contiguous(), codebook.contiguous(), indices.contiguous()
    grad_quantized = grad_quantized.contiguous()
    grad_loss_rows = grad_loss_rows.to(torch.float32).contiguous()
    rows, d = z.shape
    with _device_guard(z.device):
        grad_z = torch.empty_like(z)
        grad_codebook = torch.empty_like(codebook)
        if not _launches(z):
            return grad_z, grad_codebook
        block_d = _block_d(d)
        block = rows_per_program(block_d)
        if rows > 0:
            _launch(
                gsq_backward_z_kernel,
                (triton.cdiv(rows, block),),
                z,
                grad_quantized,
                grad_loss_rows,
                codebook,
                indices,
                grad_z,
                rows,
                beta,
                eps,
                D=d,
                BLOCK_D=block_d,
                L2=l2_normalize,
                BLOCK_M=block,
            )
        _codebook_grad(z, grad_loss_rows, codebook, indices, eps, l2_normalize, grad_codebook)
    return grad_z, grad_codebook


def backward(grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize):
    """(grad_z, grad_codebook) for given indices: differentiates quantize_forward, and the exact
    lookup's forward (gsq_kernels/exact.py)."""
    return torch.ops.gsq_triton.quantize_backward(
        grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize
    )


ops.register_quantize_autograd("gsq_triton::quantize_forward", backward)


def quantize(z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool):
    _check("triton backend", z, codebook)
    quantized, indices, loss_rows = torch.ops.gsq_triton.quantize_forward(z, codebook, beta, eps, l2_normalize)
    return quantized, indices, ops.loss_from_rows(loss_rows, z)


def nearest_code(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    _check("triton backend", z, codebook)
    return torch.ops.gsq_triton.nearest_code(z, codebook, eps, l2_normalize)


def nearest_code_with_gap(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    """(indices, gap): nearest_code's indices, bit for bit, and gap = s_best - s_second, the margin of
    the winning score over the best other code's (0 on ties; +inf for V = 1 and rows holding NaN/inf).
    Scores: <n, c^_j> with l2 on, <z, c_j> - ||c_j||^2 / 2 with it off. gap is float32."""
    _check("triton backend", z, codebook)
    return torch.ops.gsq_triton.nearest_code_with_gap(z, codebook, eps, l2_normalize)


def quantize_forward_with_gap(z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool):
    """quantize_forward's (quantized, indices, loss_rows) and nearest_code_with_gap's gap in one scan."""
    _check("triton backend", z, codebook)
    return torch.ops.gsq_triton.quantize_forward_with_gap(z, codebook, beta, eps, l2_normalize)


def warmup(z: Tensor, codebook: Tensor, beta: float = 0.25, eps: float = 1e-12, l2_normalize: bool = True) -> None:
    """Compile and autotune every kernel of the backend for z's shape, group width and codebook.

    Call it before capturing a CUDA graph (torch.cuda.graph, or torch.compile's reduce-overhead mode
    on the eager path): the forward's autotuner benchmarks its candidate tile shapes on the first call
    for each (M bucket, V, d, mode), which cannot happen inside a capture. A first call made inside
    a capture anyway does not fail: it runs the default tile shape of its width, and keeps it for that
    key (triton_kernels.prune_forward_configs). z: (M, d) or any tensor whose last dimension is d.
    """
    if z.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("gsq_kernels triton warmup: call it before the CUDA graph capture, not inside it")
    z = z.detach().reshape(-1, codebook.shape[1])
    codebook = codebook.detach()
    with torch.enable_grad():
        z_grad, codebook_grad = z.clone().requires_grad_(), codebook.clone().requires_grad_()
        quantized, _, loss = quantize(z_grad, codebook_grad, beta, eps, l2_normalize)
        (quantized.float().sum() + loss).backward()
    nearest_code(z, codebook, eps, l2_normalize)
    nearest_code_with_gap(z, codebook, eps, l2_normalize)
    quantize_forward_with_gap(z, codebook, beta, eps, l2_normalize)


BACKEND = Backend(
    name="triton",
    device_types=("cuda", "cpu") if INTERPRETED else ("cuda",),
    available=AVAILABLE,
    status=REASON,
    how_to_get="`pip install triton` (bundled with CUDA builds of torch) and run on a CUDA GPU",
    quantize=quantize,
    nearest_code=nearest_code,
    nearest_code_with_gap=nearest_code_with_gap,
    quantize_forward_with_gap=quantize_forward_with_gap,
    nearest_code_sorted=nearest_code_sorted,
    backward=backward,
)
