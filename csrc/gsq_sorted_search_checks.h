// The argument checks of gsq::nearest_code_sorted that every backend's glue shares (past the shape
// and dtype checks of all the ops, which each glue file makes itself).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace gsq_sorted {

// d = 1, or d = 2 with l2 on (the keys: a value, or an angle), and z that computes in float32.
inline void check_sorted_search(const char* op, const at::Tensor& z, bool l2_normalize) {
  const int64_t dim = z.size(1);
  TORCH_CHECK(dim == 1 || (dim == 2 && l2_normalize), op,
              ": the sorted search covers d = 1, and d = 2 with l2 on; got d=", dim,
              " with l2_normalize=", l2_normalize ? "True" : "False");
  TORCH_CHECK(z.scalar_type() != at::kDouble, op, ": z must be float32, float16 or bfloat16, got ",
              z.scalar_type(), " (float64 is looked up by gsq_kernels.lookup.sorted_search)");
}

}  // namespace gsq_sorted
