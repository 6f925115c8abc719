// The Python module lipfast._C. Importing it registers every op in the
// `lipfast` torch.library namespace (see ops/*.cpp); pybind11 exposes only
// build information here, never ops.
#include <torch/extension.h>

#ifdef LIPFAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

bool built_with_cuda() {
#ifdef LIPFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_version() {
#ifdef LIPFAST_WITH_CUDA
  return std::to_string(CUDART_VERSION / 1000) + "." +
         std::to_string((CUDART_VERSION % 1000) / 10);
#else
  return "";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lipfast compiled ops (registered under torch.ops.lipfast)";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("cuda_version", &cuda_version, "CUDA version the kernels were compiled with, or ''.");
}
