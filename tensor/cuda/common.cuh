// Helpers shared by the .cu files: the checked-call macros, launch sizes, typed device math (so one template
// serves f32 and f64 with the right intrinsic), and fixed-order block reductions.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "tensor/cuda/kernels.h"
#include "tensor/device.h"
#include "tensor/error.h"

// Every CUDA runtime call goes through cudaCheck; every launch is followed by cudaCheckLaunch(), which reports
// launch-configuration errors at the launch site with file:line (asynchronous faults surface at the next check).
#define cudaCheck(call)                                                                  \
  do {                                                                                   \
    cudaError_t err_ = (call);                                                           \
    if (err_ != cudaSuccess)                                                             \
      ::psa::fail(__FILE__, ":", __LINE__, ": ", #call, ": ", cudaGetErrorString(err_)); \
  } while (0)
#define cudaCheckLaunch()          \
  do {                             \
    ::psa::cuda::count_launch();   \
    cudaCheck(cudaGetLastError()); \
  } while (0)

namespace psa::cuda {

constexpr int kThreads = 256;

void count_launch();  // one more stream operation: a kernel, a cuBLAS call, a copy or memset (gpu::launches)

// The stream every launch, copy and memset of this thread goes to (tensor/device.h: the legacy default stream
// unless a gpu::StreamGuard names another).
inline cudaStream_t stream() { return static_cast<cudaStream_t>(gpu::current_stream()); }

inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  int64_t b = (n + threads - 1) / threads;
  return (unsigned)(b < 1 ? 1 : b > 65535LL * 1024 ? 65535LL * 1024 : b);
}

// Grid-stride loop: kernels stay correct for any n whatever the grid.
#define CUDA_LOOP(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)blockDim.x * gridDim.x)

// Typed math: f32 calls the float intrinsic, f64 the double one (no silent promotion either way).
__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
__device__ __forceinline__ float d_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double d_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float d_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double d_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float d_erf(float x) { return erff(x); }
__device__ __forceinline__ double d_erf(double x) { return erf(x); }
__device__ __forceinline__ float d_pow(float x, float p) { return powf(x, p); }
__device__ __forceinline__ double d_pow(double x, double p) { return pow(x, p); }
template <typename T>
__device__ __forceinline__ bool d_isfinite(T x) { return isfinite(x); }
template <typename T>
__device__ __forceinline__ T d_inf() { return (T)INFINITY; }

// The running maximum of the CPU kernels, mx = std::max(mx, x) from -inf, skips NaN inputs (the comparison is
// false) and so never becomes NaN whatever the order. fmax skips NaN too, so tree reductions of it agree.
template <typename T>
__device__ __forceinline__ T std_max(T a, T b) { return fmax(a, b); }

// Sum of one value per thread over the block (blockDim.x a power of two <= 1024), in a fixed tree order:
// the result does not depend on timing. `scratch` holds blockDim.x doubles; every thread gets the total.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  int t = threadIdx.x;
  scratch[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) scratch[t] += scratch[t + s];
    __syncthreads();
  }
  double total = scratch[0];
  __syncthreads();
  return total;
}

template <typename T>
__device__ __forceinline__ T block_max(T v, T* scratch) {
  int t = threadIdx.x;
  scratch[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) scratch[t] = std_max(scratch[t], scratch[t + s]);
    __syncthreads();
  }
  T total = scratch[0];
  __syncthreads();
  return total;
}

// Warp butterfly sum: every lane ends with the same total, fixed order.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = std_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Second pass of the deterministic column sums: out[j] = Σ_c part[c, j], the chunks added in order in double
// (the first pass writes one double per (chunk, column); no atomics, so reruns agree bit for bit).
template <typename T>
__global__ void sum_chunks(const double* part, int64_t chunks, int64_t N, T* out) {
  CUDA_LOOP(j, N) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * N + j];
    out[j] = (T)s;
  }
}

// The launch's dynamic shared memory, 16-byte aligned (the CPU emulator of tests/cuda_emu keeps its own).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef PSA_CUDA_EMU
  return reinterpret_cast<T*>(cuda_emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<T*>(smem_raw);
#endif
}

// Up to 8 dims of shape/strides passed by value to kernels.
constexpr int kMaxDims = 8;
struct Dims {
  int rank;
  int64_t size[kMaxDims];
  int64_t stride[kMaxDims];
};

template <typename T>
const T* ptr_or_null(const Tensor& t) { return t.defined() ? t.data<T>() : nullptr; }
template <typename T>
T* mut_or_null(Tensor& t) { return t.defined() ? t.data<T>() : nullptr; }

}  // namespace psa::cuda
