// CPU kernel of the confusion-matrix ops (lipfast::confusion_matrix,
// lipfast::confusion_matrix_accumulate).
//
// Parallel over the B x H output rows, cut into one contiguous chunk of rows per
// thread; each chunk counts into its own private int64 histograms (4 C x C
// sub-histograms used in turn by consecutive pixels), and the
// histograms are summed at the end (no atomics, the result does not depend on
// the thread count). Per output row:
//   - logits: a running argmax over the channels along the row (first maximum
//     wins; a NaN wins over every number and the first NaN over later ones,
//     as torch.argmax does), read through the logits' strides (NCHW and
//     channels_last have their own loops; any other strides the generic one);
//   - logits with resize: the two low-res rows the output row reads are
//     interpolated along the width once per channel and kept (two slots, by row
//     parity), then combined with the row's height weights on the fly: ATen's
//     bilinear indices, weights and order (width, then height), so the resized
//     values are those of F.interpolate(align_corners=True) up to FMA
//     contraction; the B x C x H x W resized logits never exist;
//   - predictions: read as they are (uint8 / int64; other integer types are
//     converted to int64 first).
// Labels outside [0, C) other than ignore_index, and predictions outside [0, C)
// at counted pixels, are not counted; the op then raises ValueError naming the
// first bad value and leaves `out` unchanged.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "../confusion_matrix.h"
#include "../upsample_ce.h"  // bilinear_taps: ATen's bilinear indices and weights

namespace lipfast {
namespace ops {
namespace {

struct Geo {
  int64_t b, c, h, w, H, W;       // logits b x c x h x w (h = H, w = W without resize)
  int64_t sb, sc, sh, sw;         // logits strides (elements)
};

// argmax update: v replaces the best when larger, or when it is the first NaN
template <typename T>
inline bool better(T v, T best) {
  return v > best || (v != v && best == best);
}

// Predictions of one output row (b, y) of logits without resize, into idx[W].
template <typename T>
void argmax_row(const T* x, const Geo& g, int64_t b, int64_t y, T* best, int32_t* idx) {
  const T* base = x + b * g.sb + y * g.sh;
  const int64_t W = g.W, C = g.c;
  if (g.sc == 1 && g.c > 1) {  // channels_last: channels contiguous per pixel
    for (int64_t k = 0; k < W; ++k) {
      const T* p = base + k * g.sw;
      T bv = p[0];
      int32_t bi = 0;
      for (int64_t c = 1; c < C; ++c) {
        const T v = p[c];
        if (better(v, bv)) {
          bv = v;
          bi = static_cast<int32_t>(c);
        }
      }
      idx[k] = bi;
    }
    return;
  }
  if (g.sw == 1) {
    for (int64_t k = 0; k < W; ++k) {
      best[k] = base[k];
      idx[k] = 0;
    }
    for (int64_t c = 1; c < C; ++c) {
      const T* __restrict__ p = base + c * g.sc;
      const int32_t ci = static_cast<int32_t>(c);
      for (int64_t k = 0; k < W; ++k) {
        const T v = p[k];
        const bool u = better(v, best[k]);
        best[k] = u ? v : best[k];
        idx[k] = u ? ci : idx[k];
      }
    }
    return;
  }
  for (int64_t k = 0; k < W; ++k) {
    best[k] = base[k * g.sw];
    idx[k] = 0;
  }
  for (int64_t c = 1; c < C; ++c) {
    const T* p = base + c * g.sc;
    const int32_t ci = static_cast<int32_t>(c);
    for (int64_t k = 0; k < W; ++k) {
      const T v = p[k * g.sw];
      const bool u = better(v, best[k]);
      best[k] = u ? v : best[k];
      idx[k] = u ? ci : idx[k];
    }
  }
}

// Bilinear resize (align_corners=True) fused into the argmax.
template <typename T>
struct Resizer {
  const Geo& g;
  std::vector<int64_t> i0, i1, o0, o1;  // row taps; column taps as element offsets
  std::vector<T> a0, a1, b0, b1;
  Resizer(const Geo& g_) : g(g_), i0(g_.H), i1(g_.H), o0(g_.W), o1(g_.W),
                           a0(g_.H), a1(g_.H), b0(g_.W), b1(g_.W) {
    bilinear_taps<T>(g.H, g.h, true, i0.data(), i1.data(), a0.data(), a1.data());
    std::vector<int64_t> j0(g.W), j1(g.W);
    bilinear_taps<T>(g.W, g.w, true, j0.data(), j1.data(), b0.data(), b1.data());
    for (int64_t k = 0; k < g.W; ++k) {
      o0[k] = j0[k] * g.sw;
      o1[k] = j1[k] * g.sw;
    }
  }
};

// Per-thread state of the resize path: the low-res rows of all channels of one
// image interpolated along the width (two slots, by the row's parity).
template <typename T>
struct RowSlots {
  const T* x;
  const Geo& g;
  const Resizer<T>& rs;
  std::vector<T> buf;
  int64_t key[2] = {-1, -1};
  int64_t img = -1;
  RowSlots(const T* x_, const Geo& g_, const Resizer<T>& rs_)
      : x(x_), g(g_), rs(rs_), buf(2 * g_.c * g_.W) {}
  const T* get(int64_t b, int64_t r) {
    if (b != img) {
      img = b;
      key[0] = key[1] = -1;
    }
    const int s = static_cast<int>(r & 1);
    T* out = buf.data() + s * g.c * g.W;
    if (key[s] != r) {
      const int64_t* o0 = rs.o0.data();
      const int64_t* o1 = rs.o1.data();
      const T* w0 = rs.b0.data();
      const T* w1 = rs.b1.data();
      for (int64_t c = 0; c < g.c; ++c) {
        const T* src = x + b * g.sb + c * g.sc + r * g.sh;
        T* o = out + c * g.W;
        for (int64_t k = 0; k < g.W; ++k) o[k] = src[o0[k]] * w0[k] + src[o1[k]] * w1[k];
      }
      key[s] = r;
    }
    return out;
  }
};

template <typename T>
void resized_argmax_row(RowSlots<T>& slots, const Resizer<T>& rs, int64_t b, int64_t y,
                        T* best, int32_t* idx) {
  const Geo& g = slots.g;
  const int64_t W = g.W;
  const int64_t r0 = rs.i0[y], r1 = rs.i1[y];
  // fetch r1 first only when it differs: both stay valid (different parity)
  const T* p0 = slots.get(b, r0);
  const T* p1 = r1 == r0 ? p0 : slots.get(b, r1);
  const T a0 = rs.a0[y], a1 = rs.a1[y];
  for (int64_t k = 0; k < W; ++k) {
    best[k] = p0[k] * a0 + p1[k] * a1;
    idx[k] = 0;
  }
  for (int64_t c = 1; c < g.c; ++c) {
    const T* __restrict__ q0 = p0 + c * W;
    const T* __restrict__ q1 = p1 + c * W;
    const int32_t ci = static_cast<int32_t>(c);
    for (int64_t k = 0; k < W; ++k) {
      const T v = q0[k] * a0 + q1[k] * a1;
      const bool u = better(v, best[k]);
      best[k] = u ? v : best[k];
      idx[k] = u ? ci : idx[k];
    }
  }
}

// Count one row: labels lab[W] (stride 1), predictions pred[W] (stride 1).
// `hist` holds NSUB sub-histograms of C x C, used in turn by consecutive
// pixels, so runs of equal (label, prediction) pairs do not serialise on one
// counter. Returns bit 1 for a bad label, bit 2 for a bad prediction.
constexpr int64_t NSUB = 4;

template <typename L, typename P>
inline int count_row(const L* lab, const P* pred, int64_t W, int64_t C, int64_t ignore,
                     int64_t* hist) {
  int bad = 0;
  const int64_t cc = C * C;
  for (int64_t k = 0; k < W; ++k) {
    const int64_t y = static_cast<int64_t>(lab[k]);
    if (y == ignore) continue;
    if (y < 0 || y >= C) {
      bad |= 1;
      continue;
    }
    const int64_t p = static_cast<int64_t>(pred[k]);
    if (p < 0 || p >= C) {
      bad |= 2;
      continue;
    }
    hist[(k & (NSUB - 1)) * cc + y * C + p] += 1;
  }
  return bad;
}

struct Plan {
  int64_t rows, nchunks;
};

Plan plan(int64_t rows, int64_t work_per_row) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_work = std::max<int64_t>(1, rows * std::max<int64_t>(1, work_per_row) / 65536);
  return {rows, std::max<int64_t>(1, std::min({threads, rows, by_work}))};
}

// Runs fn(chunk_rows_begin, chunk_rows_end, hist) per chunk; returns the OR of
// the bad bits and the summed histogram in `total` (C x C).
template <typename F>
int run_chunks(const Plan& pl, int64_t C, std::vector<int64_t>& total, const F& fn) {
  const int64_t per = NSUB * C * C;  // one chunk's sub-histograms
  std::vector<int64_t> hists(pl.nchunks * per, 0);
  std::vector<int> bad(pl.nchunks, 0);
  at::parallel_for(0, pl.nchunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = pl.rows * k / pl.nchunks, r1 = pl.rows * (k + 1) / pl.nchunks;
      bad[k] = fn(r0, r1, hists.data() + k * per);
    }
  });
  int any = 0;
  total.assign(C * C, 0);
  for (int64_t k = 0; k < pl.nchunks * NSUB; ++k) {
    const int64_t* h = hists.data() + k * C * C;
    for (int64_t i = 0; i < C * C; ++i) total[i] += h[i];
  }
  for (int64_t k = 0; k < pl.nchunks; ++k) any |= bad[k];
  return any;
}

template <typename T, typename L>
int count_logits(const at::Tensor& x, const at::Tensor& lab, const Geo& g, int64_t ignore,
                 bool resize, std::vector<int64_t>& total) {
  const T* px = x.const_data_ptr<T>();
  const L* pl = lab.const_data_ptr<L>();
  const int64_t C = g.c, W = g.W, H = g.H;
  const Plan pln = plan(g.b * H, C * W);
  if (!resize) {
    return run_chunks(pln, C, total, [&](int64_t r0, int64_t r1, int64_t* hist) {
      std::vector<T> best(W);
      std::vector<int32_t> idx(W);
      int bad = 0;
      for (int64_t r = r0; r < r1; ++r) {
        argmax_row<T>(px, g, r / H, r % H, best.data(), idx.data());
        bad |= count_row<L, int32_t>(pl + r * W, idx.data(), W, C, ignore, hist);
      }
      return bad;
    });
  }
  const Resizer<T> rs(g);
  return run_chunks(pln, C, total, [&](int64_t r0, int64_t r1, int64_t* hist) {
    RowSlots<T> slots(px, g, rs);
    std::vector<T> best(W);
    std::vector<int32_t> idx(W);
    int bad = 0;
    for (int64_t r = r0; r < r1; ++r) {
      resized_argmax_row<T>(slots, rs, r / H, r % H, best.data(), idx.data());
      bad |= count_row<L, int32_t>(pl + r * W, idx.data(), W, C, ignore, hist);
    }
    return bad;
  });
}

template <typename P, typename L>
int count_preds(const at::Tensor& pred, const at::Tensor& lab, int64_t C, int64_t ignore,
                std::vector<int64_t>& total) {
  const P* pp = pred.const_data_ptr<P>();
  const L* pl = lab.const_data_ptr<L>();
  const int64_t W = lab.size(2);
  const Plan pln = plan(lab.size(0) * lab.size(1), W);
  return run_chunks(pln, C, total, [&](int64_t r0, int64_t r1, int64_t* hist) {
    int bad = 0;
    for (int64_t r = r0; r < r1; ++r) bad |= count_row<L, P>(pl + r * W, pp + r * W, W, C, ignore, hist);
    return bad;
  });
}

// uint8 stays uint8; every other integer type is read as int64
at::Tensor int_view(const at::Tensor& t) {
  return t.scalar_type() == at::kByte ? t.contiguous() : t.to(at::kLong).contiguous();
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

[[noreturn]] void raise_bad_label(const at::Tensor& lab, int64_t C, int64_t ignore) {
  const int64_t v = lab.scalar_type() == at::kByte ? first_bad_label<uint8_t>(lab, C, ignore)
                                                   : first_bad_label<int64_t>(lab, C, ignore);
  TORCH_CHECK_VALUE(false, "confusion_matrix: label ", v, " outside [0, ", C,
                    ") and not ignore_index=", ignore);
  abort();  // unreachable
}

// The histogram of the call (C x C int64, CPU); raises on bad values.
at::Tensor count(const at::Tensor& input, const at::Tensor& labels, int64_t C, int64_t ignore,
                 bool resize) {
  const bool is_logits = check_confusion_matrix_args(input, labels, C, resize);
  TORCH_CHECK_VALUE(input.device().is_cpu(), "confusion_matrix: the CPU kernel got a ",
                    input.device(), " tensor");
  at::Tensor result = at::zeros({C, C}, labels.options().dtype(at::kLong));
  if (labels.numel() == 0) return result;
  const at::Tensor lab = int_view(labels);
  std::vector<int64_t> total;
  int bad = 0;
  if (is_logits) {
    const at::ScalarType st = input.scalar_type();
    const at::Tensor x = (st == at::kFloat || st == at::kDouble) ? input : input.to(at::kFloat);
    const bool rs = resize && !(x.size(2) == labels.size(1) && x.size(3) == labels.size(2));
    Geo g{x.size(0), x.size(1), x.size(2), x.size(3), labels.size(1), labels.size(2),
          x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "confusion_matrix_cpu", [&] {
      bad = lab.scalar_type() == at::kByte
                ? count_logits<scalar_t, uint8_t>(x, lab, g, ignore, rs, total)
                : count_logits<scalar_t, int64_t>(x, lab, g, ignore, rs, total);
    });
  } else {
    const at::Tensor pred = int_view(input);
    if (pred.scalar_type() == at::kByte) {
      bad = lab.scalar_type() == at::kByte ? count_preds<uint8_t, uint8_t>(pred, lab, C, ignore, total)
                                           : count_preds<uint8_t, int64_t>(pred, lab, C, ignore, total);
    } else {
      bad = lab.scalar_type() == at::kByte ? count_preds<int64_t, uint8_t>(pred, lab, C, ignore, total)
                                           : count_preds<int64_t, int64_t>(pred, lab, C, ignore, total);
    }
    if ((bad & 2) && !(bad & 1)) {
      // first prediction outside [0, C) at a counted pixel
      const at::Tensor p64 = pred.to(at::kLong), l64 = lab.to(at::kLong);
      const int64_t* pp = p64.const_data_ptr<int64_t>();
      const int64_t* pl = l64.const_data_ptr<int64_t>();
      for (int64_t i = 0, n = l64.numel(); i < n; ++i) {
        if (pl[i] != ignore && pl[i] >= 0 && pl[i] < C && (pp[i] < 0 || pp[i] >= C)) {
          TORCH_CHECK_VALUE(false, "confusion_matrix: prediction ", pp[i], " outside [0, ", C,
                            ")");
        }
      }
    }
  }
  if (bad & 1) raise_bad_label(lab, C, ignore);
  TORCH_CHECK_VALUE(!(bad & 2), "confusion_matrix: prediction outside [0, ", C, ")");
  std::copy(total.begin(), total.end(), result.mutable_data_ptr<int64_t>());
  return result;
}

at::Tensor confusion_matrix_cpu(const at::Tensor& input, const at::Tensor& labels,
                                int64_t num_classes, int64_t ignore_index, bool resize) {
  return count(input, labels, num_classes, ignore_index, resize);
}

void confusion_matrix_accumulate_cpu(const at::Tensor& input, const at::Tensor& labels,
                                     int64_t num_classes, int64_t ignore_index, bool resize,
                                     const at::Tensor& out) {
  check_confusion_matrix_out(out, input, num_classes);
  const at::Tensor cm = count(input, labels, num_classes, ignore_index, resize);
  out.add_(cm);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("confusion_matrix", &confusion_matrix_cpu);
  m.impl("confusion_matrix_accumulate", &confusion_matrix_accumulate_cpu);
}

}  // namespace ops
}  // namespace lipfast
