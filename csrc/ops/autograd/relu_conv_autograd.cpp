// Autograd kernel of lipfast::relu_conv2d (schema and forward: ../relu_conv.cpp).
//
// Saves y (the caller's tensor, no copy) and the weight instead of relu(y). In
// backward: r = relu(y) is recomputed (one elementwise pass, only when the weight
// gradient needs it; the input gradient reads only r's shape and memory format,
// so y stands in for it), aten::convolution_backward gives the input, weight and
// bias gradients, and aten::threshold_backward masks the input gradient with
// y > 0 (torch's ReLU gradient: 0 at y == 0 and at NaN). The backward is made of
// differentiable ATen ops, so double backward works. Written in C++ so that a
// training step pays no Python per call (HRNet-W48 has 130 of these pairs).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../relu_conv.h"

namespace lipfast {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ReluConv2dFunction : public torch::autograd::Function<ReluConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    at::Tensor out;
    {
      // Through the dispatcher below autograd (not a direct call), so that
      // dispatch modes and tracers see lipfast::relu_conv2d as one op.
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lipfast::relu_conv2d", "")
                           .typed<decltype(relu_conv2d_forward)>();
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(y, weight, bias, stride, padding, dilation, groups);
    }
    ctx->save_for_backward({y, weight});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["bias_size"] = has_bias ? bias->size(0) : int64_t(-1);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& y = saved[0];
    const at::Tensor& weight = saved[1];
    const int64_t bias_size = ctx->saved_data["bias_size"].toInt();
    const bool need_y = ctx->needs_input_grad(0);
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_b = bias_size >= 0 && ctx->needs_input_grad(2);
    // One entry per forward argument; needs_input_grad counts the tensor
    // arguments only (y 0, weight 1, bias 2 when given), which come first.
    variable_list out(7);
    if (!(need_y || need_w || need_b)) return out;
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const at::Tensor r = need_w ? at::relu(y) : y;
    std::vector<int64_t> bias_sizes;
    if (bias_size >= 0) bias_sizes.push_back(bias_size);
    auto g = at::convolution_backward(
        grads[0], r, weight,
        bias_size >= 0 ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(),
        stride, padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
        {need_y, need_w, need_b});
    if (need_y) out[0] = at::threshold_backward(std::get<0>(g), y, 0);
    if (need_w) out[1] = std::get<1>(g);
    if (need_b) out[2] = std::get<2>(g);
    return out;
  }
};

at::Tensor relu_conv2d_autograd(const at::Tensor& y, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  return ReluConv2dFunction::apply(y, weight, bias, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, Autograd, m) {
  m.impl("relu_conv2d", &relu_conv2d_autograd);
}

}  // namespace ops
}  // namespace lipfast
