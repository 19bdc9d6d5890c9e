// SGEMM / DGEMM against a naive double-precision loop: every transpose combination, alpha/beta cases,
// sizes on and off the register tile, padded strides, and batches with broadcast operands.
// Tolerance per element: 1e-5 * sum_k |a_ik||b_kj| (+ |beta c|), the bound on float rounding of a dot product.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "tensor/cpu/gemm.h"
#include "tensor/error.h"

namespace {

using psa::cpu::dgemm;
using psa::cpu::dgemm_batched;
using psa::cpu::sgemm;
using psa::cpu::sgemm_batched;

// A stored matrix of `rows` x `cols` with row stride ld >= cols, random values, padding filled with NaN
// so that reading outside the logical matrix shows up in the result.
struct Mat {
  int64_t rows, cols, ld;
  std::vector<float> v;
  Mat(int64_t r, int64_t c, int64_t pad, std::mt19937& rng) : rows(r), cols(c), ld(c + pad) {
    v.assign(size_t(std::max<int64_t>(rows * ld, 1)), std::numeric_limits<float>::quiet_NaN());
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) v[size_t(i * ld + j)] = u(rng);
  }
  float at(int64_t i, int64_t j) const { return v[size_t(i * ld + j)]; }
};

struct Case {
  bool ta, tb;
  int64_t M, N, K;
  float alpha, beta;
  int64_t pad;  // extra elements per row of A, B and C
};

// op(X)(i, j) for X stored transposed or not.
float op_at(const Mat& x, bool trans, int64_t i, int64_t j) { return trans ? x.at(j, i) : x.at(i, j); }

// Runs sgemm on one case and checks every element of C (and that C's padding is untouched).
void check_sgemm(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  Mat A = c.ta ? Mat(c.K, c.M, c.pad, rng) : Mat(c.M, c.K, c.pad, rng);
  Mat B = c.tb ? Mat(c.N, c.K, c.pad, rng) : Mat(c.K, c.N, c.pad, rng);
  Mat C(c.M, c.N, c.pad, rng);
  if (c.beta == 0.0f)  // beta == 0: C is write-only, NaNs must not leak into the result
    for (int64_t i = 0; i < c.M; ++i)
      for (int64_t j = 0; j < c.N; ++j) C.v[size_t(i * C.ld + j)] = std::numeric_limits<float>::quiet_NaN();
  const Mat C0 = C;
  sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, A.v.data(), A.ld, B.v.data(), B.ld, c.beta, C.v.data(), C.ld);
  // Reference operands as contiguous doubles: a[i][k] = op(A)(i,k), bt[j][k] = op(B)(k,j).
  std::vector<double> a(size_t(c.M * c.K)), bt(size_t(c.N * c.K));
  for (int64_t k = 0; k < c.K; ++k) {
    for (int64_t i = 0; i < c.M; ++i) a[size_t(i * c.K + k)] = op_at(A, c.ta, i, k);
    for (int64_t j = 0; j < c.N; ++j) bt[size_t(j * c.K + k)] = op_at(B, c.tb, k, j);
  }
  for (int64_t i = 0; i < c.M; ++i) {
    for (int64_t j = 0; j < c.N; ++j) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < c.K; ++k) {
        double p = a[size_t(i * c.K + k)] * bt[size_t(j * c.K + k)];
        ref += p;
        mag += std::fabs(p);
      }
      ref *= c.alpha;
      mag *= std::fabs(c.alpha);
      if (c.beta != 0.0f) {
        ref += double(c.beta) * C0.at(i, j);
        mag += std::fabs(double(c.beta) * C0.at(i, j));
      }
      float got = C.at(i, j);
      ASSERT_TRUE(std::isfinite(got)) << "C(" << i << "," << j << ") ta=" << c.ta << " tb=" << c.tb << " M=" << c.M
                                      << " N=" << c.N << " K=" << c.K;
      ASSERT_NEAR(got, ref, 1e-5 * mag + 1e-30)
          << "C(" << i << "," << j << ") ta=" << c.ta << " tb=" << c.tb << " M=" << c.M << " N=" << c.N
          << " K=" << c.K << " alpha=" << c.alpha << " beta=" << c.beta << " pad=" << c.pad;
    }
    for (int64_t j = c.N; j < C.ld; ++j) ASSERT_TRUE(std::isnan(C.at(i, j))) << "padding of C written";
  }
}

const int64_t kSizes[][3] = {{1, 1, 1},    {7, 13, 5},    {33, 65, 17},  {100, 37, 129},
                             {6, 16, 256}, {12, 32, 300}, {257, 255, 300}, {5, 300, 3}};

TEST(Gemm, AllTransposesAndSizes) {
  uint32_t seed = 1;
  for (const auto& s : kSizes)
    for (int t = 0; t < 4; ++t)
      check_sgemm(Case{bool(t & 1), bool(t & 2), s[0], s[1], s[2], 1.0f, 0.0f, 0}, seed++);
}

TEST(Gemm, AlphaBeta) {
  const float ab[][2] = {{1.0f, 1.0f}, {0.5f, -2.0f}, {-1.5f, 0.0f}, {2.0f, 0.25f}};
  uint32_t seed = 100;
  for (const auto& x : ab)
    for (int t = 0; t < 4; ++t) {
      check_sgemm(Case{bool(t & 1), bool(t & 2), 33, 65, 17, x[0], x[1], 0}, seed++);
      check_sgemm(Case{bool(t & 1), bool(t & 2), 70, 40, 600, x[0], x[1], 0}, seed++);  // K over two blocks
    }
}

TEST(Gemm, PaddedStrides) {
  uint32_t seed = 200;
  for (int t = 0; t < 4; ++t) {
    check_sgemm(Case{bool(t & 1), bool(t & 2), 7, 13, 5, 1.0f, 0.0f, 3}, seed++);
    check_sgemm(Case{bool(t & 1), bool(t & 2), 100, 37, 129, 1.0f, 1.0f, 11}, seed++);
  }
}

// Large enough to take the multi-threaded path; includes M and N smaller than a grid cell.
// Thread counts are forced (2, and 3 for a grid that is not a power of two) whatever the machine has.
struct ThreadCount {
  int saved = omp_get_max_threads();
  explicit ThreadCount(int n) { omp_set_num_threads(n); }
  ~ThreadCount() { omp_set_num_threads(saved); }
};

TEST(Gemm, Threaded) {
  uint32_t seed = 300;
  for (int threads : {2, 3}) {
    ThreadCount tc(threads);
    for (int t = 0; t < 4; ++t) {
      check_sgemm(Case{bool(t & 1), bool(t & 2), 130, 120, 110, 1.0f, 0.5f, 1}, seed++);
      check_sgemm(Case{bool(t & 1), bool(t & 2), 3, 2100, 100, 1.0f, 0.0f, 0}, seed++);
      check_sgemm(Case{bool(t & 1), bool(t & 2), 2100, 3, 100, 1.0f, 0.0f, 0}, seed++);
      check_sgemm(Case{bool(t & 1), bool(t & 2), 40, 300, 520, -1.0f, 1.0f, 0}, seed++);  // K blocks, B chunks
    }
  }
}

// Threads take slices of C, each computed as one thread would, so C has the same bits for any thread count
// (column slices: N wide; row slices: M tall or N narrow; K over several blocks; beta != 0; padded strides).
TEST(Gemm, SameBitsForAnyThreadCount) {
  const Case cases[] = {{true, false, 128, 384, 1648, 1.0f, 0.0f, 0},
                        {false, true, 352, 128, 900, 0.5f, 1.0f, 3},
                        {false, false, 1000, 130, 400, 1.0f, 0.0f, 0},
                        {true, true, 90, 700, 250, -1.0f, 0.25f, 1}};
  uint32_t seed = 350;
  for (const Case& c : cases) {
    std::mt19937 rng(seed++);
    Mat A = c.ta ? Mat(c.K, c.M, c.pad, rng) : Mat(c.M, c.K, c.pad, rng);
    Mat B = c.tb ? Mat(c.N, c.K, c.pad, rng) : Mat(c.K, c.N, c.pad, rng);
    const Mat C0(c.M, c.N, c.pad, rng);
    std::vector<float> one_thread;
    for (int threads : {1, 2, 3}) {
      ThreadCount tc(threads);
      Mat C = C0;
      sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, A.v.data(), A.ld, B.v.data(), B.ld, c.beta, C.v.data(), C.ld);
      if (threads == 1) {
        one_thread = C.v;
        continue;
      }
      for (size_t i = 0; i < C.v.size(); ++i) {
        if (std::isnan(C.v[i]) && std::isnan(one_thread[i])) continue;  // the NaN padding
        ASSERT_EQ(C.v[i], one_thread[i]) << "element " << i << " with " << threads << " threads, M=" << c.M
                                           << " N=" << c.N << " K=" << c.K;
      }
    }
  }
}

// One thread on problems large enough to be threaded otherwise: the serial path packs B one K block at a
// time and runs every band over it, so several bands and K blocks, an N that is not a multiple of the
// sliver width, padded strides and N over one column panel are all needed here.
TEST(Gemm, SingleThreadBandsAndKBlocks) {
  ThreadCount tc(1);
  uint32_t seed = 400;
  for (int t = 0; t < 4; ++t) {
    check_sgemm(Case{bool(t & 1), bool(t & 2), 301, 203, 600, 1.0f, 0.5f, 5}, seed++);
    check_sgemm(Case{bool(t & 1), bool(t & 2), 130, 530, 1100, -0.5f, 0.0f, 0}, seed++);
    check_sgemm(Case{bool(t & 1), bool(t & 2), 40, 2090, 300, 1.0f, 1.0f, 3}, seed++);  // column panels
  }
}

// K == 0 and alpha == 0 scale C by beta without reading A or B (passed as null here).
TEST(Gemm, DegenerateSizes) {
  std::vector<float> C = {1, 2, 3, 4, 5, 6};
  sgemm(false, false, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 3, 2.0f, C.data(), 3);
  EXPECT_EQ(C, (std::vector<float>{2, 4, 6, 8, 10, 12}));
  sgemm(true, true, 2, 3, 4, 0.0f, nullptr, 2, nullptr, 4, 0.5f, C.data(), 3);
  EXPECT_EQ(C, (std::vector<float>{1, 2, 3, 4, 5, 6}));
  std::fill(C.begin(), C.end(), std::numeric_limits<float>::quiet_NaN());
  sgemm(false, false, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 3, 0.0f, C.data(), 3);
  EXPECT_EQ(C, (std::vector<float>(6, 0.0f)));
  sgemm(false, false, 0, 3, 4, 1.0f, nullptr, 4, nullptr, 3, 0.0f, nullptr, 3);  // empty: no access at all
}

TEST(Gemm, RejectsBadStrides) {
  float x[16] = {};
  EXPECT_THROW(sgemm(false, false, 2, 2, 3, 1.0f, x, 2, x, 2, 0.0f, x, 2), psa::Error);  // lda < K
  EXPECT_THROW(sgemm(false, true, 2, 2, 3, 1.0f, x, 3, x, 2, 0.0f, x, 2), psa::Error);   // ldb < K (B^T)
  EXPECT_THROW(sgemm(false, false, 2, 4, 3, 1.0f, x, 3, x, 4, 0.0f, x, 3), psa::Error);  // ldc < N
  EXPECT_THROW(sgemm_batched(2, false, false, 2, 2, 2, 1.0f, x, 2, 4, x, 2, 4, 0.0f, x, 2, 0), psa::Error);
}

// Batched: per-problem results equal single sgemm calls; stride 0 broadcasts A or B; both thread paths
// (small problems one per thread; large ones, not dividing evenly among threads, each threaded).
void check_batched(int64_t batch, bool ta, bool tb, int64_t M, int64_t N, int64_t K, bool bcast_a, bool bcast_b,
                   float beta, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int64_t a_size = M * K, b_size = K * N, c_size = M * N;
  std::vector<float> A(size_t((bcast_a ? 1 : batch) * a_size)), B(size_t((bcast_b ? 1 : batch) * b_size));
  std::vector<float> C(size_t(batch * c_size));
  for (auto* v : {&A, &B, &C})
    for (float& x : *v) x = u(rng);
  std::vector<float> want = C;
  const int64_t lda = ta ? M : K, ldb = tb ? K : N;
  for (int64_t b = 0; b < batch; ++b)
    sgemm(ta, tb, M, N, K, 0.75f, A.data() + (bcast_a ? 0 : b * a_size), lda, B.data() + (bcast_b ? 0 : b * b_size),
          ldb, beta, want.data() + b * c_size, N);
  sgemm_batched(batch, ta, tb, M, N, K, 0.75f, A.data(), lda, bcast_a ? 0 : a_size, B.data(), ldb,
                bcast_b ? 0 : b_size, beta, C.data(), N, c_size);
  // The same kernel runs in both, so results agree to the last bit.
  for (size_t i = 0; i < C.size(); ++i) ASSERT_EQ(C[i], want[i]) << "element " << i << " batch=" << batch;
}

TEST(Gemm, Batched) {
  uint32_t seed = 400;
  for (int threads : {1, 2}) {
    ThreadCount tc(threads);
    for (int t = 0; t < 4; ++t) {
      check_batched(8, t & 1, t & 2, 64, 64, 16, false, false, 0.0f, seed++);  // attention scores shape
      check_batched(8, t & 1, t & 2, 64, 16, 64, false, true, 1.0f, seed++);   // shared B
      check_batched(5, t & 1, t & 2, 13, 7, 9, true, false, 0.5f, seed++);     // shared A, odd sizes
    }
    check_batched(3, true, true, 260, 260, 260, false, false, 0.0f, seed++);  // large: each threaded
  }
  check_batched(0, false, false, 4, 4, 4, false, false, 0.0f, seed++);
}

// Interleaved outputs: heads writing into one [T, H*D] matrix (ldc = H*D, stride_c = D).
TEST(Gemm, BatchedInterleavedHeads) {
  const int64_t H = 4, T = 10, D = 8;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> P(size_t(H * T * T)), V(size_t(T * H * D)), out(size_t(T * H * D), 0.0f);
  for (float& x : P) x = u(rng);
  for (float& x : V) x = u(rng);
  // out[t, h*D + d] = sum_s P[h, t, s] * V[s, h*D + d]
  sgemm_batched(H, false, false, T, D, T, 1.0f, P.data(), T, T * T, V.data(), H * D, D, 0.0f, out.data(), H * D, D);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d) {
        double ref = 0;
        for (int64_t s = 0; s < T; ++s) ref += double(P[size_t(h * T * T + t * T + s)]) * V[size_t(s * H * D + h * D + d)];
        ASSERT_NEAR(out[size_t(t * H * D + h * D + d)], ref, 1e-5);
      }
}

// PackedB: parts of one packed op(B) — a prefix or suffix of its rows (K over several blocks, ranges starting
// inside a block), a prefix of its columns — against the double reference, every transpose, f32 and f64;
// the whole range gives sgemm's bits; padding of C untouched; bad ranges refused.
template <typename X>
void check_packed(bool ta, bool tb, int64_t M, int64_t N, int64_t K, int64_t k0, int64_t k1, int64_t n, X beta,
                  uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  const int64_t lda = (ta ? M : K) + 1, ldb = (tb ? K : N) + 2, ldc = n + 3;
  std::vector<X> A(size_t((ta ? K : M) * lda)), B(size_t((tb ? N : K) * ldb)), C(size_t(M * ldc));
  for (auto* v : {&A, &B, &C})
    for (X& x : *v) x = X(u(rng));
  const std::vector<X> C0 = C;
  psa::cpu::PackedB<X> packed(tb, K, N, B.data(), ldb);
  packed.multiply(ta, M, n, k0, k1, X(0.5), A.data(), lda, beta, C.data(), ldc);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double ref = 0, mag = 0;
      for (int64_t k = k0; k < k1; ++k) {
        double p = double(ta ? A[size_t(k * lda + i)] : A[size_t(i * lda + k)]) *
                   double(tb ? B[size_t(j * ldb + k)] : B[size_t(k * ldb + j)]);
        ref += p;
        mag += std::fabs(p);
      }
      ref = 0.5 * ref + double(beta) * C0[size_t(i * ldc + j)];
      ASSERT_NEAR(C[size_t(i * ldc + j)], ref, (sizeof(X) == 4 ? 1e-5 : 1e-12) * (mag + 1))
          << "C(" << i << "," << j << ") ta=" << ta << " tb=" << tb << " K=" << K << " rows [" << k0 << ", " << k1
          << ") n=" << n;
    }
    for (int64_t j = n; j < ldc; ++j) ASSERT_EQ(C[size_t(i * ldc + j)], C0[size_t(i * ldc + j)]) << "padding written";
  }
}

TEST(Gemm, PackedBParts) {
  uint32_t seed = 500;
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    const int64_t parts[][3] = {{0, 500, 70}, {0, 37, 70}, {211, 500, 33}, {199, 401, 1}, {300, 300, 70}};
    for (const auto& r : parts) {  // K = 500 is three blocks
      check_packed<float>(ta, tb, 29, 70, 500, r[0], r[1], r[2], 0.0f, seed++);
      check_packed<float>(ta, tb, 29, 70, 500, r[0], r[1], r[2], -1.0f, seed++);
      check_packed<double>(ta, tb, 29, 70, 500, r[0], r[1], r[2], 0.5, seed++);
    }
    check_packed<float>(ta, tb, 300, 40, 32, 0, 32, 40, 0.0f, seed++);  // attention-like: M over one band
  }
  // The whole range: the same bits as sgemm.
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> A(100 * 400), B(400 * 90), C1(100 * 90), C2(100 * 90);
  for (auto* v : {&A, &B})
    for (float& x : *v) x = u(rng);
  sgemm(false, false, 100, 90, 400, 1.0f, A.data(), 400, B.data(), 90, 0.0f, C1.data(), 90);
  psa::cpu::PackedB<float>(false, 400, 90, B.data(), 90).multiply(false, 100, 90, 0, 400, 1.0f, A.data(), 400, 0.0f,
                                                                  C2.data(), 90);
  EXPECT_EQ(C1, C2);
  psa::cpu::PackedB<float> small(false, 4, 4, B.data(), 4);
  EXPECT_THROW(small.multiply(false, 2, 4, 1, 5, 1.0f, A.data(), 4, 0.0f, C1.data(), 4), psa::Error);
  EXPECT_THROW(small.multiply(false, 2, 5, 0, 4, 1.0f, A.data(), 4, 0.0f, C1.data(), 5), psa::Error);
}

// dgemm: exact enough to compare with a long-double loop at 1e-12.
TEST(Gemm, Double) {
  std::mt19937 rng(9);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  const int64_t M = 9, N = 11, K = 7, batch = 3;
  for (int t = 0; t < 4; ++t) {
    bool ta = t & 1, tb = t & 2;
    std::vector<double> A(size_t(batch * M * K)), B(size_t(K * N)), C(size_t(batch * M * N));
    for (auto* v : {&A, &B, &C})
      for (double& x : *v) x = u(rng);
    std::vector<double> C0 = C;
    const int64_t lda = ta ? M : K, ldb = tb ? K : N;
    dgemm_batched(batch, ta, tb, M, N, K, 1.5, A.data(), lda, M * K, B.data(), ldb, 0, -0.5, C.data(), N, M * N);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          long double ref = 0;
          for (int64_t k = 0; k < K; ++k) {
            double a = ta ? A[size_t(b * M * K + k * lda + i)] : A[size_t(b * M * K + i * lda + k)];
            double bb = tb ? B[size_t(j * ldb + k)] : B[size_t(k * ldb + j)];
            ref += (long double)a * bb;
          }
          ref = 1.5L * ref - 0.5L * C0[size_t(b * M * N + i * N + j)];
          ASSERT_NEAR(C[size_t(b * M * N + i * N + j)], double(ref), 1e-12);
        }
  }
  std::vector<double> C(4, std::numeric_limits<double>::quiet_NaN());
  const double A1[2] = {1, 2}, B1[2] = {3, 4};
  dgemm(false, false, 2, 2, 1, 1.0, A1, 1, B1, 2, 0.0, C.data(), 2);
  EXPECT_EQ(C, (std::vector<double>{3, 4, 6, 8}));
}

}  // namespace
