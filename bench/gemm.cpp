// SGEMM throughput, ours against OpenBLAS in the same run (counter GFLOP, shown per second: 2*M*N*K flops).
// Shapes: squares 256..2048 and the `tiny` model's matmuls over 16 x 103 tokens (M = 1648) in their three
// forms: forward x[M,K] W[K,N] (NN), input gradient dY W^T (NT), weight gradient x^T dY (TN); plus the
// attention's batched per-head products. Each at 1 and 2 threads (the name ends in threads=T).
// OpenBLAS is loaded with dlopen at run time, never linked: without it its rows say "OpenBLAS not installed".
// Before a shape is timed, our result is checked against OpenBLAS's; a disagreement aborts the run.
// Run: build/bench_gemm --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
// On a machine shared with other jobs, add OMP_WAIT_POLICY=passive: libgomp's idle workers otherwise spin,
// and when the scheduler puts them on our own busy core the 2-thread rows measure the scheduler, not the GEMM.
#include <benchmark/benchmark.h>
#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "tensor/cpu/gemm.h"

namespace {

// ---- OpenBLAS through dlopen -------------------------------------------------------------------------

constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;
using CblasSgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                            float*, int);
using SetThreads = void (*)(int);

struct OpenBlas {
  CblasSgemm sgemm = nullptr;
  SetThreads set_threads = nullptr;
};

// Loaded once. OpenBLAS picks its kernel from cpuid or OPENBLAS_CORETYPE; on AVX-512 machines the reference
// figures used the SkylakeX kernels, so ask for them there, over a machine-wide OPENBLAS_CORETYPE (one
// environment here sets Haswell, which makes OpenBLAS 0.3.21 ~1.8x slower on a Zen 5).
// PSA_BENCH_OPENBLAS_CORETYPE picks another; tools/psa_reference.py does the same for PyTorch's OpenBLAS.
const OpenBlas& openblas() {
  static const OpenBlas lib = [] {
    OpenBlas l;
    if (const char* pick = std::getenv("PSA_BENCH_OPENBLAS_CORETYPE"); pick && *pick)
      setenv("OPENBLAS_CORETYPE", pick, 1);
    else if (__builtin_cpu_supports("avx512f"))
      setenv("OPENBLAS_CORETYPE", "SkylakeX", 1);
    void* h = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    if (!h) return l;
    l.sgemm = reinterpret_cast<CblasSgemm>(dlsym(h, "cblas_sgemm"));
    l.set_threads = reinterpret_cast<SetThreads>(dlsym(h, "openblas_set_num_threads"));
    return l;
  }();
  return lib;
}

// ---- Problems ------------------------------------------------------------------------------------------

struct Shape {
  bool ta, tb;
  int64_t M, N, K;
  int64_t batch = 1;  // > 1: batch of independent problems, tightly packed one after another
};

struct Operands {
  std::vector<float> A, B, C;
  int64_t lda, ldb, ldc;
  explicit Operands(const Shape& s)
      : A(size_t(s.batch * s.M * s.K)), B(size_t(s.batch * s.K * s.N)), C(size_t(s.batch * s.M * s.N)),
        lda(s.ta ? s.M : s.K), ldb(s.tb ? s.K : s.N), ldc(s.N) {
    std::mt19937 rng(42);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (float& x : A) x = u(rng);
    for (float& x : B) x = u(rng);
  }
};

void run_ours(const Shape& s, Operands& o) {
  if (s.batch == 1)
    psa::cpu::sgemm(s.ta, s.tb, s.M, s.N, s.K, 1.0f, o.A.data(), o.lda, o.B.data(), o.ldb, 0.0f, o.C.data(), o.ldc);
  else
    psa::cpu::sgemm_batched(s.batch, s.ta, s.tb, s.M, s.N, s.K, 1.0f, o.A.data(), o.lda, s.M * s.K, o.B.data(),
                            o.ldb, s.K * s.N, 0.0f, o.C.data(), o.ldc, s.M * s.N);
}

// OpenBLAS has no batched sgemm in its CBLAS interface: a loop of calls is what a caller would write.
void run_openblas(const Shape& s, Operands& o) {
  for (int64_t b = 0; b < s.batch; ++b)
    openblas().sgemm(kCblasRowMajor, s.ta ? kCblasTrans : kCblasNoTrans, s.tb ? kCblasTrans : kCblasNoTrans,
                     int(s.M), int(s.N), int(s.K), 1.0f, o.A.data() + b * s.M * s.K, int(o.lda),
                     o.B.data() + b * s.K * s.N, int(o.ldb), 0.0f, o.C.data() + b * s.M * s.N, int(o.ldc));
}

// Ours must agree with OpenBLAS to float rounding: inputs are U(-1,1), so sum_k |a||b| ~ K/4.
void validate_against_openblas(const Shape& s) {
  if (!openblas().sgemm) return;
  Operands ours(s), ref(s);
  run_ours(s, ours);
  run_openblas(s, ref);
  const double tol = 1e-5 * double(s.K) / 4 + 1e-6;
  for (size_t i = 0; i < ours.C.size(); ++i) {
    if (!(std::fabs(double(ours.C[i]) - ref.C[i]) <= tol)) {
      std::fprintf(stderr, "sgemm disagrees with OpenBLAS at element %zu: %g vs %g (ta=%d tb=%d M=%ld N=%ld K=%ld)\n",
                   i, ours.C[i], ref.C[i], s.ta, s.tb, long(s.M), long(s.N), long(s.K));
      std::abort();
    }
  }
}

void set_flops(benchmark::State& state, const Shape& s) {
  state.counters["GFLOP"] =
      benchmark::Counter(2e-9 * double(s.batch * s.M * s.N * s.K) * double(state.iterations()),
                         benchmark::Counter::kIsRate);
}

void bench_ours(benchmark::State& state, Shape s, int threads) {
  omp_set_num_threads(threads);
  static std::vector<std::string> validated;  // once per shape, not per thread count or repetition
  std::string key = std::to_string(s.ta) + std::to_string(s.tb) + "/" + std::to_string(s.M) + "x" +
                    std::to_string(s.N) + "x" + std::to_string(s.K) + "x" + std::to_string(s.batch);
  if (std::find(validated.begin(), validated.end(), key) == validated.end()) {
    // Single-threaded OpenBLAS: its idle worker threads spin for a while after a call and would steal a
    // core from our timing that follows.
    if (openblas().set_threads) openblas().set_threads(1);
    validate_against_openblas(s);
    validated.push_back(key);
  }
  Operands o(s);
  run_ours(s, o);  // warm up: packing buffers, threads
  for (auto _ : state) {
    run_ours(s, o);
    benchmark::DoNotOptimize(o.C.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, s);
}

void bench_openblas(benchmark::State& state, Shape s, int threads) {
  if (!openblas().sgemm || !openblas().set_threads) {
    state.SkipWithError("OpenBLAS not installed");
    for (auto _ : state) {
    }
    return;
  }
  openblas().set_threads(threads);
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  state.SetLabel(std::string("OPENBLAS_CORETYPE=") + (coretype ? coretype : "(cpuid)"));
  Operands o(s);
  run_openblas(s, o);
  for (auto _ : state) {
    run_openblas(s, o);
    benchmark::DoNotOptimize(o.C.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, s);
}

// ---- Registration ----------------------------------------------------------------------------------------

std::string shape_name(const Shape& s) {
  std::string name = std::string(s.ta ? "T" : "N") + (s.tb ? "T" : "N") + "/";
  if (s.batch > 1) name += std::to_string(s.batch) + "x";
  return name + std::to_string(s.M) + "x" + std::to_string(s.N) + "x" + std::to_string(s.K);
}

std::vector<Shape> shapes() {
  std::vector<Shape> out;
  for (int64_t n : {256, 512, 1024, 2048}) out.push_back({false, false, n, n, n});
  // tiny model, tokens M = 16 rows x 103 merged tokens (Stage II): y[M,N] = x[M,K] W[K,N]; dx = dy W^T is
  // [M,K] over N; dW = x^T dy is [K,N] over M.
  // small model (the GPU preset): M = 32 rows x 127 merged tokens; q/k/v/o, gate/up and down projections.
  struct Linear {
    int64_t M, K, N;  // tokens, in, out
  };
  const Linear linear[] = {{1648, 128, 384}, {1648, 128, 352}, {1648, 352, 128}, {1648, 128, 512},
                           {4064, 512, 512}, {4064, 512, 1408}, {4064, 1408, 512}};
  for (const Linear& l : linear) {
    out.push_back({false, false, l.M, l.N, l.K});  // forward
    out.push_back({false, true, l.M, l.K, l.N});   // input gradient
    out.push_back({true, false, l.K, l.N, l.M});   // weight gradient
  }
  // attention, 16 sequences x 4 heads of 100 positions, head size 32: scores Q K^T, then P V
  out.push_back({false, true, 100, 100, 32, 64});
  out.push_back({false, false, 100, 32, 100, 64});
  return out;
}

// Ours and OpenBLAS alternate per shape so that both see the same machine. The order (ours 1 thread,
// OpenBLAS 1, ours 2, OpenBLAS 2) keeps OpenBLAS's idle workers, which spin for a while after a
// multi-threaded call, away from our multi-threaded timing.
const bool registered = [] {
  for (const Shape& s : shapes())
    for (int threads : {1, 2})
      for (bool ours : {true, false}) {
        std::string name = std::string(ours ? "sgemm_ours/" : "sgemm_openblas/") + shape_name(s) +
                           "/threads=" + std::to_string(threads);
        benchmark::RegisterBenchmark(name.c_str(), ours ? bench_ours : bench_openblas, s, threads)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
      }
  return true;
}();

}  // namespace
