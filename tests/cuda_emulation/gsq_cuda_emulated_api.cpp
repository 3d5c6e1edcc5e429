// C entry points over the CUDA launchers, compiled against gsq_cuda_emulation.h, for ctypes in
// tests/test_cuda_kernels_emulated.py. Host memory stands in for device memory.
#include <string>
#include <vector>

#include "gsq_cuda_kernels.h"

using gsq_cuda::DType;

// Indices (and the gap, where `gap` is not null) of the fused lookup.
extern "C" int gsq_emulated_lookup(const void* z, int dtype, int64_t rows, int dim,
                                   const void* codebook, int64_t codes, double eps,
                                   int l2_normalize, int64_t* indices, void* gap) {
  const DType tag = static_cast<DType>(dtype);
  const size_t acc = tag == DType::kFloat64 ? sizeof(double) : sizeof(float);
  std::vector<char> prepared(codes * dim * acc), bias(codes * acc);
  std::vector<char> scratch(gsq_cuda::lookup_workspace_bytes(rows, dim, tag) + 1);
  int status = gsq_cuda::prepare_codebook(codebook, tag == DType::kFloat64, codes, dim, eps,
                                          l2_normalize != 0, prepared.data(), bias.data(), nullptr);
  if (status) return status;
  return gsq_cuda::lookup(z, tag, rows, dim, prepared.data(), bias.data(), codes, eps,
                          l2_normalize != 0, scratch.data(), indices, gap, nullptr);
}

extern "C" int gsq_emulated_forward(const void* z, int dtype, int64_t rows, int dim,
                                    const void* codebook, int64_t codes, double beta, double eps,
                                    int l2_normalize, void* quantized, int64_t* indices,
                                    void* loss_rows) {
  const int status = gsq_emulated_lookup(z, dtype, rows, dim, codebook, codes, eps, l2_normalize,
                                         indices, nullptr);
  if (status || quantized == nullptr) return status;
  return gsq_cuda::gather_codes(z, static_cast<DType>(dtype), codebook, indices, rows, dim, eps,
                                l2_normalize != 0, 1.0 + beta, quantized, loss_rows, nullptr);
}

extern "C" int gsq_emulated_backward(const void* z, const void* grad_quantized, int dtype,
                                     const void* grad_loss_rows, const void* codebook,
                                     const int64_t* indices, int64_t rows, int64_t codes, int dim,
                                     double beta, double eps, int l2_normalize, void* grad_z,
                                     void* grad_codebook) {
  const DType tag = static_cast<DType>(dtype);
  const size_t bytes = gsq_cuda::backward_workspace_bytes(rows, codes, dim, tag);
  std::vector<char> workspace(bytes + 1);
  return gsq_cuda::backward(z, grad_quantized, tag, grad_loss_rows, codebook, indices, rows, codes,
                            dim, beta, eps, l2_normalize != 0, workspace.data(), bytes, grad_z,
                            grad_codebook, nullptr);
}

// The exact lookup for d <= 2 (float32 rows and codebook).
extern "C" int gsq_emulated_sorted_search(const float* z, int64_t rows, int dim,
                                          const float* codebook, int64_t codes, double eps,
                                          int l2_normalize, int64_t* indices) {
  const size_t bytes = gsq_cuda::sorted_search_workspace_bytes(codes, dim);
  std::vector<char> workspace(bytes + 1);
  return gsq_cuda::sorted_search(z, rows, dim, codebook, codes, eps, l2_normalize != 0,
                                 workspace.data(), bytes, indices, nullptr);
}

// Clears the launch log and zeroes every probe.
extern "C" void gsq_emulated_reset_records() { gsq_emu::reset_records(); }

// The launches since the last reset, one "kernel blocks threads" line each; returns the length
// needed (the text is cut to fit `size`).
extern "C" int64_t gsq_emulated_launches(char* out, int64_t size) {
  std::string text;
  {
    std::lock_guard<std::mutex> lock(gsq_emu::record_mutex);
    for (const auto& l : gsq_emu::launches) {
      text += l.kernel + " " + std::to_string(l.blocks) + " " + std::to_string(l.threads) + "\n";
    }
  }
  if (size > 0) {
    const size_t n = std::min<size_t>(text.size(), static_cast<size_t>(size - 1));
    text.copy(out, n);
    out[n] = '\0';
  }
  return static_cast<int64_t>(text.size()) + 1;
}

extern "C" int64_t gsq_emulated_probe(const char* name) { return gsq_emu::probe(name).load(); }
