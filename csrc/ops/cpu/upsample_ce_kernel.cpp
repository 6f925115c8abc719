// CPU kernels of the upsampled cross-entropy ops (float32 and float64; float16
// and bfloat16 logits are computed in float32).
//
// The B x C x H x W upsampled logits are never stored. Both kernels walk the
// output rows in order and keep, per channel, the low-res rows interpolated
// along the width (W values each) for the two low-res rows the current output
// row reads (slots chosen by the row's parity: an output row reads rows i and
// i + 1, which never share a slot). The interpolation is ATen's
// upsample_bilinear2d (same indices, weights and order: width, then height), so
// the upsampled values agree with F.interpolate to the last bit up to FMA
// contraction. All inner loops run along the output row and vectorise.
//
// forward:  parallel over (image, output row); per row the C upsampled rows
//           (C x W), their max, sum of exp, lse, the label's logit.
// backward: parallel over (image, block of channels); each task owns its
//           channels' gradient, so it is deterministic (no atomics) and the
//           result does not depend on the thread count. Per output row and
//           channel G = (softmax - onehot) * w[y] * dnll (softmax from the saved
//           lse) is added to the two low-res rows of the height adjoint, kept at
//           full width (2 x W per channel); a low-res row that no later output
//           row reads is folded back through the width adjoint into the
//           gradient. Memory: O(C * W) per thread.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../upsample_ce.h"
#include "cpu_variants.h"

namespace lipfast {
namespace ops {
namespace {

// The row loops are compiled for the baseline ISA and for AVX2 + FMA, picked at
// run time (cpu_variants.h).
#define LIPFAST_VARIANTS(fn, Args)                                                   \
  template <typename T, typename L>                                                  \
  LIPFAST_TARGET_AVX2 void fn##_avx2(const Args<T, L>& a, int64_t i0, int64_t i1) {  \
    fn<T, L>(a, i0, i1);                                                             \
  }                                                                                  \
  template <typename T, typename L>                                                  \
  void fn##_base(const Args<T, L>& a, int64_t i0, int64_t i1) {                      \
    fn<T, L>(a, i0, i1);                                                             \
  }
using cpu::use_avx2;

// exp(x) for float32 written so that gcc vectorises loops calling it (Cephes
// expf: range reduction by ln 2, degree-6 polynomial; about 1 ulp). Rounding to
// the nearest integer by adding and subtracting 1.5 * 2^23 (the build has no
// -ffast-math, so the compiler keeps it).
LIPFAST_ALWAYS_INLINE inline float exp_v(float x) {
  x = std::min(std::max(x, -87.3365448f), 88.3762626f);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_v(double x) { return std::exp(x); }

template <typename T>
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<T> w0, w1;
  Taps(int64_t n_out, int64_t n_in, bool align_corners)
      : i0(n_out), i1(n_out), w0(n_out), w1(n_out) {
    bilinear_taps<T>(n_out, n_in, align_corners, i0.data(), i1.data(), w0.data(), w1.data());
  }
};

// Low-res rows of channels [c0, c0 + nc) of one image, interpolated along the
// width to W values; two slots, by the parity of the row index.
template <typename T>
struct RowCache {
  const T* img = nullptr;  // C x h x w
  int64_t hw, w, W, c0, nc;
  const Taps<T>& tw;
  std::vector<T> buf;
  int64_t key[2] = {-1, -1};

  RowCache(int64_t h, int64_t w_, int64_t W_, int64_t c0_, int64_t nc_, const Taps<T>& tw_)
      : hw(h * w_), w(w_), W(W_), c0(c0_), nc(nc_), tw(tw_), buf(2 * nc_ * W_) {}

  void reset(const T* image) {
    img = image;
    key[0] = key[1] = -1;
  }

  LIPFAST_ALWAYS_INLINE const T* get(int64_t r) {
    const int s = static_cast<int>(r & 1);
    T* out = buf.data() + s * nc * W;
    if (key[s] != r) {
      const int64_t* j0 = tw.i0.data();
      const int64_t* j1 = tw.i1.data();
      const T* a0 = tw.w0.data();
      const T* a1 = tw.w1.data();
      for (int64_t c = 0; c < nc; ++c) {
        const T* src = img + (c0 + c) * hw + r * w;
        T* o = out + c * W;
        for (int64_t k = 0; k < W; ++k) o[k] = src[j0[k]] * a0[k] + src[j1[k]] * a1[k];
      }
      key[s] = r;
    }
    return out;
  }
};

struct Dims {
  int64_t b, c, h, w, H, W;
};

template <typename T, typename L>
struct FwdArgs {
  const Dims& d;
  const T* x;
  const L* lab;
  const T* wt;
  int64_t ignore;
  const Taps<T>& th;
  const Taps<T>& tw;
  T* nll;
  T* lse;
  double* wrow;
  uint8_t* badrow;
};

// Output rows [r0, r1) of the flattened (image, row) range.
template <typename T, typename L>
LIPFAST_ALWAYS_INLINE inline void forward_rows(const FwdArgs<T, L>& A, int64_t r0, int64_t r1) {
  const Dims& d = A.d;
  const T* x = A.x;
  const L* lab = A.lab;
  const T* wt = A.wt;
  const int64_t ignore = A.ignore;
  const Taps<T>& th = A.th;
  const Taps<T>& tw = A.tw;
  T* nll = A.nll;
  T* lse = A.lse;
  double* wrow = A.wrow;
  uint8_t* badrow = A.badrow;
  const int64_t C = d.c, W = d.W;
  RowCache<T> cache(d.h, d.w, W, 0, C, tw);
  std::vector<T> up(C * W), mx(W), sm(W);
  int64_t cur = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / d.H, oh = r % d.H;
    if (b != cur) {
      cache.reset(x + b * C * d.h * d.w);
      cur = b;
    }
    const T* p0 = cache.get(th.i0[oh]);
    const T* p1 = cache.get(th.i1[oh]);
    const T a0 = th.w0[oh], a1 = th.w1[oh];
    T* __restrict__ m = mx.data();
    T* __restrict__ s = sm.data();
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict__ q0 = p0 + c * W;
      const T* __restrict__ q1 = p1 + c * W;
      T* __restrict__ u = up.data() + c * W;
      for (int64_t k = 0; k < W; ++k) u[k] = q0[k] * a0 + q1[k] * a1;
      if (c == 0) {
        for (int64_t k = 0; k < W; ++k) m[k] = u[k];
      } else {
        for (int64_t k = 0; k < W; ++k) m[k] = u[k] > m[k] ? u[k] : m[k];
      }
    }
    for (int64_t k = 0; k < W; ++k) s[k] = T(0);
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict__ u = up.data() + c * W;
      for (int64_t k = 0; k < W; ++k) s[k] += exp_v(u[k] - m[k]);
    }
    const L* yr = lab + r * W;
    T* nr = nll + r * W;
    T* lr = lse + r * W;
    double ws = 0;
    uint8_t bad = 0;
    for (int64_t k = 0; k < W; ++k) {
      const T l = m[k] + std::log(s[k]);
      lr[k] = l;
      const int64_t y = static_cast<int64_t>(yr[k]);
      if (y == ignore) {
        nr[k] = T(0);
      } else if (y < 0 || y >= C) {
        nr[k] = T(0);
        bad = 1;
      } else {
        const T wy = wt ? wt[y] : T(1);
        nr[k] = (l - up[y * W + k]) * wy;
        ws += static_cast<double>(wy);
      }
    }
    wrow[r] = ws;
    badrow[r] = bad;
  }
}

LIPFAST_VARIANTS(forward_rows, FwdArgs)

template <typename T, typename L>
void forward_impl(const FwdArgs<T, L>& A) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, A.d.c * A.d.W));
  const bool avx2 = use_avx2();
  at::parallel_for(0, A.d.b * A.d.H, grain, [&](int64_t r0, int64_t r1) {
    if (avx2) {
      forward_rows_avx2<T, L>(A, r0, r1);
    } else {
      forward_rows_base<T, L>(A, r0, r1);
    }
  });
}

// One output row of one channel: G = (exp(up - lse) - [y == c]) * coef, added
// to the height adjoint of its two low-res rows (g0, g1; the same row when
// `two` is false).
template <typename T, bool two>
LIPFAST_ALWAYS_INLINE inline void grad_row(const T* __restrict__ q0, const T* __restrict__ q1,
                                           T a0, T a1, const T* __restrict__ ls,
                                           const T* __restrict__ yy, T cc,
                                           const T* __restrict__ cf, T* __restrict__ g0,
                                           T* __restrict__ g1, int64_t W) {
  for (int64_t k = 0; k < W; ++k) {
    const T u = q0[k] * a0 + q1[k] * a1;
    const T g = (exp_v(u - ls[k]) - (yy[k] == cc ? T(1) : T(0))) * cf[k];
    if (two) {
      g0[k] += g * a0;
      g1[k] += g * a1;
    } else {
      g0[k] += g * a0 + g * a1;
    }
  }
}

template <typename T, typename L>
struct BwdArgs {
  const Dims& d;
  const T* dnll;
  const T* x;
  const L* lab;
  const T* wt;
  const T* lse;
  int64_t ignore;
  const Taps<T>& th;
  const Taps<T>& tw;
  T* grad;
  int64_t cb, nb;  // channels per task, tasks per image
};

// Tasks [t0, t1) of the flattened (image, channel block) range.
template <typename T, typename L>
LIPFAST_ALWAYS_INLINE inline void backward_tasks(const BwdArgs<T, L>& A, int64_t t0, int64_t t1) {
  const Dims& d = A.d;
  const T* dnll = A.dnll;
  const T* x = A.x;
  const L* lab = A.lab;
  const T* wt = A.wt;
  const T* lse = A.lse;
  const int64_t ignore = A.ignore;
  const Taps<T>& th = A.th;
  const Taps<T>& tw = A.tw;
  T* grad = A.grad;
  const int64_t cb = A.cb, nb = A.nb;
  const int64_t C = d.c, W = d.W, hw = d.h * d.w;
  std::vector<T> coef(W);
  std::vector<T> yl(W);  // label - c0 as T (-1: none), compared in the vector loop
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / nb, c0 = (t % nb) * cb, nc = std::min(C, c0 + cb) - c0;
    RowCache<T> cache(d.h, d.w, W, c0, nc, tw);
    cache.reset(x + b * C * hw);
    std::vector<T> acc(2 * nc * W, T(0));  // height adjoint of two low-res rows
    int64_t akey[2] = {-1, -1};
    T* gb = grad + b * C * hw;
    const int64_t* j0 = tw.i0.data();
    const int64_t* j1 = tw.i1.data();
    const T* b0 = tw.w0.data();
    const T* b1 = tw.w1.data();
    // width adjoint of slot s into its low-res row (each row is flushed once)
    auto flush = [&](int s) {
      if (akey[s] < 0) return;
      for (int64_t c = 0; c < nc; ++c) {
        T* a = acc.data() + (s * nc + c) * W;
        T* dst = gb + (c0 + c) * hw + akey[s] * d.w;
        for (int64_t k = 0; k < W; ++k) {
          dst[j0[k]] += a[k] * b0[k];
          dst[j1[k]] += a[k] * b1[k];
        }
        std::fill(a, a + W, T(0));
      }
      akey[s] = -1;
    };
    auto slot = [&](int64_t row) -> T* {
      const int s = static_cast<int>(row & 1);
      if (akey[s] != row) {
        flush(s);
        akey[s] = row;
      }
      return acc.data() + s * nc * W;
    };
    for (int64_t oh = 0; oh < d.H; ++oh) {
      const int64_t r = b * d.H + oh;
      const L* yr = lab + r * W;
      const T* dr = dnll + r * W;
      const T* lr = lse + r * W;
      bool any = false;
      for (int64_t k = 0; k < W; ++k) {
        const int64_t y = static_cast<int64_t>(yr[k]);
        const bool valid = y != ignore && y >= 0 && y < C;
        coef[k] = valid ? (wt ? wt[y] : T(1)) * dr[k] : T(0);
        yl[k] = valid ? static_cast<T>(y - c0) : T(-1);
        any |= coef[k] != T(0);
      }
      if (!any) continue;
      const int64_t i0 = th.i0[oh], i1 = th.i1[oh];
      const T a0 = th.w0[oh], a1 = th.w1[oh];
      const T* p0 = cache.get(i0);
      const T* p1 = cache.get(i1);
      T* A0 = slot(i0);
      T* A1 = slot(i1);
      const T* __restrict__ cf = coef.data();
      const T* __restrict__ ls = lr;
      const T* __restrict__ yy = yl.data();
      for (int64_t c = 0; c < nc; ++c) {
        const T* __restrict__ q0 = p0 + c * W;
        const T* __restrict__ q1 = p1 + c * W;
        const T cc = static_cast<T>(c);
        if (i0 != i1) {
          grad_row<T, true>(q0, q1, a0, a1, ls, yy, cc, cf, A0 + c * W, A1 + c * W, W);
        } else {
          grad_row<T, false>(q0, q1, a0, a1, ls, yy, cc, cf, A0 + c * W, A0 + c * W, W);
        }
      }
    }
    flush(0);
    flush(1);
  }
}

LIPFAST_VARIANTS(backward_tasks, BwdArgs)

template <typename T, typename L>
void backward_impl(const Dims& d, const T* dnll, const T* x, const L* lab, const T* wt,
                   const T* lse, int64_t ignore, const Taps<T>& th, const Taps<T>& tw, T* grad) {
  // channel blocks: enough tasks to keep every thread busy; the result does
  // not depend on the blocking (every channel is computed on its own).
  const int64_t C = d.c;
  const int64_t nthreads = at::get_num_threads();
  const int64_t nblk = std::min<int64_t>(C, std::max<int64_t>(1, (2 * nthreads + d.b - 1) / d.b));
  const int64_t cb = (C + nblk - 1) / nblk;
  const int64_t nb = (C + cb - 1) / cb;
  const BwdArgs<T, L> A{d, dnll, x, lab, wt, lse, ignore, th, tw, grad, cb, nb};
  const bool avx2 = use_avx2();
  at::parallel_for(0, d.b * nb, 1, [&](int64_t t0, int64_t t1) {
    if (avx2) {
      backward_tasks_avx2<T, L>(A, t0, t1);
    } else {
      backward_tasks_base<T, L>(A, t0, t1);
    }
  });
}

struct Prepared {
  at::Tensor x, y, wt;
  Dims d;
  at::ScalarType acc;
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& labels,
                 const c10::optional<at::Tensor>& weight) {
  check_upsample_ce_args(logits, labels, weight);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "upsample_cross_entropy: the CPU kernel got a ",
                    logits.device(), " tensor");
  Prepared p;
  p.acc = upsample_ce_acc_dtype(logits);
  p.x = logits.to(p.acc).contiguous();
  p.y = labels.scalar_type() == at::kByte ? labels.contiguous() : labels.to(at::kLong).contiguous();
  if (weight.has_value() && weight->defined()) p.wt = weight->to(p.acc).contiguous();
  p.d = Dims{logits.size(0), logits.size(1), logits.size(2), logits.size(3), labels.size(1),
             labels.size(2)};
  return p;
}

template <typename L>
int64_t first_bad_label(const at::Tensor& y, int64_t C, int64_t ignore) {
  const L* p = y.const_data_ptr<L>();
  for (int64_t i = 0, n = y.numel(); i < n; ++i) {
    const int64_t v = static_cast<int64_t>(p[i]);
    if (v != ignore && (v < 0 || v >= C)) return v;
  }
  return 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_ce_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const c10::optional<at::Tensor>& weight,
    int64_t ignore_index, bool align_corners) {
  const Prepared p = prepare(logits, labels, weight);
  const Dims& d = p.d;
  const auto opts = logits.options().dtype(p.acc);
  at::Tensor nll = at::empty({d.b, d.H, d.W}, opts);
  at::Tensor lse = at::empty({d.b, d.H, d.W}, opts);
  if (d.b * d.H * d.W == 0) return {nll, lse, at::zeros({}, opts)};
  std::vector<double> wrow(d.b * d.H);
  std::vector<uint8_t> bad(d.b * d.H, 0);
  AT_DISPATCH_FLOATING_TYPES(p.acc, "upsample_ce_cpu", [&] {
    const Taps<scalar_t> th(d.H, d.h, align_corners), tw(d.W, d.w, align_corners);
    const scalar_t* wt = p.wt.defined() ? p.wt.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    scalar_t* pn = nll.mutable_data_ptr<scalar_t>();
    scalar_t* pl = lse.mutable_data_ptr<scalar_t>();
    if (p.y.scalar_type() == at::kByte) {
      forward_impl<scalar_t, uint8_t>({d, x, p.y.const_data_ptr<uint8_t>(), wt, ignore_index, th,
                                       tw, pn, pl, wrow.data(), bad.data()});
    } else {
      forward_impl<scalar_t, int64_t>({d, x, p.y.const_data_ptr<int64_t>(), wt, ignore_index, th,
                                       tw, pn, pl, wrow.data(), bad.data()});
    }
  });
  if (std::any_of(bad.begin(), bad.end(), [](uint8_t v) { return v != 0; })) {
    const int64_t v = p.y.scalar_type() == at::kByte
                          ? first_bad_label<uint8_t>(p.y, d.c, ignore_index)
                          : first_bad_label<int64_t>(p.y, d.c, ignore_index);
    TORCH_CHECK_VALUE(false, "upsample_cross_entropy: label ", v, " outside [0, ", d.c,
                      ") and not ignore_index=", ignore_index);
  }
  double total = 0;
  for (double v : wrow) total += v;
  return {nll, lse, at::scalar_tensor(total, opts)};
}

at::Tensor upsample_ce_backward_cpu(const at::Tensor& dnll, const at::Tensor& logits,
                                    const at::Tensor& labels,
                                    const c10::optional<at::Tensor>& weight,
                                    const at::Tensor& lse, int64_t ignore_index,
                                    bool align_corners) {
  const Prepared p = prepare(logits, labels, weight);
  const Dims& d = p.d;
  TORCH_CHECK_VALUE(dnll.sizes() == labels.sizes(), "upsample_cross_entropy: dnll has shape ",
                    dnll.sizes(), " but the labels have shape ", labels.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == labels.sizes(), "upsample_cross_entropy: lse has shape ",
                    lse.sizes(), " but the labels have shape ", labels.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(dnll.scalar_type()) && at::isFloatingType(lse.scalar_type()),
                   "upsample_cross_entropy: dnll and lse must be floating point, got ",
                   dnll.scalar_type(), " and ", lse.scalar_type());
  const at::Tensor dn = dnll.to(p.acc).contiguous();
  const at::Tensor ls = lse.to(p.acc).contiguous();
  at::Tensor grad = at::zeros({d.b, d.c, d.h, d.w}, logits.options().dtype(p.acc));
  if (d.b * d.H * d.W > 0) {
    AT_DISPATCH_FLOATING_TYPES(p.acc, "upsample_ce_backward_cpu", [&] {
      const Taps<scalar_t> th(d.H, d.h, align_corners), tw(d.W, d.w, align_corners);
      const scalar_t* wt = p.wt.defined() ? p.wt.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* x = p.x.const_data_ptr<scalar_t>();
      const scalar_t* pd = dn.const_data_ptr<scalar_t>();
      const scalar_t* pl = ls.const_data_ptr<scalar_t>();
      scalar_t* pg = grad.mutable_data_ptr<scalar_t>();
      if (p.y.scalar_type() == at::kByte) {
        backward_impl<scalar_t, uint8_t>(d, pd, x, p.y.const_data_ptr<uint8_t>(), wt, pl,
                                         ignore_index, th, tw, pg);
      } else {
        backward_impl<scalar_t, int64_t>(d, pd, x, p.y.const_data_ptr<int64_t>(), wt, pl,
                                         ignore_index, th, tw, pg);
      }
    });
  }
  return grad.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("upsample_ce", &upsample_ce_cpu);
  m.impl("upsample_ce_backward", &upsample_ce_backward_cpu);
}

}  // namespace ops
}  // namespace lipfast
