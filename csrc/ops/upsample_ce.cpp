// Schemas of the upsampled cross-entropy ops (lipfast.losses.upsample_cross_entropy).
// CPU kernels: cpu/upsample_ce_kernel.cpp. The CUDA kernels are Triton
// (lipfast/kernels/upsample_ce.py), registered for CUDA from Python together with
// the fake kernels and the autograd formula (lipfast/losses/upsample_ce.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lipfast, m) {
  // (nll, lse, wsum): per-pixel weighted NLL and log-sum-exp of the bilinearly
  // upsampled logits (B x H x W), and the 0-d sum of the class weights of the
  // non-ignored pixels.
  m.def(
      "upsample_ce(Tensor logits, Tensor labels, Tensor? weight, SymInt ignore_index, "
      "bool align_corners) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // d logits from d nll and the saved per-pixel log-sum-exp.
  m.def(
      "upsample_ce_backward(Tensor dnll, Tensor logits, Tensor labels, Tensor? weight, "
      "Tensor lse, SymInt ignore_index, bool align_corners) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}
