// Confusion matrix: shared argument checks (schemas in confusion_matrix.cpp).
//
// The checks raise ValueError / TypeError (TORCH_CHECK_VALUE / _TYPE) with the
// messages of the Python checks in lipfast/metrics/confusion.py.
#pragma once

#include <ATen/ATen.h>

namespace lipfast {
namespace ops {

inline bool cm_is_int(at::ScalarType t) {
  return at::isIntegralType(t, /*includeBool=*/false);
}

// true: input holds logits (B x C x h x w); false: predictions (B x H x W).
inline bool check_confusion_matrix_args(const at::Tensor& input, const at::Tensor& labels,
                                        int64_t num_classes, bool resize) {
  TORCH_CHECK_VALUE(num_classes >= 1, "confusion_matrix: num_classes must be >= 1, got ",
                    num_classes);
  TORCH_CHECK_VALUE(labels.dim() == 3, "confusion_matrix: labels must be B x H x W, got ",
                    labels.sizes());
  TORCH_CHECK_TYPE(cm_is_int(labels.scalar_type()),
                   "confusion_matrix: labels must be an integer tensor (uint8 or int64), got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(input.device() == labels.device(), "confusion_matrix: input on ",
                    input.device(), ", labels on ", labels.device());
  const bool logits = at::isFloatingType(input.scalar_type());
  if (logits) {
    TORCH_CHECK_VALUE(input.dim() == 4, "confusion_matrix: logits must be B x C x h x w, got ",
                      input.sizes());
    TORCH_CHECK_VALUE(input.size(1) == num_classes, "confusion_matrix: logits have ",
                      input.size(1), " channels but num_classes=", num_classes);
    TORCH_CHECK_VALUE(input.size(0) == labels.size(0), "confusion_matrix: batch mismatch, logits ",
                      input.sizes(), " vs labels ", labels.sizes());
    const bool same = input.size(2) == labels.size(1) && input.size(3) == labels.size(2);
    TORCH_CHECK_VALUE(same || resize, "confusion_matrix: logits ", input.sizes(),
                      " and labels ", labels.sizes(),
                      " differ in size; pass resize=True to resize the logits bilinearly");
    TORCH_CHECK_VALUE(same || labels.numel() == 0 || (input.size(2) > 0 && input.size(3) > 0),
                      "confusion_matrix: cannot resize empty logits ", input.sizes());
  } else {
    TORCH_CHECK_TYPE(cm_is_int(input.scalar_type()),
                     "confusion_matrix: input must be floating-point logits or integer "
                     "predictions, got ", input.scalar_type());
    TORCH_CHECK_VALUE(input.sizes() == labels.sizes(), "confusion_matrix: predictions ",
                      input.sizes(), " and labels ", labels.sizes(), " differ in shape");
  }
  return logits;
}

inline void check_confusion_matrix_out(const at::Tensor& out, const at::Tensor& input,
                                       int64_t num_classes) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kLong, "confusion_matrix: out must be int64, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == num_classes && out.size(1) == num_classes,
                    "confusion_matrix: out must be ", num_classes, " x ", num_classes, ", got ",
                    out.sizes());
  TORCH_CHECK_VALUE(out.device() == input.device(), "confusion_matrix: out on ", out.device(),
                    ", input on ", input.device());
}

}  // namespace ops
}  // namespace lipfast
