// The GSQ forward on the CPU, written once and compiled once per instruction set: each
// gsq_cpu_isa_*.cpp defines GSQ_CPU_ISA (a namespace) and GSQ_CPU_LANES_F32 (floats per SIMD
// register), sets its target, and includes this file. No torch or standard-library headers here
// (see gsq_cpu_kernels.h for why).
//
// Math, per group vector z (one row of d values):
//   n      = z / max(||z||, eps)                 (l2 on; n = z when off)
//   idx    = argmax_j  <n, code_j> + bias_j      (ties: the lowest j; see gsq_cpu_kernels.h;
//                                                 0 for a row holding NaN/inf)
//   out    = c_idx                               (the raw codebook row)
//   loss_r = (1 + beta) ||c_idx - n||^2          (summed and divided by N*d by the caller)
//
// Loop structure: rows are taken in blocks of kRowsPerBlock whose normalized vectors stay in L1;
// the codebook streams past them in L2-sized blocks; inside, kRowsPerGroup rows at a time score one
// tile of `lanes` codes with d broadcast-FMAs each (the tile's k-th register holds coordinate k of
// its codes). The running argmax is kept lazily: a chunk of kChunkTiles tiles only updates a
// lane-wise maximum (one max per tile, on a different port than the FMAs); if that maximum beats
// the row's best so far, the chunk is re-scored code by code in index order with a strict '>',
// which keeps the lowest index on ties. On random data a row beats its best O(log V) times, so the
// re-scoring costs a few percent; the N x V score matrix is never formed.
#ifndef GSQ_CPU_ISA
#error "define GSQ_CPU_ISA before including gsq_cpu_kernels_impl.h"
#endif

#include "gsq_cpu_kernels.h"

#if defined(GSQ_CPU_ISA_X86_AVX512) || defined(GSQ_CPU_ISA_X86_AVX2)
#include <immintrin.h>  // only static always-inline intrinsics: safe to include per ISA
#endif

namespace gsq_cpu {
namespace GSQ_CPU_ISA {

// 4 rows x 8-tile chunks measured fastest on a Zen 4 (AVX-512) among rows {4, 8} x chunks {8, 16}
// for d in {2, 4, 8, 16}: 8 rows run out of registers for small d and spill.
constexpr int kRowsPerGroup = 4;
constexpr int kRowsPerBlock = 64;
static_assert(kRowsPerBlock % kRowsPerGroup == 0, "row blocks are padded to whole row groups");
constexpr index_t kCodebookBlockBytes = 256 * 1024;
constexpr index_t kChunkTiles = 8;

template <typename T>
static inline T square_root(T x);
template <>
inline float square_root<float>(float x) { return __builtin_sqrtf(x); }
template <>
inline double square_root<double>(double x) { return __builtin_sqrt(x); }

template <typename T>
static inline T negative_infinity() { return -static_cast<T>(__builtin_inf()); }

static inline index_t min_index(index_t a, index_t b) { return a < b ? a : b; }

template <typename T, int W>
struct Simd {
  typedef T vec __attribute__((vector_size(W * sizeof(T))));
  static inline vec load(const T* p) {
    vec v;
    __builtin_memcpy(&v, p, sizeof(vec));
    return v;
  }
  static inline vec splat(T x) { return vec{} + x; }
  // Same NaN behaviour as x86 max: a NaN score never replaces a number.
  static inline vec max(vec a, vec b) { return a > b ? a : b; }
  // Is any lane of a greater than b? Once per chunk and row, so it must not cost a tile's worth of
  // instructions: a compare into a mask register (AVX-512) or a movemask (AVX2), else a lane loop.
  static inline bool any_greater(vec a, T b) {
#if defined(GSQ_CPU_ISA_X86_AVX512)
    if constexpr (sizeof(T) == 4 && W == 16) {
      return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(a), _mm512_set1_ps(b), _CMP_GT_OQ) != 0;
    }
#endif
#if defined(GSQ_CPU_ISA_X86_AVX2)
    if constexpr (sizeof(T) == 4 && W == 8) {
      return _mm256_movemask_ps(_mm256_cmp_ps(reinterpret_cast<__m256>(a), _mm256_set1_ps(b),
                                              _CMP_GT_OQ)) != 0;
    }
#endif
    const auto mask = a > b;
    long any = 0;
    for (int i = 0; i < W; ++i) any |= mask[i];
    return any != 0;
  }
};

// n = z / max(||z||, eps), or a copy of z when l2 is off.
template <typename T>
static inline void normalize_row(const T* z, int d, T eps, bool l2_normalize, T* n) {
  if (!l2_normalize) {
    for (int k = 0; k < d; ++k) n[k] = z[k];
    return;
  }
  T sum_squares = 0;
  for (int k = 0; k < d; ++k) sum_squares += z[k] * z[k];
  const T norm = square_root(sum_squares);
  const T denom = norm > eps ? norm : eps;
  for (int k = 0; k < d; ++k) n[k] = z[k] / denom;
}

// acc[r] = bias + sum_k tile[k] * rows[r][k] for the R rows; D > 0 fixes d at compile time.
// Both the batched scan and the re-scoring call this, so a code's score is bitwise the same in both.
template <typename T, int W, int D, int R>
static inline void score_tile(const T* tile, const T* bias, const T* rows, int dim,
                              typename Simd<T, W>::vec* acc) {
  typedef Simd<T, W> S;
  const int d = D > 0 ? D : dim;
  const typename S::vec b = S::load(bias);
  for (int r = 0; r < R; ++r) acc[r] = b;
  for (int k = 0; k < d; ++k) {
    const typename S::vec c = S::load(tile + k * W);
    for (int r = 0; r < R; ++r) acc[r] += c * rows[r * d + k];
  }
}

// Re-scores tiles [c0, c1) for one row, updating (best, best_idx) in code order with a strict '>'.
template <typename T, int W, int D>
static void rescore_chunk(const T* row, int dim, const T* tiles, const T* bias, index_t c0,
                          index_t c1, T* best, int64_t* best_idx) {
  const int d = D > 0 ? D : dim;
  const index_t tile_stride = static_cast<index_t>(d) * W;
  for (index_t t = c0; t < c1; ++t) {
    typename Simd<T, W>::vec acc[1];
    score_tile<T, W, D, 1>(tiles + t * tile_stride, bias + t * W, row, d, acc);
    for (int lane = 0; lane < W; ++lane) {
      if (acc[0][lane] > *best) {
        *best = acc[0][lane];
        *best_idx = t * W + lane;
      }
    }
  }
}

// Updates the running (best, best_idx) of R rows with tiles [tile_begin, tile_end).
template <typename T, int W, int D, int R>
static void scan_tiles(const T* rows, int dim, const T* tiles, const T* bias, index_t tile_begin,
                       index_t tile_end, T* best, int64_t* best_idx) {
  typedef Simd<T, W> S;
  const int d = D > 0 ? D : dim;
  const index_t tile_stride = static_cast<index_t>(d) * W;
  for (index_t c0 = tile_begin; c0 < tile_end; c0 += kChunkTiles) {
    const index_t c1 = min_index(c0 + kChunkTiles, tile_end);
    typename S::vec chunk_max[R];
    for (int r = 0; r < R; ++r) chunk_max[r] = S::splat(negative_infinity<T>());
    for (index_t t = c0; t < c1; ++t) {
      typename S::vec acc[R];
      score_tile<T, W, D, R>(tiles + t * tile_stride, bias + t * W, rows, d, acc);
      for (int r = 0; r < R; ++r) chunk_max[r] = S::max(chunk_max[r], acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      if (S::any_greater(chunk_max[r], best[r])) {
        rescore_chunk<T, W, D>(rows + r * d, d, tiles, bias, c0, c1, &best[r], &best_idx[r]);
      }
    }
  }
}

template <typename T, int W, int D>
static void forward_rows_fixed_dim(const T* z, int dim, const T* tiles, const T* bias,
                                   index_t num_tiles, const T* codebook, T eps, bool l2_normalize,
                                   T loss_scale, index_t row_begin, index_t row_end, T* quantized,
                                   int64_t* indices, T* loss_rows) {
  const int d = D > 0 ? D : dim;
  const index_t tile_bytes = static_cast<index_t>(d) * W * static_cast<index_t>(sizeof(T));
  index_t tiles_per_block = kCodebookBlockBytes / tile_bytes;
  if (tiles_per_block < 1) tiles_per_block = 1;

  T* rows = new T[static_cast<index_t>(kRowsPerBlock) * d];
  T best[kRowsPerBlock];
  int64_t best_idx[kRowsPerBlock];
  bool finite[kRowsPerBlock];

  for (index_t b0 = row_begin; b0 < row_end; b0 += kRowsPerBlock) {
    const int num_rows = static_cast<int>(min_index(kRowsPerBlock, row_end - b0));
    const int num_rows_padded = (num_rows + kRowsPerGroup - 1) / kRowsPerGroup * kRowsPerGroup;
    for (int i = 0; i < num_rows_padded; ++i) {
      best[i] = negative_infinity<T>();
      best_idx[i] = 0;
      finite[i] = true;
      if (i < num_rows) {
        const T* z_row = z + (b0 + i) * d;
        for (int k = 0; k < d; ++k) finite[i] &= __builtin_isfinite(z_row[k]) != 0;
        normalize_row(z_row, d, eps, l2_normalize, rows + i * d);
      } else {
        for (int k = 0; k < d; ++k) rows[i * d + k] = 0;  // padding rows: scored, then dropped
      }
    }
    for (index_t tb = 0; tb < num_tiles; tb += tiles_per_block) {
      const index_t te = min_index(tb + tiles_per_block, num_tiles);
      for (int g = 0; g < num_rows_padded; g += kRowsPerGroup) {
        scan_tiles<T, W, D, kRowsPerGroup>(rows + g * d, d, tiles, bias, tb, te, best + g,
                                           best_idx + g);
      }
    }
    for (int i = 0; i < num_rows; ++i) {
      const index_t row = b0 + i;
      // A row holding NaN/inf has no nearest code; every backend gives it index 0.
      const int64_t idx = finite[i] ? best_idx[i] : 0;
      indices[row] = idx;
      const T* code = codebook + idx * d;
      if (quantized != nullptr) {
        for (int k = 0; k < d; ++k) quantized[row * d + k] = code[k];
      }
      if (loss_rows != nullptr) {
        T sum_squares = 0;
        for (int k = 0; k < d; ++k) {
          const T diff = code[k] - rows[i * d + k];
          sum_squares += diff * diff;
        }
        loss_rows[row] = loss_scale * sum_squares;
      }
    }
  }
  delete[] rows;
}

template <typename T, int W>
static void forward_rows(const T* z, int dim, const T* tiles, const T* bias, index_t num_tiles,
                         const T* codebook, T eps, bool l2_normalize, T loss_scale,
                         index_t row_begin, index_t row_end, T* quantized, int64_t* indices,
                         T* loss_rows) {
#define GSQ_FORWARD_FOR_DIM(D)                                                                 \
  forward_rows_fixed_dim<T, W, D>(z, dim, tiles, bias, num_tiles, codebook, eps, l2_normalize, \
                                  loss_scale, row_begin, row_end, quantized, indices, loss_rows)
  // The paper's common group sizes get fully unrolled inner loops; any other d takes the loop.
  switch (dim) {
    case 1: GSQ_FORWARD_FOR_DIM(1); break;
    case 2: GSQ_FORWARD_FOR_DIM(2); break;
    case 3: GSQ_FORWARD_FOR_DIM(3); break;
    case 4: GSQ_FORWARD_FOR_DIM(4); break;
    case 8: GSQ_FORWARD_FOR_DIM(8); break;
    case 16: GSQ_FORWARD_FOR_DIM(16); break;
    default: GSQ_FORWARD_FOR_DIM(0); break;
  }
#undef GSQ_FORWARD_FOR_DIM
}

template <typename T, int W>
static void prepare_codebook(const T* codebook, index_t num_codes, int d, bool l2_normalize,
                             T eps, T* tiles, T* bias, index_t tile_begin, index_t tile_end) {
  for (index_t t = tile_begin; t < tile_end; ++t) {
    T* tile = tiles + t * d * W;
    for (int lane = 0; lane < W; ++lane) {
      const index_t j = t * W + lane;
      if (j >= num_codes) {
        for (int k = 0; k < d; ++k) tile[k * W + lane] = 0;
        bias[t * W + lane] = negative_infinity<T>();
        continue;
      }
      const T* code = codebook + j * d;
      T sum_squares = 0;
      for (int k = 0; k < d; ++k) sum_squares += code[k] * code[k];
      if (l2_normalize) {
        const T norm = square_root(sum_squares);
        const T denom = norm > eps ? norm : eps;
        for (int k = 0; k < d; ++k) tile[k * W + lane] = code[k] / denom;
        bias[t * W + lane] = 0;
      } else {
        for (int k = 0; k < d; ++k) tile[k * W + lane] = code[k];
        bias[t * W + lane] = -sum_squares / 2;
      }
    }
  }
}

template <typename T, int W>
struct Table {
  static const KernelTable<T> value;
};
template <typename T, int W>
const KernelTable<T> Table<T, W>::value = {GSQ_CPU_ISA_NAME, W, &prepare_codebook<T, W>,
                                           &forward_rows<T, W>};

}  // namespace GSQ_CPU_ISA
}  // namespace gsq_cpu
