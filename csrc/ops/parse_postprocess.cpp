// Schema of SCHP's fused in-the-wild post-processing (lipfast.ops.parse_postprocess).
// CPU kernel: cpu/parse_postprocess_kernel.cpp. The CUDA kernel is Triton
// (lipfast/kernels/parse_postprocess.py), registered for CUDA from Python together
// with the fake kernel (lipfast/ops/parse_postprocess.py). No autograd (inference op).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lipfast, m) {
  // logits: K x C x h x w (float32/float64, any strides); affine: K x 4 float64
  // rows (ax, bx, ay, by). V[k, c, y, x] = bilinear sample (zero border, taps
  // outside [0, in_w-1] x [0, in_h-1] are 0) at (ax x + bx, ay y + by) of the
  // logits upsampled bilinearly (align_corners=True) to in_h x in_w; never stored.
  // labels: K x out_h x out_w uint8 argmax_c V (first maximum; C <= 256);
  // maps = 0: empty (0,), 1: softmax_c V, 2: V (K x C x out_h x out_w);
  // fg: K x out_h x out_w 1 - softmax_c(V)[0] when true, else empty (0,).
  m.def(
      "parse_postprocess(Tensor logits, Tensor affine, SymInt in_h, SymInt in_w, SymInt out_h, "
      "SymInt out_w, int maps, bool fg) -> (Tensor labels, Tensor maps, Tensor fg)",
      {at::Tag::pt2_compliant_tag});
}
