// C entry points over the CUDA launchers, compiled against gsq_cuda_emulation.h, for ctypes in
// tests/test_cuda_kernels_emulated.py. Host memory stands in for device memory.
#include <vector>

#include "gsq_cuda_kernels.h"

using gsq_cuda::DType;

extern "C" int gsq_emulated_forward(const void* z, int dtype, int64_t rows, int dim, const void* codebook,
                                    int64_t codes, double beta, double eps, int l2_normalize,
                                    void* quantized, int64_t* indices, void* loss_rows) {
  const DType tag = static_cast<DType>(dtype);
  const size_t acc = tag == DType::kFloat64 ? sizeof(double) : sizeof(float);
  std::vector<char> prepared(codes * dim * acc), bias(codes * acc);
  std::vector<char> scratch(gsq_cuda::lookup_workspace_bytes(rows, dim, tag) + 1);
  int status = gsq_cuda::prepare_codebook(codebook, tag == DType::kFloat64, codes, dim, eps, l2_normalize != 0,
                                          prepared.data(), bias.data(), nullptr);
  if (status) return status;
  status = gsq_cuda::lookup(z, tag, rows, dim, prepared.data(), bias.data(), codes, eps, l2_normalize != 0,
                            scratch.data(), indices, nullptr);
  if (status || quantized == nullptr) return status;
  return gsq_cuda::gather_codes(z, tag, codebook, indices, rows, dim, eps, l2_normalize != 0, 1.0 + beta,
                                quantized, loss_rows, nullptr);
}

extern "C" int gsq_emulated_backward(const void* z, const void* grad_quantized, int dtype,
                                     const void* grad_loss_rows, const void* codebook, const int64_t* indices,
                                     int64_t rows, int64_t codes, int dim, double beta, double eps,
                                     int l2_normalize, void* grad_z, void* grad_codebook) {
  const DType tag = static_cast<DType>(dtype);
  const size_t bytes = gsq_cuda::backward_workspace_bytes(rows, codes, dim, tag);
  std::vector<char> workspace(bytes + 1);
  return gsq_cuda::backward(z, grad_quantized, tag, grad_loss_rows, codebook, indices, rows, codes, dim, beta,
                            eps, l2_normalize != 0, workspace.data(), bytes, grad_z, grad_codebook, nullptr);
}
