// The CPU kernels for any CPU the compiler targets by default (SSE2 on x86-64, NEON on arm64),
// the float64 path (used by gradcheck), and the backward, which is O(N d) and memory-bound.
#include <algorithm>
#include <vector>  // safe here: this file is built for the default target (see gsq_cpu_kernels.h)

#include "gsq_cpu_kernels.h"

#define GSQ_CPU_ISA generic
#define GSQ_CPU_ISA_NAME "generic"
#include "gsq_cpu_kernels_impl.h"

namespace gsq_cpu {

const KernelTable<float>* generic_table_f32() { return &generic::Table<float, 4>::value; }
const KernelTable<double>* generic_table_f64() { return &generic::Table<double, 2>::value; }

template <typename T>
void backward_z_rows(const T* z, const T* grad_quantized, const T* grad_loss_rows,
                     const T* codebook, const int64_t* indices, int dim, T beta, T eps,
                     bool l2_normalize, index_t row_begin, index_t row_end, T* grad_z) {
  const index_t d = dim;
  std::vector<T> n(d);
  std::vector<T> grad_n(d);
  for (index_t row = row_begin; row < row_end; ++row) {
    const T* z_row = z + row * d;
    T norm = 0;
    if (l2_normalize) {
      T sum_squares = 0;
      for (index_t k = 0; k < d; ++k) sum_squares += z_row[k] * z_row[k];
      norm = generic::square_root(sum_squares);
    }
    const bool clamped = norm < eps;  // l2(z) = z / eps there, whose Jacobian is I / eps
    const T denom = clamped ? eps : norm;
    generic::normalize_row(z_row, d, eps, l2_normalize, n.data());

    const T* code = codebook + indices[row] * d;
    const T commit = 2 * beta * grad_loss_rows[row];
    T n_dot_grad_n = 0;
    for (index_t k = 0; k < d; ++k) {
      grad_n[k] = grad_quantized[row * d + k] + commit * (n[k] - code[k]);
      n_dot_grad_n += n[k] * grad_n[k];
    }
    T* out = grad_z + row * d;
    if (!l2_normalize) {
      for (index_t k = 0; k < d; ++k) out[k] = grad_n[k];
    } else if (clamped) {
      for (index_t k = 0; k < d; ++k) out[k] = grad_n[k] / eps;
    } else {
      // (I - n n^T) / ||z|| applied to dL/dn: the Jacobian of z / ||z|| is symmetric.
      for (index_t k = 0; k < d; ++k) out[k] = (grad_n[k] - n[k] * n_dot_grad_n) / denom;
    }
  }
}

index_t group_rows_by_code(const int64_t* indices, index_t num_rows, index_t num_codes,
                           int64_t* rows_by_code, int64_t* used_codes, int64_t* group_start) {
  index_t groups = 0;
  if (num_rows * 8 < num_codes) {
    // Few rows: a radix sort of the rows by code, kRadixBits per pass, no pass over the codebook.
    // Each pass is stable, so a code's rows stay in increasing order.
    constexpr int kRadixBits = 11;
    constexpr int64_t kRadix = int64_t{1} << kRadixBits;
    std::vector<int64_t> next(num_rows);
    std::vector<index_t> slot(kRadix + 1);
    for (index_t i = 0; i < num_rows; ++i) rows_by_code[i] = i;
    for (int shift = 0; ((num_codes - 1) >> shift) > 0; shift += kRadixBits) {
      const auto digit = [&](int64_t row) { return (indices[row] >> shift) & (kRadix - 1); };
      std::fill(slot.begin(), slot.end(), 0);
      for (index_t i = 0; i < num_rows; ++i) slot[digit(rows_by_code[i]) + 1] += 1;
      for (int64_t r = 0; r < kRadix; ++r) slot[r + 1] += slot[r];
      for (index_t i = 0; i < num_rows; ++i) next[slot[digit(rows_by_code[i])]++] = rows_by_code[i];
      std::copy(next.begin(), next.end(), rows_by_code);
    }
    for (index_t p = 0; p < num_rows; ++p) {
      const int64_t code = indices[rows_by_code[p]];
      if (p == 0 || code != indices[rows_by_code[p - 1]]) {
        used_codes[groups] = code;
        group_start[groups++] = p;
      }
    }
  } else {
    // A counting sort over the codes, filled in increasing row order.
    std::vector<int64_t> start(num_codes + 1, 0);
    for (index_t i = 0; i < num_rows; ++i) start[indices[i] + 1] += 1;
    for (index_t j = 0; j < num_codes; ++j) {
      if (start[j + 1] > 0) {
        used_codes[groups] = j;
        group_start[groups++] = start[j];
      }
      start[j + 1] += start[j];
    }
    for (index_t i = 0; i < num_rows; ++i) rows_by_code[start[indices[i]]++] = i;
  }
  group_start[groups] = num_rows;
  return groups;
}

template <typename T>
void codebook_grad_codes(const T* z, const T* grad_loss_rows, const T* codebook,
                         const int64_t* used_codes, const int64_t* group_start,
                         const int64_t* rows_by_code, int dim, T eps, bool l2_normalize,
                         index_t group_begin, index_t group_end, T* grad_codebook) {
  // dL/dC_j = 2 * (sum_i w_i) * c_j - 2 * sum_i w_i n_i, accumulated in double.
  const index_t d = dim;
  std::vector<double> weighted_n(d);
  std::vector<T> n(d);
  for (index_t g = group_begin; g < group_end; ++g) {
    double weight_sum = 0;
    for (index_t k = 0; k < d; ++k) weighted_n[k] = 0;
    for (int64_t p = group_start[g]; p < group_start[g + 1]; ++p) {
      const int64_t row = rows_by_code[p];
      const double w = grad_loss_rows[row];
      generic::normalize_row(z + row * d, d, eps, l2_normalize, n.data());
      weight_sum += w;
      for (index_t k = 0; k < d; ++k) weighted_n[k] += w * n[k];
    }
    const T* code = codebook + used_codes[g] * d;
    T* out = grad_codebook + used_codes[g] * d;
    for (index_t k = 0; k < d; ++k) {
      out[k] = static_cast<T>(2.0 * (weight_sum * code[k] - weighted_n[k]));
    }
  }
}

template void backward_z_rows<float>(const float*, const float*, const float*, const float*,
                                     const int64_t*, int, float, float, bool, index_t, index_t,
                                     float*);
template void backward_z_rows<double>(const double*, const double*, const double*, const double*,
                                      const int64_t*, int, double, double, bool, index_t, index_t,
                                      double*);
template void codebook_grad_codes<float>(const float*, const float*, const float*, const int64_t*,
                                         const int64_t*, const int64_t*, int, float, bool, index_t,
                                         index_t, float*);
template void codebook_grad_codes<double>(const double*, const double*, const double*,
                                          const int64_t*, const int64_t*, const int64_t*, int,
                                          double, bool, index_t, index_t, double*);

}  // namespace gsq_cpu
