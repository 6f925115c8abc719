// CPU kernel of lipfast::pose_decode: deep-high-resolution-net.pytorch's
// get_final_preds (get_max_preds + the quarter-pixel post-processing +
// transform_preds), with flip_back + shift + average fused in when the flipped
// heatmaps are given (../shared/SPEC.md section 10, "Decoding", "Flip test").
//
// Per map (b, j), with V the map that is decoded:
//   V[y][x] = H[b, j, y, x]                                   (no flip test)
//   V[y][x] = (H[b, j, y, x] + F[b, perm[j], y, w - max(x, 1)]) * 0.5
// (flip_back reverses W and swaps the pair channels; the shift right by one
// pixel keeps column 0, so column 0 reads flipped column w - 1 like column 1).
//  1. idx = the first maximum of V in row-major order, numpy's np.argmax rule:
//     the first NaN wins if there is one (maxval is then NaN); maxval = V[idx];
//  2. x = idx % w, y = idx / w; both set to 0 unless maxval > 0 (NaN is not);
//  3. px = floor(x + 0.5) = x, py = y; if 1 < px < w - 1 and 1 < py < h - 1:
//     x += 0.25 sign(V[py][px+1] - V[py][px-1]), y += 0.25 sign(V[py+1][px] -
//     V[py-1][px]) (np.sign: NaN for a NaN difference, e.g. inf - inf);
//  4. x_img = c_x + (x - w / 2) * 200 s_w / w, y_img = c_y + (y - h / 2) * 200 s_w / w
//     (transform_preds: get_affine_transform builds both directions from the
//     widths, so the width ratio also scales y; scale[:, 1] is unused), in float64.
// Parallel over the B x J maps; strides are respected (no copy). Each row of V is
// formed in a per-thread buffer of w values (unit-stride loops for contiguous
// rows) and reduced by a vectorisable max / NaN scan; only rows that hold a NaN or
// a new maximum are searched for the first index. Values are read in the heatmaps
// dtype and the average is formed in it, like the reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace lipfast {
namespace ops {
namespace {

template <typename T>
struct MapView {
  const T* h;       // heatmap (b, j)
  const T* f;       // flipped heatmap (b, perm[j]) or nullptr
  int64_t hy, hx;   // strides of h
  int64_t fy, fx;   // strides of f
  int64_t w;

  // row y of V into out[0, w)
  inline void row(int64_t y, T* __restrict out) const {
    const T* __restrict hr = h + y * hy;
    if (f == nullptr) {
      if (hx == 1) {
        for (int64_t x = 0; x < w; ++x) out[x] = hr[x];
      } else {
        for (int64_t x = 0; x < w; ++x) out[x] = hr[x * hx];
      }
      return;
    }
    const T* __restrict fr = f + y * fy;
    out[0] = (hr[0] + fr[(w - 1) * fx]) * T(0.5);
    if (hx == 1 && fx == 1) {
      for (int64_t x = 1; x < w; ++x) out[x] = (hr[x] + fr[w - x]) * T(0.5);
    } else {
      for (int64_t x = 1; x < w; ++x) out[x] = (hr[x * hx] + fr[(w - x) * fx]) * T(0.5);
    }
  }

  inline T operator()(int64_t y, int64_t x) const {
    const T a = h[y * hy + x * hx];
    if (f == nullptr) return a;
    const int64_t xf = w - std::max<int64_t>(x, 1);
    return (a + f[y * fy + xf * fx]) * T(0.5);
  }
};

// The maximum of buf[0, w) (exact when the row holds no NaN) into mx; returns
// whether the row may hold a NaN (it holds a NaN or an infinity). Kept in kLanes
// independent lanes so that gcc vectorises the loop: `a > m ? a : m` is a max
// instruction, and the lane sums of `a - a` are NaN exactly when a NaN or an
// infinity went in.
constexpr int kLanes = 16;

template <typename T>
inline bool row_has_non_finite(const T* buf, int64_t w, T& mx) {
  T m[kLanes], z[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    m[l] = buf[0];
    z[l] = T(0);
  }
  int64_t x0 = 0;
  for (; x0 + kLanes <= w; x0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T a = buf[x0 + l];
      m[l] = a > m[l] ? a : m[l];
      z[l] += a - a;
    }
  }
  T r = buf[0], zz = T(0);
  for (int l = 0; l < kLanes; ++l) {
    r = m[l] > r ? m[l] : r;
    zz += z[l];
  }
  for (int64_t x = x0; x < w; ++x) {
    const T a = buf[x];
    r = a > r ? a : r;
    zz += a - a;
  }
  mx = r;
  return zz != zz;
}

template <typename T>
inline T np_sign(T d) {
  if (d > T(0)) return T(1);
  if (d < T(0)) return T(-1);
  if (d == T(0)) return T(0);
  return std::numeric_limits<T>::quiet_NaN();
}

template <typename T>
void decode_all(const at::Tensor& hm, const at::Tensor* fl, const double* center,
                const double* scale, const std::vector<int64_t>& perm, T* coords, T* maxvals) {
  const int64_t B = hm.size(0), J = hm.size(1), h = hm.size(2), w = hm.size(3);
  const T* H = hm.data_ptr<T>();
  const int64_t hb = hm.stride(0), hj = hm.stride(1), hy = hm.stride(2), hx = hm.stride(3);
  const T* F = fl ? fl->data_ptr<T>() : nullptr;
  const int64_t fb = fl ? fl->stride(0) : 0, fj = fl ? fl->stride(1) : 0;
  const int64_t fy = fl ? fl->stride(2) : 0, fx = fl ? fl->stride(3) : 0;
  const int64_t n = h * w;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
  at::parallel_for(0, B * J, grain, [&](int64_t lo, int64_t hi) {
    std::vector<T> row_buf(w);
    T* buf = row_buf.data();
    for (int64_t m = lo; m < hi; ++m) {
      const int64_t b = m / J, j = m % J;
      MapView<T> v{H + b * hb + j * hj, F ? F + b * fb + perm[j] * fj : nullptr, hy, hx, fy, fx,
                   w};
      // 1. first maximum (first NaN wins), a row at a time: the row of V is formed
      // in a buffer, its maximum and whether it may hold a NaN found by a loop gcc
      // vectorises (row_has_non_finite), and only a row that may hold a NaN or
      // beats the running maximum (strictly) is searched for its first index.
      T best = -std::numeric_limits<T>::infinity();
      int64_t bi = 0;
      for (int64_t y = 0; y < h; ++y) {
        v.row(y, buf);
        T mx;
        if (row_has_non_finite(buf, w, mx)) {
          int64_t x = 0;
          while (x < w && !std::isnan(buf[x])) ++x;
          if (x < w) {  // the first NaN of the map
            best = buf[x];
            bi = y * w + x;
            break;
          }
        }
        if (mx > best) {
          int64_t x = 0;
          while (!(buf[x] == mx)) ++x;
          best = buf[x];
          bi = y * w + x;
        }
      }
      // 2. integer coordinates, zeroed unless the maximum is positive
      int64_t ix = bi % w, iy = bi / w;
      if (!(best > T(0))) {
        ix = 0;
        iy = 0;
      }
      T x = static_cast<T>(ix), y = static_cast<T>(iy);
      // 3. quarter-pixel step towards the larger neighbour
      if (1 < ix && ix < w - 1 && 1 < iy && iy < h - 1) {
        x += T(0.25) * np_sign<T>(v(iy, ix + 1) - v(iy, ix - 1));
        y += T(0.25) * np_sign<T>(v(iy + 1, ix) - v(iy - 1, ix));
      }
      // the reference's affine (np.dot) multiplies x by 0 for y and y by 0 for x:
      // a NaN in one coordinate makes both NaN
      if (std::isnan(x) || std::isnan(y)) {
        x = std::numeric_limits<T>::quiet_NaN();
        y = x;
      }
      // 4. back to the image (transform_preds, rotation 0)
      const double cx = center[2 * b], cy = center[2 * b + 1];
      const double ratio = scale[2 * b] * 200.0 / static_cast<double>(w);
      coords[2 * m] = static_cast<T>(cx + (static_cast<double>(x) - 0.5 * w) * ratio);
      coords[2 * m + 1] = static_cast<T>(cy + (static_cast<double>(y) - 0.5 * h) * ratio);
      maxvals[m] = best;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pose_decode_cpu(const at::Tensor& heatmaps,
                                                   const std::optional<at::Tensor>& flipped,
                                                   const at::Tensor& center,
                                                   const at::Tensor& scale,
                                                   at::IntArrayRef flip_perm) {
  TORCH_CHECK_VALUE(heatmaps.dim() == 4, "pose_decode expects B x J x h x w heatmaps, got shape ",
                    heatmaps.sizes());
  const auto st = heatmaps.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble,
                   "pose_decode expects float32 or float64 heatmaps, got ", st);
  const int64_t B = heatmaps.size(0), J = heatmaps.size(1), h = heatmaps.size(2),
                w = heatmaps.size(3);
  TORCH_CHECK_VALUE(h >= 1 && w >= 1, "pose_decode: empty heatmaps ", heatmaps.sizes());
  TORCH_CHECK_VALUE(heatmaps.device().is_cpu() && center.device().is_cpu() &&
                        scale.device().is_cpu(),
                    "pose_decode: the CPU kernel got tensors on another device");
  TORCH_CHECK_TYPE(center.scalar_type() == at::kDouble && scale.scalar_type() == at::kDouble,
                   "pose_decode: center and scale must be float64, got ", center.scalar_type(),
                   " and ", scale.scalar_type());
  TORCH_CHECK_VALUE(center.dim() == 2 && center.size(0) == B && center.size(1) == 2,
                    "pose_decode: center must be B x 2 = ", B, " x 2, got ", center.sizes());
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == B && scale.size(1) == 2,
                    "pose_decode: scale must be B x 2 = ", B, " x 2, got ", scale.sizes());
  const at::Tensor* fl = nullptr;
  std::vector<int64_t> perm(flip_perm.begin(), flip_perm.end());
  if (flipped.has_value()) {
    fl = &flipped.value();
    TORCH_CHECK_VALUE(fl->sizes() == heatmaps.sizes(), "pose_decode: flipped must have the "
                      "heatmaps' shape ", heatmaps.sizes(), ", got ", fl->sizes());
    TORCH_CHECK_TYPE(fl->scalar_type() == st, "pose_decode: flipped must have the heatmaps' "
                     "dtype ", st, ", got ", fl->scalar_type());
    TORCH_CHECK_VALUE(fl->device().is_cpu(), "pose_decode: flipped on ", fl->device());
    TORCH_CHECK_VALUE(static_cast<int64_t>(perm.size()) == J, "pose_decode: flip_perm must have "
                      "J = ", J, " entries, got ", perm.size());
    std::vector<char> seen(J, 0);
    for (int64_t p : perm) {
      TORCH_CHECK_VALUE(p >= 0 && p < J && !seen[p], "pose_decode: flip_perm must be a "
                        "permutation of 0..", J - 1, ", got ", flip_perm);
      seen[p] = 1;
    }
  }
  auto coords = at::empty({B, J, 2}, heatmaps.options());
  auto maxvals = at::empty({B, J}, heatmaps.options());
  if (B * J == 0) return {coords, maxvals};
  const auto c = center.contiguous();
  const auto s = scale.contiguous();
  AT_DISPATCH_FLOATING_TYPES(st, "pose_decode_cpu", [&] {
    decode_all<scalar_t>(heatmaps, fl, c.data_ptr<double>(), s.data_ptr<double>(), perm,
                         coords.data_ptr<scalar_t>(), maxvals.data_ptr<scalar_t>());
  });
  return {coords, maxvals};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("pose_decode", &pose_decode_cpu); }

}  // namespace ops
}  // namespace lipfast
