// Op cases for rope and attention with naive f64 references (see op_harness.h): odd T, S and D, causal with
// S > T and S < T, additive masks [T,S] (with -inf and a fully masked row) and [B,1,T,S], grouped-query heads.
#include <gtest/gtest.h>

#include <cmath>

#include "op_harness.h"

namespace psa::test {
namespace {

// ---- rope: inputs x [B,T,H,D], cos, sin [T,D] built like HF Llama's tables (inv_freq = 10000^(-2i/D)); the
// output is [B,T,H,D].
Inputs rope_inputs(const std::vector<Shape>& s, uint64_t seed, DType dt) {
  int64_t T = s[0][1], D = s[0][3];
  Tensor c = empty64({T, D}), sn = empty64({T, D});
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) {
      double angle = t * std::pow(10000.0, -2.0 * (d % (D / 2)) / D);
      md(c)[t * D + d] = std::cos(angle);
      md(sn)[t * D + d] = std::sin(angle);
    }
  return {randn(s[0], seed, dt), c.to(dt), sn.to(dt)};
}

Tensor ref_rope(const Tensor& x, const Tensor& c, const Tensor& s) {
  int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  Tensor out = empty64({B, T, H, D});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) {
          const double* xr = cd(x) + ((b * T + t) * H + h) * D;
          double rotated = d < half ? -xr[d + half] : xr[d - half];
          md(out)[((b * T + t) * H + h) * D + d] = xr[d] * cd(c)[t * D + d] + rotated * cd(s)[t * D + d];
        }
  return out;
}

std::vector<OpCase> rope_cases() {
  OpCase c;
  c.op = "rope";
  c.shapes = {{{2, 5, 3, 6}, {5, 6}, {5, 6}}, {{1, 7, 2, 4}, {7, 4}, {7, 4}}, {{1, 1, 1, 2}, {1, 2}, {1, 2}}};
  c.make_inputs = rope_inputs;
  c.differentiable = {true, false, false};
  c.run = [](const Inputs& in) { return rope(in[0], in[1], in[2]); };
  c.reference = [](const Inputs& in) { return ref_rope(in[0], in[1], in[2]); };
  // Half-widths of 32 and 20: the CPU kernel's full 16-lane vectors (and, at 20, a tail after them), which the
  // small cases above (half <= 3) never reach; tiny's D = 32 and small's D = 64 run on them.
  OpCase wide = c;
  wide.shapes = {{{1, 3, 2, 64}, {3, 64}, {3, 64}}, {{2, 3, 1, 40}, {3, 40}, {3, 40}}};
  wide.finite_differences = false;
  return {c, wide};
}

// ---- attention: inputs q, k, v and optionally the mask. A [T,S] mask gets -inf entries and a fully masked row 2;
// a 4-D mask gets finite values.
Inputs attention_inputs(const std::vector<Shape>& s, uint64_t seed, DType dt) {
  Inputs in = randn_inputs({s[0], s[1], s[2]}, seed, dt);
  if (s.size() < 4) return in;
  Tensor mask = randn(s[3], seed + 99, DType::f64, 0.5);
  if (mask.dim() == 2)
    for (int64_t t = 0; t < mask.size(0); ++t)
      for (int64_t j = 0; j < mask.size(1); ++j)
        if (t == 2 || (t * 3 + j) % 4 == 0) md(mask)[t * mask.size(1) + j] = -INFINITY;
  in.push_back(mask.to(dt));
  return in;
}

Tensor ref_attention(const Inputs& in, bool causal, double scale) {
  const Tensor &q = in[0], &k = in[1], &v = in[2];
  int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), S = k.size(1), Hkv = k.size(2);
  if (scale == 0) scale = 1 / std::sqrt((double)D);
  Tensor out = empty64(q.shape());
  std::vector<double> score(S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        int64_t kh = h / (H / Hkv);
        const double* qr = cd(q) + ((b * T + t) * H + h) * D;
        double mx = -INFINITY;
        for (int64_t s = 0; s < S; ++s) {
          const double* kr = cd(k) + ((b * S + s) * Hkv + kh) * D;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
          score[s] = scale * dot;
          if (in.size() > 3) {
            const Tensor& m = in[3];
            int64_t mb = m.dim() == 2 || m.size(0) == 1 ? 0 : b, mh = m.dim() == 2 || m.size(1) == 1 ? 0 : h;
            int64_t heads = m.dim() == 2 ? 1 : m.size(1);
            score[s] += cd(m)[((mb * heads + mh) * T + t) * S + s];
          }
          if (causal && s > t + S - T) score[s] = -INFINITY;
          mx = std::max(mx, score[s]);
        }
        double sum = 0;
        for (int64_t s = 0; s < S; ++s) sum += mx == -INFINITY ? 0 : std::exp(score[s] - mx);
        double* o = md(out) + ((b * T + t) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0;
          for (int64_t s = 0; s < S && sum > 0; ++s)
            acc += std::exp(score[s] - mx) / sum * cd(v)[((b * S + s) * Hkv + kh) * D + d];
          o[d] = acc;
        }
      }
  return out;
}

std::vector<OpCase> attention_cases() {
  struct Spec {
    std::vector<Shape> shapes;
    bool causal;
    double scale;
    bool finite_differences = true;
  };
  std::vector<Spec> specs = {
      {{{2, 5, 2, 6}, {2, 7, 2, 6}, {2, 7, 2, 6}}, false, 0},              // plain, T != S
      {{{1, 5, 4, 6}, {1, 7, 2, 6}, {1, 7, 2, 6}}, true, 0},               // GQA 4 -> 2, causal, S > T
      {{{2, 6, 2, 4}, {2, 6, 2, 4}, {2, 6, 2, 4}}, true, 0},               // causal, T == S
      {{{1, 5, 2, 6}, {1, 7, 2, 6}, {1, 7, 2, 6}, {5, 7}}, false, 0},      // [T,S] mask with -inf, a dead row
      {{{2, 3, 4, 8}, {2, 5, 1, 8}, {2, 5, 1, 8}, {2, 1, 3, 5}}, true, 0.5},  // MQA, [B,1,T,S] mask + causal
      {{{1, 4, 2, 4}, {1, 3, 2, 4}, {1, 3, 2, 4}}, true, 0},               // causal S < T: row 0 sees nothing
      // Longer than the CPU's causal row chunk (24): several chunks, a partial last one, and (S > T) column
      // chunks whose first seeing row is not 0; with a mask too.
      {{{1, 53, 2, 4}, {1, 53, 2, 4}, {1, 53, 2, 4}}, true, 0},
      {{{1, 30, 2, 4}, {1, 57, 1, 4}, {1, 57, 1, 4}, {30, 57}}, true, 0},
      // Head dims past one value per lane (the CUDA kernels' 32-lane layout), over several 32-row blocks and
      // 32-key tiles: D = 40 with GQA, causal, S > T; D = 99 (not a multiple of 4) with a mask.
      {{{1, 37, 2, 40}, {1, 45, 1, 40}, {1, 45, 1, 40}}, true, 0},
      {{{1, 35, 1, 99}, {1, 35, 1, 99}, {1, 35, 1, 99}, {35, 35}}, false, 0},
      // Per-head masks: [1, H, T, S] shared by the batch, and [B, H, T, S] with causal on top.
      {{{2, 4, 3, 6}, {2, 5, 3, 6}, {2, 5, 3, 6}, {1, 3, 4, 5}}, false, 0},
      {{{2, 4, 3, 6}, {2, 5, 1, 6}, {2, 5, 1, 6}, {2, 3, 4, 5}}, true, 0},
      // Several 32-row tiles on both sides (the CUDA "tiles" kernels), head dims padded to 32 and 16, a mask on
      // a causal S > T, a partial last tile; analytic gradients only (finite differences would take minutes).
      {{{1, 70, 2, 24}, {1, 77, 1, 24}, {1, 77, 1, 24}, {70, 77}}, true, 0, false},
      {{{2, 33, 2, 16}, {2, 96, 2, 16}, {2, 96, 2, 16}}, false, 0, false},
      // D = 64 (the models' head dim), causal with S - T = 5: the last visible key of a group of 8 rows is not
      // at a multiple of 4, so a reduction cut short at the wrong key shows.
      {{{1, 66, 1, 64}, {1, 71, 1, 64}, {1, 71, 1, 64}}, true, 0, false},
  };
  std::vector<OpCase> v;
  for (const Spec& s : specs) {
    OpCase c;
    c.op = "attention";
    c.shapes = {s.shapes};
    c.make_inputs = attention_inputs;
    c.differentiable = {true, true, true, false};
    c.run = [s](const Inputs& in) { return attention(in[0], in[1], in[2], s.causal, in.size() > 3 ? in[3] : Tensor(), s.scale); };
    c.reference = [s](const Inputs& in) { return ref_attention(in, s.causal, s.scale); };
    c.finite_differences = s.finite_differences;
    v.push_back(c);
  }
  return v;
}

const bool registered = register_cases(rope_cases()) && register_cases(attention_cases());

TEST(AttentionOps, FullyMaskedRowsGiveZerosAndFiniteGradients) {
  Tensor q = randn({1, 4, 2, 4}, 1).requires_grad_(), k = randn({1, 3, 2, 4}, 2).requires_grad_();
  Tensor v = randn({1, 3, 2, 4}, 3).requires_grad_();
  Tensor mask = Tensor::zeros({4, 3});
  for (int64_t s = 0; s < 3; ++s) mask.data<float>()[3 * 3 + s] = -INFINITY;  // row 3 masked by hand, row 0 by causality
  Tensor out = attention(q, k, v, true, mask);
  std::vector<double> o = out.to_vector();
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t d = 0; d < 4; ++d) {
      EXPECT_EQ(o[(0 * 2 + h) * 4 + d], 0.0);
      EXPECT_EQ(o[(3 * 2 + h) * 4 + d], 0.0);
      EXPECT_NE(o[(1 * 2 + h) * 4 + d], 0.0);
    }
  sum(out).backward();
  for (const Tensor& t : {q, k, v})
    for (double g : t.grad().to_vector()) EXPECT_TRUE(std::isfinite(g));
}

}  // namespace
}  // namespace psa::test
