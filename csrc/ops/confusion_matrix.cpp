// Schemas of the confusion-matrix ops (lipfast.metrics.confusion_matrix).
// CPU kernel: cpu/confusion_matrix_kernel.cpp. The CUDA kernel is Triton
// (lipfast/kernels/confusion_matrix.py), registered for CUDA from Python together
// with the fake kernels (lipfast/metrics/confusion.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lipfast, m) {
  // num_classes x num_classes int64 matrix cm[label, pred] over the pixels whose
  // label != ignore_index. `input` is either B x C x h x w floating-point logits
  // (pred = argmax over C, first maximum, NaN wins like torch.argmax; bilinearly
  // resized to the label size with align_corners=True when `resize` is true and
  // the sizes differ) or B x H x W integer predictions.
  m.def(
      "confusion_matrix(Tensor input, Tensor labels, SymInt num_classes, SymInt ignore_index, "
      "bool resize) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The same, added in place to `out` (int64, num_classes x num_classes). On a
  // bad label / prediction `out` is left unchanged (CPU).
  m.def(
      "confusion_matrix_accumulate(Tensor input, Tensor labels, SymInt num_classes, "
      "SymInt ignore_index, bool resize, Tensor(a!) out) -> ()",
      {at::Tag::pt2_compliant_tag});
}
