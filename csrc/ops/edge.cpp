// Schema of SCHP's edge-label op (lipfast.losses.generate_edge, SPEC section 3).
// CPU kernel: cpu/edge_kernel.cpp. The CUDA kernel is Triton
// (lipfast/kernels/edge.py), registered for CUDA from Python together with the
// fake kernel (lipfast/losses/edge.py). No autograd: the output is integer.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lipfast, m) {
  // B x H x W integer labels (255 = ignore) -> B x H x W int64 0/1 edges
  // (four neighbour rules, then a 3x3 box dilation); edge_width must be 3.
  m.def("generate_edge(Tensor labels, int edge_width) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}
