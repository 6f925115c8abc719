// lipfast::relu_conv2d's forward, shared by its schema file (relu_conv.cpp,
// where it is the CompositeExplicitAutograd kernel) and its autograd kernel
// (autograd/relu_conv_autograd.cpp).
#pragma once

#include <ATen/ATen.h>

namespace lipfast {
namespace ops {

// conv2d(relu(y), weight, bias, stride, padding, dilation, groups), autocast off.
at::Tensor relu_conv2d_forward(const at::Tensor& y, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups);

}  // namespace ops
}  // namespace lipfast
