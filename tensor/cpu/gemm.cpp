// SGEMM for the CPU, GotoBLAS/BLIS style. C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, row-major.
//
// Micro-kernel. An MR x NR tile of C lives in vector registers for a whole K block. For every k it loads
// NR/W vectors of B (W floats per vector), broadcasts the MR values of A's column k, and does one FMA per
// accumulator:
//   AVX-512: 12 x 32 -> 24 zmm accumulators + 2 B vectors + 1 broadcast = 27 of 32 registers;
//   AVX2:     6 x 16 -> 12 ymm accumulators + 2 B vectors + 1 broadcast = 15 of 16 registers;
//   scalar:   4 x  8 plain floats (the compiler vectorises what it can).
// Two FMA ports with 4-cycle latency need >= 8 independent accumulators to stay busy, and each k-step
// issues MR*NR/W FMAs against only NR/W loads + MR broadcasts, so the FMA ports, not loads, are the limit.
// The kernel is one template over (rows, vectors); a table holds every instance m <= MR, nv <= NR/W, so an
// edge tile runs the exact shape it needs instead of a padded full tile (matters for the model's M = 64
// attention matrices). Columns past n inside the last vector are computed on zero padding and dropped.
// GCC compiles the AVX2 6x16 k loop to exactly that (2 loads, 6 broadcasts, 12 FMAs, 3 loop instructions,
// no spills; check with objdump -d on gemm.o), and on a Zen 3 it runs as fast per FMA as OpenBLAS 0.3.21's
// Zen kernel (1024^3, one thread, minimum CPU time of 15-30 interleaved calls: 0.97-1.05x OpenBLAS's
// speed on a machine shared with other jobs). Tried and dropped:
// unrolling k by 4 (GCC then interleaves the steps and spills accumulators), prefetching the A sliver
// inside the loop, prefetching C tiles a few kernels ahead into L2 (all within noise).
//
// Loop nest, with what each level keeps in which cache (one thread):
//   for each column panel of C (<= 1024 columns, see below):
//     for pc in K step KC:
//       pack op(B)[KC x panel] into NR-wide slivers          -> B panel, L2 (small N) or L3
//       for each band of C (<= MC rows):
//         pack op(A)[band rows x KC] into MR-tall slivers    -> A block, L2
//         for jr in band columns step NR:                    B sliver [KC x NR], reused by every A sliver -> L1
//           for ir in band rows step MR:                     micro-kernel: C[MR x NR] += A sliver * B sliver
// Block sizes: the B sliver (KC*NR*4 bytes) takes at most ~3/4 of L1 so the streaming A sliver and the C
// tile do not evict it: AVX2 256*16*4 = 16 KiB of 32 KiB, AVX-512 192*32*4 = 24 KiB of 32-48 KiB. The A
// block takes a fraction of L2: AVX2 144*256*4 = 144 KiB of 512 KiB, AVX-512 240*192*4 = 180 KiB of
// 1-2 MiB. The AVX2 values are the BLIS Zen choices, confirmed on a Zen 3 (KC 256..512, MC 72..144 all
// within noise, OpenBLAS 0.3.21 as the yardstick). Later K blocks accumulate onto C (beta = 1), costing
// one extra read and write of each C tile per K block; the kernel prefetches its C tile before the k loop
// so that this read does not stall the write-back.
// The B panel of one K block is packed just before its bands use it, so it is read back from L2 or L3;
// packing all of op(B) up front, as an earlier version did, sent a weight gradient's 2-3 MiB of packed B
// to memory and back. The pack reads op(B) row by row with software prefetch (see pack_b_rows): together
// these took the weight-gradient shapes [128 x 1600] x [1600 x 352..512] from 1.1-1.4x OpenBLAS's time
// to below it.
// Wide problems (N > 1024) run as column panels of <= 1024 columns, one whole GEMM each: at 2048^3 one
// thread went from 0.85-0.93x to 0.88-1.05x OpenBLAS (per-K-block C and B panels half as large; panels
// of 512 or 768 columns, which repack A more often, gained less). 2048^3 is the one shape where OpenBLAS
// still tends to lead; the kernel itself is as fast as OpenBLAS's (above), so what remains is memory
// traffic (C is re-read once per K block).
//
// Packing copies both operands (layout in the Packing section): packed slivers make every kernel load
// sequential and keep power-of-two leading dimensions (1024, 2048) from mapping a block's rows onto the
// same cache sets. One exception: bands of C at most 128 columns wide read a row-major A in place (see
// band_block), where the pack would cost more than it saves. The transposing packs (A row-major, B stored
// transposed) use 8x8 register transposes, so packing stays a few percent of the work even when N or M is
// only ~128.
//
// Threads: C is cut into column (or row) slices, two per thread, each a whole one-thread GEMM claimed from
// an atomic counter (see gemm_sliced); claiming, rather than a fixed split, and waiting with sched_yield,
// rather than libgomp's spinning barriers, keep a descheduled or core-sharing thread from stalling the call
// on a busy machine. Results do not depend on the thread count. Below ~64^3 FMAs per thread fewer threads
// are used, since starting a parallel region costs microseconds. sgemm_batched gives whole small problems to
// threads instead (attention: many [T x 32] x [32 x T] products).
#include "tensor/cpu/gemm.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "tensor/error.h"

namespace psa::cpu {
namespace {

// ---------------------------------------------------------------------------------------------------
// Vector abstraction: the kernel is written once; only the register width and block sizes change.

#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
};
constexpr int MR = 12, NV = 2;
constexpr int64_t KC = 192, MC = 240;
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
};
constexpr int MR = 6, NV = 2;
constexpr int64_t KC = 256, MC = 144;
#else
struct Vec {
  using T = float;
  static constexpr int W = 1;
  static T zero() { return 0.0f; }
  static T load(const float* p) { return *p; }
  static T bcast(const float* p) { return *p; }
  static T set1(float x) { return x; }
  static T fma(T a, T b, T c) { return a * b + c; }
  static T mul(T a, T b) { return a * b; }
  static void store(float* p, T v) { *p = v; }
};
constexpr int MR = 4, NV = 8;
constexpr int64_t KC = 256, MC = 128;
#endif

constexpr int NR = NV * Vec::W;
static_assert(MC % MR == 0, "an A block holds whole slivers");

// Widest column panel (see the header; measured on a Zen 3 only).
constexpr int64_t kMaxPanelCols = 1024;

// Row-major A is read in place, not packed, by bands at most this many columns wide (see band_block).
constexpr int64_t kInPlaceACols = 128;

// Below this many FMAs per thread a parallel region costs more than it saves.
constexpr int64_t kMinWorkPerThread = 64 * 64 * 64;

// ---------------------------------------------------------------------------------------------------
// Packing buffers, per thread, 64-byte aligned, grown on demand and kept for the next call:
// 0 = the A block [MC x KC]; 1 = all of packed op(B) [K x N] (shared with the team during a threaded call).

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

float* thread_buffer(int which, int64_t floats) {
  thread_local std::unique_ptr<float, FreeDeleter> buf[2];
  thread_local int64_t cap[2] = {0, 0};
  if (cap[which] < floats) {
    size_t bytes = (size_t(floats) * sizeof(float) + 63) / 64 * 64;
    float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
    PSA_CHECK(p != nullptr, "sgemm: cannot allocate ", bytes, " bytes of packing buffer");
    buf[which].reset(p);
    cap[which] = floats;
  }
  return buf[which].get();
}

// ---------------------------------------------------------------------------------------------------
// Packing. Both operands are copied into the order the kernel reads them, so that its loads are sequential
// and its working set is contiguous (no cache-set or TLB conflicts from power-of-two leading dimensions):
//   B panel op(B)[kc x nc] -> ceil(nc/NR) slivers [kc][NR], zero padded past nc;
//   A block op(A)[mc x kc] -> ceil(mc/MR) slivers [kc][MR]; rows past mc are left unset, since the kernel
//   instance for a short sliver never reads them.
// A stored row-major and B stored transposed need a transpose; it is done in 8x8 register blocks (AVX2),
// about 4x faster than element by element, which matters when N (or M) is only ~128 and each packed
// value feeds few FMAs.

#if defined(__AVX2__)
// In-register transpose: r[i] holds row i of an 8x8 block; afterwards r[j] holds column j.
inline void transpose8x8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
#endif

// B stored [K,N] (op(B) = B): each k-row of a sliver is a contiguous copy. The source is read row by row,
// each row scattered into all the slivers: reading one sliver at a time instead walks down columns with
// a stride of ldb, which the hardware prefetcher does not follow across pages, and made this pack 29% of
// a weight gradient [128 x 1600] x [1600 x 512] (it feeds only M = 128 FMAs per value). Even row by row
// the loads waited on L3 (the pack was still 23%), so each line is prefetched 8 rows ahead (12%).
void pack_b_rows(int64_t kc, int64_t nc, const float* B, int64_t ldb, float* dst) {
  const int64_t full = nc / NR, rest = nc - full * NR;
  for (int64_t k = 0; k < kc; ++k) {
    const float* src = B + k * ldb;
    float* d = dst + k * NR;
    for (int64_t s = 0; s < full; ++s) {  // constant size: inlined as vector moves, not a libc call
      __builtin_prefetch(src + 8 * ldb + s * NR);
      std::memcpy(d + s * kc * NR, src + s * NR, NR * sizeof(float));
    }
    if (rest > 0) {
      float* t = d + full * kc * NR;
      for (int64_t j = 0; j < NR; ++j) t[j] = j < rest ? src[full * NR + j] : 0.0f;
    }
  }
}

// B stored [N,K] (op(B) = B^T): sliver = transpose of NR rows of B.
void pack_b_cols(int64_t kc, int64_t nc, const float* B, int64_t ldb, float* dst) {
  for (int64_t j0 = 0; j0 < nc; j0 += NR, dst += kc * NR) {
    int64_t n = std::min<int64_t>(NR, nc - j0);
    const float* src = B + j0 * ldb;
    int64_t k = 0;
#if defined(__AVX2__)
    for (; n == NR && k + 8 <= kc; k += 8)
      for (int j = 0; j < NR; j += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (j + i) * ldb + k);
        transpose8x8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * NR + j, r[i]);
      }
#endif
    for (; k < kc; ++k)
      for (int64_t j = 0; j < NR; ++j) dst[k * NR + j] = j < n ? src[j * ldb + k] : 0.0f;
  }
}

// A stored [K,M] (op(A) = A^T): for each k, MR contiguous values. Row by row, like pack_b_rows.
void pack_a_cols(int64_t mc, int64_t kc, const float* A, int64_t lda, float* dst) {
  const int64_t full = mc / MR, rest = mc - full * MR;
  for (int64_t k = 0; k < kc; ++k) {
    const float* src = A + k * lda;
    float* d = dst + k * MR;
    for (int64_t i = 0; i < mc; i += 16) __builtin_prefetch(src + 8 * lda + i);
    for (int64_t s = 0; s < full; ++s) std::memcpy(d + s * kc * MR, src + s * MR, MR * sizeof(float));
    for (int64_t i = 0; i < rest; ++i) d[full * kc * MR + i] = src[full * MR + i];
  }
}

// A stored [M,K] (op(A) = A): sliver = transpose of MR rows of A. MR is not a multiple of 8, so rows are
// transposed in groups of 8 (the missing rows of the last group re-read row 0) and each k's 8-wide store
// spills past its MR values into the next k's slot, which a later store overwrites; the spill past the
// end of the block lands in the buffer's slack (kPackSlack).
constexpr int64_t kPackSlack = 16;

void pack_a_rows(int64_t mc, int64_t kc, const float* A, int64_t lda, float* dst) {
  for (int64_t i0 = 0; i0 < mc; i0 += MR, dst += kc * MR) {
    int64_t m = std::min<int64_t>(MR, mc - i0);
    const float* src = A + i0 * lda;
    int64_t k = 0;
#if defined(__AVX2__)
    constexpr int groups = (MR + 7) / 8;
    // The rows of one sliver are short streams (kc floats) that the hardware prefetcher barely catches
    // before they end: fetch the next sliver's rows while this one is transposed.
    const float* next = i0 + MR < mc ? src + MR * lda : src;
    for (; m == MR && k + 8 <= kc; k += 8) {
      for (int i = 0; i < MR; ++i) __builtin_prefetch(next + i * lda + k);
      __m256 r[groups][8];
      for (int g = 0; g < groups; ++g) {
        for (int i = 0; i < 8; ++i) {
          int row = g * 8 + i < MR ? g * 8 + i : 0;
          r[g][i] = _mm256_loadu_ps(src + row * lda + k);
        }
        transpose8x8(r[g]);
      }
      for (int kk = 0; kk < 8; ++kk)  // ascending k, then group: every spill is overwritten later
        for (int g = 0; g < groups; ++g) _mm256_storeu_ps(dst + (k + kk) * MR + g * 8, r[g][kk]);
    }
#endif
    for (; k < kc; ++k)
      for (int64_t i = 0; i < m; ++i) dst[k * MR + i] = src[i * lda + k];
  }
}

// ---------------------------------------------------------------------------------------------------
// Micro-kernel: C[m_ x n] = alpha * sum_k a[k][0..m_) (x) b[k][0..n) + beta * C (beta == 0: C not read).
// a is a packed A sliver [kc][MR] (packed_a) or the first of m_ rows of a row-major A, lda apart; b is a
// packed B sliver [kc][NR]. nv_ = ceil(n / W) vectors per row are computed; when n < nv_ * W the tile goes
// through a buffer and only n columns are written.

// alpha and beta come by reference, in memory until the k loop is done: passed by value (in xmm registers)
// they stayed live across the loop, and GCC 12 then kept one of the AVX-512 kernel's two B vectors on the
// stack, reloading it (misaligned, across two cache lines) for 12 of its 24 FMAs per k: the packed 12 x 32
// kernel ran at 0.6 of the FMA peak on a Zen 5, the in-place one, which GCC allocated cleanly, at 0.9.
struct Scale {
  float alpha, beta;
};

template <int m_, int nv_, bool packed_a>
void micro_kernel(int64_t kc, const float* __restrict a, int64_t lda, const float* __restrict b,
                  float* __restrict c, int64_t ldc, const Scale& scale, int n) {
  // Element (i, k) of the A sliver: packed [kc][MR], or read in place from row-major A (see band_block).
  const int64_t a_row = packed_a ? 1 : lda, a_step = packed_a ? MR : 1;
  // C is needed only after the k loop: start fetching its lines now so the write-back does not wait.
  for (int i = 0; i < m_; ++i) {
    __builtin_prefetch(c + i * ldc, 1);
    __builtin_prefetch(c + i * ldc + n - 1, 1);
  }
  typename Vec::T acc[m_][nv_];
#pragma GCC unroll 16
  for (int i = 0; i < m_; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < nv_; ++j) acc[i][j] = Vec::zero();

  for (int64_t k = 0; k < kc; ++k, a += a_step, b += NR) {
    typename Vec::T bv[nv_];
#pragma GCC unroll 4
    for (int j = 0; j < nv_; ++j) bv[j] = Vec::load(b + j * Vec::W);
#pragma GCC unroll 16
    for (int i = 0; i < m_; ++i) {
      typename Vec::T av = Vec::bcast(a + i * a_row);
#pragma GCC unroll 4
      for (int j = 0; j < nv_; ++j) acc[i][j] = Vec::fma(av, bv[j], acc[i][j]);
    }
  }

  const float alpha = scale.alpha, beta = scale.beta;
  const typename Vec::T va = Vec::set1(alpha), vb = Vec::set1(beta);
  if (n == nv_ * Vec::W) {
#pragma GCC unroll 16
    for (int i = 0; i < m_; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < nv_; ++j) {
        float* p = c + i * ldc + j * Vec::W;
        typename Vec::T v = Vec::mul(va, acc[i][j]);
        Vec::store(p, beta == 0.0f ? v : Vec::fma(vb, Vec::load(p), v));
      }
    return;
  }
  // Constant indices only (fully unrolled), or GCC would keep acc in memory for the whole k loop.
  if (n > nv_ * Vec::W) __builtin_unreachable();  // the caller guarantees it; silences -Wmaybe-uninitialized
  alignas(64) float tile[m_][nv_ * Vec::W];
#pragma GCC unroll 16
  for (int i = 0; i < m_; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < nv_; ++j) Vec::store(&tile[i][j * Vec::W], acc[i][j]);
  for (int i = 0; i < m_; ++i) {
    float* p = c + i * ldc;
    if (beta == 0.0f)
      for (int j = 0; j < n; ++j) p[j] = alpha * tile[i][j];
    else
      for (int j = 0; j < n; ++j) p[j] = alpha * tile[i][j] + beta * p[j];
  }
}

using Kernel = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, const Scale&, int);

// kKernels[packed_a][(m-1)*NV + (nv-1)]: the exact instance for every tile shape an edge can need.
template <bool packed_a, size_t... I>
constexpr std::array<Kernel, MR * NV> kernel_table(std::index_sequence<I...>) {
  return {&micro_kernel<int(I) / NV + 1, int(I) % NV + 1, packed_a>...};
}
constexpr std::array<Kernel, MR * NV> kKernels[2] = {kernel_table<false>(std::make_index_sequence<MR * NV>{}),
                                                     kernel_table<true>(std::make_index_sequence<MR * NV>{})};

// ---------------------------------------------------------------------------------------------------
// Driver: per K block, pack the B panel, then compute C in row bands; with threads, slices of C, each one
// such driver.

struct Problem {
  bool trans_a, trans_b;
  int64_t M, N, K;
  float alpha;
  const float* A;
  int64_t lda;
  const float* B;
  int64_t ldb;
  float beta;
  float* C;
  int64_t ldc;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// C = beta * C, for the degenerate alpha == 0 or K == 0 (A and B are not read).
void scale_c(const Problem& p) {
  for (int64_t i = 0; i < p.M; ++i) {
    float* c = p.C + i * p.ldc;
    if (p.beta == 0.0f)
      std::fill(c, c + p.N, 0.0f);
    else if (p.beta != 1.0f)
      for (int64_t j = 0; j < p.N; ++j) c[j] *= p.beta;
  }
}

// How the work is cut (one thread). K in k_blocks blocks of kc <= KC; for each, one B panel of
// ceil(N/NR) slivers [kc][NR] (n_pad columns), and C in bands of `rows` (a multiple of MR, <= MC, so that a
// band's A block stays in L2) x all N columns.
struct Plan {
  int64_t n_pad;
  int64_t kc, k_blocks;  // the last block may be shorter
  int64_t rows, bands;
};

Plan make_plan(const Problem& p) {
  Plan pl;
  pl.n_pad = round_up(p.N, NR);
  // Equal K blocks: K = 1600 as 7 x 229 rather than 6 x 256 + 64, whose short block would pay a full C
  // tile read and write for a quarter of the FMAs.
  pl.k_blocks = ceil_div(p.K, KC);
  pl.kc = ceil_div(p.K, pl.k_blocks);
  pl.rows = round_up(ceil_div(p.M, ceil_div(p.M, MC)), MR);
  pl.bands = ceil_div(p.M, pl.rows);
  return pl;
}

// Packs op(B)[pc : pc+kc, all N columns] into `panel`.
void pack_b(const Problem& p, int64_t pc, int64_t kc, float* panel) {
  if (p.trans_b)
    pack_b_cols(kc, p.N, p.B + pc, p.ldb, panel);
  else
    pack_b_rows(kc, p.N, p.B + pc * p.ldb, p.ldb, panel);
}

// C[m0 : m0+m, 0 : N] (+)= op(A)[m0 : m0+m, ka : ka+kc] * B, the inner loops of the header comment, for one
// K block; B is kc rows of packed slivers, sliver j at `slivers + j * stride`.
void band_kernels(const Problem& p, int64_t m0, int64_t m, int64_t ka, int64_t kc, const float* slivers,
                  int64_t stride, float beta) {
  // Row-major A (x in x W^T, dY in dY W) is read in place by narrow bands: each A sliver then feeds at most
  // kInPlaceACols / NR kernels, too few to pay for its transposing pack, and the kernel's six row streams
  // (kc floats each) stay in L1 meanwhile. Interleaved runs, min of 15, one thread: N = 128 shapes of the
  // tiny step ([1648 x 128|352] x [.. x 128]) 2-4% faster in place; N >= 352 and 1024^2 3-7% slower,
  // so wider bands pack. A stored [K,M] is always packed (a plain row-by-row copy; in place, its k-steps
  // would be lda apart).
  const bool packed = p.trans_a || p.N > kInPlaceACols;
  const float* a = p.trans_a ? p.A + ka * p.lda + m0 : p.A + m0 * p.lda + ka;
  if (packed) {
    float* a_block = thread_buffer(0, MC * KC + kPackSlack);
    if (p.trans_a)
      pack_a_cols(m, kc, a, p.lda, a_block);
    else
      pack_a_rows(m, kc, a, p.lda, a_block);
    a = a_block;
  }
  const Scale scale{p.alpha, beta};
  for (int64_t jr = 0; jr < p.N; jr += NR) {
    const int n = int(std::min<int64_t>(NR, p.N - jr)), nv = (n + Vec::W - 1) / Vec::W;
    for (int64_t ir = 0; ir < m; ir += MR) {
      const int mr = int(std::min<int64_t>(MR, m - ir));
      float* c = p.C + (m0 + ir) * p.ldc + jr;
      const float* a_sliver = packed ? a + ir * kc : a + ir * p.lda;
      kKernels[packed][(mr - 1) * NV + (nv - 1)](kc, a_sliver, p.lda, slivers + (jr / NR) * stride, c, p.ldc, scale,
                                                 n);
    }
  }
}

// Band t over the K block at pc; `panel` is that block's packed B. Later K blocks accumulate onto the first.
void band_block(const Problem& p, const Plan& pl, const float* panel, int64_t t, int64_t pc) {
  const int64_t m0 = t * pl.rows, kc = std::min(pl.kc, p.K - pc);
  band_kernels(p, m0, std::min(pl.rows, p.M - m0), pc, kc, panel, kc * NR, pc == 0 ? p.beta : 1.0f);
}

// Claims tasks [0, n) from `next` until none are left.
template <typename Task>
void claim_tasks(std::atomic<int64_t>& next, int64_t n, const Task& task) {
  for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) task(i);
}

// Waits for `count` to reach `target`: spins briefly (the awaited thread is usually running on another
// core and about to finish), then yields. Spinning alone, as libgomp's barriers do, is what hurts on a
// busy machine: the scheduler may put two of our threads on one core, and a spinning waiter then keeps
// the thread it waits for off that core for a whole time slice (4 ms, 10x the work). Threads meet here
// first, so libgomp's closing barrier finds them all arrived. (libgomp's idle workers still spin between
// regions; on a machine shared with other jobs, OMP_WAIT_POLICY=passive stops that.)
void wait_for(const std::atomic<int64_t>& count, int64_t target) {
  for (int spin = 0; count.load(std::memory_order_acquire) < target; ++spin) {
    if (spin < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// One thread: K blocks outermost, each B panel packed just before the bands use it, so that it is still in
// L2 (a K block of a weight gradient, 256 x 384, is 384 KiB) instead of one packed copy of all of op(B)
// that has gone to L3 or memory by the time it is read (2.4 MiB for [1600 x 384]).
void gemm_serial(const Problem& p) {
  if (p.M <= 0 || p.N <= 0) return;
  if (p.K <= 0 || p.alpha == 0.0f) return scale_c(p);
  const Plan pl = make_plan(p);
  float* panel = thread_buffer(1, pl.kc * pl.n_pad);
  for (int64_t kb = 0; kb < pl.k_blocks; ++kb) {
    pack_b(p, kb * pl.kc, std::min(pl.kc, p.K - kb * pl.kc), panel);
    for (int64_t t = 0; t < pl.bands; ++t) band_block(p, pl, panel, t, kb * pl.kc);
  }
}

// Sub-problem: the rows [i0, i0 + m) and columns [j0, j0 + n) of C.
Problem sub_problem(const Problem& p, int64_t i0, int64_t m, int64_t j0, int64_t n) {
  Problem q = p;
  q.M = m;
  q.N = n;
  q.A = p.trans_a ? p.A + i0 : p.A + i0 * p.lda;
  q.B = p.trans_b ? p.B + j0 * p.ldb : p.B + j0;
  q.C = p.C + i0 * p.ldc + j0;
  return q;
}

// Threads: C is cut into slices of columns (rows when N is narrower than M or too narrow to cut), two per
// thread, claimed from a counter so that a descheduled thread leaves work for the others; each slice is a
// whole gemm_serial, packing its own B panels and A blocks. A column slice re-packs all of A's rows and a row
// slice all of B's columns, cheap next to its FMAs (each packed value feeds N or M / slices of them).
// The K blocks are those of one thread, so every element of C is the same sum in the same order whatever the
// thread count. An earlier version packed all of op(B) once into a buffer shared by the threads: a weight
// gradient's [1648 x 384] packed B (2.5 MiB) then no longer fit in L2 and every band re-read it from L3.
// Interleaved runs on a 2-core Zen 5, 2 threads, median: weight gradients [128 x 1648] x [1648 x 352..512]
// 1.29-1.34x faster, 256^2..1024^2 1.13-1.21x, the single-K-block shapes of the tiny step unchanged.
void gemm_sliced(const Problem& p, int threads) {
  const int64_t slices = 2 * threads;
  const bool by_cols = p.N >= slices * NR && (p.N >= p.M || p.M < slices * MR);
  const int64_t extent = by_cols ? p.N : p.M;
  const int64_t width = round_up(ceil_div(extent, slices), by_cols ? NR : MR), n_slices = ceil_div(extent, width);
  std::atomic<int64_t> next{0}, finished{0};
#pragma omp parallel num_threads(threads)
  {
    claim_tasks(next, n_slices, [&](int64_t t) {
      const int64_t lo = t * width, len = std::min(width, extent - lo);
      gemm_serial(by_cols ? sub_problem(p, 0, p.M, lo, len) : sub_problem(p, lo, len, 0, p.N));
    });
    finished.fetch_add(1, std::memory_order_acq_rel);
    wait_for(finished, omp_get_num_threads());
  }
}

// Threads worth using for `work` FMAs: all of them for large problems, one inside an existing parallel region.
int threads_for(int64_t work) {
  if (omp_in_parallel()) return 1;
  int64_t t = std::min<int64_t>(omp_get_max_threads(), work / kMinWorkPerThread);
  return int(std::max<int64_t>(t, 1));
}

// Wide problems run as column panels of at most kMaxPanelCols columns, one after another (see the header).
void gemm(const Problem& p) {
  if (p.M <= 0 || p.N <= 0) return;
  const int64_t panels = ceil_div(p.N, kMaxPanelCols), width = round_up(ceil_div(p.N, panels), NR);
  for (int64_t j0 = 0; j0 < p.N; j0 += width) {
    const Problem q = sub_problem(p, 0, p.M, j0, std::min(width, p.N - j0));
    int threads = (q.K <= 0 || q.alpha == 0.0f) ? 1 : threads_for(q.M * q.N * q.K);
    if (threads == 1)
      gemm_serial(q);
    else
      gemm_sliced(q, threads);
  }
}

void check_args(const char* op, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int64_t lda,
                int64_t ldb, int64_t ldc) {
  PSA_CHECK(M >= 0 && N >= 0 && K >= 0, op, ": negative size M=", M, " N=", N, " K=", K);
  PSA_CHECK(lda >= std::max<int64_t>(1, trans_a ? M : K), op, ": lda=", lda, " too small for ",
            trans_a ? "A^T" : "A", " with M=", M, " K=", K);
  PSA_CHECK(ldb >= std::max<int64_t>(1, trans_b ? K : N), op, ": ldb=", ldb, " too small for ",
            trans_b ? "B^T" : "B", " with K=", K, " N=", N);
  PSA_CHECK(ldc >= std::max<int64_t>(1, N), op, ": ldc=", ldc, " too small for N=", N);
}

// ---------------------------------------------------------------------------------------------------
// Double precision: plain loops, the inner one along contiguous memory: row updates c += a_ik * B[k,:]
// when B is stored [K,N], dot products with rows of B when it is stored [N,K]. Used by gradient checks,
// where exactness matters and speed does not.

double op_at(const double* X, int64_t ld, bool trans, int64_t r, int64_t c) {
  return trans ? X[c * ld + r] : X[r * ld + c];
}

void dgemm_serial(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                  int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
#pragma omp parallel for if (M * N * K > (int64_t(1) << 22) && !omp_in_parallel())
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = beta == 0.0 ? 0.0 : beta * c[j];  // beta == 0: C not read
    if (alpha == 0.0 || K == 0) continue;
    if (trans_b) {
      for (int64_t j = 0; j < N; ++j) {
        double dot = 0.0;
        for (int64_t k = 0; k < K; ++k) dot += op_at(A, lda, trans_a, i, k) * B[j * ldb + k];
        c[j] += alpha * dot;
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        double a = alpha * op_at(A, lda, trans_a, i, k);
        const double* b = B + k * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      }
    }
  }
}

}  // namespace

// ---- PackedB: op(B) packed once (float) -------------------------------------------------------------

namespace {

void check_packed(bool trans_b, int64_t K, int64_t N, int64_t ldb) {
  PSA_CHECK(K >= 0 && N >= 0 && ldb >= std::max<int64_t>(1, trans_b ? K : N), "PackedB: K=", K, " N=", N, " ldb=", ldb);
}

void check_part(int64_t K, int64_t N, int64_t M, int64_t n, int64_t k0, int64_t k1) {
  PSA_CHECK(0 <= k0 && k0 <= k1 && k1 <= K && 0 <= n && n <= N && M >= 0, "PackedB::multiply: rows [", k0, ", ", k1,
            ") and ", n, " columns of a [", K, " x ", N, "] op(B), M=", M);
}

}  // namespace

// The K blocks and panels of gemm_serial, all kept: panel kb at kb * kc_ * n_pad_, its slivers kc_b * NR
// apart (kc_b = the block's own height). A product with rows [k0, k1) of op(B) runs each block's overlap
// with them, starting inside its slivers, so every element of C is the same sum as in sgemm when
// [k0, k1) = [0, K).

template <>
PackedB<float>::PackedB(bool trans_b, int64_t K, int64_t N, const float* B, int64_t ldb)
    : trans_b_(trans_b), K_(K), N_(N), B_(nullptr), ldb_(ldb) {
  check_packed(trans_b, K, N, ldb);
  if (K == 0 || N == 0) return;
  const Problem p{false, trans_b, 1, N, K, 1.0f, nullptr, 0, B, ldb, 0.0f, nullptr, 0};  // M: any, unused
  const Plan pl = make_plan(p);  // gemm_serial's K blocks
  n_pad_ = pl.n_pad;
  kc_ = pl.kc;
  panels_.resize(size_t(pl.k_blocks * kc_ * n_pad_));
  for (int64_t pc = 0; pc < K; pc += kc_) pack_b(p, pc, std::min(kc_, K - pc), panels_.data() + pc * n_pad_);
}

template <>
void PackedB<float>::multiply(bool trans_a, int64_t M, int64_t n, int64_t k0, int64_t k1, float alpha,
                              const float* A, int64_t lda, float beta, float* C, int64_t ldc) const {
  check_part(K_, N_, M, n, k0, k1);
  const Problem p{trans_a, false, M, n, k1 - k0, alpha, A, lda, nullptr, 0, beta, C, ldc};
  if (M == 0 || n == 0) return;
  if (k1 == k0 || alpha == 0.0f) return scale_c(p);
  const int64_t rows = make_plan(p).rows;  // gemm_serial's bands
  bool first = true;
  for (int64_t pc = 0; pc < k1; pc += kc_) {
    const int64_t kc = std::min(kc_, K_ - pc), lo = std::max(k0, pc), hi = std::min(k1, pc + kc);
    if (lo >= hi) continue;
    const float* slivers = panels_.data() + pc * n_pad_ + (lo - pc) * NR;
    for (int64_t m0 = 0; m0 < M; m0 += rows)
      band_kernels(p, m0, std::min(rows, M - m0), lo, hi - lo, slivers, kc * NR, first ? beta : 1.0f);
    first = false;
  }
}

// Double: no packing, dgemm's loops on the sub-range.
template <>
PackedB<double>::PackedB(bool trans_b, int64_t K, int64_t N, const double* B, int64_t ldb)
    : trans_b_(trans_b), K_(K), N_(N), B_(B), ldb_(ldb) {
  check_packed(trans_b, K, N, ldb);
}

template <>
void PackedB<double>::multiply(bool trans_a, int64_t M, int64_t n, int64_t k0, int64_t k1, double alpha,
                               const double* A, int64_t lda, double beta, double* C, int64_t ldc) const {
  check_part(K_, N_, M, n, k0, k1);
  dgemm_serial(trans_a, trans_b_, M, n, k1 - k0, alpha, trans_a ? A + k0 * lda : A + k0, lda,
               trans_b_ ? B_ + k0 : B_ + k0 * ldb_, ldb_, beta, C, ldc);
}

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_args("sgemm", trans_a, trans_b, M, N, K, lda, ldb, ldc);
  gemm(Problem{trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc});
}

void sgemm_batched(int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                   const float* A, int64_t lda, int64_t stride_a, const float* B, int64_t ldb, int64_t stride_b,
                   float beta, float* C, int64_t ldc, int64_t stride_c) {
  check_args("sgemm_batched", trans_a, trans_b, M, N, K, lda, ldb, ldc);
  PSA_CHECK(batch >= 0, "sgemm_batched: negative batch ", batch);
  if (batch == 0 || M == 0 || N == 0) return;
  PSA_CHECK(batch == 1 || stride_c != 0, "sgemm_batched: stride_c = 0 would make ", batch, " outputs overlap");
  auto one = [&](int64_t b) {
    return Problem{trans_a, trans_b, M,    N,   K,    alpha, A + b * stride_a, lda, B + b * stride_b,
                   ldb,     beta,    C + b * stride_c, ldc};
  };
  const int64_t work = M * N * std::max<int64_t>(K, 1);
  const int threads = threads_for(batch * work);
  // Whole problems per thread when there are enough of them and each is too small to split well
  // (or they divide evenly); otherwise each problem uses every thread in turn.
  const bool per_problem = threads > 1 && batch >= threads &&
                           (work < int64_t(256) * 256 * 256 || batch % threads == 0);
  if (per_problem) {
    std::atomic<int64_t> next{0}, finished{0};
#pragma omp parallel num_threads(threads)
    {
      claim_tasks(next, batch, [&](int64_t b) { gemm_serial(one(b)); });
      finished.fetch_add(1, std::memory_order_acq_rel);
      wait_for(finished, omp_get_num_threads());
    }
  } else {
    for (int64_t b = 0; b < batch; ++b) gemm(one(b));
  }
}

void dgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
           int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  check_args("dgemm", trans_a, trans_b, M, N, K, lda, ldb, ldc);
  dgemm_serial(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void dgemm_batched(int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
                   const double* A, int64_t lda, int64_t stride_a, const double* B, int64_t ldb,
                   int64_t stride_b, double beta, double* C, int64_t ldc, int64_t stride_c) {
  check_args("dgemm_batched", trans_a, trans_b, M, N, K, lda, ldb, ldc);
  PSA_CHECK(batch >= 0, "dgemm_batched: negative batch ", batch);
  for (int64_t b = 0; b < batch; ++b)
    dgemm_serial(trans_a, trans_b, M, N, K, alpha, A + b * stride_a, lda, B + b * stride_b, ldb, beta,
                 C + b * stride_c, ldc);
}

}  // namespace psa::cpu
