// Torch glue for the CUDA kernels: argument checks, allocation through the caching allocator
// (CUDA-graph safe), dtype tags, and launch on the current stream. Registered for the CUDA
// dispatch key of the ops declared in csrc/gsq_ops.cpp. The kernels: gsq_cuda_kernels.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <utility>

#include "gsq_compute_dtype.h"
#include "gsq_cuda_kernels.h"
#include "gsq_sorted_search_checks.h"

namespace gsq_cuda {
namespace {

using gsq_glue::compute_dtype;

DType dtype_tag(const at::Tensor& z) {
  switch (z.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK(false, "gsq (CUDA): z must be float32, float16, bfloat16 or float64, got ",
                  z.scalar_type());
  }
  return DType::kFloat32;
}

void check_z_and_codebook(const char* op, const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.is_cuda() && codebook.is_cuda() && z.device() == codebook.device(), op,
              ": z and codebook must be on the same CUDA device, got ", z.device(), " and ",
              codebook.device());
  TORCH_CHECK(z.dim() == 2, op, ": z must be (M, d), got shape ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, op, ": codebook must be (V, d), got shape ", codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), op, ": z has d=", z.size(1),
              " but the codebook has width ", codebook.size(1));
  TORCH_CHECK(z.size(1) >= 1 && codebook.size(0) >= 1, op, ": d and V must be at least 1");
  dtype_tag(z);
  TORCH_CHECK(codebook.scalar_type() == compute_dtype(z), op, ": the codebook must be ",
              compute_dtype(z), " for ", z.scalar_type(), " z, got ", codebook.scalar_type());
  // cub's radix sort counts items in int; the lookup kernels index codes in int32 and offsets
  // inside a tile (128 codes x d) too.
  TORCH_CHECK(z.size(0) <= std::numeric_limits<int>::max(), op,
              ": at most 2^31-1 group vectors per call, got ", z.size(0));
  TORCH_CHECK(
      lookup_supports(codebook.size(0), static_cast<int>(std::min<int64_t>(z.size(1), INT32_MAX))),
      op, ": the CUDA kernels take at most 2^31-1 codes and d <= 2^24, got V=", codebook.size(0),
      ", d=", z.size(1));
}

// Every tensor the backward reads must live on z's device: the kernels dereference raw pointers.
void check_backward_inputs(const at::Tensor& grad_quantized, const at::Tensor& grad_loss_rows,
                           const at::Tensor& z, const at::Tensor& codebook,
                           const at::Tensor& indices) {
  const char* op = "gsq::quantize_backward";
  check_z_and_codebook(op, z, codebook);
  const std::pair<const char*, const at::Tensor*> others[] = {{"grad_quantized", &grad_quantized},
                                                              {"grad_loss_rows", &grad_loss_rows},
                                                              {"indices", &indices}};
  for (const auto& [name, tensor] : others) {
    TORCH_CHECK(tensor->device() == z.device(), op, ": ", name, " must be on z's device (",
                z.device(), "), got ", tensor->device());
  }
  const int64_t rows = z.size(0);
  TORCH_CHECK(grad_quantized.sizes() == z.sizes(), op, ": grad_quantized has shape ",
              grad_quantized.sizes(), ", expected ", z.sizes());
  TORCH_CHECK(grad_loss_rows.dim() == 1 && grad_loss_rows.size(0) == rows, op,
              ": grad_loss_rows must be (", rows, ",), got ", grad_loss_rows.sizes());
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == rows && indices.scalar_type() == at::kLong,
              op, ": indices must be int64 of shape (", rows, ",), got ", indices.scalar_type(),
              " of shape ", indices.sizes());
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "gsq (CUDA): ", what, " failed: ", cudaGetErrorString(status));
}

// (codes, bias) the lookup streams; see prepare_codebook in gsq_cuda_kernels.h.
std::tuple<at::Tensor, at::Tensor> prepared_codebook(const at::Tensor& codebook, double eps,
                                                     bool l2_normalize, cudaStream_t stream) {
  at::Tensor codes = at::empty(codebook.sizes(), codebook.options());
  at::Tensor bias = at::empty({codebook.size(0)}, codebook.options());
  check_launch(prepare_codebook(codebook.data_ptr(), codebook.scalar_type() == at::kDouble,
                                codebook.size(0), static_cast<int>(codebook.size(1)), eps,
                                l2_normalize, codes.data_ptr(), bias.data_ptr(), stream),
               "prepare_codebook");
  return {codes, bias};
}

// Indices of the fused lookup; also fills `gap` (compute dtype, (M,)) when it is defined.
at::Tensor run_lookup(const at::Tensor& z, const at::Tensor& codebook, double eps,
                      bool l2_normalize, const at::Tensor& gap, cudaStream_t stream) {
  const int64_t rows = z.size(0);
  const int dim = static_cast<int>(z.size(1));
  at::Tensor indices = at::empty({rows}, z.options().dtype(at::kLong));
  if (rows == 0) return indices;
  auto [codes, bias] = prepared_codebook(codebook, eps, l2_normalize, stream);
  const size_t scratch_bytes = lookup_workspace_bytes(rows, dim, dtype_tag(z));
  at::Tensor scratch =
      at::empty({static_cast<int64_t>(scratch_bytes)}, z.options().dtype(at::kByte));
  check_launch(
      lookup(z.data_ptr(), dtype_tag(z), rows, dim, codes.data_ptr(), bias.data_ptr(),
             codebook.size(0), eps, l2_normalize, scratch_bytes ? scratch.data_ptr() : nullptr,
             indices.data_ptr<int64_t>(), gap.defined() ? gap.data_ptr() : nullptr, stream),
      "lookup");
  return indices;
}

// (quantized, indices, loss_rows) of the forward for given indices; z and codebook contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs_at_indices(
    const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& indices, double beta,
    double eps, bool l2_normalize, cudaStream_t stream) {
  at::Tensor quantized = at::empty(z.sizes(), z.options());
  at::Tensor loss_rows = at::empty({z.size(0)}, z.options().dtype(compute_dtype(z)));
  check_launch(
      gather_codes(z.data_ptr(), dtype_tag(z), codebook.data_ptr(), indices.data_ptr<int64_t>(),
                   z.size(0), static_cast<int>(z.size(1)), eps, l2_normalize, 1.0 + beta,
                   quantized.data_ptr(), loss_rows.data_ptr(), stream),
      "gather_codes");
  return {quantized, indices, loss_rows};
}

// The forward's outputs, plus the gap to the runner-up when `gap` is defined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_outputs(const at::Tensor& z_in,
                                                               const at::Tensor& codebook_in,
                                                               double beta, double eps,
                                                               bool l2_normalize,
                                                               const at::Tensor& gap) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor z = z_in.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  at::Tensor indices = run_lookup(z, codebook, eps, l2_normalize, gap, stream);
  return outputs_at_indices(z, codebook, indices, beta, eps, l2_normalize, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_forward_cuda(const at::Tensor& z,
                                                                     const at::Tensor& codebook,
                                                                     double beta, double eps,
                                                                     bool l2_normalize) {
  check_z_and_codebook("gsq::quantize_forward", z, codebook);
  return forward_outputs(z, codebook, beta, eps, l2_normalize, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_forward_with_gap_cuda(
    const at::Tensor& z, const at::Tensor& codebook, double beta, double eps, bool l2_normalize) {
  check_z_and_codebook("gsq::quantize_forward_with_gap", z, codebook);
  at::Tensor gap = at::empty({z.size(0)}, z.options().dtype(compute_dtype(z)));
  auto [quantized, indices, loss_rows] = forward_outputs(z, codebook, beta, eps, l2_normalize, gap);
  return {quantized, indices, loss_rows, gap};
}

at::Tensor nearest_code_cuda(const at::Tensor& z_in, const at::Tensor& codebook_in, double eps,
                             bool l2_normalize) {
  check_z_and_codebook("gsq::nearest_code", z_in, codebook_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  return run_lookup(z_in.contiguous(), codebook_in.contiguous(), eps, l2_normalize, at::Tensor(),
                    c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor> nearest_code_with_gap_cuda(const at::Tensor& z_in,
                                                              const at::Tensor& codebook_in,
                                                              double eps, bool l2_normalize) {
  check_z_and_codebook("gsq::nearest_code_with_gap", z_in, codebook_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous();
  at::Tensor gap = at::empty({z.size(0)}, z.options().dtype(compute_dtype(z)));
  at::Tensor indices = run_lookup(z, codebook_in.contiguous(), eps, l2_normalize, gap,
                                  c10::cuda::getCurrentCUDAStream());
  return {indices, gap};
}

// The exact lookup for d = 1, and d = 2 with l2 on (gsq_cuda_kernels.h: sorted_search).
at::Tensor nearest_code_sorted_cuda(const at::Tensor& z_in, const at::Tensor& codebook_in,
                                    double eps, bool l2_normalize) {
  const char* op = "gsq::nearest_code_sorted";
  check_z_and_codebook(op, z_in, codebook_in);
  gsq_sorted::check_sorted_search(op, z_in, l2_normalize);
  const int64_t dim = z_in.size(1);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.to(at::kFloat).contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  const int64_t num_codes = codebook.size(0);
  at::Tensor indices = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  if (z.size(0) == 0) return indices;
  const size_t bytes = sorted_search_workspace_bytes(num_codes, static_cast<int>(dim));
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, z.options().dtype(at::kByte));
  check_launch(
      sorted_search(z.data_ptr<float>(), z.size(0), static_cast<int>(dim),
                    codebook.data_ptr<float>(), num_codes, eps, l2_normalize, workspace.data_ptr(),
                    bytes, indices.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
      "sorted_search");
  return indices;
}

// quantize_forward's outputs at the sorted search's indices.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_forward_sorted_cuda(
    const at::Tensor& z_in, const at::Tensor& codebook_in, double beta, double eps,
    bool l2_normalize) {
  at::Tensor indices = nearest_code_sorted_cuda(z_in, codebook_in, eps, l2_normalize);  // checks
  const c10::cuda::CUDAGuard guard(z_in.device());
  return outputs_at_indices(z_in.contiguous(), codebook_in.contiguous(), indices, beta, eps,
                            l2_normalize, c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor> quantize_backward_cuda(const at::Tensor& grad_quantized_in,
                                                          const at::Tensor& grad_loss_rows_in,
                                                          const at::Tensor& z_in,
                                                          const at::Tensor& codebook_in,
                                                          const at::Tensor& indices_in, double beta,
                                                          double eps, bool l2_normalize) {
  check_backward_inputs(grad_quantized_in, grad_loss_rows_in, z_in, codebook_in, indices_in);
  const int64_t rows = z_in.size(0);
  // The indices are trusted to lie in [0, V) (they come from quantize_forward): checking them here
  // would need a device-to-host copy, i.e. a synchronization on every backward.
  const c10::cuda::CUDAGuard guard(z_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor z = z_in.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  const at::Tensor grad_quantized = grad_quantized_in.to(z.scalar_type()).contiguous();
  const at::Tensor grad_loss_rows = grad_loss_rows_in.to(compute_dtype(z)).contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int dim = static_cast<int>(z.size(1));
  at::Tensor grad_z = at::empty(z.sizes(), z.options());
  at::Tensor grad_codebook = at::empty(codebook.sizes(), codebook.options());
  const size_t workspace_bytes =
      backward_workspace_bytes(rows, codebook.size(0), dim, dtype_tag(z));
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, z.options().dtype(at::kByte));
  check_launch(backward(z.data_ptr(), grad_quantized.data_ptr(), dtype_tag(z),
                        grad_loss_rows.data_ptr(), codebook.data_ptr(), indices.data_ptr<int64_t>(),
                        rows, codebook.size(0), dim, beta, eps, l2_normalize, workspace.data_ptr(),
                        workspace_bytes, grad_z.data_ptr(), grad_codebook.data_ptr(), stream),
               "backward");
  return {grad_z, grad_codebook};
}

}  // namespace
}  // namespace gsq_cuda

TORCH_LIBRARY_IMPL(gsq, CUDA, m) {
  m.impl("quantize_forward", &gsq_cuda::quantize_forward_cuda);
  m.impl("quantize_backward", &gsq_cuda::quantize_backward_cuda);
  m.impl("nearest_code", &gsq_cuda::nearest_code_cuda);
  m.impl("nearest_code_with_gap", &gsq_cuda::nearest_code_with_gap_cuda);
  m.impl("quantize_forward_with_gap", &gsq_cuda::quantize_forward_with_gap_cuda);
  m.impl("nearest_code_sorted", &gsq_cuda::nearest_code_sorted_cuda);
  m.impl("quantize_forward_sorted", &gsq_cuda::quantize_forward_sorted_cuda);
}
