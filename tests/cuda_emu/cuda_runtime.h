// A CPU emulator of the part of CUDA the engine uses, so that the CUDA backend's kernels and host code run and
// are tested on machines without a GPU (`make test-cuda-emu`; the Makefile's CUDA=emu build).
//
// How: every tensor/cuda/*.cu file is compiled as C++ with this directory first on the include path, so that
// <cuda_runtime.h> and <cublas_v2.h> are these files. The Makefile rewrites each launch `k<<<cfg>>>(args)` into
// `k * ::cuda_emu::Config(cfg) * ::cuda_emu::args(args)`, which runs the grid here: blocks one after another,
// the threads of a block as fibers (ucontext) on the calling thread. A fiber runs until it reaches a barrier
// (__syncthreads, or a warp shuffle, which is a barrier of its warp), then the next fiber runs; a barrier
// opens when every live thread of the block (or warp) waits at it.
//
// What it checks that a plain CPU port would not:
//  - barriers: threads that wait at different barriers (a __syncthreads inside divergent code, a shuffle that
//    some lanes of a warp skip) stop the run with "deadlock" and the block index;
//  - missing barriers: the fibers of a block run in a different order at every phase, and dynamic shared
//    memory starts as 0xFF bytes (NaN as floats), so a thread reading shared data that another thread has not
//    yet written sees NaN or stale values and the parity test fails;
//  - launch configuration: block size, grid limits, dynamic shared memory above 48 KiB without the
//    cudaFuncSetAttribute opt-in, exactly as the driver refuses them (the error comes from cudaGetLastError).
// What it cannot check: speed, memory-model races between blocks (blocks run in sequence), host code that
// dereferences a device pointer (device memory is host memory here), cuBLAS (a plain reference GEMM stands in).
#pragma once

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__ __restrict

// ---- built-in types and variables
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(8))) float2 {
  float x, y;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// Set by the scheduler before it resumes a fiber.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// CUDA's min/max are overloaded for every arithmetic pair; device code calls them unqualified.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

// ---- runtime API (the subset used by tensor/cuda and bench/)
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidPitchValue = 12,
  cudaErrorNotReady = 600,
};
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxPitch = 11 };
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem, memPitch;
  size_t sharedMemPerBlock, sharedMemPerBlockOptin, l2CacheSize;
  int major, minor, multiProcessorCount, maxThreadsPerBlock, warpSize;
};

cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaMalloc(void** p, size_t n);
cudaError_t cudaFree(void* p);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* p, int value, size_t n);
cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t s = nullptr);
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);

namespace cuda_emu {

// Work is executed when it is issued, so every stream and event is always complete.
void set_max_dynamic_smem(const void* kernel, int bytes);
// The largest pitch cudaMemcpy2D takes (cudaDevAttrMaxPitch: 2^31 - 1 bytes on current GPUs); tests lower
// it to reach the limit with small tensors. Returns the previous limit.
size_t set_max_pitch(size_t bytes);
unsigned char* dynamic_smem();
void block_barrier();
void warp_barrier(unsigned mask);
int lane_id();
uint64_t* next_shuffle_slots();  // the 32 exchange slots of the calling thread's warp for its next shuffle

// The launch site comes from the defaults, evaluated where the rewritten launch stands (the Makefile keeps the
// .cu file's name and lines with #line): the launch log (CUDA_EMU_LAUNCH_LOG) groups launches by it.
struct Config {
  dim3 grid, block;
  size_t smem;
  const char* file;
  int line;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr, const char* f = __builtin_FILE(),
         int l = __builtin_LINE())
      : grid(g), block(b), smem(s), file(f), line(l) {}
};

// Runs body once per thread of the grid (and records a configuration error instead when the driver would).
void run_grid(const void* kernel, const Config& cfg, const std::function<void()>& body);

template <typename... P>
struct Bound {
  void (*kernel)(P...);
  Config cfg;
};
template <typename... A>
struct Args {
  std::tuple<A...> values;
};
template <typename... P>
Bound<P...> operator*(void (*kernel)(P...), const Config& cfg) {
  return {kernel, cfg};
}
template <typename... A>
Args<std::decay_t<A>...> args(A&&... a) {
  return {std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
}
// The arguments are converted to the kernel's parameter types once, at the launch, as the driver copies them.
template <typename... P, typename... A>
void operator*(const Bound<P...>& b, const Args<A...>& a) {
  std::tuple<P...> params = std::apply([](const auto&... v) { return std::tuple<P...>(v...); }, a.values);
  run_grid(reinterpret_cast<const void*>(b.kernel), b.cfg, [&] { std::apply(b.kernel, params); });
}

// One value per lane through the warp's slots: every lane writes, waits for the others, reads.
template <typename T>
T exchange(unsigned mask, T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "cuda_emu: shuffles of at most 8 bytes");
  uint64_t* slots = next_shuffle_slots();
  std::memcpy(&slots[lane_id()], &v, sizeof(T));
  warp_barrier(mask);
  T r;
  std::memcpy(&r, &slots[src_lane], sizeof(T));
  return r;
}

}  // namespace cuda_emu

template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) cuda_emu::set_max_dynamic_smem((const void*)kernel, value);
  return cudaSuccess;
}

// ---- device intrinsics
inline void __syncthreads() { cuda_emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_emu::warp_barrier(mask); }
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  int lane = cuda_emu::lane_id(), base = lane & ~(width - 1);
  return cuda_emu::exchange(mask, v, base + (src & (width - 1)));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  int lane = cuda_emu::lane_id(), base = lane & ~(width - 1);
  return cuda_emu::exchange(mask, v, base + ((lane ^ lane_mask) & (width - 1)));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  int lane = cuda_emu::lane_id(), base = lane & ~(width - 1), src = lane + (int)delta;
  return cuda_emu::exchange(mask, v, src < base + width ? src : lane);
}
