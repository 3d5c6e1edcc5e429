// Interface between the torch glue (gsq_cpu.cpp) and the CPU kernels.
//
// The kernels are compiled once per instruction set (gsq_cpu_isa_*.cpp) and picked at run time, so
// this header and everything the kernels include must stay free of torch and of the C++ standard
// library: an inline function emitted by two translation units built for different instruction
// sets may be merged by the linker into the version the running CPU cannot execute.
#pragma once

#include <stdint.h>

namespace gsq_cpu {

typedef int64_t index_t;

// The codebook as the lookup streams it: tiles of `lanes` codes, transposed so that one tile holds,
// for every dimension k, the k-th coordinate of its `lanes` codes side by side (one SIMD register
// per dimension). tiles[t * d * lanes + k * lanes + lane] is coordinate k of code t * lanes + lane.
// score(z, j) = <z, code_j> + bias_j, with
//   l2 on : code_j = c_j / max(||c_j||, eps), bias_j = 0           -> argmax = cosine nearest code
//   l2 off: code_j = c_j,                      bias_j = -||c_j||^2/2 -> argmax = Euclidean nearest
//   code
// (||z - c||^2 = ||z||^2 - 2 (<z, c> - ||c||^2 / 2), and ||z||^2 is the same for every code).
// Padding lanes past V get bias -inf, so they never win.

// One forward call's inputs and outputs. Offsets are computed in 64 bits (index_t); dim is an int
// because the glue rejects d > INT32_MAX. Null outputs are not computed.
template <typename T>
struct ForwardArgs {
  const T* z;  // (M, dim)
  int dim;
  const T* tiles;  // the streamed codebook, num_tiles tiles (see above)
  const T* bias;   // (num_tiles * lanes)
  index_t num_tiles;
  const T* codebook;  // (V, dim), the raw rows gathered into quantized
  T eps;
  bool l2_normalize;
  T loss_scale;                // 1 + beta
  T* quantized = nullptr;      // (M, dim) or null
  int64_t* indices = nullptr;  // (M,), always written
  T* loss_rows = nullptr;      // (M,) or null
  T* gap = nullptr;            // (M,) or null: s_best - s_second (nearest_code_with_gap)
};

template <typename T>
struct KernelTable {
  const char* isa;
  int lanes;           // codes per tile
  int rows_per_block;  // forward_rows needs a scratch buffer of rows_per_block * dim elements

  // Fills tiles [tile_begin, tile_end) of the streamed codebook and its bias.
  void (*prepare_codebook)(const T* codebook, index_t num_codes, int dim, bool l2_normalize, T eps,
                           T* tiles, T* bias, index_t tile_begin, index_t tile_end);

  // Rows [row_begin, row_end) of the forward: normalize, cosine nearest code (ties to the lowest
  // index), then whichever outputs are non-null: the raw code, loss_rows[i] = loss_scale *
  // ||c_idx - n_i||^2, the gap to the runner-up. scratch: rows_per_block * dim elements, private
  // to the calling thread.
  void (*forward_rows)(const ForwardArgs<T>& args, index_t row_begin, index_t row_end, T* scratch);
};

// Returns null when that instruction set was not compiled in (non-x86 hosts).
const KernelTable<float>* avx512_table_f32();
const KernelTable<float>* avx2_table_f32();
const KernelTable<float>* generic_table_f32();
const KernelTable<double>* generic_table_f64();

// Backward, shared by every instruction set (O(N d) work: it is memory-bound, not worth ISA
// copies).
//
// Per group vector i with n_i = l2(z_i) (or z_i when l2 is off), c_i = codebook[idx_i],
// g_i = dL/dquantized_i and w_i = dL/dloss_rows_i (loss_rows_i = (1 + beta) ||c_i - n_i||^2 whose
// straight-through surrogate sends beta's share to n and the rest to the codebook):
//   dL/dn_i = g_i + 2 beta w_i (n_i - c_i)
//   dL/dz_i = (dL/dn_i - n_i <n_i, dL/dn_i>) / ||z_i||   if ||z_i|| >= eps   (l2 on)
//           = dL/dn_i / eps                             otherwise           (l2 on)
//           = dL/dn_i                                                        (l2 off)
template <typename T>
void backward_z_rows(const T* z, const T* grad_quantized, const T* grad_loss_rows,
                     const T* codebook, const int64_t* indices, int dim, T beta, T eps,
                     bool l2_normalize, index_t row_begin, index_t row_end, T* grad_z);

// dL/dC_j = sum over rows i with idx_i = j of 2 w_i (c_j - n_i), without races and in a fixed
// order: rows are grouped by code (group_rows_by_code, serial), then each code that some row
// chose sums its rows in increasing row order (codebook_grad_codes, parallel over those codes);
// the other codes' gradients are zero. The result is bitwise deterministic whatever the thread
// count.
//
// group_rows_by_code: rows_by_code lists the rows ordered by (code, row); the g-th distinct code
// is used_codes[g], its rows rows_by_code[group_start[g], group_start[g + 1]). Returns the number
// of distinct codes. A radix sort of the rows when N is small against V, O(N log V), else a
// counting sort, O(N + V).
index_t group_rows_by_code(const int64_t* indices, index_t num_rows, index_t num_codes,
                           int64_t* rows_by_code, int64_t* used_codes,
                           int64_t* group_start /* num_rows + 1 */);

// The gradient rows of codes used_codes[group_begin, group_end); the other rows are left alone.
template <typename T>
void codebook_grad_codes(const T* z, const T* grad_loss_rows, const T* codebook,
                         const int64_t* used_codes, const int64_t* group_start,
                         const int64_t* rows_by_code, int dim, T eps, bool l2_normalize,
                         index_t group_begin, index_t group_end, T* grad_codebook);

}  // namespace gsq_cpu
