// The dtype the ops compute in, for every backend's glue and the autograd kernel: float64 stays
// float64 (for gradcheck), every other z computes in float32 (gsq_kernels/reference.py's
// compute_dtype, the same rule in Python).
#pragma once

#include <ATen/core/Tensor.h>

namespace gsq_glue {

inline c10::ScalarType compute_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace gsq_glue
