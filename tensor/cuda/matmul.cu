// Batched matmul on cuBLAS (mirrors tensor/cpu/matmul.cpp), plus the GEMM selection shared with conv.cu.
// cuBLAS is column-major; a row-major C [M, N] is a column-major Cᵀ [N, M], and Cᵀ = op(B)ᵀ·op(A)ᵀ, so the row-
// major product is one cuBLAS call with the operands swapped (B first) and the same transpose flags: no copies.
// Strided-batched calls cover the batch (stride 0 shares a 2-D operand across it). One handle on the default
// stream. f32 stays true fp32 unless TF32 is switched on (set_tf32 or PSA_TF32=1); PSA_GEMM=own (or own-k16, ...: the
// variants of kernels.h) routes f32 to the hand-written kernel of sgemm.cu.
#include <cublas_v2.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "tensor/cuda/common.cuh"

#define cublasCheck(call)                                                               \
  do {                                                                                  \
    cublasStatus_t st_ = (call);                                                        \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                   \
      ::psa::fail(__FILE__, ":", __LINE__, ": ", #call, ": cuBLAS status ", (int)st_);  \
  } while (0)

namespace psa::cuda {
namespace {

struct GemmSettings {
  GemmImpl impl = GemmImpl::cublas;
  OwnTile own_tile = OwnTile::k8;
  bool tf32 = false;
  GemmSettings() {
    const char* g = std::getenv("PSA_GEMM");
    if (g && std::strcmp(g, "own") == 0) impl = GemmImpl::own;
    for (OwnTile t : kOwnTiles)
      if (g && std::string("own-") + own_tile_name(t) == g) impl = GemmImpl::own, own_tile = t;
    const char* t = std::getenv("PSA_TF32");
    tf32 = t && std::strcmp(t, "1") == 0;
  }
};
GemmSettings& settings() {
  static GemmSettings s;
  return s;
}

// One cuBLAS handle for the process, set to the calling thread's current stream and math mode for each call.
// The lock keeps the setting and the call together: host threads on different streams would otherwise race
// between cublasSetStream and the GEMM (the GEMM queued on the other thread's stream).
template <typename F>
void with_handle(F call) {
  static std::mutex mu;
  static cublasHandle_t h = [] {
    cublasHandle_t x;
    cublasCheck(cublasCreate(&x));
    return x;
  }();
  std::lock_guard<std::mutex> lock(mu);
  cublasCheck(cublasSetMathMode(h, settings().tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  cublasCheck(cublasSetStream(h, stream()));
  cublasCheck(call(h));
}

// C = beta·C for an empty product (K = 0), which is not left to cuBLAS: it has returned C untouched for k = 0
// (pytorch/pytorch#31421), and C may hold garbage where beta = 0 promises it is not read.
template <typename T>
__global__ void scale_c(int64_t M, int64_t N, T beta, T* C, int64_t ldc, int64_t sc, int64_t batch) {
  CUDA_LOOP(e, batch * M * N) {
    T* c = C + e / (M * N) * sc + e % (M * N) / N * ldc + e % N;
    *c = beta == T(0) ? T(0) : beta * *c;
  }
}

template <typename T>
void empty_product(int64_t M, int64_t N, T beta, T* C, int64_t ldc, int64_t sc, int64_t batch) {
  scale_c<T><<<blocks_for(batch * M * N), kThreads, 0, stream()>>>(M, N, beta, C, ldc, sc, batch);
  cudaCheckLaunch();
}

int as_int(int64_t v, const char* what) {
  PSA_CHECK(v >= 0 && v <= 0x7fffffff, "cuda gemm: ", what, " = ", v, " does not fit cuBLAS's int");
  return (int)v;
}

}  // namespace

void set_gemm(GemmImpl impl) { settings().impl = impl; }
GemmImpl gemm_impl() { return settings().impl; }
void set_own_tile(OwnTile t) { settings().own_tile = t; }
OwnTile own_tile() { return settings().own_tile; }
void set_tf32(bool on) { settings().tf32 = on; }
bool tf32() { return settings().tf32; }

void sgemm(GemmImpl impl, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, int64_t sa, const float* B, int64_t ldb, int64_t sb, float beta, float* C, int64_t ldc,
           int64_t sc, int64_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
  if (impl == GemmImpl::own) {
    for (int64_t i = 0; i < batch; ++i)
      own_sgemm(ta, tb, M, N, K, alpha, A + i * sa, lda, B + i * sb, ldb, beta, C + i * sc, ldc);
    return;
  }
  if (K == 0) return empty_product(M, N, beta, C, ldc, sc, batch);
  cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  count_launch();
  const int m = as_int(M, "M"), n = as_int(N, "N"), k = as_int(K, "K"), nb = as_int(batch, "batch");
  const int la = as_int(lda, "lda"), lb = as_int(ldb, "ldb"), lc = as_int(ldc, "ldc");
  with_handle([&](cublasHandle_t h) {
    return cublasSgemmStridedBatched(h, opb, opa, n, m, k, &alpha, B, lb, sb, A, la, sa, &beta, C, lc, sc, nb);
  });
}

void dgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
           int64_t sa, const double* B, int64_t ldb, int64_t sb, double beta, double* C, int64_t ldc, int64_t sc,
           int64_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
  if (K == 0) return empty_product(M, N, beta, C, ldc, sc, batch);
  cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  count_launch();
  const int m = as_int(M, "M"), n = as_int(N, "N"), k = as_int(K, "K"), nb = as_int(batch, "batch");
  const int la = as_int(lda, "lda"), lb = as_int(ldb, "ldb"), lc = as_int(ldc, "ldc");
  with_handle([&](cublasHandle_t h) {
    return cublasDgemmStridedBatched(h, opb, opa, n, m, k, &alpha, B, lb, sb, A, la, sa, &beta, C, lc, sc, nb);
  });
}

void matmul(const Tensor& a, const Tensor& b, bool ta, bool tb, int64_t batch, int64_t M, int64_t N, int64_t K,
            int64_t stride_a, int64_t stride_b, Tensor& out, float beta) {
  int64_t lda = ta ? M : K, ldb = tb ? K : N;
  // cuBLAS rejects a leading dimension of 0 even when that operand is empty.
  lda = std::max<int64_t>(lda, 1);
  ldb = std::max<int64_t>(ldb, 1);
  if (out.dtype() == DType::f32)
    sgemm(gemm_impl(), ta, tb, M, N, K, 1.0f, a.data<float>(), lda, stride_a, b.data<float>(), ldb, stride_b, beta,
          out.data<float>(), std::max<int64_t>(N, 1), M * N, batch);
  else
    dgemm(ta, tb, M, N, K, 1.0, a.data<double>(), lda, stride_a, b.data<double>(), ldb, stride_b, (double)beta,
          out.data<double>(), std::max<int64_t>(N, 1), M * N, batch);
}

void synchronize() { cudaCheck(cudaDeviceSynchronize()); }

}  // namespace psa::cuda
