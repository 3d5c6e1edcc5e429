// Declares every gsq op (the schemas); each backend registers its kernels for its dispatch key in
// its own file (cpu/gsq_cpu.cpp, cuda/gsq_cuda.cpp), gsq_autograd.cpp differentiates the fused
// forwards, and gsq_kernels/ops.py registers the fake (shape) functions, so torch.compile traces
// the ops without graph breaks.
//
// The ops work on flattened group vectors: z is (M, d) with M = (number of positions) * G, and
// codebook is (V, d), float32 (float64 for float64 z). Layout handling lives in Python.
#include <Python.h>
#include <torch/library.h>

// `import gsq_kernels._C` loads this library and, through its static initializers, the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(gsq, m) {
  // quantized: (M, d) in z's dtype, the raw codebook rows c_idx (the straight-through output).
  // indices: (M,) int64 in [0, V). loss_rows: (M,) float, (1 + beta) * ||c_idx - l2(z)||^2; the
  // quantizer loss is its sum divided by M * d. Its gradient is the straight-through surrogate:
  // beta's share reaches z (commitment), the rest reaches the codebook.
  m.def(
      "quantize_forward(Tensor z, Tensor codebook, float beta, float eps, bool l2_normalize) "
      "-> (Tensor quantized, Tensor indices, Tensor loss_rows)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "quantize_backward(Tensor grad_quantized, Tensor grad_loss_rows, Tensor z, Tensor codebook, "
      "Tensor indices, float beta, float eps, bool l2_normalize) "
      "-> (Tensor grad_z, Tensor grad_codebook)",
      {at::Tag::pt2_compliant_tag});
  // The lookup alone (inference, tokenization): indices (M,) int64.
  m.def("nearest_code(Tensor z, Tensor codebook, float eps, bool l2_normalize) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // The lookup plus its margin, for exact nearest codes: indices as nearest_code, and
  // gap (M,) float32 (float64 for float64 z) = s_best - s_second, the winner's score minus the best
  // score of any other code (0 on a tie; +inf when V == 1 and for rows holding NaN/inf), in the
  // units of the scores
  //   l2 on : s_j = <n, c_j / max(||c_j||, eps)>, n = z / max(||z||, eps)
  //   l2 off: s_j = <z, c_j> - ||c_j||^2 / 2.
  // The caller re-decides in higher precision only the rows whose gap is within rounding error.
  m.def(
      "nearest_code_with_gap(Tensor z, Tensor codebook, float eps, bool l2_normalize) "
      "-> (Tensor indices, Tensor gap)",
      {at::Tag::pt2_compliant_tag});
  // quantize_forward and the gap of nearest_code_with_gap in one pass: the exact lookup's forward,
  // which re-decides only the rows whose gap is within rounding error.
  m.def(
      "quantize_forward_with_gap(Tensor z, Tensor codebook, float beta, float eps, "
      "bool l2_normalize) -> (Tensor quantized, Tensor indices, Tensor loss_rows, Tensor gap)",
      {at::Tag::pt2_compliant_tag});
  // The exact nearest codes for d = 1, and d = 2 with l2 on: indices (M,) int64, the index j
  // minimizing ||n - c^_j||^2 (lowest index on ties; 0 for rows holding NaN/inf), ranked over
  // the lookup vectors n = l2(z), c^_j = l2(c_j) with the norm taken in float64 and rounded once
  // to float32 (raw z and c_j when l2 is off), as if computed exactly. z float32/16/bf16.
  m.def("nearest_code_sorted(Tensor z, Tensor codebook, float eps, bool l2_normalize) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // quantize_forward with the indices of nearest_code_sorted (same inputs and limits): the exact
  // lookup's forward for d = 1, and d = 2 with l2 on, in one call. loss_rows is computed from the
  // lookup vector n = l2(z) that the search ranks.
  m.def(
      "quantize_forward_sorted(Tensor z, Tensor codebook, float beta, float eps, "
      "bool l2_normalize) -> (Tensor quantized, Tensor indices, Tensor loss_rows)",
      {at::Tag::pt2_compliant_tag});
  // The exact lookup's refinement (CPU): indices (A,) int64, for each row of the lookup vectors
  // (A, d) float32 the code j minimizing ||n - c_j||^2 in float64 (lowest index on ties) among
  // those whose float32 score <n, c_j> + bias_j reaches threshold (A,); -1 where none does.
  // codes_t (d, V) holds the lookup vectors c_j transposed, bias (V,) float32.
  m.def(
      "refine_nearest_code(Tensor vectors, Tensor codes_t, Tensor bias, Tensor threshold) -> "
      "Tensor",
      {at::Tag::pt2_compliant_tag});
}
