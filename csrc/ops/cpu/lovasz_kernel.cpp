// CPU kernel of lipfast::lovasz_softmax_loss (exact Lovász-Softmax, SPEC
// section 3): forward and gradient in one call, float32 / float64 math.
//
//  1. from_logits: lse = logsumexp(x) over C per pixel (ATen); p = exp(x - lse)
//     is recomputed where it is read, never stored. Else p = x.
//  2. One pass over the labels per image (parallel over images): per-class
//     counts of valid pixels (G of each set and class) and the label check
//     (a value outside [0, C) other than ignore_index -> ValueError).
//  3. Parallel over (pixel set, distinct class used): the errors e = |fg - p_c|
//     of the set's valid pixels go into (key, payload) pairs -- key = the bits of
//     e (a non-negative float orders like its bit pattern), payload = the pixel's
//     offset with fg and [p > fg] in its top two bits -- sorted by an LSD radix
//     sort (11-bit digits, passes whose digit is constant are skipped), then
//     walked in descending order: integer cumsum of fg, the Jaccard differences
//     in closed form (as lipfast/losses/lovasz.py documents), the dot product
//     (double accumulator) and d loss / d p_c = weight * grad_k * sign(p - fg)
//     written straight to the pixel. A class without foreground in the set needs
//     no sort: its Jaccard gradient is 1 at the largest error and 0 elsewhere.
//     Listed classes used twice are computed once with twice the weight, so no
//     two tasks write the same plane.
//  4. from_logits: dx = p * (dp - sum_c p dp), in place, parallel over pixels.
//
// Memory: the gradient (the size of x, in the math dtype), the per-pixel lse
// (x / C), a copy of x only for half/bfloat16 or non-contiguous input, plus
// per running chunk of tasks (at most max(size of x, 64 MiB) in all) two
// n-entry pair buffers
// (8 bytes per valid pixel of the set for float32, 16 for float64). No
// classes x pixels temporaries. The result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace lipfast {
namespace ops {
namespace {

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

template <typename T>
struct Item {
  typename KeyOf<T>::type key;
  uint32_t payload;  // bit 31: fg, bit 30: p > fg, bits 0..29: offset of the pixel
};

constexpr uint32_t kFg = 1u << 31;
constexpr uint32_t kPos = 1u << 30;
constexpr uint32_t kOffMask = kPos - 1;
constexpr int64_t kMaxOffset = int64_t(1) << 30;

template <typename T>
inline typename KeyOf<T>::type key_bits(T e) {
  typename KeyOf<T>::type k;
  std::memcpy(&k, &e, sizeof(T));
  return k;
}

template <typename T>
inline T key_value(typename KeyOf<T>::type k) {
  T e;
  std::memcpy(&e, &k, sizeof(T));
  return e;
}

// Stable LSD radix sort of a[0..n) by key, ascending; tmp has room for n items.
// Returns the buffer holding the result (a or tmp).
template <typename T>
Item<T>* radix_sort(Item<T>* a, Item<T>* tmp, int64_t n, std::vector<int64_t>& count) {
  using K = typename KeyOf<T>::type;
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kBits;
  constexpr int kKeyBits = 8 * sizeof(K);
  count.assign(kBuckets, 0);
  for (int shift = 0; shift < kKeyBits; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(a[i].key >> shift) & (kBuckets - 1)];
    if (count[(a[0].key >> shift) & (kBuckets - 1)] == n) continue;  // constant digit
    int64_t sum = 0;
    for (int64_t d = 0; d < kBuckets; ++d) {
      const int64_t c = count[d];
      count[d] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) tmp[count[(a[i].key >> shift) & (kBuckets - 1)]++] = a[i];
    std::swap(a, tmp);
  }
  return a;
}

struct Problem {
  int64_t B, C, HW, S;  // S pixel sets: B (per_image) or 1
  int64_t ignore;
};

// p[b, c, i] from the input: x itself (probabilities) or, with from_logits,
// exp(x - lse[b, i]) recomputed from the per-pixel log-sum-exp (the softmax is
// never stored).
template <typename T>
struct Probs {
  const T* x;
  const T* lse;  // B x HW, or nullptr for probabilities
  int64_t C, HW;
  inline T at(int64_t b, int64_t c, int64_t i) const {
    const T v = x[(b * C + c) * HW + i];
    return lse ? std::exp(v - lse[b * HW + i]) : v;
  }
};

// One (set, class) task: adds weight * loss_c to *loss and writes
// weight * d loss_c / d p_c into dp's plane c of the set's images.
template <typename T, typename L>
void class_task(const Problem& pr, const Probs<T>& p, const L* lab, int64_t s, int64_t c, int64_t G,
                double weight, T* dp, std::vector<Item<T>>& buf, std::vector<int64_t>& count,
                double* loss) {
  const int64_t b0 = pr.B == pr.S ? s : 0;
  const int64_t b1 = pr.B == pr.S ? s + 1 : pr.B;
  const int64_t HW = pr.HW, C = pr.C;
  const T w = static_cast<T>(weight);
  if (G == 0) {
    // I_k = 0, U_k = k: grad_1 = 1, grad_k = 0 for k >= 2 -> only the largest
    // error counts (the first in pixel order among equal maxima).
    T best = -1;
    int64_t at = -1;
    T best_p = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const L* lb = lab + b * HW;
      for (int64_t i = 0; i < HW; ++i) {
        if (static_cast<int64_t>(lb[i]) == pr.ignore) continue;
        const T pv = p.at(b, c, i);
        const T e = std::abs(pv);
        if (e > best) {
          best = e;
          best_p = pv;
          at = (b * C + c) * HW + i;
        }
      }
    }
    if (at < 0) return;  // no valid pixel
    *loss = weight * static_cast<double>(best);
    const T pv = best_p;
    dp[at] = pv > 0 ? w : (pv < 0 ? -w : T(0));
    return;
  }
  const int64_t nmax = (b1 - b0) * HW;
  if (static_cast<int64_t>(buf.size()) < 2 * nmax) buf.resize(2 * nmax);
  Item<T>* a = buf.data();
  int64_t n = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * C * HW;  // + c * HW + i: the pixel's offset
    const L* lb = lab + b * HW;
    for (int64_t i = 0; i < HW; ++i) {
      const int64_t v = static_cast<int64_t>(lb[i]);
      if (v == pr.ignore) continue;
      const bool fg = v == c;
      const T f = fg ? T(1) : T(0);
      const T pv = p.at(b, c, i);
      const T e = std::abs(f - pv);
      a[n].key = key_bits<T>(e);
      a[n].payload = static_cast<uint32_t>(base + i) | (fg ? kFg : 0u) | (pv > f ? kPos : 0u);
      ++n;
    }
  }
  if (n == 0) return;
  Item<T>* sorted = radix_sort<T>(a, a + nmax, n, count);
  T* dpc = dp + c * HW;
  int64_t cg = 0;
  double acc = 0;
  for (int64_t k = 1; k <= n; ++k) {
    const Item<T>& it = sorted[n - k];  // descending
    const bool g = (it.payload & kFg) != 0;
    cg += g ? 1 : 0;
    const T inter = static_cast<T>(G - cg);
    const T uni = static_cast<T>(G + k - cg);
    T grad;
    if (k == 1) {
      grad = T(1) - inter / uni;
    } else if (g) {
      grad = T(1) / uni;
    } else {
      grad = inter / (uni * std::max(uni - T(1), T(1)));
    }
    const T e = key_value<T>(it.key);
    acc += static_cast<double>(e) * static_cast<double>(grad);
    T sgn = 0;
    if (e != T(0)) sgn = (it.payload & kPos) ? T(1) : T(-1);
    dpc[it.payload & kOffMask] = w * grad * sgn;
  }
  *loss = weight * acc;
}

// dx = p * (dp - sum_c p dp), in place over dp, p = exp(x - lse) recomputed;
// parallel over (image, pixel block).
template <typename T>
void softmax_backward_inplace(const T* x, const T* lse, T* dp, int64_t B, int64_t C,
                              int64_t HW) {
  constexpr int64_t kBlk = 256;
  const int64_t nblk = (HW + kBlk - 1) / kBlk;
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    T sum[kBlk];
    std::vector<T> pbuf(C * kBlk);  // p of the block, all classes
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nblk, j0 = (t % nblk) * kBlk, len = std::min(kBlk, HW - j0);
      const T* l = lse + b * HW + j0;
      std::fill(sum, sum + len, T(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* xc = x + (b * C + c) * HW + j0;
        const T* dc = dp + (b * C + c) * HW + j0;
        T* pc = pbuf.data() + c * kBlk;
        for (int64_t j = 0; j < len; ++j) pc[j] = std::exp(xc[j] - l[j]);
        for (int64_t j = 0; j < len; ++j) sum[j] += pc[j] * dc[j];
      }
      for (int64_t c = 0; c < C; ++c) {
        const T* pc = pbuf.data() + c * kBlk;
        T* dc = dp + (b * C + c) * HW + j0;
        for (int64_t j = 0; j < len; ++j) dc[j] = pc[j] * (dc[j] - sum[j]);
      }
    }
  });
}

template <typename T, typename L>
at::Tensor lovasz_impl(const Problem& pr, const at::Tensor& xa, const at::Tensor& lse,
                       const at::Tensor& lab, at::IntArrayRef classes, bool present,
                       double* loss_out) {
  const int64_t B = pr.B, C = pr.C, HW = pr.HW, S = pr.S;
  const Probs<T> pp{xa.const_data_ptr<T>(), lse.defined() ? lse.const_data_ptr<T>() : nullptr,
                    C, HW};
  const L* pl = lab.const_data_ptr<L>();
  // per-image class counts and the label check
  std::vector<int64_t> counts(B * C, 0);
  std::vector<int64_t> bad(B, 0);
  std::vector<uint8_t> has_bad(B, 0);
  at::parallel_for(0, B, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t b = i0; b < i1; ++b) {
      int64_t* cnt = counts.data() + b * C;
      const L* lb = pl + b * HW;
      for (int64_t i = 0; i < HW; ++i) {
        const int64_t v = static_cast<int64_t>(lb[i]);
        if (v == pr.ignore) continue;
        if (v < 0 || v >= C) {
          if (!has_bad[b]) {
            has_bad[b] = 1;
            bad[b] = v;
          }
          continue;
        }
        ++cnt[v];
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(!has_bad[b], "lovasz_softmax: labels must be in [0, ", C,
                      ") or equal ignore_index=", pr.ignore, "; found ", bad[b]);
  }
  // G per (set, class); multiplicity of each listed class; weights
  std::vector<int64_t> G(S * C, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = S == B ? b : 0;
    for (int64_t c = 0; c < C; ++c) G[s * C + c] += counts[b * C + c];
  }
  std::vector<int64_t> mult(C, 0);
  for (int64_t c : classes) ++mult[c];
  std::vector<int64_t> distinct;
  for (int64_t c = 0; c < C; ++c)
    if (mult[c] > 0) distinct.push_back(c);
  const int64_t D = static_cast<int64_t>(distinct.size());
  std::vector<double> weight(S * D, 0.0);
  for (int64_t s = 0; s < S; ++s) {
    double n_used = 0;
    for (int64_t c : classes) n_used += (!present || G[s * C + c] > 0) ? 1.0 : 0.0;
    n_used = std::max(n_used, 1.0);
    for (int64_t j = 0; j < D; ++j) {
      const int64_t c = distinct[j];
      const bool used = !present || G[s * C + c] > 0;
      weight[s * D + j] = used ? static_cast<double>(mult[c]) / n_used / static_cast<double>(S)
                               : 0.0;
    }
  }
  at::Tensor dp = at::zeros(xa.sizes(), xa.options());
  T* pd = dp.mutable_data_ptr<T>();
  std::vector<double> loss(S * D, 0.0);
  // Each chunk of tasks holds two pair buffers of the set's size: bound their
  // total by max(size of x, 64 MiB) by limiting the number of chunks (many-core
  // machines would otherwise hold one pair of buffers per thread).
  const int64_t per_chunk = 2 * (S == 1 ? B * HW : HW) * static_cast<int64_t>(sizeof(Item<T>));
  const int64_t budget =
      std::max<int64_t>(B * C * HW * static_cast<int64_t>(sizeof(T)), int64_t(64) << 20);
  const int64_t max_chunks = std::max<int64_t>(1, budget / std::max<int64_t>(per_chunk, 1));
  const int64_t grain = std::max<int64_t>(1, (S * D + max_chunks - 1) / max_chunks);
  at::parallel_for(0, S * D, grain, [&](int64_t t0, int64_t t1) {
    std::vector<Item<T>> buf;
    std::vector<int64_t> count;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / D, c = distinct[t % D];
      if (weight[t] == 0.0) continue;
      class_task<T, L>(pr, pp, pl, s, c, G[s * C + c], weight[t], pd, buf, count, &loss[t]);
    }
  });
  double total = 0;
  for (double v : loss) total += v;
  *loss_out = total;
  if (pp.lse) softmax_backward_inplace<T>(pp.x, pp.lse, pd, B, C, HW);
  return dp;
}

std::tuple<at::Tensor, at::Tensor> lovasz_softmax_loss_cpu(const at::Tensor& x,
                                                           const at::Tensor& labels,
                                                           at::IntArrayRef classes, bool present,
                                                           bool per_image, int64_t ignore_index,
                                                           bool from_logits) {
  TORCH_CHECK_VALUE(x.dim() == 4, "lovasz_softmax expects B x C x H x W predictions, got shape ",
                    x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "lovasz_softmax expects floating-point predictions, got ", x.scalar_type());
  const auto lt = labels.scalar_type();
  TORCH_CHECK_TYPE(lt == at::kByte || lt == at::kChar || lt == at::kShort || lt == at::kInt ||
                       lt == at::kLong,
                   "lovasz_softmax expects integer labels (uint8, int8, int16, int32 or int64), "
                   "got ",
                   lt);
  TORCH_CHECK_VALUE(labels.dim() == 3 && labels.size(0) == x.size(0) &&
                        labels.size(1) == x.size(2) && labels.size(2) == x.size(3),
                    "lovasz_softmax: labels of shape ", labels.sizes(),
                    " do not match predictions of shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) > 0, "lovasz_softmax: the predictions have no classes (C == 0)");
  TORCH_CHECK_VALUE(x.device().is_cpu() && labels.device().is_cpu(),
                    "lovasz_softmax: the CPU kernel got tensors on ", x.device(), " and ",
                    labels.device());
  const int64_t C = x.size(1);
  for (int64_t c : classes) {
    TORCH_CHECK_VALUE(c >= 0 && c < C, "lovasz_softmax: class id ", c, " is out of range for ",
                      C, " classes");
  }
  TORCH_CHECK_VALUE(x.numel() < kMaxOffset,
                    "lovasz_softmax: the CPU kernel handles at most 2^30 prediction elements, got ",
                    x.numel());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = x.size(0), HW = x.size(2) * x.size(3);
  at::Tensor xa = x.to(acc).contiguous();
  // from_logits: only the per-pixel log-sum-exp is stored (B x H x W), p is
  // recomputed as exp(x - lse) where needed
  at::Tensor lse;
  if (from_logits && xa.numel() > 0) lse = at::logsumexp(xa, {1}).contiguous();
  const at::Tensor lab = labels.contiguous();
  const Problem pr{B, C, HW, per_image ? B : 1, ignore_index};
  double loss = 0;
  at::Tensor dx;
  if (x.numel() == 0) {
    dx = at::zeros(x.sizes(), x.options().dtype(acc));
  } else {
    AT_DISPATCH_FLOATING_TYPES(acc, "lovasz_softmax_cpu", [&] {
      using T = scalar_t;
      AT_DISPATCH_INTEGRAL_TYPES(lt, "lovasz_softmax_cpu_labels", [&] {
        dx = lovasz_impl<T, scalar_t>(pr, xa, lse, lab, classes, present, &loss);
      });
    });
  }
  at::Tensor out = at::scalar_tensor(loss, x.options().dtype(acc)).to(x.scalar_type());
  return {out, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("lovasz_softmax_loss", &lovasz_softmax_loss_cpu); }

}  // namespace ops
}  // namespace lipfast
