"""The Triton backend: ops gsq_triton::{quantize_forward, quantize_backward, nearest_code} built with
torch.library.triton_op + wrap_triton (so torch.compile traces into the kernels), the autograd
formula, and the Backend entry. Kernels and their math: triton_kernels.py.

Runs on CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1 (the tests). Computes in float32
for fp32/fp16/bf16 latents; float64 is refused (use the cpu or reference backend for gradcheck).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .base import Backend

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _probe() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return False, f"triton is not installed ({error})"
    if INTERPRETED:
        return True, f"Triton {triton.__version__} in the CPU interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (Triton kernels need a GPU, or TRITON_INTERPRET=1)"
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"


AVAILABLE, REASON = _probe()


def _next_power_of_two(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _check(op: str, z: Tensor, codebook: Tensor) -> None:
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: the triton backend takes float32, float16 or bfloat16 z, got {z.dtype}; "
                        "use backend='cpu' or 'reference' for float64")
    if codebook.dtype != torch.float32:
        raise TypeError(f"{op}: codebook must be float32, got {codebook.dtype}")
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"{op}: expected z (M, d) and codebook (V, d), got {tuple(z.shape)} and {tuple(codebook.shape)}")


def prepare_codebook(codebook: Tensor, eps: float, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    """(codes transposed (d, V), bias (V,)): what the lookup streams; see triton_kernels.py."""
    if l2_normalize:
        codes = codebook / torch.linalg.vector_norm(codebook, dim=-1, keepdim=True).clamp_min(eps)
        bias = torch.zeros(codebook.shape[0], dtype=torch.float32, device=codebook.device)
    else:
        codes = codebook
        bias = -0.5 * (codebook * codebook).sum(dim=-1)
    return codes.t().contiguous(), bias.contiguous()


def _dims(d: int) -> dict:
    use_dot = d >= 16
    block_d = max(16, _next_power_of_two(d)) if use_dot else _next_power_of_two(d)
    return dict(D=d, BLOCK_D=block_d, BLOCK_K=min(block_d, 32), USE_DOT=use_dot)


def _lookup(z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool, write_outputs: bool):
    from torch.library import wrap_triton

    from .triton_kernels import gsq_forward_kernel

    z = z.contiguous()
    codebook = codebook.contiguous()
    rows, d = z.shape
    quantized = torch.empty_like(z)
    indices = torch.empty(rows, dtype=torch.int64, device=z.device)
    loss_rows = torch.empty(rows, dtype=torch.float32, device=z.device)
    codes_t, bias = prepare_codebook(codebook, eps, l2_normalize)
    if rows > 0 and _launches(z):
        def grid(meta):
            return (triton_cdiv(rows, meta["BLOCK_M"]),)

        wrap_triton(gsq_forward_kernel)[grid](
            z, codes_t, bias, codebook, quantized, indices, loss_rows, rows, codebook.shape[0],
            eps, 1.0 + beta, L2=l2_normalize, WRITE_OUTPUTS=write_outputs, **_dims(d),
        )
    return quantized, indices, loss_rows


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _launches(tensor: Tensor) -> bool:
    """False while torch.compile/opcheck trace the op with fake tensors under the interpreter:
    wrap_triton cannot capture interpreted kernels, which would then read fake data. The op's
    fake implementation is this same function, so skipping the launch leaves exactly the
    allocations it needs. On a GPU, wrap_triton captures the launch and this is always True."""
    if not INTERPRETED:
        return True
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(tensor)


@torch.library.triton_op("gsq_triton::quantize_forward", mutates_args=())
def quantize_forward(z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check("gsq_triton::quantize_forward", z, codebook)
    return _lookup(z, codebook, beta, eps, l2_normalize, write_outputs=True)


@torch.library.triton_op("gsq_triton::nearest_code", mutates_args=())
def nearest_code_op(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    _check("gsq_triton::nearest_code", z, codebook)
    return _lookup(z, codebook, 0.0, eps, l2_normalize, write_outputs=False)[1]


@torch.library.triton_op("gsq_triton::quantize_backward", mutates_args=())
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
    from torch.library import wrap_triton

    from .triton_kernels import gsq_backward_z_kernel, gsq_codebook_grad_kernel, rows_per_program

    _check("gsq_triton::quantize_backward", z, codebook)
    z = z.contiguous()
    codebook = codebook.contiguous()
    grad_quantized = grad_quantized.contiguous()
    grad_loss_rows = grad_loss_rows.to(torch.float32).contiguous()
    indices = indices.contiguous()
    rows, d = z.shape
    num_codes = codebook.shape[0]
    grad_z = torch.empty_like(z)
    grad_codebook = torch.empty_like(codebook)

    # Bucket rows by code: a stable sort keeps each code's rows in increasing order.
    rows_by_code = torch.argsort(indices, stable=True)
    counts = torch.zeros(num_codes, dtype=torch.int64, device=z.device).index_add_(
        0, indices, torch.ones_like(indices))
    bucket_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    if not _launches(z):
        return grad_z, grad_codebook
    block_d = _next_power_of_two(d)
    block = rows_per_program(block_d)
    if rows > 0:
        wrap_triton(gsq_backward_z_kernel)[(triton_cdiv(rows, block),)](
            z, grad_quantized, grad_loss_rows, codebook, indices, grad_z, rows, beta, eps,
            D=d, BLOCK_D=block_d, L2=l2_normalize, BLOCK_M=block,
        )
    wrap_triton(gsq_codebook_grad_kernel)[(triton_cdiv(num_codes, block),)](
        z, grad_loss_rows, codebook, rows_by_code, bucket_start, grad_codebook, num_codes, eps,
        D=d, BLOCK_D=block_d, L2=l2_normalize, BLOCK_C=block,
    )
    return grad_z, grad_codebook


def _setup_context(ctx, inputs, output):
    z, codebook, beta, eps, l2_normalize = inputs
    _, indices, _ = output
    ctx.save_for_backward(z, codebook, indices)
    ctx.beta, ctx.eps, ctx.l2_normalize = beta, eps, l2_normalize
    ctx.mark_non_differentiable(indices)


def _backward(ctx, grad_quantized, _grad_indices, grad_loss_rows):
    z, codebook, indices = ctx.saved_tensors
    if grad_quantized is None:
        grad_quantized = torch.zeros_like(z)
    if grad_loss_rows is None:
        grad_loss_rows = z.new_zeros(z.shape[0], dtype=torch.float32)
    grad_z, grad_codebook = torch.ops.gsq_triton.quantize_backward(
        grad_quantized, grad_loss_rows, z, codebook, indices, ctx.beta, ctx.eps, ctx.l2_normalize)
    return grad_z, grad_codebook, None, None, None


quantize_forward.register_autograd(_backward, setup_context=_setup_context)


def quantize(z: Tensor, codebook: Tensor, beta: float, eps: float, l2_normalize: bool):
    _check("triton backend", z, codebook)
    quantized, indices, loss_rows = torch.ops.gsq_triton.quantize_forward(z, codebook, beta, eps, l2_normalize)
    return quantized, indices, loss_rows.sum() / max(z.numel(), 1)


def nearest_code(z: Tensor, codebook: Tensor, eps: float, l2_normalize: bool) -> Tensor:
    _check("triton backend", z, codebook)
    return torch.ops.gsq_triton.nearest_code(z, codebook, eps, l2_normalize)


BACKEND = Backend(
    name="triton",
    device_types=("cuda", "cpu") if INTERPRETED else ("cuda",),
    available=AVAILABLE,
    reason=REASON,
    how_to_get="`pip install triton` (bundled with CUDA builds of torch) and run on a CUDA GPU",
    quantize=quantize,
    nearest_code=nearest_code,
)
