// CUDA kernels of the In-Place ABN ops. See abn_kernel.cuh for the contract.
//
// Reductions: block (c, j) reduces one piece of one row (n, c) of length <= kPiece
// (looping over further pieces when the grid is capped), writes a partial to the
// workspace, and a finalize kernel merges a channel's partials in double.
// Statistics use shifted sums (x - K, K = the channel's first value) so the
// float32 second moment does not cancel when |mean| >> std.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "abn_kernel.cuh"

namespace lipfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kPiece = kThreads * 8;
constexpr int64_t kMaxGridY = 65535;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  A r = 0;
  if (warp == 0) {
    r = lane < (blockDim.x >> 5) ? smem[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) r += __shfl_down_sync(0xffffffffu, r, o);
  }
  return r;  // valid in thread 0
}

template <typename A>
__device__ __forceinline__ A inv_z(A y, int act, A p) {
  if (y >= A(0) || act == 0) return y;
  if (act == 1) return y / p;
  return log1p(y / p);
}
template <typename A>
__device__ __forceinline__ A inv_dz(A y, A g, int act, A p) {
  if (y >= A(0) || act == 0) return g;
  if (act == 1) return g * p;
  return g * (y + p);
}

struct Grid {
  int64_t pieces;  // pieces per row
  int64_t jobs;    // n * pieces (per channel)
  int64_t grid_y;  // blocks per channel
};
Grid reduce_grid(int64_t n, int64_t s) {
  Grid g;
  g.pieces = std::max<int64_t>(1, (s + kPiece - 1) / kPiece);
  g.jobs = n * g.pieces;
  g.grid_y = std::max<int64_t>(1, std::min(g.jobs, kMaxGridY));
  return g;
}

// Partial sums for statistics: count, sum(x - K), sum((x - K)^2).
template <typename T>
__global__ void stats_partial_kernel(const T* __restrict__ x, int64_t n, int64_t c, int64_t s,
                                     int64_t pieces, typename Acc<T>::type* __restrict__ part) {
  using A = typename Acc<T>::type;
  __shared__ A smem[32];
  const int64_t ch = blockIdx.x;
  const A shift = (n * s > 0) ? static_cast<A>(load(x + ch * s)) : A(0);
  A s1 = 0, s2 = 0, cnt = 0;
  for (int64_t job = blockIdx.y; job < n * pieces; job += gridDim.y) {
    const int64_t row = job / pieces, piece = job % pieces;
    const T* p = x + (row * c + ch) * s;
    const int64_t beg = piece * kPiece, end = min(s, beg + kPiece);
    for (int64_t i = beg + threadIdx.x; i < end; i += blockDim.x) {
      const A d = static_cast<A>(load(p + i)) - shift;
      s1 += d;
      s2 += d * d;
    }
    cnt += static_cast<A>(end - beg);
  }
  s1 = block_sum(s1, smem);
  s2 = block_sum(s2, smem);
  if (threadIdx.x == 0) {
    A* o = part + (ch * gridDim.y + blockIdx.y) * 3;
    o[0] = cnt;
    o[1] = s1;
    o[2] = s2;
  }
}

template <typename T>
__global__ void stats_finalize_kernel(const T* __restrict__ x, int64_t n, int64_t s,
                                      int64_t parts, const typename Acc<T>::type* __restrict__ part,
                                      typename Acc<T>::type* __restrict__ mean,
                                      typename Acc<T>::type* __restrict__ var) {
  using A = typename Acc<T>::type;
  __shared__ double smem[32];
  const int64_t ch = blockIdx.x;
  double cnt = 0, s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < parts; i += blockDim.x) {
    const A* o = part + (ch * parts + i) * 3;
    cnt += o[0];
    s1 += o[1];
    s2 += o[2];
  }
  cnt = block_sum(cnt, smem);
  s1 = block_sum(s1, smem);
  s2 = block_sum(s2, smem);
  if (threadIdx.x == 0) {
    if (cnt > 0) {
      const double shift = static_cast<double>(load(x + ch * s));
      const double m = s1 / cnt;
      mean[ch] = static_cast<A>(shift + m);
      var[ch] = static_cast<A>(fmax(0.0, s2 / cnt - m * m));
    } else {
      mean[ch] = A(0);
      var[ch] = A(0);
    }
  }
}

// Partial sums for backward: sum dz, sum z * dz.
template <typename T>
__global__ void bwd_partial_kernel(const T* __restrict__ y, const T* __restrict__ dy, int64_t n,
                                   int64_t c, int64_t s, int64_t pieces, int act, double param,
                                   typename Acc<T>::type* __restrict__ part) {
  using A = typename Acc<T>::type;
  __shared__ A smem[32];
  const int64_t ch = blockIdx.x;
  const A prm = static_cast<A>(param);
  A sdz = 0, sdzz = 0;
  for (int64_t job = blockIdx.y; job < n * pieces; job += gridDim.y) {
    const int64_t row = job / pieces, piece = job % pieces;
    const int64_t off = (row * c + ch) * s;
    const int64_t beg = piece * kPiece, end = min(s, beg + kPiece);
    for (int64_t i = beg + threadIdx.x; i < end; i += blockDim.x) {
      const A yv = static_cast<A>(load(y + off + i));
      const A dz = inv_dz(yv, static_cast<A>(load(dy + off + i)), act, prm);
      sdz += dz;
      sdzz += dz * inv_z(yv, act, prm);
    }
  }
  sdz = block_sum(sdz, smem);
  sdzz = block_sum(sdzz, smem);
  if (threadIdx.x == 0) {
    A* o = part + (ch * gridDim.y + blockIdx.y) * 2;
    o[0] = sdz;
    o[1] = sdzz;
  }
}

template <typename A>
__global__ void bwd_finalize_kernel(int64_t parts, const A* __restrict__ part,
                                    const A* __restrict__ w, const A* __restrict__ b,
                                    A* __restrict__ sum_dz, A* __restrict__ sum_xhat_dz) {
  __shared__ double smem[32];
  const int64_t ch = blockIdx.x;
  double sdz = 0, sdzz = 0;
  for (int64_t i = threadIdx.x; i < parts; i += blockDim.x) {
    sdz += part[(ch * parts + i) * 2];
    sdzz += part[(ch * parts + i) * 2 + 1];
  }
  sdz = block_sum(sdz, smem);
  sdzz = block_sum(sdzz, smem);
  if (threadIdx.x == 0) {
    sum_dz[ch] = static_cast<A>(sdz);
    sum_xhat_dz[ch] = static_cast<A>((sdzz - static_cast<double>(b[ch]) * sdz) /
                                     static_cast<double>(w[ch]));
  }
}

template <typename T>
__global__ void forward_kernel(T* __restrict__ x, int64_t rows, int64_t c, int64_t s,
                               const typename Acc<T>::type* __restrict__ scale,
                               const typename Acc<T>::type* __restrict__ shift, int act,
                               double param) {
  using A = typename Acc<T>::type;
  const A prm = static_cast<A>(param);
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t ch = row % c;
    const A a = scale[ch], b = shift[ch];
    T* p = x + row * s;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < s;
         i += (int64_t)gridDim.x * blockDim.x) {
      A z = static_cast<A>(load(p + i)) * a + b;
      if (z < A(0)) {
        if (act == 1) z *= prm;
        else if (act == 2) z = prm * expm1(z);
      }
      store(p + i, z);
    }
  }
}

template <typename T>
__global__ void backward_elemt_kernel(const T* __restrict__ y, const T* __restrict__ dy,
                                      T* __restrict__ dx, int64_t rows, int64_t c, int64_t s,
                                      const typename Acc<T>::type* __restrict__ k1,
                                      const typename Acc<T>::type* __restrict__ k2,
                                      const typename Acc<T>::type* __restrict__ k3, int act,
                                      double param) {
  using A = typename Acc<T>::type;
  const A prm = static_cast<A>(param);
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t ch = row % c;
    const A a = k1[ch], bz = k2[ch], k = k3[ch];
    const int64_t off = row * s;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < s;
         i += (int64_t)gridDim.x * blockDim.x) {
      const A yv = static_cast<A>(load(y + off + i));
      const A g = static_cast<A>(load(dy + off + i));
      store(dx + off + i, a * inv_dz(yv, g, act, prm) + bz * inv_z(yv, act, prm) + k);
    }
  }
}

dim3 elementwise_grid(int64_t rows, int64_t s) {
  const int64_t gx = std::min<int64_t>((s + kThreads - 1) / kThreads, 1024);
  const int64_t gy = std::min<int64_t>(rows, kMaxGridY);
  return dim3(static_cast<unsigned>(std::max<int64_t>(gx, 1)),
              static_cast<unsigned>(std::max<int64_t>(gy, 1)));
}

template <typename F>
cudaError_t dispatch(int dtype, F f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
    case kFloat64: return f(double{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t abn_reduce_workspace_bytes(int dtype, int64_t n, int64_t c, int64_t s) {
  const Grid g = reduce_grid(n, s);
  const size_t acc = dtype == kFloat64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(c) * g.grid_y * 3 * acc;
}

cudaError_t abn_stats_launch(int dtype, const void* x, int64_t n, int64_t c, int64_t s,
                             void* mean, void* var, void* workspace, cudaStream_t stream) {
  if (c == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const Grid g = reduce_grid(n, s);
    const dim3 grid(static_cast<unsigned>(c), static_cast<unsigned>(g.grid_y));
    stats_partial_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), n, c, s, g.pieces, static_cast<A*>(workspace));
    stats_finalize_kernel<T><<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
        static_cast<const T*>(x), n, s, g.grid_y, static_cast<const A*>(workspace),
        static_cast<A*>(mean), static_cast<A*>(var));
    return cudaGetLastError();
  });
}

cudaError_t abn_forward_launch(int dtype, void* x, int64_t n, int64_t c, int64_t s,
                               const void* scale, const void* shift, int activation,
                               double param, cudaStream_t stream) {
  if (n * c * s == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    forward_kernel<T><<<elementwise_grid(n * c, s), kThreads, 0, stream>>>(
        static_cast<T*>(x), n * c, c, s, static_cast<const A*>(scale),
        static_cast<const A*>(shift), activation, param);
    return cudaGetLastError();
  });
}

cudaError_t abn_backward_reduce_launch(int dtype, const void* y, const void* dy, int64_t n,
                                       int64_t c, int64_t s, const void* w_eff,
                                       const void* b_eff, int activation, double param,
                                       void* sum_dz, void* sum_xhat_dz, void* workspace,
                                       cudaStream_t stream) {
  if (c == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const Grid g = reduce_grid(n, s);
    const dim3 grid(static_cast<unsigned>(c), static_cast<unsigned>(g.grid_y));
    bwd_partial_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(y), static_cast<const T*>(dy), n, c, s, g.pieces, activation,
        param, static_cast<A*>(workspace));
    bwd_finalize_kernel<A><<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
        g.grid_y, static_cast<const A*>(workspace), static_cast<const A*>(w_eff),
        static_cast<const A*>(b_eff), static_cast<A*>(sum_dz), static_cast<A*>(sum_xhat_dz));
    return cudaGetLastError();
  });
}

cudaError_t abn_backward_elemt_launch(int dtype, const void* y, const void* dy, void* dx,
                                      int64_t n, int64_t c, int64_t s, const void* k1,
                                      const void* k2, const void* k3, int activation,
                                      double param, cudaStream_t stream) {
  if (n * c * s == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    backward_elemt_kernel<T><<<elementwise_grid(n * c, s), kThreads, 0, stream>>>(
        static_cast<const T*>(y), static_cast<const T*>(dy), static_cast<T*>(dx), n * c, c, s,
        static_cast<const A*>(k1), static_cast<const A*>(k2), static_cast<const A*>(k3),
        activation, param);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lipfast
