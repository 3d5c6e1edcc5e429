// The GSQ forward on the CPU, written once and compiled once per instruction set: each
// gsq_cpu_isa_*.cpp sets its target, defines GSQ_CPU_ISA (the namespace its copy lives in),
// GSQ_CPU_ISA_NAME (the name gsq::cpu_isa reports) and, on x86, GSQ_CPU_ISA_X86_AVX2 or
// GSQ_CPU_ISA_X86_AVX512 (which intrinsics Simd may use), includes this file, and exports
// Table<T, W>::value, W being the lanes per tile (one SIMD register: 16 floats for avx512, 8 for
// avx2; 4 floats or 2 doubles for generic). No torch or standard-library headers here (see
// gsq_cpu_kernels.h for why).
//
// Math, per group vector z (one row of d values):
//   n      = z / max(||z||, eps)                 (l2 on; n = z when off)
//   s_j    = <n, code_j> + bias_j                (see gsq_cpu_kernels.h)
//   idx    = argmax_j s_j                        (ties: the lowest j; 0 for a row holding NaN/inf)
//   out    = c_idx                               (the raw codebook row)
//   loss_r = (1 + beta) ||c_idx - n||^2          (summed and divided by N*d by the caller)
//   gap    = s_idx - max_{j != idx} s_j          (nearest_code_with_gap only; 0 on a tie)
//
// Loop structure: rows are taken in blocks of kRowsPerBlock whose normalized vectors stay in L1;
// the codebook streams past them in L2-sized blocks; inside, kRowsPerGroup rows at a time score one
// tile of `lanes` codes with d broadcast-FMAs each (the tile's k-th register holds coordinate k of
// its codes). The running argmax is kept lazily: a chunk of kChunkTiles tiles only updates a
// lane-wise maximum (one max per tile, on a different port than the FMAs); if that maximum beats
// the row's best so far, the chunk is re-scored code by code in index order with a strict '>',
// which keeps the lowest index on ties. On random data a row beats its best O(log V) times, so the
// re-scoring costs a few percent; the N x V score matrix is never formed. The gap variant
// re-scores the same chunks, tracking the runner-up among their codes, and keeps a lane-wise
// maximum of the scores it skips: the runner-up is the larger of the two (see RunningTop).
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
inline float square_root<float>(float x) {
  return __builtin_sqrtf(x);
}
template <>
inline double square_root<double>(double x) {
  return __builtin_sqrt(x);
}

template <typename T>
static inline T negative_infinity() {
  return -static_cast<T>(__builtin_inf());
}

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
  // As x86 max: where either lane is NaN the result is b's, so a NaN passed as a never replaces
  // the number in b.
  static inline vec max(vec a, vec b) { return a > b ? a : b; }
  // Bit i set: lane i of a is greater than b (false for NaN). Once per chunk and row (and per
  // tile while re-scoring), so it must not cost a tile's worth of instructions: a compare into a
  // mask register (AVX-512) or a movemask (AVX2), else a lane loop.
  static inline unsigned greater_mask(vec a, T b) {
#if defined(GSQ_CPU_ISA_X86_AVX512)
    if constexpr (sizeof(T) == 4 && W == 16) {
      return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(a), _mm512_set1_ps(b), _CMP_GT_OQ);
    }
#endif
#if defined(GSQ_CPU_ISA_X86_AVX2)
    if constexpr (sizeof(T) == 4 && W == 8) {
      return static_cast<unsigned>(_mm256_movemask_ps(
          _mm256_cmp_ps(reinterpret_cast<__m256>(a), _mm256_set1_ps(b), _CMP_GT_OQ)));
    }
#endif
    const auto greater = a > b;
    unsigned mask = 0;
    for (int i = 0; i < W; ++i) mask |= (greater[i] != 0 ? 1u : 0u) << i;
    return mask;
  }
  static inline bool any_greater(vec a, T b) { return greater_mask(a, b) != 0; }
};

// n = z / max(||z||, eps), or a copy of z when l2 is off.
template <typename T>
static inline void normalize_row(const T* z, index_t d, T eps, bool l2_normalize, T* n) {
  if (!l2_normalize) {
    for (index_t k = 0; k < d; ++k) n[k] = z[k];
    return;
  }
  T sum_squares = 0;
  for (index_t k = 0; k < d; ++k) sum_squares += z[k] * z[k];
  const T norm = square_root(sum_squares);
  const T denom = norm > eps ? norm : eps;
  for (index_t k = 0; k < d; ++k) n[k] = z[k] / denom;
}

// acc[r] = bias + sum_k tile[k] * rows[r][k] for the R rows; D > 0 fixes d at compile time.
// Both the batched scan and the re-scoring call this, so a code's score is bitwise the same in
// both.
template <typename T, int W, int D, int R>
static inline void score_tile(const T* tile, const T* bias, const T* rows, int dim,
                              typename Simd<T, W>::vec* acc) {
  typedef Simd<T, W> S;
  const index_t d = D > 0 ? D : dim;
  const typename S::vec b = S::load(bias);
  for (int r = 0; r < R; ++r) acc[r] = b;
  for (index_t k = 0; k < d; ++k) {
    const typename S::vec c = S::load(tile + k * W);
    for (int r = 0; r < R; ++r) acc[r] += c * rows[r * d + k];
  }
}

// The running results of a block of rows. A row's best score and its code (ties: the lowest
// index) come from re-scoring, code by code, every chunk that holds a score above the row's best.
// With kGap the runner-up s_second = max_{j != idx} s_j is the larger of `second`, kept with the
// best while re-scoring, and of the lanes of `skipped`, a lane-wise maximum of scores that cannot
// be idx's. A score that reaches neither is never the runner-up: every re-scoring raises the best
// and makes the old best the runner-up, and every score scanned before it was at most that.
template <typename T, int W>
struct RunningTop {
  T best[kRowsPerBlock];
  T second[kRowsPerBlock];
  int64_t best_idx[kRowsPerBlock];
  typename Simd<T, W>::vec skipped[kRowsPerBlock];
};

// One code's score s into a row's (best, second, best_idx), codes coming in index order: a tie
// keeps the lower index (strict '>') and the tied score becomes the runner-up (gap 0).
template <typename T, bool kGap>
static inline void update_top_two(T s, int64_t j, T* best, T* second, int64_t* best_idx) {
  if (s > *best) {
    if (kGap) *second = *best;
    *best = s;
    *best_idx = j;
  } else if (kGap && s > *second) {
    *second = s;
  }
}

// Re-scores tiles [c0, c1) for row r. Only the lanes above the best at the tile's start can
// change it: they are visited in increasing order (usually one lane of one tile of the chunk);
// with kGap the other lanes go into `skipped` (they may lie above the best the chunk started with).
template <typename T, int W, int D, bool kGap>
static void rescore_chunk(const T* row, int dim, const T* tiles, const T* bias, index_t c0,
                          index_t c1, RunningTop<T, W>* top, int r) {
  typedef Simd<T, W> S;
  const index_t d = D > 0 ? D : dim;
  for (index_t t = c0; t < c1; ++t) {
    typename S::vec acc[1];
    score_tile<T, W, D, 1>(tiles + t * d * W, bias + t * W, row, dim, acc);
    const T best = top->best[r];
    if (kGap) {
      const typename S::vec none = S::splat(negative_infinity<T>());
      top->skipped[r] = S::max(acc[0] > S::splat(best) ? none : acc[0], top->skipped[r]);
    }
    for (unsigned mask = S::greater_mask(acc[0], best); mask != 0; mask &= mask - 1) {
      const int lane = __builtin_ctz(mask);
      update_top_two<T, kGap>(acc[0][lane], t * W + lane, &top->best[r], &top->second[r],
                              &top->best_idx[r]);
    }
  }
}

// Updates the running results of rows [g, g + R) with tiles [tile_begin, tile_end). running_max
// is the lane-wise maximum of a row's scores since its last re-scoring; all of them but the current
// chunk's were <= the best when their chunk ended, so it beats the best only if the current chunk
// does, and only then is the chunk re-scored. With kGap what it holds at the end goes to `skipped`;
// what it held at a re-scoring is dropped (see RunningTop). nearest_code pays nothing for the gap.
template <typename T, int W, int D, int R, bool kGap>
static void scan_tiles(const T* rows, int dim, const T* tiles, const T* bias, index_t tile_begin,
                       index_t tile_end, RunningTop<T, W>* top, int g) {
  typedef Simd<T, W> S;
  const index_t d = D > 0 ? D : dim;
  typename S::vec running_max[R];
  for (int r = 0; r < R; ++r) running_max[r] = S::splat(negative_infinity<T>());
  for (index_t c0 = tile_begin; c0 < tile_end; c0 += kChunkTiles) {
    const index_t c1 = min_index(c0 + kChunkTiles, tile_end);
    for (index_t t = c0; t < c1; ++t) {
      typename S::vec acc[R];
      score_tile<T, W, D, R>(tiles + t * d * W, bias + t * W, rows, dim, acc);
      // acc first: a NaN score (a NaN code) then leaves the running maximum as it was.
      for (int r = 0; r < R; ++r) running_max[r] = S::max(acc[r], running_max[r]);
    }
    for (int r = 0; r < R; ++r) {
      if (S::any_greater(running_max[r], top->best[g + r])) {
        rescore_chunk<T, W, D, kGap>(rows + r * d, dim, tiles, bias, c0, c1, top, g + r);
        running_max[r] = S::splat(negative_infinity<T>());
      }
    }
  }
  if (kGap) {
    for (int r = 0; r < R; ++r) top->skipped[g + r] = S::max(running_max[r], top->skipped[g + r]);
  }
}

// s_best - s_second. Both infinite with the same sign (every score overflowed alike): the
// precision at hand cannot rank them, which is a tie.
template <typename T, int W>
static inline T top_two_gap(const RunningTop<T, W>& top, int i) {
  T second = top.second[i];
  for (int lane = 0; lane < W; ++lane) {
    const T s = top.skipped[i][lane];
    second = s > second ? s : second;
  }
  const T gap = top.best[i] - second;
  return gap == gap ? gap : T(0);
}

// Normalizes rows [b0, b0 + num_rows) into `rows` (zero rows pad it to num_rows_padded) and
// resets their running results; finite[i]: row i holds no NaN/inf.
template <typename T, int W, bool kGap>
static void load_row_block(const ForwardArgs<T>& a, index_t d, index_t b0, int num_rows,
                           int num_rows_padded, T* rows, RunningTop<T, W>* top, bool* finite) {
  for (int i = 0; i < num_rows_padded; ++i) {
    top->best[i] = negative_infinity<T>();
    top->second[i] = negative_infinity<T>();
    top->best_idx[i] = 0;
    if (kGap) top->skipped[i] = Simd<T, W>::splat(negative_infinity<T>());
    finite[i] = true;
    T* row = rows + i * d;
    if (i < num_rows) {
      const T* z_row = a.z + (b0 + i) * d;
      for (index_t k = 0; k < d; ++k) finite[i] &= __builtin_isfinite(z_row[k]) != 0;
      normalize_row(z_row, d, a.eps, a.l2_normalize, row);
    } else {
      for (index_t k = 0; k < d; ++k) row[k] = 0;  // padding rows: scored, then dropped
    }
  }
}

// Writes the outputs of rows [b0, b0 + num_rows) from their running results.
template <typename T, int W, bool kGap>
static void store_row_block(const ForwardArgs<T>& a, index_t d, index_t b0, int num_rows,
                            const T* rows, const RunningTop<T, W>& top, const bool* finite) {
  for (int i = 0; i < num_rows; ++i) {
    const index_t row = b0 + i;
    // A row holding NaN/inf has no nearest code; every backend gives it index 0 (and gap +inf).
    const int64_t idx = finite[i] ? top.best_idx[i] : 0;
    a.indices[row] = idx;
    if (kGap) a.gap[row] = finite[i] ? top_two_gap(top, i) : -negative_infinity<T>();
    const T* code = a.codebook + idx * d;
    if (a.quantized != nullptr) {
      for (index_t k = 0; k < d; ++k) a.quantized[row * d + k] = code[k];
    }
    if (a.loss_rows != nullptr) {
      T sum_squares = 0;
      for (index_t k = 0; k < d; ++k) {
        const T diff = code[k] - rows[i * d + k];
        sum_squares += diff * diff;
      }
      a.loss_rows[row] = a.loss_scale * sum_squares;
    }
  }
}

template <typename T, int W, int D, bool kGap>
static void forward_rows_fixed_dim(const ForwardArgs<T>& a, index_t row_begin, index_t row_end,
                                   T* rows) {
  const index_t d = D > 0 ? D : a.dim;
  const index_t tile_bytes = d * W * static_cast<index_t>(sizeof(T));
  index_t tiles_per_block = kCodebookBlockBytes / tile_bytes;
  if (tiles_per_block < 1) tiles_per_block = 1;

  RunningTop<T, W> top;
  bool finite[kRowsPerBlock];
  for (index_t b0 = row_begin; b0 < row_end; b0 += kRowsPerBlock) {
    const int num_rows = static_cast<int>(min_index(kRowsPerBlock, row_end - b0));
    const int num_rows_padded = (num_rows + kRowsPerGroup - 1) / kRowsPerGroup * kRowsPerGroup;
    load_row_block<T, W, kGap>(a, d, b0, num_rows, num_rows_padded, rows, &top, finite);
    for (index_t tb = 0; tb < a.num_tiles; tb += tiles_per_block) {
      const index_t te = min_index(tb + tiles_per_block, a.num_tiles);
      for (int g = 0; g < num_rows_padded; g += kRowsPerGroup) {
        scan_tiles<T, W, D, kRowsPerGroup, kGap>(rows + g * d, a.dim, a.tiles, a.bias, tb, te, &top,
                                                 g);
      }
    }
    store_row_block<T, W, kGap>(a, d, b0, num_rows, rows, top, finite);
  }
}

template <typename T, int W, bool kGap>
static void forward_rows_any_dim(const ForwardArgs<T>& a, index_t row_begin, index_t row_end,
                                 T* scratch) {
  // The paper's common group sizes get fully unrolled inner loops; any other d takes the loop.
  switch (a.dim) {
    case 1: forward_rows_fixed_dim<T, W, 1, kGap>(a, row_begin, row_end, scratch); break;
    case 2: forward_rows_fixed_dim<T, W, 2, kGap>(a, row_begin, row_end, scratch); break;
    case 3: forward_rows_fixed_dim<T, W, 3, kGap>(a, row_begin, row_end, scratch); break;
    case 4: forward_rows_fixed_dim<T, W, 4, kGap>(a, row_begin, row_end, scratch); break;
    case 8: forward_rows_fixed_dim<T, W, 8, kGap>(a, row_begin, row_end, scratch); break;
    case 16: forward_rows_fixed_dim<T, W, 16, kGap>(a, row_begin, row_end, scratch); break;
    default: forward_rows_fixed_dim<T, W, 0, kGap>(a, row_begin, row_end, scratch); break;
  }
}

// The runner-up is tracked only when asked for (a template flag), so nearest_code and
// quantize_forward run the plain argmax scan.
template <typename T, int W>
static void forward_rows(const ForwardArgs<T>& a, index_t row_begin, index_t row_end, T* scratch) {
  if (a.gap != nullptr) {
    forward_rows_any_dim<T, W, true>(a, row_begin, row_end, scratch);
  } else {
    forward_rows_any_dim<T, W, false>(a, row_begin, row_end, scratch);
  }
}

template <typename T, int W>
static void prepare_codebook(const T* codebook, index_t num_codes, int dim, bool l2_normalize,
                             T eps, T* tiles, T* bias, index_t tile_begin, index_t tile_end) {
  const index_t d = dim;
  for (index_t t = tile_begin; t < tile_end; ++t) {
    T* tile = tiles + t * d * W;
    for (int lane = 0; lane < W; ++lane) {
      const index_t j = t * W + lane;
      if (j >= num_codes) {
        for (index_t k = 0; k < d; ++k) tile[k * W + lane] = 0;
        bias[t * W + lane] = negative_infinity<T>();
        continue;
      }
      const T* code = codebook + j * d;
      T sum_squares = 0;
      for (index_t k = 0; k < d; ++k) sum_squares += code[k] * code[k];
      if (l2_normalize) {
        const T norm = square_root(sum_squares);
        const T denom = norm > eps ? norm : eps;
        for (index_t k = 0; k < d; ++k) tile[k * W + lane] = code[k] / denom;
        bias[t * W + lane] = 0;
      } else {
        for (index_t k = 0; k < d; ++k) tile[k * W + lane] = code[k];
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
const KernelTable<T> Table<T, W>::value = {GSQ_CPU_ISA_NAME, W, kRowsPerBlock,
                                           &prepare_codebook<T, W>, &forward_rows<T, W>};

}  // namespace GSQ_CPU_ISA
}  // namespace gsq_cpu
