// Dense matrix multiply on the CPU: the one hot loop of the engine (linear layers, attention, convolutions
// lowered to matmuls all end here). Row-major throughout, BLAS-like arguments so that transposed operands
// of the backward pass need no copies.
#pragma once
#include <cstdint>
#include <vector>

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

// One op(B) [K,N], packed once, in many products with parts of it (causal attention: every row chunk of the
// queries meets a prefix of the keys, and in the backward every column chunk a suffix of the rows):
//   multiply: C[M,n] = alpha * op(A)[M, k0:k1] * op(B)[k0:k1, 0:n] + beta * C,   0 <= k0 <= k1 <= K, n <= N,
// where A points at op(A)'s column 0 (A stored [K,M] when trans_a, as in sgemm). One thread: meant for calls
// inside a parallel region. For float, op(B) is packed in the constructor (B is not read afterwards); for
// double, multiply reads B in place with dgemm's loops. Same contract as sgemm otherwise.
template <typename X>
class PackedB {
 public:
  PackedB(bool trans_b, int64_t K, int64_t N, const X* B, int64_t ldb);
  void multiply(bool trans_a, int64_t M, int64_t n, int64_t k0, int64_t k1, X alpha, const X* A, int64_t lda, X beta,
                X* C, int64_t ldc) const;

 private:
  bool trans_b_;
  int64_t K_, N_;
  const X* B_;
  int64_t ldb_;
  int64_t kc_ = 0, n_pad_ = 0;  // float: K blocks of kc_ rows, each a panel of n_pad_ / NR slivers
  std::vector<float> panels_;
};

template <>
PackedB<float>::PackedB(bool trans_b, int64_t K, int64_t N, const float* B, int64_t ldb);
template <>
void PackedB<float>::multiply(bool trans_a, int64_t M, int64_t n, int64_t k0, int64_t k1, float alpha, const float* A,
                              int64_t lda, float beta, float* C, int64_t ldc) const;
template <>
PackedB<double>::PackedB(bool trans_b, int64_t K, int64_t N, const double* B, int64_t ldb);
template <>
void PackedB<double>::multiply(bool trans_a, int64_t M, int64_t n, int64_t k0, int64_t k1, double alpha,
                               const double* A, int64_t lda, double beta, double* C, int64_t ldc) const;

}  // namespace psa::cpu
