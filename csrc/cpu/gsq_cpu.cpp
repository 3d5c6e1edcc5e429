// Torch glue for the CPU kernels: argument checks, allocation, dtype handling, picking the
// instruction set at run time, and splitting the work over threads with at::parallel_for (ATen's
// OpenMP pool, so torch.set_num_threads applies and only one OpenMP runtime is loaded).
// The arithmetic lives in gsq_cpu_kernels_impl.h and gsq_cpu_isa_generic.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gsq_compute_dtype.h"
#include "gsq_cpu_kernels.h"
#include "gsq_cpu_refine.h"
#include "gsq_cpu_sorted_search.h"
#include "gsq_sorted_search_checks.h"
#include "gsq_workspace.h"

namespace gsq_cpu {
namespace {

enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

bool cpu_supports(int isa) {
  if (isa == kGeneric) return true;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (isa == kAvx2) {
    return avx2_table_f32() != nullptr && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }
  if (isa == kAvx512) {
    return avx512_table_f32() != nullptr && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  }
#endif
  return false;
}

int best_supported_isa() {
  for (int isa = kAvx512; isa > kGeneric; --isa) {
    if (cpu_supports(isa)) return isa;
  }
  return kGeneric;
}

// -1 for "auto", -2 for an unknown name.
int parse_isa(const std::string& name) {
  if (name.empty() || name == "auto") return -1;
  for (int isa = kGeneric; isa <= kAvx512; ++isa) {
    if (name == kIsaNames[isa]) return isa;
  }
  return -2;
}

std::atomic<int> g_active_isa{-1};

int active_isa() {
  int isa = g_active_isa.load();
  if (isa >= 0) return isa;
  isa = best_supported_isa();
  // GSQ_CPU_ISA=generic|avx2|avx512 pins the kernels, e.g. to test every variant on one machine.
  if (const char* requested = std::getenv("GSQ_CPU_ISA")) {
    const int parsed = parse_isa(requested);
    if (parsed == -2) {
      TORCH_WARN("GSQ_CPU_ISA=", requested, " is not one of auto, generic, avx2, avx512; using ",
                 kIsaNames[isa]);
    } else if (parsed >= 0 && !cpu_supports(parsed)) {
      TORCH_WARN("GSQ_CPU_ISA=", requested, " is not supported by this CPU; using ",
                 kIsaNames[isa]);
    } else if (parsed >= 0) {
      isa = parsed;
    }
  }
  g_active_isa.store(isa);
  return isa;
}

std::string cpu_isa(c10::string_view requested_view) {
  const std::string requested(requested_view);
  if (!requested.empty()) {
    const int parsed = parse_isa(requested);
    TORCH_CHECK(parsed != -2, "gsq::cpu_isa: requested must be one of 'auto', 'generic', 'avx2', ",
                "'avx512', got '", requested, "'");
    const int isa = parsed == -1 ? best_supported_isa() : parsed;
    TORCH_CHECK(cpu_supports(isa), "gsq::cpu_isa: this CPU (or this build) does not support ",
                kIsaNames[isa]);
    g_active_isa.store(isa);
  }
  return kIsaNames[active_isa()];
}

const KernelTable<float>* float_table() {
  switch (active_isa()) {
    case kAvx512: return avx512_table_f32();
    case kAvx2: return avx2_table_f32();
    default: return generic_table_f32();
  }
}

using gsq_glue::compute_dtype;

void check_z_and_codebook(const char* op, const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(), op,
              ": expected CPU tensors, got z on ", z.device(), " and codebook on ",
              codebook.device());
  TORCH_CHECK(z.dim() == 2, op, ": z must be (M, d), got shape ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, op, ": codebook must be (V, d), got shape ", codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), op, ": z has d=", z.size(1),
              " but the codebook has width ", codebook.size(1));
  TORCH_CHECK(z.size(1) >= 1, op, ": d must be at least 1");
  // The kernels take d as an int (their offsets are 64-bit); no group size comes near this.
  TORCH_CHECK(z.size(1) <= std::numeric_limits<int32_t>::max(), op, ": d=", z.size(1),
              " exceeds the CPU kernels' limit of ", std::numeric_limits<int32_t>::max());
  TORCH_CHECK(codebook.size(0) >= 1, op, ": the codebook must have at least one code");
  const auto zt = z.scalar_type();
  TORCH_CHECK(zt == at::kFloat || zt == at::kHalf || zt == at::kBFloat16 || zt == at::kDouble, op,
              ": z must be float32, float16, bfloat16 or float64, got ", zt);
  TORCH_CHECK(codebook.scalar_type() == compute_dtype(z), op, ": the codebook must be ",
              compute_dtype(z), " for ", zt, " z, got ", codebook.scalar_type());
}

// The kernels for T: float runs the variant picked for this CPU, double the generic one.
template <typename T>
const KernelTable<T>* kernel_table();
template <>
const KernelTable<float>* kernel_table<float>() {
  return float_table();
}
template <>
const KernelTable<double>* kernel_table<double>() {
  return generic_table_f64();
}

// Runs the forward kernels over z; `args` names the outputs to compute, this fills the inputs.
template <typename T>
void run_forward(const at::Tensor& z, const at::Tensor& codebook, double beta, double eps,
                 bool l2_normalize, ForwardArgs<T> args) {
  const KernelTable<T>* table = kernel_table<T>();
  const int64_t num_rows = z.size(0);
  const int dim = static_cast<int>(z.size(1));  // check_z_and_codebook bounds d
  const int64_t num_codes = codebook.size(0);
  const int lanes = table->lanes;
  const int64_t num_tiles = (num_codes + lanes - 1) / lanes;
  at::Tensor tiles = at::empty({num_tiles * dim * lanes}, z.options());
  at::Tensor bias = at::empty({num_tiles * lanes}, z.options());
  T* tiles_ptr = tiles.data_ptr<T>();
  T* bias_ptr = bias.data_ptr<T>();
  const T* codebook_ptr = codebook.data_ptr<T>();
  at::parallel_for(0, num_tiles, 256, [&](int64_t begin, int64_t end) {
    table->prepare_codebook(codebook_ptr, num_codes, dim, l2_normalize, static_cast<T>(eps),
                            tiles_ptr, bias_ptr, begin, end);
  });
  args.z = z.data_ptr<T>();
  args.dim = dim;
  args.tiles = tiles_ptr;
  args.bias = bias_ptr;
  args.num_tiles = num_tiles;
  args.codebook = codebook_ptr;
  args.eps = static_cast<T>(eps);
  args.l2_normalize = l2_normalize;
  args.loss_scale = static_cast<T>(1.0 + beta);
  at::parallel_for(0, num_rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(static_cast<size_t>(table->rows_per_block) * dim);
    table->forward_rows(args, begin, end, scratch.data());
  });
}

// The forward's outputs, plus the gap to the runner-up when `gap` is defined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_outputs(const char* op, const at::Tensor& z,
                                                               const at::Tensor& codebook,
                                                               double beta, double eps,
                                                               bool l2_normalize,
                                                               const at::Tensor& gap) {
  check_z_and_codebook(op, z, codebook);
  const auto compute = compute_dtype(z);
  const at::Tensor zc = z.to(compute).contiguous();
  const at::Tensor cb = codebook.contiguous();
  at::Tensor quantized = at::empty(z.sizes(), z.options().dtype(compute));
  at::Tensor indices = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  at::Tensor loss_rows = at::empty({z.size(0)}, z.options().dtype(compute));
  if (z.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(compute, "gsq::quantize_forward", [&] {
      ForwardArgs<scalar_t> out;
      out.quantized = quantized.data_ptr<scalar_t>();
      out.indices = indices.data_ptr<int64_t>();
      out.loss_rows = loss_rows.data_ptr<scalar_t>();
      if (gap.defined()) out.gap = gap.data_ptr<scalar_t>();
      run_forward<scalar_t>(zc, cb, beta, eps, l2_normalize, out);
    });
    // A single code has no runner-up, even where its score overflowed (the kernel reports two
    // equal infinite scores as a tie).
    if (gap.defined() && codebook.size(0) == 1) gap.fill_(std::numeric_limits<double>::infinity());
  }
  return {quantized.to(z.scalar_type()), indices, loss_rows};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_forward_cpu(const at::Tensor& z,
                                                                    const at::Tensor& codebook,
                                                                    double beta, double eps,
                                                                    bool l2_normalize) {
  return forward_outputs("gsq::quantize_forward", z, codebook, beta, eps, l2_normalize,
                         at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_forward_with_gap_cpu(
    const at::Tensor& z, const at::Tensor& codebook, double beta, double eps, bool l2_normalize) {
  at::Tensor gap = at::empty({z.size(0)}, z.options().dtype(compute_dtype(z)));
  auto [quantized, indices, loss_rows] =
      forward_outputs("gsq::quantize_forward_with_gap", z, codebook, beta, eps, l2_normalize, gap);
  return {quantized, indices, loss_rows, gap};
}

at::Tensor nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook, double eps,
                            bool l2_normalize) {
  check_z_and_codebook("gsq::nearest_code", z, codebook);
  const auto compute = compute_dtype(z);
  const at::Tensor zc = z.to(compute).contiguous();
  const at::Tensor cb = codebook.contiguous();
  at::Tensor indices = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  if (z.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(compute, "gsq::nearest_code", [&] {
      ForwardArgs<scalar_t> out;
      out.indices = indices.data_ptr<int64_t>();
      run_forward<scalar_t>(zc, cb, 0.0, eps, l2_normalize, out);
    });
  }
  return indices;
}

std::tuple<at::Tensor, at::Tensor> nearest_code_with_gap_cpu(const at::Tensor& z,
                                                             const at::Tensor& codebook, double eps,
                                                             bool l2_normalize) {
  check_z_and_codebook("gsq::nearest_code_with_gap", z, codebook);
  const auto compute = compute_dtype(z);
  const at::Tensor zc = z.to(compute).contiguous();
  const at::Tensor cb = codebook.contiguous();
  at::Tensor indices = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  at::Tensor gap = at::empty({z.size(0)}, z.options().dtype(compute));
  if (z.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(compute, "gsq::nearest_code_with_gap", [&] {
      ForwardArgs<scalar_t> out;
      out.indices = indices.data_ptr<int64_t>();
      out.gap = gap.data_ptr<scalar_t>();
      run_forward<scalar_t>(zc, cb, 0.0, eps, l2_normalize, out);
    });
    // A single code has no runner-up, even where its score overflowed (the kernel reports two
    // equal infinite scores as a tie).
    if (codebook.size(0) == 1) gap.fill_(std::numeric_limits<double>::infinity());
  }
  return {indices, gap};
}

// The exact lookup for d = 1, or d = 2 with l2 on: see gsq_cpu_sorted_search.h. Chunks of codes
// are classified and placed one per thread; rows are searched in parallel.
class SortedSearch {
 public:
  SortedSearch(const at::Tensor& codebook, double eps, bool l2_normalize) : codebook_(codebook) {
    s_.codebook = codebook.data_ptr<float>();
    s_.num_codes = codebook.size(0);
    s_.dim = static_cast<int>(codebook.size(1));
    s_.l2_normalize = l2_normalize;
    s_.eps = static_cast<float>(eps);
    // One chunk of codes per thread, none smaller than 16k codes (each has its own counts).
    chunks_ = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), s_.num_codes / 16384));
    float low = 0, high = 0;
    if (s_.dim == 1) {
      std::vector<float> lows(chunks_), highs(chunks_);
      for_chunks([&](int64_t t, int64_t first, int64_t last) {
        sorted_key_range(s_, first, last, &lows[t], &highs[t]);
      });
      low = *std::min_element(lows.begin(), lows.end());
      high = *std::max_element(highs.begin(), highs.end());
    }
    sorted_choose_buckets(s_, low, high);
    allocate_arrays();
  }

  // Each row's lookup vector, key and bucket (sorted_prepare_rows).
  void prepare_rows(const SortedRows& rows, int64_t num_rows) const {
    at::parallel_for(0, num_rows, 256, [&](int64_t begin, int64_t end) {
      sorted_prepare_rows(s_, rows, begin, end);
    });
  }

  // Buckets the codes within half_window buckets of the given rows' buckets (every code when
  // half_window < 0).
  void build(const int64_t* row_bucket, int64_t num_rows, int64_t half_window) {
    sorted_mark_rows(s_, row_bucket, num_rows, half_window);
    for_chunks(
        [&](int64_t t, int64_t first, int64_t last) { sorted_select_chunk(s_, t, first, last); });
    const bool crowded = sorted_bucket_offsets(s_, chunks_);
    for_chunks([&](int64_t t, int64_t first, int64_t) { sorted_fill_chunk(s_, t, first); });
    if (crowded) {
      at::parallel_for(0, num_built_, 4096,
                       [&](int64_t begin, int64_t end) { sorted_finish_buckets(s_, begin, end); });
    }
  }

  void search(const SortedRows& rows, int64_t begin, int64_t end, int64_t* indices) const {
    at::parallel_for(begin, end, 256, [&](int64_t first, int64_t last) {
      sorted_search_rows(s_, rows, first, last, indices);
    });
  }

 private:
  // The arrays of SortedCodes, carved from one buffer that each calling thread keeps between calls
  // (up to kKeptWorkspaceBytes): fresh pages would fault on every call (glibc returns large blocks
  // to the system on free), which cost a third of a batch-1 lookup at V = 262,144.
  void allocate_arrays() {
    gsq_workspace::Carver size{nullptr};
    carve_arrays(size);
    std::vector<uint8_t>& buffer = size.bytes > kKeptWorkspaceBytes ? own_buffer_ : kept_buffer();
    if (buffer.size() < size.bytes) buffer.resize(size.bytes);
    gsq_workspace::Carver carve{reinterpret_cast<char*>(buffer.data())};
    carve_arrays(carve);
    s_.num_built = &num_built_;
  }

  void carve_arrays(gsq_workspace::Carver& carve) {
    const size_t slots = static_cast<size_t>(s_.num_buckets + 1);
    const size_t codes = static_cast<size_t>(s_.num_codes), dim = static_cast<size_t>(s_.dim);
    s_.built = carve.take<uint8_t>(slots + 1);
    s_.built_list = carve.take<int32_t>(slots);
    s_.chunk_counts = carve.take<int32_t>(static_cast<size_t>(chunks_) * (slots + 1));
    s_.selected = carve.take<int32_t>(codes);
    s_.selected_bucket = carve.take<int32_t>(codes);
    s_.selected_codes = carve.take<float>(codes * dim);
    s_.selected_count = carve.take<int64_t>(static_cast<size_t>(chunks_));
    s_.bucket_start = carve.take<int64_t>(slots);
    s_.bucket_end = carve.take<int64_t>(slots);
    s_.members = carve.take<int32_t>(codes);
    s_.member_codes = carve.take<float>(codes * dim);
  }

  template <typename F>
  void for_chunks(const F& body) {
    const int64_t num_codes = s_.num_codes, chunks = chunks_;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        body(t, t * num_codes / chunks, (t + 1) * num_codes / chunks);
      }
    });
  }

  static constexpr size_t kKeptWorkspaceBytes = size_t{64} << 20;
  static std::vector<uint8_t>& kept_buffer() {
    thread_local std::vector<uint8_t> buffer;
    return buffer;
  }

  at::Tensor codebook_;
  SortedCodes s_{};
  int64_t chunks_ = 1;
  int64_t num_built_ = 0;
  std::vector<uint8_t> own_buffer_;  // when the arrays exceed kKeptWorkspaceBytes
};

// (indices, the rows' lookup vectors n): nearest_code_sorted, for the ops that also need n.
std::tuple<at::Tensor, at::Tensor> sorted_lookup(const char* op, const at::Tensor& z,
                                                 const at::Tensor& codebook, double eps,
                                                 bool l2_normalize) {
  check_z_and_codebook(op, z, codebook);
  gsq_sorted::check_sorted_search(op, z, l2_normalize);
  TORCH_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max(), op, ": V=", codebook.size(0),
              " exceeds the sorted search's limit of ", std::numeric_limits<int32_t>::max());
  const at::Tensor zc = z.to(at::kFloat).contiguous();
  const int64_t rows = z.size(0);
  at::Tensor indices = at::empty({rows}, z.options().dtype(at::kLong));
  at::Tensor vectors = at::empty(zc.sizes(), zc.options());
  if (rows == 0) return {indices, vectors};
  const float* z_ptr = zc.data_ptr<float>();
  int64_t* out = indices.data_ptr<int64_t>();
  SortedSearch search(codebook.contiguous(), eps, l2_normalize);
  at::Tensor keys = at::empty({rows}, zc.options().dtype(at::kDouble));
  at::Tensor buckets = at::empty({rows}, indices.options());
  int64_t* bucket_ptr = buckets.data_ptr<int64_t>();
  const SortedRows prepared{z_ptr, vectors.data_ptr<float>(), keys.data_ptr<double>(), bucket_ptr};
  search.prepare_rows(prepared, rows);
  search.build(bucket_ptr, rows, gsq_sorted::kMarkedHalfWindow);
  search.search(prepared, 0, rows, out);
  // Rows whose search reached an unbuilt bucket (rare: no code near them) are searched again over
  // the buckets within kWideHalfWindow of theirs, then over every code.
  for (const int64_t half_window : {gsq_sorted::kWideHalfWindow, int64_t{-1}}) {
    std::vector<int64_t> again, again_buckets;
    for (int64_t i = 0; i < rows; ++i) {
      if (out[i] >= 0) continue;
      again.push_back(i);
      again_buckets.push_back(bucket_ptr[i]);
    }
    if (again.empty()) break;
    search.build(again_buckets.data(), static_cast<int64_t>(again.size()), half_window);
    for (const int64_t i : again) search.search(prepared, i, i + 1, out);
  }
  return {indices, vectors};
}

at::Tensor nearest_code_sorted_cpu(const at::Tensor& z, const at::Tensor& codebook, double eps,
                                   bool l2_normalize) {
  return std::get<0>(sorted_lookup("gsq::nearest_code_sorted", z, codebook, eps, l2_normalize));
}

// quantize_forward's outputs at the sorted search's indices: quantized = c_idx (in z's dtype),
// loss_rows = (1 + beta) ||c_idx - n||^2 in float32 with n the lookup vector.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_forward_sorted_cpu(
    const at::Tensor& z, const at::Tensor& codebook, double beta, double eps, bool l2_normalize) {
  auto [indices, vectors] =
      sorted_lookup("gsq::quantize_forward_sorted", z, codebook, eps, l2_normalize);
  const at::Tensor cb = codebook.contiguous();
  const int64_t rows = z.size(0);
  const int dim = static_cast<int>(z.size(1));  // 1 or 2
  at::Tensor quantized = at::empty({rows, dim}, vectors.options());
  at::Tensor loss_rows = at::empty({rows}, vectors.options());
  const float* n_ptr = vectors.data_ptr<float>();
  const float* code_ptr = cb.data_ptr<float>();
  const int64_t* index_ptr = indices.data_ptr<int64_t>();
  float* quantized_ptr = quantized.data_ptr<float>();
  float* loss_ptr = loss_rows.data_ptr<float>();
  const float loss_scale = static_cast<float>(1.0 + beta);
  at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* code = code_ptr + index_ptr[i] * dim;
      float distance = 0;
      for (int k = 0; k < dim; ++k) {
        const float difference = code[k] - n_ptr[i * dim + k];
        quantized_ptr[i * dim + k] = code[k];
        distance += difference * difference;
      }
      loss_ptr[i] = loss_scale * distance;
    }
  });
  return {quantized.to(z.scalar_type()), indices, loss_rows};
}

at::Tensor refine_nearest_code_cpu(const at::Tensor& vectors, const at::Tensor& codes_t,
                                   const at::Tensor& bias, const at::Tensor& threshold) {
  const char* op = "gsq::refine_nearest_code";
  TORCH_CHECK(vectors.device().is_cpu() && codes_t.device().is_cpu() && bias.device().is_cpu() &&
                  threshold.device().is_cpu(),
              op, ": expected CPU tensors");
  TORCH_CHECK(vectors.dim() == 2 && codes_t.dim() == 2 && vectors.size(1) == codes_t.size(0), op,
              ": vectors must be (A, d) and codes_t (d, V), got ", vectors.sizes(), " and ",
              codes_t.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == codes_t.size(1), op, ": bias must be (",
              codes_t.size(1), ",), got ", bias.sizes());
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == vectors.size(0), op,
              ": threshold must be (", vectors.size(0), ",), got ", threshold.sizes());
  for (const at::Tensor* t : {&vectors, &codes_t, &bias, &threshold}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": every input must be float32, got ",
                t->scalar_type());
  }
  TORCH_CHECK(vectors.size(1) <= std::numeric_limits<int32_t>::max(), op, ": d too large");
  const at::Tensor v = vectors.contiguous(), c = codes_t.contiguous(), b = bias.contiguous();
  const at::Tensor t = threshold.contiguous();
  at::Tensor indices = at::empty({vectors.size(0)}, vectors.options().dtype(at::kLong));
  const float *v_ptr = v.data_ptr<float>(), *c_ptr = c.data_ptr<float>();
  const float *b_ptr = b.data_ptr<float>(), *t_ptr = t.data_ptr<float>();
  int64_t* out = indices.data_ptr<int64_t>();
  const int dim = static_cast<int>(vectors.size(1));
  const int64_t num_codes = codes_t.size(1);
  at::parallel_for(0, vectors.size(0), 4, [&](int64_t begin, int64_t end) {
    refine_rows(v_ptr, dim, c_ptr, b_ptr, num_codes, t_ptr, begin, end, out);
  });
  return indices;
}

template <typename T>
void run_backward(const at::Tensor& grad_quantized, const at::Tensor& grad_loss_rows,
                  const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& indices,
                  double beta, double eps, bool l2_normalize, at::Tensor& grad_z,
                  at::Tensor& grad_codebook) {
  const int64_t num_rows = z.size(0);
  const int dim = static_cast<int>(z.size(1));  // check_z_and_codebook bounds d
  const int64_t num_codes = codebook.size(0);
  const T* z_ptr = z.data_ptr<T>();
  const T* gq_ptr = grad_quantized.data_ptr<T>();
  const T* gl_ptr = grad_loss_rows.data_ptr<T>();
  const T* cb_ptr = codebook.data_ptr<T>();
  const int64_t* idx_ptr = indices.data_ptr<int64_t>();
  T* gz_ptr = grad_z.data_ptr<T>();
  T* gc_ptr = grad_codebook.data_ptr<T>();
  at::parallel_for(0, num_rows, 1024, [&](int64_t begin, int64_t end) {
    backward_z_rows<T>(z_ptr, gq_ptr, gl_ptr, cb_ptr, idx_ptr, dim, static_cast<T>(beta),
                       static_cast<T>(eps), l2_normalize, begin, end, gz_ptr);
  });
  // Only the codes some row chose have a non-zero gradient: O(N) work past zeroing the rest.
  grad_codebook.zero_();
  at::Tensor rows_by_code = at::empty({num_rows}, indices.options());
  at::Tensor used_codes = at::empty({num_rows}, indices.options());
  at::Tensor group_start = at::empty({num_rows + 1}, indices.options());
  int64_t* rows_ptr = rows_by_code.data_ptr<int64_t>();
  int64_t* used_ptr = used_codes.data_ptr<int64_t>();
  int64_t* start_ptr = group_start.data_ptr<int64_t>();
  const int64_t groups =
      group_rows_by_code(idx_ptr, num_rows, num_codes, rows_ptr, used_ptr, start_ptr);
  at::parallel_for(0, groups, 64, [&](int64_t begin, int64_t end) {
    codebook_grad_codes<T>(z_ptr, gl_ptr, cb_ptr, used_ptr, start_ptr, rows_ptr, dim,
                           static_cast<T>(eps), l2_normalize, begin, end, gc_ptr);
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_backward_cpu(const at::Tensor& grad_quantized,
                                                         const at::Tensor& grad_loss_rows,
                                                         const at::Tensor& z,
                                                         const at::Tensor& codebook,
                                                         const at::Tensor& indices, double beta,
                                                         double eps, bool l2_normalize) {
  check_z_and_codebook("gsq::quantize_backward", z, codebook);
  const int64_t num_rows = z.size(0);
  const int64_t num_codes = codebook.size(0);
  TORCH_CHECK(grad_quantized.sizes() == z.sizes(), "gsq::quantize_backward: grad_quantized has ",
              "shape ", grad_quantized.sizes(), ", expected ", z.sizes());
  TORCH_CHECK(grad_loss_rows.dim() == 1 && grad_loss_rows.size(0) == num_rows,
              "gsq::quantize_backward: grad_loss_rows must be (", num_rows, ",), got ",
              grad_loss_rows.sizes());
  TORCH_CHECK(
      indices.dim() == 1 && indices.size(0) == num_rows && indices.scalar_type() == at::kLong,
      "gsq::quantize_backward: indices must be int64 of shape (", num_rows, ",)");
  const auto compute = compute_dtype(z);
  const at::Tensor zc = z.to(compute).contiguous();
  const at::Tensor gq = grad_quantized.to(compute).contiguous();
  const at::Tensor gl = grad_loss_rows.to(compute).contiguous();
  const at::Tensor cb = codebook.contiguous();
  const at::Tensor idx = indices.contiguous();
  if (num_rows > 0) {
    // An out-of-range index would make the codebook gather and scatter read and write out of
    // bounds; indices come from quantize_forward, but this op is public.
    const int64_t* p = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < num_rows; ++i) {
      TORCH_CHECK(p[i] >= 0 && p[i] < num_codes, "gsq::quantize_backward: indices[", i,
                  "] = ", p[i], " is outside [0, ", num_codes, ")");
    }
  }
  at::Tensor grad_z = at::empty(z.sizes(), z.options().dtype(compute));
  at::Tensor grad_codebook = at::empty(codebook.sizes(), codebook.options());  // zeroed there
  if (compute == at::kDouble) {
    run_backward<double>(gq, gl, zc, cb, idx, beta, eps, l2_normalize, grad_z, grad_codebook);
  } else {
    run_backward<float>(gq, gl, zc, cb, idx, beta, eps, l2_normalize, grad_z, grad_codebook);
  }
  return {grad_z.to(z.scalar_type()), grad_codebook};
}

}  // namespace
}  // namespace gsq_cpu

TORCH_LIBRARY_IMPL(gsq, CPU, m) {
  m.impl("quantize_forward", &gsq_cpu::quantize_forward_cpu);
  m.impl("quantize_backward", &gsq_cpu::quantize_backward_cpu);
  m.impl("nearest_code", &gsq_cpu::nearest_code_cpu);
  m.impl("nearest_code_with_gap", &gsq_cpu::nearest_code_with_gap_cpu);
  m.impl("quantize_forward_with_gap", &gsq_cpu::quantize_forward_with_gap_cpu);
  m.impl("nearest_code_sorted", &gsq_cpu::nearest_code_sorted_cpu);
  m.impl("quantize_forward_sorted", &gsq_cpu::quantize_forward_sorted_cpu);
  m.impl("refine_nearest_code", &gsq_cpu::refine_nearest_code_cpu);
}

TORCH_LIBRARY_FRAGMENT(gsq, m) {
  // Which CPU kernel variant runs: "" reads it, a name ("auto", "generic", "avx2", "avx512") sets
  // it.
  m.def("cpu_isa(str requested) -> str", &gsq_cpu::cpu_isa);
}
