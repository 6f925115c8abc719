// Upsampled cross-entropy: shared declarations (schemas in upsample_ce.cpp).
//
//   upsample_ce           per-pixel NLL and log-sum-exp of the logits bilinearly
//                         upsampled to the label size, never storing them
//   upsample_ce_backward  d logits, recomputing the softmax from the saved lse
//
// Argument checks raise ValueError / TypeError (TORCH_CHECK_VALUE / _TYPE) with
// the messages of the Python checks in lipfast/losses/upsample_ce.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace lipfast {
namespace ops {

inline void check_upsample_ce_args(const at::Tensor& logits, const at::Tensor& labels,
                                   const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(logits.dim() == 4,
                    "upsample_cross_entropy: logits must be B x C x h x w, got ", logits.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()),
                   "upsample_cross_entropy: logits must be floating point, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 3,
                    "upsample_cross_entropy: labels must be B x H x W, got ", labels.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "upsample_cross_entropy: labels must be an integer tensor (uint8 or int64), "
                   "got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.size(0) == logits.size(0),
                    "upsample_cross_entropy: batch mismatch, logits ", logits.sizes(),
                    " vs labels ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "upsample_cross_entropy: logits on ",
                    logits.device(), ", labels on ", labels.device());
  TORCH_CHECK_VALUE(logits.size(1) > 0 && logits.size(2) > 0 && logits.size(3) > 0,
                    "upsample_cross_entropy: empty logits ", logits.sizes());
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == logits.size(1),
                      "upsample_cross_entropy: weight must be a 1-D tensor of ", logits.size(1),
                      " class weights, got ", w.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()),
                     "upsample_cross_entropy: weight must be floating point, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == logits.device(), "upsample_cross_entropy: weight on ",
                      w.device(), ", logits on ", logits.device());
  }
}

// The loss / lse dtype: float64 for float64 logits, float32 otherwise.
inline at::ScalarType upsample_ce_acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The 1-D bilinear map n_in -> n_out exactly as ATen's upsample_bilinear2d
// computes it (area_pixel_compute_scale, area_pixel_compute_source_index,
// guard_index_and_lambda in ATen/native/UpSample.h, scales not given):
// out[d] = w0[d] * in[i0[d]] + w1[d] * in[i1[d]], in the precision T.
template <typename T>
inline void bilinear_taps(int64_t n_out, int64_t n_in, bool align_corners, int64_t* i0,
                          int64_t* i1, T* w0, T* w1) {
  T scale;
  if (align_corners) {
    scale = n_out > 1 ? static_cast<T>(n_in - 1) / static_cast<T>(n_out - 1) : T(0);
  } else {
    scale = static_cast<T>(n_in) / static_cast<T>(n_out);
  }
  for (int64_t d = 0; d < n_out; ++d) {
    T src;
    if (align_corners) {
      src = scale * static_cast<T>(d);
    } else {
      src = scale * (static_cast<T>(d) + T(0.5)) - T(0.5);
      if (src < 0) src = T(0);
    }
    const int64_t i = std::min(static_cast<int64_t>(std::floor(src)), n_in - 1);
    const T lam = std::min(std::max(src - static_cast<T>(i), T(0)), T(1));
    i0[d] = i;
    i1[d] = i + (i < n_in - 1 ? 1 : 0);
    w0[d] = T(1) - lam;
    w1[d] = lam;
  }
}

}  // namespace ops
}  // namespace lipfast
