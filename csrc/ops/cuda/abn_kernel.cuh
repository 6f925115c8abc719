// CUDA kernels of the In-Place ABN ops: plain CUDA launchers on raw pointers.
// This header and abn_kernel.cu include no torch header, so they compile with
// nvcc alone (CI's compile check); the torch glue is abn_cuda.cpp.
//
// Layout: contiguous (N, C, S). dtype codes: 0 float32, 1 float16, 2 bfloat16,
// 3 float64. Statistics and per-channel vectors are float32, or float64 when
// the input is float64.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lipfast {
namespace cuda {

enum ScalarCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Bytes of scratch memory the per-channel reductions need.
size_t abn_reduce_workspace_bytes(int dtype, int64_t n, int64_t c, int64_t s);

// mean[c], var[c] (biased) over N and S.
cudaError_t abn_stats_launch(int dtype, const void* x, int64_t n, int64_t c, int64_t s,
                             void* mean, void* var, void* workspace, cudaStream_t stream);

// x = act(x * scale[c] + shift[c]) in place.
cudaError_t abn_forward_launch(int dtype, void* x, int64_t n, int64_t c, int64_t s,
                               const void* scale, const void* shift, int activation,
                               double param, cudaStream_t stream);

// sum_dz[c] = sum dz; sum_xhat_dz[c] = (sum z dz - b[c] sum dz) / w[c], with z and dz
// recovered from y and dy by inverting the activation.
cudaError_t abn_backward_reduce_launch(int dtype, const void* y, const void* dy, int64_t n,
                                       int64_t c, int64_t s, const void* w_eff,
                                       const void* b_eff, int activation, double param,
                                       void* sum_dz, void* sum_xhat_dz, void* workspace,
                                       cudaStream_t stream);

// dx = k1[c] * dz + k2[c] * z + k3[c].
cudaError_t abn_backward_elemt_launch(int dtype, const void* y, const void* dy, void* dx,
                                      int64_t n, int64_t c, int64_t s, const void* k1,
                                      const void* k2, const void* k3, int activation,
                                      double param, cudaStream_t stream);

}  // namespace cuda
}  // namespace lipfast
