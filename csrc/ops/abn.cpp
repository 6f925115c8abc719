// Schemas of the In-Place ABN op family. Kernels: cpu/abn_kernel.cpp and
// cuda/abn_cuda.cpp (+ cuda/abn_kernel.cu). Fake kernels and the autograd
// composition: lipfast/ops/abn.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lipfast, m) {
  m.def("abn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def(
      "abn_forward_(Tensor(a!) x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "float eps, str activation, float activation_param) -> ()");
  m.def(
      "abn_backward_reduce(Tensor y, Tensor dy, Tensor? weight, Tensor? bias, float eps, "
      "str activation, float activation_param) -> (Tensor sum_dz, Tensor sum_xhat_dz)");
  m.def(
      "abn_backward_elemt(Tensor y, Tensor dy, Tensor var, Tensor? weight, Tensor? bias, "
      "Tensor mean_dz, Tensor mean_xhat_dz, float eps, str activation, "
      "float activation_param) -> Tensor");
}
