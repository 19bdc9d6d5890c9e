// Batched matmul on the packed GEMM (gemm.cpp); f64 goes to the simple exact dgemm used by gradient checks.
#include "tensor/cpu/gemm.h"
#include "tensor/cpu/kernels.h"

namespace psa::cpu {

void matmul(const Tensor& a, const Tensor& b, bool ta, bool tb, int64_t batch, int64_t M, int64_t N, int64_t K,
            int64_t stride_a, int64_t stride_b, Tensor& out, float beta) {
  // Leading dims of at least 1, as BLAS asks even of empty operands (K = 0: C = beta·C; M or N = 0: nothing).
  const int64_t lda = std::max<int64_t>(1, ta ? M : K), ldb = std::max<int64_t>(1, tb ? K : N);
  const int64_t ldc = std::max<int64_t>(1, N);
  if (out.dtype() == DType::f32)
    sgemm_batched(batch, ta, tb, M, N, K, 1.0f, a.data<float>(), lda, stride_a, b.data<float>(), ldb, stride_b,
                  beta, out.data<float>(), ldc, M * N);
  else
    dgemm_batched(batch, ta, tb, M, N, K, 1.0, a.data<double>(), lda, stride_a, b.data<double>(), ldb, stride_b,
                  beta, out.data<double>(), ldc, M * N);
}

}  // namespace psa::cpu
