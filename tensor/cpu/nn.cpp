// Row-wise kernels: layer_norm, rms_norm, (log_)softmax, cross_entropy, dropout, each one fused forward and one
// fused backward. Every op sees its input as rows ([rows, C] over the last dim, or strided rows of an
// [outer, n, inner] view for softmax over any dim). Rows are spread over OpenMP threads when the tensor is large;
// reductions over rows (weight gradients) go to per-thread double accumulators summed in a fixed order, so
// results do not depend on scheduling. f32 sums accumulate in double.
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "tensor/cpu/kernel_util.h"
#include "tensor/cpu/kernels.h"
#include "tensor/cpu/vec_math.h"
#include "tensor/rng.h"

namespace psa::cpu {
namespace {

template <typename T>
const T* data_or_null(const Tensor& t) { return t.defined() ? t.data<T>() : nullptr; }
template <typename T>
T* mutable_or_null(Tensor& t) { return t.defined() ? t.data<T>() : nullptr; }

template <typename T>
void store(const std::vector<double>& src, int64_t from, int64_t n, T* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = (T)src[from + j];
}

}  // namespace

// ---- layer_norm: y = (x - mean)·rstd·w + b over the last dim C; saves mean and rstd per row.
void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& out, Tensor& mean, Tensor& rstd) {
  int64_t C = x.size(-1), rows = x.numel() / C;
  dispatch_float(x.dtype(), "layer_norm", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T* px = x.data<T>();
    const T* pw = data_or_null<T>(w);
    const T* pb = data_or_null<T>(b);
    T *po = out.data<T>(), *pm = mean.data<T>(), *pr = rstd.data<T>();
    parallel_for(rows, use_threads(rows * C), [&](int64_t r) {
      const T* xr = px + r * C;
      double mu = sum_f64(C, [&](int64_t c) { return (double)xr[c]; }) / C;
      // two passes: no cancellation
      double sq = sum_f64(C, [&](int64_t c) { return ((double)xr[c] - mu) * ((double)xr[c] - mu); });
      T m = (T)mu, rs = (T)(1.0 / std::sqrt(sq / C + eps));
      pm[r] = m;
      pr[r] = rs;
      T* yr = po + r * C;
      for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - m) * rs * (pw ? pw[c] : T(1)) + (pb ? pb[c] : T(0));
    });
  });
}

// With xhat = (x - mean)·rstd and gxhat = g·w:
//   gx = rstd·(gxhat - mean(gxhat) - xhat·mean(gxhat·xhat)),  gw = Σ_rows g·xhat,  gb = Σ_rows g.
void layer_norm_backward(const Tensor& gout, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                         Tensor& gx, Tensor& gw, Tensor& gb) {
  int64_t C = x.size(-1), rows = x.numel() / C;
  dispatch_float(x.dtype(), "layer_norm_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T *pg = gout.data<T>(), *px = x.data<T>(), *pm = mean.data<T>(), *pr = rstd.data<T>();
    const std::vector<T> ones(w.defined() ? 0 : C, T(1));  // no weight: a branch-free w = 1 (the lane sums vectorise)
    const T* pw = w.defined() ? w.data<T>() : ones.data();
    T* pgx = mutable_or_null<T>(gx);
    bool need_w = gw.defined(), need_b = gb.defined();
    auto row = [&](int64_t r, double* acc) {  // acc: [0, C) for gw, [C, 2C) for gb
      const T *gr = pg + r * C, *xr = px + r * C;
      T m = pm[r], rs = pr[r];
      auto xhat = [&](int64_t c) { return (xr[c] - m) * rs; };
      auto gxhat = [&](int64_t c) { return gr[c] * pw[c]; };
      if (need_w)
        for (int64_t c = 0; c < C; ++c) acc[c] += gr[c] * xhat(c);
      if (need_b)
        for (int64_t c = 0; c < C; ++c) acc[C + c] += gr[c];
      if (!pgx) return;
      // Lane sums (sum_f64), not one running double: a chain of dependent adds was most of this kernel's time.
      const double sum_gxhat = sum_f64(C, [&](int64_t c) { return (double)gxhat(c); });
      const double sum_gxhat_xhat = sum_f64(C, [&](int64_t c) { return (double)(gxhat(c) * xhat(c)); });
      T mean_g = (T)(sum_gxhat / C), mean_gx = (T)(sum_gxhat_xhat / C);
      T* out = pgx + r * C;
      for (int64_t c = 0; c < C; ++c) out[c] = rs * (gxhat(c) - mean_g - xhat(c) * mean_gx);
    };
    std::vector<double> sums = rows_with_partial_sums(rows, 2 * C, use_threads(rows * C), row);
    if (need_w) store(sums, 0, C, gw.data<T>());
    if (need_b) store(sums, C, C, gb.data<T>());
  });
}

// ---- rms_norm (HF Llama): y = x·rstd·w, rstd = 1/sqrt(mean(x²) + eps), in the input dtype; saves rstd per row.
void rms_norm(const Tensor& x, const Tensor& w, double eps, Tensor& out, Tensor& rstd) {
  int64_t C = x.size(-1), rows = x.numel() / C;
  dispatch_float(x.dtype(), "rms_norm", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T* px = x.data<T>();
    const T* pw = data_or_null<T>(w);
    T *po = out.data<T>(), *pr = rstd.data<T>();
    parallel_for(rows, use_threads(rows * C), [&](int64_t r) {
      const T* xr = px + r * C;
      double sq = sum_f64(C, [&](int64_t c) { return (double)xr[c] * xr[c]; });
      T rs = (T)(1.0 / std::sqrt(sq / C + eps));
      pr[r] = rs;
      T* yr = po + r * C;
      for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * rs * (pw ? pw[c] : T(1));
    });
  });
}

// With xhat = x·rstd and gxhat = g·w:  gx = rstd·(gxhat - xhat·mean(gxhat·xhat)),  gw = Σ_rows g·xhat.
void rms_norm_backward(const Tensor& gout, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& gx, Tensor& gw) {
  int64_t C = x.size(-1), rows = x.numel() / C;
  dispatch_float(x.dtype(), "rms_norm_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T *pg = gout.data<T>(), *px = x.data<T>(), *pr = rstd.data<T>();
    const std::vector<T> ones(w.defined() ? 0 : C, T(1));  // as in layer_norm_backward
    const T* pw = w.defined() ? w.data<T>() : ones.data();
    T* pgx = mutable_or_null<T>(gx);
    bool need_w = gw.defined();
    auto row = [&](int64_t r, double* acc) {
      const T *gr = pg + r * C, *xr = px + r * C;
      T rs = pr[r];
      if (need_w)
        for (int64_t c = 0; c < C; ++c) acc[c] += gr[c] * (xr[c] * rs);
      if (!pgx) return;
      // Lane sums, as in layer_norm_backward.
      const double sum_gxhat_xhat =
          sum_f64(C, [&](int64_t c) { return (double)(gr[c] * pw[c] * (xr[c] * rs)); });
      T mean_gx = (T)(sum_gxhat_xhat / C);
      T* out = pgx + r * C;
      for (int64_t c = 0; c < C; ++c) out[c] = rs * (gr[c] * pw[c] - xr[c] * rs * mean_gx);
    };
    std::vector<double> sums = rows_with_partial_sums(rows, C, use_threads(rows * C), row);
    if (need_w) store(sums, 0, C, gw.data<T>());
  });
}

// ---- softmax / log_softmax over the middle dim n of [outer, n, inner]: row (o, j) is n values `inner` apart.
// Stable: exponents are taken after subtracting the row max. A row that is all -inf gives zeros (softmax) or
// -inf (log_softmax), never NaN.
namespace {

// A contiguous row (stride 1, the common case: softmax over the last dim) takes the lane loops of vec_math.h
// and computes each exp once; a strided one reads column-wise and takes the exps again for the output.
template <typename T>
void softmax_row(const T* x, T* y, int64_t n, int64_t stride, bool log) {
  T mx = -std::numeric_limits<T>::infinity();
  if (stride == 1) mx = row_max(x, n);
  else
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i * stride]);
  if (mx == -std::numeric_limits<T>::infinity()) {
    for (int64_t i = 0; i < n; ++i) y[i * stride] = log ? mx : T(0);
    return;
  }
  double sum = 0;
  if (stride == 1) sum = exp_shifted_sum(x, mx, log ? nullptr : y, n);
  else
    for (int64_t i = 0; i < n; ++i) sum += exp_of(x[i * stride] - mx);
  if (log) {
    T log_sum = (T)std::log(sum);  // (x - max) - log_sum: exact shift first, no rounding of a large lse
    for (int64_t i = 0; i < n; ++i) y[i * stride] = (x[i * stride] - mx) - log_sum;
  } else if (stride == 1) {
    T inv = (T)(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) y[i] *= inv;
  } else {
    T inv = (T)(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) y[i * stride] = exp_of(x[i * stride] - mx) * inv;
  }
}

// softmax: gx = y·(g - Σ g·y);  log_softmax: gx = g - exp(y)·Σ g.
template <typename T>
void softmax_backward_row(const T* g, const T* y, T* gx, int64_t n, int64_t stride, bool log) {
  if (log) {  // separate loops: with `log ?` per element the compiler may compute the exp for softmax too
    T d = (T)sum_f64(n, [&](int64_t i) { return (double)g[i * stride]; });
    for (int64_t i = 0, k = 0; i < n; ++i, k += stride) gx[k] = g[k] - exp_of(y[k]) * d;
  } else {
    T d = (T)sum_f64(n, [&](int64_t i) { return (double)g[i * stride] * y[i * stride]; });
    for (int64_t i = 0, k = 0; i < n; ++i, k += stride) gx[k] = y[k] * (g[k] - d);
  }
}

}  // namespace

void softmax(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& out) {
  dispatch_float(x.dtype(), "softmax", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T* px = x.data<T>();
    T* po = out.data<T>();
    int64_t rows = outer * inner;
    parallel_for(rows, use_threads(rows * n), [&](int64_t r) {
      int64_t base = (r / inner) * n * inner + r % inner;
      softmax_row(px + base, po + base, n, inner, log);
    });
  });
}

void softmax_backward(const Tensor& gout, const Tensor& y, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& gx) {
  dispatch_float(y.dtype(), "softmax_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T *pg = gout.data<T>(), *py = y.data<T>();
    T* po = gx.data<T>();
    int64_t rows = outer * inner;
    parallel_for(rows, use_threads(rows * n), [&](int64_t r) {
      int64_t base = (r / inner) * n * inner + r % inner;
      softmax_backward_row(pg + base, py + base, po + base, n, inner, log);
    });
  });
}

// ---- cross_entropy: loss = Σ_counted (lse_i - x_i[t_i]) / count (0 when count is 0); saves lse [N] (0 on
// ignored rows) and recomputes the probabilities exp(x - lse) from the logits in backward rather than keeping
// an [N, V] copy.
void cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t count, Tensor& loss,
                   Tensor& lse) {
  int64_t N = logits.size(0), V = logits.size(1);
  dispatch_float(logits.dtype(), "cross_entropy", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T* px = logits.data<T>();
    const int64_t* pt = targets.data<int64_t>();
    T* pl = lse.data<T>();
    std::vector<double> row_loss(N, 0.0);  // summed in order afterwards: the loss is bit-reproducible
    parallel_for(N, use_threads(N * V), [&](int64_t i) {
      if (pt[i] == ignore_index) {  // backward never reads an ignored row's lse (LM prompts: most rows)
        pl[i] = T(0);
        return;
      }
      const T* xr = px + i * V;
      T mx = row_max(xr, V);
      double row_lse = mx + std::log(exp_shifted_sum(xr, mx, (T*)nullptr, V));
      pl[i] = (T)row_lse;
      row_loss[i] = row_lse - xr[pt[i]];
    });
    double total = 0;
    for (double l : row_loss) total += l;
    loss.data<T>()[0] = count ? (T)(total / count) : T(0);
  });
}

// glogits_i = g/count · (softmax(x_i) - onehot(t_i)) for counted rows, 0 for ignored ones.
void cross_entropy_backward(const Tensor& gout, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            int64_t ignore_index, int64_t count, Tensor& glogits) {
  int64_t N = logits.size(0), V = logits.size(1);
  dispatch_float(logits.dtype(), "cross_entropy_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T *px = logits.data<T>(), *pl = lse.data<T>();
    const int64_t* pt = targets.data<int64_t>();
    T* po = glogits.data<T>();
    T g = count ? (T)(gout.data<T>()[0] / count) : T(0);
    parallel_for(N, use_threads(N * V), [&](int64_t i) {
      T* out = po + i * V;
      if (pt[i] == ignore_index || !count) {
        std::fill(out, out + V, T(0));
        return;
      }
      const T lse_i = pl[i];
      map_lanes(px + i * V, out, V, [=](auto x) { return g * exp_of(x - lse_i); });
      out[pt[i]] -= g;
    });
  });
}

// ---- dropout: keep element i when its Philox draw >= p·2^32 (integers, identical on every device), scale the
// kept ones by 1/(1-p). The mask is a pure function of (seed, offset, i), so backward is this kernel on gout.
uint32_t dropout_threshold(double p) {
  return p <= 0 ? 0u : p >= 1 ? 0xFFFFFFFFu : (uint32_t)(p * 4294967296.0);
}

namespace {

// The draws philox4x32(i, offset, seed).v[0] of kDrawBlock consecutive counters i0, i0 + 1, ..., bit for bit,
// on integer lanes. Each round's 32 x 32 -> 64-bit products come from the even-lane multiply twice (the even
// lanes, then the odd ones shifted down), their halves blended back into 32-bit lanes; four vectors go through
// the rounds side by side, since one round's products wait on the last one's. Scalar Philox was half of a LoRA
// Stage II step (28 dropouts, each ~1 ms on one core of a Zen 5: 2.1 ns a draw; these lanes: 0.8 ns).
#if defined(PSA_VEC_EXP) && defined(__AVX512F__)
using VecU = __m512i;
constexpr int kULanes = 16;
inline VecU u_splat(uint32_t x) { return _mm512_set1_epi32((int)x); }
inline VecU u_xor(VecU a, VecU b) { return _mm512_xor_si512(a, b); }
inline VecU u_load(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline void u_store(uint32_t* p, VecU v) { _mm512_storeu_si512(p, v); }
// hi and lo halves of a·m, lane by lane (the maskz forms with every lane on: see kAll in vec_math.h)
inline void mul_hi_lo(VecU a, VecU m, VecU& hi, VecU& lo) {
  VecU even = _mm512_maskz_mul_epu32(0xff, a, m);
  VecU odd = _mm512_maskz_mul_epu32(0xff, _mm512_maskz_srli_epi64(0xff, a, 32), m);
  hi = _mm512_mask_blend_epi32(0xaaaa, _mm512_maskz_srli_epi64(0xff, even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xaaaa, even, _mm512_maskz_slli_epi64(0xff, odd, 32));
}
#elif defined(PSA_VEC_EXP)  // AVX2
using VecU = __m256i;
constexpr int kULanes = 8;
inline VecU u_splat(uint32_t x) { return _mm256_set1_epi32((int)x); }
inline VecU u_xor(VecU a, VecU b) { return _mm256_xor_si256(a, b); }
inline VecU u_load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void u_store(uint32_t* p, VecU v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline void mul_hi_lo(VecU a, VecU m, VecU& hi, VecU& lo) {
  VecU even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xaa);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xaa);
}
#endif

#if defined(PSA_VEC_EXP)
constexpr int kDrawVectors = 4, kDrawBlock = kDrawVectors * kULanes;

void philox_draws(uint64_t i0, uint64_t offset, uint64_t seed, uint32_t* out) {
  uint32_t lo[kDrawBlock], hi[kDrawBlock];
  for (int l = 0; l < kDrawBlock; ++l) lo[l] = (uint32_t)(i0 + l), hi[l] = (uint32_t)((i0 + l) >> 32);
  VecU c0[kDrawVectors], c1[kDrawVectors], c2[kDrawVectors], c3[kDrawVectors];
  for (int v = 0; v < kDrawVectors; ++v) {
    c0[v] = u_load(lo + v * kULanes), c1[v] = u_load(hi + v * kULanes);
    c2[v] = u_splat((uint32_t)offset), c3[v] = u_splat((uint32_t)(offset >> 32));
  }
  const VecU m0 = u_splat(0xD2511F53u), m1 = u_splat(0xCD9E8D57u);
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int v = 0; v < kDrawVectors; ++v) {  // the rounds of philox4x32 (tensor/rng.h)
      VecU hi0, lo0, hi1, lo1;
      mul_hi_lo(c0[v], m0, hi0, lo0);
      mul_hi_lo(c2[v], m1, hi1, lo1);
      c0[v] = u_xor(u_xor(hi1, c1[v]), u_splat(k0));
      c2[v] = u_xor(u_xor(hi0, c3[v]), u_splat(k1));
      c1[v] = lo1, c3[v] = lo0;
    }
    k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
  }
  for (int v = 0; v < kDrawVectors; ++v) u_store(out + v * kULanes, c0[v]);
}
#else
constexpr int kDrawBlock = 16;
void philox_draws(uint64_t i0, uint64_t offset, uint64_t seed, uint32_t* out) {
  for (int l = 0; l < kDrawBlock; ++l) out[l] = philox4x32(i0 + l, offset, seed).v[0];
}
#endif

}  // namespace

void dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset, Tensor& out) {
  int64_t n = x.numel();
  uint32_t threshold = dropout_threshold(p);
  dispatch_float(x.dtype(), "dropout", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T* px = x.data<T>();
    T* po = out.data<T>();
    if (p >= 1) {  // every element dropped (the threshold cannot say "all": a draw of 2^32-1 would pass)
      std::fill(po, po + n, T(0));
      return;
    }
    T scale = (T)(1.0 / (1.0 - p));
    int64_t blocks = n / kDrawBlock;
    parallel_for(blocks, use_threads(n, kParallelMin / 8), [&](int64_t b) {
      uint32_t draw[kDrawBlock];
      int64_t i0 = b * kDrawBlock;
      philox_draws(i0, offset, seed, draw);
      const T* xb = px + i0;
      T* ob = po + i0;
      for (int l = 0; l < kDrawBlock; ++l) {  // the product first: the select becomes a blend, not a branch
        T kept = xb[l] * scale;
        ob[l] = draw[l] >= threshold ? kept : T(0);
      }
    });
    for (int64_t i = blocks * kDrawBlock; i < n; ++i)
      po[i] = philox_keep(seed, offset, i, threshold) ? px[i] * scale : T(0);
  });
}

}  // namespace psa::cpu
