// In-Place Activated BatchNorm: shared declarations for every backend.
//
// The op family (schemas in abn.cpp):
//   abn_stats            per-channel batch mean and biased variance
//   abn_forward_         y = act(w~ * (x - mean) / sqrt(var + eps) + b), written into x
//   abn_backward_reduce  per-channel sums of dz and x_hat * dz, recovered from y
//   abn_backward_elemt   dx from y, dy and the (possibly all-reduced) sums
// with w~ = |w| + eps. Collectives (InPlaceABNSync) and autograd live in Python
// (lipfast/ops/abn.py): the forward mutates its input, which torch.library's
// register_autograd does not accept, so an autograd.Function composes these ops.
#pragma once

#include <ATen/ATen.h>
#include <string>
#include <tuple>

namespace lipfast {
namespace ops {

enum class Activation : int { Identity = 0, LeakyRelu = 1, Elu = 2 };

// Parses the activation name. Only invertible activations are accepted here:
// plain relu is rejected because y = 0 loses x.
inline Activation parse_activation(const std::string& name, double param) {
  if (name == "identity" || name == "none") return Activation::Identity;
  if (name == "leaky_relu") {
    TORCH_CHECK_VALUE(param > 0, "lipfast.abn: leaky_relu slope must be positive for the in-place "
                      "ABN ops (the activation is inverted in backward), got ", param);
    return Activation::LeakyRelu;
  }
  if (name == "elu") {
    TORCH_CHECK_VALUE(param > 0, "lipfast.abn: elu alpha must be positive, got ", param);
    return Activation::Elu;
  }
  TORCH_CHECK_VALUE(false, "lipfast.abn: unsupported activation '", name,
                    "' (expected 'leaky_relu', 'elu' or 'identity'; 'relu' is not invertible)");
}

// Shape and dtype checks shared by all backends. Returns the channel count.
inline int64_t check_abn_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "lipfast.abn: ", what, " must have shape (N, C, *), got ",
                    x.dim(), " dimension(s)");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "lipfast.abn: ", what,
                   " must be floating point, got ", x.scalar_type());
  return x.size(1);
}

inline void check_channel_param(const c10::optional<at::Tensor>& t, const at::Tensor& x,
                                const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), "lipfast.abn: ", name,
                    " must have shape (", x.size(1), ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), "lipfast.abn: ", name, " is on ", t->device(),
                    " but the input is on ", x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "lipfast.abn: ", name,
                   " must be floating point, got ", t->scalar_type());
}

inline void check_channel_param(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_channel_param(c10::optional<at::Tensor>(t), x, name);
}

// The dtype in which statistics are kept and returned: float64 for float64 input,
// float32 otherwise (half and bfloat16 inputs keep float32 statistics).
inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-channel folded parameters, as contiguous tensors of the statistics dtype.
// w~ = |w| + eps (1 when there is no weight), b = bias (0 when there is none).
inline at::Tensor effective_weight(const c10::optional<at::Tensor>& w, const at::Tensor& x,
                                   double eps) {
  if (w.has_value() && w->defined()) return (w->to(stats_dtype(x)).abs() + eps).contiguous();
  return at::ones({x.size(1)}, x.options().dtype(stats_dtype(x)));
}
inline at::Tensor effective_bias(const c10::optional<at::Tensor>& b, const at::Tensor& x) {
  if (b.has_value() && b->defined()) return b->to(stats_dtype(x)).contiguous();
  return at::zeros({x.size(1)}, x.options().dtype(stats_dtype(x)));
}

// grad_output must match the saved output.
inline void check_grad_output(const at::Tensor& y, const at::Tensor& dy) {
  TORCH_CHECK_VALUE(dy.sizes() == y.sizes(), "lipfast.abn: grad_output has shape ", dy.sizes(),
                    " but the output has shape ", y.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == y.scalar_type(), "lipfast.abn: grad_output dtype ",
                   dy.scalar_type(), " differs from the output dtype ", y.scalar_type());
  TORCH_CHECK_VALUE(dy.device() == y.device(), "lipfast.abn: grad_output is on ", dy.device(),
                    " but the output is on ", y.device());
}

// Forward as y = act(scale * x + shift): per-channel scale = w~ / sqrt(var + eps),
// shift = b - mean * scale, computed in double and returned contiguous in `dtype`.
inline std::tuple<at::Tensor, at::Tensor> forward_coefficients(
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
    at::ScalarType dtype) {
  const at::Tensor rstd = (var.to(at::kDouble) + eps).rsqrt();
  const at::Tensor scale = effective_weight(weight, x, eps).to(at::kDouble) * rstd;
  const at::Tensor shift = effective_bias(bias, x).to(at::kDouble) - mean.to(at::kDouble) * scale;
  return {scale.to(dtype).contiguous(), shift.to(dtype).contiguous()};
}

// Backward as dx = k1 * dz + k2 * z + k3: from dx = w~ rstd (dz - mean_dz - x_hat
// mean_xhat_dz) with x_hat = (z - b) / w~, k1 = w~ rstd, k2 = -rstd mean_xhat_dz,
// k3 = rstd mean_xhat_dz b - k1 mean_dz. Computed in double, returned in `dtype`.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_coefficients(
    const at::Tensor& y, const at::Tensor& var, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_dz,
    const at::Tensor& mean_xhat_dz, double eps, at::ScalarType dtype) {
  const at::Tensor w = effective_weight(weight, y, eps).to(at::kDouble);
  const at::Tensor b = effective_bias(bias, y).to(at::kDouble);
  const at::Tensor rstd = (var.to(at::kDouble) + eps).rsqrt();
  const at::Tensor m1 = mean_dz.to(at::kDouble), m2 = mean_xhat_dz.to(at::kDouble);
  const at::Tensor k1 = w * rstd;
  const at::Tensor k2 = -rstd * m2;
  const at::Tensor k3 = rstd * m2 * b - k1 * m1;
  return {k1.to(dtype).contiguous(), k2.to(dtype).contiguous(), k3.to(dtype).contiguous()};
}

// N, C, S of a (N, C, *) tensor viewed as contiguous (N, C, S).
struct NCS {
  int64_t n, c, s;
};
inline NCS ncs_of(const at::Tensor& x) {
  NCS r{x.size(0), x.size(1), 1};
  for (int64_t d = 2; d < x.dim(); ++d) r.s *= x.size(d);
  return r;
}

}  // namespace ops
}  // namespace lipfast
