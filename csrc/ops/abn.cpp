// Schemas of the In-Place ABN op family. Kernels: cpu/abn_kernel.cpp and
// cuda/abn_cuda.cpp (+ cuda/abn_kernel.cu). Fake kernels and the autograd
// composition: lipfast/ops/abn.py.
//
// The two fused ops at the end (abn_train_forward_, abn_backward) are
// backend-independent compositions of the four kernels, registered here as
// CompositeExplicitAutograd: one call per layer and direction for the unsynchronised
// layer (no Python between the kernels: HRNet-W48 runs 306 norms per step on small
// maps, where a dozen small tensor ops from Python per call cost as much as the
// kernels). The synchronised layer calls the four kernels with its collectives
// in between (lipfast/ops/abn.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "abn.h"

namespace lipfast {
namespace ops {
namespace {

using OptT = c10::optional<at::Tensor>;

inline bool given(const OptT& t) { return t.has_value() && t->defined(); }

std::tuple<at::Tensor, at::Tensor> call_stats(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::abn_stats", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(x);
}

void call_forward_(at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, const OptT& w,
                   const OptT& b, double eps, c10::string_view act, double param) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::abn_forward_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                                   const OptT&, double, c10::string_view, double)>();
  op.call(x, mean, var, w, b, eps, act, param);
}

std::tuple<at::Tensor, at::Tensor> call_reduce(const at::Tensor& y, const at::Tensor& dy,
                                               const OptT& w, const OptT& b, double eps,
                                               c10::string_view act, double param) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::abn_backward_reduce", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, double,
                           c10::string_view, double)>();
  return op.call(y, dy, w, b, eps, act, param);
}

at::Tensor call_elemt(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& var,
                      const OptT& w, const OptT& b, const at::Tensor& mean_dz,
                      const at::Tensor& mean_xhat_dz, double eps, c10::string_view act,
                      double param) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::abn_backward_elemt", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptT&, const OptT&, const at::Tensor&,
                                         const at::Tensor&, double, c10::string_view, double)>();
  return op.call(y, dy, var, w, b, mean_dz, mean_xhat_dz, eps, act, param);
}

// Training forward of the unsynchronised layer: batch statistics, the running
// statistics updated (when both are given) as
//   running_mean = (1 - momentum) running_mean + momentum mean,
//   running_var  = (1 - momentum) running_var  + momentum var n / (n - 1),
// n = the values per channel (>= 2, checked by the caller), then y written into
// x. Returns the biased batch variance (what backward needs).
at::Tensor abn_train_forward_composite(at::Tensor& x, const OptT& weight, const OptT& bias,
                                       const OptT& running_mean, const OptT& running_var,
                                       double momentum, double eps, c10::string_view activation,
                                       double param) {
  check_abn_input(x, "input");
  const int64_t c = x.size(1);
  const int64_t count = c ? x.numel() / c : 0;
  TORCH_CHECK_VALUE(count >= 2, "lipfast.abn: expected more than 1 value per channel when "
                    "training, got input of shape ", x.sizes());
  auto [mean, var] = call_stats(x);
  if (given(running_mean) && given(running_var)) {
    at::NoGradGuard no_grad;
    const at::Tensor unbiased = var * (static_cast<double>(count) / static_cast<double>(count - 1));
    at::Tensor rm = *running_mean, rv = *running_var;
    rm.mul_(1.0 - momentum).add_(mean.to(rm.scalar_type()) * momentum);
    rv.mul_(1.0 - momentum).add_(unbiased.to(rv.scalar_type()) * momentum);
  }
  call_forward_(x, mean, var, weight, bias, eps, activation, param);
  return var;
}

// Backward of the unsynchronised layer from its output y: the per-channel sums
// (abn_backward_reduce), their means over `count` values per channel in training
// (zero in eval mode, where the statistics are constants), dx
// (abn_backward_elemt), and the parameter gradients in the statistics dtype:
// dweight = sum(x_hat dz) sign(weight) (w~ = |w| + eps), dbias = sum(dz).
std::tuple<at::Tensor, at::Tensor, at::Tensor> abn_backward_composite(
    const at::Tensor& y, const at::Tensor& dy, const at::Tensor& var, const OptT& weight,
    const OptT& bias, c10::SymInt count_sym, double eps, c10::string_view activation,
    double param, bool training) {
  const double count = static_cast<double>(count_sym.expect_int());
  auto [sum_dz, sum_xhat_dz] = call_reduce(y, dy, weight, bias, eps, activation, param);
  at::Tensor mean_dz, mean_xhat_dz;
  if (training) {
    TORCH_CHECK_VALUE(count > 0, "lipfast.abn: abn_backward needs a positive count in training, "
                      "got ", count);
    mean_dz = sum_dz / count;
    mean_xhat_dz = sum_xhat_dz / count;
  } else {
    mean_dz = at::zeros_like(sum_dz);
    mean_xhat_dz = mean_dz;
  }
  at::Tensor dx = call_elemt(y, dy, var, weight, bias, mean_dz, mean_xhat_dz, eps, activation,
                             param);
  at::Tensor dweight =
      given(weight) ? sum_xhat_dz * weight->sign().to(sum_xhat_dz.scalar_type()) : sum_xhat_dz;
  return {dx, dweight, sum_dz};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lipfast, m) {
  m.def("abn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def(
      "abn_forward_(Tensor(a!) x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "float eps, str activation, float activation_param) -> ()");
  m.def(
      "abn_backward_reduce(Tensor y, Tensor dy, Tensor? weight, Tensor? bias, float eps, "
      "str activation, float activation_param) -> (Tensor sum_dz, Tensor sum_xhat_dz)");
  m.def(
      "abn_backward_elemt(Tensor y, Tensor dy, Tensor var, Tensor? weight, Tensor? bias, "
      "Tensor mean_dz, Tensor mean_xhat_dz, float eps, str activation, "
      "float activation_param) -> Tensor");
  // Fused: statistics, running-statistics update and forward in one call;
  // returns the batch variance.
  m.def(
      "abn_train_forward_(Tensor(a!) x, Tensor? weight, Tensor? bias, "
      "Tensor(b!)? running_mean, Tensor(c!)? running_var, float momentum, float eps, "
      "str activation, float activation_param) -> Tensor var");
  // Fused: the whole backward from the output (dx, dweight, dbias).
  m.def(
      "abn_backward(Tensor y, Tensor dy, Tensor var, Tensor? weight, Tensor? bias, "
      "SymInt count, float eps, str activation, float activation_param, bool training) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias)");
  // The unsynchronised training layer as one differentiable op: forward =
  // abn_train_forward_, returns x (now y); its autograd kernel
  // (autograd/abn_autograd.cpp) saves y, var, weight, bias and calls abn_backward.
  m.def(
      "inplace_abn_train_(Tensor(a!) x, Tensor? weight, Tensor? bias, "
      "Tensor(b!)? running_mean, Tensor(c!)? running_var, float momentum, float eps, "
      "str activation, float activation_param) -> Tensor(a!)");
}

// Below autograd (no gradient needed, or called from the autograd kernel).
at::Tensor& inplace_abn_train_composite(at::Tensor& x, const OptT& weight, const OptT& bias,
                                        const OptT& running_mean, const OptT& running_var,
                                        double momentum, double eps, c10::string_view activation,
                                        double param) {
  abn_train_forward_composite(x, weight, bias, running_mean, running_var, momentum, eps,
                              activation, param);
  return x;
}

TORCH_LIBRARY_IMPL(lipfast, CompositeExplicitAutograd, m) {
  m.impl("abn_train_forward_", &abn_train_forward_composite);
  m.impl("abn_backward", &abn_backward_composite);
  m.impl("inplace_abn_train_", &inplace_abn_train_composite);
}

}  // namespace ops
}  // namespace lipfast
