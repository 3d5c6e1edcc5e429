// CUDA kernels for Grouped Spherical Quantization: the fused lookup and the straight-through
// backward. Only CUDA headers here (raw pointers, a stream): nvcc compiles this file in seconds;
// the torch glue is gsq_cuda.cpp. The same source also compiles as plain C++ against
// gsq_cuda_emulation.h, which runs every block's threads as CPU threads, so CI tests this logic
// on machines without a GPU (tests/test_cuda_kernels_emulated.py).
//
// Math (docs/spec.md, "Quantizer" and "Gradients"), per group vector z_i of d values:
//   n_i   = z_i / max(||z_i||, eps)                     (l2 on; n_i = z_i when off)
//   s_ij  = <n_i, codes_j> + bias_j                     (codes/bias: see prepare_codebook)
//   idx_i = argmax_j s_ij (lowest j on ties);  gap_i = s_i,idx - max_{j != idx} s_ij
//   quantized_i = c_idx (raw row);  loss_rows_i = (1 + beta) ||c_idx - n_i||^2
// Backward, with g_i = dL/dquantized_i and w_i = dL/dloss_rows_i:
//   dL/dn_i  = g_i + 2 beta w_i (n_i - c_i)
//   dL/dz_i  = (dL/dn_i - n_i <n_i, dL/dn_i>) / ||z_i||  (l2 on, ||z_i|| >= eps)
//            = dL/dn_i / eps  (l2 on, ||z_i|| < eps);  dL/dn_i  (l2 off)
//   dL/dC_j  = sum over i with idx_i = j of 2 w_i (c_j - n_i)
//
// Lookup kernels (never form the M x V score matrix; ties go to the lowest index; a row holding
// NaN/inf gets index 0 and gap +inf, set by fix_non_finite_rows_kernel afterwards). Each row keeps
// (best, second, idx) and a threshold: its best for nearest_code, its second for the gap. A group
// of codes can change the answer only if one of its scores beats the threshold (a score equal to
// it changes neither the index nor the gap), so the kernels take the cheap max over a group and
// resolve the group exactly only then: O(log V) times per row on random data. gap = best - second
// (top_two_gap): +inf when V == 1, 0 when both are -inf (every score overflowed alike).
// - lookup_small_d_kernel (d in GSQ_SMALL_DIMS): each thread owns kSmallRows rows, normalized in
//   registers; the block streams the codebook through shared memory in tiles of kSmallTileCodes
//   codes, read by broadcast (one read feeds all the thread's rows). Per chunk of kSmallChunk
//   codes a thread keeps the scores of its rows in registers and takes their max; a row whose max
//   beats its threshold offers the chunk's scores to its (best, second, idx) in index order with
//   strict '>'. Nothing is ever re-scored, and the decision is per lane and per 8 codes: a warp
//   pays 8 offers for a lane's chunk, never a re-score of a whole tile.
// - lookup_tiled_kernel (any other d): a GEMM-shaped tile of kTiledRows rows x kTiledCodes codes
//   per block, K staged through shared memory in chunks of kTiledK (double-buffered: the next
//   chunk's global loads fly during this chunk's FMAs; d padded to a multiple of 4, not 16). Warp
//   w owns 8 rows, lane l owns 4 consecutive codes: an 8 x 4 register tile of scores. Per tile a
//   transposed butterfly leaves lane l with the tile's max of row l / 4 (9 shuffles for 8 rows);
//   rows whose max beats their threshold are resolved by a (best, second, idx) butterfly, where
//   merging two disjoint sets gives best = max(b1, b2) (lowest index on ties) and
//   second = max(min(b1, b2), s1, s2). Exact float32 FMAs: TF32 tensor cores round operands to 10
//   mantissa bits and would change winners far from any tie.
// - lookup_double_kernel: float64 (gradcheck), one thread per row, straight from global memory.
// The scores, and so the indices, are those of the plain scan (bias first then FMAs in k order
// in the small-d kernel; FMAs then bias in the tiled one); the gap is in the compute type.
//
// Codebook gradient: deterministic, no float atomics, parallel over rows. Rows are sorted by code
// with a stable radix sort (cub) and each code's segment located by binary search. The sorted
// rows are cut into chunks of kGradChunk positions; one warp per chunk sums the chunk's share of
// the code found at the chunk's first position (codebook_grad_chunks_kernel), and one warp per
// code sums the rows of its first chunk, then adds the partial sums of the chunks it spans, in
// chunk order (codebook_grad_kernel). Within a warp the order is fixed too (lanes split
// dimensions and a fixed number of row sub-streams, combined by a fixed shuffle tree). A code
// picked by every row costs M / kGradChunk parallel warps plus one short serial pass over the
// partials. Same bits run to run, whatever the launch order.
//
// Checking on a GPU (compute-sanitizer ships with the CUDA toolkit):
//   compute-sanitizer --tool memcheck  python -m pytest -q tests/test_cuda_backend.py -x
//   compute-sanitizer --tool racecheck python -m pytest -q tests/test_cuda_backend.py -x -k
//   "parity" compute-sanitizer --tool initcheck python -m pytest -q tests/test_cuda_backend.py -x
//   -k "parity" compute-sanitizer --tool synccheck python -m pytest -q tests/test_cuda_backend.py
//   -x -k "parity"
#include "gsq_cuda_kernels.h"

#include <math.h>

#include "gsq_sorted_search.h"
#include "gsq_workspace.h"

#if !defined(GSQ_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/device/device_radix_sort.cuh>
#define GSQ_LAUNCH(kernel, blocks, threads, stream, ...) \
  kernel<<<(blocks), (threads), 0, (stream)>>>(__VA_ARGS__)
// Counters only the CPU emulation records (see gsq_cuda_emulation.h): nothing on a GPU.
#define GSQ_PROBE_ADD(name, value) ((void)0)
#define GSQ_PROBE_MAX(name, value) ((void)0)
#define GSQ_PROBE_WARP_ANY(name, predicate, value) ((void)0)
#else
#include <algorithm>
#include <utility>
#include <vector>
#define GSQ_LAUNCH(kernel, blocks, threads, stream, ...) \
  gsq_emu::launch(#kernel, (blocks), (threads), [=] { kernel(__VA_ARGS__); })
#endif

namespace gsq_cuda {
namespace {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kThreadsPerRowKernel = 256;  // thread-per-row kernels (gather, normalize, backward)

// The dimensions the small-d kernel is instantiated for: its one home (dispatch and workspace
// sizing both read it).
#define GSQ_SMALL_DIMS(X) X(1) X(2) X(3) X(4) X(8)
constexpr int kSmallThreads = 64;  // 2 warps; 3 rows each: 192 rows per block
constexpr int kSmallRows = 3;      // rows per thread: see the launch in launch_small_d
constexpr int kSmallTileCodes = 256;
constexpr int kSmallChunk = 8;  // codes per decision; 3 x 8 scores live in registers
static_assert(kSmallTileCodes % kSmallChunk == 0 && kSmallTileCodes % kSmallThreads == 0,
              "small-d tile");

constexpr int kTiledWarps = 8;
constexpr int kTiledThreads = kTiledWarps * 32;
constexpr int kTiledRows = 64;
constexpr int kRowsPerWarp = kTiledRows / kTiledWarps;  // 8
constexpr int kTiledCodes = 128;
constexpr int kCodesPerLane = kTiledCodes / 32;  // 4
constexpr int kTiledK = 16;
constexpr int kTiledKStep = 4;  // a K chunk is swept in steps of 4: d pads to a multiple of 4
// Shared rows are 16-byte aligned (float4 reads) and 4 banks apart, so the staging stores below
// (8 k x 4 items per warp) hit 32 distinct banks.
constexpr int kRowsStride = kTiledRows + 4;
constexpr int kCodesStride = kTiledCodes + 4;
constexpr int kStageItems = kTiledThreads / kTiledK;   // rows (codes) staged per pass: 16
constexpr int kRowLoads = kTiledRows / kStageItems;    // 4 per thread and chunk
constexpr int kCodeLoads = kTiledCodes / kStageItems;  // 8 per thread and chunk
static_assert(kRowsPerWarp == 8 && kCodesPerLane == 4,
              "the tiled epilogue's butterfly assumes an 8 x 4 tile");
static_assert(kTiledK == 16 && kTiledThreads == 256,
              "the staging map covers 16 k x 16 items per pass");
static_assert(kTiledCodes <= kTiledThreads, "one thread stages each code's bias");

// Offsets inside a tile are int32: kTiledCodes * d must fit.
constexpr int kMaxDim = 1 << 24;

constexpr int kGradChunk = 256;  // sorted rows per chunk of the codebook gradient

template <typename scalar_t>
struct Acc {
  typedef float type;
};
template <>
struct Acc<double> {
  typedef double type;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(typename Acc<scalar_t>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ T negative_infinity() {
  return -static_cast<T>(INFINITY);
}

template <typename T>
__host__ __device__ __forceinline__ T min_of(T a, T b) {
  return b < a ? b : a;
}

// n = z / max(||z||, eps) (or z); returns ||z||. `out` has d entries.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t normalize_row(const scalar_t* z, int d, acc_t eps,
                                               bool l2_normalize, acc_t* out) {
  acc_t sum_squares = 0;
  for (int k = 0; k < d; ++k) {
    const acc_t v = to_acc(z[k]);
    out[k] = v;
    sum_squares += v * v;
  }
  const acc_t norm = sqrt(sum_squares);
  if (l2_normalize) {
    const acc_t denom = norm > eps ? norm : eps;
    for (int k = 0; k < d; ++k) out[k] = out[k] / denom;
  }
  return norm;
}

// The same with d fixed at compile time, so `out` can be a register array.
template <int D, typename scalar_t>
__device__ __forceinline__ void normalize_fixed_row(const scalar_t* z, float eps, bool l2_normalize,
                                                    float* out) {
  float sum_squares = 0.f;
#pragma unroll
  for (int k = 0; k < D; ++k) {
    out[k] = to_acc(z[k]);
    sum_squares += out[k] * out[k];
  }
  if (l2_normalize) {
    const float norm = sqrtf(sum_squares);
    const float denom = norm > eps ? norm : eps;
#pragma unroll
    for (int k = 0; k < D; ++k) out[k] = out[k] / denom;
  }
}

template <typename T>
__global__ void prepare_codebook_kernel(const T* codebook, int64_t num_codes, int d, T eps,
                                        bool l2_normalize, T* codes, T* bias) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= num_codes) return;
  const T* code = codebook + j * d;
  T sum_squares = 0;
  for (int k = 0; k < d; ++k) sum_squares += code[k] * code[k];
  if (l2_normalize) {
    const T norm = sqrt(sum_squares);
    const T denom = norm > eps ? norm : eps;
    for (int k = 0; k < d; ++k) codes[j * d + k] = code[k] / denom;
    bias[j] = 0;
  } else {
    for (int k = 0; k < d; ++k) codes[j * d + k] = code[k];
    bias[j] = -sum_squares / 2;
  }
}

// The best and second-best score over a set of codes, and the index of the best.
template <typename T>
struct Top2 {
  T best, second;
  int idx;
};

template <typename T>
__device__ __forceinline__ Top2<T> empty_top2() {
  return Top2<T>{negative_infinity<T>(), negative_infinity<T>(), 0};
}

// Adds code j with score s; codes must come in increasing j, so strict '>' keeps the lowest index
// on ties (and a tie with the best makes second == best: gap 0). NaN compares false: never kept.
// Selects, not branches: 6 instructions, no divergence.
template <typename T>
__device__ __forceinline__ void offer(Top2<T>& t, T s, int j) {
  const bool above_best = s > t.best;
  const bool above_second = s > t.second;
  t.second = above_best ? t.best : (above_second ? s : t.second);
  t.best = above_best ? s : t.best;
  t.idx = above_best ? j : t.idx;
}

// The union of two disjoint sets: best = max(b1, b2), lowest index on ties, and
// second = max(min(b1, b2), s1, s2). Symmetric, so a butterfly leaves every lane the same result.
template <typename T>
__device__ __forceinline__ Top2<T> merge(const Top2<T>& a, const Top2<T>& b) {
  const bool b_wins = b.best > a.best || (b.best == a.best && b.idx < a.idx);
  const Top2<T>& win = b_wins ? b : a;
  const Top2<T>& lose = b_wins ? a : b;
  T second = lose.best > win.second ? lose.best : win.second;
  second = lose.second > second ? lose.second : second;
  return Top2<T>{win.best, second, win.idx};
}

// gap = best - second; +inf for a single code. Both infinite alike (every score overflowed to -inf,
// l2 off with huge codes): float32 cannot rank the codes, which is a tie (0), never NaN.
template <typename T>
__device__ __forceinline__ T top_two_gap(const Top2<T>& t, int num_codes) {
  if (num_codes == 1) return static_cast<T>(INFINITY);
  const T gap = t.best - t.second;
  return gap == gap ? gap : T(0);
}

__device__ __forceinline__ Top2<float> warp_merge(Top2<float> t) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Top2<float> other{__shfl_xor_sync(kFullWarp, t.best, offset),
                            __shfl_xor_sync(kFullWarp, t.second, offset),
                            __shfl_xor_sync(kFullWarp, t.idx, offset)};
    t = merge(t, other);
  }
  return t;
}

// bias + sum_k code[k] * n[k], in this order, with explicit FMAs.
template <int D>
__device__ __forceinline__ float score_code(const float* code, float bias, const float* n) {
  float s = bias;
#pragma unroll
  for (int k = 0; k < D; ++k) s = fmaf(code[k], n[k], s);
  return s;
}

__device__ __forceinline__ float max8(const float* s) {
  return fmaxf(fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3])),
               fmaxf(fmaxf(s[4], s[5]), fmaxf(s[6], s[7])));
}

// Codes [v0, v0 + count) of the codebook into shared memory; code slots past `count` get bias
// -inf, so they never beat a threshold.
template <int D>
__device__ __forceinline__ void stage_small_tile(const float* codes, const float* bias, int v0,
                                                 int count, float* tile_codes, float* tile_bias) {
  __syncthreads();  // the previous tile is no longer read
  const float* src = codes + static_cast<int64_t>(v0) * D;
#pragma unroll
  for (int i = 0; i < kSmallTileCodes * D / kSmallThreads; ++i) {
    const int t = i * kSmallThreads + threadIdx.x;
    tile_codes[t] = t < count * D ? src[t] : 0.f;
  }
#pragma unroll
  for (int i = 0; i < kSmallTileCodes / kSmallThreads; ++i) {
    const int t = i * kSmallThreads + threadIdx.x;
    tile_bias[t] = t < count ? bias[v0 + t] : negative_infinity<float>();
  }
  __syncthreads();
}

// Rows first_row + r * kSmallThreads (r < kSmallRows) of this thread; `gap` may be null.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kSmallThreads)
    lookup_small_d_kernel(const scalar_t* z, const float* codes, const float* bias,
                          int64_t num_rows, int num_codes, float eps, bool l2_normalize,
                          int64_t* indices, float* gap) {
  static_assert(kSmallChunk == 8, "max8 reduces one chunk");
  __shared__ __align__(16) float tile_codes[kSmallTileCodes * D];
  __shared__ __align__(16) float tile_bias[kSmallTileCodes];
  const bool want_gap = gap != nullptr;
  const int64_t first_row =
      static_cast<int64_t>(blockIdx.x) * kSmallThreads * kSmallRows + threadIdx.x;

  float n[kSmallRows][D];
  Top2<float> top[kSmallRows];
  float threshold[kSmallRows];  // a chunk matters to the row only if it holds a score above this
#pragma unroll
  for (int r = 0; r < kSmallRows; ++r) {
    const int64_t row = first_row + r * kSmallThreads;
    if (row < num_rows) {
      normalize_fixed_row<D>(z + row * D, eps, l2_normalize, n[r]);
    } else {
#pragma unroll
      for (int k = 0; k < D; ++k) n[r][k] = 0.f;  // padding row: scored, never written
    }
    top[r] = empty_top2<float>();
    threshold[r] = negative_infinity<float>();
  }

  for (int v0 = 0; v0 < num_codes; v0 += kSmallTileCodes) {
    const int count = min_of(kSmallTileCodes, num_codes - v0);
    stage_small_tile<D>(codes, bias, v0, count, tile_codes, tile_bias);
    for (int c0 = 0; c0 < count; c0 += kSmallChunk) {
      float s[kSmallRows][kSmallChunk];
#pragma unroll
      for (int c = 0; c < kSmallChunk; ++c) {
        const float* code = tile_codes + (c0 + c) * D;
        const float b = tile_bias[c0 + c];
#pragma unroll
        for (int r = 0; r < kSmallRows; ++r) s[r][c] = score_code<D>(code, b, n[r]);
      }
      // fmaxf drops NaN: a non-finite row (NaN scores) never passes, and is fixed up afterwards.
      bool need[kSmallRows];
      bool any = false;
#pragma unroll
      for (int r = 0; r < kSmallRows; ++r) {
        need[r] = max8(s[r]) > threshold[r];
        any = any || need[r];
      }
      if (threadIdx.x % 32 == 0) GSQ_PROBE_ADD("small_d_scanned", kSmallRows * kSmallChunk);
      if (__any_sync(kFullWarp, any)) {  // warp-uniform; after the first chunks, rare
#pragma unroll
        for (int r = 0; r < kSmallRows; ++r) {
          GSQ_PROBE_WARP_ANY("small_d_resolved", need[r], kSmallChunk);
          if (need[r]) {
#pragma unroll
            for (int c = 0; c < kSmallChunk; ++c) offer(top[r], s[r][c], v0 + c0 + c);
            threshold[r] = want_gap ? top[r].second : top[r].best;
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kSmallRows; ++r) {
    const int64_t row = first_row + r * kSmallThreads;
    if (row < num_rows) {
      indices[row] = top[r].idx;
      if (want_gap) gap[row] = top_two_gap(top[r], num_codes);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void normalize_rows_kernel(const scalar_t* z, int64_t num_rows, int d, acc_t eps,
                                      bool l2_normalize, acc_t* n, acc_t* norms) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  const acc_t norm = normalize_row<scalar_t, acc_t>(z + row * d, d, eps, l2_normalize, n + row * d);
  if (norms != nullptr) norms[row] = norm;
}

// The tiled kernel's shared memory: two buffers of each K chunk (rows and codes stored k-major),
// and the bias of the current and the next code tile.
struct TiledShared {
  float rows[2][kTiledK][kRowsStride];
  float codes[2][kTiledK][kCodesStride];
  float bias[2][kTiledCodes];
};

// One K chunk on its way from global to shared memory, in registers. Thread t stages k-offset
// stage_k = t % 8 + 8 (t / 32 % 2) of items stage_item + 16 p, stage_item = t / 8 % 4 + 4 (t / 64):
// a warp reads 4 items x 32 contiguous bytes and stores to 32 distinct banks.
struct TiledStage {
  float rows[kRowLoads];
  float codes[kCodeLoads];
  float bias;
};

struct TiledStep {
  int v0;  // first code of the tile
  int kc;  // K chunk
};

// One 64-bit address per thread and chunk, then pointer steps of 16 d: no 64-bit index math per
// element (offsets inside a tile stay below kTiledCodes d <= 2^31). Code slots past the codebook
// get bias -inf: they never win.
__device__ __forceinline__ void fetch_tiled_stage(const float* block_n, int block_rows,
                                                  const float* codes, const float* bias,
                                                  int num_codes, int d, TiledStep step,
                                                  bool with_rows, int stage_k, int stage_item,
                                                  TiledStage& stage) {
  const int k = step.kc * kTiledK + stage_k;
  const int item_stride = kStageItems * d;
  if (with_rows) {
    const float* src = block_n + (stage_item * d + k);
#pragma unroll
    for (int p = 0; p < kRowLoads; ++p, src += item_stride) {
      stage.rows[p] = (stage_item + kStageItems * p < block_rows && k < d) ? *src : 0.f;
    }
  }
  const float* src = codes + static_cast<int64_t>(step.v0) * d + (stage_item * d + k);
  const int count = min_of(kTiledCodes, num_codes - step.v0);
#pragma unroll
  for (int p = 0; p < kCodeLoads; ++p, src += item_stride) {
    stage.codes[p] = (stage_item + kStageItems * p < count && k < d) ? *src : 0.f;
  }
  if (step.kc == 0 && threadIdx.x < kTiledCodes) {
    stage.bias = static_cast<int>(threadIdx.x) < count ? bias[step.v0 + threadIdx.x]
                                                       : negative_infinity<float>();
  }
}

__device__ __forceinline__ void store_tiled_stage(const TiledStage& stage, TiledStep step,
                                                  bool with_rows, int buffer, int stage_k,
                                                  int stage_item, TiledShared& sh) {
  if (with_rows) {
#pragma unroll
    for (int p = 0; p < kRowLoads; ++p)
      sh.rows[buffer][stage_k][stage_item + kStageItems * p] = stage.rows[p];
  }
#pragma unroll
  for (int p = 0; p < kCodeLoads; ++p)
    sh.codes[buffer][stage_k][stage_item + kStageItems * p] = stage.codes[p];
  if (step.kc == 0 && threadIdx.x < kTiledCodes) {
    sh.bias[(step.v0 / kTiledCodes) % 2][threadIdx.x] = stage.bias;
  }
}

// acc[i][c] += sum over the chunk's k of n[row i][k] * code[lane * 4 + c][k]; k_len is a multiple
// of kTiledKStep (the staged values past d are zeros).
__device__ __forceinline__ void tiled_fma_chunk(const float (*rows)[kRowsStride],
                                                const float (*codes)[kCodesStride], int k_len,
                                                int warp, int lane,
                                                float (&acc)[kRowsPerWarp][kCodesPerLane]) {
  for (int k4 = 0; k4 < k_len; k4 += kTiledKStep) {
#pragma unroll
    for (int u = 0; u < kTiledKStep; ++u) {
      float a[kRowsPerWarp];
      float b[kCodesPerLane];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i)
        a[i] = rows[k4 + u][warp * kRowsPerWarp + i];  // broadcast
#pragma unroll
      for (int c = 0; c < kCodesPerLane; ++c) b[c] = codes[k4 + u][lane * kCodesPerLane + c];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int c = 0; c < kCodesPerLane; ++c) acc[i][c] = fmaf(a[i], b[c], acc[i][c]);
      }
    }
  }
}

// m[i]: this lane's value for row i. Returns the max over the warp of row lane / 4: three
// exchange-half steps (lanes 16, 8, 4 apart) leave each lane one row, two more finish the max.
__device__ __forceinline__ float transposed_warp_max(const float (&m)[kRowsPerWarp], int lane) {
  float h[4];
  const bool b4 = lane & 16;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float send = b4 ? m[q] : m[q + 4];
    h[q] = fmaxf(b4 ? m[q + 4] : m[q], __shfl_xor_sync(kFullWarp, send, 16));  // row 4 b4 + q
  }
  float g[2];
  const bool b3 = lane & 8;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const float send = b3 ? h[q] : h[q + 2];
    g[q] = fmaxf(b3 ? h[q + 2] : h[q], __shfl_xor_sync(kFullWarp, send, 8));  // row 4 b4 + 2 b3 + q
  }
  const bool b2 = lane & 4;
  float v = fmaxf(b2 ? g[1] : g[0], __shfl_xor_sync(kFullWarp, b2 ? g[0] : g[1], 4));
  v = fmaxf(v, __shfl_xor_sync(kFullWarp, v, 2));
  return fmaxf(v, __shfl_xor_sync(kFullWarp, v, 1));
}

// End of a code tile: scores = acc + bias (-inf past the codebook); rows whose tile max beats
// their threshold merge the tile's exact (best, second, idx). `mine` and `threshold` belong to
// row lane / 4 of the warp (four lanes hold each row's copy).
__device__ __forceinline__ void tiled_epilogue(float (&acc)[kRowsPerWarp][kCodesPerLane],
                                               const float* tile_bias, int v0, bool want_gap,
                                               int lane, Top2<float>& mine, float& threshold) {
#pragma unroll
  for (int c = 0; c < kCodesPerLane; ++c) {
    const float b = tile_bias[lane * kCodesPerLane + c];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) acc[i][c] += b;
  }
  float m[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
    m[i] = fmaxf(fmaxf(acc[i][0], acc[i][1]), fmaxf(acc[i][2], acc[i][3]));
  // fmaxf drops NaN: a non-finite row (NaN scores) never passes, and is fixed up afterwards.
  const unsigned need = __ballot_sync(kFullWarp, transposed_warp_max(m, lane) > threshold);
  if (need == 0) return;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    if (need & (1u << (4 * i))) {  // lanes 4i..4i+3 hold row i
      Top2<float> t = empty_top2<float>();
#pragma unroll
      for (int c = 0; c < kCodesPerLane; ++c) offer(t, acc[i][c], v0 + lane * kCodesPerLane + c);
      t = warp_merge(t);
      if (lane / 4 == i) {
        mine = merge(mine, t);
        threshold = want_gap ? mine.second : mine.best;
      }
    }
  }
}

// n: normalized rows (num_rows x d); `gap` may be null. Steps run over (code tile, K chunk).
__global__ void __launch_bounds__(kTiledThreads)
    lookup_tiled_kernel(const float* n, const float* codes, const float* bias, int64_t num_rows,
                        int num_codes, int d, int64_t* indices, float* gap) {
  __shared__ __align__(16) TiledShared sh;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int stage_k = lane % 8 + 8 * (warp % 2);
  const int stage_item = lane / 8 + 4 * (warp / 2);
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kTiledRows;
  const int block_rows = static_cast<int>(min_of<int64_t>(kTiledRows, num_rows - first_row));
  const float* block_n = n + first_row * d;
  const int k_chunks = (d + kTiledK - 1) / kTiledK;
  const bool rows_change = k_chunks > 1;  // with one chunk the rows are staged once
  const bool want_gap = gap != nullptr;

  Top2<float> mine = empty_top2<float>();
  float threshold = negative_infinity<float>();
  float acc[kRowsPerWarp][kCodesPerLane] = {};
  TiledStage stage{};
  TiledStep step{0, 0};
  fetch_tiled_stage(block_n, block_rows, codes, bias, num_codes, d, step, true, stage_k, stage_item,
                    stage);
  store_tiled_stage(stage, step, true, 0, stage_k, stage_item, sh);
  __syncthreads();
  for (int s = 0;; ++s) {
    TiledStep next{step.v0, step.kc + 1};
    if (next.kc == k_chunks) next = TiledStep{step.v0 + kTiledCodes, 0};
    const bool has_next = next.v0 < num_codes;
    if (has_next) {  // in flight during the FMAs below
      fetch_tiled_stage(block_n, block_rows, codes, bias, num_codes, d, next, rows_change, stage_k,
                        stage_item, stage);
    }
    const int k_len =
        (min_of(kTiledK, d - step.kc * kTiledK) + kTiledKStep - 1) / kTiledKStep * kTiledKStep;
    tiled_fma_chunk(sh.rows[rows_change ? s % 2 : 0], sh.codes[s % 2], k_len, warp, lane, acc);
    if (step.kc == k_chunks - 1) {
      tiled_epilogue(acc, sh.bias[(step.v0 / kTiledCodes) % 2], step.v0, want_gap, lane, mine,
                     threshold);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int c = 0; c < kCodesPerLane; ++c) acc[i][c] = 0.f;
      }
    }
    if (!has_next) break;
    // The other buffer was last read in step s - 1, which every thread finished before the
    // barrier that ended it.
    store_tiled_stage(stage, next, rows_change, (s + 1) % 2, stage_k, stage_item, sh);
    __syncthreads();
    step = next;
  }
  const int64_t row = first_row + warp * kRowsPerWarp + lane / 4;
  if (lane % 4 == 0 && row < num_rows) {
    indices[row] = mine.idx;
    if (want_gap) gap[row] = top_two_gap(mine, num_codes);
  }
}

// float64 latents (gradcheck): one thread per row, codes read from global memory in index order.
__global__ void lookup_double_kernel(const double* z, const double* codes, const double* bias,
                                     int64_t num_rows, int num_codes, int d, double eps,
                                     bool l2_normalize, double* n_scratch, int64_t* indices,
                                     double* gap) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  double* n = n_scratch + row * d;
  normalize_row<double, double>(z + row * d, d, eps, l2_normalize, n);
  Top2<double> top = empty_top2<double>();
  for (int j = 0; j < num_codes; ++j) {
    const double* code = codes + static_cast<int64_t>(j) * d;
    double s = bias[j];
    for (int k = 0; k < d; ++k) s = fma(code[k], n[k], s);
    offer(top, s, j);
  }
  indices[row] = top.idx;
  if (gap != nullptr) gap[row] = top_two_gap(top, num_codes);
}

template <typename scalar_t, typename acc_t>
__global__ void gather_codes_kernel(const scalar_t* z, const acc_t* codebook,
                                    const int64_t* indices, int64_t num_rows, int d, acc_t eps,
                                    bool l2_normalize, acc_t loss_scale, scalar_t* quantized,
                                    acc_t* loss_rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  const scalar_t* z_row = z + row * d;
  acc_t sum_squares = 0;
  for (int k = 0; k < d; ++k) {
    const acc_t v = to_acc(z_row[k]);
    sum_squares += v * v;
  }
  const acc_t norm = sqrt(sum_squares);
  const acc_t denom = l2_normalize ? (norm > eps ? norm : eps) : acc_t(1);
  const acc_t* code = codebook + indices[row] * d;
  acc_t loss = 0;
  for (int k = 0; k < d; ++k) {
    const acc_t n_k = l2_normalize ? to_acc(z_row[k]) / denom : to_acc(z_row[k]);
    const acc_t diff = code[k] - n_k;
    loss += diff * diff;
    quantized[row * d + k] = from_acc<scalar_t>(code[k]);
  }
  loss_rows[row] = loss_scale * loss;
}

template <typename scalar_t, typename acc_t>
__global__ void grad_z_kernel(const acc_t* n, const acc_t* norms, const scalar_t* grad_quantized,
                              const acc_t* grad_loss_rows, const acc_t* codebook,
                              const int64_t* indices, int64_t num_rows, int d, acc_t beta,
                              acc_t eps, bool l2_normalize, scalar_t* grad_z) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  const acc_t* n_row = n + row * d;
  const acc_t* code = codebook + indices[row] * d;
  const acc_t commit = 2 * beta * grad_loss_rows[row];
  // dL/dn is recomputed in the second loop rather than stored: d is unbounded, registers are not.
  acc_t n_dot_grad_n = 0;
  for (int k = 0; k < d; ++k) {
    const acc_t grad_n = to_acc(grad_quantized[row * d + k]) + commit * (n_row[k] - code[k]);
    n_dot_grad_n += n_row[k] * grad_n;
  }
  const acc_t norm = norms[row];
  const bool clamped = norm < eps;
  for (int k = 0; k < d; ++k) {
    const acc_t grad_n = to_acc(grad_quantized[row * d + k]) + commit * (n_row[k] - code[k]);
    acc_t out;
    if (!l2_normalize) {
      out = grad_n;
    } else if (clamped) {
      out = grad_n / eps;
    } else {
      out = (grad_n - n_row[k] * n_dot_grad_n) / norm;
    }
    grad_z[row * d + k] = from_acc<scalar_t>(out);
  }
}

// A row holding NaN/inf has no nearest code: every backend gives it index 0 and gap +inf.
template <typename scalar_t, typename gap_t>
__global__ void fix_non_finite_rows_kernel(const scalar_t* z, int64_t num_rows, int d,
                                           int64_t* indices, gap_t* gap) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  bool finite = true;
  for (int k = 0; k < d; ++k) finite = finite && isfinite(to_acc(z[row * d + k]));
  if (!finite) {
    indices[row] = 0;
    if (gap != nullptr) gap[row] = static_cast<gap_t>(INFINITY);
  }
}

__global__ void iota_kernel(int64_t* values, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) values[i] = i;
}

// bucket_start[j] = first position p with sorted_codes[p] >= j, for j in [0, V].
__global__ void bucket_start_kernel(const int64_t* sorted_codes, int64_t num_rows,
                                    int64_t num_codes, int64_t* bucket_start) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j > num_codes) return;
  int64_t lo = 0, hi = num_rows;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted_codes[mid] < j) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  bucket_start[j] = lo;
}

// Lanes per row of the gradient sums: the next power of two >= d, at most 32; the other
// 32 / lanes_per_row groups of lanes are row sub-streams.
__device__ __forceinline__ int grad_lanes_per_row(int d) {
  int lanes_per_row = 1;
  while (lanes_per_row < d && lanes_per_row < 32) lanes_per_row <<= 1;
  return lanes_per_row;
}

// sum over sorted positions p in [begin, end) of w_row (c_k - n_row,k), row = rows_by_code[p], for
// k = k0 + lane % lanes_per_row, in a fixed order: sub-stream lane / lanes_per_row takes every
// (32 / lanes_per_row)-th position, and a fixed xor tree adds the sub-streams. Called by the whole
// warp; the result is valid where k < d.
template <typename acc_t>
__device__ acc_t warp_rows_sum(const acc_t* n, const acc_t* grad_loss_rows,
                               const int64_t* rows_by_code, int64_t begin, int64_t end, int d,
                               int k0, acc_t c_k, int lanes_per_row) {
  const int lane = threadIdx.x % 32;
  const int k = k0 + lane % lanes_per_row;
  const int streams = 32 / lanes_per_row;
  if (lane == 0) GSQ_PROBE_MAX("grad_rows_per_warp_sum", end - begin);
  acc_t sum = 0;
  if (k < d) {
    for (int64_t p = begin + lane / lanes_per_row; p < end; p += streams) {
      const int64_t row = rows_by_code[p];
      sum += grad_loss_rows[row] * (c_k - n[row * d + k]);
    }
  }
  for (int offset = lanes_per_row; offset < 32; offset <<= 1)
    sum += __shfl_xor_sync(kFullWarp, sum, offset);
  return sum;
}

// One warp per chunk b of sorted positions [b C, (b + 1) C), C = kGradChunk: partial[b] (d values)
// is the chunk's share of the code at its first position, if that code started in an earlier
// chunk (otherwise codebook_grad_kernel sums those rows itself and never reads partial[b]).
template <typename acc_t>
__global__ void codebook_grad_chunks_kernel(const acc_t* n, const acc_t* grad_loss_rows,
                                            const acc_t* codebook, const int64_t* sorted_codes,
                                            const int64_t* rows_by_code,
                                            const int64_t* bucket_start, int64_t num_chunks, int d,
                                            acc_t* partial) {
  const int64_t chunk = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (chunk >= num_chunks) return;  // whole warps leave together
  const int64_t begin = chunk * kGradChunk;
  const int64_t code = sorted_codes[begin];
  if (bucket_start[code] == begin) return;
  const int64_t end = min_of(begin + kGradChunk, bucket_start[code + 1]);
  const int lanes_per_row = grad_lanes_per_row(d);
  for (int k0 = 0; k0 < d; k0 += lanes_per_row) {
    const int k = k0 + lane % lanes_per_row;
    const acc_t c_k = k < d ? codebook[code * d + k] : acc_t(0);
    const acc_t sum =
        warp_rows_sum(n, grad_loss_rows, rows_by_code, begin, end, d, k0, c_k, lanes_per_row);
    if (lane < lanes_per_row && k < d) partial[chunk * d + k] = sum;
  }
}

// One warp per code j with sorted rows [begin, end): the rows in begin's chunk, then the partial
// sums of the later chunks it spans, in chunk order. dL/dC_j = 2 * that.
template <typename acc_t>
__global__ void codebook_grad_kernel(const acc_t* n, const acc_t* grad_loss_rows,
                                     const acc_t* codebook, const int64_t* rows_by_code,
                                     const int64_t* bucket_start, const acc_t* partial,
                                     int64_t num_codes, int d, acc_t* grad_codebook) {
  const int64_t code = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (code >= num_codes) return;  // whole warps leave together
  const int64_t begin = bucket_start[code], end = bucket_start[code + 1];
  const int64_t first_chunk_end = (begin / kGradChunk + 1) * kGradChunk;
  const int lanes_per_row = grad_lanes_per_row(d);
  for (int k0 = 0; k0 < d; k0 += lanes_per_row) {
    const int k = k0 + lane % lanes_per_row;
    const acc_t c_k = k < d ? codebook[code * d + k] : acc_t(0);
    acc_t sum = warp_rows_sum(n, grad_loss_rows, rows_by_code, begin, min_of(end, first_chunk_end),
                              d, k0, c_k, lanes_per_row);
    if (lane < lanes_per_row && k < d) {
      for (int64_t p = first_chunk_end; p < end; p += kGradChunk)
        sum += partial[p / kGradChunk * d + k];
      grad_codebook[code * d + k] = 2 * sum;
    }
  }
}

inline int blocks_for(int64_t items, int threads) {
  return static_cast<int>((items + threads - 1) / threads);
}

template <typename scalar_t, typename gap_t>
cudaError_t fix_non_finite_rows(const scalar_t* z, int64_t num_rows, int d, int64_t* indices,
                                gap_t* gap, cudaStream_t stream) {
  auto* fix_non_finite_rows = &fix_non_finite_rows_kernel<scalar_t, gap_t>;
  GSQ_LAUNCH(fix_non_finite_rows, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel,
             stream, z, num_rows, d, indices, gap);
  return cudaGetLastError();
}

constexpr bool is_small_d(int d) {
#define GSQ_IS_DIM(D) d == D ||
  return GSQ_SMALL_DIMS(GSQ_IS_DIM) false;
#undef GSQ_IS_DIM
}

template <typename scalar_t>
cudaError_t launch_small_d(const scalar_t* z, int64_t num_rows, int d, const float* codes,
                           const float* bias, int num_codes, float eps, bool l2_normalize,
                           int64_t* indices, float* gap, cudaStream_t stream) {
  // 3 rows per thread: the headline size (M = 131,072 group vectors) gets 1366 warps, about 10 per
  // SM of a 132-SM H100 (registers allow 20+), each with 24 independent FMA chains per chunk.
  const int blocks = blocks_for(num_rows, kSmallThreads * kSmallRows);
#define GSQ_SMALL_D_CASE(D)                                                                        \
  case D: {                                                                                        \
    auto* lookup_small_d = &lookup_small_d_kernel<scalar_t, D>;                                    \
    GSQ_LAUNCH(lookup_small_d, blocks, kSmallThreads, stream, z, codes, bias, num_rows, num_codes, \
               eps, l2_normalize, indices, gap);                                                   \
    return cudaGetLastError();                                                                     \
  }
  switch (d) {
    GSQ_SMALL_DIMS(GSQ_SMALL_D_CASE)
    default: return cudaErrorInvalidValue;
  }
#undef GSQ_SMALL_D_CASE
}

// Any d: normalize into n_scratch (num_rows x d), then the tiled kernel.
template <typename scalar_t>
cudaError_t launch_tiled(const scalar_t* z, int64_t num_rows, int d, const float* codes,
                         const float* bias, int num_codes, float eps, bool l2_normalize,
                         float* n_scratch, int64_t* indices, float* gap, cudaStream_t stream) {
  auto* normalize = &normalize_rows_kernel<scalar_t, float>;
  GSQ_LAUNCH(normalize, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel, stream, z,
             num_rows, d, eps, l2_normalize, n_scratch, static_cast<float*>(nullptr));
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  auto* lookup_tiled = &lookup_tiled_kernel;
  GSQ_LAUNCH(lookup_tiled, blocks_for(num_rows, kTiledRows), kTiledThreads, stream, n_scratch,
             codes, bias, num_rows, num_codes, d, indices, gap);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t lookup_typed(const scalar_t* z, int64_t num_rows, int d, const float* codes,
                         const float* bias, int num_codes, float eps, bool l2_normalize,
                         float* n_scratch, int64_t* indices, float* gap, cudaStream_t stream) {
  const cudaError_t status = is_small_d(d)
                                 ? launch_small_d(z, num_rows, d, codes, bias, num_codes, eps,
                                                  l2_normalize, indices, gap, stream)
                                 : launch_tiled(z, num_rows, d, codes, bias, num_codes, eps,
                                                l2_normalize, n_scratch, indices, gap, stream);
  if (status != cudaSuccess) return status;
  return fix_non_finite_rows(z, num_rows, d, indices, gap, stream);
}

template <typename scalar_t>
cudaError_t gather_typed(const scalar_t* z, const void* codebook, const int64_t* indices,
                         int64_t num_rows, int d, double eps, bool l2_normalize, double loss_scale,
                         void* quantized, void* loss_rows, cudaStream_t stream) {
  typedef typename Acc<scalar_t>::type acc_t;
  auto* gather = &gather_codes_kernel<scalar_t, acc_t>;
  GSQ_LAUNCH(gather, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel, stream, z,
             static_cast<const acc_t*>(codebook), indices, num_rows, d, static_cast<acc_t>(eps),
             l2_normalize, static_cast<acc_t>(loss_scale), static_cast<scalar_t*>(quantized),
             static_cast<acc_t*>(loss_rows));
  return cudaGetLastError();
}

struct BackwardWorkspace {
  void* n;
  void* norms;
  void* chunk_partials;
  int64_t* sorted_codes;
  int64_t* row_ids;
  int64_t* rows_by_code;
  int64_t* bucket_start;
  void* sort_scratch;
  size_t sort_scratch_bytes;
  size_t total_bytes;
};

int key_bits(int64_t num_codes) {
  int bits = 1;
  while (bits < 63 && (int64_t(1) << bits) < num_codes) ++bits;
  return bits;
}

size_t sort_scratch_bytes(int64_t num_rows, int64_t num_codes) {
#if defined(GSQ_CUDA_EMULATION)
  (void)num_rows;
  (void)num_codes;
  return 0;
#else
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const unsigned long long*>(nullptr),
      static_cast<unsigned long long*>(nullptr), static_cast<const int64_t*>(nullptr),
      static_cast<int64_t*>(nullptr), static_cast<int>(num_rows), 0, key_bits(num_codes));
  return bytes;
#endif
}

// (keys, values) sorted by key, stably (equal keys keep their order), for keys in [0, key_range):
// cub's radix sort over the key's low bits, or on the host under the emulation. scratch holds
// sort_scratch_bytes(count, key_range).
cudaError_t sort_pairs(const unsigned long long* keys, unsigned long long* sorted_keys,
                       const int64_t* values, int64_t* sorted_values, int64_t count,
                       int64_t key_range, void* scratch, size_t scratch_bytes,
                       cudaStream_t stream) {
#if defined(GSQ_CUDA_EMULATION)
  (void)key_range;
  (void)scratch;
  (void)scratch_bytes;
  (void)stream;
  std::vector<std::pair<unsigned long long, int64_t>> pairs(count);
  for (int64_t i = 0; i < count; ++i) pairs[i] = {keys[i], values[i]};
  std::stable_sort(pairs.begin(), pairs.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  for (int64_t i = 0; i < count; ++i) {
    sorted_keys[i] = pairs[i].first;
    sorted_values[i] = pairs[i].second;
  }
  return cudaSuccess;
#else
  return cub::DeviceRadixSort::SortPairs(scratch, scratch_bytes, keys, sorted_keys, values,
                                         sorted_values, static_cast<int>(count), 0,
                                         key_bits(key_range), stream);
#endif
}

int64_t grad_chunks(int64_t num_rows) { return (num_rows + kGradChunk - 1) / kGradChunk; }

BackwardWorkspace carve_workspace(void* base, int64_t num_rows, int64_t num_codes, int d,
                                  size_t acc_size) {
  BackwardWorkspace w{};
  gsq_workspace::Carver carve{static_cast<char*>(base)};
  const size_t rows = static_cast<size_t>(num_rows);
  w.n = carve.take<char>(rows * d * acc_size);
  w.norms = carve.take<char>(rows * acc_size);
  w.chunk_partials = carve.take<char>(static_cast<size_t>(grad_chunks(num_rows)) * d * acc_size);
  w.sorted_codes = carve.take<int64_t>(rows);
  w.row_ids = carve.take<int64_t>(rows);
  w.rows_by_code = carve.take<int64_t>(rows);
  w.bucket_start = carve.take<int64_t>(static_cast<size_t>(num_codes + 1));
  w.sort_scratch_bytes = sort_scratch_bytes(num_rows, num_codes);
  w.sort_scratch = carve.take<char>(w.sort_scratch_bytes);
  w.total_bytes = carve.bytes;
  return w;
}

cudaError_t sort_rows_by_code(const int64_t* indices, const BackwardWorkspace& w, int64_t num_rows,
                              int64_t num_codes, cudaStream_t stream) {
  auto* iota = &iota_kernel;
  GSQ_LAUNCH(iota, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel, stream,
             w.row_ids, num_rows);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  // Radix sort is stable: each code's rows stay in increasing row order.
  status =
      sort_pairs(reinterpret_cast<const unsigned long long*>(indices),
                 reinterpret_cast<unsigned long long*>(w.sorted_codes), w.row_ids, w.rows_by_code,
                 num_rows, num_codes, w.sort_scratch, w.sort_scratch_bytes, stream);
  if (status != cudaSuccess) return status;
  auto* starts = &bucket_start_kernel;
  GSQ_LAUNCH(starts, blocks_for(num_codes + 1, kThreadsPerRowKernel), kThreadsPerRowKernel, stream,
             w.sorted_codes, num_rows, num_codes, w.bucket_start);
  return cudaGetLastError();
}

// dL/dC from the sorted rows: chunk partial sums (parallel over rows), then one warp per code.
template <typename acc_t>
cudaError_t codebook_grad(const acc_t* n, const acc_t* grad_loss_rows, const acc_t* codebook,
                          const BackwardWorkspace& w, int64_t num_rows, int64_t num_codes, int d,
                          acc_t* grad_codebook, cudaStream_t stream) {
  acc_t* partial = static_cast<acc_t*>(w.chunk_partials);
  const int64_t chunks = grad_chunks(num_rows);
  if (chunks > 0) {
    auto* codebook_grad_chunks = &codebook_grad_chunks_kernel<acc_t>;
    GSQ_LAUNCH(codebook_grad_chunks, blocks_for(chunks * 32, kThreadsPerRowKernel),
               kThreadsPerRowKernel, stream, n, grad_loss_rows, codebook, w.sorted_codes,
               w.rows_by_code, w.bucket_start, chunks, d, partial);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  auto* codebook_grad_codes = &codebook_grad_kernel<acc_t>;
  GSQ_LAUNCH(codebook_grad_codes, blocks_for(num_codes * 32, kThreadsPerRowKernel),
             kThreadsPerRowKernel, stream, n, grad_loss_rows, codebook, w.rows_by_code,
             w.bucket_start, static_cast<const acc_t*>(partial), num_codes, d, grad_codebook);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_typed(const scalar_t* z, const scalar_t* grad_quantized,
                           const void* grad_loss_rows, const void* codebook, const int64_t* indices,
                           int64_t num_rows, int64_t num_codes, int d, double beta, double eps,
                           bool l2_normalize, void* workspace, scalar_t* grad_z,
                           void* grad_codebook, cudaStream_t stream) {
  typedef typename Acc<scalar_t>::type acc_t;
  const BackwardWorkspace w = carve_workspace(workspace, num_rows, num_codes, d, sizeof(acc_t));
  acc_t* n = static_cast<acc_t*>(w.n);
  acc_t* norms = static_cast<acc_t*>(w.norms);
  const acc_t* gl = static_cast<const acc_t*>(grad_loss_rows);
  const acc_t* cb = static_cast<const acc_t*>(codebook);
  const int row_blocks = blocks_for(num_rows, kThreadsPerRowKernel);
  cudaError_t status = cudaSuccess;
  if (num_rows > 0) {
    auto* normalize = &normalize_rows_kernel<scalar_t, acc_t>;
    GSQ_LAUNCH(normalize, row_blocks, kThreadsPerRowKernel, stream, z, num_rows, d,
               static_cast<acc_t>(eps), l2_normalize, n, norms);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
    auto* grad_rows = &grad_z_kernel<scalar_t, acc_t>;
    GSQ_LAUNCH(grad_rows, row_blocks, kThreadsPerRowKernel, stream, n, norms, grad_quantized, gl,
               cb, indices, num_rows, d, static_cast<acc_t>(beta), static_cast<acc_t>(eps),
               l2_normalize, grad_z);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
    if ((status = sort_rows_by_code(indices, w, num_rows, num_codes, stream)) != cudaSuccess)
      return status;
  } else {
    // No rows: every bucket is empty.
    auto* starts = &bucket_start_kernel;
    GSQ_LAUNCH(starts, blocks_for(num_codes + 1, kThreadsPerRowKernel), kThreadsPerRowKernel,
               stream, w.sorted_codes, int64_t(0), num_codes, w.bucket_start);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  return codebook_grad(static_cast<const acc_t*>(n), gl, cb, w, num_rows, num_codes, d,
                       static_cast<acc_t*>(grad_codebook), stream);
}

// ---------------------------------------------------------------------------------------------
// The exact lookup for d = 1, and d = 2 with l2 on (gsq_sorted_search.h holds the keys, the
// search and its proof): the codes are radix-sorted by bucket (cub; stable, so each bucket lists
// its codes in increasing index order), each bucket located by binary search, then one thread
// searches each row. Every bucket is built (rows are many on a GPU); duplicates are not dropped,
// so a row next to a crowded bucket scans it whole.

// d = 1: range = {min, max} of the finite codes' keys c^. One block.
__global__ void sorted_key_range_kernel(const float* codebook, int64_t num_codes, bool l2_normalize,
                                        float eps, float* range) {
  __shared__ float low[kThreadsPerRowKernel];
  __shared__ float high[kThreadsPerRowKernel];
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t j = threadIdx.x; j < num_codes; j += blockDim.x) {
    float key;
    gsq_sorted::lookup_vector(codebook + j, 1, l2_normalize, eps, &key);
    if (codebook[j] - codebook[j] == 0) {  // finite
      lo = fminf(lo, key);
      hi = fmaxf(hi, key);
    }
  }
  low[threadIdx.x] = lo;
  high[threadIdx.x] = hi;
  __syncthreads();
  for (int step = kThreadsPerRowKernel / 2; step > 0; step /= 2) {
    if (static_cast<int>(threadIdx.x) < step) {
      low[threadIdx.x] = fminf(low[threadIdx.x], low[threadIdx.x + step]);
      high[threadIdx.x] = fmaxf(high[threadIdx.x], high[threadIdx.x + step]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    range[0] = low[0];
    range[1] = high[0];
  }
}

__device__ __forceinline__ gsq_sorted::BucketMap sorted_bucket_map(int dim, int64_t num_codes,
                                                                   const float* range) {
  return gsq_sorted::bucket_map(dim, num_codes, dim == 1 ? range[0] : 0.0f,
                                dim == 1 ? range[1] : 0.0f);
}

// keys[j] = the bucket of code j (num_buckets: short, num_buckets + 1: NaN/inf), codes[j] = j.
__global__ void sorted_code_keys_kernel(const float* codebook, int64_t num_codes, int dim,
                                        bool l2_normalize, float eps, const float* range,
                                        unsigned long long* keys, int64_t* codes) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= num_codes) return;
  const gsq_sorted::BucketMap map = sorted_bucket_map(dim, num_codes, range);
  const int32_t last = static_cast<int32_t>(map.num_buckets - 1);
  const int32_t bucket = dim == 2 ? gsq_sorted::code_bucket_2d(codebook[2 * j], codebook[2 * j + 1],
                                                               gsq_sorted::long_code_norm_sq(eps),
                                                               static_cast<float>(map.scale), last)
                                  : gsq_sorted::code_bucket_1d(codebook[j], l2_normalize, eps,
                                                               map.origin, map.scale, last);
  keys[j] = static_cast<unsigned long long>(bucket);
  codes[j] = j;
}

// members[p] = the p-th code in bucket order, member_codes[p] = its c^.
__global__ void sorted_members_kernel(const float* codebook, int64_t num_codes, int dim,
                                      bool l2_normalize, float eps, const int64_t* sorted_codes,
                                      int32_t* members, float* member_codes) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= num_codes) return;
  const int64_t j = sorted_codes[p];
  members[p] = static_cast<int32_t>(j);
  gsq_sorted::lookup_vector(codebook + j * dim, dim, l2_normalize, eps, member_codes + p * dim);
}

// indices[i] = the exact nearest code of row i; 0 for a row holding NaN/inf.
__global__ void sorted_search_kernel(const float* z, int64_t num_rows, int dim, bool l2_normalize,
                                     float eps, int64_t num_codes, const float* range,
                                     const int64_t* bucket_start, const int32_t* members,
                                     const float* member_codes, int64_t* indices) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_rows) return;
  const gsq_sorted::BucketMap map = sorted_bucket_map(dim, num_codes, range);
  // Bucket b ends where bucket b + 1 starts: nothing is dropped.
  const gsq_sorted::SortedView view{dim,       map.num_buckets, map.origin,
                                    map.scale, bucket_start,    bucket_start + 1,
                                    members,   member_codes,    nullptr};
  const float* row = z + i * dim;
  float n_hat[2] = {0.0f, 0.0f};
  gsq_sorted::lookup_vector(row, dim, l2_normalize, eps, n_hat);
  const float x = row[0], y = row[dim - 1];
  if (!((x - x) + (y - y) == 0) ||
      !((n_hat[0] - n_hat[0]) + (n_hat[dim - 1] - n_hat[dim - 1]) == 0)) {
    indices[i] = 0;
    return;
  }
  const double n[2] = {n_hat[0], n_hat[dim - 1]};
  gsq_sorted::Best best{HUGE_VAL, INT64_MAX};
  gsq_sorted::scan_bucket(view, map.num_buckets, n, best);  // the short codes
  gsq_sorted::search_row(view, n, best);                    // every bucket is built: never gives up
  indices[i] = best.index == INT64_MAX ? 0 : best.index;
}

struct SortedWorkspace {
  unsigned long long* keys;
  unsigned long long* sorted_keys;
  int64_t* codes;
  int64_t* sorted_codes;
  int64_t* bucket_start;  // most buckets + 2
  int32_t* members;
  float* member_codes;
  float* range;
  void* sort_scratch;
  size_t sort_scratch_bytes;
  size_t total_bytes;
};

// The most buckets V codes can have (d = 1 may use one).
int64_t sorted_max_buckets(int64_t num_codes) {
  return gsq_sorted::bucket_map(2, num_codes, 0.0f, 0.0f).num_buckets;
}

SortedWorkspace carve_sorted_workspace(void* base, int64_t num_codes, int dim) {
  SortedWorkspace w{};
  gsq_workspace::Carver carve{static_cast<char*>(base)};
  const size_t codes = static_cast<size_t>(num_codes);
  w.keys = carve.take<unsigned long long>(codes);
  w.sorted_keys = carve.take<unsigned long long>(codes);
  w.codes = carve.take<int64_t>(codes);
  w.sorted_codes = carve.take<int64_t>(codes);
  w.bucket_start = carve.take<int64_t>(static_cast<size_t>(sorted_max_buckets(num_codes) + 2));
  w.members = carve.take<int32_t>(codes);
  w.member_codes = carve.take<float>(codes * dim);
  w.range = carve.take<float>(2);
  // The keys are buckets in [0, most buckets + 1].
  w.sort_scratch_bytes = sort_scratch_bytes(num_codes, sorted_max_buckets(num_codes) + 2);
  w.sort_scratch = carve.take<char>(w.sort_scratch_bytes);
  w.total_bytes = carve.bytes;
  return w;
}

}  // namespace

cudaError_t prepare_codebook(const void* codebook, bool is_double, int64_t num_codes, int dim,
                             double eps, bool l2_normalize, void* codes, void* bias,
                             cudaStream_t stream) {
  const int blocks = blocks_for(num_codes, kThreadsPerRowKernel);
  if (is_double) {
    auto* prepare = &prepare_codebook_kernel<double>;
    GSQ_LAUNCH(prepare, blocks, kThreadsPerRowKernel, stream, static_cast<const double*>(codebook),
               num_codes, dim, eps, l2_normalize, static_cast<double*>(codes),
               static_cast<double*>(bias));
  } else {
    auto* prepare = &prepare_codebook_kernel<float>;
    GSQ_LAUNCH(prepare, blocks, kThreadsPerRowKernel, stream, static_cast<const float*>(codebook),
               num_codes, dim, static_cast<float>(eps), l2_normalize, static_cast<float*>(codes),
               static_cast<float*>(bias));
  }
  return cudaGetLastError();
}

bool lookup_supports(int64_t num_codes, int dim) {
  return num_codes >= 1 && num_codes <= INT32_MAX && dim >= 1 && dim <= kMaxDim;
}

size_t lookup_workspace_bytes(int64_t num_rows, int dim, DType dtype) {
  if (dtype == DType::kFloat64) return static_cast<size_t>(num_rows) * dim * sizeof(double);
  return is_small_d(dim) ? 0 : static_cast<size_t>(num_rows) * dim * sizeof(float);
}

cudaError_t lookup(const void* z, DType dtype, int64_t num_rows, int dim, const void* codes,
                   const void* bias, int64_t num_codes, double eps, bool l2_normalize,
                   void* workspace, int64_t* indices, void* gap, cudaStream_t stream) {
  if (!lookup_supports(num_codes, dim)) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  const int v = static_cast<int>(num_codes);
  const float* codes_f = static_cast<const float*>(codes);
  const float* bias_f = static_cast<const float*>(bias);
  float* scratch = static_cast<float*>(workspace);
  float* gap_f = static_cast<float*>(gap);
  const float eps_f = static_cast<float>(eps);
  switch (dtype) {
    case DType::kFloat32:
      return lookup_typed(static_cast<const float*>(z), num_rows, dim, codes_f, bias_f, v, eps_f,
                          l2_normalize, scratch, indices, gap_f, stream);
    case DType::kFloat16:
      return lookup_typed(static_cast<const __half*>(z), num_rows, dim, codes_f, bias_f, v, eps_f,
                          l2_normalize, scratch, indices, gap_f, stream);
    case DType::kBFloat16:
      return lookup_typed(static_cast<const __nv_bfloat16*>(z), num_rows, dim, codes_f, bias_f, v,
                          eps_f, l2_normalize, scratch, indices, gap_f, stream);
    case DType::kFloat64: {
      auto* lookup_double = &lookup_double_kernel;
      double* gap_d = static_cast<double*>(gap);
      GSQ_LAUNCH(lookup_double, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel,
                 stream, static_cast<const double*>(z), static_cast<const double*>(codes),
                 static_cast<const double*>(bias), num_rows, v, dim, eps, l2_normalize,
                 static_cast<double*>(workspace), indices, gap_d);
      const cudaError_t status = cudaGetLastError();
      if (status != cudaSuccess) return status;
      return fix_non_finite_rows(static_cast<const double*>(z), num_rows, dim, indices, gap_d,
                                 stream);
    }
  }
  return cudaErrorInvalidValue;
}

cudaError_t gather_codes(const void* z, DType dtype, const void* codebook, const int64_t* indices,
                         int64_t num_rows, int dim, double eps, bool l2_normalize,
                         double loss_scale, void* quantized, void* loss_rows, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return gather_typed(static_cast<const float*>(z), codebook, indices, num_rows, dim, eps,
                          l2_normalize, loss_scale, quantized, loss_rows, stream);
    case DType::kFloat16:
      return gather_typed(static_cast<const __half*>(z), codebook, indices, num_rows, dim, eps,
                          l2_normalize, loss_scale, quantized, loss_rows, stream);
    case DType::kBFloat16:
      return gather_typed(static_cast<const __nv_bfloat16*>(z), codebook, indices, num_rows, dim,
                          eps, l2_normalize, loss_scale, quantized, loss_rows, stream);
    case DType::kFloat64:
      return gather_typed(static_cast<const double*>(z), codebook, indices, num_rows, dim, eps,
                          l2_normalize, loss_scale, quantized, loss_rows, stream);
  }
  return cudaErrorInvalidValue;
}

size_t backward_workspace_bytes(int64_t num_rows, int64_t num_codes, int dim, DType dtype) {
  const size_t acc_size = dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  return carve_workspace(nullptr, num_rows, num_codes, dim, acc_size).total_bytes;
}

cudaError_t backward(const void* z, const void* grad_quantized, DType dtype,
                     const void* grad_loss_rows, const void* codebook, const int64_t* indices,
                     int64_t num_rows, int64_t num_codes, int dim, double beta, double eps,
                     bool l2_normalize, void* workspace, size_t workspace_bytes, void* grad_z,
                     void* grad_codebook, cudaStream_t stream) {
  if (workspace_bytes < backward_workspace_bytes(num_rows, num_codes, dim, dtype))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed(static_cast<const float*>(z), static_cast<const float*>(grad_quantized),
                            grad_loss_rows, codebook, indices, num_rows, num_codes, dim, beta, eps,
                            l2_normalize, workspace, static_cast<float*>(grad_z), grad_codebook,
                            stream);
    case DType::kFloat16:
      return backward_typed(static_cast<const __half*>(z),
                            static_cast<const __half*>(grad_quantized), grad_loss_rows, codebook,
                            indices, num_rows, num_codes, dim, beta, eps, l2_normalize, workspace,
                            static_cast<__half*>(grad_z), grad_codebook, stream);
    case DType::kBFloat16:
      return backward_typed(static_cast<const __nv_bfloat16*>(z),
                            static_cast<const __nv_bfloat16*>(grad_quantized), grad_loss_rows,
                            codebook, indices, num_rows, num_codes, dim, beta, eps, l2_normalize,
                            workspace, static_cast<__nv_bfloat16*>(grad_z), grad_codebook, stream);
    case DType::kFloat64:
      return backward_typed(static_cast<const double*>(z),
                            static_cast<const double*>(grad_quantized), grad_loss_rows, codebook,
                            indices, num_rows, num_codes, dim, beta, eps, l2_normalize, workspace,
                            static_cast<double*>(grad_z), grad_codebook, stream);
  }
  return cudaErrorInvalidValue;
}

bool sorted_search_supports(int64_t num_codes, int dim) {
  return num_codes >= 1 && num_codes <= INT32_MAX && (dim == 1 || dim == 2);
}

size_t sorted_search_workspace_bytes(int64_t num_codes, int dim) {
  return carve_sorted_workspace(nullptr, num_codes, dim).total_bytes;
}

cudaError_t sorted_search(const float* z, int64_t num_rows, int dim, const float* codebook,
                          int64_t num_codes, double eps, bool l2_normalize, void* workspace,
                          size_t workspace_bytes, int64_t* indices, cudaStream_t stream) {
  if (!sorted_search_supports(num_codes, dim) || (dim == 2 && !l2_normalize) ||
      workspace_bytes < sorted_search_workspace_bytes(num_codes, dim)) {
    return cudaErrorInvalidValue;
  }
  if (num_rows == 0) return cudaSuccess;
  const SortedWorkspace w = carve_sorted_workspace(workspace, num_codes, dim);
  const float eps_f = static_cast<float>(eps);
  if (dim == 1) {
    auto* key_range = &sorted_key_range_kernel;
    GSQ_LAUNCH(key_range, 1, kThreadsPerRowKernel, stream, codebook, num_codes, l2_normalize, eps_f,
               w.range);
  }
  auto* code_keys = &sorted_code_keys_kernel;
  GSQ_LAUNCH(code_keys, blocks_for(num_codes, kThreadsPerRowKernel), kThreadsPerRowKernel, stream,
             codebook, num_codes, dim, l2_normalize, eps_f, w.range, w.keys, w.codes);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const int64_t max_buckets = sorted_max_buckets(num_codes);
  status = sort_pairs(w.keys, w.sorted_keys, w.codes, w.sorted_codes, num_codes, max_buckets + 2,
                      w.sort_scratch, w.sort_scratch_bytes, stream);
  if (status != cudaSuccess) return status;
  auto* starts = &bucket_start_kernel;
  GSQ_LAUNCH(starts, blocks_for(max_buckets + 2, kThreadsPerRowKernel), kThreadsPerRowKernel,
             stream, reinterpret_cast<const int64_t*>(w.sorted_keys), num_codes, max_buckets + 1,
             w.bucket_start);
  auto* members = &sorted_members_kernel;
  GSQ_LAUNCH(members, blocks_for(num_codes, kThreadsPerRowKernel), kThreadsPerRowKernel, stream,
             codebook, num_codes, dim, l2_normalize, eps_f, w.sorted_codes, w.members,
             w.member_codes);
  auto* search = &sorted_search_kernel;
  GSQ_LAUNCH(search, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel, stream, z,
             num_rows, dim, l2_normalize, eps_f, num_codes, w.range, w.bucket_start, w.members,
             w.member_codes, indices);
  return cudaGetLastError();
}

}  // namespace gsq_cuda
