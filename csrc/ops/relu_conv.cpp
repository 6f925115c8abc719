// Schema of lipfast::relu_conv2d, conv2d(relu(y)) that keeps y for backward
// instead of relu(y) (lipfast.ops.relu_conv2d; docs in lipfast/ops/relu_conv.py).
//
// Forward kernel: here, CompositeExplicitAutograd (the same ATen calls on every
// backend: ATen's ReLU, then ATen's convolution, i.e. oneDNN on CPU and cuDNN on
// CUDA). Autograd kernel: autograd/relu_conv_autograd.cpp (saves y and the
// weight, recomputes the ReLU in backward). Fake kernel: lipfast/ops/relu_conv.py.
#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "relu_conv.h"

namespace lipfast {
namespace ops {

at::Tensor relu_conv2d_forward(const at::Tensor& y, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  // The op computes in the dtypes it is given: the Python wrapper applies
  // autocast's casts before calling it, so the inner convolution must not be cast
  // again (the autocast keys fall through to here for this op).
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::convolution(at::relu(y), weight, bias, stride, padding, dilation,
                         /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
}

TORCH_LIBRARY_FRAGMENT(lipfast, m) {
  // B x C_in x H x W y, C_out x C_in/groups x kH x kW weight, optional (C_out,)
  // bias; stride, padding and dilation as two ints each. Same value as
  // conv2d(relu(y), ...).
  m.def(
      "relu_conv2d(Tensor y, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(lipfast, CompositeExplicitAutograd, m) {
  m.impl("relu_conv2d", &relu_conv2d_forward);
}

}  // namespace ops
}  // namespace lipfast
