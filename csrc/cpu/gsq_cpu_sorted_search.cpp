// The exact lookup for d <= 2 on the CPU; see gsq_cpu_sorted_search.h for the phases and
// gsq_sorted_search.h for the keys, the search and the proof.
#include "gsq_cpu_sorted_search.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "gsq_cpu_exact_float.h"

namespace gsq_cpu {
namespace {

using gsq_sorted::kCodesPerBucket;

// Codes are classified in blocks of this many, in loops the compiler vectorizes.
constexpr int kBlock = 256;
// Buckets holding more codes than this drop duplicates before the search.
constexpr int64_t kCrowdedBucket = 64;

// bucket[i] for codes [first, first + count): gsq_sorted::code_bucket_2d / code_bucket_1d, in
// loops the compiler vectorizes (all fp32 at d = 2, so a register holds as many codes as it can).
template <int D, bool L2>
__attribute__((always_inline)) inline void classify_block(const SortedCodes& s, int64_t first,
                                                          int count, int32_t* bucket) {
  const float* code = s.codebook + first * D;
  const int32_t last = static_cast<int32_t>(s.num_buckets - 1);
  if (D == 2) {
    const float scale = static_cast<float>(s.key_scale);
    const float long_norm_sq = gsq_sorted::long_code_norm_sq(s.eps);
    for (int i = 0; i < count; ++i) {
      bucket[i] =
          gsq_sorted::code_bucket_2d(code[2 * i], code[2 * i + 1], long_norm_sq, scale, last);
    }
  } else {
    const double origin = s.key_origin, scale = s.key_scale;
    for (int i = 0; i < count; ++i) {
      bucket[i] = gsq_sorted::code_bucket_1d(code[i], L2, s.eps, origin, scale, last);
    }
  }
}

GSQ_SIMD_CLONES void classify_codes(const SortedCodes& s, int64_t first, int count,
                                    int32_t* bucket) {
  if (s.dim == 2) {
    classify_block<2, true>(s, first, count, bucket);
  } else if (s.l2_normalize) {
    classify_block<1, true>(s, first, count, bucket);
  } else {
    classify_block<1, false>(s, first, count, bucket);
  }
}

// codes (count, D) from raw coordinates to c^, as gsq_sorted::lookup_vector computes it.
template <int D>
__attribute__((always_inline)) inline void normalize_block(float* codes, int64_t count, float eps) {
  for (int64_t q = 0; q < count; ++q) {
    const double x = codes[q * D];
    const double y = D == 2 ? static_cast<double>(codes[q * D + D - 1]) : 0.0;
    const float norm = static_cast<float>(__builtin_sqrt(x * x + y * y));
    const float denom = norm > eps ? norm : eps;
    for (int k = 0; k < D; ++k) codes[q * D + k] = codes[q * D + k] / denom;
  }
}

GSQ_SIMD_CLONES void normalize_codes(float* codes, int64_t count, int dim, float eps) {
  if (dim == 2) {
    normalize_block<2>(codes, count, eps);
  } else {
    normalize_block<1>(codes, count, eps);
  }
}

// selected_codes[q] = c^ of code selected[q] for q in [begin, end): a copy (the selected codes
// ascend, so it streams through the codebook), then the arithmetic in one vectorized loop.
void gather_selected_codes(const SortedCodes& s, int64_t begin, int64_t end) {
  const int dim = s.dim;
  const float* __restrict codebook = s.codebook;
  const int32_t* __restrict selected = s.selected;
  float* __restrict out = s.selected_codes;
  for (int64_t q = begin; q < end; ++q) {
    const float* code = codebook + static_cast<int64_t>(selected[q]) * dim;
    out[q * dim] = code[0];
    if (dim == 2) out[q * dim + 1] = code[1];
  }
  if (s.l2_normalize) normalize_codes(out + begin * dim, end - begin, dim, s.eps);
}

template <int D>
int64_t select_codes(const SortedCodes& s, int64_t begin, int64_t end);

}  // namespace

void sorted_key_range(const SortedCodes& s, int64_t begin, int64_t end, float* low, float* high) {
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  for (int64_t j = begin; j < end; ++j) {
    float c_hat;
    gsq_sorted::lookup_vector(s.codebook + j, 1, s.l2_normalize, s.eps, &c_hat);
    if (!std::isfinite(s.codebook[j])) continue;
    lo = std::min(lo, c_hat);
    hi = std::max(hi, c_hat);
  }
  *low = lo;
  *high = hi;
}

void sorted_choose_buckets(SortedCodes& s, float low, float high) {
  const gsq_sorted::BucketMap map = gsq_sorted::bucket_map(s.dim, s.num_codes, low, high);
  s.num_buckets = map.num_buckets;
  s.key_origin = map.origin;
  s.key_scale = map.scale;
}

namespace {

template <int D>
void prepare_rows(const SortedCodes& s, const SortedRows& r, int64_t begin, int64_t end) {
  const gsq_sorted::SortedView view = s.view();
  for (int64_t i = begin; i < end; ++i) {
    float* n_hat = r.vectors + i * D;
    gsq_sorted::lookup_vector(r.z + i * D, D, s.l2_normalize, s.eps, n_hat);
    const double n[2] = {n_hat[0], n_hat[D - 1]};
    double key = 0;
    int64_t bucket = -1;  // NaN/inf: z holds one (n then does too), or 0 / 0 with eps = 0
    if (std::isfinite(n[0]) && std::isfinite(n[1])) {
      bucket = gsq_sorted::needs_every_bucket(D, n) ? -2 : gsq_sorted::row_key_bucket(view, n, key);
    }
    r.keys[i] = key;
    r.buckets[i] = bucket;
  }
}

}  // namespace

void sorted_prepare_rows(const SortedCodes& s, const SortedRows& r, int64_t begin, int64_t end) {
  if (s.dim == 2) {
    prepare_rows<2>(s, r, begin, end);
  } else {
    prepare_rows<1>(s, r, begin, end);
  }
}

void sorted_mark_rows(const SortedCodes& s, const int64_t* row_bucket, int64_t num_rows,
                      int64_t half_window) {
  const int64_t B = s.num_buckets;
  // Past this many rows most buckets are near one anyway.
  bool every_bucket = half_window < 0 || num_rows * (2 * half_window + 1) > B / 2;
  std::memset(s.built, 0, static_cast<size_t>(B));
  s.built[B] = 1;      // the short codes
  s.built[B + 1] = 0;  // the codes holding NaN/inf
  s.built_list[0] = static_cast<int32_t>(B);
  int64_t listed = 1;
  for (int64_t i = 0; i < num_rows && !every_bucket; ++i) {
    const int64_t b = row_bucket[i];
    every_bucket = b == -2;
    if (b < 0) continue;
    for (int64_t w = -half_window; w <= half_window; ++w) {
      int64_t near = b + w;
      if (s.dim == 2) {
        near &= B - 1;  // the circle: B is a power of two
      } else if (near < 0 || near >= B) {
        continue;
      }
      if (!s.built[near]) {
        s.built[near] = 1;
        s.built_list[listed++] = static_cast<int32_t>(near);
      }
    }
  }
  if (every_bucket) {
    std::memset(s.built, 1, static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) s.built_list[b + 1] = static_cast<int32_t>(b);
    listed = B + 1;
  }
  *s.num_built = listed;
}

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// The compaction below with AVX-512: 16 codes at a time, their built flags read into a mask, the
// kept ones compressed in a register and stored whole (the lanes past the kept ones are
// overwritten by the next store, and stay inside [begin, first + count) of this chunk). Returns
// the new `kept`.
__attribute__((target("avx512f"))) int64_t compact_avx512(const int32_t* bucket, int count,
                                                          int64_t first, const uint8_t* built,
                                                          int32_t* selected,
                                                          int32_t* selected_bucket, int64_t kept,
                                                          int* done) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512i b = _mm512_loadu_si512(bucket + i);
    // Sixteen scalar loads: a third faster than a vector gather of the flags on AMD Zen 4.
    unsigned keep_bits = 0;
    for (int lane = 0; lane < 16; ++lane) keep_bits |= unsigned{built[bucket[i + lane]]} << lane;
    const __mmask16 keep = static_cast<__mmask16>(keep_bits);
    const __m512i index = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(first + i)));
    _mm512_storeu_si512(selected + kept, _mm512_maskz_compress_epi32(keep, index));
    _mm512_storeu_si512(selected_bucket + kept, _mm512_maskz_compress_epi32(keep, b));
    kept += __builtin_popcount(keep);
  }
  *done = i;
  return kept;
}

bool has_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
}
#endif

template <int D>
int64_t select_codes(const SortedCodes& s, int64_t begin, int64_t end) {
  // Locals, so that the stores below cannot alias (and reload) the fields of s.
  const uint8_t* __restrict built = s.built;
  int32_t* __restrict selected = s.selected;
  int32_t* __restrict selected_bucket = s.selected_bucket;
  int32_t bucket[kBlock];
  int64_t kept = begin;
  for (int64_t first = begin; first < end; first += kBlock) {
    const int count = static_cast<int>(std::min<int64_t>(kBlock, end - first));
    classify_codes(s, first, count, bucket);
    int i = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (has_avx512()) {
      kept = compact_avx512(bucket, count, first, built, selected, selected_bucket, kept, &i);
    }
#endif
    // Without branches (most codes are dropped, at random): every code is written at the next
    // free position, which advances only for the codes kept.
    for (; i < count; ++i) {
      const int32_t b = bucket[i];
      selected[kept] = static_cast<int32_t>(first + i);
      selected_bucket[kept] = b;
      kept += built[b];
    }
  }
  return kept;
}

}  // namespace

void sorted_select_chunk(const SortedCodes& s, int64_t chunk, int64_t begin, int64_t end) {
  const int64_t kept = s.dim == 2 ? select_codes<2>(s, begin, end) : select_codes<1>(s, begin, end);
  gather_selected_codes(s, begin, kept);
  // Counted afterwards, over the kept codes only: a count per code would touch a random bucket
  // for every code.
  const int64_t stride = s.num_buckets + 2;  // the last slot counts the codes holding NaN/inf
  int32_t* counts = s.chunk_counts + chunk * stride;
  for (int64_t k = 0; k < *s.num_built; ++k) counts[s.built_list[k]] = 0;
  for (int64_t q = begin; q < kept; ++q) counts[s.selected_bucket[q]] += 1;
  s.selected_count[chunk] = kept - begin;
}

bool sorted_bucket_offsets(const SortedCodes& s, int64_t chunks) {
  const int64_t stride = s.num_buckets + 2;
  int64_t total = 0;
  bool crowded = false;
  for (int64_t k = 0; k < *s.num_built; ++k) {
    const int64_t b = s.built_list[k];
    s.bucket_start[b] = total;
    for (int64_t t = 0; t < chunks; ++t) {
      const int64_t count = s.chunk_counts[t * stride + b];
      s.chunk_counts[t * stride + b] = static_cast<int32_t>(total);
      total += count;
    }
    s.bucket_end[b] = total;
    crowded |= total - s.bucket_start[b] > kCrowdedBucket;
  }
  return crowded;
}

namespace {

// D a constant, so that a code's coordinates move as one 4- or 8-byte copy.
template <int D>
void fill_chunk(const SortedCodes& s, int64_t chunk, int64_t begin) {
  int32_t* __restrict next_slot = s.chunk_counts + chunk * (s.num_buckets + 2);
  const int32_t* __restrict selected = s.selected;
  const int32_t* __restrict selected_bucket = s.selected_bucket;
  const float* __restrict selected_codes = s.selected_codes;
  int32_t* __restrict members = s.members;
  float* __restrict member_codes = s.member_codes;
  const int64_t end = begin + s.selected_count[chunk];
  for (int64_t q = begin; q < end; ++q) {
    const int64_t p = next_slot[selected_bucket[q]]++;
    members[p] = selected[q];
    for (int k = 0; k < D; ++k) member_codes[p * D + k] = selected_codes[q * D + k];
  }
}

}  // namespace

void sorted_fill_chunk(const SortedCodes& s, int64_t chunk, int64_t begin) {
  if (s.dim == 2) {
    fill_chunk<2>(s, chunk, begin);
  } else {
    fill_chunk<1>(s, chunk, begin);
  }
}

void sorted_finish_buckets(const SortedCodes& s, int64_t begin, int64_t end) {
  const int dim = s.dim;
  std::vector<int64_t> order;
  std::vector<int32_t> members;
  std::vector<float> codes;
  for (int64_t k = begin; k < end; ++k) {
    const int64_t b = s.built_list[k];
    const int64_t first = s.bucket_start[b];
    const int64_t count = s.bucket_end[b] - first;
    if (count <= kCrowdedBucket) continue;
    // Sort by c^ (then index) and keep the first of each run of equal vectors: a later one has
    // the same distance to every row and a higher index.
    const float* c = s.member_codes + first * dim;
    const int32_t* m = s.members + first;
    order.resize(count);
    for (int64_t p = 0; p < count; ++p) order[p] = p;
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t e) {
      for (int k = 0; k < dim; ++k) {
        if (c[a * dim + k] != c[e * dim + k]) return c[a * dim + k] < c[e * dim + k];
      }
      return m[a] < m[e];
    });
    members.clear();
    codes.clear();
    for (int64_t p = 0; p < count; ++p) {
      const int64_t q = order[p];
      if (p > 0 && std::equal(c + q * dim, c + (q + 1) * dim, c + order[p - 1] * dim)) continue;
      members.push_back(m[q]);
      codes.insert(codes.end(), c + q * dim, c + (q + 1) * dim);
    }
    std::copy(members.begin(), members.end(), s.members + first);
    std::copy(codes.begin(), codes.end(), s.member_codes + first * dim);
    s.bucket_end[b] = first + static_cast<int64_t>(members.size());
  }
}

void sorted_search_rows(const SortedCodes& s, const SortedRows& r, int64_t begin, int64_t end,
                        int64_t* indices) {
  const gsq_sorted::SortedView view = s.view();
  const int dim = s.dim;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t bucket = r.buckets[i];
    if (bucket == -1) {
      indices[i] = 0;
      continue;
    }
    const double n[2] = {r.vectors[i * dim], r.vectors[i * dim + dim - 1]};
    gsq_sorted::Best best{std::numeric_limits<double>::infinity(),
                          std::numeric_limits<int64_t>::max()};
    gsq_sorted::scan_bucket(view, s.num_buckets, n, best);  // the short codes
    const bool found = bucket == -2 ? gsq_sorted::search_row(view, n, best)
                                    : gsq_sorted::search_row_from(view, n, r.keys[i], bucket, best);
    // No code at all (every one holds NaN/inf): index 0, like a non-finite row.
    indices[i] = !found ? -1 : (best.index == std::numeric_limits<int64_t>::max() ? 0 : best.index);
  }
}

}  // namespace gsq_cpu
