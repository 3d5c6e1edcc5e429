// CUDA kernels for Grouped Spherical Quantization: the fused lookup and the straight-through
// backward. Only CUDA headers here (raw pointers, a stream): nvcc compiles this file in seconds;
// the torch glue is gsq_cuda.cpp. The same source also compiles as plain C++ against
// gsq_cuda_emulation.h, which runs every block's threads as CPU threads, so CI tests this logic
// on machines without a GPU (tests/test_cuda_kernels_emulated.py).
//
// Math (GSQ.md section 1), per group vector z_i of d values:
//   n_i   = z_i / max(||z_i||, eps)                     (l2 on; n_i = z_i when off)
//   idx_i = argmax_j <n_i, codes_j> + bias_j            (codes/bias: see prepare_codebook)
//   quantized_i = c_idx (raw row);  loss_rows_i = (1 + beta) ||c_idx - n_i||^2
// Backward, with g_i = dL/dquantized_i and w_i = dL/dloss_rows_i:
//   dL/dn_i  = g_i + 2 beta w_i (n_i - c_i)
//   dL/dz_i  = (dL/dn_i - n_i <n_i, dL/dn_i>) / ||z_i||  (l2 on, ||z_i|| >= eps)
//            = dL/dn_i / eps  (l2 on, ||z_i|| < eps);  dL/dn_i  (l2 off)
//   dL/dC_j  = sum over i with idx_i = j of 2 w_i (c_j - n_i)
//
// Lookup kernels (never form the M x V score matrix; ties go to the lowest index; a row holding
// NaN/inf gets index 0, set by zero_non_finite_rows_kernel afterwards):
// - lookup_small_d_kernel (d in {1, 2, 3, 4, 8}): each thread owns kRowsPerThread rows, normalized
//   in registers; the block streams the codebook through shared memory in tiles of kTileCodes
//   codes, which every thread reads by broadcast. Per code a thread does d FMAs and one max per
//   row; only when a tile's maximum beats a row's best so far (O(log V) times on random data) is
//   the tile re-scored code by code, in index order with a strict '>', to find which code won.
//   Both passes call score_code, so a code's score is bitwise the same in both.
// - lookup_tiled_kernel (any other d, up to 256 and beyond): a GEMM-shaped tile of kTiledRows rows
//   x kTiledCodes codes per block, K staged through shared memory in chunks of kTiledK; warp w owns
//   kRowsPerWarp rows, lane l owns kCodesPerLane consecutive codes, so each thread holds an
//   8 x 4 tile of scores in registers. Per tile and row: a warp-shuffle max; only if it beats
//   the row's best does a second shuffle find the lowest index holding it. Exact float32 FMAs: TF32
//   tensor cores round operands to 10 mantissa bits and would change winners far from any tie.
// - lookup_double_kernel: float64 (gradcheck), one thread per row, straight from global memory.
//
// Codebook gradient: deterministic, no float atomics. Rows are sorted by code with a stable radix
// sort (cub), each code's segment located by binary search, and one warp per code sums its rows
// in a fixed order (lanes split dimensions and a fixed number of row sub-streams, combined by a
// fixed shuffle tree). Same bits run to run, whatever the launch order.
//
// Checking on a GPU (compute-sanitizer ships with the CUDA toolkit):
//   compute-sanitizer --tool memcheck  python -m pytest -q tests/test_cuda_backend.py -x
//   compute-sanitizer --tool racecheck python -m pytest -q tests/test_cuda_backend.py -x -k "parity"
//   compute-sanitizer --tool initcheck python -m pytest -q tests/test_cuda_backend.py -x -k "parity"
#include "gsq_cuda_kernels.h"

#include <math.h>

#if !defined(GSQ_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/device/device_radix_sort.cuh>
#define GSQ_LAUNCH(kernel, blocks, threads, stream, ...) \
  kernel<<<(blocks), (threads), 0, (stream)>>>(__VA_ARGS__)
#else
#include <algorithm>
#include <utility>
#include <vector>
#define GSQ_LAUNCH(kernel, blocks, threads, stream, ...) \
  gsq_emu::launch((blocks), (threads), [=] { kernel(__VA_ARGS__); })
#endif

namespace gsq_cuda {
namespace {

constexpr int kThreadsPerRowKernel = 256;  // thread-per-row kernels (gather, normalize, backward)

constexpr int kSmallThreads = 128;
constexpr int kRowsPerThread = 2;
constexpr int kTileCodes = 256;

constexpr int kTiledWarps = 8;
constexpr int kTiledRows = 64;
constexpr int kRowsPerWarp = kTiledRows / kTiledWarps;  // 8
constexpr int kTiledCodes = 128;
constexpr int kCodesPerLane = kTiledCodes / 32;  // 4
constexpr int kTiledK = 16;
static_assert(kTiledRows % kTiledWarps == 0 && kTiledCodes % 32 == 0, "tile shape");

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
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ T negative_infinity() {
  return -static_cast<T>(INFINITY);
}

// n = z / max(||z||, eps) (or z); returns ||z||. `out` has d entries.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t normalize_row(const scalar_t* z, int d, acc_t eps, bool l2_normalize,
                                               acc_t* out) {
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

// bias + sum_k code[k] * n[k], in this order, with explicit FMAs.
template <int D>
__device__ __forceinline__ float score_code(const float* code, float bias, const float* n) {
  float s = bias;
#pragma unroll
  for (int k = 0; k < D; ++k) s = fmaf(code[k], n[k], s);
  return s;
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kSmallThreads)
    lookup_small_d_kernel(const scalar_t* z, const float* codes, const float* bias, int64_t num_rows,
                          int64_t num_codes, float eps, bool l2_normalize, int64_t* indices) {
  __shared__ float tile_codes[kTileCodes * D];
  __shared__ float tile_bias[kTileCodes];

  float n[kRowsPerThread][D];
  float best[kRowsPerThread];
  int64_t best_idx[kRowsPerThread];
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kSmallThreads * kRowsPerThread;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t row = first_row + r * kSmallThreads + threadIdx.x;
    if (row < num_rows) {
      normalize_fixed_row<D>(z + row * D, eps, l2_normalize, n[r]);
    } else {
      for (int k = 0; k < D; ++k) n[r][k] = 0.f;  // padding row: scored, never written
    }
    best[r] = negative_infinity<float>();
    best_idx[r] = 0;
  }

  for (int64_t v0 = 0; v0 < num_codes; v0 += kTileCodes) {
    __syncthreads();  // the previous tile is no longer read
    for (int t = threadIdx.x; t < kTileCodes * D; t += kSmallThreads) {
      const int64_t code = v0 + t / D;
      tile_codes[t] = code < num_codes ? codes[v0 * D + t] : 0.f;
    }
    for (int t = threadIdx.x; t < kTileCodes; t += kSmallThreads) {
      tile_bias[t] = v0 + t < num_codes ? bias[v0 + t] : negative_infinity<float>();
    }
    __syncthreads();

    float tile_max[kRowsPerThread];
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) tile_max[r] = negative_infinity<float>();
    for (int j = 0; j < kTileCodes; ++j) {
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        // fmaxf drops NaN: a NaN score (non-finite row) never wins, so such rows keep index 0.
        tile_max[r] = fmaxf(tile_max[r], score_code<D>(tile_codes + j * D, tile_bias[j], n[r]));
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      if (tile_max[r] > best[r]) {
        for (int j = 0; j < kTileCodes; ++j) {
          const float s = score_code<D>(tile_codes + j * D, tile_bias[j], n[r]);
          if (s > best[r]) {
            best[r] = s;
            best_idx[r] = v0 + j;
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t row = first_row + r * kSmallThreads + threadIdx.x;
    if (row < num_rows) indices[row] = best_idx[r];
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

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ int64_t warp_min(int64_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int64_t other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other < v ? other : v;
  }
  return v;
}

__global__ void __launch_bounds__(kTiledWarps * 32)
    lookup_tiled_kernel(const float* n, const float* codes, const float* bias, int64_t num_rows,
                        int64_t num_codes, int d, int64_t* indices) {
  __shared__ float rows_s[kTiledRows][kTiledK];
  __shared__ float codes_s[kTiledK][kTiledCodes + 4];  // +4: rows stay 16-byte aligned, fewer conflicts
  __shared__ float bias_s[kTiledCodes];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kTiledRows;

  float best[kRowsPerWarp];
  int64_t best_idx[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    best[i] = negative_infinity<float>();
    best_idx[i] = 0;
  }

  for (int64_t v0 = 0; v0 < num_codes; v0 += kTiledCodes) {
    float acc[kRowsPerWarp][kCodesPerLane];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
      for (int c = 0; c < kCodesPerLane; ++c) acc[i][c] = 0.f;
    }
    for (int k0 = 0; k0 < d; k0 += kTiledK) {
      __syncthreads();  // everyone is done reading the previous chunk (and tile's bias)
      for (int t = threadIdx.x; t < kTiledRows * kTiledK; t += kTiledWarps * 32) {
        const int r = t / kTiledK, kk = t % kTiledK;
        const int64_t row = first_row + r;
        const int k = k0 + kk;
        rows_s[r][kk] = (row < num_rows && k < d) ? n[row * d + k] : 0.f;
      }
      for (int t = threadIdx.x; t < kTiledCodes * kTiledK; t += kTiledWarps * 32) {
        const int j = t / kTiledK, kk = t % kTiledK;
        const int64_t code = v0 + j;
        const int k = k0 + kk;
        codes_s[kk][j] = (code < num_codes && k < d) ? codes[code * d + k] : 0.f;
      }
      if (k0 == 0) {
        for (int t = threadIdx.x; t < kTiledCodes; t += kTiledWarps * 32) {
          bias_s[t] = v0 + t < num_codes ? bias[v0 + t] : negative_infinity<float>();
        }
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTiledK; ++kk) {
        float a[kRowsPerWarp];
        float b[kCodesPerLane];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) a[i] = rows_s[warp * kRowsPerWarp + i][kk];
#pragma unroll
        for (int c = 0; c < kCodesPerLane; ++c) b[c] = codes_s[kk][lane * kCodesPerLane + c];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
          for (int c = 0; c < kCodesPerLane; ++c) acc[i][c] = fmaf(a[i], b[c], acc[i][c]);
        }
      }
    }
    // Every lane reaches the shuffles below with the same values of tile_max and best[i], so the
    // branch is warp-uniform and the second shuffle runs with the whole warp.
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      float s[kCodesPerLane];
      float local = negative_infinity<float>();
#pragma unroll
      for (int c = 0; c < kCodesPerLane; ++c) {
        s[c] = acc[i][c] + bias_s[lane * kCodesPerLane + c];
        local = fmaxf(local, s[c]);
      }
      const float tile_max = warp_max(local);
      if (tile_max > best[i]) {
        int64_t candidate = INT64_MAX;
#pragma unroll
        for (int c = kCodesPerLane - 1; c >= 0; --c) {
          if (s[c] == tile_max) candidate = v0 + lane * kCodesPerLane + c;  // lowest c wins
        }
        best[i] = tile_max;
        best_idx[i] = warp_min(candidate);
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t row = first_row + warp * kRowsPerWarp + i;
      if (row < num_rows) indices[row] = best_idx[i];
    }
  }
}

// float64 latents (gradcheck): one thread per row, codes read from global memory in index order.
__global__ void lookup_double_kernel(const double* z, const double* codes, const double* bias,
                                     int64_t num_rows, int64_t num_codes, int d, double eps,
                                     bool l2_normalize, double* n_scratch, int64_t* indices) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  double* n = n_scratch + row * d;
  normalize_row<double, double>(z + row * d, d, eps, l2_normalize, n);
  double best = negative_infinity<double>();
  int64_t best_idx = 0;
  for (int64_t j = 0; j < num_codes; ++j) {
    double s = bias[j];
    for (int k = 0; k < d; ++k) s = fma(codes[j * d + k], n[k], s);
    if (s > best) {
      best = s;
      best_idx = j;
    }
  }
  indices[row] = best_idx;
}

template <typename scalar_t, typename acc_t>
__global__ void gather_codes_kernel(const scalar_t* z, const acc_t* codebook, const int64_t* indices,
                                    int64_t num_rows, int d, acc_t eps, bool l2_normalize,
                                    acc_t loss_scale, scalar_t* quantized, acc_t* loss_rows) {
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

// A row holding NaN/inf has no nearest code; every backend gives it index 0.
template <typename scalar_t>
__global__ void zero_non_finite_rows_kernel(const scalar_t* z, int64_t num_rows, int d, int64_t* indices) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= num_rows) return;
  bool finite = true;
  for (int k = 0; k < d; ++k) finite = finite && isfinite(to_acc(z[row * d + k]));
  if (!finite) indices[row] = 0;
}

__global__ void iota_kernel(int64_t* values, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) values[i] = i;
}

// bucket_start[j] = first position p with sorted_codes[p] >= j, for j in [0, V].
__global__ void bucket_start_kernel(const int64_t* sorted_codes, int64_t num_rows, int64_t num_codes,
                                    int64_t* bucket_start) {
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

// One warp per code. Lane l covers dimension k0 + l % lanes_per_row of row sub-stream
// l / lanes_per_row; sub-streams take every streams-th row of the code's (sorted) rows and are
// combined by a fixed xor-shuffle tree: the summation order never depends on scheduling.
template <typename acc_t>
__global__ void codebook_grad_kernel(const acc_t* n, const acc_t* grad_loss_rows, const acc_t* codebook,
                                     const int64_t* rows_by_code, const int64_t* bucket_start,
                                     int64_t num_codes, int d, acc_t* grad_codebook) {
  const int64_t code = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (code >= num_codes) return;  // whole warps leave together
  int lanes_per_row = 1;
  while (lanes_per_row < d && lanes_per_row < 32) lanes_per_row <<= 1;
  const int streams = 32 / lanes_per_row;
  const int stream = lane / lanes_per_row;
  const int64_t begin = bucket_start[code], end = bucket_start[code + 1];
  for (int k0 = 0; k0 < d; k0 += lanes_per_row) {
    const int k = k0 + lane % lanes_per_row;
    const acc_t c_k = k < d ? codebook[code * d + k] : acc_t(0);
    acc_t sum = 0;
    if (k < d) {
      for (int64_t p = begin + stream; p < end; p += streams) {
        const int64_t row = rows_by_code[p];
        sum += grad_loss_rows[row] * (c_k - n[row * d + k]);
      }
    }
    for (int offset = lanes_per_row; offset < 32; offset <<= 1) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (stream == 0 && k < d) grad_codebook[code * d + k] = 2 * sum;
  }
}

inline int blocks_for(int64_t items, int threads) {
  return static_cast<int>((items + threads - 1) / threads);
}

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

template <typename scalar_t>
cudaError_t zero_non_finite_rows(const scalar_t* z, int64_t num_rows, int d, int64_t* indices,
                                 cudaStream_t stream) {
  auto* kernel = &zero_non_finite_rows_kernel<scalar_t>;
  GSQ_LAUNCH(kernel, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel, stream, z, num_rows, d,
             indices);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t lookup_rows(const scalar_t* z, int64_t num_rows, int d, const float* codes, const float* bias,
                        int64_t num_codes, float eps, bool l2_normalize, float* n_scratch,
                        int64_t* indices, cudaStream_t stream);

template <typename scalar_t>
cudaError_t lookup_typed(const scalar_t* z, int64_t num_rows, int d, const float* codes, const float* bias,
                         int64_t num_codes, float eps, bool l2_normalize, float* n_scratch,
                         int64_t* indices, cudaStream_t stream) {
  const cudaError_t status = lookup_rows(z, num_rows, d, codes, bias, num_codes, eps, l2_normalize, n_scratch,
                                         indices, stream);
  if (status != cudaSuccess) return status;
  return zero_non_finite_rows(z, num_rows, d, indices, stream);
}

template <typename scalar_t>
cudaError_t lookup_rows(const scalar_t* z, int64_t num_rows, int d, const float* codes, const float* bias,
                        int64_t num_codes, float eps, bool l2_normalize, float* n_scratch,
                        int64_t* indices, cudaStream_t stream) {
  const int rows_per_block = kSmallThreads * kRowsPerThread;
  const int small_blocks = blocks_for(num_rows, rows_per_block);
#define GSQ_SMALL_D_CASE(D)                                                                      \
  case D: {                                                                                      \
    auto* kernel = &lookup_small_d_kernel<scalar_t, D>;                                          \
    GSQ_LAUNCH(kernel, small_blocks, kSmallThreads, stream, z, codes, bias, num_rows, num_codes, \
               eps, l2_normalize, indices);                                                      \
    return cudaGetLastError();                                                                   \
  }
  switch (d) {
    GSQ_SMALL_D_CASE(1)
    GSQ_SMALL_D_CASE(2)
    GSQ_SMALL_D_CASE(3)
    GSQ_SMALL_D_CASE(4)
    GSQ_SMALL_D_CASE(8)
    default:
      break;
  }
#undef GSQ_SMALL_D_CASE
  auto* normalize = &normalize_rows_kernel<scalar_t, float>;
  GSQ_LAUNCH(normalize, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel, stream, z,
             num_rows, d, eps, l2_normalize, n_scratch, static_cast<float*>(nullptr));
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  auto* tiled = &lookup_tiled_kernel;
  GSQ_LAUNCH(tiled, blocks_for(num_rows, kTiledRows), kTiledWarps * 32, stream, n_scratch, codes, bias,
             num_rows, num_codes, d, indices);
  return cudaGetLastError();
}

bool uses_tiled_path(int d) { return !(d == 1 || d == 2 || d == 3 || d == 4 || d == 8); }

template <typename scalar_t>
cudaError_t gather_typed(const scalar_t* z, const void* codebook, const int64_t* indices, int64_t num_rows,
                         int d, double eps, bool l2_normalize, double loss_scale, void* quantized,
                         void* loss_rows, cudaStream_t stream) {
  typedef typename Acc<scalar_t>::type acc_t;
  auto* kernel = &gather_codes_kernel<scalar_t, acc_t>;
  GSQ_LAUNCH(kernel, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel, stream, z,
             static_cast<const acc_t*>(codebook), indices, num_rows, d, static_cast<acc_t>(eps),
             l2_normalize, static_cast<acc_t>(loss_scale), static_cast<scalar_t*>(quantized),
             static_cast<acc_t*>(loss_rows));
  return cudaGetLastError();
}

struct BackwardWorkspace {
  void* n;
  void* norms;
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
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const unsigned long long*>(nullptr),
                                  static_cast<unsigned long long*>(nullptr),
                                  static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                  static_cast<int>(num_rows), 0, key_bits(num_codes));
  return bytes;
#endif
}

BackwardWorkspace carve_workspace(void* base, int64_t num_rows, int64_t num_codes, int d, size_t acc_size) {
  BackwardWorkspace w{};
  char* p = static_cast<char*>(base);
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    char* out = p == nullptr ? nullptr : p + offset;
    offset += align_up(bytes);
    return out;
  };
  w.n = take(static_cast<size_t>(num_rows) * d * acc_size);
  w.norms = take(static_cast<size_t>(num_rows) * acc_size);
  w.sorted_codes = reinterpret_cast<int64_t*>(take(static_cast<size_t>(num_rows) * 8));
  w.row_ids = reinterpret_cast<int64_t*>(take(static_cast<size_t>(num_rows) * 8));
  w.rows_by_code = reinterpret_cast<int64_t*>(take(static_cast<size_t>(num_rows) * 8));
  w.bucket_start = reinterpret_cast<int64_t*>(take(static_cast<size_t>(num_codes + 1) * 8));
  w.sort_scratch_bytes = sort_scratch_bytes(num_rows, num_codes);
  w.sort_scratch = take(w.sort_scratch_bytes);
  w.total_bytes = offset;
  return w;
}

cudaError_t sort_rows_by_code(const int64_t* indices, const BackwardWorkspace& w, int64_t num_rows,
                              int64_t num_codes, cudaStream_t stream) {
  auto* iota = &iota_kernel;
  GSQ_LAUNCH(iota, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel, stream, w.row_ids,
             num_rows);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
#if defined(GSQ_CUDA_EMULATION)
  // Emulation: the stable sort cub's radix sort performs, on the host.
  std::vector<std::pair<int64_t, int64_t>> pairs(num_rows);
  for (int64_t i = 0; i < num_rows; ++i) pairs[i] = {indices[i], w.row_ids[i]};
  std::stable_sort(pairs.begin(), pairs.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  for (int64_t i = 0; i < num_rows; ++i) {
    w.sorted_codes[i] = pairs[i].first;
    w.rows_by_code[i] = pairs[i].second;
  }
#else
  size_t bytes = w.sort_scratch_bytes;
  // Radix sort is stable: each code's rows stay in increasing row order.
  status = cub::DeviceRadixSort::SortPairs(
      w.sort_scratch, bytes, reinterpret_cast<const unsigned long long*>(indices),
      reinterpret_cast<unsigned long long*>(w.sorted_codes), w.row_ids, w.rows_by_code,
      static_cast<int>(num_rows), 0, key_bits(num_codes), stream);
  if (status != cudaSuccess) return status;
#endif
  auto* starts = &bucket_start_kernel;
  GSQ_LAUNCH(starts, blocks_for(num_codes + 1, kThreadsPerRowKernel), kThreadsPerRowKernel, stream,
             w.sorted_codes, num_rows, num_codes, w.bucket_start);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_typed(const scalar_t* z, const scalar_t* grad_quantized, const void* grad_loss_rows,
                           const void* codebook, const int64_t* indices, int64_t num_rows,
                           int64_t num_codes, int d, double beta, double eps, bool l2_normalize,
                           void* workspace, scalar_t* grad_z, void* grad_codebook, cudaStream_t stream) {
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
    GSQ_LAUNCH(grad_rows, row_blocks, kThreadsPerRowKernel, stream, n, norms, grad_quantized, gl, cb,
               indices, num_rows, d, static_cast<acc_t>(beta), static_cast<acc_t>(eps), l2_normalize,
               grad_z);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
    if ((status = sort_rows_by_code(indices, w, num_rows, num_codes, stream)) != cudaSuccess) return status;
  } else {
    // No rows: every bucket is empty.
    auto* starts = &bucket_start_kernel;
    GSQ_LAUNCH(starts, blocks_for(num_codes + 1, kThreadsPerRowKernel), kThreadsPerRowKernel, stream,
               w.sorted_codes, int64_t(0), num_codes, w.bucket_start);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  auto* grad_codes = &codebook_grad_kernel<acc_t>;
  GSQ_LAUNCH(grad_codes, blocks_for(num_codes * 32, kThreadsPerRowKernel), kThreadsPerRowKernel, stream, n,
             gl, cb, w.rows_by_code, w.bucket_start, num_codes, d, static_cast<acc_t*>(grad_codebook));
  return cudaGetLastError();
}

}  // namespace

cudaError_t prepare_codebook(const void* codebook, bool is_double, int64_t num_codes, int dim, double eps,
                             bool l2_normalize, void* codes, void* bias, cudaStream_t stream) {
  const int blocks = blocks_for(num_codes, kThreadsPerRowKernel);
  if (is_double) {
    auto* kernel = &prepare_codebook_kernel<double>;
    GSQ_LAUNCH(kernel, blocks, kThreadsPerRowKernel, stream, static_cast<const double*>(codebook), num_codes,
               dim, eps, l2_normalize, static_cast<double*>(codes), static_cast<double*>(bias));
  } else {
    auto* kernel = &prepare_codebook_kernel<float>;
    GSQ_LAUNCH(kernel, blocks, kThreadsPerRowKernel, stream, static_cast<const float*>(codebook), num_codes,
               dim, static_cast<float>(eps), l2_normalize, static_cast<float*>(codes),
               static_cast<float*>(bias));
  }
  return cudaGetLastError();
}

size_t lookup_workspace_bytes(int64_t num_rows, int dim, DType dtype) {
  if (dtype == DType::kFloat64) return static_cast<size_t>(num_rows) * dim * sizeof(double);
  return uses_tiled_path(dim) ? static_cast<size_t>(num_rows) * dim * sizeof(float) : 0;
}

cudaError_t lookup(const void* z, DType dtype, int64_t num_rows, int dim, const void* codes, const void* bias,
                   int64_t num_codes, double eps, bool l2_normalize, void* workspace, int64_t* indices,
                   cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  const float* codes_f = static_cast<const float*>(codes);
  const float* bias_f = static_cast<const float*>(bias);
  float* scratch = static_cast<float*>(workspace);
  const float eps_f = static_cast<float>(eps);
  switch (dtype) {
    case DType::kFloat32:
      return lookup_typed(static_cast<const float*>(z), num_rows, dim, codes_f, bias_f, num_codes, eps_f,
                          l2_normalize, scratch, indices, stream);
    case DType::kFloat16:
      return lookup_typed(static_cast<const __half*>(z), num_rows, dim, codes_f, bias_f, num_codes, eps_f,
                          l2_normalize, scratch, indices, stream);
    case DType::kBFloat16:
      return lookup_typed(static_cast<const __nv_bfloat16*>(z), num_rows, dim, codes_f, bias_f, num_codes,
                          eps_f, l2_normalize, scratch, indices, stream);
    case DType::kFloat64: {
      auto* kernel = &lookup_double_kernel;
      GSQ_LAUNCH(kernel, blocks_for(num_rows, kThreadsPerRowKernel), kThreadsPerRowKernel, stream,
                 static_cast<const double*>(z), static_cast<const double*>(codes),
                 static_cast<const double*>(bias), num_rows, num_codes, dim, eps, l2_normalize,
                 static_cast<double*>(workspace), indices);
      const cudaError_t status = cudaGetLastError();
      if (status != cudaSuccess) return status;
      return zero_non_finite_rows(static_cast<const double*>(z), num_rows, dim, indices, stream);
    }
  }
  return cudaErrorInvalidValue;
}

cudaError_t gather_codes(const void* z, DType dtype, const void* codebook, const int64_t* indices,
                         int64_t num_rows, int dim, double eps, bool l2_normalize, double loss_scale,
                         void* quantized, void* loss_rows, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return gather_typed(static_cast<const float*>(z), codebook, indices, num_rows, dim, eps, l2_normalize,
                          loss_scale, quantized, loss_rows, stream);
    case DType::kFloat16:
      return gather_typed(static_cast<const __half*>(z), codebook, indices, num_rows, dim, eps, l2_normalize,
                          loss_scale, quantized, loss_rows, stream);
    case DType::kBFloat16:
      return gather_typed(static_cast<const __nv_bfloat16*>(z), codebook, indices, num_rows, dim, eps,
                          l2_normalize, loss_scale, quantized, loss_rows, stream);
    case DType::kFloat64:
      return gather_typed(static_cast<const double*>(z), codebook, indices, num_rows, dim, eps, l2_normalize,
                          loss_scale, quantized, loss_rows, stream);
  }
  return cudaErrorInvalidValue;
}

size_t backward_workspace_bytes(int64_t num_rows, int64_t num_codes, int dim, DType dtype) {
  const size_t acc_size = dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  return carve_workspace(nullptr, num_rows, num_codes, dim, acc_size).total_bytes;
}

cudaError_t backward(const void* z, const void* grad_quantized, DType dtype, const void* grad_loss_rows,
                     const void* codebook, const int64_t* indices, int64_t num_rows, int64_t num_codes,
                     int dim, double beta, double eps, bool l2_normalize, void* workspace,
                     size_t workspace_bytes, void* grad_z, void* grad_codebook, cudaStream_t stream) {
  if (workspace_bytes < backward_workspace_bytes(num_rows, num_codes, dim, dtype)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed(static_cast<const float*>(z), static_cast<const float*>(grad_quantized),
                            grad_loss_rows, codebook, indices, num_rows, num_codes, dim, beta, eps,
                            l2_normalize, workspace, static_cast<float*>(grad_z), grad_codebook, stream);
    case DType::kFloat16:
      return backward_typed(static_cast<const __half*>(z), static_cast<const __half*>(grad_quantized),
                            grad_loss_rows, codebook, indices, num_rows, num_codes, dim, beta, eps,
                            l2_normalize, workspace, static_cast<__half*>(grad_z), grad_codebook, stream);
    case DType::kBFloat16:
      return backward_typed(static_cast<const __nv_bfloat16*>(z),
                            static_cast<const __nv_bfloat16*>(grad_quantized), grad_loss_rows, codebook,
                            indices, num_rows, num_codes, dim, beta, eps, l2_normalize, workspace,
                            static_cast<__nv_bfloat16*>(grad_z), grad_codebook, stream);
    case DType::kFloat64:
      return backward_typed(static_cast<const double*>(z), static_cast<const double*>(grad_quantized),
                            grad_loss_rows, codebook, indices, num_rows, num_codes, dim, beta, eps,
                            l2_normalize, workspace, static_cast<double*>(grad_z), grad_codebook, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gsq_cuda
