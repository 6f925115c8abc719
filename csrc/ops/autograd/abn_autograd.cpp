// Autograd kernel of lipfast::inplace_abn_train_ (schema and forward:
// ../abn.cpp), the unsynchronised In-Place ABN layer in training.
//
// Forward: abn_train_forward_ below autograd (batch statistics, running
// statistics, y written into x), x marked dirty and returned; saved: y (the
// output itself), the batch variance, weight and bias. Backward: abn_backward
// (dx, dweight, dbias from y; x is never kept). Written in C++ so that a training
// step pays no Python autograd per norm (HRNet-W48 has 306). The synchronised
// layer, torch.compile and eval mode with gradients keep the Python
// autograd.Function of lipfast/ops/abn.py, which composes the same kernels.
// Like that Function (@once_differentiable) this one is differentiable once: its
// backward runs without recording a graph, and under create_graph its gradients
// carry a DelayedError node, so differentiating through them raises instead of
// silently treating this layer's backward as a constant.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <string>

namespace lipfast {
namespace ops {
namespace {

using OptT = c10::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The message of lipfast/ops/abn.py's _IN_PLACE_HINT (same wording).
constexpr const char* kInPlaceHint =
    "lipfast InPlaceABN: the output of this layer was modified in place by a later "
    "operation (for example nn.ReLU(inplace=True), `out += ...` or another in-place "
    "ABN applied to the same tensor) before backward ran. In-place ABN recovers its "
    "input from that output, so the gradient would be wrong. Make the following "
    "operation out of place (e.g. nn.ReLU(inplace=False), `out = out + ...`).";

inline bool given(const OptT& t) { return t.has_value() && t->defined(); }

class InPlaceABNTrainFunction : public torch::autograd::Function<InPlaceABNTrainFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::Tensor x, const OptT& weight,
                            const OptT& bias, const OptT& running_mean, const OptT& running_var,
                            double momentum, double eps, std::string activation, double param) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("lipfast::abn_train_forward_", "")
            .typed<at::Tensor(at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
                              double, double, c10::string_view, double)>();
    at::Tensor var;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      var = op.call(x, weight, bias, running_mean, running_var, momentum, eps, activation, param);
    }
    ctx->mark_dirty({x});
    ctx->save_for_backward({x, var, given(weight) ? *weight : at::Tensor(),
                            given(bias) ? *bias : at::Tensor()});
    // values per channel (symbolic under torch.compile's tracing; forward has
    // refused fewer than 2, so the channel count is positive)
    ctx->saved_data["count"] = x.sym_numel() / x.sym_size(1);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["param"] = param;
    return x;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lipfast::abn_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                             const OptT&, c10::SymInt, double, c10::string_view, double, bool)>();
    variable_list saved;
    try {
      saved = ctx->get_saved_variables();
    } catch (const c10::Error& err) {
      if (std::string(err.what()).find("modified by an inplace operation") != std::string::npos) {
        TORCH_CHECK(false, kInPlaceHint, "\n(autograd: ", err.what_without_backtrace(), ")");
      }
      throw;
    }
    const at::Tensor& y = saved[0];
    const at::Tensor& var = saved[1];
    const OptT weight = saved[2].defined() ? OptT(saved[2]) : OptT();
    const OptT bias = saved[3].defined() ? OptT(saved[3]) : OptT();
    // differentiable once, as the Python Function: no graph recorded here
    const bool create_graph = at::GradMode::is_enabled() && grads[0].requires_grad();
    at::NoGradGuard no_grad;
    auto [dx, dweight, dbias] =
        op.call(y, grads[0], var, weight, bias, ctx->saved_data["count"].toSymInt(),
                ctx->saved_data["eps"].toDouble(), ctx->saved_data["activation"].toStringRef(),
                ctx->saved_data["param"].toDouble(), /*training=*/true);
    // needs_input_grad counts the tensor arguments that were given: x, then
    // weight and bias when present; the returned list has one entry per argument.
    size_t edge = 1;
    variable_list out(9);
    if (ctx->needs_input_grad(0)) out[0] = dx;
    if (weight.has_value()) {
      if (ctx->needs_input_grad(edge)) out[1] = dweight.to(weight->scalar_type());
      ++edge;
    }
    if (bias.has_value() && ctx->needs_input_grad(edge)) out[2] = dbias.to(bias->scalar_type());
    if (create_graph) {
      // torch.autograd.function.once_differentiable's rule: the gradients become
      // outputs of a DelayedError node, which raises if backpropagated through.
      at::AutoGradMode grad_mode(true);
      variable_list defined;
      for (const auto& t : out) {
        if (t.defined()) defined.push_back(t.detach().requires_grad_(true));
      }
      auto err = std::make_shared<torch::autograd::DelayedError>(
          "trying to differentiate twice lipfast InPlaceABN's backward, which is "
          "differentiable once (as a function marked with @once_differentiable)",
          static_cast<int64_t>(defined.size()));
      variable_list wrapped = (*err)(std::move(defined));
      size_t k = 0;
      for (auto& t : out) {
        if (t.defined()) t = wrapped[k++];
      }
    }
    return out;
  }
};

at::Tensor& inplace_abn_train_autograd(at::Tensor& x, const OptT& weight, const OptT& bias,
                                       const OptT& running_mean, const OptT& running_var,
                                       double momentum, double eps, c10::string_view activation,
                                       double param) {
  InPlaceABNTrainFunction::apply(x, weight, bias, running_mean, running_var, momentum, eps,
                                 std::string(activation), param);
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, Autograd, m) {
  m.impl("inplace_abn_train_", &inplace_abn_train_autograd);
}

}  // namespace ops
}  // namespace lipfast
