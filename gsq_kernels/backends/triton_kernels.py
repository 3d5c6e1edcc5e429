"""Triton kernels for GSQ: the fused lookup forward and the straight-through backward.

All kernels work on flattened group vectors z (M, D) (D = d, the group width, a compile-time
constant) and compute in float32 whatever z's dtype (fp32/fp16/bf16).

Forward (gsq_forward_kernel), per tile of BLOCK_M group vectors:
    n      = z / max(||z||, eps)                     (l2 on; n = z when off)
    score  = <n, code_j> + bias_j                    streamed over codebook tiles of BLOCK_V codes
    idx    = argmax_j score                           running max/argmax across tiles ("flash" style)
    out    = c_idx (raw row, z's dtype);  loss_row = (1 + beta) ||c_idx - n||^2
  code_j and bias_j come pre-processed once per call (see prepare_codebook in triton.py):
    l2 on : code_j = c_j / max(||c_j||, eps), bias_j = 0
    l2 off: code_j = c_j, bias_j = -||c_j||^2 / 2     (argmax = argmin ||z - c_j||^2)
  stored transposed, (D, V), so a tile of one coordinate of BLOCK_V codes is one contiguous load.
  Ties: inside a tile tl.max(..., return_indices_tie_break_left=True) keeps the lowest index; across
  tiles a strictly greater score is needed to replace the running best, so earlier tiles win. The
  M x V score matrix is never formed: memory is O(M D + V D).
  Two inner products: for D < 16, D broadcast multiply-adds of a column of n against a row of
  codes (tensor cores need K >= 16 and would only pad zeros); for D >= 16, tl.dot over K chunks of
  BLOCK_K with input_precision="ieee", i.e. exact float32 FMA: TF32 tensor cores round the
  operands to 10 mantissa bits and would change which code wins for rows far from any tie.

Backward, with g = dL/dquantized and w = dL/dloss_row (see gsq_kernels/ops.py for why loss_rows
carries beta's share to n and the rest to the codebook):
    dL/dn  = g + 2 beta w (n - c)
    dL/dz  = (dL/dn - n <n, dL/dn>) / ||z||  (l2 on, ||z|| >= eps);  dL/dn / eps  (||z|| < eps);
             dL/dn  (l2 off)                                         gsq_backward_z_kernel
    dL/dC_j = sum over rows i with idx_i = j of 2 w_i (c_j - n_i)       gsq_codebook_grad_kernel
  The codebook gradient is a segment reduction, not atomics: rows are sorted by code (a stable
  sort, so each code lists its rows in increasing order) and each program sums the segments of
  BLOCK_C codes in that fixed order. The result is deterministic, run to run and whatever the
  launch configuration; a code chosen by many rows costs its program proportionally more steps.

Under TRITON_INTERPRET=1 (CPU tests) a single large-block configuration is used: the interpreter's
cost grows with programs x loop steps, not with block size. On a GPU the forward is autotuned over a
few tile shapes; the memory-bound backward kernels size their tiles from d (rows_per_program).
Every variant compiles for sm_90a (tests/test_triton_gpu_compile.py runs triton.compile + ptxas,
no GPU needed); the forward spills nothing up to d = 16, a few bytes at d = 64 and a few hundred at
d = 256 with 64 x 64 tiles (the autotuner may prefer other shapes there).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _forward_configs():
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 128, "BLOCK_V": 1024}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_V": block_v}, num_warps=warps, num_stages=stages)
        for block_m, block_v, warps, stages in (
            (64, 64, 4, 3),
            (128, 64, 4, 3),
            (64, 128, 4, 3),
            (128, 128, 8, 3),
            (32, 128, 4, 4),
            (256, 64, 8, 3),
        )
    ]


def rows_per_program(block_d: int) -> int:
    """Rows (or codes) per program of the memory-bound backward kernels: each holds a few
    (rows x block_d) tiles in registers, so wide groups take fewer rows (no spills at d = 256)."""
    if INTERPRETED:
        return 1024
    return max(4, min(256, 2048 // block_d))


@triton.autotune(configs=_forward_configs(), key=["V", "D", "L2", "WRITE_OUTPUTS"])
@triton.jit
def gsq_forward_kernel(
    z_ptr,  # (M, D), any float dtype
    codes_t_ptr,  # (D, V) float32, pre-processed codes, transposed
    bias_ptr,  # (V,) float32
    codebook_ptr,  # (V, D) float32, raw rows (the forward value)
    quantized_ptr,  # (M, D), z's dtype
    indices_ptr,  # (M,) int64
    loss_rows_ptr,  # (M,) float32
    M,
    V,
    eps,
    loss_scale,  # 1 + beta
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D (>= 16 on the tl.dot path)
    BLOCK_K: tl.constexpr,  # chunk of D held at once (D can be 256: a whole row tile would spill)
    USE_DOT: tl.constexpr,
    L2: tl.constexpr,
    WRITE_OUTPUTS: tl.constexpr,  # False: indices only (nearest_code)
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M

    # Row statistics, chunk by chunk. A row holding NaN/inf scores NaN against every code; such rows
    # are scored as zeros (no NaN reaches the reductions) and given index 0, as in the other
    # backends. Their loss stays NaN.
    sum_squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    finite = row_ok | True
    for k0 in range(0, BLOCK_D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        chunk = tl.load(z_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & (ks < D)[None, :],
                        other=0.0).to(tl.float32)
        sum_squares += tl.sum(chunk * chunk, axis=1)
        finite = finite & (tl.sum(chunk * 0.0, axis=1) == 0.0)
    if L2:
        norm = tl.sqrt(sum_squares)
        denom = tl.maximum(tl.where(finite, norm, 0.0), eps)
    else:
        denom = tl.full([BLOCK_M], 1.0, tl.float32)

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        codes = v0 + tl.arange(0, BLOCK_V)
        code_ok = codes < V
        bias = tl.load(bias_ptr + codes, mask=code_ok, other=float("-inf"))
        scores = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        if USE_DOT:
            for k0 in range(0, BLOCK_D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                z_chunk = tl.load(z_ptr + rows[:, None] * D + ks[None, :],
                                  mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                n_chunk = tl.where(finite[:, None], z_chunk, 0.0) / denom[:, None]
                c_chunk = tl.load(codes_t_ptr + ks[:, None] * V + codes[None, :],
                                  mask=k_ok[:, None] & code_ok[None, :], other=0.0)
                scores += tl.dot(n_chunk, c_chunk, input_precision="ieee")
        else:
            for k in tl.static_range(D):
                z_k = tl.load(z_ptr + rows * D + k, mask=row_ok, other=0.0).to(tl.float32)
                n_k = tl.where(finite, z_k, 0.0) / denom
                c_k = tl.load(codes_t_ptr + k * V + codes, mask=code_ok, other=0.0)
                scores += n_k[:, None] * c_k[None, :]
        scores = scores + bias[None, :]
        tile_best, tile_arg = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, v0 + tile_arg, best_idx)

    best_idx = tl.where(finite, best_idx, 0)
    tl.store(indices_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    if WRITE_OUTPUTS:
        # The loss uses the raw row (NaN stays NaN): n = z / max(||z||, eps).
        if L2:
            raw_denom = tl.maximum(tl.sqrt(sum_squares), eps)
        else:
            raw_denom = tl.full([BLOCK_M], 1.0, tl.float32)
        loss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, BLOCK_D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = row_ok[:, None] & (ks < D)[None, :]
            code = tl.load(codebook_ptr + best_idx.to(tl.int64)[:, None] * D + ks[None, :], mask=mask, other=0.0)
            tl.store(quantized_ptr + rows[:, None] * D + ks[None, :], code.to(quantized_ptr.dtype.element_ty),
                     mask=mask)
            z_chunk = tl.load(z_ptr + rows[:, None] * D + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            diff = code - z_chunk / raw_denom[:, None]
            loss += tl.sum(diff * diff, axis=1)
        tl.store(loss_rows_ptr + rows, loss_scale * loss, mask=row_ok)


@triton.jit
def gsq_backward_z_kernel(
    z_ptr,  # (M, D)
    grad_quantized_ptr,  # (M, D)
    grad_loss_rows_ptr,  # (M,) float32
    codebook_ptr,  # (V, D) float32
    indices_ptr,  # (M,) int64
    grad_z_ptr,  # (M, D), z's dtype
    M,
    beta,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    L2: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    dims = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (dims < D)[None, :]
    offsets = rows[:, None] * D + dims[None, :]

    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(z * z, axis=1))
    denom = tl.maximum(norm, eps)
    if L2:
        n = z / denom[:, None]
    else:
        n = z
    idx = tl.load(indices_ptr + rows, mask=row_ok, other=0)
    code = tl.load(codebook_ptr + idx[:, None] * D + dims[None, :], mask=mask, other=0.0)
    g = tl.load(grad_quantized_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(grad_loss_rows_ptr + rows, mask=row_ok, other=0.0)
    grad_n = g + (2.0 * beta * w)[:, None] * (n - code)
    if L2:
        projection = tl.sum(n * grad_n, axis=1)
        through_sphere = (grad_n - n * projection[:, None]) / denom[:, None]
        grad_z = tl.where((norm < eps)[:, None], grad_n / eps, through_sphere)
    else:
        grad_z = grad_n
    tl.store(grad_z_ptr + offsets, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gsq_codebook_grad_kernel(
    z_ptr,  # (M, D)
    grad_loss_rows_ptr,  # (M,) float32
    codebook_ptr,  # (V, D) float32
    rows_by_code_ptr,  # (M,) int64: row ids sorted by code, increasing within a code
    bucket_start_ptr,  # (V + 1,) int64: code j's rows are rows_by_code[start[j]:start[j + 1]]
    grad_codebook_ptr,  # (V, D) float32
    V,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    L2: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    codes = (pid * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    code_ok = codes < V
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    code_mask = code_ok[:, None] & dim_ok[None, :]
    start = tl.load(bucket_start_ptr + codes, mask=code_ok, other=0)
    count = tl.load(bucket_start_ptr + codes + 1, mask=code_ok, other=0) - start
    code = tl.load(codebook_ptr + codes[:, None] * D + dims[None, :], mask=code_mask, other=0.0)

    grad = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    for step in range(0, tl.max(count, axis=0)):
        active = step < count
        row = tl.load(rows_by_code_ptr + start + step, mask=active, other=0)
        row_mask = active[:, None] & dim_ok[None, :]
        z = tl.load(z_ptr + row[:, None] * D + dims[None, :], mask=row_mask, other=0.0).to(tl.float32)
        if L2:
            z = z / tl.maximum(tl.sqrt(tl.sum(z * z, axis=1)), eps)[:, None]
        w = tl.load(grad_loss_rows_ptr + row, mask=active, other=0.0)
        grad += tl.where(row_mask, (2.0 * w)[:, None] * (code - z), 0.0)
    tl.store(grad_codebook_ptr + codes[:, None] * D + dims[None, :], grad, mask=code_mask)
