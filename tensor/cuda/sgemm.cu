// A hand-written SGEMM: row-major C = alpha·op(A)·op(B) + beta·C in fp32, selectable at run time with
// PSA_GEMM=own or own-<variant> (or cuda::set_gemm(GemmImpl::own)); cuBLAS stays the default (matmul.cu).
//
// The design, one step at a time (each step fixes the bottleneck the previous one leaves):
//  1. Naive: one thread per C element reads a row of A and a column of B from global memory. Every operand is
//     read M (or N) times from DRAM/L2: memory-bound at a few % of peak.
//  2. Shared-memory tiles: a block computes a BM×BN tile of C. It walks K in steps of BK, staging the BM×BK
//     slice of A and the BK×BN slice of B in shared memory once, and every thread reads them from there. Global
//     traffic drops by a factor ~BM (or BN).
//  3. Register blocking: each thread computes an 8×8 sub-tile of C in registers. Per k it loads 8 values of A
//     and 8 of B from shared memory and does 64 FMAs: 4 FMAs per shared load instead of ~1, so shared memory
//     bandwidth stops being the limit.
//  4. Vectorised loads: global→shared copies and shared→register reads use float4 (16-byte) accesses. A is
//     stored transposed in shared memory (As[k][m]) so that the 8 values of A a thread needs for one k are
//     contiguous, like those of B (Bs[k][n]); both are then read with two float4 loads each.
//  5. Warp tiling: the 8 warps of a block split the 128×128 tile into 2×4 warp tiles of 64×32; inside a warp the
//     lanes form an 8×4 grid and each lane owns rows {4·lane_m + 32·r + i} and columns {4·lane_n + 16·c + j}
//     (r, c ∈ {0, 1}, i, j < 4). Lanes sharing lane_m read the same As float4 (a broadcast), and the 8 distinct
//     float4s of a warp are 128 contiguous bytes: conflict-free shared reads, and a warp touches a compact
//     region of both tiles, which keeps the per-warp working set in registers.
// Edges: the float4 path is taken only when the leading dims are multiples of 4 and the pointers 16-byte
// aligned (a template flag chosen per call); vectors that cross the matrix edge fall back to bounds-checked
// scalar loads with zero fill, so any M, N, K works. beta == 0 never reads C (it may hold NaN garbage).
//  6. Double buffering: two shared tiles; the global loads of the next K tile go into registers before the
//     current tile's FMAs and into the other shared tile after them, so their latency hides behind the math
//     and each K tile needs one barrier instead of two.
//  7. Split-K: when M and N give fewer output tiles than twice the SM count but K is long (the weight gradient
//     dW = Xᵀ·dY, K = tokens), blockIdx.z takes a slice of K and the block writes its partial tile to a
//     workspace [splits][M][N]; a second kernel adds the slices in order (deterministic, no atomics) and applies
//     alpha and beta. Without it such a product runs on a handful of SMs.
//  8. Two depths of K tile, compiled side by side and chosen at run time (kernels.h OwnTile) so that one GPU run
//     of `psa bench-gemm` ranks them: BK = 8 or 16 (16 halves the barriers per FMA and doubles the loads in
//     flight, for 33 KiB of shared memory a block); two blocks (16 warps) share an SM either way (step 10).
//  9. The shared tiles' rows are padded by 4 floats, which spreads the transposing stores over the banks.
// 10. The transpose flags are template arguments (4 layouts x float4 or not x 2 depths = 16 kernels): as run-time
//     flags they cost every K tile integer divisions by a run-time value and branches. The K loop of the float4
//     BK = 8 kernel went from 275 PTX instructions besides its 512 FMAs (4 of them divisions) to 150 for NN,
//     untaken scalar fallbacks included. __launch_bounds__(256, 2) holds every variant to 128 registers (2
//     blocks an SM; the BK = 16 ones took up to 139 without it); only the scalar-load, both-transposed BK = 16
//     variant spills (16 bytes).
// Not done: cp.async pipelines of more than two stages.
#include <type_traits>
#include <vector>

#include "tensor/cuda/common.cuh"

namespace psa::cuda {
namespace {

constexpr int BM = 128, BN = 128, kGemmThreads = 256;
// Rows of the shared tiles, padded by 4 floats (one 16-byte group, so float4 reads stay aligned): a transposing
// store (A not transposed, or B transposed) writes 4 consecutive k of one row as 4 tile rows; unpadded, the
// lanes writing different k of the same m hit one bank (2-way conflicts at BK = 8, 4-way at 16), padded they
// fall 4 banks apart per k (none at BK = 8, 2-way at 16). The reads are unchanged: a warp's 8 float4s per row
// stay 128 contiguous bytes.
constexpr int kPaddedBM = BM + 4, kPaddedBN = BN + 4;

// Each thread moves kLoads float4s of op(A) and as many of op(B) per K tile (BM·BK = BN·BK = 4·256·kLoads).
// They are fetched into registers first (fetch_tile) and written to shared memory later (store_tile), so that
// the global loads of tile k + 1 are in flight while tile k is being multiplied (step 6 in the header).
template <int BK>
struct TileRegs {
  static constexpr int kLoads = BM * BK / (4 * kGemmThreads);
  float a[kLoads][4], b[kLoads][4];
};

// One float4 slot of a tile: rows `outer` of the stored matrix, 4 consecutive elements from `inner`. A tile of
// op(A) read from A [M, K] (not transposed) is BM rows of BK / 4 slots; read from A [K, M], BK rows of BM / 4.
// Slot f of the tile is taken by thread f % 256 as its load f / 256.
struct Slot {
  int outer, inner;
};
template <int BK>
__device__ __forceinline__ Slot slot(bool along_k, int f) {
  return along_k ? Slot{f / (BK / 4), (f % (BK / 4)) * 4} : Slot{f / (BM / 4), (f % (BM / 4)) * 4};
}

// Loads 4 values of the row-major matrix X [rows, cols] (leading dim ld) at (r, c..c+3), zero past the edges.
template <bool VEC>
__device__ __forceinline__ void load4(const float* X, int ld, int rows, int cols, int r, int c, float* v) {
  if (VEC && r < rows && c + 3 < cols) {
    float4 q = *reinterpret_cast<const float4*>(X + (int64_t)r * ld + c);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    for (int i = 0; i < 4; ++i) v[i] = (r < rows && c + i < cols) ? X[(int64_t)r * ld + c + i] : 0.f;
  }
}

// A not transposed is [M, K]: a slot is 4 consecutive k of row m (m0 + outer); transposed, [K, M]: 4
// consecutive m of row k. B not transposed is [K, N]: 4 consecutive n of row k; transposed, [N, K]: 4
// consecutive k of row n.
template <int BK, bool VEC, bool TA, bool TB>
__device__ __forceinline__ TileRegs<BK> fetch_tile(int M, int N, int K, const float* A, int lda, const float* B,
                                                   int ldb, int m0, int n0, int k0) {
  TileRegs<BK> r;
#pragma unroll
  for (int g = 0; g < TileRegs<BK>::kLoads; ++g) {
    const int f = threadIdx.x + g * kGemmThreads;
    Slot sa = slot<BK>(!TA, f), sb = slot<BK>(TB, f);
    if (!TA) load4<VEC>(A, lda, M, K, m0 + sa.outer, k0 + sa.inner, r.a[g]);
    else load4<VEC>(A, lda, K, M, k0 + sa.outer, m0 + sa.inner, r.a[g]);
    if (!TB) load4<VEC>(B, ldb, K, N, k0 + sb.outer, n0 + sb.inner, r.b[g]);
    else load4<VEC>(B, ldb, N, K, n0 + sb.outer, k0 + sb.inner, r.b[g]);
  }
  return r;
}

// As[k][m] (A transposed, step 4) and Bs[k][n], at the places fetch_tile took the values from.
template <int BK, bool TA, bool TB>
__device__ __forceinline__ void store_tile(const TileRegs<BK>& r, float (*As)[kPaddedBM], float (*Bs)[kPaddedBN]) {
#pragma unroll
  for (int g = 0; g < TileRegs<BK>::kLoads; ++g) {
    const int f = threadIdx.x + g * kGemmThreads;
    Slot sa = slot<BK>(!TA, f), sb = slot<BK>(TB, f);
    if (!TA)
      for (int i = 0; i < 4; ++i) As[sa.inner + i][sa.outer] = r.a[g][i];
    else
      *reinterpret_cast<float4*>(&As[sa.outer][sa.inner]) = make_float4(r.a[g][0], r.a[g][1], r.a[g][2], r.a[g][3]);
    if (!TB)
      *reinterpret_cast<float4*>(&Bs[sb.outer][sb.inner]) = make_float4(r.b[g][0], r.b[g][1], r.b[g][2], r.b[g][3]);
    else
      for (int j = 0; j < 4; ++j) Bs[sb.inner + j][sb.outer] = r.b[g][j];
  }
}

// Block (x, y, z) computes the BM×BN tile (y, x) of C over the K slice [z·k_slice, (z + 1)·k_slice); slice z
// writes at C + z·c_slice_stride (0 without split-K, where gridDim.z = 1). The layouts are template arguments:
// chosen at run time, their slot arithmetic divided by a runtime value (integer divisions, tens of instructions
// each) and branched in every K tile.
template <int BK, bool VEC, bool TA, bool TB>
__global__ void __launch_bounds__(kGemmThreads, 2)
    sgemm_kernel(int M, int N, int K, int k_slice, float alpha, const float* __restrict__ A, int lda,
                 const float* __restrict__ B, int ldb, float beta, float* __restrict__ C, int ldc,
                 int64_t c_slice_stride) {
  __shared__ __align__(16) float As[2][BK][kPaddedBM];
  __shared__ __align__(16) float Bs[2][BK][kPaddedBN];
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int k_begin = blockIdx.z * k_slice, k_end = k_begin + min(k_slice, K - k_begin);  // no int overflow
  C += blockIdx.z * c_slice_stride;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;            // 2×4 warps, each a 64×32 tile
  const int lane_m = lane / 4, lane_n = lane % 4;    // 8×4 lanes, each 8×8 outputs
  const int row0 = wm * 64 + lane_m * 4, col0 = wn * 32 + lane_n * 4;

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

  // Double buffering: tile t is multiplied from buffer t % 2 while tile t + 1 travels from global memory into
  // registers; it is stored into the other buffer afterwards. That buffer was last read in iteration t - 1,
  // which every thread finished at the barrier closing it, so one barrier per tile suffices.
  // fetch_tile zero-fills past its K argument, so passing k_end keeps each slice to its own part of K.
  const int tiles = (k_end - k_begin + BK - 1) / BK;
  if (tiles > 0)
    store_tile<BK, TA, TB>(fetch_tile<BK, VEC, TA, TB>(M, N, k_end, A, lda, B, ldb, m0, n0, k_begin), As[0], Bs[0]);
  __syncthreads();
  for (int tile = 0; tile < tiles; ++tile) {
    const int cur = tile & 1;
    const bool more = tile + 1 < tiles;
    TileRegs<BK> next;
    if (more) next = fetch_tile<BK, VEC, TA, TB>(M, N, k_end, A, lda, B, ldb, m0, n0, k_begin + (tile + 1) * BK);
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[8], b[8];
      float4 a0 = *reinterpret_cast<const float4*>(&As[cur][k][row0]);
      float4 a1 = *reinterpret_cast<const float4*>(&As[cur][k][row0 + 32]);
      float4 b0 = *reinterpret_cast<const float4*>(&Bs[cur][k][col0]);
      float4 b1 = *reinterpret_cast<const float4*>(&Bs[cur][k][col0 + 16]);
      a[0] = a0.x, a[1] = a0.y, a[2] = a0.z, a[3] = a0.w, a[4] = a1.x, a[5] = a1.y, a[6] = a1.z, a[7] = a1.w;
      b[0] = b0.x, b[1] = b0.y, b[2] = b0.z, b[3] = b0.w, b[4] = b1.x, b[5] = b1.y, b[6] = b1.z, b[7] = b1.w;
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    if (more) store_tile<BK, TA, TB>(next, As[cur ^ 1], Bs[cur ^ 1]);
    __syncthreads();
  }

  // Epilogue: register row i maps to tile row row0 + (i / 4)·32 + i % 4, column j to col0 + (j / 4)·16 + j % 4.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    int m = m0 + row0 + (i / 4) * 32 + i % 4;
    if (m >= M) continue;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      int n = n0 + col0 + c * 16;
      float* out = C + (int64_t)m * ldc + n;
      if (VEC && n + 3 < N) {
        float4 v = make_float4(alpha * acc[i][c * 4 + 0], alpha * acc[i][c * 4 + 1], alpha * acc[i][c * 4 + 2],
                               alpha * acc[i][c * 4 + 3]);
        if (beta != 0.f) {
          float4 old = *reinterpret_cast<const float4*>(out);
          v.x += beta * old.x, v.y += beta * old.y, v.z += beta * old.z, v.w += beta * old.w;
        }
        *reinterpret_cast<float4*>(out) = v;
      } else {
        for (int j = 0; j < 4; ++j) {
          if (n + j >= N) break;
          float v = alpha * acc[i][c * 4 + j];
          out[j] = beta != 0.f ? v + beta * out[j] : v;
        }
      }
    }
  }
}

// C = alpha·Σ_z part[z] + beta·C, the slices added in order.
__global__ void sum_k_slices(const float* part, int slices, int M, int N, float alpha, float beta, float* C, int ldc) {
  const int64_t MN = (int64_t)M * N;
  CUDA_LOOP(e, MN) {
    float s = 0.f;
    for (int z = 0; z < slices; ++z) s += part[z * MN + e];
    float* out = C + e / N * ldc + e % N;
    *out = beta != 0.f ? alpha * s + beta * *out : alpha * s;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int sm_count() {
  static int n = [] {
    cudaDeviceProp p;
    cudaCheck(cudaGetDeviceProperties(&p, 0));
    return p.multiProcessorCount;
  }();
  return n;
}

// How many K slices: enough blocks for two waves over the SMs, each slice at least kMinSlice long.
constexpr int64_t kMinSlice = 256;
int64_t k_slices(int64_t M, int64_t N, int64_t K) {
  int64_t tiles = ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  int64_t want = (2 * sm_count() + tiles - 1) / tiles;
  return std::max<int64_t>(1, std::min(want, K / kMinSlice));
}

// Fills p[0..n) with a fixed pseudo-random pattern in [-1, 1) (benchmark inputs).
__global__ void fill_pattern(float* p, int64_t n, uint32_t seed) {
  CUDA_LOOP(i, n) {
    uint32_t x = (uint32_t)i * 2654435761u ^ seed;
    x ^= x >> 13, x *= 0x5bd1e995u, x ^= x >> 15;
    p[i] = (float)(x & 0xffffff) / 8388608.0f - 1.0f;
  }
}

// Calls f(v, a, b) with std::bool_constant arguments equal to the three flags (the kernel's template arguments).
template <typename F>
void with_flags(bool v, bool a, bool b, F f) {
  using Yes = std::true_type;
  using No = std::false_type;
  auto with_b = [&](auto v_, auto a_) { b ? f(v_, a_, Yes{}) : f(v_, a_, No{}); };
  auto with_a = [&](auto v_) { a ? with_b(v_, Yes{}) : with_b(v_, No{}); };
  v ? with_a(Yes{}) : with_a(No{});
}

template <int BK>
void run_own(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  int64_t slices = k_slices(M, N, K);
  // A slice length that is a multiple of BK keeps every slice's K offset 16-byte aligned for the float4 loads.
  int64_t k_slice = slices == 1 ? std::max<int64_t>(K, 1) : ((K + slices - 1) / slices + BK - 1) / BK * BK;
  slices = slices == 1 ? 1 : (K + k_slice - 1) / k_slice;
  Tensor part;  // split-K: the slices' partial products [slices][M][N]
  float* out = C;
  int64_t out_ld = ldc, slice_stride = 0;
  float out_alpha = alpha, out_beta = beta;
  if (slices > 1) {
    part = Tensor::empty({slices * M * N}, DType::f32, Device::cuda);
    out = part.data<float>(), out_ld = N, slice_stride = M * N, out_alpha = 1.f, out_beta = 0.f;
  }
  dim3 grid((unsigned)((N + BN - 1) / BN), (unsigned)((M + BM - 1) / BM), (unsigned)slices);
  const bool vec = lda % 4 == 0 && ldb % 4 == 0 && out_ld % 4 == 0 && aligned16(A) && aligned16(B) && aligned16(out);
  auto launch = [&](auto vec_, auto ta_, auto tb_) {
    sgemm_kernel<BK, decltype(vec_)::value, decltype(ta_)::value, decltype(tb_)::value>
        <<<grid, kGemmThreads, 0, stream()>>>((int)M, (int)N, (int)K, (int)k_slice, out_alpha, A, (int)lda, B,
                                              (int)ldb, out_beta, out, (int)out_ld, slice_stride);
  };
  with_flags(vec, ta, tb, launch);
  cudaCheckLaunch();
  if (slices > 1) {
    sum_k_slices<<<blocks_for(M * N), kThreads, 0, stream()>>>(part.data<float>(), (int)slices, (int)M, (int)N, alpha,
                                                              beta, C, (int)ldc);
    cudaCheckLaunch();
  }
}

}  // namespace

const char* own_tile_name(OwnTile t) {
  switch (t) {
    case OwnTile::k8: return "k8";
    case OwnTile::k16: return "k16";
  }
  return "?";
}

void own_sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  PSA_CHECK(M < (1LL << 31) && N < (1LL << 31) && K < (1LL << 31) && lda < (1LL << 31) && ldb < (1LL << 31) &&
                ldc < (1LL << 31),
            "own_sgemm: sizes [", M, ",", N, ",", K, "] exceed int");
  PSA_CHECK((N + BN - 1) / BN <= 0x7fffffff && (M + BM - 1) / BM <= 65535, "own_sgemm: M = ", M, " too large");
  switch (own_tile()) {
    case OwnTile::k8: return run_own<8>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    case OwnTile::k16: return run_own<16>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

GemmTiming time_sgemm(GemmImpl impl, int64_t n, int reps) {
  int64_t count = n * n;
  Tensor a = Tensor::empty({n, n}, DType::f32, Device::cuda), b = Tensor::empty({n, n}, DType::f32, Device::cuda);
  Tensor c = Tensor::empty({n, n}, DType::f32, Device::cuda), ref = Tensor::empty({n, n}, DType::f32, Device::cuda);
  fill_pattern<<<blocks_for(count), kThreads, 0, stream()>>>(a.data<float>(), count, 1u);
  cudaCheckLaunch();
  fill_pattern<<<blocks_for(count), kThreads, 0, stream()>>>(b.data<float>(), count, 2u);
  cudaCheckLaunch();
  auto run = [&](GemmImpl which, Tensor& out) {
    sgemm(which, false, false, n, n, n, 1.0f, a.data<float>(), n, 0, b.data<float>(), n, 0, 0.0f, out.data<float>(),
          n, 0, 1);
  };
  // Validate first: the timed implementation against cuBLAS (fp32, TF32 off for the reference).
  bool was_tf32 = tf32();
  set_tf32(false);
  run(GemmImpl::cublas, ref);
  set_tf32(was_tf32);
  run(impl, c);
  std::vector<float> hr = ref.vec<float>(), hc = c.vec<float>();
  GemmTiming t;
  double scale = 0;
  for (float v : hr) scale = std::max(scale, (double)std::fabs(v));
  for (size_t i = 0; i < hr.size(); ++i)
    t.max_err = std::max(t.max_err, std::fabs((double)hc[i] - hr[i]) / (scale + 1e-30));
  for (int i = 0; i < 2; ++i) run(impl, c);  // warm-up
  cudaEvent_t start, stop;
  cudaCheck(cudaEventCreate(&start));
  cudaCheck(cudaEventCreate(&stop));
  cudaCheck(cudaEventRecord(start, stream()));
  for (int i = 0; i < reps; ++i) run(impl, c);
  cudaCheck(cudaEventRecord(stop, stream()));
  cudaCheck(cudaEventSynchronize(stop));
  float ms = 0;
  cudaCheck(cudaEventElapsedTime(&ms, start, stop));
  cudaCheck(cudaEventDestroy(start));
  cudaCheck(cudaEventDestroy(stop));
  t.ms = ms / reps;
  return t;
}

}  // namespace psa::cuda
