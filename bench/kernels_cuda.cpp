// Throughput of every CUDA kernel family (tensor/cuda/kernels.h), the GPU counterpart of bench/kernels.cpp,
// called directly (no autograd), at the shapes bench/kernels.cpp uses: what the `tiny` and `small` presets
// run (16 x 103 and 32 x 127 merged tokens, design.md) and one larger "square" size; GEMMs (cuBLAS and the
// own SGEMM, interleaved per shape) at 1024², 2048², 4096² and the two presets' linear layers.
//
// Timing: per iteration, an L2 flush (2x the L2 size written, not timed), then CUDA events around one call;
// the event time is the iteration time (UseManualTime / SetIterationTime). The time includes whatever the
// kernel's host wrapper does that stalls the stream: index_select and index_add copy their ids to the host
// for bounds checks (and index_add uploads its row lists), exactly what a training step pays.
//
// Counters per benchmark:
//   GB/s         the minimal traffic (every input read once, every output written once) per second
//   GFLOP/s      GEMMs: 2·M·N·K; attention: the products over the causal pairs only (forward QKᵀ and PV,
//                backward 5 products, as a kernel that recomputes nothing extra would need); patch_conv: its GEMM
//   ceiling      measured once in this process (bench/ceiling_cuda.h): cuBLAS SGEMM 8192² GFLOP/s for the
//                compute-bound ones (GEMM, attention, patch_conv), device-to-device copy GB/s for the rest
//   pct_ceiling  achieved / ceiling, in percent
// Every kernel is checked once per shape before it is timed, against the CPU kernel (tensor/cpu/kernels.h) on
// the same inputs: normalised max error max |cuda - cpu| / (1 + |cpu|) at most 1e-5 (5e-4 for GEMM, attention,
// patch_conv, as tests/test_cuda.cpp); a mismatch or an exception skips the benchmark with the reason.
//
// Without CUDA in the build, or without a device, it prints one line, writes an empty JSON result when
// --benchmark_out asks for one (so `make bench` and tools/bench_report.py see a valid file), and exits 0.
// --budget_s=S (ours, not Google Benchmark's): once S seconds have passed, the remaining benchmarks skip with
// "time budget spent", so a capped run still ends with a complete JSON file (bench/gpu_check.sh uses it).
//
// Run: build/bench_kernels_cuda --benchmark_min_time=0.05 --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#ifdef PSA_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>

#include "bench/ceiling_cuda.h"
#include "bench/inputs.h"
#include "bench/shapes.h"
#include "tensor/cpu/kernels.h"
#include "tensor/cuda/kernels.h"
#include "tensor/device.h"
#endif

namespace {

// ---- command line outside Google Benchmark ------------------------------------------------------------------

// The value of --name=value in argv, or "" (Google Benchmark's flags only take the = form too).
std::string flag_value(int argc, char** argv, const char* name) {
  std::string prefix = std::string("--") + name + "=";
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) return argv[i] + prefix.size();
  return "";
}

// Nothing to run: one line on stdout, and a valid, empty Google Benchmark JSON file where --benchmark_out asks
// for one (Google Benchmark itself leaves an empty, unparsable file when no benchmark is registered).
int skip_everything(int argc, char** argv, const std::string& why) {
  std::printf("bench_kernels_cuda: %s\n", why.c_str());
  std::string out = flag_value(argc, argv, "benchmark_out"), format = flag_value(argc, argv, "benchmark_out_format");
  if (out.empty() || !(format.empty() || format == "json")) return 0;
  std::ofstream f(out);
  f << "{\n  \"context\": {\"bench_kernels_cuda\": \"" << why << "\"},\n  \"benchmarks\": []\n}\n";
  if (!f) std::fprintf(stderr, "bench_kernels_cuda: cannot write %s\n", out.c_str());
  return f ? 0 : 1;
}

}  // namespace

#ifdef PSA_CUDA
namespace {

using psa::Device;
using psa::DType;
using psa::Shape;
using psa::Tensor;
namespace cpu = psa::cpu;
namespace cuda = psa::cuda;
namespace pg = psa::bench::gpu;
using Dims = std::vector<int64_t>;
using psa::bench::ids;
using psa::bench::targets_one_in_three;
using psa::bench::uniform;
using psa::bench::Size;
using namespace psa::bench::shapes;

// ---- inputs: generated on the host (the CPU reference reads them there), copied to the device ------------------

Tensor dev(const Tensor& host) { return host.to(Device::cuda); }
Tensor dempty(const Shape& shape) { return Tensor::empty(shape, DType::f32, Device::cuda); }

// ---- a benchmark case -------------------------------------------------------------------------------------

struct Case {
  std::function<void()> run;                      // one call of the CUDA kernel on device tensors
  std::function<std::vector<Tensor>()> expected;  // the CPU kernel on the same inputs (host tensors)
  std::vector<std::pair<std::string, Tensor>> got;  // the device outputs, in the order of expected()
  double tol = 1e-5;                              // normalised max error allowed (GEMM-class: 5e-4)
  double bytes = 0;                               // minimal traffic of one call
  double flops = 0;                               // useful flops of one call (0: not counted)
  bool compute_bound = false;
};
using Factory = std::function<Case(const Dims&)>;

constexpr double kGemmTol = 5e-4;

// "" when `got` (copied back from the device) matches `want`, else where and by how much it differs.
std::string compare(const std::string& what, const Tensor& want, const Tensor& got, double tol) {
  if (want.shape() != got.shape())
    return what + ": shape " + psa::shape_str(got.shape()) + " vs cpu " + psa::shape_str(want.shape());
  std::vector<double> w = want.to_vector(), g = got.to_vector();
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    double e = std::fabs(g[i] - w[i]) / (1 + std::fabs(w[i]));
    if (!(e <= worst)) worst = e, at = i;  // written so that a NaN on either side becomes the worst
    if (std::isnan(e)) break;
  }
  if (worst <= tol) return "";
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s: normalised error %.3g > %.0e at element %zu (cuda %.7g, cpu %.7g)", what.c_str(),
                worst, tol, at, g[at], w[at]);
  return buf;
}

// Runs the CUDA kernel once and compares every output with the CPU kernel's.
std::string validate(Case& c) {
  c.run();
  std::vector<Tensor> want = c.expected();
  for (size_t i = 0; i < c.got.size(); ++i) {
    std::string err = compare(c.got[i].first, want.at(i), c.got[i].second.to(Device::cpu), c.tol);
    if (!err.empty()) return err;
  }
  return "";
}

// ---- GEMM: C[M, N] = op(A)·op(B), dims {ta, tb, M, N, K}, cuBLAS or the own SGEMM ----------------------------

Case gemm_case(const Dims& d, cuda::GemmImpl impl) {
  bool ta = d[0], tb = d[1];
  int64_t M = d[2], N = d[3], K = d[4], lda = ta ? M : K, ldb = tb ? K : N;
  Tensor a = uniform(ta ? Shape{K, M} : Shape{M, K}, -1, 1, 1), b = uniform(tb ? Shape{N, K} : Shape{K, N}, -1, 1, 2);
  Tensor da = dev(a), db = dev(b), dc = dempty({M, N});
  Case c;
  c.run = [=] {
    cuda::sgemm(impl, ta, tb, M, N, K, 1.0f, da.data<float>(), lda, 0, db.data<float>(), ldb, 0, 0.0f,
                dc.data<float>(), N, 0, 1);
  };
  c.expected = [=] {
    Tensor out = Tensor::empty({M, N});
    cpu::matmul(a, b, ta, tb, 1, M, N, K, 0, 0, out);
    return std::vector<Tensor>{out};
  };
  c.got = {{"C", dc}};
  c.tol = kGemmTol;
  c.flops = 2.0 * M * N * K;
  c.bytes = (M * K + K * N + M * N) * 4.0;
  c.compute_bound = true;
  return c;
}

Case gemm_cublas(const Dims& d) { return gemm_case(d, cuda::GemmImpl::cublas); }
Case gemm_own(const Dims& d) { return gemm_case(d, cuda::GemmImpl::own); }

// ---- softmax over rows of V (the LM head's probabilities) ---------------------------------------------------

Case softmax_case(const Dims& d, bool backward) {
  int64_t R = d[0], V = d[1];
  Tensor x = uniform({R, V}, -4, 4, 1), g = uniform({R, V}, -1, 1, 2), y = Tensor::empty({R, V});
  cpu::softmax(x, R, V, 1, false, y);  // the backward's saved output, the same on both sides
  Tensor dx = dev(x), dy = dev(y), dg = dev(g), out = dempty({R, V});
  Case c;
  if (backward) {
    c.run = [=]() mutable { cuda::softmax_backward(dg, dy, R, V, 1, false, out); };
    c.expected = [=]() mutable {
      Tensor gx = Tensor::empty({R, V});
      cpu::softmax_backward(g, y, R, V, 1, false, gx);
      return std::vector<Tensor>{gx};
    };
  } else {
    c.run = [=]() mutable { cuda::softmax(dx, R, V, 1, false, out); };
    c.expected = [=] { return std::vector<Tensor>{y}; };
  }
  c.got = {{backward ? "softmax_backward" : "softmax", out}};
  c.bytes = (backward ? 3.0 : 2.0) * R * V * 4;
  return c;
}

Case softmax_fwd(const Dims& d) { return softmax_case(d, false); }
Case softmax_bwd(const Dims& d) { return softmax_case(d, true); }

// ---- layer_norm and rms_norm over the last dim C ---------------------------------------------------------

Case norm_fwd(const Dims& d, bool rms) {
  int64_t R = d[0], C = d[1];
  Tensor x = uniform({R, C}, -2, 2, 1), w = uniform({C}, 0.5, 1.5, 2), b = uniform({C}, -1, 1, 3);
  Tensor dx = dev(x), dw = dev(w), db = dev(b), y = dempty({R, C}), mean = dempty({R}), rstd = dempty({R});
  Case c;
  c.run = [=]() mutable {
    if (rms) cuda::rms_norm(dx, dw, 1e-5, y, rstd);
    else cuda::layer_norm(dx, dw, db, 1e-5, y, mean, rstd);
  };
  c.expected = [=] {
    Tensor hy = Tensor::empty({R, C}), hmean = Tensor::empty({R}), hrstd = Tensor::empty({R});
    if (rms) cpu::rms_norm(x, w, 1e-5, hy, hrstd);
    else cpu::layer_norm(x, w, b, 1e-5, hy, hmean, hrstd);
    return rms ? std::vector<Tensor>{hy, hrstd} : std::vector<Tensor>{hy, hmean, hrstd};
  };
  c.got = {{"y", y}, {"rstd", rstd}};
  if (!rms) c.got.insert(c.got.begin() + 1, {"mean", mean});
  c.bytes = (2.0 * R * C + (rms ? 1 : 2) * C) * 4 + (rms ? 1 : 2) * R * 4.0;
  return c;
}

Case norm_bwd(const Dims& d, bool rms) {
  int64_t R = d[0], C = d[1];
  Tensor x = uniform({R, C}, -2, 2, 1), w = uniform({C}, 0.5, 1.5, 2), g = uniform({R, C}, -1, 1, 4);
  Tensor y = Tensor::empty({R, C}), mean = Tensor::empty({R}), rstd = Tensor::empty({R});
  if (rms) cpu::rms_norm(x, w, 1e-5, y, rstd);  // saved statistics, the same on both sides
  else cpu::layer_norm(x, w, Tensor(), 1e-5, y, mean, rstd);
  Tensor dx = dev(x), dw = dev(w), dg = dev(g), dmean = dev(mean), drstd = dev(rstd);
  Tensor gx = dempty({R, C}), gw = dempty({C}), gb = dempty({C});
  Case c;
  c.run = [=]() mutable {
    if (rms) cuda::rms_norm_backward(dg, dx, dw, drstd, gx, gw);
    else cuda::layer_norm_backward(dg, dx, dw, dmean, drstd, gx, gw, gb);
  };
  c.expected = [=] {
    Tensor hgx = Tensor::empty({R, C}), hgw = Tensor::empty({C}), hgb = Tensor::empty({C});
    if (rms) cpu::rms_norm_backward(g, x, w, rstd, hgx, hgw);
    else cpu::layer_norm_backward(g, x, w, mean, rstd, hgx, hgw, hgb);
    return rms ? std::vector<Tensor>{hgx, hgw} : std::vector<Tensor>{hgx, hgw, hgb};
  };
  c.got = {{"gx", gx}, {"gw", gw}};
  if (!rms) c.got.push_back({"gb", gb});
  c.bytes = (3.0 * R * C + (rms ? 2 : 3) * C) * 4 + (rms ? 1 : 2) * R * 4.0;
  return c;
}

Case layer_norm_fwd(const Dims& d) { return norm_fwd(d, false); }
Case layer_norm_bwd(const Dims& d) { return norm_bwd(d, false); }
Case rms_norm_fwd(const Dims& d) { return norm_fwd(d, true); }
Case rms_norm_bwd(const Dims& d) { return norm_bwd(d, true); }

// ---- causal attention, q/k/v [B, T, H, D] (dims given as B, H, T, D): flash forward (saves lse [B, H, T]) and its
// backward

// Products a kernel needs at least over the T(T+1)/2 visible (query, key) pairs of each (b, h), 2·D flops each:
// forward QKᵀ and PV; backward QKᵀ again (from lse), dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q.
double attention_flops(int64_t B, int64_t H, int64_t T, int64_t D, bool backward) {
  return (backward ? 5.0 : 2.0) * 2.0 * D * (T * (T + 1) / 2.0) * B * H;
}

Case attention_case(const Dims& d, bool backward) {
  int64_t B = d[0], H = d[1], T = d[2], D = d[3];
  Shape s{B, T, H, D};
  Tensor q = uniform(s, -1, 1, 1), k = uniform(s, -1, 1, 2), v = uniform(s, -1, 1, 3), g = uniform(s, -1, 1, 4);
  Tensor dq = dev(q), dk = dev(k), dv = dev(v), dg = dev(g);
  Tensor out = dempty(s), lse = dempty({B, H, T}), gq = dempty(s), gk = dempty(s), gv = dempty(s);
  const double scale = 1 / std::sqrt(double(D));
  Case c;
  if (backward) {
    cuda::attention(dq, dk, dv, Tensor(), true, scale, out, lse);  // what the backward reads: O and lse
    c.run = [=]() mutable { cuda::attention_backward(dg, dq, dk, dv, out, lse, Tensor(), true, scale, gq, gk, gv); };
  } else {
    c.run = [=]() mutable { cuda::attention(dq, dk, dv, Tensor(), true, scale, out, lse); };
  }
  c.expected = [=] {
    Tensor hout = Tensor::empty(s), probs = Tensor::empty({B, H, T, T});
    cpu::attention(q, k, v, Tensor(), true, scale, hout, probs);
    if (!backward) return std::vector<Tensor>{hout};
    Tensor hgq = Tensor::empty(s), hgk = Tensor::empty(s), hgv = Tensor::empty(s);
    cpu::attention_backward(g, q, k, v, probs, true, scale, hgq, hgk, hgv);
    return std::vector<Tensor>{hgq, hgk, hgv};
  };
  // The forward's lse has no CPU counterpart (the CPU saves probabilities); the backward, which reads the
  // CUDA lse, checks it indirectly.
  if (backward) c.got = {{"attention gq", gq}, {"attention gk", gk}, {"attention gv", gv}};
  else c.got = {{"attention out", out}};
  c.tol = kGemmTol;
  c.flops = attention_flops(B, H, T, D, backward);
  c.bytes = (backward ? 8.0 * B * H * T * D + B * H * T : 4.0 * B * H * T * D + B * H * T) * 4;
  c.compute_bound = true;
  return c;
}

Case attention_fwd(const Dims& d) { return attention_case(d, false); }
Case attention_bwd(const Dims& d) { return attention_case(d, true); }

// The earlier "rows" design of the attention kernels (kernels.h AttentionKernel), timed beside the default
// "tiles" one so that one GPU run ranks them.
Case with_rows_kernels(Case c) {
  c.run = [run = c.run]() {
    const cuda::AttentionKernel before = cuda::attention_kernel();
    cuda::set_attention_kernel(cuda::AttentionKernel::rows);
    run();
    cuda::set_attention_kernel(before);
  };
  return c;
}
Case attention_rows_fwd(const Dims& d) { return with_rows_kernels(attention_case(d, false)); }
Case attention_rows_bwd(const Dims& d) { return with_rows_kernels(attention_case(d, true)); }

// ---- rope: x [B, T, H, D] (dims given as B, H, T, D) with cos/sin [T, D] ------------------------------------------

Case rope_case(const Dims& d, bool backward) {
  int64_t B = d[0], H = d[1], T = d[2], D = d[3];
  Shape s{B, T, H, D};
  Tensor x = uniform(s, -1, 1, 1);
  Tensor cs = uniform({T, D}, -1, 1, 2), sn = uniform({T, D}, -1, 1, 3);
  Tensor dx = dev(x), dcs = dev(cs), dsn = dev(sn), out = dempty(s);
  Case c;
  c.run = [=]() mutable {
    if (backward) cuda::rope_backward(dx, dcs, dsn, out);
    else cuda::rope(dx, dcs, dsn, out);
  };
  c.expected = [=] {
    Tensor hout = Tensor::empty(s);
    if (backward) cpu::rope_backward(x, cs, sn, hout);
    else cpu::rope(x, cs, sn, hout);
    return std::vector<Tensor>{hout};
  };
  c.got = {{backward ? "rope_backward" : "rope", out}};
  c.bytes = (2.0 * B * H * T * D + 2.0 * T * D) * 4;
  return c;
}

Case rope_fwd(const Dims& d) { return rope_case(d, false); }
Case rope_bwd(const Dims& d) { return rope_case(d, true); }

// ---- a 4-D permute at the attention shapes, [B, T, H, D] -> [B, H, T, D] (attention reads the heads in place) ------

Case permute_case(const Dims& d) {
  int64_t B = d[0], H = d[1], T = d[2], D = d[3];
  Tensor a = uniform({B, T, H, D}, -1, 1, 1), da = dev(a), out = dempty({B, H, T, D});
  const std::vector<int64_t> perm{0, 2, 1, 3};
  Case c;
  c.run = [=]() mutable { cuda::permute(da, perm, out); };
  c.expected = [=] {
    Tensor hout = Tensor::empty({B, H, T, D});
    cpu::permute(a, perm, hout);
    return std::vector<Tensor>{hout};
  };
  c.got = {{"permute", out}};
  c.bytes = 2.0 * B * H * T * D * 4;
  return c;
}

// ---- embedding gather: weight [V, C], ids [N] -> [N, C], and its backward (scatter-add into [V, C]) ----------

Case embedding_case(const Dims& d, bool backward) {
  int64_t V = d[0], C = d[1], N = d[2];
  Tensor w = uniform({V, C}, -1, 1, 1), g = uniform({N, C}, -1, 1, 3), id = ids(N, V, 2);
  Tensor dw = dev(w), dg = dev(g), did = dev(id), out = dempty({N, C}), gw = dempty({V, C});
  Case c;
  c.run = [=]() mutable {
    if (backward) cuda::index_add(dg, 1, V, C, did, gw);
    else cuda::index_select(dw, 1, V, C, did, out);
  };
  c.expected = [=] {
    Tensor h = backward ? Tensor::empty({V, C}) : Tensor::empty({N, C});
    if (backward) cpu::index_add(g, 1, V, C, id, h);
    else cpu::index_select(w, 1, V, C, id, h);
    return std::vector<Tensor>{h};
  };
  c.got = {{backward ? "embedding backward" : "embedding", backward ? gw : out}};
  // forward: ids, N rows read, N rows written; backward: ids, N rows of g read, every row of gw written once
  c.bytes = (backward ? (N * C + V * C) * 4.0 : 2.0 * N * C * 4) + N * 8.0;
  return c;
}

Case embedding_fwd(const Dims& d) { return embedding_case(d, false); }
Case embedding_bwd(const Dims& d) { return embedding_case(d, true); }

// ---- patch_conv (kernel = stride = p): x [B, Ci, S, S], w [O, Ci, p, p] -> [B, O, S/p, S/p] --------------------

Case patch_conv_case(const Dims& d, bool backward) {
  int64_t B = d[0], Ci = d[1], S = d[2], O = d[3], p = d[4], Sp = S / p, L = Sp * Sp, K = Ci * p * p;
  Tensor x = uniform({B, Ci, S, S}, -1, 1, 1), w = uniform({O, Ci, p, p}, -0.1f, 0.1f, 2), bias = uniform({O}, -1, 1, 3);
  Tensor g = uniform({B, O, Sp, Sp}, -1, 1, 4);
  Tensor dx = dev(x), dw = dev(w), dbias = dev(bias), dg = dev(g);
  Tensor out = dempty({B, O, Sp, Sp}), gw = dempty({O, Ci, p, p}), gb = dempty({O});
  Case c;
  // The pixels need no gradient in training, so the backward computes only gw and gbias (gx undefined).
  c.run = [=]() mutable {
    Tensor no_gx;
    if (backward) cuda::patch_conv_backward(dg, dx, dw, no_gx, gw, gb);
    else cuda::patch_conv(dx, dw, dbias, out);
  };
  c.expected = [=] {
    Tensor no_gx, hout = Tensor::empty({B, O, Sp, Sp}), hgw = Tensor::empty({O, Ci, p, p}), hgb = Tensor::empty({O});
    if (!backward) {
      cpu::patch_conv(x, w, bias, hout);
      return std::vector<Tensor>{hout};
    }
    cpu::patch_conv_backward(g, x, w, no_gx, hgw, hgb);
    return std::vector<Tensor>{hgw, hgb};
  };
  if (backward) c.got = {{"patch_conv gw", gw}, {"patch_conv gbias", gb}};
  else c.got = {{"patch_conv", out}};
  c.tol = kGemmTol;
  c.flops = 2.0 * B * L * K * O;
  c.bytes = (backward ? B * O * L + B * Ci * S * S + O * K + O : B * Ci * S * S + O * K + O + B * O * L) * 4.0;
  c.compute_bound = true;
  return c;
}

Case patch_conv_fwd(const Dims& d) { return patch_conv_case(d, false); }
Case patch_conv_bwd(const Dims& d) { return patch_conv_case(d, true); }

// ---- depthwise 3x3 conv, padding 1, on token grids x [B, H, W, C] (the C-Abstractor's RegNet blocks) ----------

Case depthwise_case(const Dims& d, bool backward) {
  int64_t B = d[0], H = d[1], W = d[2], C = d[3], n = B * H * W * C;
  Tensor x = uniform({B, H, W, C}, -1, 1, 1), w = uniform({C, 1, 3, 3}, -1, 1, 2), g = uniform({B, H, W, C}, -1, 1, 3);
  Tensor dx = dev(x), dw = dev(w), dg = dev(g), out = dempty({B, H, W, C}), gx = dempty({B, H, W, C});
  Tensor gw = dempty({C, 1, 3, 3});
  Case c;
  c.run = [=]() mutable {
    if (backward) cuda::depthwise_conv3x3_backward(dg, dx, dw, gx, gw);
    else cuda::depthwise_conv3x3(dx, dw, out);
  };
  c.expected = [=] {
    Tensor hout = Tensor::empty({B, H, W, C}), hgw = Tensor::empty({C, 1, 3, 3});
    if (!backward) {
      cpu::depthwise_conv3x3(x, w, hout);
      return std::vector<Tensor>{hout};
    }
    cpu::depthwise_conv3x3_backward(g, x, w, hout, hgw);
    return std::vector<Tensor>{hout, hgw};
  };
  if (backward) c.got = {{"depthwise gx", gx}, {"depthwise gw", gw}};
  else c.got = {{"depthwise", out}};
  c.bytes = ((backward ? 3.0 : 2.0) * n + 9 * C) * 4;
  return c;
}

Case depthwise_fwd(const Dims& d) { return depthwise_case(d, false); }
Case depthwise_bwd(const Dims& d) { return depthwise_case(d, true); }

// ---- adaptive_avg_pool2d on [B, H, W, C] -> [B, q, q, C] with torch's bins ------------------------------------

Case pool_case(const Dims& d, bool backward) {
  int64_t B = d[0], H = d[1], W = d[2], C = d[3], q = d[4];
  Tensor x = uniform({B, H, W, C}, -1, 1, 1), g = uniform({B, q, q, C}, -1, 1, 2);
  Tensor dx = dev(x), dg = dev(g), out = dempty({B, q, q, C}), gx = dempty({B, H, W, C});
  Case c;
  c.run = [=]() mutable {
    if (backward) cuda::adaptive_avg_pool2d_backward(dg, gx);
    else cuda::adaptive_avg_pool2d(dx, out);
  };
  c.expected = [=] {
    Tensor h = backward ? Tensor::empty({B, H, W, C}) : Tensor::empty({B, q, q, C});
    if (backward) cpu::adaptive_avg_pool2d_backward(g, h);
    else cpu::adaptive_avg_pool2d(x, h);
    return std::vector<Tensor>{h};
  };
  c.got = {{backward ? "adaptive_avg_pool2d backward" : "adaptive_avg_pool2d", backward ? gx : out}};
  c.bytes = (B * H * W * C + B * q * q * C) * 4.0;
  return c;
}

Case pool_fwd(const Dims& d) { return pool_case(d, false); }
Case pool_bwd(const Dims& d) { return pool_case(d, true); }

// ---- cross_entropy over logits [N, V]; like the LM loss, only some rows count (here one in three) -------------

Case cross_entropy_case(const Dims& d, bool backward) {
  int64_t N = d[0], V = d[1], count = (N + 2) / 3;
  Tensor x = uniform({N, V}, -4, 4, 1), t = targets_one_in_three(N, V);
  Tensor loss = Tensor::empty({}), lse = Tensor::empty({N});
  cpu::cross_entropy(x, t, -100, count, loss, lse);  // the backward's saved lse, the same on both sides
  Tensor dx = dev(x), dt = dev(t), dlse_in = dev(lse), one = Tensor::scalar(1.0, DType::f32, Device::cuda);
  Tensor dloss = Tensor::empty({}, DType::f32, Device::cuda), dlse = dempty({N}), gx = dempty({N, V});
  Case c;
  c.run = [=]() mutable {
    if (backward) cuda::cross_entropy_backward(one, dx, dt, dlse_in, -100, count, gx);
    else cuda::cross_entropy(dx, dt, -100, count, dloss, dlse);
  };
  c.expected = [=] {
    if (!backward) return std::vector<Tensor>{loss, lse};
    Tensor hgx = Tensor::empty({N, V});
    cpu::cross_entropy_backward(Tensor::scalar(1.0), x, t, lse, -100, count, hgx);
    return std::vector<Tensor>{hgx};
  };
  if (backward) c.got = {{"cross_entropy backward", gx}};
  else c.got = {{"cross_entropy loss", dloss}, {"cross_entropy lse", dlse}};
  // Only counted rows' logits are read (forward and backward); backward writes every row.
  c.bytes = backward ? (double(count) * V + N * V + N) * 4 + N * 8.0 : (double(count) * V + N) * 4 + N * 8.0;
  return c;
}

Case cross_entropy_fwd(const Dims& d) { return cross_entropy_case(d, false); }
Case cross_entropy_bwd(const Dims& d) { return cross_entropy_case(d, true); }

// ---- elementwise: add (residuals), silu and swiglu (the LLM's MLP) -------------------------------------------------

Case add_case(const Dims& d) {
  Shape s{d[0], d[1]};
  Tensor a = uniform(s, -1, 1, 1), b = uniform(s, -1, 1, 2), da = dev(a), db = dev(b), out = dempty(s);
  Case c;
  c.run = [=]() mutable { cuda::binary(cuda::BinaryOp::add, da, db, out); };
  c.expected = [=] {
    Tensor h = Tensor::empty(s);
    cpu::binary(cpu::BinaryOp::add, a, b, h);
    return std::vector<Tensor>{h};
  };
  c.got = {{"add", out}};
  c.bytes = 3.0 * d[0] * d[1] * 4;
  return c;
}

Case silu_case(const Dims& d, bool backward) {
  Shape s{d[0], d[1]};
  Tensor x = uniform(s, -6, 6, 1), g = uniform(s, -1, 1, 2), y = Tensor::empty(s);
  cpu::unary(cpu::UnaryOp::silu, x, 0, y);
  Tensor dx = dev(x), dy = dev(y), dg = dev(g), out = dempty(s);
  Case c;
  c.run = [=]() mutable {
    if (backward) cuda::unary_backward(cuda::UnaryOp::silu, dx, dy, dg, 0, out);
    else cuda::unary(cuda::UnaryOp::silu, dx, 0, out);
  };
  c.expected = [=] {
    if (!backward) return std::vector<Tensor>{y};
    Tensor gx = Tensor::empty(s);
    cpu::unary_backward(cpu::UnaryOp::silu, x, y, g, 0, gx);
    return std::vector<Tensor>{gx};
  };
  c.got = {{backward ? "silu backward" : "silu", out}};
  c.bytes = (backward ? 3.0 : 2.0) * d[0] * d[1] * 4;  // silu's derivative is recomputed from x: y is not read
  return c;
}

Case silu_fwd(const Dims& d) { return silu_case(d, false); }
Case silu_bwd(const Dims& d) { return silu_case(d, true); }

// swiglu = silu(gate)·up (forward reads 2 arrays and writes 1, backward reads 3 and writes 2).
Case swiglu_case(const Dims& d, bool backward) {
  Shape s{d[0], d[1]};
  Tensor x = uniform(s, -6, 6, 1), u = uniform(s, -1, 1, 3), g = uniform(s, -1, 1, 2);
  Tensor dx = dev(x), du = dev(u), dg = dev(g), y = dempty(s), gx = dempty(s), gu = dempty(s);
  Case c;
  c.run = [=]() mutable {
    if (backward) cuda::swiglu_backward(dx, du, dg, gx, gu);
    else cuda::swiglu(dx, du, y);
  };
  c.expected = [=] {
    Tensor hy = Tensor::empty(s), hgx = Tensor::empty(s), hgu = Tensor::empty(s);
    if (!backward) {
      cpu::swiglu(x, u, hy);
      return std::vector<Tensor>{hy};
    }
    cpu::swiglu_backward(x, u, g, hgx, hgu);
    return std::vector<Tensor>{hgx, hgu};
  };
  if (backward) c.got = {{"swiglu backward (gate)", gx}, {"swiglu backward (up)", gu}};
  else c.got = {{"swiglu", y}};
  c.bytes = (backward ? 5.0 : 3.0) * d[0] * d[1] * 4;
  return c;
}

Case swiglu_fwd(const Dims& d) { return swiglu_case(d, false); }
Case swiglu_bwd(const Dims& d) { return swiglu_case(d, true); }

// bias_act with the exact gelu over [rows, N] (the LLaVA projector's first layer); the backward also writes
// gbias = Σ_rows gx through the chunked column sums.
Case bias_gelu_case(const Dims& d, bool backward) {
  int64_t rows = d[0], N = d[1];
  Shape s{rows, N};
  Tensor x = uniform(s, -6, 6, 1), bias = uniform({N}, -1, 1, 4), g = uniform(s, -1, 1, 2);
  Tensor dx = dev(x), dbias = dev(bias), dg = dev(g), y = dempty(s), gx = dempty(s), gb = dempty({N});
  Case c;
  c.run = [=]() mutable {
    if (backward) cuda::bias_act_backward(cuda::UnaryOp::gelu, dx, dbias, dg, gx, gb);
    else cuda::bias_act(cuda::UnaryOp::gelu, dx, dbias, y);
  };
  c.expected = [=] {
    Tensor hy = Tensor::empty(s), hgx = Tensor::empty(s), hgb = Tensor::empty({N});
    if (!backward) {
      cpu::bias_act(cpu::UnaryOp::gelu, x, bias, hy);
      return std::vector<Tensor>{hy};
    }
    cpu::bias_act_backward(cpu::UnaryOp::gelu, x, bias, g, hgx, hgb);
    return std::vector<Tensor>{hgx, hgb};
  };
  if (backward) c.got = {{"bias_gelu backward (x)", gx}, {"bias_gelu backward (bias)", gb}};
  else c.got = {{"bias_gelu", y}};
  c.bytes = (backward ? 3.0 : 2.0) * rows * N * 4;
  return c;
}

Case bias_gelu_fwd(const Dims& d) { return bias_gelu_case(d, false); }
Case bias_gelu_bwd(const Dims& d) { return bias_gelu_case(d, true); }

// ---- sum over rows [R, C] -> [C] (bias gradients; reduce.cu) ------------------------------------------------------

Case sum_rows_case(const Dims& d) {
  int64_t R = d[0], C = d[1];
  Tensor a = uniform({R, C}, -1, 1, 1), da = dev(a), out = dempty({C});
  Case c;
  c.run = [=]() mutable { cuda::sum_dim(da, 1, R, C, out); };
  c.expected = [=] {
    Tensor h = Tensor::empty({C});
    cpu::sum_dim(a, 1, R, C, h);
    return std::vector<Tensor>{h};
  };
  c.got = {{"sum over rows", out}};
  c.bytes = (R * C + C) * 4.0;
  return c;
}

// ---- fused AdamW: p, g, m, v read; p, m, v written --------------------------------------------------------------

Case adamw_case(const Dims& d) {
  int64_t n = d[0];
  Tensor p = uniform({n}, -1, 1, 1), g = uniform({n}, -1, 1, 2), m = uniform({n}, -0.1f, 0.1f, 3);
  Tensor v = uniform({n}, 0, 0.01f, 4);
  Tensor dp = dev(p), dg = dev(g), dm = dev(m), dv = dev(v);
  const cpu::AdamWCoeffs k{1e-3, 0.9, 0.999, 1e-8, 0.01, 10};
  Case c;
  // In place: every timed call takes another step from the state the last one left (it stays finite).
  c.run = [=]() mutable { cuda::adamw_steps({{&dp, &dm, &dv, &dg, k}}); };
  c.expected = [=] {  // one step from the initial state, which validation's single call also starts from
    Tensor hp = p.clone(), hm = m.clone(), hv = v.clone();
    cpu::adamw_steps({{&hp, &hm, &hv, &g, k}});
    return std::vector<Tensor>{hp, hm, hv};
  };
  c.got = {{"adamw p", dp}, {"adamw m", dm}, {"adamw v", dv}};
  c.bytes = 7.0 * n * 4;
  return c;
}

// ---- the catalogue ------------------------------------------------------------------------------------------

struct Family {
  std::string name;
  Factory make;
  std::vector<Size> sizes;
};

std::string dims_name(const Size& s) {
  if (!s.dims_label.empty()) return s.dims_label;
  std::string out;
  for (int64_t x : s.dims) out += (out.empty() ? "" : "x") + std::to_string(x);
  return out;
}

// GEMM shapes {ta, tb, M, N, K}: squares, then per preset the LLM's linear layers over its token rows (tiny
// 16 x 103 = 1648, small 32 x 127 = 4064): fused qkv and MLP down forward, and the MLP up projection in its
// three forms, forward x·W (NN), input gradient dY·Wᵀ (NT), weight gradient xᵀ·dY (TN).
std::vector<Size> gemm_sizes() {
  std::vector<Size> out;
  auto add = [&](const std::string& name, bool ta, bool tb, int64_t M, int64_t N, int64_t K) {
    out.push_back({name + "_" + (ta ? "T" : "N") + (tb ? "T" : "N"), {ta, tb, M, N, K},
                   std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K)});
  };
  for (int64_t n : {1024, 2048, 4096}) add("square", false, false, n, n, n);
  struct Preset {
    const char* name;
    int64_t rows, width, mlp;
  };
  for (const Preset& p : {Preset{"tiny", 1648, 128, 352}, Preset{"small", 4064, 512, 1408}}) {
    add(p.name, false, false, p.rows, 3 * p.width, p.width);  // qkv
    add(p.name, false, false, p.rows, p.mlp, p.width);        // MLP up, forward
    add(p.name, false, true, p.rows, p.width, p.mlp);         // MLP up, input gradient
    add(p.name, true, false, p.width, p.mlp, p.rows);         // MLP up, weight gradient
    add(p.name, false, false, p.rows, p.width, p.mlp);        // MLP down, forward
  }
  return out;
}

// Each family at the shapes of bench/shapes.h, as bench/kernels.cpp, so that CPU and GPU tables line up.
std::vector<Family> families() {
  // AdamW per parameter tensor: the largest of tiny (MLP 128 x 352) and small (embedding 4096 x 512), and 4096².
  const std::vector<Size> params = {{"tiny", {128 * 352}}, {"small", {4096 * 512}}, {"square", {4096 * 4096}}};
  return {
      {"softmax", softmax_fwd, logits},
      {"softmax_bwd", softmax_bwd, logits},
      {"layer_norm", layer_norm_fwd, vit_rows},
      {"layer_norm_bwd", layer_norm_bwd, vit_rows},
      {"rms_norm", rms_norm_fwd, llm_rows},
      {"rms_norm_bwd", rms_norm_bwd, llm_rows},
      {"attention", attention_fwd, heads},
      {"attention_bwd", attention_bwd, heads},
      {"attention_rows", attention_rows_fwd, heads},
      {"attention_rows_bwd", attention_rows_bwd, heads},
      {"rope", rope_fwd, heads},
      {"rope_bwd", rope_bwd, heads},
      {"permute_heads", permute_case, heads},
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
      {"silu", silu_fwd, mlp_rows},
      {"silu_bwd", silu_bwd, mlp_rows},
      {"swiglu", swiglu_fwd, mlp_rows},
      {"swiglu_bwd", swiglu_bwd, mlp_rows},
      {"bias_gelu", bias_gelu_fwd, projector},
      {"bias_gelu_bwd", bias_gelu_bwd, projector},
      {"sum_rows", sum_rows_case, llm_rows},
      {"adamw", adamw_case, params},
  };
}

// ---- running one benchmark ------------------------------------------------------------------------------------

// Removes --name=value from argv so that Google Benchmark does not reject it as unknown.
void drop_flag(int* argc, char** argv, const char* name) {
  std::string prefix = std::string("--") + name + "=";
  int out = 1;
  for (int i = 1; i < *argc; ++i)
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) != 0) argv[out++] = argv[i];
  *argc = out;
  argv[out] = nullptr;
}

// What every benchmark shares: created in run_with_device (inside main's try, so a failing cudaMalloc or
// cudaEventCreate is reported, not thrown through Google Benchmark).
struct Run {
  double budget_s = 0;  // 0: no budget
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  pg::L2Flush flush;
  pg::EventTimer timer;
  bool budget_spent() const {
    return budget_s > 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > budget_s;
  }
};
std::unique_ptr<Run> g_run;

// Google Benchmark calls a benchmark function several times per repetition (growing the iteration count) and
// once more per repetition: the case is built and validated once, on the first call, and kept until the next
// benchmark needs its memory. A failure is remembered so that later calls skip at once.
struct Prepared {
  std::string key, error;
  std::unique_ptr<Case> c;
};

Case* prepare(const std::string& key, const Factory& make, const Dims& dims, std::string* error) {
  static Prepared p;
  if (p.key != key) {
    p.c.reset();  // frees the previous benchmark's device and host buffers first
    p.key = key;
    p.error.clear();
    try {
      auto c = std::make_unique<Case>(make(dims));
      p.error = validate(*c);
      if (p.error.empty()) p.c = std::move(c);
    } catch (const std::exception& e) {
      p.error = e.what();
    }
  }
  *error = p.error;
  return p.c.get();
}

void skip(benchmark::State& state, const std::string& why) {
  state.SkipWithError(why.c_str());
  for (auto _ : state) {
  }
}

void set_counters(benchmark::State& state, const Case& c, double seconds) {
  double runs = double(state.iterations());
  double gbps = c.bytes * runs / seconds * 1e-9, gflops = c.flops * runs / seconds * 1e-9;
  double ceiling = c.compute_bound ? pg::sgemm_gflops() : pg::copy_gbps();
  state.counters["GB/s"] = gbps;
  if (c.flops > 0) state.counters["GFLOP/s"] = gflops;
  state.counters["ceiling"] = ceiling;
  state.counters["pct_ceiling"] = 100 * (c.compute_bound ? gflops : gbps) / ceiling;
  state.SetLabel(c.compute_bound ? "of cuBLAS SGEMM 8192^2" : "of D2D copy");
}

void run_case(benchmark::State& state, Factory make, Dims dims, std::string key) {
  Run& r = *g_run;
  if (r.budget_spent()) return skip(state, "time budget spent (--budget_s)");
  std::string error;
  Case* c = prepare(key, make, dims, &error);
  if (!c) return skip(state, error);
  double total = 0;
  try {
    c->run();  // warm-up: clocks up, allocator blocks and cuBLAS handle already there
    psa::cuda::synchronize();
  } catch (const std::exception& e) {
    return skip(state, e.what());
  }
  for (auto _ : state) {
    double s = 0;
    try {
      r.flush.run();  // queued ahead of the start event: not timed
      r.timer.start();
      c->run();
      s = r.timer.stop_seconds();
    } catch (const std::exception& e) {
      state.SkipWithError(e.what());
      break;
    }
    // Never 0: Google Benchmark grows the iteration count by the ratio to --benchmark_min_time.
    s = std::max(s, 1e-7);
    state.SetIterationTime(s);
    total += s;
  }
  if (!state.error_occurred()) set_counters(state, *c, total);
}

void register_all() {
  std::vector<Family> fams = families();
  std::vector<Size> gemms = gemm_sizes();
  for (const Family& fam : fams)
    for (const Size& size : fam.sizes) {
      std::string key = fam.name + "/" + size.name + "/" + dims_name(size);
      benchmark::RegisterBenchmark(key.c_str(), run_case, fam.make, size.dims, key)
          ->Unit(benchmark::kMicrosecond)
          ->UseManualTime();
    }
  // GEMMs last (the heaviest validation); cuBLAS and the own kernel alternate per shape.
  for (const Size& size : gemms)
    for (const char* impl : {"sgemm_cublas", "sgemm_own"}) {
      std::string key = std::string(impl) + "/" + size.name + "/" + dims_name(size);
      Factory make = std::strcmp(impl, "sgemm_own") == 0 ? Factory(gemm_own) : Factory(gemm_cublas);
      benchmark::RegisterBenchmark(key.c_str(), run_case, make, size.dims, key)
          ->Unit(benchmark::kMicrosecond)
          ->UseManualTime();
    }
}

int run_with_device(int argc, char** argv) {
  g_run = std::make_unique<Run>();  // the budget counts from here: ceilings and validation spend it too
  std::string budget = flag_value(argc, argv, "budget_s");
  drop_flag(&argc, argv, "budget_s");
  g_run->budget_s = budget.empty() ? 0 : std::atof(budget.c_str());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  psa::cuda::set_tf32(false);  // fp32 everywhere: the CPU comparison (and the ceiling) assume it
  // Ceilings first, so they land in the JSON context and every benchmark sees the same ones.
  double copy = pg::copy_gbps(), sgemm = pg::sgemm_gflops();
  std::printf("bench_kernels_cuda: %s; ceilings: D2D copy %.0f GB/s, cuBLAS SGEMM 8192^2 %.0f GFLOP/s; L2 %ld MiB\n",
              psa::gpu::describe().c_str(), copy, sgemm, long(pg::l2_bytes() >> 20));
  benchmark::AddCustomContext("gpu", psa::gpu::describe());
  benchmark::AddCustomContext("ceiling_copy_gbps", std::to_string(copy));
  benchmark::AddCustomContext("ceiling_sgemm_gflops", std::to_string(sgemm));
  benchmark::AddCustomContext("l2_bytes", std::to_string(pg::l2_bytes()));
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_run.reset();  // while the CUDA runtime is still up (a static would be destroyed after its teardown)
  return 0;
}

}  // namespace
#endif  // PSA_CUDA

int main(int argc, char** argv) {
#ifdef PSA_CUDA
  int devices = 0;
  cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "bench_kernels_cuda: cudaGetDeviceCount: %s, %d devices\n", cudaGetErrorString(err), devices);
    return skip_everything(argc, argv, "no CUDA device, skipped");
  }
  try {
    return run_with_device(argc, argv);
  } catch (const std::exception& e) {  // a ceiling measurement failed: nothing can be held against it
    std::fprintf(stderr, "bench_kernels_cuda: %s\n", e.what());
    return 1;
  }
#else
  return skip_everything(argc, argv, "built without CUDA, nothing to run");
#endif
}
