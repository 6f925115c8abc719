// CPU kernel of lipfast::parse_postprocess: SCHP's in-the-wild post-processing
// (bilinear upsample with align_corners=True to the model input size, then
// cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT 0) back to the image frame, then
// argmax / softmax over the classes) fused, never storing the upsampled or the
// warped logits.
//
// The composition is separable. Output row y samples the upsampled map U at
// qy = ay * y + by: U rows Y0 = floor(qy) and Y0 + 1 with weights 1 - f and f
// (a row outside [0, in_h) is skipped: zero border), and U row Y is itself
// (1 - lam) L[i0(Y)] + lam L[i1(Y)] (ATen's align_corners arithmetic, as
// lipfast.kernels._taps.bilinear_taps computes it, in float64). So output row y
// is a combination of at most 4 logits rows with composite weights; the two U
// rows usually share logits rows, and equal indices are merged (2 or 3 distinct
// rows in general, 1 when in size == logits size). The same holds for columns.
//
// Work: the logits are packed once channel-last (K x h x w x Cp, Cp = C padded to
// a multiple of 8 with zeros). Parallel over (k, output row): the <= 4 logits rows
// of the output row are combined into one w x Cp row buffer (per thread); then
// each output pixel sums its column taps of Cp-vectors (branch-free for <= 2
// taps, the common case, else all 4 with zero weights), takes the maximum over
// the lanes and the first channel equal to it (a min of lane indices: numpy's
// first-maximum rule; the padding channels get -inf), and, when asked, the
// softmax statistics (vectorised Cephes expf for float32, clamped at -80 so no
// denormal is ever formed). Maps are written through a per-row out_w x Cp buffer
// transposed to the K x C x out_h x out_w output. The pixel loops use GCC vector
// types (32-byte vectors in the AVX2 + FMA variant, 16-byte ones in the baseline
// variant, picked at run time on x86-64; LIPFAST_CPU_NO_AVX2=1 forces the
// baseline). Pixels and rows without any valid tap have V = 0: label 0, logits 0,
// probabilities 1/C, fg 1 - 1/C. Accumulation in the logits dtype (float32 or
// float64); composite weights are computed in float64. NaN logits give an
// unspecified (but in-range) label. Memory: the packed logits, the tap tables
// and (w + 1 + out_w if maps) x Cp values per thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_variants.h"

// The vector helpers below are always inlined into the AVX2 / baseline variants;
// their by-value 32-byte vectors never cross a call (gcc warns about the ABI).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace lipfast {
namespace ops {
namespace {

constexpr int64_t kLanes = 8;

template <typename T>
struct Tap {
  int32_t n;
  int32_t idx[4];
  T w[4];
};

template <typename T>
struct Args {
  const T* P;         // K x h x w x Cp, channel-last, zero-padded channels
  const Tap<T>* rows;  // K x out_h
  const Tap<T>* cols;  // K x out_w
  const int64_t* jlo;  // per k: the logits columns any output column reads
  const int64_t* jhi;
  int64_t C, Cp, h, w, out_h, out_w;
  int64_t maps;
  bool fg;
  uint8_t* labels;
  T* maps_out;
  T* fg_out;
};

// rows_impl compiled for the baseline ISA (16-byte vectors) and for AVX2 + FMA
// (32-byte vectors where the build targets x86), picked at run time
// (cpu_variants.h).
constexpr int kAvx2Bytes = LIPFAST_X86_VARIANTS ? 32 : 16;
#define LIPFAST_PP_VARIANTS(fn)                                                          \
  template <typename T>                                                                  \
  LIPFAST_TARGET_AVX2 void fn##_avx2(const Args<T>& a, int64_t t0, int64_t t1) {         \
    fn<T, kAvx2Bytes>(a, t0, t1);                                                        \
  }                                                                                      \
  template <typename T>                                                                  \
  void fn##_base(const Args<T>& a, int64_t t0, int64_t t1) {                             \
    fn<T, 16>(a, t0, t1);                                                                \
  }
using cpu::use_avx2;

// The align_corners taps of the upsample n_l -> n_u (ATen: scale (n_l - 1) /
// (n_u - 1), 0 when n_u == 1; src = d * scale; i0 = floor(src), i1 = min(i0 + 1,
// n_l - 1), lam = src - i0), as lipfast.kernels._taps.bilinear_taps.
struct Lin {
  std::vector<int64_t> i0, i1;
  std::vector<double> lam;
};

Lin align_corners_taps(int64_t n_u, int64_t n_l) {
  Lin t;
  t.i0.resize(n_u);
  t.i1.resize(n_u);
  t.lam.resize(n_u);
  const double scale = n_u > 1 ? static_cast<double>(n_l - 1) / static_cast<double>(n_u - 1) : 0.0;
  for (int64_t d = 0; d < n_u; ++d) {
    const double src = static_cast<double>(d) * scale;
    const int64_t i0 = std::min<int64_t>(static_cast<int64_t>(std::floor(src)), n_l - 1);
    t.i0[d] = i0;
    t.i1[d] = std::min<int64_t>(i0 + 1, n_l - 1);
    t.lam[d] = src - static_cast<double>(i0);
  }
  return t;
}

// The composite taps (logits indices, weights) of the sample at q of the
// upsampled axis of size n_u (zero border), duplicates merged, zero weights dropped.
template <typename T>
Tap<T> composite(double q, const Lin& lin, int64_t n_u) {
  Tap<T> t;
  t.n = 0;
  double w[4] = {0, 0, 0, 0};
  if (!(q > -1.0) || !(q < static_cast<double>(n_u))) {
    for (int i = 0; i < 4; ++i) {
      t.idx[i] = 0;
      t.w[i] = T(0);
    }
    return t;
  }
  const double f = std::floor(q);
  const int64_t X0 = static_cast<int64_t>(f);
  const double fx = q - f;
  auto add = [&](int64_t idx, double wt) {
    if (wt == 0.0) return;
    for (int i = 0; i < t.n; ++i) {
      if (t.idx[i] == idx) {
        w[i] += wt;
        return;
      }
    }
    t.idx[t.n] = static_cast<int32_t>(idx);
    w[t.n] = wt;
    ++t.n;
  };
  for (int d = 0; d < 2; ++d) {
    const int64_t X = X0 + d;
    const double wu = d ? fx : 1.0 - fx;
    if (X < 0 || X >= n_u || wu == 0.0) continue;
    add(lin.i0[X], wu * (1.0 - lin.lam[X]));
    add(lin.i1[X], wu * lin.lam[X]);
  }
  for (int i = 0; i < 4; ++i) {
    if (i >= t.n) t.idx[i] = t.n ? t.idx[0] : 0;  // unused slots: weight 0, a read index
    t.w[i] = static_cast<T>(w[i]);
  }
  return t;
}

// out[i] = sum_t w_t p_t[i] for i in [0, len), len a multiple of kLanes.
template <typename T>
LIPFAST_ALWAYS_INLINE inline void combine(const Tap<T>& tp, const T* base, int64_t stride,
                                          int64_t len, T* __restrict__ out) {
  const T w0 = tp.w[0], w1 = tp.w[1], w2 = tp.w[2], w3 = tp.w[3];
  const T* __restrict__ p0 = base + tp.idx[0] * stride;
  const T* __restrict__ p1 = base + tp.idx[1] * stride;
  const T* __restrict__ p2 = base + tp.idx[2] * stride;
  const T* __restrict__ p3 = base + tp.idx[3] * stride;
  switch (tp.n) {
    case 0:
      for (int64_t i = 0; i < len; i += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) out[i + l] = T(0);
      break;
    case 1:
      for (int64_t i = 0; i < len; i += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) out[i + l] = w0 * p0[i + l];
      break;
    case 2:
      for (int64_t i = 0; i < len; i += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) out[i + l] = w0 * p0[i + l] + w1 * p1[i + l];
      break;
    case 3:
      for (int64_t i = 0; i < len; i += kLanes)
        for (int64_t l = 0; l < kLanes; ++l)
          out[i + l] = w0 * p0[i + l] + w1 * p1[i + l] + w2 * p2[i + l];
      break;
    default:
      for (int64_t i = 0; i < len; i += kLanes)
        for (int64_t l = 0; l < kLanes; ++l)
          out[i + l] = w0 * p0[i + l] + w1 * p1[i + l] + w2 * p2[i + l] + w3 * p3[i + l];
      break;
  }
}

// B-byte vectors of T (GCC vector extensions; B = 32: one AVX2 register, the
// AVX2 variant; B = 16: one SSE register, the baseline variant), unaligned loads
// and stores through memcpy, and the integer vectors of the same lane width.
template <typename T>
struct IntOf;
template <>
struct IntOf<float> {
  typedef int32_t type;
};
template <>
struct IntOf<double> {
  typedef int64_t type;
};
template <typename T, int B>
struct Vec {
  typedef T V __attribute__((vector_size(B)));
  typedef typename IntOf<T>::type Ie;
  typedef Ie I __attribute__((vector_size(B)));
  static constexpr int64_t lanes = B / sizeof(T);
};

template <typename V, typename T>
LIPFAST_ALWAYS_INLINE inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
LIPFAST_ALWAYS_INLINE inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// exp of float lanes written so that it stays vectorised (Cephes expf: range
// reduction by ln 2, degree-6 polynomial, about 1 ulp; the same as upsample_ce's
// CPU kernel, on vectors); double: std::exp per lane.
template <typename V, typename I>
LIPFAST_ALWAYS_INLINE inline V vexp_float(V x) {
  // lower clamp -80 (not -87.3): results stay normal (no denormal assists; the
  // softmax terms below e^-80 are negligible against the sum, which is >= 1)
  const V lo = V{} - 80.f, hi = V{} + 88.3762626f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  return p * scale;
}
template <typename T, int B>
struct VExp {
  typedef typename Vec<T, B>::V V;
  LIPFAST_ALWAYS_INLINE static V apply(V x) {
    for (int l = 0; l < Vec<T, B>::lanes; ++l) x[l] = std::exp(x[l]);
    return x;
  }
};
template <int B>
struct VExp<float, B> {
  typedef typename Vec<float, B>::V V;
  LIPFAST_ALWAYS_INLINE static V apply(V x) {
    return vexp_float<V, typename Vec<float, B>::I>(x);
  }
};

template <typename T, int B>
LIPFAST_ALWAYS_INLINE inline void rows_impl(const Args<T>& a, int64_t t0, int64_t t1) {
  typedef typename Vec<T, B>::V V;
  typedef typename Vec<T, B>::I I;
  typedef typename Vec<T, B>::Ie Ie;
  const int64_t C = a.C, Cp = a.Cp, W = a.w, OH = a.out_h, OW = a.out_w;
  constexpr int64_t VL = Vec<T, B>::lanes;
  const int64_t nb = Cp / VL;
  const bool stats = a.maps == 1 || a.fg;
  std::vector<T> rbuf(W * Cp), vbuf(Cp), ebuf(Cp), pix(a.maps ? OW * Cp : 0);
  // pad: 0 on the C channels, -inf on the padding; keep: 1 / 0
  std::vector<T> padbuf(Cp, T(0)), keepbuf(Cp, T(1));
  for (int64_t c = C; c < Cp; ++c) {
    padbuf[c] = -std::numeric_limits<T>::infinity();
    keepbuf[c] = T(0);
  }
  const T* __restrict__ pad = padbuf.data();
  const T* __restrict__ keep = keepbuf.data();
  T* __restrict__ R = rbuf.data();
  T* __restrict__ e = ebuf.data();
  I lane;
  for (int l = 0; l < VL; ++l) lane[l] = l;
  const I none = I{} + (Ie(1) << 30);
  const T uni = T(1) / static_cast<T>(C);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t k = t / OH, y = t % OH;
    const Tap<T>& rt = a.rows[t];
    uint8_t* lab = a.labels + t * OW;
    T* fgo = a.fg ? a.fg_out + t * OW : nullptr;
    if (rt.n == 0 || a.jhi[k] < a.jlo[k]) {  // no valid tap in the row: V = 0
      std::memset(lab, 0, OW);
      if (fgo)
        for (int64_t x = 0; x < OW; ++x) fgo[x] = T(1) - uni;
      if (a.maps) {
        const T val = a.maps == 1 ? uni : T(0);
        for (int64_t c = 0; c < C; ++c) {
          T* o = a.maps_out + ((k * C + c) * OH + y) * OW;
          for (int64_t x = 0; x < OW; ++x) o[x] = val;
        }
      }
      continue;
    }
    const int64_t j0 = a.jlo[k];
    combine<T>(rt, a.P + (k * a.h * W + j0) * Cp, W * Cp, (a.jhi[k] - j0 + 1) * Cp, R + j0 * Cp);
    const Tap<T>* ct = a.cols + k * OW;
    for (int64_t x = 0; x < OW; ++x) {
      T* __restrict__ v = a.maps ? pix.data() + x * Cp : vbuf.data();
      // V of the pixel: its column taps of R, plus pad (branch-free for <= 2 taps)
      const Tap<T>& tp = ct[x];
      const T* p0 = R + tp.idx[0] * Cp;
      const T* p1 = R + tp.idx[1] * Cp;
      const T w0 = tp.w[0], w1 = tp.w[1];
      V mx = V{} - std::numeric_limits<T>::infinity();
      if (tp.n <= 2) {
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t c = b * VL;
          const V u = w0 * vload<V>(p0 + c) + w1 * vload<V>(p1 + c) + vload<V>(pad + c);
          vstore(v + c, u);
          mx = u > mx ? u : mx;
        }
      } else {
        const T* p2 = R + tp.idx[2] * Cp;
        const T* p3 = R + tp.idx[3] * Cp;
        const T w2 = tp.w[2], w3 = tp.w[3];
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t c = b * VL;
          const V u = w0 * vload<V>(p0 + c) + w1 * vload<V>(p1 + c) + w2 * vload<V>(p2 + c) +
                      w3 * vload<V>(p3 + c) + vload<V>(pad + c);
          vstore(v + c, u);
          mx = u > mx ? u : mx;
        }
      }
      T m = mx[0];
      for (int l = 1; l < VL; ++l) m = mx[l] > m ? mx[l] : m;
      // the first channel equal to the maximum (numpy's rule): a min of indices
      I first = none;
      for (int64_t b = 0; b < nb; ++b) {
        const I cand = vload<V>(v + b * VL) == m ? lane + static_cast<Ie>(b * VL) : none;
        first = cand < first ? cand : first;
      }
      Ie bi = first[0];
      for (int l = 1; l < VL; ++l) bi = first[l] < bi ? first[l] : bi;
      if (bi >= C) bi = 0;  // NaN logits
      lab[x] = static_cast<uint8_t>(bi);
      if (stats) {
        V sv = V{};
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t c = b * VL;
          const V ex = VExp<T, B>::apply(vload<V>(v + c) - m) * vload<V>(keep + c);
          vstore(e + c, ex);
          sv += ex;
        }
        T s = T(0);
        for (int l = 0; l < VL; ++l) s += sv[l];
        const T inv = T(1) / s;
        if (fgo) fgo[x] = T(1) - e[0] * inv;
        if (a.maps == 1)
          for (int64_t b = 0; b < nb; ++b) vstore(v + b * VL, vload<V>(e + b * VL) * inv);
      }
    }
    if (a.maps) {
      for (int64_t c = 0; c < C; ++c) {
        T* __restrict__ o = a.maps_out + ((k * C + c) * OH + y) * OW;
        const T* src = pix.data() + c;
        for (int64_t x = 0; x < OW; ++x) o[x] = src[x * Cp];
      }
    }
  }
}

LIPFAST_PP_VARIANTS(rows_impl)

template <typename T>
void run(const at::Tensor& logits, const double* aff, int64_t in_h, int64_t in_w, int64_t out_h,
         int64_t out_w, int64_t maps, bool fg, const at::Tensor& labels, const at::Tensor& maps_t,
         const at::Tensor& fg_t) {
  const int64_t K = logits.size(0), C = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t Cp = (C + kLanes - 1) / kLanes * kLanes;
  // pack the logits channel-last, zero-padded channels
  std::vector<T> P(static_cast<size_t>(K * h * w * Cp), T(0));
  const T* src = logits.const_data_ptr<T>();
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1), s2 = logits.stride(2),
                s3 = logits.stride(3);
  at::parallel_for(0, K * h, std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, w * C)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t k = r / h, i = r % h;
      T* dst = P.data() + r * w * Cp;
      for (int64_t c = 0; c < C; ++c) {
        const T* s = src + k * s0 + c * s1 + i * s2;
        for (int64_t j = 0; j < w; ++j) dst[j * Cp + c] = s[j * s3];
      }
    }
  });
  // composite tap tables
  const Lin ly = align_corners_taps(in_h, h), lx = align_corners_taps(in_w, w);
  std::vector<Tap<T>> rows(K * out_h), cols(K * out_w);
  std::vector<int64_t> jlo(K), jhi(K);
  for (int64_t k = 0; k < K; ++k) {
    const double ax = aff[4 * k], bx = aff[4 * k + 1], ay = aff[4 * k + 2], by = aff[4 * k + 3];
    for (int64_t y = 0; y < out_h; ++y)
      rows[k * out_h + y] = composite<T>(ay * static_cast<double>(y) + by, ly, in_h);
    int64_t lo = w, hi = -1;
    for (int64_t x = 0; x < out_w; ++x) {
      const Tap<T> t = composite<T>(ax * static_cast<double>(x) + bx, lx, in_w);
      cols[k * out_w + x] = t;
      for (int i = 0; i < t.n; ++i) {
        lo = std::min<int64_t>(lo, t.idx[i]);
        hi = std::max<int64_t>(hi, t.idx[i]);
      }
    }
    jlo[k] = lo;
    jhi[k] = hi;
    if (lo <= hi) {  // columns without taps read (with weight 0) a computed column
      for (int64_t x = 0; x < out_w; ++x) {
        Tap<T>& t = cols[k * out_w + x];
        if (t.n == 0)
          for (int i = 0; i < 4; ++i) t.idx[i] = static_cast<int32_t>(lo);
      }
    }
  }
  Args<T> a{P.data(), rows.data(), cols.data(), jlo.data(), jhi.data(), C, Cp, h, w, out_h, out_w,
            maps, fg, labels.mutable_data_ptr<uint8_t>(),
            maps ? maps_t.mutable_data_ptr<T>() : nullptr, fg ? fg_t.mutable_data_ptr<T>() : nullptr};
  const bool avx2 = use_avx2();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, out_w * Cp));
  at::parallel_for(0, K * out_h, grain, [&](int64_t t0, int64_t t1) {
    if (avx2) {
      rows_impl_avx2<T>(a, t0, t1);
    } else {
      rows_impl_base<T>(a, t0, t1);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> parse_postprocess_cpu(
    const at::Tensor& logits, const at::Tensor& affine, int64_t in_h, int64_t in_w, int64_t out_h,
    int64_t out_w, int64_t maps, bool fg) {
  TORCH_CHECK_VALUE(logits.dim() == 4, "parse_postprocess expects K x C x h x w logits, got shape ",
                    logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble,
                   "parse_postprocess expects float32 or float64 logits, got ", st);
  TORCH_CHECK_VALUE(logits.device().is_cpu() && affine.device().is_cpu(),
                    "parse_postprocess: the CPU kernel got logits on ", logits.device(),
                    " and affine on ", affine.device());
  const int64_t K = logits.size(0), C = logits.size(1), h = logits.size(2), w = logits.size(3);
  TORCH_CHECK_VALUE(C >= 1 && C <= 256, "parse_postprocess: the number of classes C must be in ",
                    "[1, 256] (uint8 labels), got ", C);
  TORCH_CHECK_VALUE(h >= 1 && w >= 1, "parse_postprocess: empty logits map ", logits.sizes());
  TORCH_CHECK_TYPE(affine.scalar_type() == at::kDouble,
                   "parse_postprocess: affine must be float64, got ", affine.scalar_type());
  TORCH_CHECK_VALUE(affine.dim() == 2 && affine.size(0) == K && affine.size(1) == 4,
                    "parse_postprocess: affine must be K x 4 = ", K, " x 4 (ax, bx, ay, by), got ",
                    affine.sizes());
  TORCH_CHECK_VALUE(in_h >= 1 && in_w >= 1 && out_h >= 1 && out_w >= 1,
                    "parse_postprocess: sizes must be positive, got in ", in_h, " x ", in_w,
                    ", out ", out_h, " x ", out_w);
  TORCH_CHECK_VALUE(maps >= 0 && maps <= 2, "parse_postprocess: maps must be 0, 1 or 2, got ",
                    maps);
  const at::Tensor aff = affine.contiguous();
  const double* pa = aff.const_data_ptr<double>();
  for (int64_t i = 0; i < 4 * K; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(pa[i]), "parse_postprocess: affine has a non-finite value ",
                      pa[i], " (row ", i / 4, ")");
  }
  const auto opts = logits.options();
  at::Tensor labels = at::empty({K, out_h, out_w}, opts.dtype(at::kByte));
  at::Tensor maps_t = maps ? at::empty({K, C, out_h, out_w}, opts) : at::empty({0}, opts);
  at::Tensor fg_t = fg ? at::empty({K, out_h, out_w}, opts) : at::empty({0}, opts);
  if (K == 0) return {labels, maps_t, fg_t};
  AT_DISPATCH_FLOATING_TYPES(st, "parse_postprocess_cpu", [&] {
    run<scalar_t>(logits, pa, in_h, in_w, out_h, out_w, maps, fg, labels, maps_t, fg_t);
  });
  return {labels, maps_t, fg_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("parse_postprocess", &parse_postprocess_cpu); }

}  // namespace ops
}  // namespace lipfast
