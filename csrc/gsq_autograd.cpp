// The gradient of the fused forwards (gsq::quantize_forward, gsq::quantize_forward_sorted) for
// every device: an autograd::Function whose backward is gsq::quantize_backward, registered for the
// Autograd key. In C++ rather than through torch.library.register_autograd: the Python formula
// cost ~40 us of interpreter time per forward+backward call (2,048 rows), half as much as the
// backward kernel itself at V = 262,144. gsq_kernels/ops.py still differentiates the Python-level
// ops (the Triton forward, the exact lookup's custom op) through register_quantize_autograd.
//
// The formula (docs/spec.md, "Gradients"): both forwards return (quantized, indices, loss_rows);
// indices are not differentiable, and the gradients depend only on them, so the backward needs
// z, codebook, indices and the scalars. An output that received no gradient is passed as zeros.
#include <torch/autograd.h>
#include <torch/library.h>

#include "gsq_compute_dtype.h"

namespace gsq_autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_quantized,
                                                 const at::Tensor& grad_loss_rows,
                                                 const at::Tensor& z, const at::Tensor& codebook,
                                                 const at::Tensor& indices, double beta, double eps,
                                                 bool l2_normalize) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gsq::quantize_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, double, double, bool)>();
  return op.call(grad_quantized, grad_loss_rows, z, codebook, indices, beta, eps, l2_normalize);
}

using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                        const at::Tensor&, double,
                                                                        double, bool);

// OpName: the forward op this Function differentiates (a class per op, so each keeps its handle).
template <const char* OpName>
class QuantizeFunction : public torch::autograd::Function<QuantizeFunction<OpName>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z,
                               const at::Tensor& codebook, double beta, double eps,
                               bool l2_normalize) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(OpName, "").typed<ForwardSignature>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [quantized, indices, loss_rows] = op.call(z, codebook, beta, eps, l2_normalize);
    ctx->save_for_backward({z, codebook, indices});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["l2_normalize"] = l2_normalize;
    ctx->mark_non_differentiable({indices});
    return {quantized, indices, loss_rows};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& z = saved[0];
    const at::Tensor& codebook = saved[1];
    at::Tensor grad_quantized = grads[0].defined() ? grads[0] : at::zeros_like(z);
    at::Tensor grad_loss_rows = grads[2];
    if (!grad_loss_rows.defined()) {
      grad_loss_rows = at::zeros({z.size(0)}, z.options().dtype(gsq_glue::compute_dtype(z)));
    }
    auto [grad_z, grad_codebook] = call_backward(
        grad_quantized, grad_loss_rows, z, codebook, saved[2], ctx->saved_data["beta"].toDouble(),
        ctx->saved_data["eps"].toDouble(), ctx->saved_data["l2_normalize"].toBool());
    return {grad_z, grad_codebook, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <const char* OpName>
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_autograd(const at::Tensor& z,
                                                                 const at::Tensor& codebook,
                                                                 double beta, double eps,
                                                                 bool l2_normalize) {
  const variable_list out = QuantizeFunction<OpName>::apply(z, codebook, beta, eps, l2_normalize);
  return {out[0], out[1], out[2]};
}

constexpr char kQuantizeForward[] = "gsq::quantize_forward";
constexpr char kQuantizeForwardSorted[] = "gsq::quantize_forward_sorted";

}  // namespace
}  // namespace gsq_autograd

TORCH_LIBRARY_IMPL(gsq, Autograd, m) {
  m.impl("quantize_forward", &gsq_autograd::quantize_autograd<gsq_autograd::kQuantizeForward>);
  m.impl("quantize_forward_sorted",
         &gsq_autograd::quantize_autograd<gsq_autograd::kQuantizeForwardSorted>);
}
