// Helpers shared by the CPU kernel files: one GEMM name for both scalar types (templates over the scalar call
// it), and row loops with per-thread or per-chunk accumulators for weight gradients.
#pragma once
#include <omp.h>

#include <algorithm>
#include <vector>

#include "tensor/cpu/gemm.h"

namespace psa::cpu {

// Elements below which a loop stays on one thread: a parallel region would cost more than it saves.
constexpr int64_t kParallelMin = 1 << 15;

// Whether a loop over `work` elements should run on the threads: enough work, and more than one thread to take
// it (with one, the loops below skip the parallel region altogether).
inline bool use_threads(int64_t work, int64_t min_work = kParallelMin) {
  return work > min_work && omp_get_max_threads() > 1;
}

// body(i) for i in [0, n): on the threads (static schedule) when `threaded`, else a plain loop. Not an OpenMP
// `if` clause: with it false, libgomp still opens and closes a one-thread region (1.3 us each here, with a
// futex call), some 570 times a step of the tiny model.
template <typename F>
void parallel_for(int64_t n, bool threaded, F body) {
  if (!threaded) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) body(i);
}

// The same with a dynamic schedule (blocks of uneven cost).
template <typename F>
void parallel_for_dynamic(int64_t n, bool threaded, F body) {
  if (!threaded) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(dynamic)
  for (int64_t i = 0; i < n; ++i) body(i);
}

// body(begin, end) over [0, n) in blocks of 4096, spread over the threads when n is large; f32 loops inside
// vectorise as usual. Blocks are multiples of 16, so which elements share a vector does not depend on the
// thread count.
template <typename F>
void for_blocks(int64_t n, F body) {
  constexpr int64_t kBlock = 1 << 12;
  parallel_for((n + kBlock - 1) / kBlock, use_threads(n),
               [&](int64_t b) { body(b * kBlock, std::min(n, (b + 1) * kBlock)); });
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                 const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  dgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
// C = op(A)·op(B) for `batch` problems (alpha 1, beta 0).
inline void gemm_batched(int64_t batch, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                         int64_t sa, const float* B, int64_t ldb, int64_t sb, float* C, int64_t ldc, int64_t sc) {
  sgemm_batched(batch, ta, tb, M, N, K, 1.0f, A, lda, sa, B, ldb, sb, 0.0f, C, ldc, sc);
}
inline void gemm_batched(int64_t batch, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                         int64_t sa, const double* B, int64_t ldb, int64_t sb, double* C, int64_t ldc, int64_t sc) {
  dgemm_batched(batch, ta, tb, M, N, K, 1.0, A, lda, sa, B, ldb, sb, 0.0, C, ldc, sc);
}

// Σ_{i<n} term(i) in double, over 8 interleaved partial sums added in a fixed order: the compiler keeps them in
// vector registers, where a single running sum is a chain of dependent adds (4 cycles per element). Used for
// the per-row statistics of the norms and softmax backwards; the order is fixed, so results are reproducible.
template <typename F>
double sum_f64(int64_t n, F term) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += term(i + j);
  for (int j = 0; i < n; ++i, ++j) acc[j] += term(i);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Runs body(r, acc) for every row on the threads, each with its own zeroed accumulator of `width` doubles;
// returns the accumulators summed thread by thread (deterministic for a fixed thread count).
template <typename F>
std::vector<double> rows_with_partial_sums(int64_t rows, int64_t width, bool parallel, F body) {
  int threads = parallel ? omp_get_max_threads() : 1;
  std::vector<double> partial((size_t)threads * width, 0.0);
  if (threads == 1) {  // no one-thread region (see parallel_for)
    for (int64_t r = 0; r < rows; ++r) body(r, partial.data());
  } else {
#pragma omp parallel num_threads(threads)
    {
      double* acc = partial.data() + (size_t)omp_get_thread_num() * width;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) body(r, acc);
    }
  }
  std::vector<double> total(width, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int64_t j = 0; j < width; ++j) total[j] += partial[(size_t)t * width + j];
  return total;
}

// Runs body(r0, r1, acc) over fixed chunks of `chunk` rows on the threads, each chunk with its own zeroed
// accumulator of `width` doubles; returns the accumulators summed in chunk order. The chunks, not the threads, fix
// the order of the additions, so the result is the same for any thread count.
template <typename F>
std::vector<double> row_chunks_with_sums(int64_t rows, int64_t chunk, int64_t width, bool parallel, F body) {
  int64_t chunks = (rows + chunk - 1) / chunk;
  std::vector<double> partial((size_t)(chunks * width), 0.0);
  parallel_for(chunks, parallel,
               [&](int64_t c) { body(c * chunk, std::min(rows, (c + 1) * chunk), partial.data() + c * width); });
  std::vector<double> total(width, 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < width; ++j) total[j] += partial[c * width + j];
  return total;
}

}  // namespace psa::cpu
