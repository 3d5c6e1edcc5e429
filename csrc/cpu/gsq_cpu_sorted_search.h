// The exact lookup for d <= 2 on the CPU: the codes near some row are bucket-sorted by key (a
// counting sort, one chunk of codes per thread), then each row is searched (gsq_sorted_search.h
// holds the keys, the search and the bound). Torch-free; the glue (gsq_cpu.cpp) allocates the
// arrays and runs the phases over threads, in this order:
//
//   sorted_key_range (d = 1)   the range of the keys, per chunk of codes
//   sorted_choose_buckets      the number of buckets and the key -> bucket map
//   sorted_prepare_rows        per row: its lookup vector, key and bucket
//   sorted_mark_rows           which buckets to build: those within 2 of a row's bucket (all of
//                              them when rows are many, or one is too short to have an angle); a
//                              row that needs more is searched again after a build within 64 of
//                              its bucket, then, if need be, after a full build
//   sorted_select_chunk        per chunk: the codes in built buckets, with their c^, counted
//   sorted_bucket_offsets      serial prefix sums over the built buckets: each one's start and
//                              end, each chunk's slots
//   sorted_fill_chunk          per chunk: its selected codes into their buckets (stable)
//   sorted_finish_buckets      crowded buckets drop duplicates (a collapsed codebook stays fast)
//   sorted_search_rows         per row: the nearest code, or -1 if a bucket it needs is not built
//
// With M rows and V codes the work is O(V) vectorized arithmetic plus O(min(V, M) + M) scalar
// work; a full build (every bucket) is O(V).
#pragma once

#include <stdint.h>

#include "gsq_sorted_search.h"

namespace gsq_cpu {

struct SortedCodes {
  // Inputs.
  const float* codebook;  // (num_codes, dim), raw
  int64_t num_codes;
  int dim;  // 1 or 2 (2 only with l2 on)
  bool l2_normalize;
  float eps;
  // The map key -> bucket (sorted_choose_buckets); bucket num_buckets holds the short codes, and
  // num_buckets + 1 (never built) the codes holding NaN/inf, which are never chosen.
  int64_t num_buckets;
  double key_origin;
  double key_scale;
  // Arrays the caller allocates.
  uint8_t* built;            // num_buckets + 2
  int32_t* built_list;       // num_buckets + 1: the built buckets (short codes first), ...
  int64_t* num_built;        // ... this many
  int32_t* chunk_counts;     // (chunks, num_buckets + 2): counts, then each chunk's next slots
  int32_t* selected;         // num_codes: each chunk's selected codes, from its first position
  int32_t* selected_bucket;  // num_codes
  float* selected_codes;     // (num_codes, dim): their c^ (raw until normalized)
  int64_t* selected_count;   // chunks
  int64_t* bucket_start;     // num_buckets + 1 (set for the built buckets)
  int64_t* bucket_end;       // num_buckets + 1
  int32_t* members;          // num_codes
  float* member_codes;       // (num_codes, dim)

  gsq_sorted::SortedView view() const {
    return {dim,        num_buckets, key_origin,   key_scale, bucket_start,
            bucket_end, members,     member_codes, built};
  }
};

// d = 1: the range of the keys (c^) over codes [begin, end), NaN/inf ignored (low > high if none).
void sorted_key_range(const SortedCodes& s, int64_t begin, int64_t end, float* low, float* high);

void sorted_choose_buckets(SortedCodes& s, float low, float high);

// The rows as the search reads them: each row's lookup vector, key and bucket, computed once.
struct SortedRows {
  const float* z;    // (num_rows, dim), float32
  float* vectors;    // (num_rows, dim): n
  double* keys;      // the key of n (row_key_bucket's)
  int64_t* buckets;  // its bucket, -1 for a row holding NaN/inf, -2 for one that needs every bucket
};

// Rows [begin, end) of r.
void sorted_prepare_rows(const SortedCodes& s, const SortedRows& r, int64_t begin, int64_t end);

// Serial, over the rows' buckets: marks the buckets within half_window of one (every bucket when
// half_window < 0, or when that would mark most of them anyway).
void sorted_mark_rows(const SortedCodes& s, const int64_t* row_bucket, int64_t num_rows,
                      int64_t half_window);

void sorted_select_chunk(const SortedCodes& s, int64_t chunk, int64_t begin, int64_t end);

// Returns whether some bucket is crowded (sorted_finish_buckets has work).
bool sorted_bucket_offsets(const SortedCodes& s, int64_t chunks);

void sorted_fill_chunk(const SortedCodes& s, int64_t chunk, int64_t begin);

// Over built_list[begin, end).
void sorted_finish_buckets(const SortedCodes& s, int64_t begin, int64_t end);

// indices[i] for rows [begin, end): the exact nearest code, 0 for a row holding NaN/inf, -1 for
// a row that needs a bucket that was not built.
void sorted_search_rows(const SortedCodes& s, const SortedRows& r, int64_t begin, int64_t end,
                        int64_t* indices);

}  // namespace gsq_cpu
