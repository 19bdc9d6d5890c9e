// Rotary embeddings and flash-style scaled dot-product attention (the CPU versions: tensor/cpu/attention.cpp).
//
// rope: one thread per element, out = x·cos + rotate_half(x)·sin; backward gx = g·cos - rotate_half(g·sin).
//
// attention, q [B, H, T, D], k/v [B, Hkv, S, D], G = H / Hkv query heads per kv head, optional additive mask
// [T, S] or [B|1, H|1, T, S], causal hides s > t + S - T. No [T, S] matrix is ever stored:
//  forward   block = 8 warps = 8 consecutive query rows of one (b, h); K and V stream through shared memory in
//            tiles of 32 keys. Lane j scores key j of the tile (dot over D from shared memory), the warp keeps
//            the online-softmax state (running max m, running sum l, output row o spread over lanes as
//            d = lane + 32·i) and rescales it by exp(m_old - m_new) per tile. Saves lse = m + log l per row.
//  backward  D_t = rowsum(dO∘O) first. Then two kernels, so that nothing needs atomics:
//            dQ:     per query row (as the forward, K/V tiles): p = exp(s - lse), dS = p·(dO·v - D_t),
//                    dQ = scale·Σ dS·k.
//            dK, dV: block = 8 key rows of one (b, kv head); Q, dO, lse, D stream through shared memory in tiles
//                    of 32 query rows, for each of the G query heads in order; dV = Σ p·dO, dK = scale·Σ dS·q.
//            Every sum runs in a fixed order (lanes by shuffles in a fixed pattern, tiles in order), so results
//            are bitwise reproducible.
// Rows whose every key is hidden give zeros (lse = -inf), as on the CPU. Head dim D <= 128 (4 values a lane).
#include "tensor/cuda/common.cuh"

namespace psa::cuda {
namespace {

// ---- rope
template <typename S>
__global__ void rope_kernel(const S* x, const S* cos, const S* sin, int64_t T, int64_t D, int64_t n, S sign, S* out) {
  CUDA_LOOP(e, n) {
    int64_t d = e % D, t = (e / D) % T, half = D / 2;
    const S* c = cos + t * D;
    const S* s = sin + t * D;
    // forward (sign +1): y[d] = x[d]c[d] - x[d+h]s[d] (d < h), x[d]c[d] + x[d-h]s[d] (d >= h)
    // backward (sign -1): g[d]c[d] + g[d+h]s[d+h] (d < h), g[d]c[d] - g[d-h]s[d-h] (d >= h)
    if (sign > 0)
      out[e] = d < half ? x[e] * c[d] - x[e + half] * s[d] : x[e] * c[d] + x[e - half] * s[d];
    else
      out[e] = d < half ? x[e] * c[d] + x[e + half] * s[d + half] : x[e] * c[d] - x[e - half] * s[d - half];
  }
}

// ---- attention
constexpr int kRows = 8;   // query (or key) rows per block, one per warp
constexpr int kTile = 32;  // keys (or queries) per shared-memory tile, one per lane

struct AttnShape {
  int64_t B, H, Hkv, T, S, D;
  // mask: rank 0 (none), 2 ([T, S]) or 4 ([mB, mH, T, S])
  int mask_rank;
  int64_t mB, mH;
};

template <typename T>
__device__ __forceinline__ const T* mask_block(const T* mask, const AttnShape& a, int64_t b, int64_t h) {
  if (!mask) return nullptr;
  if (a.mask_rank == 2) return mask;
  int64_t mb = a.mB == 1 ? 0 : b, mh = a.mH == 1 ? 0 : h;
  return mask + (mb * a.mH + mh) * a.T * a.S;
}

// Keys [0, visible) are seen by query row t.
__device__ __forceinline__ int64_t visible_keys(const AttnShape& a, bool causal, int64_t t) {
  if (!causal) return a.S;
  int64_t v = t + a.S - a.T + 1;
  return v < 0 ? 0 : v > a.S ? a.S : v;
}

// Stages rows [r0, r0 + 32) of a [rows, D] matrix into a padded [32][D + 1] shared tile (zeros past `rows`).
template <typename T>
__device__ __forceinline__ void load_tile(const T* src, int64_t r0, int64_t rows, int64_t D, T* tile) {
  for (int64_t e = threadIdx.x; e < kTile * D; e += blockDim.x) {
    int64_t j = e / D, d = e % D;
    tile[j * (D + 1) + d] = r0 + j < rows ? src[(r0 + j) * D + d] : T(0);
  }
}

template <typename T>
__device__ __forceinline__ T dot_row(const T* a, const T* b, int64_t D) {
  T acc = T(0);
  for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

template <typename T, int DPL>
__global__ void flash_forward(const T* q, const T* k, const T* v, const T* mask, AttnShape a, bool causal, T scale,
                              T* out, T* lse) {
  const int64_t D = a.D, G = a.H / a.Hkv;
  T* sK = dynamic_smem<T>();  // [32][D+1]
  T* sV = sK + kTile * (D + 1);             // [32][D+1]
  T* sQ = sV + kTile * (D + 1);             // [8][D]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int64_t t = (int64_t)blockIdx.x * kRows + warp;
  const bool active = t < a.T;
  const T* K = k + (b * a.Hkv + h / G) * a.S * D;
  const T* V = v + (b * a.Hkv + h / G) * a.S * D;
  const T* M = mask_block(mask, a, b, h);
  if (active)
    for (int64_t d = lane; d < D; d += 32) sQ[warp * D + d] = q[(bh * a.T + t) * D + d];
  const int64_t vis = active ? visible_keys(a, causal, t) : 0;
  const int64_t t_last = min(a.T - 1, (int64_t)blockIdx.x * kRows + kRows - 1);
  const int64_t block_vis = visible_keys(a, causal, t_last);  // the last row sees the most keys
  T m = -d_inf<T>(), l = T(0), o[DPL];
#pragma unroll
  for (int i = 0; i < DPL; ++i) o[i] = T(0);
  for (int64_t s0 = 0; s0 < block_vis; s0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and sQ is written before its first use)
    load_tile(K, s0, a.S, D, sK);
    load_tile(V, s0, a.S, D, sV);
    __syncthreads();
    if (!active) continue;
    const int64_t s = s0 + lane;
    T score = -d_inf<T>();
    if (s < vis) {
      score = scale * dot_row(sQ + warp * D, sK + lane * (D + 1), D);
      if (M) score += M[t * a.S + s];
    }
    const T m_new = std_max(m, warp_max(score));
    if (m_new == -d_inf<T>()) continue;  // everything so far hidden (warp-uniform)
    const T p = d_exp(score - m_new), corr = d_exp(m - m_new);
    l = l * corr + warp_sum(p);
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[i] *= corr;
    for (int j = 0; j < kTile; ++j) {
      const T pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        int64_t d = lane + 32 * i;
        if (d < D) o[i] += pj * sV[j * (D + 1) + d];
      }
    }
    m = m_new;
  }
  if (!active) return;
  const bool empty = l == T(0) || m == -d_inf<T>();
  T inv = empty ? T(0) : T(1) / l;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    int64_t d = lane + 32 * i;
    if (d < D) out[(bh * a.T + t) * D + d] = o[i] * inv;
  }
  if (lane == 0) lse[bh * a.T + t] = empty ? -d_inf<T>() : m + d_log(l);
}

// D_t = Σ_d dO[t, d]·O[t, d], one warp per row.
template <typename T>
__global__ void rowsum_dot(const T* g, const T* o, int64_t rows, int64_t D, T* out) {
  int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  int lane = threadIdx.x % 32;
  if (r >= rows) return;
  T acc = T(0);
  for (int64_t d = lane; d < D; d += 32) acc += g[r * D + d] * o[r * D + d];
  acc = warp_sum(acc);
  if (lane == 0) out[r] = acc;
}

template <typename T, int DPL>
__global__ void flash_backward_dq(const T* g, const T* q, const T* k, const T* v, const T* lse, const T* Dt,
                                  const T* mask, AttnShape a, bool causal, T scale, T* gq) {
  const int64_t D = a.D, G = a.H / a.Hkv;
  T* sK = dynamic_smem<T>();  // [32][D+1]
  T* sV = sK + kTile * (D + 1);             // [32][D+1]
  T* sQ = sV + kTile * (D + 1);             // [8][D]
  T* sG = sQ + kRows * D;                   // [8][D]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int64_t t = (int64_t)blockIdx.x * kRows + warp;
  const bool active = t < a.T;
  const T* K = k + (b * a.Hkv + h / G) * a.S * D;
  const T* V = v + (b * a.Hkv + h / G) * a.S * D;
  const T* M = mask_block(mask, a, b, h);
  T row_lse = -d_inf<T>(), row_D = T(0);
  if (active) {
    for (int64_t d = lane; d < D; d += 32) {
      sQ[warp * D + d] = q[(bh * a.T + t) * D + d];
      sG[warp * D + d] = g[(bh * a.T + t) * D + d];
    }
    row_lse = lse[bh * a.T + t];
    row_D = Dt[bh * a.T + t];
  }
  const bool live = active && row_lse != -d_inf<T>();  // a fully hidden row has P = 0 and so dQ = 0
  const int64_t vis = active ? visible_keys(a, causal, t) : 0;
  const int64_t t_last = min(a.T - 1, (int64_t)blockIdx.x * kRows + kRows - 1);
  const int64_t block_vis = visible_keys(a, causal, t_last);
  T dq[DPL];
#pragma unroll
  for (int i = 0; i < DPL; ++i) dq[i] = T(0);
  for (int64_t s0 = 0; s0 < block_vis; s0 += kTile) {
    __syncthreads();
    load_tile(K, s0, a.S, D, sK);
    load_tile(V, s0, a.S, D, sV);
    __syncthreads();
    if (!live) continue;
    const int64_t s = s0 + lane;
    T ds = T(0);
    if (s < vis) {
      T score = scale * dot_row(sQ + warp * D, sK + lane * (D + 1), D);
      if (M) score += M[t * a.S + s];
      const T p = d_exp(score - row_lse);
      const T dp = dot_row(sG + warp * D, sV + lane * (D + 1), D);
      ds = p * (dp - row_D);
    }
    for (int j = 0; j < kTile; ++j) {
      const T dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        int64_t d = lane + 32 * i;
        if (d < D) dq[i] += dsj * sK[j * (D + 1) + d];
      }
    }
  }
  if (!active || !gq) return;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    int64_t d = lane + 32 * i;
    if (d < D) gq[(bh * a.T + t) * D + d] = scale * dq[i];
  }
}

template <typename T, int DPL>
__global__ void flash_backward_dkv(const T* g, const T* q, const T* k, const T* v, const T* lse, const T* Dt,
                                   const T* mask, AttnShape a, bool causal, T scale, T* gk, T* gv) {
  const int64_t D = a.D, G = a.H / a.Hkv;
  T* sQ = dynamic_smem<T>();  // [32][D+1] query rows of the tile
  T* sG = sQ + kTile * (D + 1);             // [32][D+1] their dO
  T* sK = sG + kTile * (D + 1);             // [8][D] this block's key rows
  T* sV = sK + kRows * D;                   // [8][D]
  T* sL = sV + kRows * D;                   // [32] lse of the tile's rows
  T* sD = sL + kTile;                       // [32] D_t of the tile's rows
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bj = blockIdx.y, b = bj / a.Hkv, j_kv = bj % a.Hkv;
  const int64_t s = (int64_t)blockIdx.x * kRows + warp;
  const bool active = s < a.S;
  if (active)
    for (int64_t d = lane; d < D; d += 32) {
      sK[warp * D + d] = k[(bj * a.S + s) * D + d];
      sV[warp * D + d] = v[(bj * a.S + s) * D + d];
    }
  T dk[DPL], dv[DPL];
#pragma unroll
  for (int i = 0; i < DPL; ++i) dk[i] = dv[i] = T(0);
  // Causal: query row t sees key s iff t >= s - (S - T), so the tiles before the first row that sees this
  // block's first key hold only zeros of P and dS; starting at that row's tile skips about half of the work at
  // T = S. Block-uniform, so the barriers inside the loop stay matched.
  const int64_t first_seer = (int64_t)blockIdx.x * kRows - (a.S - a.T);
  const int64_t first_row = causal && first_seer > 0 ? first_seer : 0;
  const int64_t t_begin = first_row - first_row % kTile;
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t h = j_kv * G + gi, bh = b * a.H + h;
    const T* M = mask_block(mask, a, b, h);
    for (int64_t t0 = t_begin; t0 < a.T; t0 += kTile) {
      __syncthreads();
      load_tile(q + bh * a.T * D, t0, a.T, D, sQ);
      load_tile(g + bh * a.T * D, t0, a.T, D, sG);
      if (threadIdx.x < kTile) {
        int64_t t = t0 + threadIdx.x;
        sL[threadIdx.x] = t < a.T ? lse[bh * a.T + t] : -d_inf<T>();
        sD[threadIdx.x] = t < a.T ? Dt[bh * a.T + t] : T(0);
      }
      __syncthreads();
      if (!active) continue;
      const int64_t t = t0 + lane;
      T p = T(0), ds = T(0);
      if (t < a.T && s < visible_keys(a, causal, t) && sL[lane] != -d_inf<T>()) {
        T score = scale * dot_row(sQ + lane * (D + 1), sK + warp * D, D);
        if (M) score += M[t * a.S + s];
        p = d_exp(score - sL[lane]);
        const T dp = dot_row(sG + lane * (D + 1), sV + warp * D, D);
        ds = p * (dp - sD[lane]);
      }
      for (int jj = 0; jj < kTile; ++jj) {
        const T pj = __shfl_sync(0xffffffffu, p, jj), dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          int64_t d = lane + 32 * i;
          if (d < D) {
            dv[i] += pj * sG[jj * (D + 1) + d];
            dk[i] += dsj * sQ[jj * (D + 1) + d];
          }
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    int64_t d = lane + 32 * i;
    if (d >= D) continue;
    if (gk) gk[(bj * a.S + s) * D + d] = scale * dk[i];
    if (gv) gv[(bj * a.S + s) * D + d] = dv[i];
  }
}

AttnShape shape_of(const Tensor& q, const Tensor& k, const Tensor& mask) {
  AttnShape a{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0, 1, 1};
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

template <typename K>
void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

}  // namespace

void rope(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out) {
  int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype(), "cuda rope", [&](auto tag_) {
    using S = typename decltype(tag_)::type;
    rope_kernel<S><<<blocks_for(n), kThreads, 0, stream()>>>(x.data<S>(), cos.data<S>(), sin.data<S>(), x.size(2),
                                                             x.size(3), n, S(1), out.data<S>());
    cudaCheckLaunch();
  });
}

void rope_backward(const Tensor& gout, const Tensor& cos, const Tensor& sin, Tensor& gx) {
  int64_t n = gout.numel();
  if (n == 0) return;
  dispatch_float(gout.dtype(), "cuda rope_backward", [&](auto tag_) {
    using S = typename decltype(tag_)::type;
    rope_kernel<S><<<blocks_for(n), kThreads, 0, stream()>>>(gout.data<S>(), cos.data<S>(), sin.data<S>(), gout.size(2),
                                                             gout.size(3), n, S(-1), gx.data<S>());
    cudaCheckLaunch();
  });
}

void attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, bool causal, double scale,
               Tensor& out, Tensor& lse) {
  if (q.size(3) == 0) return;  // head dim 0: the output is empty (the CPU accepts it too)
  AttnShape a = shape_of(q, k, mask);
  if (a.B * a.H * a.T == 0) return;
  dispatch_float(q.dtype(), "cuda attention", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    size_t smem = (2 * kTile * (a.D + 1) + kRows * a.D) * sizeof(T);
    dim3 grid((unsigned)((a.T + kRows - 1) / kRows), (unsigned)(a.B * a.H));
    with_dpl<T>(a.D, [&](auto dpl) {
      auto kernel = flash_forward<T, decltype(dpl)::value>;
      allow_smem(kernel, smem);
      kernel<<<grid, kRows * 32, smem, stream()>>>(q.data<T>(), k.data<T>(), v.data<T>(), ptr_or_null<T>(mask), a,
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
  dispatch_float(q.dtype(), "cuda attention_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    int64_t rows = a.B * a.H * a.T;
    Tensor Dt = Tensor::empty({std::max<int64_t>(rows, 1)}, q.dtype(), Device::cuda);
    if (rows > 0) {
      rowsum_dot<T>
          <<<blocks_for(rows * 32), kThreads, 0, stream()>>>(gout.data<T>(), out.data<T>(), rows, a.D, Dt.data<T>());
      cudaCheckLaunch();
    }
    with_dpl<T>(a.D, [&](auto dpl) {
      constexpr int DPL = decltype(dpl)::value;
      if (gq.defined() && rows > 0) {
        size_t smem = (2 * kTile * (a.D + 1) + 2 * kRows * a.D) * sizeof(T);
        auto kernel = flash_backward_dq<T, DPL>;
        allow_smem(kernel, smem);
        dim3 grid((unsigned)((a.T + kRows - 1) / kRows), (unsigned)(a.B * a.H));
        kernel<<<grid, kRows * 32, smem, stream()>>>(gout.data<T>(), q.data<T>(), k.data<T>(), v.data<T>(),
                                                     lse.data<T>(), Dt.data<T>(), ptr_or_null<T>(mask), a, causal,
                                                     (T)scale, gq.data<T>());
        cudaCheckLaunch();
      }
      if ((gk.defined() || gv.defined()) && a.B * a.Hkv * a.S > 0) {
        size_t smem = (2 * kTile * (a.D + 1) + 2 * kRows * a.D + 2 * kTile) * sizeof(T);
        auto kernel = flash_backward_dkv<T, DPL>;
        allow_smem(kernel, smem);
        dim3 grid((unsigned)((a.S + kRows - 1) / kRows), (unsigned)(a.B * a.Hkv));
        kernel<<<grid, kRows * 32, smem, stream()>>>(gout.data<T>(), q.data<T>(), k.data<T>(), v.data<T>(),
                                                     lse.data<T>(), Dt.data<T>(), ptr_or_null<T>(mask), a, causal,
                                                     (T)scale, mut_or_null<T>(gk), mut_or_null<T>(gv));
        cudaCheckLaunch();
      }
    });
  });
}

}  // namespace psa::cuda
