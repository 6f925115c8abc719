// Schema of the fused pose decoding (lipfast.pose.decode): HRNet's get_final_preds
// (argmax, quarter-pixel refinement, transform_preds back to the image) with the
// flip test's flip_back + shift + average optionally fused in front of it.
// CPU kernel: cpu/pose_decode_kernel.cpp. The CUDA kernel is Triton
// (lipfast/kernels/pose_decode.py), registered for CUDA from Python together with
// the fake kernel (lipfast/ops/pose_decode.py). No autograd (inference op).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lipfast, m) {
  // heatmaps: B x J x h x w float32/float64 (any strides); flipped: None or the
  // heatmaps of the W-flipped input (same shape and dtype), flipped back with
  // flip_perm (J entries, a permutation: channel j reads flipped channel
  // flip_perm[j]), shifted right by one pixel and averaged with heatmaps
  // ((a + b) * 0.5 in the heatmaps dtype, never stored); center, scale: B x 2
  // float64 (x, y) image pixels and units of 200 px (only scale[:, 0] is used,
  // as in the reference). Returns coords B x J x 2 (image x, y) and maxvals B x J,
  // both in the heatmaps dtype.
  m.def(
      "pose_decode(Tensor heatmaps, Tensor? flipped, Tensor center, Tensor scale, "
      "int[] flip_perm) -> (Tensor coords, Tensor maxvals)",
      {at::Tag::pt2_compliant_tag});
}
