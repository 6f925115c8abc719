// Schemas of the fused pose heatmap loss (lipfast.pose.heatmap_loss, SPEC section
// 10: deep-high-resolution-net.pytorch's Gaussian targets + JointsMSELoss with
// target weights) and of its target generation (lipfast.pose.generate_heatmaps).
// CPU kernels: cpu/heatmap_loss_kernel.cpp. The CUDA kernels are Triton
// (lipfast/kernels/heatmap_loss.py) or a PyTorch path, registered for CUDA from
// Python together with the fake kernels and the autograd formula
// (lipfast/ops/heatmap_loss.py).
//
// The per-joint table shared by the three ops (B x J rows):
//   weight  float32: the target weight (visible, 0 where the Gaussian window
//           misses the map);
//   window  int64 x 6: x_lo, x_hi, y_lo, y_hi (the window clipped to the map,
//           half-open, empty where nothing is drawn), cx, cy (the Gaussian's
//           centre in map pixels: ul + floor((6 sigma + 1) / 2)).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lipfast, m) {
  // (loss, weight, window): the 0-d loss (float32; float64 for float64 heatmaps)
  // of heatmaps B x J x h x w against the Gaussian targets of joints B x J x 2
  // (x, y in pixels of the image_size = (W, H) input), visible B x J; the
  // target is evaluated in the kernel, never stored.
  m.def(
      "heatmap_loss(Tensor heatmaps, Tensor joints, Tensor visible, int[2] image_size, "
      "float sigma) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // d heatmaps (contiguous, the heatmaps' dtype) from the 0-d d loss and the
  // saved per-joint table.
  m.def(
      "heatmap_loss_backward(Tensor grad, Tensor heatmaps, Tensor weight, Tensor window, "
      "float sigma) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // (target B x J x h x w float32, target_weight B x J float32) with
  // heatmap_size = (w, h): the reference's generate_target, materialised.
  m.def(
      "heatmap_loss_targets(Tensor joints, Tensor visible, int[2] image_size, "
      "int[2] heatmap_size, float sigma) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
