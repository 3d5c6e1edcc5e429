// See gsq_cpu_refine.h. The float32 scores of a block of codes are computed in a loop the compiler
// vectorizes (built per instruction set, picked at load time); only the codes that reach the
// threshold, a handful per row, get a float64 distance.
#include "gsq_cpu_refine.h"

#include <cstdint>
#include <limits>

#include "gsq_cpu_exact_float.h"

namespace gsq_cpu {
namespace {

constexpr int64_t kScoreBlock = 256;

// scores[j - first] = <n, c_j> + bias_j for codes [first, first + count): coordinates in order
// from the bias, so every instruction set rounds alike (the threshold allows for any order anyway).
GSQ_SIMD_CLONES int scores_above(const float* n, int dim, const float* codes_t, const float* bias,
                                 int64_t num_codes, int64_t first, int64_t count, float threshold,
                                 float* scores) {
  for (int64_t q = 0; q < count; ++q) scores[q] = bias[first + q];
  for (int k = 0; k < dim; ++k) {
    const float* row = codes_t + k * num_codes + first;
    const float value = n[k];
    for (int64_t q = 0; q < count; ++q) scores[q] += value * row[q];
  }
  int above = 0;
  for (int64_t q = 0; q < count; ++q) above += scores[q] >= threshold;
  return above;
}

}  // namespace

void refine_rows(const float* vectors, int dim, const float* codes_t, const float* bias,
                 int64_t num_codes, const float* threshold, int64_t row_begin, int64_t row_end,
                 int64_t* indices) {
  float scores[kScoreBlock];
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* n = vectors + i * dim;
    double best = std::numeric_limits<double>::infinity();
    int64_t best_index = -1;
    for (int64_t first = 0; first < num_codes; first += kScoreBlock) {
      const int64_t count = num_codes - first < kScoreBlock ? num_codes - first : kScoreBlock;
      if (scores_above(n, dim, codes_t, bias, num_codes, first, count, threshold[i], scores) == 0) {
        continue;
      }
      for (int64_t q = 0; q < count; ++q) {
        if (!(scores[q] >= threshold[i])) continue;
        const int64_t j = first + q;
        double distance = 0;
        for (int k = 0; k < dim; ++k) {
          const double difference =
              static_cast<double>(n[k]) - static_cast<double>(codes_t[k * num_codes + j]);
          const double square = difference * difference;
          distance = distance + square;
        }
        if (distance < best) {  // codes come in increasing order: ties keep the lower index
          best = distance;
          best_index = j;
        }
      }
    }
    indices[i] = best_index;
  }
}

}  // namespace gsq_cpu
