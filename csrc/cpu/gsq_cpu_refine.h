// The exact lookup's refinement on the CPU (gsq_kernels/lookup.py, refine_ambiguous_rows): for the
// few rows whose fused-scan winner may not be the nearest code, the nearest code among those whose
// float32 score reaches a threshold that the nearest code is proven to reach. Torch-free; the glue
// is gsq_cpu.cpp.
#pragma once

#include <stdint.h>

namespace gsq_cpu {

// For rows [row_begin, row_end) of vectors (A, dim) (the lookup vectors n, float32):
//   candidates_i = { j : s_ij >= threshold_i },  s_ij = <n_i, c_j> + bias_j  (float32)
//   indices[i]   = argmin over candidates of ||n_i - c_j||^2 in float64 (lowest j on ties), or -1
//                  when there is none
// codes_t is (dim, V): the lookup vectors c_j transposed, so a run of codes is contiguous.
void refine_rows(const float* vectors, int dim, const float* codes_t, const float* bias,
                 int64_t num_codes, const float* threshold, int64_t row_begin, int64_t row_end,
                 int64_t* indices);

}  // namespace gsq_cpu
