// Throughput of every CPU kernel family except GEMM (bench/gemm.cpp has that), called directly (no autograd),
// at three sizes each: the shapes the `tiny` and `small` presets really run (16 rows x 103 merged tokens, and
// 32 x 127, design.md) and one larger "square" size whose main extents are equal (e.g. 2048 x 2048), at 1 and
// 2 threads (the name ends in threads=T).
//
// Counters per benchmark:
//   GB/s      the minimal traffic (every input read once, every output written once) per second
//   GFLOP/s   for the GEMM-based kernels (attention, patch_conv): the multiply-adds their GEMMs execute
//   ceiling   the roof this kernel is held against (bench/ceiling.h): FMA peak GFLOP/s of T threads for the
//             compute-bound ones, copy GB/s of T threads for the memory-bound ones, the copy taken at the
//             kernel's own footprint (from cache or from DRAM; the label gives the footprint)
//   pct_ceiling  achieved / ceiling, in percent
// Every kernel is checked once (per shape) before it is timed, against a naive double-precision loop on
// sampled rows or against an exact identity; a wrong result skips the benchmark with the reason.
//
// Run: build/bench_kernels --benchmark_min_time=0.05 --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "bench/ceiling.h"
#include "bench/inputs.h"
#include "bench/shapes.h"
#include "tensor/cpu/kernels.h"

namespace {

using psa::DType;
using psa::Shape;
using psa::Tensor;
namespace cpu = psa::cpu;
using Dims = std::vector<int64_t>;
using psa::bench::ids;
using psa::bench::targets_one_in_three;
using psa::bench::uniform;
using psa::bench::Size;
using namespace psa::bench::shapes;

// ---- inputs --------------------------------------------------------------------------------------------

const float* f(const Tensor& t) { return t.data<float>(); }

// About 16 evenly spread indices in [0, n), always including the first and the last.
std::vector<int64_t> sample(int64_t n) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; i += std::max<int64_t>(1, n / 16)) out.push_back(i);
  if (out.back() != n - 1) out.push_back(n - 1);
  return out;
}

// ---- checks ------------------------------------------------------------------------------------------

// Keeps the first disagreement. f32 kernels against double references: |got - want| <= tol·(1 + |want|).
struct Check {
  std::string error;
  void near(const char* what, int64_t at, double got, double want, double tol) {
    if (!error.empty() || std::fabs(got - want) <= tol * (1 + std::fabs(want))) return;
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s wrong at %ld: got %.7g, want %.7g", what, long(at), got, want);
    error = buf;
  }
};

// ---- a benchmark case ------------------------------------------------------------------------------------

struct Case {
  std::function<void()> run;
  std::function<std::string()> check;  // after exactly one run: "" or what is wrong
  double bytes = 0;                     // minimal traffic of one run
  double flops = 0;                     // GEMM flops of one run (0: not counted)
  bool compute_bound = false;
};
using Factory = Case (*)(const Dims&);

// ---- softmax over rows of V (the LM head's probabilities) ---------------------------------------------

// Naive softmax of one row, in double.
std::vector<double> softmax_row(const float* x, int64_t V) {
  double mx = *std::max_element(x, x + V), sum = 0;
  std::vector<double> y(V);
  for (int64_t j = 0; j < V; ++j) sum += y[j] = std::exp(x[j] - mx);
  for (double& v : y) v /= sum;
  return y;
}

Case softmax_fwd(const Dims& d) {
  int64_t R = d[0], V = d[1];
  Tensor x = uniform({R, V}, -4, 4, 1), y = Tensor::empty({R, V});
  Case c;
  c.run = [=]() mutable { cpu::softmax(x, R, V, 1, false, y); };
  c.check = [=] {
    Check k;
    for (int64_t r : sample(R)) {
      std::vector<double> want = softmax_row(f(x) + r * V, V);
      for (int64_t j = 0; j < V; ++j) k.near("softmax", r * V + j, f(y)[r * V + j], want[j], 1e-5);
    }
    return k.error;
  };
  c.bytes = 2.0 * R * V * 4;
  return c;
}

// gx = y·(g - Σ g·y) per row.
Case softmax_bwd(const Dims& d) {
  int64_t R = d[0], V = d[1];
  Tensor y = Tensor::empty({R, V}), g = uniform({R, V}, -1, 1, 2), gx = Tensor::empty({R, V});
  cpu::softmax(uniform({R, V}, -4, 4, 1), R, V, 1, false, y);
  Case c;
  c.run = [=]() mutable { cpu::softmax_backward(g, y, R, V, 1, false, gx); };
  c.check = [=] {
    Check k;
    for (int64_t r : sample(R)) {
      const float *yr = f(y) + r * V, *gr = f(g) + r * V;
      double dot = 0;
      for (int64_t j = 0; j < V; ++j) dot += double(gr[j]) * yr[j];
      for (int64_t j = 0; j < V; ++j) k.near("softmax_backward", r * V + j, f(gx)[r * V + j], yr[j] * (gr[j] - dot), 1e-5);
    }
    return k.error;
  };
  c.bytes = 3.0 * R * V * 4;
  return c;
}

// ---- layer_norm and rms_norm over the last dim C --------------------------------------------------------

struct RowStats {
  std::vector<double> mean, rstd;
};

// rms = true: mean is 0 and rstd = 1/sqrt(mean(x²) + eps) (rms_norm); otherwise layer_norm's statistics.
RowStats row_stats(const float* x, int64_t R, int64_t C, bool rms) {
  RowStats s{std::vector<double>(R, 0.0), std::vector<double>(R)};
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * C;
    double mu = 0, sq = 0;
    if (!rms) {
      for (int64_t j = 0; j < C; ++j) mu += xr[j];
      mu /= C;
    }
    for (int64_t j = 0; j < C; ++j) sq += (xr[j] - mu) * (xr[j] - mu);
    s.mean[r] = mu;
    s.rstd[r] = 1 / std::sqrt(sq / C + 1e-5);
  }
  return s;
}

// Naive gx of one row: rstd·(gŵ - [layer_norm] mean(gŵ) - x̂·mean(gŵ·x̂)), gŵ = g·w, x̂ = (x - mean)·rstd.
std::vector<double> norm_grad_row(const float* x, const float* g, const float* w, double mean, double rstd, int64_t C,
                                  bool rms) {
  double sg = 0, sgx = 0;
  for (int64_t j = 0; j < C; ++j) {
    sg += double(g[j]) * w[j];
    sgx += double(g[j]) * w[j] * (x[j] - mean) * rstd;
  }
  std::vector<double> gx(C);
  for (int64_t j = 0; j < C; ++j)
    gx[j] = rstd * (double(g[j]) * w[j] - (rms ? 0 : sg / C) - (x[j] - mean) * rstd * sgx / C);
  return gx;
}

Case norm_fwd(const Dims& d, bool rms) {
  int64_t R = d[0], C = d[1];
  Tensor x = uniform({R, C}, -2, 2, 1), w = uniform({C}, 0.5, 1.5, 2), b = uniform({C}, -1, 1, 3);
  Tensor y = Tensor::empty({R, C}), mean = Tensor::empty({R}), rstd = Tensor::empty({R});
  Case c;
  c.run = [=]() mutable {
    if (rms) cpu::rms_norm(x, w, 1e-5, y, rstd);
    else cpu::layer_norm(x, w, b, 1e-5, y, mean, rstd);
  };
  c.check = [=] {
    Check k;
    RowStats s = row_stats(f(x), R, C, rms);
    for (int64_t r : sample(R))
      for (int64_t j = 0; j < C; ++j) {
        double want = (f(x)[r * C + j] - s.mean[r]) * s.rstd[r] * f(w)[j] + (rms ? 0 : f(b)[j]);
        k.near(rms ? "rms_norm" : "layer_norm", r * C + j, f(y)[r * C + j], want, 1e-5);
      }
    return k.error;
  };
  c.bytes = (2.0 * R * C + (rms ? 1 : 2) * C) * 4 + (rms ? 1 : 2) * R * 4.0;
  return c;
}

Case norm_bwd(const Dims& d, bool rms) {
  int64_t R = d[0], C = d[1];
  Tensor x = uniform({R, C}, -2, 2, 1), w = uniform({C}, 0.5, 1.5, 2), g = uniform({R, C}, -1, 1, 4);
  Tensor y = Tensor::empty({R, C}), mean = Tensor::empty({R}), rstd = Tensor::empty({R});
  Tensor gx = Tensor::empty({R, C}), gw = Tensor::empty({C}), gb = Tensor::empty({C});
  if (rms) cpu::rms_norm(x, w, 1e-5, y, rstd);
  else cpu::layer_norm(x, w, Tensor(), 1e-5, y, mean, rstd);
  Case c;
  c.run = [=]() mutable {
    if (rms) cpu::rms_norm_backward(g, x, w, rstd, gx, gw);
    else cpu::layer_norm_backward(g, x, w, mean, rstd, gx, gw, gb);
  };
  c.check = [=] {
    Check k;
    RowStats s = row_stats(f(x), R, C, rms);
    for (int64_t r : sample(R)) {
      std::vector<double> want = norm_grad_row(f(x) + r * C, f(g) + r * C, f(w), s.mean[r], s.rstd[r], C, rms);
      for (int64_t j = 0; j < C; ++j) k.near("norm backward gx", r * C + j, f(gx)[r * C + j], want[j], 1e-4);
    }
    for (int64_t j : sample(C)) {  // gw = Σ_rows g·x̂ over every row
      double want = 0;
      for (int64_t r = 0; r < R; ++r) want += double(f(g)[r * C + j]) * (f(x)[r * C + j] - s.mean[r]) * s.rstd[r];
      k.near("norm backward gw", j, f(gw)[j], want, 1e-4);
    }
    return k.error;
  };
  c.bytes = (3.0 * R * C + (rms ? 2 : 3) * C) * 4 + (rms ? 1 : 2) * R * 4.0;
  return c;
}

Case layer_norm_fwd(const Dims& d) { return norm_fwd(d, false); }
Case layer_norm_bwd(const Dims& d) { return norm_bwd(d, false); }
Case rms_norm_fwd(const Dims& d) { return norm_fwd(d, true); }
Case rms_norm_bwd(const Dims& d) { return norm_bwd(d, true); }

// ---- attention, q/k/v [B, T, H, D] (dims given as B, H, T, D): causal (the LLM's self-attention) or not (the ViT's)

struct NaiveAttention {
  std::vector<double> out, gq, gk, gv;  // [T, D] each
};

// One (b, h) block in double with S = T:  P = softmax(scale·QKᵀ) (causal: s <= t only), O = PV, and the backward
// rules of tensor/cpu/attention.cpp written out as loops. The inputs' rows are ld apart, the results [T, D].
NaiveAttention naive_attention(const float* Q, const float* K, const float* V, const float* G, int64_t T, int64_t D,
                               int64_t ld, bool causal) {
  const double scale = 1 / std::sqrt(double(D));
  std::vector<double> P(T * T, 0.0), dS(T * T, 0.0);
  NaiveAttention a{std::vector<double>(T * D, 0.0), std::vector<double>(T * D, 0.0), std::vector<double>(T * D, 0.0),
                   std::vector<double>(T * D, 0.0)};
  for (int64_t t = 0; t < T; ++t) {
    double mx = -1e300, sum = 0;
    const int64_t last = causal ? t : T - 1;
    for (int64_t s = 0; s <= last; ++s) {
      double dot = 0;
      for (int64_t e = 0; e < D; ++e) dot += double(Q[t * ld + e]) * K[s * ld + e];
      P[t * T + s] = dot * scale;
      mx = std::max(mx, P[t * T + s]);
    }
    for (int64_t s = 0; s <= last; ++s) sum += P[t * T + s] = std::exp(P[t * T + s] - mx);
    double dot_dp_p = 0;
    for (int64_t s = 0; s <= last; ++s) {
      P[t * T + s] /= sum;
      double dp = 0;
      for (int64_t e = 0; e < D; ++e) {
        a.out[t * D + e] += P[t * T + s] * V[s * ld + e];
        dp += double(G[t * ld + e]) * V[s * ld + e];
      }
      dS[t * T + s] = dp;
      dot_dp_p += dp * P[t * T + s];
    }
    for (int64_t s = 0; s <= last; ++s) dS[t * T + s] = P[t * T + s] * (dS[t * T + s] - dot_dp_p);
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t s = 0; s <= (causal ? t : T - 1); ++s)
      for (int64_t e = 0; e < D; ++e) {
        a.gq[t * D + e] += scale * dS[t * T + s] * K[s * ld + e];
        a.gk[s * D + e] += scale * dS[t * T + s] * Q[t * ld + e];
        a.gv[s * D + e] += P[t * T + s] * G[t * ld + e];
      }
  return a;
}

Case attention_case(const Dims& d, bool backward, bool causal) {
  int64_t B = d[0], H = d[1], T = d[2], D = d[3];
  Shape s{B, T, H, D};
  Tensor q = uniform(s, -1, 1, 1), k = uniform(s, -1, 1, 2), v = uniform(s, -1, 1, 3), g = uniform(s, -1, 1, 4);
  Tensor out = Tensor::empty(s), probs = Tensor::empty({B, H, T, T});
  Tensor gq = Tensor::empty(s), gk = Tensor::empty(s), gv = Tensor::empty(s);
  const double scale = 1 / std::sqrt(double(D));
  Case c;
  c.run = [=]() mutable {
    cpu::attention(q, k, v, Tensor(), causal, scale, out, probs);
    if (backward) cpu::attention_backward(g, q, k, v, probs, causal, scale, gq, gk, gv);
  };
  c.check = [=] {
    Check ck;
    for (int64_t bh : {int64_t(0), B * H - 1}) {
      const int64_t o = ((bh / H) * T * H + bh % H) * D, ld = H * D;  // head (b, h) of [B, T, H, D]
      NaiveAttention a = naive_attention(f(q) + o, f(k) + o, f(v) + o, f(g) + o, T, D, ld, causal);
      for (int64_t i = 0; i < T * D; ++i) {
        const int64_t at = o + (i / D) * ld + i % D;
        ck.near("attention out", at, f(out)[at], a.out[i], 1e-4);
        if (!backward) continue;
        ck.near("attention gq", at, f(gq)[at], a.gq[i], 1e-4);
        ck.near("attention gk", at, f(gk)[at], a.gk[i], 1e-4);
        ck.near("attention gv", at, f(gv)[at], a.gv[i], 1e-4);
      }
    }
    return ck.error;
  };
  // Counted as full [T, T] blocks: 2 GEMMs forward, 4 backward, each 2·T·T·D flops per (b, h). The causal
  // kernel skips most of the masked half, so its GFLOP/s is a dense-equivalent rate.
  c.flops = (backward ? 6.0 : 2.0) * 2.0 * B * H * T * T * D;
  c.bytes = (backward ? 9.0 * B * H * T * D + 2.0 * B * H * T * T : 4.0 * B * H * T * D + B * H * T * T) * 4;
  c.compute_bound = true;
  return c;
}

Case attention_fwd(const Dims& d) { return attention_case(d, false, true); }
Case attention_fwd_bwd(const Dims& d) { return attention_case(d, true, true); }
Case vit_attention_fwd(const Dims& d) { return attention_case(d, false, false); }
Case vit_attention_fwd_bwd(const Dims& d) { return attention_case(d, true, false); }

// ---- embedding gather: weight [V, C], ids [N] -> [N, C], and its backward (scatter-add into [V, C]) ------

Case embedding_fwd(const Dims& d) {
  int64_t V = d[0], C = d[1], N = d[2];
  Tensor w = uniform({V, C}, -1, 1, 1), id = ids(N, V, 2), out = Tensor::empty({N, C});
  Case c;
  c.run = [=]() mutable { cpu::index_select(w, 1, V, C, id, out); };
  c.check = [=] {
    Check k;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < C; ++j) k.near("embedding", i * C + j, f(out)[i * C + j], f(w)[id.data<int64_t>()[i] * C + j], 0);
    return k.error;
  };
  c.bytes = 2.0 * N * C * 4 + N * 8.0;
  return c;
}

Case embedding_bwd(const Dims& d) {
  int64_t V = d[0], C = d[1], N = d[2];
  Tensor g = uniform({N, C}, -1, 1, 1), id = ids(N, V, 2), gw = Tensor::empty({V, C});
  Case c;
  c.run = [=]() mutable { cpu::index_add(g, 1, V, C, id, gw); };
  c.check = [=] {
    std::vector<double> want(V * C, 0.0);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < C; ++j) want[id.data<int64_t>()[i] * C + j] += f(g)[i * C + j];
    Check k;
    for (int64_t i = 0; i < V * C; ++i) k.near("embedding backward", i, f(gw)[i], want[i], 1e-5);
    return k.error;
  };
  c.bytes = (V * C + 3.0 * N * C) * 4 + N * 8.0;  // zero gw, then read g and read-modify-write gw rows
  return c;
}

// ---- patch_conv (kernel = stride = p): x [B, Ci, S, S], w [O, Ci, p, p] -> [B, O, S/p, S/p] ----------------

// Naive output element (b, o, i, j).
double naive_patch(const float* x, const float* w, const float* bias, int64_t Ci, int64_t S, int64_t O, int64_t p,
                   int64_t b, int64_t o, int64_t i, int64_t j) {
  double acc = bias[o];
  for (int64_t ci = 0; ci < Ci; ++ci)
    for (int64_t ky = 0; ky < p; ++ky)
      for (int64_t kx = 0; kx < p; ++kx)
        acc += double(x[((b * Ci + ci) * S + i * p + ky) * S + j * p + kx]) * w[((o * Ci + ci) * p + ky) * p + kx];
  return acc;
}

Case patch_conv_case(const Dims& d, bool backward) {
  int64_t B = d[0], Ci = d[1], S = d[2], O = d[3], p = d[4], Sp = S / p, L = Sp * Sp, K = Ci * p * p;
  Tensor x = uniform({B, Ci, S, S}, -1, 1, 1), w = uniform({O, Ci, p, p}, -0.1f, 0.1f, 2), bias = uniform({O}, -1, 1, 3);
  Tensor out = Tensor::empty({B, O, Sp, Sp}), g = uniform({B, O, Sp, Sp}, -1, 1, 4);
  Tensor gw = Tensor::empty({O, Ci, p, p}), gb = Tensor::empty({O});
  Case c;
  // The pixels need no gradient in training, so the backward computes only gw and gbias (gx undefined).
  c.run = [=]() mutable {
    if (backward) {
      Tensor no_gx;
      cpu::patch_conv_backward(g, x, w, no_gx, gw, gb);
    } else {
      cpu::patch_conv(x, w, bias, out);
    }
  };
  c.check = [=] {
    Check k;
    for (int64_t n : sample(B * O * L)) {
      int64_t b = n / (O * L), o = n / L % O, i = n % L / Sp, j = n % Sp;
      if (!backward) k.near("patch_conv", n, f(out)[n], naive_patch(f(x), f(w), f(bias), Ci, S, O, p, b, o, i, j), 1e-4);
    }
    if (!backward) return k.error;
    for (int64_t n : sample(O * K)) {  // gw[o, ci, ky, kx] = Σ_{b, i, j} g[b, o, i, j]·x[b, ci, i·p + ky, j·p + kx]
      int64_t o = n / K, ci = n % K / (p * p), ky = n % (p * p) / p, kx = n % p;
      double want = 0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t l = 0; l < L; ++l)
          want += double(f(g)[(b * O + o) * L + l]) * f(x)[((b * Ci + ci) * S + l / Sp * p + ky) * S + l % Sp * p + kx];
      k.near("patch_conv gw", n, f(gw)[n], want, 1e-4);
    }
    return k.error;
  };
  c.flops = 2.0 * B * L * K * O;
  c.bytes = (backward ? B * O * L + B * Ci * S * S + O * K + O : B * Ci * S * S + O * K + O + B * O * L) * 4.0;
  c.compute_bound = true;
  return c;
}

Case patch_conv_fwd(const Dims& d) { return patch_conv_case(d, false); }
Case patch_conv_bwd(const Dims& d) { return patch_conv_case(d, true); }

// ---- depthwise 3x3 conv, padding 1, on token grids x [B, H, W, C] (the C-Abstractor's RegNet blocks) ----------

// x at (b, y, xx, c), zero outside the grid.
double at(const float* x, int64_t H, int64_t W, int64_t C, int64_t b, int64_t y, int64_t xx, int64_t c) {
  return y < 0 || y >= H || xx < 0 || xx >= W ? 0.0 : double(x[((b * H + y) * W + xx) * C + c]);
}

Case depthwise_case(const Dims& d, bool backward) {
  int64_t B = d[0], H = d[1], W = d[2], C = d[3], n = B * H * W * C;
  Tensor x = uniform({B, H, W, C}, -1, 1, 1), w = uniform({C, 1, 3, 3}, -1, 1, 2), g = uniform({B, H, W, C}, -1, 1, 3);
  Tensor out = Tensor::empty({B, H, W, C}), gx = Tensor::empty({B, H, W, C}), gw = Tensor::empty({C, 1, 3, 3});
  Case c;
  c.run = [=]() mutable {
    if (backward) cpu::depthwise_conv3x3_backward(g, x, w, gx, gw);
    else cpu::depthwise_conv3x3(x, w, out);
  };
  c.check = [=] {
    Check k;
    for (int64_t i : sample(n)) {  // out[y, x] = Σ x[y + ky - 1, x + kx - 1]·w[ky, kx]; gx mirrors it over g
      int64_t b = i / (H * W * C), y = i / (W * C) % H, xx = i / C % W, ch = i % C;
      double want = 0;
      for (int64_t ky = 0; ky < 3; ++ky)
        for (int64_t kx = 0; kx < 3; ++kx)
          want += backward ? at(f(g), H, W, C, b, y - ky + 1, xx - kx + 1, ch) * f(w)[ch * 9 + ky * 3 + kx]
                           : at(f(x), H, W, C, b, y + ky - 1, xx + kx - 1, ch) * f(w)[ch * 9 + ky * 3 + kx];
      k.near(backward ? "depthwise gx" : "depthwise", i, backward ? f(gx)[i] : f(out)[i], want, 1e-5);
    }
    if (!backward) return k.error;
    for (int64_t j : sample(C * 9)) {
      int64_t ch = j / 9, ky = j % 9 / 3, kx = j % 3;
      double want = 0;
      for (int64_t i = ch; i < n; i += C) {
        int64_t b = i / (H * W * C), y = i / (W * C) % H, xx = i / C % W;
        want += f(g)[i] * at(f(x), H, W, C, b, y + ky - 1, xx + kx - 1, ch);
      }
      k.near("depthwise gw", j, f(gw)[j], want, 1e-4);
    }
    return k.error;
  };
  c.flops = 18.0 * n;  // reported for information: at 18 flops per 8 bytes this kernel is memory-bound
  c.bytes = ((backward ? 3.0 : 2.0) * n + 9 * C) * 4;
  return c;
}

Case depthwise_fwd(const Dims& d) { return depthwise_case(d, false); }
Case depthwise_bwd(const Dims& d) { return depthwise_case(d, true); }

// ---- adaptive_avg_pool2d on [B, H, W, C] -> [B, q, q, C] with torch's bins ------------------------------------

int64_t bin_start(int64_t i, int64_t in, int64_t out) { return i * in / out; }
int64_t bin_end(int64_t i, int64_t in, int64_t out) { return ((i + 1) * in + out - 1) / out; }

Case pool_case(const Dims& d, bool backward) {
  int64_t B = d[0], H = d[1], W = d[2], C = d[3], q = d[4];
  Tensor x = uniform({B, H, W, C}, -1, 1, 1), out = Tensor::empty({B, q, q, C});
  Tensor g = uniform({B, q, q, C}, -1, 1, 2), gx = Tensor::empty({B, H, W, C});
  Case c;
  c.run = [=]() mutable {
    if (backward) cpu::adaptive_avg_pool2d_backward(g, gx);
    else cpu::adaptive_avg_pool2d(x, out);
  };
  c.check = [=] {
    Check k;
    if (!backward)
      for (int64_t n : sample(B * q * q * C)) {
        int64_t b = n / (q * q * C), i = n / (q * C) % q, j = n / C % q, ch = n % C, cnt = 0;
        double sum = 0;
        for (int64_t y = bin_start(i, H, q); y < bin_end(i, H, q); ++y)
          for (int64_t xx = bin_start(j, W, q); xx < bin_end(j, W, q); ++xx, ++cnt) sum += f(x)[((b * H + y) * W + xx) * C + ch];
        k.near("adaptive_avg_pool2d", n, f(out)[n], sum / cnt, 1e-5);
      }
    for (int64_t n : backward ? sample(B * H * W * C) : std::vector<int64_t>{}) {  // every bin holding (y, x)
      int64_t b = n / (H * W * C), y = n / (W * C) % H, xx = n / C % W, ch = n % C;
      double want = 0;
      for (int64_t i = 0; i < q; ++i)
        for (int64_t j = 0; j < q; ++j) {
          int64_t y0 = bin_start(i, H, q), y1 = bin_end(i, H, q), x0 = bin_start(j, W, q), x1 = bin_end(j, W, q);
          if (y >= y0 && y < y1 && xx >= x0 && xx < x1) want += f(g)[((b * q + i) * q + j) * C + ch] / double((y1 - y0) * (x1 - x0));
        }
      k.near("adaptive_avg_pool2d backward", n, f(gx)[n], want, 1e-5);
    }
    return k.error;
  };
  c.bytes = (B * H * W * C + B * q * q * C) * 4.0;
  return c;
}

Case pool_fwd(const Dims& d) { return pool_case(d, false); }
Case pool_bwd(const Dims& d) { return pool_case(d, true); }

// ---- cross_entropy over logits [N, V]; like the LM loss, only some rows count (here one in three) -----------

Case cross_entropy_case(const Dims& d, bool backward) {
  int64_t N = d[0], V = d[1], count = (N + 2) / 3;
  Tensor x = uniform({N, V}, -4, 4, 1), t = targets_one_in_three(N, V);
  Tensor loss = Tensor::empty({}), lse = Tensor::empty({N}), gx = Tensor::empty({N, V}), one = Tensor::scalar(1.0);
  cpu::cross_entropy(x, t, -100, count, loss, lse);
  Case c;
  c.run = [=]() mutable {
    if (backward) cpu::cross_entropy_backward(one, x, t, lse, -100, count, gx);
    else cpu::cross_entropy(x, t, -100, count, loss, lse);
  };
  c.check = [=] {
    Check k;
    double total = 0;
    for (int64_t i = 0; i < N; i += 3) {
      std::vector<double> p = softmax_row(f(x) + i * V, V);
      int64_t ti = t.data<int64_t>()[i];
      total -= std::log(p[ti]);
      if (backward)
        for (int64_t j = 0; j < V; ++j) k.near("cross_entropy backward", i * V + j, f(gx)[i * V + j], (p[j] - (j == ti)) / count, 1e-5);
    }
    k.near("cross_entropy loss", 0, f(loss)[0], total / count, 1e-5);
    if (backward) k.near("cross_entropy backward (ignored row)", V, f(gx)[V], 0, 0);
    return k.error;
  };
  // Only counted rows' logits are read (forward and backward); backward writes every row.
  c.bytes = backward ? (double(count) * V + N * V + N) * 4 + N * 8.0 : (double(count) * V + N) * 4 + N * 8.0;
  return c;
}

Case cross_entropy_fwd(const Dims& d) { return cross_entropy_case(d, false); }
Case cross_entropy_bwd(const Dims& d) { return cross_entropy_case(d, true); }

// ---- elementwise: add (residuals), silu and swiglu (the LLM's MLP) ----------------------------------------------

Case add_case(const Dims& d) {
  int64_t n = d[0] * d[1];
  Tensor a = uniform({d[0], d[1]}, -1, 1, 1), b = uniform({d[0], d[1]}, -1, 1, 2), out = Tensor::empty({d[0], d[1]});
  Case c;
  c.run = [=]() mutable { cpu::binary(cpu::BinaryOp::add, a, b, out); };
  c.check = [=] {
    Check k;
    for (int64_t i = 0; i < n; ++i) k.near("add", i, f(out)[i], f(a)[i] + f(b)[i], 0);
    return k.error;
  };
  c.bytes = 3.0 * n * 4;
  return c;
}

// A 4-D permute at the attention shapes, [B, T, H, D] -> [B, H, T, D] (attention itself reads the heads in place).
Case head_permute_case(const Dims& d) {
  const int64_t B = d[0], H = d[1], T = d[2], D = d[3], n = B * H * T * D;
  Tensor x = uniform({B, T, H, D}, -1, 1, 1), out = Tensor::empty({B, H, T, D});
  Case c;
  c.run = [=]() mutable { cpu::permute(x, {0, 2, 1, 3}, out); };
  c.check = [=] {
    Check k;
    for (int64_t i : sample(n)) {
      const int64_t dd = i % D, t = i / D % T, h = i / (D * T) % H, b = i / (D * T * H);
      k.near("head permute", i, f(out)[i], f(x)[((b * T + t) * H + h) * D + dd], 0);
    }
    return k.error;
  };
  c.bytes = 2.0 * n * 4;
  return c;
}

double silu(double x) { return x / (1 + std::exp(-x)); }
double silu_grad(double x) {
  double s = 1 / (1 + std::exp(-x));
  return s + x * s * (1 - s);
}

Case silu_case(const Dims& d, bool backward) {
  int64_t n = d[0] * d[1];
  Tensor x = uniform({d[0], d[1]}, -6, 6, 1), y = Tensor::empty({d[0], d[1]});
  Tensor g = uniform({d[0], d[1]}, -1, 1, 2), gx = Tensor::empty({d[0], d[1]});
  cpu::unary(cpu::UnaryOp::silu, x, 0, y);
  Case c;
  c.run = [=]() mutable {
    if (backward) cpu::unary_backward(cpu::UnaryOp::silu, x, y, g, 0, gx);
    else cpu::unary(cpu::UnaryOp::silu, x, 0, y);
  };
  c.check = [=] {
    Check k;
    for (int64_t i : sample(n))
      k.near(backward ? "silu backward" : "silu", i, backward ? f(gx)[i] : f(y)[i],
             backward ? f(g)[i] * silu_grad(f(x)[i]) : silu(f(x)[i]), 1e-5);
    return k.error;
  };
  c.bytes = (backward ? 3.0 : 2.0) * n * 4;  // silu's derivative is recomputed from x: y is not read
  return c;
}

Case silu_fwd(const Dims& d) { return silu_case(d, false); }
Case silu_bwd(const Dims& d) { return silu_case(d, true); }

// swiglu = silu(gate)·up, the fused form the LLM's MLP runs (forward reads 2 arrays and writes 1, backward
// reads 3 and writes 2).
Case swiglu_case(const Dims& d, bool backward) {
  int64_t n = d[0] * d[1];
  Tensor x = uniform({d[0], d[1]}, -6, 6, 1), u = uniform({d[0], d[1]}, -1, 1, 3), y = Tensor::empty({d[0], d[1]});
  Tensor g = uniform({d[0], d[1]}, -1, 1, 2), gx = Tensor::empty({d[0], d[1]}), gu = Tensor::empty({d[0], d[1]});
  Case c;
  c.run = [=]() mutable {
    if (backward) cpu::swiglu_backward(x, u, g, gx, gu);
    else cpu::swiglu(x, u, y);
  };
  c.check = [=] {
    Check k;
    for (int64_t i : sample(n)) {
      double xi = f(x)[i], ui = f(u)[i], gi = f(g)[i];
      if (backward) {
        k.near("swiglu backward (gate)", i, f(gx)[i], gi * ui * silu_grad(xi), 1e-5);
        k.near("swiglu backward (up)", i, f(gu)[i], gi * silu(xi), 1e-5);
      } else {
        k.near("swiglu", i, f(y)[i], silu(xi) * ui, 1e-5);
      }
    }
    return k.error;
  };
  c.bytes = (backward ? 5.0 : 3.0) * n * 4;
  return c;
}

Case swiglu_fwd(const Dims& d) { return swiglu_case(d, false); }
Case swiglu_bwd(const Dims& d) { return swiglu_case(d, true); }

// bias_act with the exact gelu, the LLaVA projector's first layer: act(x + bias) over [rows, N], backward
// gx = g·gelu'(x + bias) and gbias = Σ_rows gx. Its cost is the Gaussian CDF (vec_math.h's gauss_f32).
double gelu(double z) { return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0))); }
double gelu_grad(double z) { return 0.5 * (1 + std::erf(z / std::sqrt(2.0))) + z * std::exp(-0.5 * z * z) / std::sqrt(2 * M_PI); }

Case bias_gelu_case(const Dims& d, bool backward) {
  int64_t rows = d[0], N = d[1], n = rows * N;
  Tensor x = uniform({rows, N}, -6, 6, 1), bias = uniform({N}, -1, 1, 4), y = Tensor::empty({rows, N});
  Tensor g = uniform({rows, N}, -1, 1, 2), gx = Tensor::empty({rows, N}), gb = Tensor::empty({N});
  Case c;
  c.run = [=]() mutable {
    if (backward) cpu::bias_act_backward(cpu::UnaryOp::gelu, x, bias, g, gx, gb);
    else cpu::bias_act(cpu::UnaryOp::gelu, x, bias, y);
  };
  c.check = [=] {
    Check k;
    for (int64_t i : sample(n)) {
      double z = (double)f(x)[i] + f(bias)[i % N];
      if (backward) k.near("bias_gelu backward", i, f(gx)[i], f(g)[i] * gelu_grad(z), 1e-5);
      else k.near("bias_gelu", i, f(y)[i], gelu(z), 1e-5);
    }
    if (backward) {
      double s = 0;
      for (int64_t r = 0; r < rows; ++r) s += f(gx)[r * N];
      k.near("bias_gelu backward (bias)", 0, f(gb)[0], s, 1e-5);
    }
    return k.error;
  };
  c.bytes = (backward ? 3.0 : 2.0) * n * 4;
  return c;
}

Case bias_gelu_fwd(const Dims& d) { return bias_gelu_case(d, false); }
Case bias_gelu_bwd(const Dims& d) { return bias_gelu_case(d, true); }

// ---- exp over a tensor (the vectorised exp of tensor/cpu/vec_math.h that softmax, cross_entropy, attention
// and the sigmoid-family activations use), on inputs spread over [-20, 20] ---------------------------------

Case exp_case(const Dims& d) {
  int64_t n = d[0] * d[1];
  Tensor x = uniform({d[0], d[1]}, -20, 20, 1), y = Tensor::empty({d[0], d[1]});
  Case c;
  c.run = [=]() mutable { cpu::unary(cpu::UnaryOp::exp, x, 0, y); };
  c.check = [=] {
    Check k;
    for (int64_t i = 0; i < n; ++i) {  // every element: relative error of a few ulps
      double want = std::exp(double(f(x)[i]));
      k.near("exp", i, f(y)[i] / want, 1, 5e-7);
    }
    return k.error;
  };
  c.bytes = 2.0 * n * 4;
  return c;
}

// ---- fused AdamW: p, g, m, v read; p, m, v written --------------------------------------------------------

Case adamw_case(const Dims& d) {
  int64_t n = d[0];
  Tensor p = uniform({n}, -1, 1, 1), g = uniform({n}, -1, 1, 2), m = uniform({n}, -0.1f, 0.1f, 3);
  Tensor v = uniform({n}, 0, 0.01f, 4);
  Tensor p0 = p.clone(), m0 = m.clone(), v0 = v.clone();
  const cpu::AdamWCoeffs k{1e-3, 0.9, 0.999, 1e-8, 0.01, 10};
  Case c;
  c.run = [=]() mutable { cpu::adamw_steps({{&p, &m, &v, &g, k}}); };
  c.check = [=] {  // torch.optim.AdamW's step written out, from the saved initial state
    Check ck;
    for (int64_t i : sample(n)) {
      double gi = f(g)[i], mi = 0.9 * f(m0)[i] + 0.1 * gi, vi = 0.999 * f(v0)[i] + 0.001 * gi * gi;
      double denom = std::sqrt(vi) / std::sqrt(1 - std::pow(0.999, 10)) + 1e-8;
      double want = f(p0)[i] * (1 - 1e-3 * 0.01) - 1e-3 / (1 - std::pow(0.9, 10)) * mi / denom;
      ck.near("adamw p", i, f(p)[i], want, 1e-5);
      ck.near("adamw m", i, f(m)[i], mi, 1e-5);
      ck.near("adamw v", i, f(v)[i], vi, 1e-5);
    }
    return ck.error;
  };
  c.bytes = 7.0 * n * 4;
  return c;
}

// ---- timing and counters -------------------------------------------------------------------------------

void set_counters(benchmark::State& state, const Case& c, double seconds, int threads) {
  double runs = double(state.iterations());
  double gbps = c.bytes * runs / seconds * 1e-9, gflops = c.flops * runs / seconds * 1e-9;
  state.counters["GB/s"] = gbps;
  if (c.flops > 0) state.counters["GFLOP/s"] = gflops;
  namespace pb = psa::bench;
  double ceiling = c.compute_bound ? pb::peak_fma_gflops(threads) : pb::copy_gbps(threads, int64_t(c.bytes));
  state.counters["ceiling"] = ceiling;
  state.counters["pct_ceiling"] = 100 * (c.compute_bound ? gflops : gbps) / ceiling;
  state.SetLabel(c.compute_bound ? "of FMA peak"
                                 : "of copy, " + pb::size_name(2 * pb::copy_buffer_bytes(int64_t(c.bytes))) + " footprint");
}

void run_case(benchmark::State& state, Factory make, Dims dims, int threads, std::string key) {
  omp_set_num_threads(threads);
  Case c = make(dims);
  static std::set<std::string> validated;  // once per kernel and shape, not per thread count or repetition
  if (!validated.count(key)) {
    c.run();
    std::string err = c.check();
    if (!err.empty()) {
      state.SkipWithError(err.c_str());
      for (auto _ : state) {
      }
      return;
    }
    validated.insert(key);
  }
  c.run();  // warm up: pages touched, threads started
  double t0 = psa::bench::now_seconds();
  for (auto _ : state) {
    c.run();
    benchmark::ClobberMemory();
  }
  set_counters(state, c, psa::bench::now_seconds() - t0, threads);
}

// ---- registration --------------------------------------------------------------------------------------

struct Family {
  const char* name;
  Factory make;
  std::vector<Size> sizes;
};

// Each family at the shapes of bench/shapes.h.
std::vector<Family> families() {
  return {
      {"softmax", softmax_fwd, logits},
      {"softmax_bwd", softmax_bwd, logits},
      {"layer_norm", layer_norm_fwd, vit_rows},
      {"layer_norm_bwd", layer_norm_bwd, vit_rows},
      {"rms_norm", rms_norm_fwd, llm_rows},
      {"rms_norm_bwd", rms_norm_bwd, llm_rows},
      {"attention", attention_fwd, heads},
      {"attention_fwd_bwd", attention_fwd_bwd, heads},
      {"vit_attention", vit_attention_fwd, vit_heads},
      {"vit_attention_fwd_bwd", vit_attention_fwd_bwd, vit_heads},
      {"embedding", embedding_fwd, vocab},
      {"embedding_bwd", embedding_bwd, vocab},
      {"patch_conv", patch_conv_fwd, images},
      {"patch_conv_bwd", patch_conv_bwd, images},
      {"depthwise_conv3x3", depthwise_fwd, grids},
      {"depthwise_conv3x3_bwd", depthwise_bwd, grids},
      {"adaptive_avg_pool2d", pool_fwd, pools},
      {"adaptive_avg_pool2d_bwd", pool_bwd, pools},
      {"cross_entropy", cross_entropy_fwd, logits},
      {"cross_entropy_bwd", cross_entropy_bwd, logits},
      {"add", add_case, mlp_rows},
      {"head_permute", head_permute_case, heads},
      {"silu", silu_fwd, mlp_rows},
      {"silu_bwd", silu_bwd, mlp_rows},
      {"swiglu", swiglu_fwd, mlp_rows},
      {"swiglu_bwd", swiglu_bwd, mlp_rows},
      {"bias_gelu", bias_gelu_fwd, projector},
      {"bias_gelu_bwd", bias_gelu_bwd, projector},
      {"exp", exp_case, logits},
      {"adamw", adamw_case, {{"1M", {1 << 20}}}},
  };
}

std::string dims_name(const Dims& d) {
  std::string s;
  for (int64_t x : d) s += (s.empty() ? "" : "x") + std::to_string(x);
  return s;
}

const bool registered = [] {
  for (const Family& fam : families())
    for (const Size& size : fam.sizes) {
      std::string key = std::string(fam.name) + "/" + size.name + "/" + dims_name(size.dims);
      for (int threads : {1, 2})
        benchmark::RegisterBenchmark((key + "/threads=" + std::to_string(threads)).c_str(), run_case, fam.make,
                                     size.dims, threads, key)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
    }
  return true;
}();

}  // namespace
