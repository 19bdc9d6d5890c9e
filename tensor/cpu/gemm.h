// Dense matrix multiply on the CPU: the one hot loop of the engine (linear layers, attention, convolutions
// lowered to matmuls all end here). Row-major throughout, BLAS-like arguments so that transposed operands
// of the backward pass need no copies.
#pragma once
#include <cstdint>

namespace psa::cpu {

// C[M,N] = alpha * op(A) * op(B) + beta * C.
// op(A) is [M,K]; A is stored [K,M] when trans_a. op(B) is [K,N]; B is stored [N,K] when trans_b.
// lda/ldb/ldc are row strides in elements. beta == 0 means C is write-only (NaNs in C are not propagated);
// alpha == 0 or K == 0 means A and B are not read.
// Threads: omp_get_max_threads(), single-threaded for small problems or when called inside a parallel region.
void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// `batch` independent sgemm problems; matrix b starts at A + b*stride_a, B + b*stride_b, C + b*stride_c
// (element strides; stride 0 broadcasts an input to every problem; outputs must not overlap, so stride_c != 0
// when batch > 1; interleaved outputs such as heads of [T, H*D] with ldc = H*D, stride_c = D are fine).
// Small problems are spread over threads one whole problem per thread.
void sgemm_batched(int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                   const float* A, int64_t lda, int64_t stride_a, const float* B, int64_t ldb, int64_t stride_b,
                   float beta, float* C, int64_t ldc, int64_t stride_c);

// Double precision, same contract. Used by the f64 gradient checks: simple and exact, not fast.
void dgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
           const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

void dgemm_batched(int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
                   const double* A, int64_t lda, int64_t stride_a, const double* B, int64_t ldb, int64_t stride_b,
                   double beta, double* C, int64_t ldc, int64_t stride_c);

}  // namespace psa::cpu
