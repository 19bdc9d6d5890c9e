// What this GPU can do at best, measured in-process (the GPU counterpart of bench/ceiling.h), and the two
// tools every CUDA benchmark needs to time a kernel honestly:
//   copy_gbps():     device-to-device cudaMemcpy of a buffer far larger than L2, counted as read + write
//                    (2 bytes moved per byte copied): the roof for memory-bound kernels (design.md: ~2.9 TB/s
//                    on an H100).
//   sgemm_gflops():  cuBLAS fp32 SGEMM (TF32 off) at 8192², 2·n³ flops per call: the roof for compute-bound
//                    kernels (design.md: ~51 TFLOP/s on an H100).
//   EventTimer:      CUDA events around work on the default stream, where every engine kernel and cuBLAS call
//                    runs (nvcc is not given --default-stream per-thread and the cuBLAS handle has no stream).
//   L2Flush:         writes 2x the L2 size (cudaDeviceProp::l2CacheSize), so a kernel timed right after it
//                    reads its inputs from DRAM, not from the L2 the previous repetition left warm.
// Each ceiling is the best of several event-timed trials and is measured once per process, then cached.
// CUDA builds only (include it under #ifdef PSA_CUDA).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tensor/cuda/kernels.h"
#include "tensor/error.h"
#include "tensor/tensor.h"

namespace psa::bench::gpu {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) ::psa::fail(what, ": ", cudaGetErrorString(e));
}

// Records a start and a stop event on the default (legacy) stream; elapsed time is GPU time between them,
// so host-side work inside a kernel wrapper that stalls the stream (a synchronous copy) is counted too.
class EventTimer {
 public:
  EventTimer() {
    check(cudaEventCreate(&start_), "cudaEventCreate");
    check(cudaEventCreate(&stop_), "cudaEventCreate");
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  void start() { check(cudaEventRecord(start_, 0), "cudaEventRecord(start)"); }
  // Waits for the stop event: the seconds between the two events.
  double stop_seconds() {
    check(cudaEventRecord(stop_, 0), "cudaEventRecord(stop)");
    check(cudaEventSynchronize(stop_), "cudaEventSynchronize(stop)");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    return ms * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

inline int64_t l2_bytes() {
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp p;
  check(cudaGetDeviceProperties(&p, dev), "cudaGetDeviceProperties");
  return p.l2CacheSize;
}

// Writes go through L2 (it allocates on write), so writing twice its size evicts every line a kernel read
// before. Queued on the default stream ahead of the start event: it is not timed, and while the GPU runs it
// the host has already queued the timed launch, so launch latency does not show up in the kernel's time.
class L2Flush {
 public:
  L2Flush() : bytes_(size_t(2 * std::max<int64_t>(l2_bytes(), int64_t(1) << 20))) {
    check(cudaMalloc(&buffer_, bytes_), "cudaMalloc(L2 flush buffer)");
  }
  ~L2Flush() { cudaFree(buffer_); }
  L2Flush(const L2Flush&) = delete;
  L2Flush& operator=(const L2Flush&) = delete;

  void run() { check(cudaMemsetAsync(buffer_, 0, bytes_, 0), "cudaMemsetAsync(L2 flush)"); }
  size_t bytes() const { return bytes_; }

 private:
  void* buffer_ = nullptr;
  size_t bytes_;
};

// ---- ceilings ------------------------------------------------------------------------------------------

// Best of 10 device-to-device copies of max(256 MiB, 8x L2): far past L2, so this is DRAM bandwidth.
inline double measure_copy_gbps() {
  const size_t n = size_t(std::max<int64_t>(int64_t(256) << 20, 8 * l2_bytes()));
  void *src = nullptr, *dst = nullptr;
  check(cudaMalloc(&src, n), "cudaMalloc(copy ceiling)");
  check(cudaMalloc(&dst, n), "cudaMalloc(copy ceiling)");
  check(cudaMemset(src, 1, n), "cudaMemset(copy ceiling)");  // touched: first-use costs are not bandwidth
  check(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToDevice), "cudaMemcpy(copy ceiling warm-up)");
  EventTimer timer;
  double best = 0;
  for (int trial = 0; trial < 10; ++trial) {
    timer.start();
    check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, 0), "cudaMemcpyAsync(copy ceiling)");
    best = std::max(best, 2.0 * double(n) / timer.stop_seconds() * 1e-9);
  }
  cudaFree(src);
  cudaFree(dst);
  return best;
}

// Best of 5 cuBLAS SGEMMs C = A·A at n = 8192 (A random in [-1, 1): constant data would draw less power and
// could clock higher than real inputs allow). TF32 is switched off for the measurement and restored after.
inline double measure_sgemm_gflops(int64_t n = 8192) {
  std::vector<float> host(size_t(n * n));
  uint32_t x = 12345;
  for (float& v : host) {  // xorshift: fast, and the values only need to be non-trivial
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    v = float(x & 0xffffff) / 8388608.0f - 1.0f;
  }
  Tensor a = Tensor::from(host, {n, n}).to(Device::cuda);
  host = {};
  Tensor c = Tensor::empty({n, n}, DType::f32, Device::cuda);
  const bool was_tf32 = ::psa::cuda::tf32();
  ::psa::cuda::set_tf32(false);
  auto gemm = [&] {
    ::psa::cuda::sgemm(::psa::cuda::GemmImpl::cublas, false, false, n, n, n, 1.0f, a.data<float>(), n, 0,
                       a.data<float>(), n, 0, 0.0f, c.data<float>(), n, 0, 1);
  };
  gemm();  // warm-up: handle creation, cuBLAS's kernel selection
  EventTimer timer;
  double best = 0;
  for (int trial = 0; trial < 5; ++trial) {
    timer.start();
    gemm();
    best = std::max(best, 2.0 * double(n) * n * n / timer.stop_seconds() * 1e-9);
  }
  ::psa::cuda::set_tf32(was_tf32);
  return best;
}

inline double copy_gbps() {
  static const double v = measure_copy_gbps();
  return v;
}

inline double sgemm_gflops() {
  static const double v = measure_sgemm_gflops();
  return v;
}

}  // namespace psa::bench::gpu
