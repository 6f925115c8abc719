// CPU kernels of the In-Place ABN ops (float32 and float64).
//
// Tensors are processed as contiguous (N, C, S). Other layouts (channels_last,
// sliced views) are made contiguous first; abn_forward_ then copies the result
// back into the caller's storage, so the op stays in place for every layout.
// Reductions run per channel in parallel; each channel is summed in blocks whose
// partial sums are added in double, so float32 statistics stay accurate for
// large maps (two passes: mean, then the centred second moment).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../abn.h"

namespace lipfast {
namespace ops {
namespace {

constexpr int64_t kBlock = 1024;
constexpr int kLanes = 8;

// sum over p[0..n) of f(p[i]), float partials in blocks, double total.
template <typename T, typename F>
inline double blocked_sum(const T* p, int64_t n, F f) {
  double total = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T lane[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) lane[l] += f(p[i + l]);
    }
    T part = 0;
    for (int l = 0; l < kLanes; ++l) part += lane[l];
    for (; i < e; ++i) part += f(p[i]);
    total += static_cast<double>(part);
  }
  return total;
}

// Calls f(row, channel, offset) for every (n, c) row of a contiguous (N, C, S)
// tensor, rows split across threads.
template <typename F>
inline void for_each_row(const NCS& d, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d.s));
  at::parallel_for(0, d.n * d.c, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(r, r % d.c, r * d.s);
  });
}

// ---- per-channel coefficients, computed in plain loops (no ATen op per call:
// HRNet runs ~300 norms on small maps, where a dozen tiny tensor ops per call
// cost as much as the kernels). The arithmetic is that of the ATen formulation
// in ../abn.h (forward_coefficients / backward_coefficients), which the CUDA
// glue keeps: w~ = |w| + eps rounded in the statistics dtype, the rest in double.

// Element i of a 1-D floating tensor as double (any stride).
template <typename T>
inline void read_doubles(const at::Tensor& t, std::vector<double>& out) {
  const T* p = t.const_data_ptr<T>();
  const int64_t st = t.stride(0);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[i * st]);
}

// A per-channel tensor (or `fill` when absent) as doubles, first rounded to the
// statistics dtype S when `to_stats` (as `t.to(stats_dtype(x))` does).
template <typename S>
std::vector<double> channel_values(const c10::optional<at::Tensor>& t, int64_t c, double fill,
                                   bool to_stats) {
  std::vector<double> out(static_cast<size_t>(c), fill);
  if (!t.has_value() || !t->defined()) return out;
  switch (t->scalar_type()) {
    case at::kDouble: read_doubles<double>(*t, out); break;
    case at::kFloat: read_doubles<float>(*t, out); break;
    case at::kHalf: read_doubles<at::Half>(*t, out); break;
    case at::kBFloat16: read_doubles<at::BFloat16>(*t, out); break;
    default: read_doubles<double>(t->to(at::kDouble).contiguous(), out); break;
  }
  if (to_stats) {
    for (double& v : out) v = static_cast<double>(static_cast<S>(v));
  }
  return out;
}

// w~ = |w| + eps in the statistics dtype S (1 without a weight), as double.
template <typename S>
std::vector<double> effective_weight_values(const c10::optional<at::Tensor>& w, int64_t c,
                                            double eps) {
  std::vector<double> out = channel_values<S>(w, c, 1.0, true);
  if (w.has_value() && w->defined()) {
    for (double& v : out) {
      v = static_cast<double>(static_cast<S>(std::abs(static_cast<S>(v)) + static_cast<S>(eps)));
    }
  }
  return out;
}

void check_cpu_dtype(const at::Tensor& x, const char* what) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "lipfast.abn: the CPU kernels support float32 and float64, got ", what,
                   " of dtype ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> abn_stats_cpu(const at::Tensor& x_in) {
  check_abn_input(x_in, "input");
  check_cpu_dtype(x_in, "input");
  const at::Tensor x = x_in.contiguous();
  const NCS d = ncs_of(x);
  auto mean = at::zeros({d.c}, x.options());
  auto var = at::zeros({d.c}, x.options());
  const int64_t count = d.n * d.s;
  if (count == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "abn_stats_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pm = mean.mutable_data_ptr<scalar_t>();
    scalar_t* pv = var.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, d.c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double sum = 0;
        for (int64_t n = 0; n < d.n; ++n) {
          sum += blocked_sum(px + (n * d.c + c) * d.s, d.s, [](scalar_t v) { return v; });
        }
        const double mu = sum / count;
        const scalar_t mu_t = static_cast<scalar_t>(mu);
        double m2 = 0;
        for (int64_t n = 0; n < d.n; ++n) {
          m2 += blocked_sum(px + (n * d.c + c) * d.s, d.s, [mu_t](scalar_t v) {
            const scalar_t t = v - mu_t;
            return t * t;
          });
        }
        // mu_t differs from mu by rounding; correct the second moment for it.
        const double shift = static_cast<double>(mu_t) - mu;
        pm[c] = static_cast<scalar_t>(mu);
        pv[c] = static_cast<scalar_t>(std::max(0.0, m2 / count - shift * shift));
      }
    });
  });
  return {mean, var};
}

// y = act(scale * x + shift) on one contiguous row. The leaky branch is written
// without a data-dependent branch (max + slope * min) so that it vectorises.
template <typename T>
inline void normalize_row(T* __restrict__ p, int64_t n, T scale, T shift, Activation act,
                          T param) {
  switch (act) {
    case Activation::Identity:
      for (int64_t i = 0; i < n; ++i) p[i] = p[i] * scale + shift;
      break;
    case Activation::LeakyRelu:
      for (int64_t i = 0; i < n; ++i) {
        const T z = p[i] * scale + shift;
        p[i] = std::max(z, T(0)) + param * std::min(z, T(0));
      }
      break;
    case Activation::Elu:
      for (int64_t i = 0; i < n; ++i) {
        const T z = p[i] * scale + shift;
        p[i] = z >= T(0) ? z : param * std::expm1(z);
      }
      break;
  }
}

void abn_forward_cpu_contiguous(at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, double eps,
                                Activation act, double param) {
  const NCS d = ncs_of(x);
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "abn_forward_cpu", [&] {
    // scale = w~ / sqrt(var + eps), shift = b - mean * scale (double, then scalar_t)
    const std::vector<double> w = effective_weight_values<scalar_t>(weight, d.c, eps);
    const std::vector<double> b = channel_values<scalar_t>(bias, d.c, 0.0, true);
    const std::vector<double> mu = channel_values<scalar_t>(mean, d.c, 0.0, false);
    const std::vector<double> v = channel_values<scalar_t>(var, d.c, 0.0, false);
    std::vector<scalar_t> scale(d.c), shift(d.c);
    for (int64_t c = 0; c < d.c; ++c) {
      const double sc = w[c] * (1.0 / std::sqrt(v[c] + eps));
      scale[c] = static_cast<scalar_t>(sc);
      shift[c] = static_cast<scalar_t>(b[c] - mu[c] * sc);
    }
    const scalar_t* psc = scale.data();
    const scalar_t* psh = shift.data();
    scalar_t* px = x.mutable_data_ptr<scalar_t>();
    const scalar_t prm = static_cast<scalar_t>(param);
    for_each_row(d, [=](int64_t r, int64_t c, int64_t off) {
      normalize_row(px + off, d.s, psc[c], psh[c], act, prm);
    });
  });
}

void abn_forward_cpu(at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                     const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, double eps,
                     c10::string_view activation, double param) {
  check_abn_input(x, "input");
  check_cpu_dtype(x, "input");
  check_channel_param(mean, x, "mean");
  check_channel_param(var, x, "var");
  check_channel_param(weight, x, "weight");
  check_channel_param(bias, x, "bias");
  const Activation act = parse_activation(std::string(activation), param);
  if (x.is_contiguous()) {
    abn_forward_cpu_contiguous(x, mean, var, weight, bias, eps, act, param);
  } else {
    at::Tensor tmp = x.contiguous();
    abn_forward_cpu_contiguous(tmp, mean, var, weight, bias, eps, act, param);
    x.copy_(tmp);
  }
}

// Inverting the activation: from y and dy, the pre-activation z and its gradient dz.
// leaky_relu: where y < 0, z = y / slope and dz = dy * slope (so z * dz = y * dy);
// elu: where y < 0, z = log1p(y / alpha) and dz = dy * (y + alpha).
// The per-activation row kernels below select constants instead of branching so
// the leaky and identity loops vectorise.

// Adds sum(dz) and sum(z * dz) over one row to (sdz, sdzz). DZ(y, dy) and
// ZDZ(y, dy) give the two terms of one element. Per block of kBlock elements the
// two float sums are an `omp simd` reduction (vector-lane partial sums, which
// the compiler may reorder; hand-written lane arrays for two sums at once
// compiled to code 3-5x slower with GCC), block partials added in double.
template <typename T, typename DZ, typename ZDZ>
inline void reduce_row_with(const T* __restrict__ y, const T* __restrict__ g, int64_t n,
                            DZ dz_of, ZDZ zdz_of, double& sdz, double& sdzz) {
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = b; i < e; ++i) {
      a1 += dz_of(y[i], g[i]);
      a2 += zdz_of(y[i], g[i]);
    }
    sdz += static_cast<double>(a1);
    sdzz += static_cast<double>(a2);
  }
}

template <typename T>
inline void reduce_row(const T* __restrict__ y, const T* __restrict__ g, int64_t n,
                       Activation act, T param, double& sdz, double& sdzz) {
  switch (act) {
    case Activation::Identity:
      reduce_row_with(y, g, n, [](T, T gv) { return gv; }, [](T yv, T gv) { return gv * yv; },
                      sdz, sdzz);
      break;
    case Activation::LeakyRelu:  // z * dz = y * dy on both sides of zero
      reduce_row_with(y, g, n, [param](T yv, T gv) { return gv * (yv >= T(0) ? T(1) : param); },
                      [](T yv, T gv) { return gv * yv; }, sdz, sdzz);
      break;
    case Activation::Elu:
      reduce_row_with(
          y, g, n, [param](T yv, T gv) { return yv >= T(0) ? gv : gv * (yv + param); },
          [param](T yv, T gv) {
            return yv >= T(0) ? gv * yv : gv * (yv + param) * std::log1p(yv / param);
          },
          sdz, sdzz);
      break;
  }
}

// dx = k1 * dz + k2 * z + k3 on one row.
template <typename T>
inline void elemt_row(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ dx,
                      int64_t n, Activation act, T param, T k1, T k2, T k3) {
  switch (act) {
    case Activation::Identity:
      for (int64_t i = 0; i < n; ++i) dx[i] = k1 * g[i] + k2 * y[i] + k3;
      break;
    case Activation::LeakyRelu: {
      const T inv = T(1) / param;
      for (int64_t i = 0; i < n; ++i) {
        const bool pos = y[i] >= T(0);
        dx[i] = k1 * g[i] * (pos ? T(1) : param) + k2 * y[i] * (pos ? T(1) : inv) + k3;
      }
      break;
    }
    case Activation::Elu:
      for (int64_t i = 0; i < n; ++i) {
        const T yv = y[i];
        const T dz = yv >= T(0) ? g[i] : g[i] * (yv + param);
        const T z = yv >= T(0) ? yv : std::log1p(yv / param);
        dx[i] = k1 * dz + k2 * z + k3;
      }
      break;
  }
}

std::tuple<at::Tensor, at::Tensor> abn_backward_reduce_cpu(
    const at::Tensor& y_in, const at::Tensor& dy_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, c10::string_view activation,
    double param) {
  check_abn_input(y_in, "output");
  check_cpu_dtype(y_in, "output");
  check_grad_output(y_in, dy_in);
  check_channel_param(weight, y_in, "weight");
  check_channel_param(bias, y_in, "bias");
  const Activation act = parse_activation(std::string(activation), param);
  const at::Tensor y = y_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const NCS d = ncs_of(y);
  auto s_dz = at::zeros({d.c}, y.options());
  auto s_xdz = at::zeros({d.c}, y.options());
  if (y.numel() == 0) return {s_dz, s_xdz};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "abn_backward_reduce_cpu", [&] {
    const std::vector<double> w_eff = effective_weight_values<scalar_t>(weight, d.c, eps);
    const std::vector<double> b_eff = channel_values<scalar_t>(bias, d.c, 0.0, true);
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const double* pw = w_eff.data();
    const double* pb = b_eff.data();
    scalar_t* p1 = s_dz.mutable_data_ptr<scalar_t>();
    scalar_t* p2 = s_xdz.mutable_data_ptr<scalar_t>();
    const scalar_t prm = static_cast<scalar_t>(param);
    const int64_t nn = d.n, cc = d.c, ss = d.s;
    at::parallel_for(0, cc, 1, [=](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double sdz = 0, sdzz = 0;
        for (int64_t n = 0; n < nn; ++n) {
          const int64_t off = (n * cc + c) * ss;
          reduce_row(py + off, pdy + off, ss, act, prm, sdz, sdzz);
        }
        // x_hat = (z - b) / w~, so sum(x_hat * dz) = (sum(z * dz) - b * sum(dz)) / w~.
        p1[c] = static_cast<scalar_t>(sdz);
        p2[c] = static_cast<scalar_t>((sdzz - pb[c] * sdz) / pw[c]);
      }
    });
  });
  return {s_dz, s_xdz};
}

at::Tensor abn_backward_elemt_cpu(const at::Tensor& y_in, const at::Tensor& dy_in,
                                  const at::Tensor& var, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& mean_dz, const at::Tensor& mean_xhat_dz,
                                  double eps, c10::string_view activation, double param) {
  check_abn_input(y_in, "output");
  check_cpu_dtype(y_in, "output");
  check_grad_output(y_in, dy_in);
  check_channel_param(var, y_in, "var");
  check_channel_param(weight, y_in, "weight");
  check_channel_param(bias, y_in, "bias");
  check_channel_param(mean_dz, y_in, "mean_dz");
  check_channel_param(mean_xhat_dz, y_in, "mean_xhat_dz");
  const Activation act = parse_activation(std::string(activation), param);
  const at::Tensor y = y_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const NCS d = ncs_of(y);
  auto dx = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "abn_backward_elemt_cpu", [&] {
    // k1 = w~ rstd, k2 = -rstd mean_xhat_dz, k3 = rstd mean_xhat_dz b - k1 mean_dz
    const int64_t nc = d.c;
    const std::vector<double> w = effective_weight_values<scalar_t>(weight, nc, eps);
    const std::vector<double> b = channel_values<scalar_t>(bias, nc, 0.0, true);
    const std::vector<double> v = channel_values<scalar_t>(var, nc, 0.0, false);
    const std::vector<double> m1 = channel_values<scalar_t>(mean_dz, nc, 0.0, false);
    const std::vector<double> m2 = channel_values<scalar_t>(mean_xhat_dz, nc, 0.0, false);
    std::vector<scalar_t> k1(nc), k2(nc), k3(nc);
    for (int64_t c = 0; c < nc; ++c) {
      const double rstd = 1.0 / std::sqrt(v[c] + eps);
      const double a1 = w[c] * rstd;
      k1[c] = static_cast<scalar_t>(a1);
      k2[c] = static_cast<scalar_t>(-rstd * m2[c]);
      k3[c] = static_cast<scalar_t>(rstd * m2[c] * b[c] - a1 * m1[c]);
    }
    const scalar_t* q1 = k1.data();
    const scalar_t* q2 = k2.data();
    const scalar_t* q3 = k3.data();
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    const scalar_t prm = static_cast<scalar_t>(param);
    for_each_row(d, [=](int64_t r, int64_t c, int64_t off) {
      elemt_row(py + off, pdy + off, pdx + off, d.s, act, prm, q1[c], q2[c], q3[c]);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("abn_stats", &abn_stats_cpu);
  m.impl("abn_forward_", &abn_forward_cpu);
  m.impl("abn_backward_reduce", &abn_backward_reduce_cpu);
  m.impl("abn_backward_elemt", &abn_backward_elemt_cpu);
}

}  // namespace ops
}  // namespace lipfast
