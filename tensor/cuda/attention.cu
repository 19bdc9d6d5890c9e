// Rotary embeddings and flash-style scaled dot-product attention (the CPU versions: tensor/cpu/attention.cpp).
//
// Heads stay in the projections' layout [B, T, H, D], as on the CPU: a head is T rows of D values, H·D apart.
// rope: one thread per element, out = x·cos + rotate_half(x)·sin; backward gx = g·cos - rotate_half(g·sin).
//
// attention, q [B, T, H, D], k/v [B, S, Hkv, D], G = H / Hkv query heads per kv head, optional additive mask
// [T, S] or [B|1, H|1, T, S], causal hides s > t + S - T. No [T, S] matrix is ever stored. Two designs of the
// same three kernels (forward, dQ, dK/dV) and the same arithmetic, chosen at run time (kernels.h AttentionKernel):
// "tiles" (the default, described where its kernels start below) and "rows", the earlier one:
//  forward   blocks of 32 query rows of one (b, h), 4 per warp; K and V stream through shared memory in tiles of
//            32 keys with an online softmax (running max and sum, rescaled per tile). Saves lse = m + log l.
//  backward  D_t = rowsum(dO∘O) first. Then two kernels, so that nothing needs atomics:
//            dQ:     per query row (blocks as the forward, K/V tiles): p = exp(s - lse), dS = p·(dO·v - D_t),
//                    dQ = scale·Σ dS·k.
//            dK, dV: blocks of 32 key rows of one (b, kv head), 4 per warp; Q, dO, lse, D stream through shared
//                    memory in tiles of 32 query rows, for each of the G query heads in order; dV = Σ p·dO,
//                    dK = scale·Σ dS·q.
//            Every sum runs in a fixed order (lanes by shuffles in a fixed pattern, tiles in order), so results
//            are bitwise reproducible.
// Rows whose every key is hidden give zeros (lse = -inf), as on the CPU. Head dim D <= 128 (4 values a lane).
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>

#include "tensor/cuda/common.cuh"

namespace psa::cuda {
namespace {

// ---- rope
// e runs over [B, T, H, D] (x and out, or gout and gx); its position is t = (e / (H·D)) % T.
template <typename S>
__global__ void rope_kernel(const S* in, const S* cos, const S* sin, int64_t H, int64_t T, int64_t D, int64_t n,
                            S sign, S* out) {
  CUDA_LOOP(e, n) {
    int64_t d = e % D, t = (e / (D * H)) % T, half = D / 2;
    const S* c = cos + t * D;
    const S* s = sin + t * D;
    // forward (sign +1): y[d] = x[d]c[d] - x[d+h]s[d] (d < h), x[d]c[d] + x[d-h]s[d] (d >= h)
    // backward (sign -1): g[d]c[d] + g[d+h]s[d+h] (d < h), g[d]c[d] - g[d-h]s[d-h] (d >= h)
    if (sign > 0)
      out[e] = d < half ? in[e] * c[d] - in[e + half] * s[d] : in[e] * c[d] + in[e - half] * s[d];
    else
      out[e] = d < half ? in[e] * c[d] + in[e + half] * s[d + half] : in[e] * c[d] - in[e - half] * s[d - half];
  }
}

// ---- attention
// Every kernel below: block = kWarps warps, a warp owns R = kRowsPerWarp consecutive rows (query rows in the
// forward and dQ, key rows in dK/dV), and the other side streams through shared memory in tiles of kTile = 32
// rows, lane j taking row j of the tile. Each dot product a lane forms reads its tile row once per 4 dims for
// all R of the warp's rows (register blocking over rows: 5 shared loads per 16 FMAs, where one row per warp
// needed 2 per FMA). Products summed over the tile go through a [kTile][R] shared array per warp, so that one
// broadcast load gives the coefficient of every row of the warp.
constexpr int kTile = 32, kWarps = 8, kRowsPerWarp = 4, kBlockRows = kWarps * kRowsPerWarp;

struct AttnShape {
  int64_t B, H, Hkv, T, S, D;
  // mask: rank 0 (none), 2 ([T, S]) or 4 ([mB, mH, T, S])
  int mask_rank;
  int64_t mB, mH;
  // Where head h of row b starts in q, out and their gradients [B, T, H, D], and its row stride; the same for kv
  // head j in k, v [B, S, Hkv, D].
  __host__ __device__ int64_t q_head(int64_t b, int64_t h) const { return (b * T * H + h) * D; }
  __host__ __device__ int64_t q_ld() const { return H * D; }
  __host__ __device__ int64_t kv_head(int64_t b, int64_t j) const { return (b * S * Hkv + j) * D; }
  __host__ __device__ int64_t kv_ld() const { return Hkv * D; }
};

template <typename T>
__device__ __forceinline__ const T* mask_block(const T* mask, const AttnShape& a, int64_t b, int64_t h) {
  if (!mask) return nullptr;
  if (a.mask_rank == 2) return mask;
  int64_t mb = a.mB == 1 ? 0 : b, mh = a.mH == 1 ? 0 : h;
  return mask + (mb * a.mH + mh) * a.T * a.S;
}

// The exponentials of the online softmax and of P in the backward: in f32 the hardware's exp2 of the scaled
// argument (ex2.approx and a multiply, where expf takes ~12 instructions with its range reduction, and a forward
// tile makes 3 per row), relative error ~1e-6 against the CPU's exp, well inside attention's GEMM-class
// tolerance; the forward's lse and the backward's P use the same function, so they stay consistent. f64: exp.
__device__ __forceinline__ float softmax_exp(float x) { return exp2f(x * 1.4426950408889634f); }
__device__ __forceinline__ double softmax_exp(double x) { return exp(x); }

// A block of query rows of head (b, h) = blockIdx.y: its kv head h / G in K and V, and its rows of the mask.
template <typename T>
struct QueryHead {
  int64_t bh, b, h;
  const T *K, *V, *M;
};
template <typename T>
__device__ __forceinline__ QueryHead<T> query_head(const T* k, const T* v, const T* mask, const AttnShape& a) {
  const int64_t bh = blockIdx.y, b = bh / a.H, h = bh % a.H, kv = h / (a.H / a.Hkv);
  return {bh, b, h, k + a.kv_head(b, kv), v + a.kv_head(b, kv), mask_block(mask, a, b, h)};
}

// Keys [0, visible) are seen by query row t.
__device__ __forceinline__ int64_t visible_keys(const AttnShape& a, bool causal, int64_t t) {
  if (!causal) return a.S;
  int64_t v = t + a.S - a.T + 1;
  return v < 0 ? 0 : v > a.S ? a.S : v;
}

// The head dim rounded up to 4 (dot products run over it in steps of 4, on zero padding) and the row stride of
// the shared tiles: D4 + 4 is 4 mod 32 floats when D4 is a multiple of 32, so 16-byte reads of 8 lanes' rows
// fall on distinct banks.
struct TileDims {
  int D, D4, ld;
};
__host__ __device__ __forceinline__ TileDims tile_dims(int64_t D) {
  int d4 = (int)(D + 3) / 4 * 4;
  return {(int)D, d4, d4 + 4};
}

// Loads 4 consecutive values from shared memory (float: one 16-byte access; the address is 16-byte aligned).
__device__ __forceinline__ void load4(const float* p, float (&x)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
}
__device__ __forceinline__ void load4(const double* p, double (&x)[4]) {
  for (int i = 0; i < 4; ++i) x[i] = p[i];
}

// The block stages rows [r0, r0 + kTile) of a [rows, D] matrix with row stride src_ld as a [kTile][ld] tile
// (zeros past `rows` and in the columns [D, D4)).
template <typename T>
__device__ __forceinline__ void load_tile(const T* src, int64_t src_ld, int64_t r0, int64_t rows, TileDims t, T* tile) {
  for (int e = threadIdx.x; e < kTile * t.D4; e += blockDim.x) {
    const int j = e / t.D4, d = e - j * t.D4;
    tile[j * t.ld + d] = r0 + j < rows && d < t.D ? src[(r0 + j) * src_ld + d] : T(0);
  }
}

// The warp stages its R rows [r0, r0 + R) of a [rows, D] matrix (row stride src_ld) as [R][D4] (zeros past `rows`
// and D).
template <typename T>
__device__ __forceinline__ void load_warp_rows(const T* src, int64_t src_ld, int64_t r0, int64_t rows, TileDims t,
                                               T* dst) {
  for (int e = threadIdx.x % 32; e < kRowsPerWarp * t.D4; e += 32) {
    const int r = e / t.D4, d = e - r * t.D4;
    dst[e] = r0 + r < rows && d < t.D ? src[(r0 + r) * src_ld + d] : T(0);
  }
}

// dot[r] = tile_row · rows[r] for the warp's R rows ([R][D4], read by every lane: broadcasts).
template <typename T>
__device__ __forceinline__ void dot_rows(const T* tile_row, const T* rows, int D4, T (&dot)[kRowsPerWarp]) {
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) dot[r] = T(0);
  for (int d = 0; d < D4; d += 4) {
    T x[4];
    load4(tile_row + d, x);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      T y[4];
      load4(rows + r * D4 + d, y);
      dot[r] += x[0] * y[0] + x[1] * y[1] + x[2] * y[2] + x[3] * y[3];
    }
  }
}

// acc[r][i] += Σ_j coef[j][r]·tile[j][d] with d = lane + 32·i: the tile's rows weighted by the coefficients
// ([kTile][R], written by the lanes of the warp) summed in order of j.
template <typename T, int DPL>
__device__ __forceinline__ void accumulate_rows(const T* coef, const T* tile, TileDims t, T (&acc)[kRowsPerWarp][DPL]) {
  const int lane = threadIdx.x % 32;
  for (int j = 0; j < kTile; ++j) {
    T c[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) c[r] = coef[j * kRowsPerWarp + r];
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      if (d >= t.D) continue;
      const T x = tile[j * t.ld + d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[r][i] += c[r] * x;
    }
  }
}

// The warp writes scale·acc as its R rows [r0, r0 + R) of a [rows, D] matrix with row stride dst_ld (rows past
// `rows` are dropped).
template <typename T, int DPL>
__device__ __forceinline__ void store_warp_rows(const T (&acc)[kRowsPerWarp][DPL], T scale, int64_t r0, int64_t rows,
                                                int64_t D, T* dst, int64_t dst_ld) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (r0 + r >= rows) continue;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < D) dst[(r0 + r) * dst_ld + d] = scale * acc[r][i];
    }
  }
}

// Forward: the warp keeps the online-softmax state of each of its query rows (running max m, this lane's part
// of the sum l, the output row spread over lanes) and rescales it by exp(m_old - m_new) per key tile; p is the
// coefficient of the P·V product. Saves lse = m + log l per row.
template <typename T, int DPL>
__global__ void __launch_bounds__(kWarps * 32) flash_forward(const T* q, const T* k, const T* v, const T* mask,
                                                              AttnShape a, bool causal, T scale, T* out, T* lse) {
  constexpr int R = kRowsPerWarp;
  const TileDims td = tile_dims(a.D);
  const int64_t D = a.D;
  T* sK = dynamic_smem<T>();     // [kTile][ld]
  T* sV = sK + kTile * td.ld;    // [kTile][ld]
  T* sQ = sV + kTile * td.ld;    // [kWarps][R][D4]
  T* sP = sQ + kBlockRows * td.D4;  // [kWarps][kTile][R]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto [bh, b, h, K, V, M] = query_head(k, v, mask, a);
  const int64_t t0 = (int64_t)blockIdx.x * kBlockRows + warp * R;  // this warp's first row
  T* wQ = sQ + warp * R * td.D4;
  T* wP = sP + warp * kTile * R;
  load_warp_rows(q + a.q_head(b, h), a.q_ld(), t0, a.T, td, wQ);
  int64_t vis[R], warp_vis = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    vis[r] = t0 + r < a.T ? visible_keys(a, causal, t0 + r) : 0;
    warp_vis = max(warp_vis, vis[r]);
  }
  const int64_t t_last = min(a.T - 1, (int64_t)(blockIdx.x + 1) * kBlockRows - 1);
  const int64_t block_vis = visible_keys(a, causal, t_last);  // the last row sees the most keys
  T m[R], l[R], o[R][DPL];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -d_inf<T>(), l[r] = T(0);
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[r][i] = T(0);
  }
  for (int64_t s0 = 0; s0 < block_vis; s0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and wQ is written before its first use)
    load_tile(K, a.kv_ld(), s0, a.S, td, sK);
    load_tile(V, a.kv_ld(), s0, a.S, td, sV);
    __syncthreads();
    if (s0 >= warp_vis) continue;  // none of this warp's rows sees a key of the tile (warp-uniform)
    const int64_t s = s0 + lane;
    T dot[R];
    dot_rows(sK + lane * td.ld, wQ, td.D4, dot);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      T score = -d_inf<T>();
      if (s < vis[r]) score = scale * dot[r] + (M ? M[(t0 + r) * a.S + s] : T(0));
      const T m_new = std_max(m[r], warp_max(score));
      T p = T(0), corr = T(1);
      if (m_new != -d_inf<T>()) p = softmax_exp(score - m_new), corr = softmax_exp(m[r] - m_new);
      l[r] = l[r] * corr + p;
#pragma unroll
      for (int i = 0; i < DPL; ++i) o[r][i] *= corr;
      m[r] = m_new;
      wP[lane * R + r] = p;
    }
    __syncwarp();
    accumulate_rows(wP, sV, td, o);
    __syncwarp();  // every lane has read wP before the next tile rewrites it
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const T l_row = warp_sum(l[r]);
    const bool empty = l_row == T(0) || m[r] == -d_inf<T>();
    const T inv = empty ? T(0) : T(1) / l_row;
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[r][i] *= inv;
    if (lane == 0 && t0 + r < a.T) lse[bh * a.T + t0 + r] = empty ? -d_inf<T>() : m[r] + d_log(l_row);
  }
  store_warp_rows(o, T(1), t0, a.T, D, out + a.q_head(b, h), a.q_ld());
}

// D_t = Σ_d dO[t, d]·O[t, d], one warp per row; out [B, H, T] as lse (row r = (b, h, t)), dO and O [B, T, H, D].
template <typename T>
__global__ void rowsum_dot(const T* g, const T* o, AttnShape a, T* out) {
  const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32, rows = a.B * a.H * a.T;
  const int lane = threadIdx.x % 32;
  // Warp-stride: blocks_for caps the grid, and r is the same for the warp's 32 lanes, so warp_sum sees all of them.
  for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
    const int64_t t = r % a.T, bh = r / a.T, at = a.q_head(bh / a.H, bh % a.H) + t * a.q_ld();
    T acc = T(0);
    for (int64_t d = lane; d < a.D; d += 32) acc += g[at + d] * o[at + d];
    acc = warp_sum(acc);
    if (lane == 0) out[r] = acc;
  }
}

// dQ: the warp's query rows against K and V tiles (as the forward): p = exp(score - lse), dS = p·(dO·v - D_t),
// dQ = scale·Σ dS·k.
template <typename T, int DPL>
__global__ void __launch_bounds__(kWarps * 32) flash_backward_dq(const T* g, const T* q, const T* k, const T* v,
                                                                  const T* lse, const T* Dt, const T* mask,
                                                                  AttnShape a, bool causal, T scale, T* gq) {
  constexpr int R = kRowsPerWarp;
  const TileDims td = tile_dims(a.D);
  const int64_t D = a.D;
  T* sK = dynamic_smem<T>();        // [kTile][ld]
  T* sV = sK + kTile * td.ld;       // [kTile][ld]
  T* sQ = sV + kTile * td.ld;       // [kWarps][R][D4]
  T* sG = sQ + kBlockRows * td.D4;  // [kWarps][R][D4] dO of the rows
  T* sS = sG + kBlockRows * td.D4;  // [kWarps][kTile][R] dS
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto [bh, b, h, K, V, M] = query_head(k, v, mask, a);
  const int64_t t0 = (int64_t)blockIdx.x * kBlockRows + warp * R;
  T* wQ = sQ + warp * R * td.D4;
  T* wG = sG + warp * R * td.D4;
  T* wS = sS + warp * kTile * R;
  load_warp_rows(q + a.q_head(b, h), a.q_ld(), t0, a.T, td, wQ);
  load_warp_rows(g + a.q_head(b, h), a.q_ld(), t0, a.T, td, wG);
  T row_lse[R], row_D[R];
  int64_t vis[R], warp_vis = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t t = t0 + r;
    row_lse[r] = t < a.T ? lse[bh * a.T + t] : -d_inf<T>();
    row_D[r] = t < a.T ? Dt[bh * a.T + t] : T(0);
    // A fully hidden row (lse = -inf) has P = 0 and so dQ = 0.
    vis[r] = t < a.T && row_lse[r] != -d_inf<T>() ? visible_keys(a, causal, t) : 0;
    warp_vis = max(warp_vis, vis[r]);
  }
  const int64_t t_last = min(a.T - 1, (int64_t)(blockIdx.x + 1) * kBlockRows - 1);
  const int64_t block_vis = visible_keys(a, causal, t_last);
  T dq[R][DPL];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < DPL; ++i) dq[r][i] = T(0);
  for (int64_t s0 = 0; s0 < block_vis; s0 += kTile) {
    __syncthreads();
    load_tile(K, a.kv_ld(), s0, a.S, td, sK);
    load_tile(V, a.kv_ld(), s0, a.S, td, sV);
    __syncthreads();
    if (s0 >= warp_vis) continue;
    const int64_t s = s0 + lane;
    T qk[R], gv[R];
    dot_rows(sK + lane * td.ld, wQ, td.D4, qk);
    dot_rows(sV + lane * td.ld, wG, td.D4, gv);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      T ds = T(0);
      if (s < vis[r]) {
        const T score = scale * qk[r] + (M ? M[(t0 + r) * a.S + s] : T(0));
        ds = softmax_exp(score - row_lse[r]) * (gv[r] - row_D[r]);
      }
      wS[lane * R + r] = ds;
    }
    __syncwarp();
    accumulate_rows(wS, sK, td, dq);
    __syncwarp();
  }
  store_warp_rows(dq, scale, t0, a.T, D, gq + a.q_head(b, h), a.q_ld());
}

// dK, dV: the warp's key rows of one (b, kv head) against tiles of query rows (with their dO, lse and D_t), for
// each of the G query heads in order: dV = Σ p·dO, dK = scale·Σ dS·q.
template <typename T, int DPL>
__global__ void __launch_bounds__(kWarps * 32) flash_backward_dkv(const T* g, const T* q, const T* k, const T* v,
                                                                   const T* lse, const T* Dt, const T* mask,
                                                                   AttnShape a, bool causal, T scale, T* gk, T* gv) {
  constexpr int R = kRowsPerWarp;
  const TileDims td = tile_dims(a.D);
  const int64_t D = a.D, G = a.H / a.Hkv;
  T* sQ = dynamic_smem<T>();        // [kTile][ld] query rows of the tile
  T* sG = sQ + kTile * td.ld;       // [kTile][ld] their dO
  T* sK = sG + kTile * td.ld;       // [kWarps][R][D4] the block's key rows
  T* sV = sK + kBlockRows * td.D4;  // [kWarps][R][D4]
  T* sP = sV + kBlockRows * td.D4;  // [kWarps][kTile][R] p
  T* sS = sP + kBlockRows * kTile;  // [kWarps][kTile][R] dS
  T* sL = sS + kBlockRows * kTile;  // [kTile] lse of the tile's rows
  T* sD = sL + kTile;               // [kTile] D_t of the tile's rows
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bj = blockIdx.y, b = bj / a.Hkv, j_kv = bj % a.Hkv;
  const int64_t k0 = (int64_t)blockIdx.x * kBlockRows + warp * R;  // this warp's first key row
  T* wK = sK + warp * R * td.D4;
  T* wV = sV + warp * R * td.D4;
  T* wP = sP + warp * kTile * R;
  T* wS = sS + warp * kTile * R;
  load_warp_rows(k + a.kv_head(b, j_kv), a.kv_ld(), k0, a.S, td, wK);
  load_warp_rows(v + a.kv_head(b, j_kv), a.kv_ld(), k0, a.S, td, wV);
  T dk[R][DPL], dv[R][DPL];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < DPL; ++i) dk[r][i] = dv[r][i] = T(0);
  // Causal: query row t sees key s iff t >= s - (S - T), so the tiles before the first row that sees this
  // block's first key hold only zeros of P and dS; starting at that row's tile skips about half of the work at
  // T = S. Block-uniform, so the barriers inside the loop stay matched.
  const int64_t first_seer = (int64_t)blockIdx.x * kBlockRows - (a.S - a.T);
  const int64_t first_row = causal && first_seer > 0 ? first_seer : 0;
  const int64_t t_begin = first_row - first_row % kTile;
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t h = j_kv * G + gi, bh = b * a.H + h;
    const T* M = mask_block(mask, a, b, h);
    for (int64_t t0 = t_begin; t0 < a.T; t0 += kTile) {
      __syncthreads();
      load_tile(q + a.q_head(b, h), a.q_ld(), t0, a.T, td, sQ);
      load_tile(g + a.q_head(b, h), a.q_ld(), t0, a.T, td, sG);
      if (threadIdx.x < kTile) {
        const int64_t t = t0 + threadIdx.x;
        sL[threadIdx.x] = t < a.T ? lse[bh * a.T + t] : -d_inf<T>();
        sD[threadIdx.x] = t < a.T ? Dt[bh * a.T + t] : T(0);
      }
      __syncthreads();
      // None of this warp's keys is seen by a row of the tile (warp-uniform): the last row sees the most.
      if (k0 >= visible_keys(a, causal, min(a.T - 1, t0 + kTile - 1))) continue;
      const int64_t t = t0 + lane;
      const bool row_live = t < a.T && sL[lane] != -d_inf<T>();
      const int64_t row_vis = row_live ? visible_keys(a, causal, t) : 0;
      T qk[R], gv_dot[R];
      dot_rows(sQ + lane * td.ld, wK, td.D4, qk);
      dot_rows(sG + lane * td.ld, wV, td.D4, gv_dot);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t s = k0 + r;
        T p = T(0), ds = T(0);
        if (s < row_vis) {
          const T score = scale * qk[r] + (M ? M[t * a.S + s] : T(0));
          p = softmax_exp(score - sL[lane]);
          ds = p * (gv_dot[r] - sD[lane]);
        }
        wP[lane * R + r] = p;
        wS[lane * R + r] = ds;
      }
      __syncwarp();
      accumulate_rows(wP, sG, td, dv);
      accumulate_rows(wS, sQ, td, dk);
      __syncwarp();
    }
  }
  if (gk) store_warp_rows(dk, scale, k0, a.S, D, gk + a.kv_head(b, j_kv), a.kv_ld());
  if (gv) store_warp_rows(dv, T(1), k0, a.S, D, gv + a.kv_head(b, j_kv), a.kv_ld());
}

// ---- attention, "tiles" design (the default; AttentionKernel::tiles)
// Every product of the forward and backward is a small GEMM between two shared tiles whose rows hold the
// reduction dim contiguously ("NT" form: C[r][c] = Σ_u A[r][u]·B[c][u]): scores S = Q·Kᵀ (reduce over d),
// P·V as P·(Vᵀ)ᵀ, dP = dO·Vᵀ, dQ = dS·(Kᵀ)ᵀ, and in the key-side kernel Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, dV = Pᵀ·(dOᵀ)ᵀ,
// dK = dSᵀ·(Qᵀ)ᵀ. Operands that are needed with the other dim contiguous (V, K, Q, dO) are staged transposed
// once per tile as well.
//  Blocks: 128 threads on a tile of kTB = 32 own rows (query rows, or key rows in the dK/dV kernel); the other
//  side streams through in tiles of kTB rows. Thread (ty, tx) = (tid / 16, tid % 16) owns rows 4·ty + i (i < 4)
//  and columns tx + 16·j: 2 columns of a 32-wide score tile, TN of a DP-wide output (DP = 16·TN >= D, the head
//  dim padded with zeros). Per 4 steps of the reduction a thread loads 4 + NJ float4s and does 16·NJ FMAs (8 per
//  load at TN = 4), where the "rows" design loads one value per FMA or two.
//  Bank conflicts: a row of a tile is LD = DP + 4 (or kTB + 4) floats, 4 mod 8 float4s, so the 8 lanes of a
//  quarter-warp reading rows tx..tx+7 touch 8 distinct 16-byte bank groups, and the two row groups of a warp
//  (4·ty apart) read distinct banks too; score tiles are written one float per lane along a row (consecutive).
//  Row reductions (max, sum) run over the 16 lanes of a half-warp with shuffles; all sums in a fixed order.
//  Work skipped: a warp (8 own rows) sits out a tile none of its rows sees (past the last row, or hidden by
//  causality) but still stages and meets every barrier; the products over a last, partial tile stop after its
//  live rows (rounded up to 4); query tiles run last-first, so that under a causal mask the longest blocks
//  start first.
constexpr int kTB = 32, kTileThreads = 128;

template <int TN>
struct TileGeom {
  static constexpr int DP = 16 * TN, LD = DP + 4, LDT = kTB + 4;
};

// acc[i][j] += Σ_{u < K} A[i·lda + u]·B[16·j·ldb + u]: the thread's 4 rows of A against its NJ rows of B.
// Steps from k_end on are skipped: a last tile's reduction over its few live rows (where A holds zeros anyway).
template <typename T, int NJ, int K>
__device__ __forceinline__ void tile_nt(const T* A, int lda, const T* B, int ldb, T (&acc)[4][NJ], int k_end = K) {
#pragma unroll 4
  for (int u = 0; u < K; u += 4) {
    if (u >= k_end) break;
    T a[4][4], b[NJ][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) load4(A + i * lda + u, a[i]);
#pragma unroll
    for (int j = 0; j < NJ; ++j) load4(B + 16 * j * ldb + u, b[j]);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j)
        acc[i][j] += a[i][0] * b[j][0] + a[i][1] * b[j][1] + a[i][2] * b[j][2] + a[i][3] * b[j][3];
  }
}

// Rows [r0, r0 + kTB) of a [rows, D] matrix (row stride src_ld) as tile[r][d], r < kTB, d < DP (row stride ld);
// zeros past `rows` and D. Thread i takes column i % DP of rows i / DP + k·(kTileThreads / DP): coalesced reads,
// consecutive shared writes. The loop over k has a fixed trip count (the block is kTileThreads threads) and is
// unrolled, so a value costs a compare, a load and a store; as a loop over e += blockDim.x with e / DP, e % DP
// it took ~20 instructions a value, as much as the FMAs of the tile's products.
template <typename T, int DP>
__device__ __forceinline__ void stage_rows(const T* src, int64_t src_ld, int64_t r0, int64_t rows, int64_t D, int ld,
                                           T* tile) {
  constexpr int kRowsPerPass = kTileThreads / DP;
  const int r_first = threadIdx.x / DP, d = threadIdx.x % DP;
  const int64_t rows_left = d < D ? rows - r0 - r_first : 0;  // of this thread's column
  const T* at = src + (r0 + r_first) * src_ld + d;
  const int64_t step = kRowsPerPass * src_ld;
#pragma unroll
  for (int k = 0; k < kTB / kRowsPerPass; ++k, at += step)
    tile[(r_first + k * kRowsPerPass) * ld + d] = k * kRowsPerPass < rows_left ? *at : T(0);
}

// The same rows transposed, tileT[d][r] (row stride ldt), and, where `tile` is given, also as tile[r][d] (row
// stride ld) from the same read. Warp w takes the 4-row groups w and w + 4 and, in each, 8 consecutive d per
// step: a load reads 4 whole 32-byte sectors of global memory, and (f32) the transposed writes d·ldt + r
// (ldt = 4 mod 32) fall on 32 distinct banks. Unrolled as stage_rows.
template <typename T, int DP>
__device__ __forceinline__ void stage_cols(const T* src, int64_t src_ld, int64_t r0, int64_t rows, int64_t D, int ldt,
                                           T* tileT, int ld = 0, T* tile = nullptr) {
  static_assert(DP % 8 == 0 && kTileThreads == 128 && kTB == 32, "stage_cols: 4 warps, 8 groups of 4 rows");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r_first = 4 * warp + lane / 8, d_first = lane % 8;
  const int64_t rows_left = rows - r0 - r_first;
  const int cols_left = (int)D - d_first;
  const T* row = src + (r0 + r_first) * src_ld + d_first;
#pragma unroll
  for (int half = 0; half < 2; ++half, row += 16 * src_ld) {
    const int r = r_first + 16 * half;
    const bool live_row = 16 * half < rows_left;
#pragma unroll
    for (int octet = 0; octet < DP / 8; ++octet) {
      const int d = d_first + 8 * octet;
      const T x = live_row && 8 * octet < cols_left ? row[8 * octet] : T(0);
      tileT[d * ldt + r] = x;
      if (tile) tile[r * ld + d] = x;
    }
  }
}

// The reduction length of a tile's product over its rows [r0, r0 + kTB) of which rows before `end` are live,
// rounded up to tile_nt's step of 4.
__device__ __forceinline__ int live_steps(int64_t r0, int64_t end) {
  const int64_t n = end - r0 < kTB ? end - r0 : kTB;
  return (int)(n + 3) / 4 * 4;
}

// The block's first query row. Tiles run in reverse: under a causal mask later rows see more keys, so the
// longest blocks start first and the short ones fill the tail of the grid.
__device__ __forceinline__ int64_t query_tile_start() {
  return (int64_t)(gridDim.x - 1 - blockIdx.x) * kTB;
}

// The most keys any of the warp's 8 query rows t0 + 8·warp + i sees (0 for a warp past the last row).
__device__ __forceinline__ int64_t warp_visible_keys(const AttnShape& a, bool causal, int64_t t0) {
  const int64_t first = t0 + 8 * (threadIdx.x / 32);
  return first < a.T ? visible_keys(a, causal, min(a.T - 1, first + 7)) : 0;
}

// Max and sum over the 16 lanes of a half-warp (xor offsets below 16 stay inside it); every lane gets the result.
template <typename T>
__device__ __forceinline__ T half_warp_max(T v) {
  for (int o = 8; o > 0; o >>= 1) v = std_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename T>
__device__ __forceinline__ T half_warp_sum(T v) {
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Writes scale·acc as rows r0 + 4·ty + i, columns tx + 16·j of a [rows, D] matrix (row stride dst_ld).
template <typename T, int TN>
__device__ __forceinline__ void store_tile_rows(const T (&acc)[4][TN], T scale, int64_t r0, int64_t rows, int64_t D,
                                                T* dst, int64_t dst_ld) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + 4 * ty + i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j)
      if (tx + 16 * j < D) dst[r * dst_ld + tx + 16 * j] = scale * acc[i][j];
  }
}

// Forward. Shared: Q [kTB][LD] (the block's rows), K [kTB][LD], Vᵀ [DP][LDT], P [kTB][LDT]. The online softmax
// state of a row (running max m, the thread's part of the sum l, its TN output columns) is rescaled by
// exp(m_old - m_new) per key tile. Saves lse = m + log l.
template <typename T, int TN>
__global__ void __launch_bounds__(kTileThreads) tiles_forward(const T* q, const T* k, const T* v, const T* mask,
                                                              AttnShape a, bool causal, T scale, T* out, T* lse) {
  using Gm = TileGeom<TN>;
  constexpr int DP = Gm::DP, LD = Gm::LD, LDT = Gm::LDT;
  T* sQ = dynamic_smem<T>();
  T* sK = sQ + kTB * LD;
  T* sVt = sK + kTB * LD;
  T* sP = sVt + DP * LDT;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const auto [bh, b, h, K, V, M] = query_head(k, v, mask, a);
  const int64_t t0 = query_tile_start();
  const int64_t warp_vis = warp_visible_keys(a, causal, t0);
  stage_rows<T, DP>(q + a.q_head(b, h), a.q_ld(), t0, a.T, a.D, LD, sQ);
  int64_t vis[4];
  T m[4], l[4], o[4][TN];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t t = t0 + 4 * ty + i;
    vis[i] = t < a.T ? visible_keys(a, causal, t) : 0;
    m[i] = -d_inf<T>(), l[i] = T(0);
#pragma unroll
    for (int j = 0; j < TN; ++j) o[i][j] = T(0);
  }
  const int64_t block_vis = visible_keys(a, causal, min(a.T - 1, t0 + kTB - 1));  // the last row sees the most
  for (int64_t s0 = 0; s0 < block_vis; s0 += kTB) {
    __syncthreads();  // the previous tile is consumed (and sQ is written before its first use)
    stage_rows<T, DP>(K, a.kv_ld(), s0, a.S, a.D, LD, sK);
    stage_cols<T, DP>(V, a.kv_ld(), s0, a.S, a.D, LDT, sVt);
    __syncthreads();
    if (s0 >= warp_vis) continue;  // none of the warp's rows sees a key of the tile (warp-uniform)
    T s[4][2] = {};
    tile_nt<T, 2, DP>(sQ + 4 * ty * LD, LD, sK + tx * LD, LD, s);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t t = t0 + 4 * ty + i;
      T score[2], mx = -d_inf<T>();
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t key = s0 + tx + 16 * j;
        score[j] = key < vis[i] ? scale * s[i][j] + (M ? M[t * a.S + key] : T(0)) : -d_inf<T>();
        mx = std_max(mx, score[j]);
      }
      const T m_new = std_max(m[i], half_warp_max(mx));
      T p[2] = {T(0), T(0)}, corr = T(1);
      if (m_new != -d_inf<T>()) {
        corr = softmax_exp(m[i] - m_new);
#pragma unroll
        for (int j = 0; j < 2; ++j) p[j] = softmax_exp(score[j] - m_new);
      }
      l[i] = l[i] * corr + p[0] + p[1];
#pragma unroll
      for (int j = 0; j < TN; ++j) o[i][j] *= corr;
      m[i] = m_new;
#pragma unroll
      for (int j = 0; j < 2; ++j) sP[(4 * ty + i) * LDT + tx + 16 * j] = p[j];
    }
    __syncwarp();  // a row of P is written and read by the 16 lanes of one half-warp only
    tile_nt<T, TN, kTB>(sP + 4 * ty * LDT, LDT, sVt + tx * LDT, LDT, o, live_steps(s0, warp_vis));
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t t = t0 + 4 * ty + i;
    const T l_row = half_warp_sum(l[i]);
    const bool empty = l_row == T(0) || m[i] == -d_inf<T>();
    const T inv = empty ? T(0) : T(1) / l_row;
#pragma unroll
    for (int j = 0; j < TN; ++j) o[i][j] *= inv;
    if (tx == 0 && t < a.T) lse[bh * a.T + t] = empty ? -d_inf<T>() : m[i] + d_log(l_row);
  }
  store_tile_rows<T, TN>(o, T(1), t0, a.T, a.D, out + a.q_head(b, h), a.q_ld());
}

// dQ. Shared: Q, dO [kTB][LD] (the block's rows), K, V [kTB][LD], Kᵀ [DP][LDT], dS [kTB][LDT].
// p = exp(score - lse), dS = p·(dP - D_t) with dP = dO·Vᵀ, dQ = scale·dS·K.
template <typename T, int TN>
__global__ void __launch_bounds__(kTileThreads) tiles_backward_dq(const T* g, const T* q, const T* k, const T* v,
                                                                  const T* lse, const T* Dt, const T* mask,
                                                                  AttnShape a, bool causal, T scale, T* gq) {
  using Gm = TileGeom<TN>;
  constexpr int DP = Gm::DP, LD = Gm::LD, LDT = Gm::LDT;
  T* sQ = dynamic_smem<T>();
  T* sG = sQ + kTB * LD;
  T* sK = sG + kTB * LD;
  T* sV = sK + kTB * LD;
  T* sKt = sV + kTB * LD;
  T* sS = sKt + DP * LDT;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const auto [bh, b, h, K, V, M] = query_head(k, v, mask, a);
  const int64_t t0 = query_tile_start();
  const int64_t warp_vis = warp_visible_keys(a, causal, t0);
  stage_rows<T, DP>(q + a.q_head(b, h), a.q_ld(), t0, a.T, a.D, LD, sQ);
  stage_rows<T, DP>(g + a.q_head(b, h), a.q_ld(), t0, a.T, a.D, LD, sG);
  T row_lse[4], row_D[4], dq[4][TN];
  int64_t vis[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t t = t0 + 4 * ty + i;
    row_lse[i] = t < a.T ? lse[bh * a.T + t] : -d_inf<T>();
    row_D[i] = t < a.T ? Dt[bh * a.T + t] : T(0);
    vis[i] = t < a.T && row_lse[i] != -d_inf<T>() ? visible_keys(a, causal, t) : 0;  // a dead row: P = 0, dQ = 0
#pragma unroll
    for (int j = 0; j < TN; ++j) dq[i][j] = T(0);
  }
  const int64_t block_vis = visible_keys(a, causal, min(a.T - 1, t0 + kTB - 1));
  for (int64_t s0 = 0; s0 < block_vis; s0 += kTB) {
    __syncthreads();
    stage_cols<T, DP>(K, a.kv_ld(), s0, a.S, a.D, LDT, sKt, LD, sK);
    stage_rows<T, DP>(V, a.kv_ld(), s0, a.S, a.D, LD, sV);
    __syncthreads();
    if (s0 >= warp_vis) continue;
    T s[4][2] = {}, dp[4][2] = {};
    tile_nt<T, 2, DP>(sQ + 4 * ty * LD, LD, sK + tx * LD, LD, s);
    tile_nt<T, 2, DP>(sG + 4 * ty * LD, LD, sV + tx * LD, LD, dp);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t t = t0 + 4 * ty + i, key = s0 + tx + 16 * j;
        T ds = T(0);
        if (key < vis[i]) {
          const T score = scale * s[i][j] + (M ? M[t * a.S + key] : T(0));
          ds = softmax_exp(score - row_lse[i]) * (dp[i][j] - row_D[i]);
        }
        sS[(4 * ty + i) * LDT + tx + 16 * j] = ds;
      }
    __syncwarp();
    tile_nt<T, TN, kTB>(sS + 4 * ty * LDT, LDT, sKt + tx * LDT, LDT, dq, live_steps(s0, warp_vis));
  }
  store_tile_rows<T, TN>(dq, scale, t0, a.T, a.D, gq + a.q_head(b, h), a.q_ld());
}

// dK, dV of the block's key rows of one (b, kv head), against tiles of query rows of each of the G query heads in
// order. Shared: K, V [kTB][LD] (the block's rows), Q, dO [kTB][LD], Qᵀ, dOᵀ [DP][LDT], Pᵀ then dSᵀ [kTB][LDT],
// lse and D_t of the tile's rows. dV = Σ pᵀ·dO, dK = scale·Σ dSᵀ·Q.
// 3 blocks an SM at D = 64 in f32 (the shared memory allows 3): 170 registers, where the default bound spills.
template <typename T, int TN>
constexpr int dkv_min_blocks() { return std::is_same<T, float>::value && TN == 4 ? 3 : 1; }

template <typename T, int TN>
__global__ void __launch_bounds__(kTileThreads, dkv_min_blocks<T, TN>())
    tiles_backward_dkv(const T* g, const T* q, const T* k, const T* v, const T* lse, const T* Dt, const T* mask,
                       AttnShape a, bool causal, T scale, T* gk, T* gv) {
  using Gm = TileGeom<TN>;
  constexpr int DP = Gm::DP, LD = Gm::LD, LDT = Gm::LDT;
  T* sK = dynamic_smem<T>();
  T* sV = sK + kTB * LD;
  T* sQ = sV + kTB * LD;
  T* sG = sQ + kTB * LD;
  T* sQt = sG + kTB * LD;
  T* sGt = sQt + DP * LDT;
  T* sP = sGt + DP * LDT;
  T* sL = sP + kTB * LDT;
  T* sD = sL + kTB;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t bj = blockIdx.y, b = bj / a.Hkv, j_kv = bj % a.Hkv, G = a.H / a.Hkv;
  const int64_t k0 = (int64_t)blockIdx.x * kTB;
  stage_rows<T, DP>(k + a.kv_head(b, j_kv), a.kv_ld(), k0, a.S, a.D, LD, sK);
  stage_rows<T, DP>(v + a.kv_head(b, j_kv), a.kv_ld(), k0, a.S, a.D, LD, sV);
  T dk[4][TN], dv[4][TN];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) dk[i][j] = dv[i][j] = T(0);
  // Causal: query row t sees key s iff t >= s - (S - T); tiles before the first row that sees the block's first
  // key hold only zeros of P and dS. Block-uniform, so the barriers in the loop stay matched.
  const int64_t first_seer = k0 - (a.S - a.T);
  const int64_t first_row = causal && first_seer > 0 ? first_seer : 0;
  const int64_t t_begin = first_row - first_row % kTB;
  // The warp's key rows k0 + 8·warp + i: none live past S; under the mask, seen from row warp_first_seer on.
  const int64_t warp_k0 = k0 + 8 * (threadIdx.x / 32);
  const int64_t warp_first_seer = causal ? warp_k0 - (a.S - a.T) : 0;
  const bool warp_live = warp_k0 < a.S;
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t h = j_kv * G + gi, bh = b * a.H + h;
    const T* M = mask_block(mask, a, b, h);
    for (int64_t t0 = t_begin; t0 < a.T; t0 += kTB) {
      __syncthreads();
      stage_cols<T, DP>(q + a.q_head(b, h), a.q_ld(), t0, a.T, a.D, LDT, sQt, LD, sQ);
      stage_cols<T, DP>(g + a.q_head(b, h), a.q_ld(), t0, a.T, a.D, LDT, sGt, LD, sG);
      if (threadIdx.x < kTB) {
        const int64_t t = t0 + threadIdx.x;
        sL[threadIdx.x] = t < a.T ? lse[bh * a.T + t] : -d_inf<T>();
        sD[threadIdx.x] = t < a.T ? Dt[bh * a.T + t] : T(0);
      }
      __syncthreads();
      if (!warp_live || t0 + kTB <= warp_first_seer) continue;  // warp-uniform
      T st[4][2] = {}, dpt[4][2] = {};  // rows: the thread's keys; columns: queries tx, tx + 16 of the tile
      tile_nt<T, 2, DP>(sK + 4 * ty * LD, LD, sQ + tx * LD, LD, st);
      tile_nt<T, 2, DP>(sV + 4 * ty * LD, LD, sG + tx * LD, LD, dpt);
      T ds[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int tl = tx + 16 * j;
          const int64_t s = k0 + 4 * ty + i, t = t0 + tl;
          T p = T(0);
          ds[i][j] = T(0);
          if (t < a.T && sL[tl] != -d_inf<T>() && s < visible_keys(a, causal, t)) {
            p = softmax_exp(scale * st[i][j] + (M ? M[t * a.S + s] : T(0)) - sL[tl]);
            ds[i][j] = p * (dpt[i][j] - sD[tl]);
          }
          sP[(4 * ty + i) * LDT + tl] = p;
        }
      __syncwarp();
      const int live = live_steps(t0, a.T);
      tile_nt<T, TN, kTB>(sP + 4 * ty * LDT, LDT, sGt + tx * LDT, LDT, dv, live);
      __syncwarp();  // the half-warp has read its rows of Pᵀ before they become dSᵀ
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) sP[(4 * ty + i) * LDT + tx + 16 * j] = ds[i][j];
      __syncwarp();
      tile_nt<T, TN, kTB>(sP + 4 * ty * LDT, LDT, sQt + tx * LDT, LDT, dk, live);
    }
  }
  if (gk) store_tile_rows<T, TN>(dk, scale, k0, a.S, a.D, gk + a.kv_head(b, j_kv), a.kv_ld());
  if (gv) store_tile_rows<T, TN>(dv, T(1), k0, a.S, a.D, gv + a.kv_head(b, j_kv), a.kv_ld());
}

AttnShape shape_of(const Tensor& q, const Tensor& k, const Tensor& mask) {
  AttnShape a{q.size(0), q.size(2), k.size(2), q.size(1), k.size(1), q.size(3), 0, 1, 1};
  if (mask.defined()) {
    a.mask_rank = (int)mask.dim();
    if (mask.dim() == 4) a.mB = mask.size(0), a.mH = mask.size(1);
  }
  PSA_CHECK(a.D >= 1 && a.D <= kMaxAttentionHeadDim, "attention (cuda): head dim ", a.D, " outside [1, ",
            kMaxAttentionHeadDim, "]");
  PSA_CHECK(a.B * a.H <= 65535 && a.B * a.Hkv <= 65535, "attention (cuda): B·H = ", a.B * a.H, " exceeds the grid");
  return a;
}

// Launches kernel<T, DPL> with DPL = ceil(D / 32), opting in to more than 48 KiB of shared memory when needed.
template <typename T, typename F>
void with_dpl(int64_t D, F launch) {
  int dpl = (int)((D + 31) / 32);
  switch (dpl) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 3: launch(std::integral_constant<int, 3>{}); break;
    default: launch(std::integral_constant<int, 4>{}); break;
  }
}

// The opt-in is per kernel and stays set, so each kernel asks the driver once per larger size, not per launch.
template <typename K>
void allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<const void*, size_t> allowed;
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = allowed[reinterpret_cast<const void*>(kernel)];
  if (have >= bytes) return;
  cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  have = bytes;
}

}  // namespace

void rope(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out) {
  int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype(), "cuda rope", [&](auto tag_) {
    using S = typename decltype(tag_)::type;
    rope_kernel<S><<<blocks_for(n), kThreads, 0, stream()>>>(x.data<S>(), cos.data<S>(), sin.data<S>(), x.size(2),
                                                             x.size(1), x.size(3), n, S(1), out.data<S>());
    cudaCheckLaunch();
  });
}

void rope_backward(const Tensor& gout, const Tensor& cos, const Tensor& sin, Tensor& gx) {
  int64_t n = gout.numel();
  if (n == 0) return;
  dispatch_float(gout.dtype(), "cuda rope_backward", [&](auto tag_) {
    using S = typename decltype(tag_)::type;
    rope_kernel<S><<<blocks_for(n), kThreads, 0, stream()>>>(gout.data<S>(), cos.data<S>(), sin.data<S>(), gout.size(2),
                                                             gout.size(1), gout.size(3), n, S(-1), gx.data<S>());
    cudaCheckLaunch();
  });
}

namespace {

// Launches kernel<T, TN> with the head dim padded to DP = 16·TN in {16, 32, 64, 128}.
template <typename F>
void with_tn(int64_t D, F launch) {
  if (D <= 16) launch(std::integral_constant<int, 1>{});
  else if (D <= 32) launch(std::integral_constant<int, 2>{});
  else if (D <= 64) launch(std::integral_constant<int, 4>{});
  else launch(std::integral_constant<int, 8>{});
}

// Shared memory of the tiles kernels, in elements (the layouts at the top of each kernel).
template <int TN>
size_t tiles_smem(int natural_tiles, int transposed_tiles, int extra) {
  using Gm = TileGeom<TN>;
  return (size_t)natural_tiles * kTB * Gm::LD + (size_t)transposed_tiles * Gm::DP * Gm::LDT + (size_t)kTB * Gm::LDT +
         extra;
}

AttentionKernel initial_attention_kernel() {
  const char* e = std::getenv("PSA_ATTENTION");
  if (!e || !*e) return AttentionKernel::tiles;
  for (AttentionKernel k : kAttentionKernels)
    if (std::strcmp(e, attention_kernel_name(k)) == 0) return k;
  fail("PSA_ATTENTION=", e, ": unknown attention kernel (known: tiles, rows)");
}
AttentionKernel& selected_attention_kernel() {
  static AttentionKernel k = initial_attention_kernel();
  return k;
}

}  // namespace

void set_attention_kernel(AttentionKernel k) { selected_attention_kernel() = k; }
AttentionKernel attention_kernel() { return selected_attention_kernel(); }
const char* attention_kernel_name(AttentionKernel k) { return k == AttentionKernel::rows ? "rows" : "tiles"; }

void attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, bool causal, double scale,
               Tensor& out, Tensor& lse) {
  if (q.size(3) == 0) return;  // head dim 0: the output is empty (the CPU accepts it too)
  AttnShape a = shape_of(q, k, mask);
  if (a.B * a.H * a.T == 0) return;
  const bool tiles = attention_kernel() == AttentionKernel::tiles;
  dispatch_float(q.dtype(), "cuda attention", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    if (tiles) {
      with_tn(a.D, [&](auto tn) {
        constexpr int TN = decltype(tn)::value;
        const size_t smem = tiles_smem<TN>(2, 1, 0) * sizeof(T);  // Q, K; Vᵀ; P
        auto kernel = tiles_forward<T, TN>;
        allow_smem(kernel, smem);
        dim3 grid((unsigned)((a.T + kTB - 1) / kTB), (unsigned)(a.B * a.H));
        kernel<<<grid, kTileThreads, smem, stream()>>>(q.data<T>(), k.data<T>(), v.data<T>(), ptr_or_null<T>(mask),
                                                       a, causal, (T)scale, out.data<T>(), lse.data<T>());
        cudaCheckLaunch();
      });
      return;
    }
    const TileDims td = tile_dims(a.D);  // the kernel's shared arrays: K, V tiles; Q rows; P
    size_t smem = (2 * kTile * td.ld + kBlockRows * td.D4 + kBlockRows * kTile) * sizeof(T);
    dim3 grid((unsigned)((a.T + kBlockRows - 1) / kBlockRows), (unsigned)(a.B * a.H));
    with_dpl<T>(a.D, [&](auto dpl) {
      auto kernel = flash_forward<T, decltype(dpl)::value>;
      allow_smem(kernel, smem);
      kernel<<<grid, kWarps * 32, smem, stream()>>>(q.data<T>(), k.data<T>(), v.data<T>(), ptr_or_null<T>(mask), a,
                                                   causal, (T)scale, out.data<T>(), lse.data<T>());
      cudaCheckLaunch();
    });
  });
}

void attention_backward(const Tensor& gout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& mask, bool causal, double scale, Tensor& gq, Tensor& gk,
                        Tensor& gv) {
  if (q.size(3) == 0) return;  // every gradient is empty
  AttnShape a = shape_of(q, k, mask);
  const bool tiles = attention_kernel() == AttentionKernel::tiles;
  dispatch_float(q.dtype(), "cuda attention_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    int64_t rows = a.B * a.H * a.T;
    Tensor Dt = Tensor::empty({std::max<int64_t>(rows, 1)}, q.dtype(), Device::cuda);
    if (rows > 0) {
      rowsum_dot<T><<<blocks_for(rows * 32), kThreads, 0, stream()>>>(gout.data<T>(), out.data<T>(), a, Dt.data<T>());
      cudaCheckLaunch();
    }
    if (tiles) {
      with_tn(a.D, [&](auto tn) {
        constexpr int TN = decltype(tn)::value;
        if (gq.defined() && rows > 0) {
          const size_t smem = tiles_smem<TN>(4, 1, 0) * sizeof(T);  // Q, dO, K, V; Kᵀ; dS
          auto kernel = tiles_backward_dq<T, TN>;
          allow_smem(kernel, smem);
          dim3 grid((unsigned)((a.T + kTB - 1) / kTB), (unsigned)(a.B * a.H));
          kernel<<<grid, kTileThreads, smem, stream()>>>(gout.data<T>(), q.data<T>(), k.data<T>(), v.data<T>(),
                                                         lse.data<T>(), Dt.data<T>(), ptr_or_null<T>(mask), a, causal,
                                                         (T)scale, gq.data<T>());
          cudaCheckLaunch();
        }
        if ((gk.defined() || gv.defined()) && a.B * a.Hkv * a.S > 0) {
          const size_t smem = tiles_smem<TN>(4, 2, 2 * kTB) * sizeof(T);  // K, V, Q, dO; Qᵀ, dOᵀ; P; lse, D_t
          auto kernel = tiles_backward_dkv<T, TN>;
          allow_smem(kernel, smem);
          dim3 grid((unsigned)((a.S + kTB - 1) / kTB), (unsigned)(a.B * a.Hkv));
          kernel<<<grid, kTileThreads, smem, stream()>>>(gout.data<T>(), q.data<T>(), k.data<T>(), v.data<T>(),
                                                         lse.data<T>(), Dt.data<T>(), ptr_or_null<T>(mask), a, causal,
                                                         (T)scale, mut_or_null<T>(gk), mut_or_null<T>(gv));
          cudaCheckLaunch();
        }
      });
      return;
    }
    const TileDims td = tile_dims(a.D);
    with_dpl<T>(a.D, [&](auto dpl) {
      constexpr int DPL = decltype(dpl)::value;
      if (gq.defined() && rows > 0) {
        size_t smem = (2 * kTile * td.ld + 2 * kBlockRows * td.D4 + kBlockRows * kTile) * sizeof(T);  // K, V; Q, dO; dS
        auto kernel = flash_backward_dq<T, DPL>;
        allow_smem(kernel, smem);
        dim3 grid((unsigned)((a.T + kBlockRows - 1) / kBlockRows), (unsigned)(a.B * a.H));
        kernel<<<grid, kWarps * 32, smem, stream()>>>(gout.data<T>(), q.data<T>(), k.data<T>(), v.data<T>(),
                                                     lse.data<T>(), Dt.data<T>(), ptr_or_null<T>(mask), a, causal,
                                                     (T)scale, gq.data<T>());
        cudaCheckLaunch();
      }
      if ((gk.defined() || gv.defined()) && a.B * a.Hkv * a.S > 0) {
        // Q, dO tiles; K, V rows; P, dS; lse, D_t
        size_t smem = (2 * kTile * td.ld + 2 * kBlockRows * td.D4 + 2 * kBlockRows * kTile + 2 * kTile) * sizeof(T);
        auto kernel = flash_backward_dkv<T, DPL>;
        allow_smem(kernel, smem);
        dim3 grid((unsigned)((a.S + kBlockRows - 1) / kBlockRows), (unsigned)(a.B * a.Hkv));
        kernel<<<grid, kWarps * 32, smem, stream()>>>(gout.data<T>(), q.data<T>(), k.data<T>(), v.data<T>(),
                                                     lse.data<T>(), Dt.data<T>(), ptr_or_null<T>(mask), a, causal,
                                                     (T)scale, mut_or_null<T>(gk), mut_or_null<T>(gv));
        cudaCheckLaunch();
      }
    });
  });
}


}  // namespace psa::cuda
