// What this machine can do at best, measured in-process, so that every benchmark can say how close it gets:
//   peak_fma_gflops(T): single-precision FMA throughput of T threads, each running 12 independent FMA chains
//                       in registers (no memory traffic): the roof for compute-bound kernels (GEMMs, attention).
//   copy_gbps(T, bytes): copy bandwidth of T threads (a vector load/store loop, see copy_floats), counted as
//                       read + write (2 bytes moved per byte copied): the roof for memory-bound kernels. Small
//                       working sets run from cache, large ones from DRAM, so a kernel moving `bytes` is held
//                       against a copy of the same footprint. (The sizes where the bandwidth falls are
//                       measured, not taken from the cache sizes the CPU reports: on a shared virtual machine
//                       the usable L3 was a fraction of the 32 MiB it reports.)
// Each figure is the best of several short trials (the machine is shared: the best trial is the one least
// disturbed) and is measured once per process (per thread count and copy size), then cached.
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace psa::bench {

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---- FMA peak ------------------------------------------------------------------------------------------

// 12 accumulators: FMA latency (4 cycles) x 2 FMA ports = 8 chains keep both ports busy; 12 leave margin for
// cores with a longer latency and still fit the 16 (AVX2) or 32 (AVX-512) vector registers.
#if defined(__AVX512F__)
using Vec = __m512;
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec a) {  // not _mm512_reduce_add_ps: GCC 12's header warns "'__Y' is used uninitialized"
  alignas(64) float lane[16];
  _mm512_store_ps(lane, a);
  float s = 0.0f;
  for (float x : lane) s += x;
  return s;
}
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a); }
constexpr int kLanes = 16;
#elif defined(__FMA__)
using Vec = __m256;
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec a) {
  alignas(32) float t[8];
  _mm256_store_ps(t, a);
  return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a); }
constexpr int kLanes = 8;
#else
#error "bench/ceiling.h needs FMA (build with -march=native on an x86-64 CPU with FMA)"
#endif

// Returns the sum of the accumulators so the compiler must run the loop. acc = acc*m + a converges to
// a/(1-m), so values stay normal (denormals would slow the loop down).
inline float fma_loop(int64_t iters) {
  const Vec m = vset(0.999999f), a = vset(1e-6f);
  Vec acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = vset(float(i));
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = vfma(acc[i], m, a);
  float s = 0;
  for (int i = 0; i < 12; ++i) s += vsum(acc[i]);
  return s;
}

inline double measure_fma_gflops(int threads) {
  const int64_t iters = 500'000;  // 6M FMAs per thread: ~1.5 ms at 2.5 GHz on AVX2, so that some of the
                                 // 40 trials land in a quiet moment of a shared machine
  double best = 0;
  std::vector<float> sums(threads);  // one slot per thread: the results are used, so the loops must run
  for (int trial = 0; trial < 40; ++trial) {
    double t0 = now_seconds();
#pragma omp parallel num_threads(threads)
    sums[omp_get_thread_num()] = fma_loop(iters);
    double s = now_seconds() - t0;
    best = std::max(best, 2.0 * kLanes * 12 * double(iters) * threads / s * 1e-9);
  }
  volatile float sink = sums[0];
  (void)sink;
  return best;
}

// ---- copy bandwidth ------------------------------------------------------------------------------------

// A plain vector copy with ordinary loads and stores, as the kernels do. Not memcpy: glibc switches to
// non-temporal stores for large copies, which bypass the cache, so a cache-sized memcpy would measure DRAM.
inline void copy_floats(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    Vec a = vload(src + i), b = vload(src + i + kLanes), c = vload(src + i + 2 * kLanes), d = vload(src + i + 3 * kLanes);
    vstore(dst + i, a), vstore(dst + i + kLanes, b), vstore(dst + i + 2 * kLanes, c), vstore(dst + i + 3 * kLanes, d);
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// Bytes per copy buffer for a kernel that moves `bytes`: source + destination span the same footprint, rounded
// up to a power of two so that kernels of similar size share one measurement.
inline int64_t copy_buffer_bytes(int64_t bytes) {
  int64_t n = 16 << 10;
  while (2 * n < bytes) n *= 2;
  return n;
}

inline double measure_copy_gbps(int threads, int64_t buffer_bytes) {
  const int64_t n = buffer_bytes / 4;  // floats
  std::vector<float> src(n, 1.0f), dst(n, 0.0f);  // touched: page faults are not part of a copy
  const int64_t share = n / threads;
  const int passes = int(std::max<int64_t>(1, (int64_t(32) << 20) / buffer_bytes));  // >= 32 MiB per trial
  double best = 0;
  for (int trial = 0; trial < 10; ++trial) {
    double t0 = now_seconds();
#pragma omp parallel num_threads(threads)
    {
      int64_t off = share * omp_get_thread_num();
      for (int p = 0; p < passes; ++p) copy_floats(dst.data() + off, src.data() + off, share);
    }
    double s = now_seconds() - t0;
    best = std::max(best, 2.0 * 4 * double(share * threads) * passes / s * 1e-9);
  }
  return best;
}

// ---- cached ceilings -----------------------------------------------------------------------------------

inline double peak_fma_gflops(int threads) {
  static std::map<int, double> cache;
  auto it = cache.find(threads);
  if (it == cache.end()) it = cache.emplace(threads, measure_fma_gflops(threads)).first;
  return it->second;
}

// Copy bandwidth at the footprint of a kernel that moves `bytes`: cache-resident kernels are held against a
// cache-resident copy, large ones against DRAM.
inline double copy_gbps(int threads, int64_t bytes) {
  static std::map<std::pair<int, int64_t>, double> cache;
  auto key = std::make_pair(threads, copy_buffer_bytes(bytes));
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, measure_copy_gbps(threads, key.second)).first;
  return it->second;
}

inline std::string size_name(int64_t bytes) {
  return bytes >= (1 << 20) ? std::to_string(bytes >> 20) + " MiB" : std::to_string(bytes >> 10) + " KiB";
}

}  // namespace psa::bench
