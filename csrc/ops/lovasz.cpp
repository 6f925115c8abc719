// Schema of the Lovász-Softmax op (lipfast.losses.lovasz_softmax, SPEC section 3).
// CPU kernel: cpu/lovasz_kernel.cpp. The CUDA path (torch.sort + the Triton
// Jaccard-gradient kernel of lipfast/kernels/lovasz.py), the fake kernel and the
// autograd formula are registered from Python (lipfast/losses/lovasz.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lipfast, m) {
  // (loss, dloss_dx): the loss (0-d, x's dtype) and its gradient with respect to
  // x (x's shape, float32 / float64), both computed by the forward.
  // classes: the class ids used (a list is taken as given, duplicates count
  // twice); present: drop the listed classes without a valid pixel in the set.
  m.def(
      "lovasz_softmax_loss(Tensor x, Tensor labels, int[] classes, bool present, "
      "bool per_image, int ignore_index, bool from_logits) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
