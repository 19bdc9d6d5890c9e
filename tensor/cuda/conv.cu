// Convolutions and pooling of the vision side (mirrors tensor/cpu/conv.cpp).
// patch_conv (kernel = stride = p, NCHW): im2col is a pure rearrangement, one thread per element, into
// cols [B, L, K = C·p·p]; then one strided-batched GEMM out_b [O, L] = w [O, K]·cols_bᵀ and a bias kernel.
// Backward: gbias by one block per output channel (fixed-order tree), gw = Σ_b g_b·cols_b as B GEMMs
// accumulating with beta = 1 in batch order, gcols_b = g_bᵀ·w then col2im (again a pure rearrangement).
// depthwise_conv3x3 / adaptive_avg_pool2d on channels-last [B, H, W, C]: one thread per output element, c
// fastest so neighbouring threads read neighbouring channels. The depthwise weight gradient and the pooling
// backward gather rather than scatter (no atomics): gw via double partials over row chunks summed in order.
#include "tensor/cuda/common.cuh"

namespace psa::cuda {
namespace {

// cols[b, i·Wp + j, (c·p + ky)·p + kx] = x[b, c, i·p + ky, j·p + kx]; one thread per cols element.
template <typename X>
__global__ void rearrange_patches(PatchDims d, X* x, X* cols, bool to_cols) {
  CUDA_LOOP(e, d.B * d.L * d.K) {
    int64_t kk = e % d.K, l = (e / d.K) % d.L, b = e / (d.K * d.L);
    int64_t kx = kk % d.p, ky = (kk / d.p) % d.p, c = kk / (d.p * d.p), i = l / d.Wp, j = l % d.Wp;
    int64_t xi = ((b * d.C + c) * d.H + i * d.p + ky) * d.W + j * d.p + kx;
    if (to_cols) cols[e] = x[xi];
    else x[xi] = cols[e];
  }
}

template <typename X>
__global__ void add_channel_bias(X* out, const X* bias, int64_t O, int64_t L, int64_t n) {
  CUDA_LOOP(e, n) out[e] += bias[(e / L) % O];
}

// gbias[o] = Σ_{b, l} g[b, o, l]: one block per o.
template <typename X>
__global__ void channel_sums(const X* g, int64_t B, int64_t O, int64_t L, X* out) {
  __shared__ double scratch[kThreads];
  int64_t o = blockIdx.x;
  double s = 0;
  for (int64_t e = threadIdx.x; e < B * L; e += blockDim.x) s += (double)g[((e / L) * O + o) * L + e % L];
  double total = block_sum(s, scratch);
  if (threadIdx.x == 0) out[o] = (X)total;
}

template <typename X>
void gemm_any(bool ta, bool tb, int64_t M, int64_t N, int64_t K, X alpha, const X* A, int64_t lda, int64_t sa,
              const X* B, int64_t ldb, int64_t sb, X beta, X* C, int64_t ldc, int64_t sc, int64_t batch) {
  if constexpr (std::is_same<X, float>::value)
    sgemm(gemm_impl(), ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
  else
    dgemm(ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
}

// out[b,y,x,c] = Σ_{ky,kx} src[b, y + sign·(ky-1), x + sign·(kx-1), c]·w[c, ky, kx] (sign -1: the transpose).
template <typename X>
__global__ void conv3x3_kernel(const X* src, const X* w, int64_t B, int64_t H, int64_t W, int64_t C, int sign, X* dst) {
  CUDA_LOOP(e, B * H * W * C) {
    int64_t c = e % C, x = (e / C) % W, y = (e / (C * W)) % H, b = e / (C * W * H);
    X acc = X(0);
    for (int ky = 0; ky < 3; ++ky) {
      int64_t yy = y + sign * (ky - 1);
      if (yy < 0 || yy >= H) continue;
      for (int kx = 0; kx < 3; ++kx) {
        int64_t xx = x + sign * (kx - 1);
        if (xx < 0 || xx >= W) continue;
        acc += src[((b * H + yy) * W + xx) * C + c] * w[c * 9 + ky * 3 + kx];
      }
    }
    dst[e] = acc;
  }
}

// part[chunk, k·C + c] = Σ over rows (b, y) of the chunk, all x, of g[b,y,x,c]·x[b, y+ky-1, x+kx-1, c].
constexpr int64_t kRowChunk = 16;
template <typename X>
__global__ void depthwise_gw_partials(const X* g, const X* in, int64_t B, int64_t H, int64_t W, int64_t C,
                                      double* part) {
  int64_t chunk = blockIdx.y, rows = B * H;
  CUDA_LOOP(kc, 9 * C) {
    int64_t k = kc / C, c = kc % C, dy = k / 3 - 1, dx = k % 3 - 1;
    double s = 0;
    for (int64_t by = chunk * kRowChunk; by < min(rows, (chunk + 1) * kRowChunk); ++by) {
      int64_t b = by / H, y = by % H, yy = y + dy;
      if (yy < 0 || yy >= H) continue;
      for (int64_t x = 0; x < W; ++x) {
        int64_t xx = x + dx;
        if (xx < 0 || xx >= W) continue;
        s += g[(by * W + x) * C + c] * in[((b * H + yy) * W + xx) * C + c];
      }
    }
    part[chunk * 9 * C + kc] = s;
  }
}

template <typename X>
__global__ void depthwise_gw_finish(const double* part, int64_t chunks, int64_t C, X* gw) {
  CUDA_LOOP(kc, 9 * C) {
    double s = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) s += part[ch * 9 * C + kc];
    int64_t k = kc / C, c = kc % C;
    gw[c * 9 + k] = (X)s;
  }
}

// torch's adaptive bins: output i averages inputs [floor(i·in/out), ceil((i+1)·in/out)).
__device__ __forceinline__ int64_t bin_start(int64_t i, int64_t in, int64_t out) { return i * in / out; }
__device__ __forceinline__ int64_t bin_end(int64_t i, int64_t in, int64_t out) { return ((i + 1) * in + out - 1) / out; }

template <typename X>
__global__ void pool_kernel(const X* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW, X* out) {
  CUDA_LOOP(e, B * OH * OW * C) {
    int64_t c = e % C, j = (e / C) % OW, i = (e / (C * OW)) % OH, b = e / (C * OW * OH);
    int64_t y0 = bin_start(i, H, OH), y1 = bin_end(i, H, OH), x0 = bin_start(j, W, OW), x1 = bin_end(j, W, OW);
    double acc = 0;
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t xx = x0; xx < x1; ++xx) acc += x[((b * H + y) * W + xx) * C + c];
    out[e] = (X)(acc * (1.0 / ((y1 - y0) * (x1 - x0))));
  }
}

// gx[b,y,x,c] = Σ over the bins (i, j) containing (y, x) of g[b,i,j,c] / |bin|, bins in increasing order.
template <typename X>
__global__ void pool_backward_kernel(const X* g, int64_t B, int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW,
                                     X* gx) {
  CUDA_LOOP(e, B * H * W * C) {
    int64_t c = e % C, x = (e / C) % W, y = (e / (C * W)) % H, b = e / (C * W * H);
    X acc = X(0);
    for (int64_t i = 0; i < OH; ++i) {
      int64_t y0 = bin_start(i, H, OH), y1 = bin_end(i, H, OH);
      if (y < y0 || y >= y1) continue;
      for (int64_t j = 0; j < OW; ++j) {
        int64_t x0 = bin_start(j, W, OW), x1 = bin_end(j, W, OW);
        if (x < x0 || x >= x1) continue;
        X inv = X(1) / X((y1 - y0) * (x1 - x0));
        acc += g[((b * OH + i) * OW + j) * C + c] * inv;
      }
    }
    gx[e] = acc;
  }
}

}  // namespace

void patch_conv(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) {
  PatchDims d = patch_dims(x, w);
  int64_t O = w.size(0), n_cols = d.B * d.L * d.K;
  if (out.numel() == 0) return;
  dispatch_float(x.dtype(), "cuda patch_conv", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    Tensor cols = Tensor::empty({std::max<int64_t>(n_cols, 1)}, x.dtype(), Device::cuda);
    rearrange_patches<X>
        <<<blocks_for(n_cols), kThreads, 0, stream()>>>(d, const_cast<X*>(x.data<X>()), cols.data<X>(), true);
    cudaCheckLaunch();
    gemm_any<X>(false, true, O, d.L, d.K, X(1), w.data<X>(), std::max<int64_t>(d.K, 1), 0, cols.data<X>(),
                std::max<int64_t>(d.K, 1), d.L * d.K, X(0), out.data<X>(), d.L, O * d.L, d.B);
    if (!bias.defined()) return;
    add_channel_bias<X>
        <<<blocks_for(out.numel()), kThreads, 0, stream()>>>(out.data<X>(), bias.data<X>(), O, d.L, out.numel());
    cudaCheckLaunch();
  });
}

void patch_conv_backward(const Tensor& gout, const Tensor& x, const Tensor& w, Tensor& gx, Tensor& gw, Tensor& gbias) {
  PatchDims d = patch_dims(x, w);
  int64_t O = w.size(0), n_cols = d.B * d.L * d.K;
  dispatch_float(x.dtype(), "cuda patch_conv_backward", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    const X* pg = gout.data<X>();
    if (gbias.defined() && O > 0) {
      channel_sums<X><<<(unsigned)O, kThreads, 0, stream()>>>(pg, d.B, O, d.L, gbias.data<X>());
      cudaCheckLaunch();
    }
    Tensor cols = Tensor::empty({std::max<int64_t>(n_cols, 1)}, x.dtype(), Device::cuda);
    if (gw.defined()) {
      if (d.B == 0 || d.L == 0) {
        gpu::memset_zero(gw.raw(), gw.nbytes());
      } else {
        rearrange_patches<X>
            <<<blocks_for(n_cols), kThreads, 0, stream()>>>(d, const_cast<X*>(x.data<X>()), cols.data<X>(), true);
        cudaCheckLaunch();
        for (int64_t b = 0; b < d.B; ++b)
          gemm_any<X>(false, false, O, d.K, d.L, X(1), pg + b * O * d.L, d.L, 0, cols.data<X>() + b * d.L * d.K, d.K,
                      0, b ? X(1) : X(0), gw.data<X>(), d.K, 0, 1);
      }
    }
    if (gx.defined() && gx.numel() > 0) {
      gemm_any<X>(true, false, d.L, d.K, O, X(1), pg, std::max<int64_t>(d.L, 1), O * d.L, w.data<X>(),
                  std::max<int64_t>(d.K, 1), 0, X(0), cols.data<X>(), d.K, d.L * d.K, d.B);
      rearrange_patches<X><<<blocks_for(n_cols), kThreads, 0, stream()>>>(d, gx.data<X>(), cols.data<X>(), false);
      cudaCheckLaunch();
    }
  });
}

void depthwise_conv3x3(const Tensor& x, const Tensor& w, Tensor& out) {
  int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  if (out.numel() == 0) return;
  dispatch_float(x.dtype(), "cuda depthwise_conv3x3", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    conv3x3_kernel<X>
        <<<blocks_for(out.numel()), kThreads, 0, stream()>>>(x.data<X>(), w.data<X>(), B, H, W, C, +1, out.data<X>());
    cudaCheckLaunch();
  });
}

void depthwise_conv3x3_backward(const Tensor& gout, const Tensor& x, const Tensor& w, Tensor& gx, Tensor& gw) {
  int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  dispatch_float(x.dtype(), "cuda depthwise_conv3x3_backward", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    if (gx.defined() && gx.numel() > 0) {
      conv3x3_kernel<X><<<blocks_for(gx.numel()), kThreads, 0, stream()>>>(gout.data<X>(), w.data<X>(), B, H, W, C, -1,
                                                                           gx.data<X>());
      cudaCheckLaunch();
    }
    if (!gw.defined() || C == 0) return;
    int64_t chunks = std::max<int64_t>(1, (B * H + kRowChunk - 1) / kRowChunk);
    PSA_CHECK(chunks <= 65535, "depthwise_conv3x3_backward (cuda): ", B * H, " rows exceed the chunk grid");
    Tensor part = Tensor::empty({chunks, 9 * C}, DType::f64, Device::cuda);
    dim3 grid(blocks_for(9 * C), (unsigned)chunks);
    depthwise_gw_partials<X>
        <<<grid, kThreads, 0, stream()>>>(gout.data<X>(), x.data<X>(), B, H, W, C, part.data<double>());
    cudaCheckLaunch();
    depthwise_gw_finish<X><<<blocks_for(9 * C), kThreads, 0, stream()>>>(part.data<double>(), chunks, C, gw.data<X>());
    cudaCheckLaunch();
  });
}

void adaptive_avg_pool2d(const Tensor& x, Tensor& out) {
  if (out.numel() == 0) return;
  dispatch_float(x.dtype(), "cuda adaptive_avg_pool2d", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    pool_kernel<X><<<blocks_for(out.numel()), kThreads, 0, stream()>>>(
        x.data<X>(), x.size(0), x.size(1), x.size(2), x.size(3), out.size(1), out.size(2), out.data<X>());
    cudaCheckLaunch();
  });
}

void adaptive_avg_pool2d_backward(const Tensor& gout, Tensor& gx) {
  if (gx.numel() == 0) return;
  dispatch_float(gx.dtype(), "cuda adaptive_avg_pool2d_backward", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    pool_backward_kernel<X><<<blocks_for(gx.numel()), kThreads, 0, stream()>>>(
        gout.data<X>(), gx.size(0), gx.size(1), gx.size(2), gx.size(3), gout.size(1), gout.size(2), gx.data<X>());
    cudaCheckLaunch();
  });
}

}  // namespace psa::cuda
