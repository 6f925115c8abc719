// CUDA backend of the In-Place ABN ops: argument checks, per-channel constants
// (computed with ATen on the device) and the launches of abn_kernel.cu.
// float32, float16 and bfloat16 inputs keep float32 statistics; float64 stays float64.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../abn.h"
#include "abn_kernel.cuh"

namespace lipfast {
namespace ops {
namespace {

int dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::kFloat32;
    case at::kHalf: return cuda::kFloat16;
    case at::kBFloat16: return cuda::kBFloat16;
    case at::kDouble: return cuda::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "lipfast.abn: the CUDA kernels support float32, float16, bfloat16 "
                       "and float64, got ", x.scalar_type());
  }
  return -1;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lipfast.abn: ", what, " launch failed: ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> abn_stats_cuda(const at::Tensor& x_in) {
  check_abn_input(x_in, "input");
  const int code = dtype_code(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const NCS d = ncs_of(x);
  auto opts = x.options().dtype(stats_dtype(x));
  auto mean = at::empty({d.c}, opts);
  auto var = at::empty({d.c}, opts);
  auto ws = at::empty({static_cast<int64_t>(cuda::abn_reduce_workspace_bytes(code, d.n, d.c, d.s))},
                      x.options().dtype(at::kByte));
  check_launch(cuda::abn_stats_launch(code, x.const_data_ptr(), d.n, d.c, d.s,
                                      mean.mutable_data_ptr(), var.mutable_data_ptr(),
                                      ws.mutable_data_ptr(),
                                      c10::cuda::getCurrentCUDAStream().stream()),
               "abn_stats");
  return {mean, var};
}

void abn_forward_cuda(at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                      const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps,
                      c10::string_view activation, double param) {
  check_abn_input(x, "input");
  const int code = dtype_code(x);
  check_channel_param(mean, x, "mean");
  check_channel_param(var, x, "var");
  check_channel_param(weight, x, "weight");
  check_channel_param(bias, x, "bias");
  const Activation act = parse_activation(std::string(activation), param);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [scale, shift] = forward_coefficients(x, mean, var, weight, bias, eps, stats_dtype(x));
  at::Tensor work = x.is_contiguous() ? x : x.contiguous();
  const NCS d = ncs_of(work);
  check_launch(cuda::abn_forward_launch(code, work.mutable_data_ptr(), d.n, d.c, d.s,
                                        scale.const_data_ptr(), shift.const_data_ptr(),
                                        static_cast<int>(act), param,
                                        c10::cuda::getCurrentCUDAStream().stream()),
               "abn_forward_");
  if (!work.is_same(x)) x.copy_(work);
}

std::tuple<at::Tensor, at::Tensor> abn_backward_reduce_cuda(
    const at::Tensor& y_in, const at::Tensor& dy_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, c10::string_view activation,
    double param) {
  check_abn_input(y_in, "output");
  const int code = dtype_code(y_in);
  check_grad_output(y_in, dy_in);
  check_channel_param(weight, y_in, "weight");
  check_channel_param(bias, y_in, "bias");
  const Activation act = parse_activation(std::string(activation), param);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const NCS d = ncs_of(y);
  const at::Tensor w = effective_weight(weight, y, eps);
  const at::Tensor b = effective_bias(bias, y);
  auto opts = y.options().dtype(stats_dtype(y));
  auto s_dz = at::empty({d.c}, opts);
  auto s_xdz = at::empty({d.c}, opts);
  auto ws = at::empty({static_cast<int64_t>(cuda::abn_reduce_workspace_bytes(code, d.n, d.c, d.s))},
                      y.options().dtype(at::kByte));
  check_launch(cuda::abn_backward_reduce_launch(
                   code, y.const_data_ptr(), dy.const_data_ptr(), d.n, d.c, d.s,
                   w.const_data_ptr(), b.const_data_ptr(), static_cast<int>(act), param,
                   s_dz.mutable_data_ptr(), s_xdz.mutable_data_ptr(), ws.mutable_data_ptr(),
                   c10::cuda::getCurrentCUDAStream().stream()),
               "abn_backward_reduce");
  return {s_dz, s_xdz};
}

at::Tensor abn_backward_elemt_cuda(const at::Tensor& y_in, const at::Tensor& dy_in,
                                   const at::Tensor& var,
                                   const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& mean_dz, const at::Tensor& mean_xhat_dz,
                                   double eps, c10::string_view activation, double param) {
  check_abn_input(y_in, "output");
  const int code = dtype_code(y_in);
  check_grad_output(y_in, dy_in);
  check_channel_param(var, y_in, "var");
  check_channel_param(weight, y_in, "weight");
  check_channel_param(bias, y_in, "bias");
  check_channel_param(mean_dz, y_in, "mean_dz");
  check_channel_param(mean_xhat_dz, y_in, "mean_xhat_dz");
  const Activation act = parse_activation(std::string(activation), param);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const NCS d = ncs_of(y);
  const auto [k1, k2, k3] = backward_coefficients(y, var, weight, bias, mean_dz, mean_xhat_dz,
                                                  eps, stats_dtype(y));
  auto dx = at::empty_like(y, at::MemoryFormat::Contiguous);
  check_launch(cuda::abn_backward_elemt_launch(
                   code, y.const_data_ptr(), dy.const_data_ptr(), dx.mutable_data_ptr(), d.n,
                   d.c, d.s, k1.const_data_ptr(), k2.const_data_ptr(), k3.const_data_ptr(),
                   static_cast<int>(act), param, c10::cuda::getCurrentCUDAStream().stream()),
               "abn_backward_elemt");
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CUDA, m) {
  m.impl("abn_stats", &abn_stats_cuda);
  m.impl("abn_forward_", &abn_forward_cuda);
  m.impl("abn_backward_reduce", &abn_backward_reduce_cuda);
  m.impl("abn_backward_elemt", &abn_backward_elemt_cuda);
}

}  // namespace ops
}  // namespace lipfast
