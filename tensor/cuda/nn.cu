// Row-wise kernels (mirrors tensor/cpu/nn.cpp): layer_norm, rms_norm, (log_)softmax, fused softmax +
// cross-entropy, dropout; one fused kernel forward and one backward each.
// Parallelisation: one block per row; the row's sums are per-thread partials combined by a fixed-order tree
// (block_sum), in double like the CPU. Weight gradients (Σ over rows) are two passes without atomics: a grid
// of (column, chunk of kRowChunk rows) writes double partials, then one thread per column adds its chunks in
// order. Results are therefore reproducible run to run.
#include "tensor/cuda/common.cuh"
#include "tensor/rng.h"

namespace psa::cuda {
namespace {

constexpr int kRowChunk = 64;

// Threads per row block: a power of two, no more than the row needs.
int row_threads(int64_t n) { return n >= 1024 ? 256 : n >= 128 ? 128 : 32; }

// ---- layer_norm: y = (x - mean)·rstd·w + b; saves mean and rstd per row.
template <typename T>
__global__ void layer_norm_kernel(const T* x, const T* w, const T* b, double eps, int64_t C, T* y, T* mean, T* rstd) {
  __shared__ double scratch[256];
  int64_t r = blockIdx.x;
  const T* xr = x + r * C;
  double s = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += (double)xr[c];
  double mu = block_sum(s, scratch) / C;
  double sq = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) sq += ((double)xr[c] - mu) * ((double)xr[c] - mu);
  sq = block_sum(sq, scratch);
  T m = (T)mu, rs = (T)(1.0 / sqrt(sq / C + eps));
  if (threadIdx.x == 0) mean[r] = m, rstd[r] = rs;
  T* yr = y + r * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) yr[c] = (xr[c] - m) * rs * (w ? w[c] : T(1)) + (b ? b[c] : T(0));
}

// gx = rstd·(gxhat - mean(gxhat) - xhat·mean(gxhat·xhat)) per row.
template <typename T>
__global__ void layer_norm_gx(const T* g, const T* x, const T* w, const T* mean, const T* rstd, int64_t C, T* gx) {
  __shared__ double scratch[256];
  int64_t r = blockIdx.x;
  const T *gr = g + r * C, *xr = x + r * C;
  T m = mean[r], rs = rstd[r];
  double s1 = 0, s2 = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    T xhat = (xr[c] - m) * rs, gxhat = gr[c] * (w ? w[c] : T(1));
    s1 += gxhat;
    s2 += gxhat * xhat;
  }
  T mean_g = (T)(block_sum(s1, scratch) / C), mean_gx = (T)(block_sum(s2, scratch) / C);
  T* out = gx + r * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    T xhat = (xr[c] - m) * rs, gxhat = gr[c] * (w ? w[c] : T(1));
    out[c] = rs * (gxhat - mean_g - xhat * mean_gx);
  }
}

// Column partial sums over row chunks: part_w[chunk, c] = Σ g·xhat, part_b[chunk, c] = Σ g. `mean` null = RMS.
template <typename T>
__global__ void norm_param_partials(const T* g, const T* x, const T* mean, const T* rstd, int64_t rows, int64_t C,
                                    double* part_w, double* part_b) {
  int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
  if (c >= C) return;
  int64_t r0 = chunk * kRowChunk, r1 = min(rows, r0 + kRowChunk);
  double sw = 0, sb = 0;
  for (int64_t r = r0; r < r1; ++r) {
    T xhat = mean ? (x[r * C + c] - mean[r]) * rstd[r] : x[r * C + c] * rstd[r];
    sw += g[r * C + c] * xhat;
    sb += g[r * C + c];
  }
  if (part_w) part_w[chunk * C + c] = sw;
  if (part_b) part_b[chunk * C + c] = sb;
}

template <typename T>
void norm_param_grads(const Tensor& g, const Tensor& x, const T* mean, const T* rstd, int64_t rows, int64_t C,
                      Tensor& gw, Tensor& gb) {
  if (!gw.defined() && !gb.defined()) return;
  int64_t chunks = std::max<int64_t>(1, (rows + kRowChunk - 1) / kRowChunk);
  Tensor pw = gw.defined() ? Tensor::empty({chunks, C}, DType::f64, Device::cuda) : Tensor();
  Tensor pb = gb.defined() ? Tensor::empty({chunks, C}, DType::f64, Device::cuda) : Tensor();
  PSA_CHECK(chunks <= 65535, "cuda norm backward: ", rows, " rows exceed the chunk grid");
  dim3 grid((unsigned)((C + 127) / 128), (unsigned)chunks);
  norm_param_partials<T><<<grid, 128, 0, stream()>>>(g.data<T>(), x.data<T>(), mean, rstd, rows, C,
                                                     mut_or_null<double>(pw), mut_or_null<double>(pb));
  cudaCheckLaunch();
  // One cudaCheckLaunch per launch: it also counts the launch (gpu::launches, bench-step's launches per step).
  if (gw.defined()) {
    sum_chunks<T><<<blocks_for(C), kThreads, 0, stream()>>>(pw.data<double>(), chunks, C, gw.data<T>());
    cudaCheckLaunch();
  }
  if (gb.defined()) {
    sum_chunks<T><<<blocks_for(C), kThreads, 0, stream()>>>(pb.data<double>(), chunks, C, gb.data<T>());
    cudaCheckLaunch();
  }
}

// ---- rms_norm: y = x·rstd·w, rstd = 1/sqrt(mean(x²) + eps).
template <typename T>
__global__ void rms_norm_kernel(const T* x, const T* w, double eps, int64_t C, T* y, T* rstd) {
  __shared__ double scratch[256];
  int64_t r = blockIdx.x;
  const T* xr = x + r * C;
  double sq = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) sq += (double)xr[c] * xr[c];
  sq = block_sum(sq, scratch);
  T rs = (T)(1.0 / sqrt(sq / C + eps));
  if (threadIdx.x == 0) rstd[r] = rs;
  T* yr = y + r * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) yr[c] = xr[c] * rs * (w ? w[c] : T(1));
}

// gx = rstd·(gxhat - xhat·mean(gxhat·xhat)).
template <typename T>
__global__ void rms_norm_gx(const T* g, const T* x, const T* w, const T* rstd, int64_t C, T* gx) {
  __shared__ double scratch[256];
  int64_t r = blockIdx.x;
  const T *gr = g + r * C, *xr = x + r * C;
  T rs = rstd[r];
  double s = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += gr[c] * (w ? w[c] : T(1)) * (xr[c] * rs);
  T mean_gx = (T)(block_sum(s, scratch) / C);
  T* out = gx + r * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) out[c] = rs * (gr[c] * (w ? w[c] : T(1)) - xr[c] * rs * mean_gx);
}

// ---- softmax over the middle dim of [outer, n, inner]: block per row (o, j), elements `inner` apart.
template <typename T>
__global__ void softmax_kernel(const T* x, T* y, int64_t n, int64_t inner, bool log) {
  __shared__ double scratch[256];
  __shared__ T tscratch[256];
  int64_t r = blockIdx.x, base = (r / inner) * n * inner + r % inner;
  const T* xr = x + base;
  T* yr = y + base;
  T mx = -d_inf<T>();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) mx = std_max(mx, xr[i * inner]);
  mx = block_max(mx, tscratch);
  if (mx == -d_inf<T>()) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i * inner] = log ? mx : T(0);
    return;
  }
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += (double)d_exp(xr[i * inner] - mx);
  double sum = block_sum(s, scratch);
  if (log) {
    T log_sum = (T)::log(sum);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i * inner] = (xr[i * inner] - mx) - log_sum;
  } else {
    T inv = (T)(1.0 / sum);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i * inner] = d_exp(xr[i * inner] - mx) * inv;
  }
}

// softmax: gx = y·(g - Σ g·y);  log_softmax: gx = g - exp(y)·Σ g.
template <typename T>
__global__ void softmax_backward_kernel(const T* g, const T* y, T* gx, int64_t n, int64_t inner, bool log) {
  __shared__ double scratch[256];
  int64_t r = blockIdx.x, base = (r / inner) * n * inner + r % inner;
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    int64_t k = base + i * inner;
    s += log ? (double)g[k] : (double)g[k] * y[k];
  }
  T d = (T)block_sum(s, scratch);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    int64_t k = base + i * inner;
    gx[k] = log ? g[k] - d_exp(y[k]) * d : y[k] * (g[k] - d);
  }
}

// ---- cross_entropy, fused with the softmax it needs: per row lse = max + log Σ exp(x - max) and the row's loss
// lse - x[target] (0 when ignored) into a double buffer, then one block adds the rows in a fixed tree order.
template <typename T>
__global__ void cross_entropy_rows(const T* x, const int64_t* targets, int64_t ignore_index, int64_t V, T* lse,
                                   double* row_loss) {
  __shared__ double scratch[256];
  __shared__ T tscratch[256];
  int64_t i = blockIdx.x;
  if (targets[i] == ignore_index) {  // as on the CPU: no log-sum-exp for an ignored row (the whole block returns)
    if (threadIdx.x == 0) lse[i] = T(0), row_loss[i] = 0.0;
    return;
  }
  const T* xr = x + i * V;
  T mx = -d_inf<T>();
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) mx = std_max(mx, xr[v]);
  mx = block_max(mx, tscratch);
  double s = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += (double)d_exp(xr[v] - mx);
  double row_lse = (double)mx + ::log(block_sum(s, scratch));
  if (threadIdx.x == 0) {
    lse[i] = (T)row_lse;
    row_loss[i] = row_lse - (double)xr[targets[i]];
  }
}

template <typename T>
__global__ void cross_entropy_total(const double* row_loss, int64_t N, int64_t count, T* loss) {
  __shared__ double scratch[256];
  double s = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) s += row_loss[i];
  double total = block_sum(s, scratch);
  if (threadIdx.x == 0) loss[0] = count ? (T)(total / count) : T(0);
}

// glogits = g/count·(softmax - onehot) on counted rows, 0 on ignored ones; one thread per logit.
template <typename T>
__global__ void cross_entropy_backward_kernel(const T* gout, const T* x, const int64_t* targets, const T* lse,
                                              int64_t ignore_index, int64_t count, int64_t N, int64_t V, T* gx) {
  CUDA_LOOP(e, N * V) {
    int64_t i = e / V, v = e % V;
    T g = count ? (T)(gout[0] / count) : T(0);
    if (targets[i] == ignore_index || !count) {
      gx[e] = T(0);
    } else {
      T p = g * d_exp(x[e] - lse[i]);
      gx[e] = v == targets[i] ? p - g : p;
    }
  }
}

template <typename T>
__global__ void dropout_kernel(const T* x, T* y, int64_t n, uint64_t seed, uint64_t offset, uint32_t threshold, T scale) {
  CUDA_LOOP(i, n) y[i] = philox_keep(seed, offset, (uint64_t)i, threshold) ? x[i] * scale : T(0);
}

int64_t rows_of(const Tensor& x) { return x.numel() / x.size(-1); }

void check_grid(int64_t rows, const char* op) {
  PSA_CHECK(rows <= 0x7fffffff, op, ": ", rows, " rows exceed the CUDA grid");
}

}  // namespace

void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& out, Tensor& mean, Tensor& rstd) {
  int64_t C = x.size(-1), rows = rows_of(x);
  if (rows == 0) return;
  check_grid(rows, "layer_norm");
  dispatch_float(x.dtype(), "cuda layer_norm", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    layer_norm_kernel<T><<<(unsigned)rows, row_threads(C), 0, stream()>>>(
        x.data<T>(), ptr_or_null<T>(w), ptr_or_null<T>(b), eps, C, out.data<T>(), mean.data<T>(), rstd.data<T>());
    cudaCheckLaunch();
  });
}

void layer_norm_backward(const Tensor& gout, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                         Tensor& gx, Tensor& gw, Tensor& gb) {
  int64_t C = x.size(-1), rows = rows_of(x);
  check_grid(rows, "layer_norm_backward");
  dispatch_float(x.dtype(), "cuda layer_norm_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    if (gx.defined() && rows > 0) {
      layer_norm_gx<T><<<(unsigned)rows, row_threads(C), 0, stream()>>>(
          gout.data<T>(), x.data<T>(), ptr_or_null<T>(w), mean.data<T>(), rstd.data<T>(), C, gx.data<T>());
      cudaCheckLaunch();
    }
    norm_param_grads<T>(gout, x, mean.data<T>(), rstd.data<T>(), rows, C, gw, gb);
  });
}

void rms_norm(const Tensor& x, const Tensor& w, double eps, Tensor& out, Tensor& rstd) {
  int64_t C = x.size(-1), rows = rows_of(x);
  if (rows == 0) return;
  check_grid(rows, "rms_norm");
  dispatch_float(x.dtype(), "cuda rms_norm", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    rms_norm_kernel<T><<<(unsigned)rows, row_threads(C), 0, stream()>>>(x.data<T>(), ptr_or_null<T>(w), eps, C,
                                                                        out.data<T>(), rstd.data<T>());
    cudaCheckLaunch();
  });
}

void rms_norm_backward(const Tensor& gout, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& gx, Tensor& gw) {
  int64_t C = x.size(-1), rows = rows_of(x);
  check_grid(rows, "rms_norm_backward");
  dispatch_float(x.dtype(), "cuda rms_norm_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    if (gx.defined() && rows > 0) {
      rms_norm_gx<T><<<(unsigned)rows, row_threads(C), 0, stream()>>>(gout.data<T>(), x.data<T>(), ptr_or_null<T>(w),
                                                                      rstd.data<T>(), C, gx.data<T>());
      cudaCheckLaunch();
    }
    Tensor none;
    norm_param_grads<T>(gout, x, nullptr, rstd.data<T>(), rows, C, gw, none);
  });
}

void softmax(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& out) {
  int64_t rows = outer * inner;
  if (rows == 0 || n == 0) return;
  check_grid(rows, "softmax");
  dispatch_float(x.dtype(), "cuda softmax", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    softmax_kernel<T><<<(unsigned)rows, row_threads(n), 0, stream()>>>(x.data<T>(), out.data<T>(), n, inner, log);
    cudaCheckLaunch();
  });
}

void softmax_backward(const Tensor& gout, const Tensor& y, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& gx) {
  int64_t rows = outer * inner;
  if (rows == 0 || n == 0) return;
  check_grid(rows, "softmax_backward");
  dispatch_float(y.dtype(), "cuda softmax_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    softmax_backward_kernel<T>
        <<<(unsigned)rows, row_threads(n), 0, stream()>>>(gout.data<T>(), y.data<T>(), gx.data<T>(), n, inner, log);
    cudaCheckLaunch();
  });
}

void cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t count, Tensor& loss,
                   Tensor& lse) {
  int64_t N = logits.size(0), V = logits.size(1);
  check_grid(N, "cross_entropy");
  Tensor row_loss = Tensor::empty({std::max<int64_t>(N, 1)}, DType::f64, Device::cuda);
  dispatch_float(logits.dtype(), "cuda cross_entropy", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    if (N > 0) {
      cross_entropy_rows<T><<<(unsigned)N, row_threads(V), 0, stream()>>>(
          logits.data<T>(), targets.data<int64_t>(), ignore_index, V, lse.data<T>(), row_loss.data<double>());
      cudaCheckLaunch();
    }
    cross_entropy_total<T><<<1, 256, 0, stream()>>>(row_loss.data<double>(), N, count, loss.data<T>());
    cudaCheckLaunch();
  });
}

void cross_entropy_backward(const Tensor& gout, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            int64_t ignore_index, int64_t count, Tensor& glogits) {
  int64_t N = logits.size(0), V = logits.size(1);
  if (N * V == 0) return;
  dispatch_float(logits.dtype(), "cuda cross_entropy_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    cross_entropy_backward_kernel<T>
        <<<blocks_for(N * V), kThreads, 0, stream()>>>(gout.data<T>(), logits.data<T>(), targets.data<int64_t>(),
                                                       lse.data<T>(), ignore_index, count, N, V, glogits.data<T>());
    cudaCheckLaunch();
  });
}

uint32_t dropout_threshold(double p) { return cpu::dropout_threshold(p); }

void dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset, Tensor& out) {
  int64_t n = x.numel();
  if (n == 0) return;
  if (p >= 1) {  // every element dropped, as on the CPU
    gpu::memset_zero(out.raw(), out.nbytes());
    return;
  }
  dispatch_float(x.dtype(), "cuda dropout", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    dropout_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(x.data<T>(), out.data<T>(), n, seed, offset,
                                                                dropout_threshold(p), (T)(1.0 / (1.0 - p)));
    cudaCheckLaunch();
  });
}

}  // namespace psa::cuda
