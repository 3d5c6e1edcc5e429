// Launchers of the CUDA kernels (gsq_cuda_kernels.cu), called by the torch glue (gsq_cuda.cpp).
// Raw pointers, a stream, and a dtype tag: no torch types, so the .cu compiles in about a second.
//
// Element types: z, grad_quantized, quantized and grad_z are in the latent's dtype (DType);
// everything else (codebook, codes, bias, loss_rows, grad_loss_rows, grad_codebook) is in the
// compute type: float for float32/float16/bfloat16 latents, double for float64 latents.
// Every launcher only enqueues work on `stream` (no host synchronization, no allocation), so the
// ops can be captured in CUDA graphs; it returns the launch status.
#pragma once

#include <stddef.h>
#include <stdint.h>

#if defined(GSQ_CUDA_EMULATION)
#include "gsq_cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif

namespace gsq_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// codes (V, d) and bias (V,) as the lookup reads them:
//   l2 on : codes_j = c_j / max(||c_j||, eps), bias_j = 0
//   l2 off: codes_j = c_j,                      bias_j = -||c_j||^2 / 2
// so that argmax_j <n, codes_j> + bias_j is the cosine (resp. Euclidean) nearest code.
cudaError_t prepare_codebook(const void* codebook, bool is_double, int64_t num_codes, int dim,
                             double eps, bool l2_normalize, void* codes, void* bias,
                             cudaStream_t stream);

// Whether `lookup` takes this codebook size and width: 1 <= V < 2^31 (codes are indexed in int32
// inside the kernels) and 1 <= dim <= 2^24 (so a tile's offsets fit in int32).
bool lookup_supports(int64_t num_codes, int dim);

// Bytes of scratch `lookup` needs (the normalized rows of the general-d path; 0 otherwise).
size_t lookup_workspace_bytes(int64_t num_rows, int dim, DType dtype);

// indices[i] = argmax_j s_ij, s_ij = <n_i, codes_j> + bias_j, ties to the lowest j; 0 for a row
// holding NaN/inf. If `gap` is not null (compute type, num_rows entries) it also gets
// gap[i] = s_i,idx - max_{j != idx} s_ij: 0 on a tie, +inf when V == 1 or the row is not finite.
// Never forms the M x V matrix. cudaErrorInvalidValue unless lookup_supports(num_codes, dim).
cudaError_t lookup(const void* z, DType dtype, int64_t num_rows, int dim, const void* codes,
                   const void* bias, int64_t num_codes, double eps, bool l2_normalize,
                   void* workspace, int64_t* indices, void* gap, cudaStream_t stream);

// quantized_i = codebook[idx_i] (cast to the latent's dtype), loss_rows_i = loss_scale ||c -
// n_i||^2.
cudaError_t gather_codes(const void* z, DType dtype, const void* codebook, const int64_t* indices,
                         int64_t num_rows, int dim, double eps, bool l2_normalize,
                         double loss_scale, void* quantized, void* loss_rows, cudaStream_t stream);

// Scratch for the backward: normalized rows, norms, and the sort of rows by code.
size_t backward_workspace_bytes(int64_t num_rows, int64_t num_codes, int dim, DType dtype);

// grad_z and grad_codebook (see gsq_cuda_kernels.cu for the formulas). Deterministic.
cudaError_t backward(const void* z, const void* grad_quantized, DType dtype,
                     const void* grad_loss_rows, const void* codebook, const int64_t* indices,
                     int64_t num_rows, int64_t num_codes, int dim, double beta, double eps,
                     bool l2_normalize, void* workspace, size_t workspace_bytes, void* grad_z,
                     void* grad_codebook, cudaStream_t stream);

// The exact lookup for d = 1, and d = 2 with l2 on (csrc/gsq_sorted_search.h): indices[i] = the
// code nearest to z_i (float32 rows, (num_rows, dim)), ties to the lowest index, 0 for a row
// holding NaN/inf. sorted_search_supports: 1 <= V < 2^31 (cub counts items in int) and d <= 2.
// cudaErrorInvalidValue if not supported, for d = 2 with l2 off, or with too little workspace.
bool sorted_search_supports(int64_t num_codes, int dim);
size_t sorted_search_workspace_bytes(int64_t num_codes, int dim);
cudaError_t sorted_search(const float* z, int64_t num_rows, int dim, const float* codebook,
                          int64_t num_codes, double eps, bool l2_normalize, void* workspace,
                          size_t workspace_bytes, int64_t* indices, cudaStream_t stream);

}  // namespace gsq_cuda
