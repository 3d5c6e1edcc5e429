"""Triton kernels for GSQ: the fused lookup forward (with or without the runner-up's gap) and the
straight-through backward.

All kernels work on flattened group vectors z (M, D) (D = d, the group width, a compile-time
constant) and compute in float32 whatever z's dtype (fp32/fp16/bf16).

Forward, in two launches:
  gsq_normalize_rows_kernel, once per row:
    n = z / max(||z||, eps)        (l2 on; n = z when off), written to an (M, D) float32 workspace,
    and the row's denominator max(||z||, eps); a row holding NaN/inf gets n = 0 (scored as zeros,
    index 0 below) and a NaN denominator (its flag; its loss stays NaN/inf).
  Normalizing once here, not once per codebook tile, matters: the division is correctly rounded
  (div.rn, ~10 instructions) and a thread would otherwise redo it for each of its rows in every tile.
  gsq_forward_kernel, per tile of BLOCK_M rows:
    score_j = <n, code_j> + bias_j                    streamed over codebook tiles of BLOCK_V codes
    idx     = argmax_j score_j                         running max/argmax across tiles ("flash" style)
    gap     = score_idx - max_{j != idx} score_j       (WITH_GAP; +inf for V = 1 and non-finite rows,
                                                        0 where all scores overflowed to -inf alike)
    out     = c_idx (raw row, z's dtype);  loss_row = (1 + beta) ||c_idx - n||^2   (WRITE_OUTPUTS)
  code_j and bias_j come pre-processed once per call (see prepare_codebook in triton.py):
    l2 on : code_j = c_j / max(||c_j||, eps), bias_j = 0
    l2 off: code_j = c_j, bias_j = -||c_j||^2 / 2     (argmax = argmin ||z - c_j||^2)
  stored transposed, (D, V), so a tile of one coordinate of BLOCK_V codes is one contiguous load.
  Scores: float32 FMAs in coordinate order from 0, then + bias_j: tl.dot over K chunks of BLOCK_K
  with input_precision="ieee", i.e. exact float32 FMA (TF32 tensor cores round the operands to 10
  mantissa bits and would change which code wins). Every width takes this path, D padded with zeros
  to BLOCK_D >= MIN_DOT_K (an FMA with a zero operand leaves the sum unchanged; tl.dot takes float32
  K >= 8 from Triton 3.8 and K >= 16 before, which the GPU compiler enforces and the interpreter
  does not): the dot's FMA lowering gives
  each thread a 2-D block of scores (4 x 4 per repetition), where D rank-1 updates of broadcast
  vectors get one column per thread and twice the instructions per score at d = 4.
  Ties: inside a tile tl.max(..., return_indices_tie_break_left=True) keeps the lowest index; across
  tiles a strictly greater score is needed to replace the running best, so earlier tiles win.
  Runner-up: with (best, second) the running pair and tile_second the tile's max with its argmax
  masked out (a duplicate of the max stays, so exact ties give gap 0):
    second = max(second, min(tile_best, best))        = max(second, tile_best) where the tile loses,
                                                        the old best where it wins;
    where tile_best > best: second = max(second, tile_second).
  tile_second (a compare, a select and a max per score) is computed only in the tiles where some row
  of the block finds a new best: O(BLOCK_M log(V / BLOCK_V)) of the V / BLOCK_V tiles on random data,
  so for large V the runner-up costs ~1.4 instructions per score, ~7% of the scan at d <= 8 (SASS
  count at 64 x 64; 28% when computed in every tile).
  The M x V score matrix is never formed: memory is O(M D + V D).

Backward, with g = dL/dquantized and w = dL/dloss_row (see gsq_kernels/ops.py for why loss_rows
carries beta's share to n and the rest to the codebook):
    dL/dn  = g + 2 beta w (n - c)
    dL/dz  = (dL/dn - n <n, dL/dn>) / ||z||  (l2 on, ||z|| >= eps);  dL/dn / eps  (||z|| < eps);
             dL/dn  (l2 off)                                         gsq_backward_z_kernel
    dL/dC_j = sum over rows i with idx_i = j of 2 w_i (c_j - n_i)
  The codebook gradient is a segment reduction, not atomics, in a fixed order: rows are sorted by
  code (a stable sort, so each code lists its rows in increasing order) and each code's list is cut
  into chunks of CHUNK rows (the last one shorter). gsq_codebook_grad_chunks_kernel sums each chunk's
  rows in order, all chunks in parallel; gsq_codebook_grad_combine_kernel sums each code's chunk
  sums in order. The result is deterministic, run to run and whatever the launch configuration, and
  a code chosen by every row (a collapsed codebook) costs CHUNK + M / CHUNK serial steps, not M.

sqrt and division are the correctly rounded tl.sqrt_rn / tl.div_rn everywhere (tl.sqrt and '/'
compile to sqrt.approx.ftz / div.full, which differ from the CPU and CUDA backends in the last bits
and flush a subnormal sum of squares to zero). Offsets are 64-bit.

Under TRITON_INTERPRET=1 (CPU tests) a single large-block configuration is used: the interpreter's
cost grows with programs x loop steps, not with block size. On a GPU the forward is autotuned over
the tile shapes of forward_configs(D), keyed by a power-of-two bucket of M; the memory-bound kernels
size their tiles from d (rows_per_program). tests/triton_sm90_compile.py compiles every variant the
autotuner may pick for sm_90a (triton.compile + ptxas, no GPU needed) and reports registers and
spills: the forward spills nothing; the others spill no register inside a loop (the codebook-gradient
kernel saves one or three around the slow-path calls of the correctly rounded sqrt/division).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .triton import INTERPRETED

# (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) for the scan's padded width BLOCK_D (8: d <= 8;
# "wide": 64 and up); the first is the default. Every entry compiles for sm_90a without a spilled
# byte in every forward variant and dtype (python tests/triton_sm90_compile.py): the shapes that
# spilled are left out (128 x 64 at d <= 8; 64 x 64 at 16; 32 x 128 and 64 x 256 at 32; 64 x 256
# from 64 on). BLOCK_K = 8 keeps the FMA dot's operand fragments small: at 16 or 32, every tile past
# 64 x 64 spilled at d >= 64.
_FORWARD_TILES = {
    8: (
        (64, 64, 8, 4, 3),
        (64, 128, 8, 4, 3),
        (32, 128, 8, 4, 3),
        (128, 128, 8, 8, 3),
        (256, 64, 8, 8, 3),
        (64, 256, 8, 8, 3),
    ),
    16: ((32, 128, 8, 4, 3), (128, 128, 8, 8, 3), (64, 256, 8, 8, 3)),
    32: ((64, 64, 8, 4, 3), (128, 128, 8, 8, 3)),
    "wide": ((64, 64, 8, 4, 3), (32, 128, 8, 4, 3), (128, 128, 8, 8, 3)),
}
# Upper end of the M buckets of the autotune key: beyond it every tile shape fills the GPU.
ROWS_BUCKET_CAP = 1 << 20


def _min_dot_k() -> int:
    """The smallest K the installed Triton's NVIDIA backend accepts in a float32 tl.dot (8 from
    Triton 3.8, 16 before); 16 when the backend cannot say."""
    try:
        from triton.backends.nvidia.compiler import min_dot_size

        operand = tl.block_type(tl.float32, [16, 16])
        return max(8, int(min_dot_size(None)(operand, operand)[2]))
    except Exception:  # another backend layout: the older, larger minimum is always accepted
        return 16


MIN_DOT_K = _min_dot_k()


def forward_block_d(d: int) -> int:
    """The scan's padded width: the next power of two >= max(d, MIN_DOT_K)."""
    return max(MIN_DOT_K, triton.next_power_of_2(d))


def forward_configs(block_d: int) -> list:
    """The configurations the forward may run with at this padded width (the first is the default).
    The tables were chosen at BLOCK_K = 8; where Triton needs K >= 16, the wide widths keep only the
    tiles of at most 64 x 64 (larger ones spilled at BLOCK_K = 16)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 128, "BLOCK_V": 1024, "BLOCK_K": block_d}, num_warps=4)]
    tiles = _FORWARD_TILES.get(max(block_d, 8), _FORWARD_TILES["wide"])
    if MIN_DOT_K > 8 and block_d >= 64:
        tiles = tuple(tile for tile in tiles if tile[0] * tile[1] <= 64 * 64)
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_V": v, "BLOCK_K": max(k, MIN_DOT_K)}, num_warps=w, num_stages=s)
        for m, v, k, w, s in tiles
    ]


def _all_forward_configs() -> list:
    unique = {}
    for block_d in (8, 16, 32, 64, 128, 256):
        for config in forward_configs(block_d):
            unique.setdefault(str(config), config)
    return list(unique.values())


def prune_forward_configs(configs, named_args, **kwargs) -> list:
    """The autotuner's candidates for this call: the tile shapes of its width; only the default one
    while a CUDA graph is being captured, where benchmarking (synchronizing, allocating) is illegal.
    Run warmup(...) (backends/triton.py) before capturing to tune instead."""
    candidates = forward_configs(kwargs["BLOCK_D"])
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return candidates[:1]
    return candidates


def rows_per_program(block_d: int) -> int:
    """Rows (or codes, or chunks) per program of the memory-bound kernels: each holds a few
    (rows x block_d) tiles in registers, so wide groups take fewer rows (no spills at d = 256)."""
    if INTERPRETED:
        return 1024
    return max(4, min(256, 2048 // block_d))


@triton.jit
def gsq_normalize_rows_kernel(
    z_ptr,  # (M, D), any float dtype
    n_ptr,  # (M, D) float32 out: n, zeros for rows holding NaN/inf
    row_denom_ptr,  # (M,) float32 out: max(||z||, eps) (1 with l2 off), NaN for rows holding NaN/inf
    M,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    L2: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Float scalars arrive as fp32 from a direct launch but as fp64 from torch.compile's generated
    # launcher; the math is float32 either way (tl.sqrt_rn / tl.div_rn take float32 only).
    eps = tl.cast(eps, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dims = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (dims < D)[None, :]
    offsets = rows[:, None] * D + dims[None, :]
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    finite = tl.sum(z * 0.0, axis=1) == 0.0  # no NaN/inf in the row
    if L2:
        denom = tl.maximum(tl.sqrt_rn(tl.sum(z * z, axis=1)), eps)
        n = tl.div_rn(z, denom[:, None])
    else:
        denom = tl.full([BLOCK_M], 1.0, tl.float32)
        n = z
    tl.store(n_ptr + offsets, tl.where(finite[:, None], n, 0.0), mask=mask)
    tl.store(row_denom_ptr + rows, tl.where(finite, denom, float("nan")), mask=row_ok)


@triton.jit
def _score_tile(
    n_ptr,
    codes_t_ptr,
    bias_ptr,
    rows,
    row_ok,
    codes,
    code_ok,
    V,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """scores[r, j] = sum_k n[r, k] code[k, j] (FMAs in k order from 0) + bias[j]; -inf off the codebook."""
    scores = tl.zeros([rows.shape[0], codes.shape[0]], dtype=tl.float32)
    for k0 in range(0, BLOCK_D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        n_chunk = tl.load(n_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        c_chunk = tl.load(
            codes_t_ptr + ks.to(tl.int64)[:, None] * V + codes[None, :],
            mask=k_ok[:, None] & code_ok[None, :],
            other=0.0,
        )
        scores = tl.dot(n_chunk, c_chunk, scores, input_precision="ieee")
    bias = tl.load(bias_ptr + codes, mask=code_ok, other=float("-inf"))
    return scores + bias[None, :]


@triton.jit
def _write_outputs(
    z_ptr,
    codebook_ptr,
    quantized_ptr,
    loss_rows_ptr,
    rows,
    row_ok,
    best_idx,
    row_denom,
    loss_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    L2: tl.constexpr,
):
    """quantized = c_idx (raw row); loss_row = (1 + beta) ||c_idx - n||^2 with n recomputed from the
    raw row (the same bits as the workspace's) so that a NaN/inf row keeps a NaN/inf loss."""
    loss = tl.zeros([rows.shape[0]], dtype=tl.float32)
    for k0 in tl.static_range(0, BLOCK_D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks < D)[None, :]
        code = tl.load(codebook_ptr + best_idx.to(tl.int64)[:, None] * D + ks[None, :], mask=mask, other=0.0)
        tl.store(quantized_ptr + rows[:, None] * D + ks[None, :], code.to(quantized_ptr.dtype.element_ty), mask=mask)
        n = tl.load(z_ptr + rows[:, None] * D + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        if L2:
            n = tl.div_rn(n, row_denom[:, None])
        diff = code - n
        loss += tl.sum(diff * diff, axis=1)
    tl.store(loss_rows_ptr + rows, loss_scale * loss, mask=row_ok)


@triton.autotune(
    configs=_all_forward_configs(),
    key=["ROWS_BUCKET", "V", "D", "L2", "WRITE_OUTPUTS", "WITH_GAP"],
    prune_configs_by={"early_config_prune": prune_forward_configs},
)
@triton.jit
def gsq_forward_kernel(
    z_ptr,  # (M, D), any float dtype: the raw rows (for the loss)
    n_ptr,  # (M, D) float32: the rows as scored (gsq_normalize_rows_kernel)
    row_denom_ptr,  # (M,) float32: max(||z||, eps), NaN for rows holding NaN/inf
    codes_t_ptr,  # (D, V) float32, pre-processed codes, transposed
    bias_ptr,  # (V,) float32
    codebook_ptr,  # (V, D) float32, raw rows (the forward value)
    quantized_ptr,  # (M, D), z's dtype (WRITE_OUTPUTS)
    indices_ptr,  # (M,) int64
    loss_rows_ptr,  # (M,) float32 (WRITE_OUTPUTS)
    gap_ptr,  # (M,) float32 (WITH_GAP)
    M,
    V,
    ROWS_BUCKET,  # next power of two >= M, capped: only part of the autotune key
    loss_scale,  # 1 + beta
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # forward_block_d(D): next power of two >= max(D, MIN_DOT_K)
    L2: tl.constexpr,
    WRITE_OUTPUTS: tl.constexpr,  # False: indices only (nearest_code)
    WITH_GAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,  # chunk of D per tl.dot (fewer live operand registers than all of D)
):
    loss_scale = tl.cast(loss_scale, tl.float32)  # fp64 from torch.compile's launcher
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    row_denom = tl.load(row_denom_ptr + rows, mask=row_ok, other=1.0)
    finite = row_denom == row_denom

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    second = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        codes = v0 + tl.arange(0, BLOCK_V)
        scores = _score_tile(n_ptr, codes_t_ptr, bias_ptr, rows, row_ok, codes, codes < V, V, D, BLOCK_D, BLOCK_K)
        tile_best, tile_arg = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best
        if WITH_GAP:
            second = tl.maximum(second, tl.minimum(tile_best, best))
            if tl.max(better.to(tl.int32), axis=0) > 0:  # the tile's runner-up matters only to a new best
                masked = tl.where(tl.arange(0, BLOCK_V)[None, :] == tile_arg[:, None], float("-inf"), scores)
                second = tl.where(better, tl.maximum(second, tl.max(masked, axis=1)), second)
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, v0 + tile_arg, best_idx)

    best_idx = tl.where(finite, best_idx, 0)
    tl.store(indices_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    if WITH_GAP:
        # best == second: a tie, also where every score overflowed to -inf alike (-inf - -inf is NaN).
        gap = tl.where(best == second, 0.0, best - second)
        tl.store(gap_ptr + rows, tl.where(finite & (V > 1), gap, float("inf")), mask=row_ok)
    if WRITE_OUTPUTS:
        _write_outputs(
            z_ptr,
            codebook_ptr,
            quantized_ptr,
            loss_rows_ptr,
            rows,
            row_ok,
            best_idx,
            row_denom,
            loss_scale,
            D,
            BLOCK_D,
            BLOCK_K,
            L2,
        )


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
    beta = tl.cast(beta, tl.float32)  # fp64 from torch.compile's launcher
    eps = tl.cast(eps, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dims = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (dims < D)[None, :]
    offsets = rows[:, None] * D + dims[None, :]

    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt_rn(tl.sum(z * z, axis=1))
    denom = tl.maximum(norm, eps)
    if L2:
        n = tl.div_rn(z, denom[:, None])
    else:
        n = z
    idx = tl.load(indices_ptr + rows, mask=row_ok, other=0)
    code = tl.load(codebook_ptr + idx[:, None] * D + dims[None, :], mask=mask, other=0.0)
    g = tl.load(grad_quantized_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(grad_loss_rows_ptr + rows, mask=row_ok, other=0.0)
    grad_n = g + (2.0 * beta * w)[:, None] * (n - code)
    if L2:
        projection = tl.sum(n * grad_n, axis=1)
        through_sphere = tl.div_rn(grad_n - n * projection[:, None], denom[:, None])
        grad_z = tl.where((norm < eps)[:, None], tl.div_rn(grad_n, eps), through_sphere)
    else:
        grad_z = grad_n
    tl.store(grad_z_ptr + offsets, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gsq_codebook_grad_chunks_kernel(
    z_ptr,  # (M, D)
    grad_loss_rows_ptr,  # (M,) float32
    codebook_ptr,  # (V, D) float32
    rows_by_code_ptr,  # (M,) int64: row ids sorted by code, increasing within a code
    bucket_start_ptr,  # (V + 1,) int64: code j's rows are rows_by_code[start[j]:start[j + 1]]
    chunk_start_ptr,  # (V + 1,) int64: code j's chunks are chunk ids chunk_start[j]:chunk_start[j + 1]
    chunk_code_ptr,  # (NUM_CHUNKS,) int64: the code of each chunk id; V past the last chunk
    partial_ptr,  # (NUM_CHUNKS, D) float32 out: per chunk, sum of 2 w_i (c_j - n_i) over its rows in order
    NUM_CHUNKS,
    V,
    eps,
    CHUNK: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    L2: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # fp64 from torch.compile's launcher
    chunk = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    code = tl.load(chunk_code_ptr + chunk, mask=chunk < NUM_CHUNKS, other=V)
    chunk_ok = code < V
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    code_mask = chunk_ok[:, None] & dim_ok[None, :]
    first = (
        tl.load(bucket_start_ptr + code, mask=chunk_ok, other=0)
        + (chunk - tl.load(chunk_start_ptr + code, mask=chunk_ok, other=0)) * CHUNK
    )
    count = tl.minimum(tl.load(bucket_start_ptr + code + 1, mask=chunk_ok, other=0) - first, CHUNK)
    count = tl.where(chunk_ok, count, 0)
    c = tl.load(codebook_ptr + code[:, None] * D + dims[None, :], mask=code_mask, other=0.0)

    grad = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for step in range(0, tl.max(count, axis=0)):
        active = step < count
        row = tl.load(rows_by_code_ptr + first + step, mask=active, other=0)
        row_mask = active[:, None] & dim_ok[None, :]
        z = tl.load(z_ptr + row[:, None] * D + dims[None, :], mask=row_mask, other=0.0).to(tl.float32)
        if L2:
            z = tl.div_rn(z, tl.maximum(tl.sqrt_rn(tl.sum(z * z, axis=1)), eps)[:, None])
        w = tl.load(grad_loss_rows_ptr + row, mask=active, other=0.0)
        grad += tl.where(row_mask, (2.0 * w)[:, None] * (c - z), 0.0)
    tl.store(partial_ptr + chunk[:, None] * D + dims[None, :], grad, mask=code_mask)


@triton.jit
def gsq_codebook_grad_combine_kernel(
    partial_ptr,  # (NUM_CHUNKS, D) float32: the chunk sums
    chunk_start_ptr,  # (V + 1,) int64
    grad_codebook_ptr,  # (V, D) float32 out: per code, its chunk sums added in chunk order
    V,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    codes = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    code_ok = codes < V
    dims = tl.arange(0, BLOCK_D)
    code_mask = code_ok[:, None] & (dims < D)[None, :]
    first = tl.load(chunk_start_ptr + codes, mask=code_ok, other=0)
    count = tl.load(chunk_start_ptr + codes + 1, mask=code_ok, other=0) - first
    grad = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    for step in range(0, tl.max(count, axis=0)):
        active = step < count
        grad += tl.load(
            partial_ptr + (first + step)[:, None] * D + dims[None, :], mask=active[:, None] & code_mask, other=0.0
        )
    tl.store(grad_codebook_ptr + codes[:, None] * D + dims[None, :], grad, mask=code_mask)


# ---------------------------------------------------------------------------------------------
# The exact lookup for d = 1, and d = 2 with l2 on: the Triton version of csrc/gsq_sorted_search.h,
# which holds the keys, the search and the proof of its window. The codes' bucket keys come from
# gsq_sorted_keys_kernel, torch sorts them (stable: each bucket lists its codes in index order),
# then gsq_sorted_search_kernel searches each row. Every bucket is built and nothing is dropped.
# The distances are computed as the oracle computes them, two rounded squares then a rounded sum:
# on a GPU through libdevice's mul_rn/add_rn, which the compiler never fuses into an FMA (the
# interpreter's numpy never fuses).
SORTED_KEY_SLACK = tl.constexpr(1.0 / (1 << 19))
SORTED_MIN_CODE_NORM = tl.constexpr(1.0 - 1.0 / (1 << 18))
SORTED_BOUND_SHRINK = tl.constexpr(1.0 - 1.0 / (1 << 40))
SORTED_PI = tl.constexpr(3.141592653589793)
SORTED_NO_INDEX = tl.constexpr(2**63 - 1)


@triton.jit
def _sorted_bucket_map(range_ptr, MAX_BUCKETS, D: tl.constexpr):
    """(buckets, origin, scale) of gsq_sorted::bucket_map: d = 2 fixed, d = 1 from the key range."""
    if D == 2:
        scale = MAX_BUCKETS.to(tl.float64) / 4
        return MAX_BUCKETS.to(tl.int64), scale * 0.0, scale
    low = tl.load(range_ptr).to(tl.float64)
    high = tl.load(range_ptr + 1).to(tl.float64)
    spread = low < high
    buckets = tl.where(spread, MAX_BUCKETS.to(tl.int64), 1)
    origin = tl.where(spread, low, 0.0)
    scale = tl.where(spread, MAX_BUCKETS.to(tl.float64) / tl.where(spread, high - low, 1.0), 0.0)
    return buckets, origin, scale


@triton.jit
def _sorted_lookup_vector(x, y, eps, L2: tl.constexpr):
    """(n0, n1) = l2((x, y)) in fp32 with the norm taken in float64 and rounded once (y = 0 at d = 1)."""
    if L2:
        x64 = x.to(tl.float64)
        y64 = y.to(tl.float64)
        norm = tl.sqrt(x64 * x64 + y64 * y64).to(tl.float32)  # each square exact: FMA or not
        denom = tl.where(norm > eps, norm, eps)
        return tl.div_rn(x, denom), tl.div_rn(y, denom)
    return x, y


@triton.jit
def gsq_sorted_keys_kernel(
    codebook_ptr,  # (V, D) float32
    keys_ptr,  # (V,) int64 out: the bucket (buckets: short code, buckets + 1: NaN/inf)
    range_ptr,  # (2,) float32: d = 1, the finite keys' min and max
    V,
    MAX_BUCKETS,
    eps,
    D: tl.constexpr,
    L2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)
    codes = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = codes < V
    buckets, origin, scale = _sorted_bucket_map(range_ptr, MAX_BUCKETS, D)
    last = buckets - 1
    x = tl.load(codebook_ptr + codes * D, mask=mask, other=0.0)
    if D == 2:
        y = tl.load(codebook_ptr + codes * D + 1, mask=mask, other=0.0)
        # gsq_sorted::code_bucket_2d: the pseudo-angle of the raw code, r = |y| / (|x| + |y|).
        ax = tl.abs(x)
        ay = tl.abs(y)
        r = tl.div_rn(ay, ax + ay)
        right = tl.where(x >= 0, 1.0, 0.0)
        upper = tl.where(y >= 0, 1.0, 0.0)
        base = 2.0 + 2.0 * right * (1.0 - 2.0 * upper)
        sign = 1.0 - 2.0 * (right - upper) * (right - upper)
        position = (base + sign * r) * scale.to(tl.float32)  # exact: scale is a power of two
        b = tl.where(position > 0, position, 0.0).to(tl.int64) & last
        norm_sq = x * x + y * y
        threshold = tl.maximum(4.5 * eps * eps, 1e-37)
        is_long = (norm_sq > threshold) & (norm_sq <= 3.4028234e38)
        finite = ((x - x) + (y - y)) == 0
        key = tl.where(finite, tl.where(is_long, b, buckets), buckets + 1)
    else:
        # gsq_sorted::code_bucket_1d: the key is c^ (r = |x| exactly).
        value = x
        if L2:
            ax = tl.abs(x)
            value = tl.div_rn(x, tl.where(ax > eps, ax, eps))
        position = (value.to(tl.float64) - origin) * scale
        b = tl.minimum(tl.where(position > 0, position, 0.0).to(tl.int64), last)
        key = tl.where((x - x) == 0, b, buckets + 1)
    tl.store(keys_ptr + codes, key, mask=mask)


@triton.jit
def _sorted_distance(n0, n1, c0, c1, D: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
    """||n - c||^2 in float64 as the oracle rounds it: (n0 - c0)^2, plus (n1 - c1)^2 at d = 2."""
    dx = n0 - c0.to(tl.float64)
    if EXACT_ROUNDING:
        distance = libdevice.mul_rn(dx, dx)
        if D == 2:
            dy = n1 - c1.to(tl.float64)
            distance = libdevice.add_rn(distance, libdevice.mul_rn(dy, dy))
    else:
        distance = dx * dx
        if D == 2:
            dy = n1 - c1.to(tl.float64)
            distance = distance + dy * dy
    return distance


@triton.jit
def _sorted_scan(
    members_ptr, member_codes_ptr, first, last, active, n0, n1, best, best_index, D: tl.constexpr, EXACT: tl.constexpr
):
    """Offers the members [first, last) of each active lane's range to its (best, best_index),
    lowest index on equal distances."""
    position = first
    scanning = active & (position < last)
    while tl.max(scanning.to(tl.int32), axis=0) > 0:
        c0 = tl.load(member_codes_ptr + position * D, mask=scanning, other=0.0)
        c1 = c0
        if D == 2:
            c1 = tl.load(member_codes_ptr + position * D + 1, mask=scanning, other=0.0)
        index = tl.load(members_ptr + position, mask=scanning, other=0).to(tl.int64)
        distance = _sorted_distance(n0, n1, c0, c1, D, EXACT)
        better = scanning & ((distance < best) | ((distance == best) & (index < best_index)))
        best = tl.where(better, distance, best)
        best_index = tl.where(better, index, best_index)
        position += 1
        scanning = active & (position < last)
    return best, best_index


@triton.jit
def _sorted_scan_buckets(
    members_ptr,
    member_codes_ptr,
    bucket_start_ptr,
    low,
    high,
    use,
    n0,
    n1,
    best,
    best_index,
    D: tl.constexpr,
    EXACT: tl.constexpr,
):
    """_sorted_scan over buckets low .. high of each using lane (none where low > high): the
    positions [start[low], start[high + 1])."""
    use = use & (low <= high)
    first = tl.load(bucket_start_ptr + tl.where(use, low, 0), mask=use, other=0)
    last = tl.load(bucket_start_ptr + tl.where(use, high + 1, 0), mask=use, other=0)
    return _sorted_scan(members_ptr, member_codes_ptr, first, last, use, n0, n1, best, best_index, D, EXACT)


@triton.jit
def _sorted_outside_bound(n0, n1, key, b, w, buckets, origin, scale, D: tl.constexpr):
    """gsq_sorted::outside_bound: a lower bound on the distance to every code outside buckets
    b - w .. b + w (+inf when they cover all)."""
    inf = float("inf")
    if D == 2:
        width = 4.0 / buckets.to(tl.float64)
        to_left = key - (b - w).to(tl.float64) * width
        to_right = (b + w + 1).to(tl.float64) * width - key
        gap = tl.minimum(to_left, to_right) - SORTED_KEY_SLACK
        half = tl.minimum(gap, SORTED_PI) / 2
        sin_half = half - half * half * half / 6  # <= sin(half) for 0 <= half <= pi / 2
        norm = tl.sqrt(n0 * n0 + n1 * n1)
        bound = 4 * norm * SORTED_MIN_CODE_NORM * sin_half * sin_half * SORTED_BOUND_SHRINK
        bound = tl.where(gap > 0, bound, 0.0)
        return tl.where(2 * w + 1 >= buckets, inf, bound)
    left_done = b - w <= 0
    right_done = b + w >= buckets - 1
    slack = buckets.to(tl.float64) / tl.where(scale > 0, scale, 1.0) / (1 << 40)
    to_left = n0 - (origin + (b - w).to(tl.float64) / tl.where(scale > 0, scale, 1.0)) - slack
    to_right = origin + (b + w + 1).to(tl.float64) / tl.where(scale > 0, scale, 1.0) - n0 - slack
    gap = tl.minimum(tl.where(left_done, inf, to_left), tl.where(right_done, inf, to_right))
    bound = tl.where(gap > 0, gap * gap * SORTED_BOUND_SHRINK, 0.0)
    return tl.where(left_done & right_done, inf, bound)


@triton.jit
def gsq_sorted_search_kernel(
    z_ptr,  # (M, D) float32
    members_ptr,  # (V,) int32: the codes in bucket order
    member_codes_ptr,  # (V, D) float32: their c^
    bucket_start_ptr,  # (MAX_BUCKETS + 2,) int64: bucket b is [start[b], start[b + 1])
    range_ptr,  # (2,) float32 (d = 1)
    indices_ptr,  # (M,) int64 out
    M,
    MAX_BUCKETS,
    eps,
    D: tl.constexpr,
    L2: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    buckets, origin, scale = _sorted_bucket_map(range_ptr, MAX_BUCKETS, D)
    x = tl.load(z_ptr + rows * D, mask=row_ok, other=0.0)
    y = tl.zeros_like(x)
    if D == 2:
        y = tl.load(z_ptr + rows * D + 1, mask=row_ok, other=0.0)
    n0_32, n1_32 = _sorted_lookup_vector(x, y, eps, L2)
    finite = (((x - x) + (y - y)) == 0) & (((n0_32 - n0_32) + (n1_32 - n1_32)) == 0)
    n0 = tl.where(finite, n0_32, 0.0).to(tl.float64)
    n1 = tl.where(finite, n1_32, 0.0).to(tl.float64)
    best = tl.full([BLOCK], float("inf"), tl.float64)
    best_index = tl.full([BLOCK], SORTED_NO_INDEX, tl.int64)
    live = row_ok & finite
    # The short codes (bucket `buckets`), for every row.
    short_first = tl.load(bucket_start_ptr + buckets)
    short_last = tl.load(bucket_start_ptr + buckets + 1)
    best, best_index = _sorted_scan(
        members_ptr,
        member_codes_ptr,
        tl.zeros([BLOCK], tl.int64) + short_first,
        tl.zeros([BLOCK], tl.int64) + short_last,
        live,
        n0,
        n1,
        best,
        best_index,
        D,
        EXACT_ROUNDING,
    )
    # d = 2 rows with |n| < 1/2 have no reliable angle: every bucketed code (positions [start[0],
    # start[buckets]), contiguous).
    everything = live & False
    if D == 2:
        everything = live & (n0 * n0 + n1 * n1 < 0.25)
    all_first = tl.zeros([BLOCK], tl.int64) + tl.load(bucket_start_ptr)
    all_last = tl.zeros([BLOCK], tl.int64) + short_first
    best, best_index = _sorted_scan(
        members_ptr, member_codes_ptr, all_first, all_last, everything, n0, n1, best, best_index, D, EXACT_ROUNDING
    )
    # The row's bucket, then wider windows until the bound proves the winner.
    if D == 2:
        ax = tl.abs(n0)
        ay = tl.abs(n1)
        r = ay / (ax + ay)
        key = tl.where(n1 >= 0, tl.where(n0 >= 0, r, 2.0 - r), tl.where(n0 < 0, 2.0 + r, 4.0 - r))
        b = tl.floor(key * scale).to(tl.int64)
        wraps = b >= buckets  # key 4 is angle 2 pi: the start of bucket 0
        key = tl.where(wraps, key - 4.0, key)
        b = tl.where(wraps, 0, b)
    else:
        key = n0
        b = tl.floor((key - origin) * scale).to(tl.int64)
        b = tl.minimum(tl.maximum(b, 0), buckets - 1)
    active = live & ~everything
    best, best_index = _sorted_scan_buckets(
        members_ptr, member_codes_ptr, bucket_start_ptr, b, b, active, n0, n1, best, best_index, D, EXACT_ROUNDING
    )
    # The window b - done .. b + done is scanned; it doubles until the bound proves each row's
    # winner. Consecutive buckets are consecutive positions, so each new side is one range (two
    # where it wraps around the circle).
    done = 0
    while tl.max(active.to(tl.int32), axis=0) > 0:
        bound = _sorted_outside_bound(n0, n1, key, b, done, buckets, origin, scale, D)
        active = active & ~((bound > best) | (bound == float("inf")))
        grown = tl.maximum(2 * done, 1)
        if D == 2 and 2 * grown + 1 >= buckets:
            # The new window covers the circle: every bucketed code, once.
            best, best_index = _sorted_scan_buckets(
                members_ptr,
                member_codes_ptr,
                bucket_start_ptr,
                b * 0,
                b * 0 + buckets - 1,
                active,
                n0,
                n1,
                best,
                best_index,
                D,
                EXACT_ROUNDING,
            )
        else:
            for side in tl.static_range(2):
                if side == 0:
                    low = b - grown
                    high = b - done - 1
                else:
                    low = b + done + 1
                    high = b + grown
                # The part inside [0, buckets), then (d = 2) the part that wraps around.
                best, best_index = _sorted_scan_buckets(
                    members_ptr,
                    member_codes_ptr,
                    bucket_start_ptr,
                    tl.maximum(low, 0),
                    tl.minimum(high, buckets - 1),
                    active,
                    n0,
                    n1,
                    best,
                    best_index,
                    D,
                    EXACT_ROUNDING,
                )
                if D == 2:
                    wrapped_low = tl.where(low < 0, low + buckets, tl.maximum(low, buckets) - buckets)
                    wrapped_high = tl.where(low < 0, tl.minimum(high, -1) + buckets, high - buckets)
                    best, best_index = _sorted_scan_buckets(
                        members_ptr,
                        member_codes_ptr,
                        bucket_start_ptr,
                        wrapped_low,
                        wrapped_high,
                        active,
                        n0,
                        n1,
                        best,
                        best_index,
                        D,
                        EXACT_ROUNDING,
                    )
        done = grown
    chosen = tl.where(best_index == SORTED_NO_INDEX, 0, best_index)
    tl.store(indices_ptr + rows, tl.where(finite, chosen, 0), mask=row_ok)
