// CPU kernels of the pose heatmap loss ops (schemas and the per-joint table:
// ../heatmap_loss.cpp; SPEC section 10).
//
// Per joint (b, j), as deep-high-resolution-net.pytorch's generate_target with
// target_type 'gaussian' computes it, in float64 (Python's float arithmetic,
// int() = truncation toward zero):
//   stride = image_size / heatmap_size per axis; mu = trunc(x / stride + 0.5);
//   t = 3 sigma; ul = trunc(mu - t); br = trunc(mu + t + 1);
//   weight = visible (as float32), 0 where ul >= size or br < 0 on either axis;
//   when weight > 0.5 the target is exp(-((X - cx)^2 + (Y - cy)^2) / (2 sigma^2))
//   on [max(0, ul), min(br, size)) per axis, with c = ul + floor((2 t + 1) / 2)
//   (the reference's patch index X - ul, centred at size // 2), 0 elsewhere.
// Coordinates are only read for joints with visible != 0; a non-finite one there
// is a ValueError (the reference's int() raises on them for every joint).
//
// heatmap_loss: parallel over the B*J maps; per map, row by row, the squared
// difference to the target summed in the accumulation type (float64 for float64
// heatmaps, float32 otherwise; rows then summed in float64), the Gaussian only
// evaluated inside the joint's window (outside it the target is 0). Heatmaps are
// read through their strides (a strided row is gathered first). The per-map sums
// w^2 * S are added in a fixed order: deterministic, thread-count independent.
//   loss = 0.5 / (J * B * h * w) * sum_{b,j} w_bj^2 * sum_pixels (pred - target)^2
// heatmap_loss_backward: d heatmaps = dloss * w_bj^2 / (J * B * h * w) * (pred - target),
// parallel over maps, written contiguous in the heatmaps' dtype.
// heatmap_loss_targets: the float32 targets (Gaussian in float32 as the
// reference's numpy patch) and weights.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace lipfast {
namespace ops {
namespace {

constexpr int64_t kWin = 6;  // x_lo, x_hi, y_lo, y_hi, cx, cy
constexpr double kSigmaMin = 1e-6;
constexpr double kSigmaMax = 1e6;

struct Geometry {
  int64_t w, h;              // heatmap size
  double stride_x, stride_y;  // image_size / heatmap_size
  double tmp;                 // 3 sigma
  double centre;              // floor((2 * tmp + 1) / 2): the patch's centre index
};

void check_sizes(const char* name, c10::IntArrayRef size) {
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] > 0 && size[1] > 0, "heatmap_loss: ", name,
                    " must be 2 positive ints (width, height), got ", size);
}

void check_sigma(double sigma) {
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma >= kSigmaMin && sigma <= kSigmaMax,
                    "heatmap_loss: sigma must be a finite number in [1e-06, 1e+06], got ",
                    sigma);
}

void check_joints(const at::Tensor& joints, const at::Tensor& visible) {
  TORCH_CHECK_VALUE(joints.dim() == 3 && joints.size(2) == 2,
                    "heatmap_loss: joints must be B x J x 2 (x, y), got ", joints.sizes());
  TORCH_CHECK_TYPE(joints.scalar_type() != at::kBool && !at::isComplexType(joints.scalar_type()),
                   "heatmap_loss: joints must be a real tensor, got ", joints.scalar_type());
  TORCH_CHECK_VALUE(visible.dim() == 2, "heatmap_loss: visible must be B x J, got ",
                    visible.sizes());
  TORCH_CHECK_TYPE(!at::isComplexType(visible.scalar_type()),
                   "heatmap_loss: visible must be bool, integer or floating point, got ",
                   visible.scalar_type());
  TORCH_CHECK_VALUE(visible.size(0) == joints.size(0) && visible.size(1) == joints.size(1),
                    "heatmap_loss: joints ", joints.sizes(), " and visible ", visible.sizes(),
                    " disagree on B x J");
  TORCH_CHECK_VALUE(joints.size(0) > 0 && joints.size(1) > 0,
                    "heatmap_loss: no joints (B x J = ", joints.size(0), " x ", joints.size(1),
                    ")");
  TORCH_CHECK_VALUE(joints.device() == visible.device(), "heatmap_loss: joints on ",
                    joints.device(), ", visible on ", visible.device());
}

Geometry make_geometry(c10::IntArrayRef image_size, int64_t w, int64_t h, double sigma) {
  Geometry g;
  g.w = w;
  g.h = h;
  g.stride_x = static_cast<double>(image_size[0]) / static_cast<double>(w);
  g.stride_y = static_cast<double>(image_size[1]) / static_cast<double>(h);
  g.tmp = sigma * 3.0;
  g.centre = std::floor((2.0 * g.tmp + 1.0) / 2.0);
  return g;
}

// The per-joint table (see the file comment): weight (n floats) and window
// (n x 6 int64) from joints (n x 2 doubles) and visible (n floats).
void joint_table(const double* jt, const float* vis, int64_t n, int64_t J, const Geometry& g,
                 float* weight, int64_t* win) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t* o = win + i * kWin;
    std::fill(o, o + kWin, int64_t(0));
    const float v = vis[i];
    weight[i] = v;
    if (v == 0.f) continue;
    const double x = jt[2 * i], y = jt[2 * i + 1];
    TORCH_CHECK_VALUE(std::isfinite(x) && std::isfinite(y), "heatmap_loss: joint ", i % J,
                      " of image ", i / J, " has non-finite coordinates (", x, ", ", y,
                      ") but visible = ", v, " (set visible to 0 for missing joints)");
    const double mux = std::trunc(x / g.stride_x + 0.5);
    const double muy = std::trunc(y / g.stride_y + 0.5);
    const double ulx = std::trunc(mux - g.tmp), uly = std::trunc(muy - g.tmp);
    const double brx = std::trunc(mux + g.tmp + 1.0), bry = std::trunc(muy + g.tmp + 1.0);
    if (ulx >= static_cast<double>(g.w) || uly >= static_cast<double>(g.h) || brx < 0.0 ||
        bry < 0.0) {
      weight[i] = 0.f;
      continue;
    }
    if (!(v > 0.5f)) continue;
    // ul in (-(2t + 2), size) and br in [0, ul + 2t + 2): every value below is small
    const double xlo = std::max(ulx, 0.0), ylo = std::max(uly, 0.0);
    o[0] = static_cast<int64_t>(xlo);
    o[1] = static_cast<int64_t>(std::max(std::min(brx, static_cast<double>(g.w)), xlo));
    o[2] = static_cast<int64_t>(ylo);
    o[3] = static_cast<int64_t>(std::max(std::min(bry, static_cast<double>(g.h)), ylo));
    o[4] = static_cast<int64_t>(ulx + g.centre);
    o[5] = static_cast<int64_t>(uly + g.centre);
  }
}

// (weight B x J float32, window B x J x 6 int64) of joints / visible.
std::pair<at::Tensor, at::Tensor> make_table(const at::Tensor& joints, const at::Tensor& visible,
                                             const Geometry& g) {
  const int64_t B = joints.size(0), J = joints.size(1);
  at::Tensor jt = joints.to(at::kDouble).contiguous();
  at::Tensor vis = visible.to(at::kFloat).contiguous();
  at::Tensor weight = at::empty({B, J}, joints.options().dtype(at::kFloat));
  at::Tensor window = at::empty({B, J, kWin}, joints.options().dtype(at::kLong));
  joint_table(jt.const_data_ptr<double>(), vis.const_data_ptr<float>(), B * J, J, g,
              weight.mutable_data_ptr<float>(), window.mutable_data_ptr<int64_t>());
  return {weight, window};
}

template <typename T>
inline T sum_squares(const T* p, int64_t n) {
  T lane[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) lane[k] += p[i + k] * p[i + k];
  }
  T s = T(0);
  for (; i < n; ++i) s += p[i] * p[i];
  for (int k = 0; k < 8; ++k) s += lane[k];
  return s;
}

struct MapView {
  int64_t B, J, H, W, sb, sj, sh, sw;
};

// Row y of map m as W acc_t values: the heatmaps' own row when it is contiguous
// and already of the accumulation type, else a converted / gathered copy in buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_row(const scalar_t* hm, const MapView& v, int64_t m, int64_t y,
                             acc_t* buf) {
  const scalar_t* r = hm + (m / v.J) * v.sb + (m % v.J) * v.sj + y * v.sh;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (v.sw == 1) return r;
  }
  if (v.sw == 1) {
    for (int64_t x = 0; x < v.W; ++x) buf[x] = static_cast<acc_t>(r[x]);
  } else {
    for (int64_t x = 0; x < v.W; ++x) buf[x] = static_cast<acc_t>(r[x * v.sw]);
  }
  return buf;
}

template <typename scalar_t, typename acc_t>
double loss_impl(const scalar_t* hm, const MapView& v, const float* weight, const int64_t* win,
                 double sigma) {
  const int64_t maps = v.B * v.J;
  const acc_t den = static_cast<acc_t>(2.0 * sigma * sigma);
  std::vector<double> part(maps);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(v.H * v.W, 1));
  at::parallel_for(0, maps, grain, [&](int64_t m0, int64_t m1) {
    std::vector<acc_t> row(v.W);
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t* o = win + m * kWin;
      const int64_t xlo = o[0], xhi = o[1], ylo = o[2], yhi = o[3], cx = o[4], cy = o[5];
      double s = 0.0;
      for (int64_t y = 0; y < v.H; ++y) {
        const acc_t* p = load_row<scalar_t, acc_t>(hm, v, m, y, row.data());
        acc_t rs;
        if (y < ylo || y >= yhi || xlo >= xhi) {
          rs = sum_squares<acc_t>(p, v.W);
        } else {
          rs = sum_squares<acc_t>(p, xlo) + sum_squares<acc_t>(p + xhi, v.W - xhi);
          const acc_t dy2 = static_cast<acc_t>((y - cy) * (y - cy));
          for (int64_t x = xlo; x < xhi; ++x) {
            const acc_t g = std::exp(-(static_cast<acc_t>((x - cx) * (x - cx)) + dy2) / den);
            const acc_t d = p[x] - g;
            rs += d * d;
          }
        }
        s += static_cast<double>(rs);
      }
      const double wm = static_cast<double>(static_cast<acc_t>(weight[m]));
      part[m] = wm * wm * s;
    }
  });
  double total = 0.0;
  for (int64_t m = 0; m < maps; ++m) total += part[m];
  return total;
}

template <typename scalar_t, typename acc_t>
void backward_impl(const scalar_t* hm, const MapView& v, const float* weight, const int64_t* win,
                   double sigma, double dloss, scalar_t* out) {
  const int64_t maps = v.B * v.J;
  const acc_t den = static_cast<acc_t>(2.0 * sigma * sigma);
  const double n = static_cast<double>(v.J) * static_cast<double>(v.B) *
                   static_cast<double>(v.H) * static_cast<double>(v.W);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(v.H * v.W, 1));
  at::parallel_for(0, maps, grain, [&](int64_t m0, int64_t m1) {
    std::vector<acc_t> row(v.W);
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t* o = win + m * kWin;
      const int64_t xlo = o[0], xhi = o[1], ylo = o[2], yhi = o[3], cx = o[4], cy = o[5];
      const double wm = static_cast<double>(static_cast<acc_t>(weight[m]));
      const acc_t c = static_cast<acc_t>(dloss * wm * wm / n);
      for (int64_t y = 0; y < v.H; ++y) {
        const acc_t* p = load_row<scalar_t, acc_t>(hm, v, m, y, row.data());
        scalar_t* dst = out + (m * v.H + y) * v.W;
        const bool iny = y >= ylo && y < yhi && xlo < xhi;
        const int64_t x0 = iny ? xlo : v.W, x1 = iny ? xhi : v.W;
        for (int64_t x = 0; x < x0; ++x) dst[x] = static_cast<scalar_t>(c * p[x]);
        if (iny) {
          const acc_t dy2 = static_cast<acc_t>((y - cy) * (y - cy));
          for (int64_t x = x0; x < x1; ++x) {
            const acc_t g = std::exp(-(static_cast<acc_t>((x - cx) * (x - cx)) + dy2) / den);
            dst[x] = static_cast<scalar_t>(c * (p[x] - g));
          }
        }
        for (int64_t x = x1; x < v.W; ++x) dst[x] = static_cast<scalar_t>(c * p[x]);
      }
    }
  });
}

void check_heatmaps(const at::Tensor& heatmaps) {
  TORCH_CHECK_VALUE(heatmaps.dim() == 4, "heatmap_loss: heatmaps must be B x J x h x w, got ",
                    heatmaps.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(heatmaps.scalar_type()),
                   "heatmap_loss: heatmaps must be floating point, got ",
                   heatmaps.scalar_type());
  TORCH_CHECK_VALUE(heatmaps.size(2) > 0 && heatmaps.size(3) > 0,
                    "heatmap_loss: empty heatmaps ", heatmaps.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> heatmap_loss_cpu(const at::Tensor& heatmaps,
                                                                const at::Tensor& joints,
                                                                const at::Tensor& visible,
                                                                c10::IntArrayRef image_size,
                                                                double sigma) {
  check_heatmaps(heatmaps);
  check_joints(joints, visible);
  check_sizes("image_size", image_size);
  check_sigma(sigma);
  TORCH_CHECK_VALUE(joints.size(0) == heatmaps.size(0) && joints.size(1) == heatmaps.size(1),
                    "heatmap_loss: heatmaps ", heatmaps.sizes(), " and joints ", joints.sizes(),
                    " disagree on B x J");
  TORCH_CHECK_VALUE(heatmaps.device() == joints.device(), "heatmap_loss: heatmaps on ",
                    heatmaps.device(), ", joints on ", joints.device());
  const int64_t B = heatmaps.size(0), J = heatmaps.size(1), H = heatmaps.size(2),
                W = heatmaps.size(3);
  const Geometry g = make_geometry(image_size, W, H, sigma);
  auto [weight, window] = make_table(joints, visible, g);
  const MapView v{B, J, H, W, heatmaps.stride(0), heatmaps.stride(1), heatmaps.stride(2),
                  heatmaps.stride(3)};
  const auto acc = heatmaps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heatmaps.scalar_type(),
                                  "heatmap_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    total = loss_impl<scalar_t, acc_t>(heatmaps.const_data_ptr<scalar_t>(), v,
                                       weight.const_data_ptr<float>(),
                                       window.const_data_ptr<int64_t>(), sigma);
  });
  const double n = static_cast<double>(J) * static_cast<double>(B) * static_cast<double>(H) *
                   static_cast<double>(W);
  at::Tensor loss = at::scalar_tensor(total * 0.5 / n, heatmaps.options().dtype(acc));
  return {loss, weight, window};
}

at::Tensor heatmap_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& heatmaps,
                                     const at::Tensor& weight, const at::Tensor& window,
                                     double sigma) {
  check_heatmaps(heatmaps);
  check_sigma(sigma);
  const int64_t B = heatmaps.size(0), J = heatmaps.size(1), H = heatmaps.size(2),
                W = heatmaps.size(3);
  TORCH_CHECK_VALUE(grad.numel() == 1, "heatmap_loss_backward: grad must be a scalar, got ",
                    grad.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == B && weight.size(1) == J &&
                        weight.scalar_type() == at::kFloat,
                    "heatmap_loss_backward: weight must be B x J float32, got ",
                    weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK_VALUE(window.dim() == 3 && window.size(0) == B && window.size(1) == J &&
                        window.size(2) == kWin && window.scalar_type() == at::kLong,
                    "heatmap_loss_backward: window must be B x J x 6 int64, got ",
                    window.sizes(), " ", window.scalar_type());
  at::Tensor out = at::empty({B, J, H, W}, heatmaps.options().memory_format(
                                               at::MemoryFormat::Contiguous));
  at::Tensor wt = weight.contiguous();
  at::Tensor win = window.contiguous();
  // a window outside the map would be read out of bounds: the table must be one
  // the forward made (checked, B * J rows)
  {
    const int64_t* o = win.const_data_ptr<int64_t>();
    for (int64_t m = 0; m < B * J; ++m, o += kWin) {
      TORCH_CHECK_VALUE(0 <= o[0] && o[0] <= o[1] && o[1] <= W && 0 <= o[2] && o[2] <= o[3] &&
                            o[3] <= H,
                        "heatmap_loss_backward: window row ", m, " is not inside the ", H,
                        " x ", W, " map");
    }
  }
  const double dloss = grad.to(at::kDouble).item<double>();
  const MapView v{B, J, H, W, heatmaps.stride(0), heatmaps.stride(1), heatmaps.stride(2),
                  heatmaps.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heatmaps.scalar_type(),
                                  "heatmap_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_impl<scalar_t, acc_t>(heatmaps.const_data_ptr<scalar_t>(), v,
                                   wt.const_data_ptr<float>(), win.const_data_ptr<int64_t>(),
                                   sigma, dloss, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> heatmap_loss_targets_cpu(const at::Tensor& joints,
                                                            const at::Tensor& visible,
                                                            c10::IntArrayRef image_size,
                                                            c10::IntArrayRef heatmap_size,
                                                            double sigma) {
  check_joints(joints, visible);
  check_sizes("image_size", image_size);
  check_sizes("heatmap_size", heatmap_size);
  check_sigma(sigma);
  const int64_t B = joints.size(0), J = joints.size(1);
  const int64_t W = heatmap_size[0], H = heatmap_size[1];
  const Geometry g = make_geometry(image_size, W, H, sigma);
  auto [weight, window] = make_table(joints, visible, g);
  at::Tensor target = at::zeros({B, J, H, W}, joints.options().dtype(at::kFloat));
  float* t = target.mutable_data_ptr<float>();
  const int64_t* win = window.const_data_ptr<int64_t>();
  const float den = static_cast<float>(2.0 * sigma * sigma);
  at::parallel_for(0, B * J, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t* o = win + m * kWin;
      for (int64_t y = o[2]; y < o[3]; ++y) {
        const float dy2 = static_cast<float>((y - o[5]) * (y - o[5]));
        float* dst = t + (m * H + y) * W;
        for (int64_t x = o[0]; x < o[1]; ++x) {
          dst[x] = std::exp(-(static_cast<float>((x - o[4]) * (x - o[4])) + dy2) / den);
        }
      }
    }
  });
  return {target, weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("heatmap_loss", &heatmap_loss_cpu);
  m.impl("heatmap_loss_backward", &heatmap_loss_backward_cpu);
  m.impl("heatmap_loss_targets", &heatmap_loss_targets_cpu);
}

}  // namespace ops
}  // namespace lipfast
