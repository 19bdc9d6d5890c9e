// Op cases for the nn family (layer_norm, rms_norm, softmax, log_softmax, cross_entropy, dropout) with naive f64
// references, plus the error-message tests of the engine's ops (OpErrors.*).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <tuple>

#include "autograd/op_util.h"
#include "op_harness.h"
#include "tensor/rng.h"

namespace psa::test {
namespace {

// ---- layer_norm / rms_norm over the last dim, w and b optional (inputs beyond x are w then b).
Tensor ref_norm(const Inputs& in, bool rms, double eps) {
  const Tensor& x = in[0];
  int64_t C = x.size(-1), rows = x.numel() / C;
  const double* w = in.size() > 1 ? cd(in[1]) : nullptr;
  const double* b = in.size() > 2 ? cd(in[2]) : nullptr;
  Tensor out = empty64(x.shape());
  for (int64_t r = 0; r < rows; ++r) {
    const double* xr = cd(x) + r * C;
    double mu = 0, var = 0;
    for (int64_t c = 0; c < C; ++c) mu += xr[c] / C;
    if (rms) mu = 0;
    for (int64_t c = 0; c < C; ++c) var += (xr[c] - mu) * (xr[c] - mu) / C;
    for (int64_t c = 0; c < C; ++c)
      md(out)[r * C + c] = (xr[c] - mu) / std::sqrt(var + eps) * (w ? w[c] : 1) + (b ? b[c] : 0);
  }
  return out;
}

std::vector<OpCase> norm_cases() {
  OpCase ln;
  ln.op = "layer_norm";
  ln.shapes = {{{4, 7}, {7}, {7}}, {{2, 3, 16}, {16}, {16}}, {{3, 1}, {1}, {1}}, {{5, 6}}, {{2, 5}, {5}}};
  ln.run = [](const Inputs& in) {
    return layer_norm(in[0], in.size() > 1 ? in[1] : Tensor(), in.size() > 2 ? in[2] : Tensor(), 1e-5);
  };
  ln.reference = [](const Inputs& in) { return ref_norm(in, false, 1e-5); };
  OpCase rms;
  rms.op = "rms_norm";
  rms.shapes = {{{4, 7}, {7}}, {{2, 3, 8}, {8}}, {{5, 3}}};
  rms.run = [](const Inputs& in) { return rms_norm(in[0], in.size() > 1 ? in[1] : Tensor(), 1e-6); };
  rms.reference = [](const Inputs& in) { return ref_norm(in, true, 1e-6); };
  OpCase ln_long = ln, rms_long = rms;
  // Long rows: 256 threads a row on CUDA (C >= 1024), and 128 (128 <= C < 1024).
  ln_long.shapes = {{{130, 1030}, {1030}, {1030}}, {{20, 300}, {300}, {300}}};
  ln_long.finite_differences = false;
  rms_long.shapes = {{{70, 200}, {200}}};
  rms_long.finite_differences = false;
  return {ln, rms, ln_long, rms_long};
}

// ---- softmax / log_softmax over any dim.
Tensor ref_softmax(const Tensor& x, int64_t dim, bool log) {
  int64_t d = dim < 0 ? dim + x.dim() : dim;
  DimSplit sp = split_at(x.shape(), d);
  Tensor out = empty64(x.shape());
  for (int64_t o = 0; o < sp.outer; ++o)
    for (int64_t j = 0; j < sp.inner; ++j) {
      auto at = [&](int64_t i) { return (o * sp.n + i) * sp.inner + j; };
      double mx = -INFINITY, sum = 0;
      for (int64_t i = 0; i < sp.n; ++i) mx = std::max(mx, cd(x)[at(i)]);
      for (int64_t i = 0; i < sp.n; ++i) sum += std::exp(cd(x)[at(i)] - mx);
      for (int64_t i = 0; i < sp.n; ++i)
        md(out)[at(i)] = log ? cd(x)[at(i)] - mx - std::log(sum) : std::exp(cd(x)[at(i)] - mx) / sum;
    }
  return out;
}

// Logits around 1000 (exp would overflow without the max shift), quantised to 1/16 so f32 holds them exactly.
Inputs huge_logits(const std::vector<Shape>& s, uint64_t seed, DType dt) {
  Tensor x = randn(s[0], seed, DType::f64);
  for (int64_t i = 0; i < x.numel(); ++i) md(x)[i] = 1000 + std::round(md(x)[i] * 16) / 16;
  return {x.to(dt)};
}

std::vector<OpCase> softmax_cases() {
  std::vector<OpCase> v;
  for (bool log : {false, true})
    for (auto [dim, shape] : std::vector<std::pair<int64_t, Shape>>{{-1, {3, 7}}, {0, {4, 3}}, {1, {2, 5, 3}}}) {
      OpCase c;
      c.op = log ? "log_softmax" : "softmax";
      c.shapes = {{shape}};
      c.run = [dim = dim, log](const Inputs& in) { return log ? log_softmax(in[0], dim) : softmax(in[0], dim); };
      c.reference = [dim = dim, log](const Inputs& in) { return ref_softmax(in[0], dim, log); };
      v.push_back(c);
      if (dim != -1) continue;
      c.make_inputs = huge_logits;  // stability: shifted by the row max
      v.push_back(c);
      c.make_inputs = nullptr;
      c.shapes = {{{3, log ? 300 : 1500}}};
      c.finite_differences = false;
      v.push_back(c);
    }
  return v;
}

// ---- cross_entropy: targets cycle through the vocabulary; every third one (or all) is ignore_index.
std::function<Inputs(const std::vector<Shape>&, uint64_t, DType)> ce_inputs(int64_t ignore_index, bool all_ignored) {
  return [=](const std::vector<Shape>& s, uint64_t seed, DType dt) {
    int64_t N = s[0][0], V = s[0][1];
    std::vector<int64_t> t(N);
    for (int64_t i = 0; i < N; ++i) t[i] = all_ignored || i % 3 == 1 ? ignore_index : (i * 7 + 3) % V;
    return Inputs{randn(s[0], seed, dt, 2.0), Tensor::from(t, {N}, DType::i64)};
  };
}

Tensor ref_cross_entropy(const Tensor& x, const Tensor& targets, int64_t ignore_index) {
  int64_t N = x.size(0), V = x.size(1), count = 0;
  const int64_t* t = targets.data<int64_t>();
  double total = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (t[i] == ignore_index) continue;
    const double* xr = cd(x) + i * V;
    double mx = -INFINITY, sum = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, xr[v]);
    for (int64_t v = 0; v < V; ++v) sum += std::exp(xr[v] - mx);
    total += mx + std::log(sum) - xr[t[i]];
    ++count;
  }
  Tensor out = empty64({});
  md(out)[0] = count ? total / count : 0.0;
  return out;
}

std::vector<OpCase> cross_entropy_cases() {
  std::vector<OpCase> v;
  for (auto [ignore, all_ignored, shape] :
       std::vector<std::tuple<int64_t, bool, Shape>>{{-100, false, {6, 5}}, {-100, false, {4, 11}},
                                                     {2, false, {7, 3}}, {-100, true, {3, 4}}}) {
    OpCase c;
    c.op = "cross_entropy";
    c.shapes = {{shape, {shape[0]}}};
    c.make_inputs = ce_inputs(ignore, all_ignored);
    c.differentiable = {true, false};
    c.run = [ignore = ignore](const Inputs& in) { return cross_entropy(in[0], in[1], ignore); };
    c.reference = [ignore = ignore](const Inputs& in) { return ref_cross_entropy(in[0], in[1], ignore); };
    v.push_back(c);
  }
  OpCase wide = v[0];
  wide.shapes = {{{70, 1100}, {70}}, {{30, 700}, {30}}};  // 256 and 128 threads a row on CUDA
  wide.finite_differences = false;
  v.push_back(wide);
  return v;
}

// ---- dropout: the reference applies the documented rule itself: keep when draw >= p·2^32, scale 1/(1-p).
Tensor ref_dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset) {
  Tensor out = empty64(x.shape());
  uint32_t threshold = p >= 1 ? 0 : (uint32_t)(p * 4294967296.0);
  for (int64_t i = 0; i < x.numel(); ++i) {
    bool keep = p < 1 && philox_keep(seed, offset, i, threshold);
    md(out)[i] = keep ? cd(x)[i] / (1 - p) : 0.0;
  }
  return out;
}

std::vector<OpCase> dropout_cases() {
  std::vector<OpCase> v;
  // 37 elements are all tail of the CPU kernel's blocks of draws (32 or 64), 105 one block and a tail, 256 whole
  // blocks; the large seed and offset give every word of the Philox key and counter high bits.
  using Draw = std::tuple<double, uint64_t, uint64_t>;  // p, seed, offset
  for (auto [p, seed, offset] : std::vector<Draw>{{0.3, 7, 11}, {0.0, 7, 11}, {1.0, 7, 11}, {0.9, 7, 11},
                                                  {0.5, 0x9E3779B97F4A7C15ull, 0xF00DFACE12345678ull}}) {
    OpCase c;
    c.op = "dropout";
    c.shapes = {{{37}}, {{3, 7, 5}}, {{4, 64}}};
    c.run = [=](const Inputs& in) { return dropout(in[0], p, seed, offset); };
    c.reference = [=](const Inputs& in) { return ref_dropout(in[0], p, seed, offset); };
    v.push_back(c);
  }
  return v;
}

const bool registered = register_cases(norm_cases()) && register_cases(softmax_cases()) &&
                        register_cases(cross_entropy_cases()) && register_cases(dropout_cases());

// ---- behaviour the generic harness does not see
TEST(NnOps, SoftmaxOfAllMinusInfRowIsZeroNotNaN) {
  Tensor x = Tensor::full({2, 3}, -INFINITY);
  for (double y : softmax(x).to_vector()) EXPECT_EQ(y, 0.0);
}

TEST(NnOps, DropoutKeepsAboutOneMinusPAndDependsOnSeedAndOffset) {
  Tensor x = Tensor::ones({100000});
  std::vector<double> a = dropout(x, 0.25, 1, 0).to_vector(), b = dropout(x, 0.25, 1, 1).to_vector();
  double kept = 0, differ = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    kept += a[i] != 0;
    differ += a[i] != b[i];
    if (a[i] != 0) {
      EXPECT_FLOAT_EQ(a[i], 1 / 0.75);
    }
  }
  EXPECT_NEAR(kept / a.size(), 0.75, 0.01);
  EXPECT_GT(differ / a.size(), 0.2);
}

TEST(NnOps, CrossEntropyWithNoCountedTargetIsZeroWithZeroGradient) {
  Tensor x = randn({3, 4}, 5, DType::f32).requires_grad_();
  Tensor loss = cross_entropy(x, Tensor::full({3}, -100, DType::i64));
  EXPECT_EQ(loss.item(), 0.0);
  loss.backward();
  for (double g : x.grad().to_vector()) EXPECT_EQ(g, 0.0);
}

// ---- threaded paths: inputs above the kernels' threading thresholds must give what one thread gives (row
// splits, per-thread partial sums of weight gradients, per-head dK/dV blocks), forward and backward, in f64.
struct ThreadedCase {
  const char* op;
  std::vector<Shape> shapes;
  std::function<Tensor(const Inputs&)> run;
  size_t float_inputs;  // the first float_inputs inputs are random and differentiated; the rest come from `extra`
  std::function<Inputs()> extra;
};

std::vector<std::vector<double>> run_threaded_case(const ThreadedCase& c, int threads) {
  int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  Inputs in = randn_inputs(std::vector<Shape>(c.shapes.begin(), c.shapes.begin() + c.float_inputs), 77, DType::f64);
  for (Tensor& t : in) t.requires_grad_();
  if (c.extra)
    for (const Tensor& t : c.extra()) in.push_back(t);
  Tensor out = c.run(in);
  sum(mul(out, randn(out.shape(), 5, DType::f64))).backward();
  std::vector<std::vector<double>> results{out.to_vector()};
  for (size_t i = 0; i < c.float_inputs; ++i) results.push_back(in[i].grad().to_vector());
  omp_set_num_threads(saved);
  return results;
}

TEST(ThreadedKernels, MatchOneThread) {
  auto targets = [] {
    std::vector<int64_t> t(200);
    for (int64_t i = 0; i < 200; ++i) t[i] = i % 5 == 0 ? -100 : (i * 37) % 200;
    return Inputs{Tensor::from(t, {200}, DType::i64)};
  };
  std::vector<ThreadedCase> cases = {
      {"layer_norm", {{300, 128}, {128}, {128}}, [](const Inputs& in) { return layer_norm(in[0], in[1], in[2], 1e-5); }, 3, {}},
      {"rms_norm", {{300, 128}, {128}}, [](const Inputs& in) { return rms_norm(in[0], in[1], 1e-6); }, 2, {}},
      {"softmax", {{128, 300}}, [](const Inputs& in) { return softmax(in[0], 0); }, 1, {}},
      {"log_softmax", {{128, 300}}, [](const Inputs& in) { return log_softmax(in[0], -1); }, 1, {}},
      {"cross_entropy", {{200, 200}}, [](const Inputs& in) { return cross_entropy(in[0], in[1]); }, 1, targets},
      {"dropout", {{40000}}, [](const Inputs& in) { return dropout(in[0], 0.4, 3, 9); }, 1, {}},
      {"rope", {{2, 80, 4, 64}}, [](const Inputs& in) { return rope(in[0], in[1], in[2]); }, 1,
       [] { return Inputs{randn({80, 64}, 8, DType::f64), randn({80, 64}, 9, DType::f64)}; }},
      {"attention", {{2, 40, 4, 30}, {2, 50, 2, 30}, {2, 50, 2, 30}},
       [](const Inputs& in) { return attention(in[0], in[1], in[2], true); }, 3, {}},
      {"patch_conv", {{3, 3, 64, 64}, {16, 3, 8, 8}, {16}}, [](const Inputs& in) { return patch_conv(in[0], in[1], in[2]); }, 3, {}},
      {"depthwise_conv3x3", {{2, 16, 16, 80}, {80, 1, 3, 3}}, [](const Inputs& in) { return depthwise_conv3x3(in[0], in[1]); }, 2, {}},
      {"adaptive_avg_pool2d", {{2, 20, 20, 48}}, [](const Inputs& in) { return adaptive_avg_pool2d(in[0], 7, 5); }, 1, {}},
      // Past the 2^16 elements where permute and sum_dim split their rows: each thread starts mid-odometer.
      {"permute", {{6, 20, 30, 21}}, [](const Inputs& in) { return permute(in[0], {0, 2, 3, 1}); }, 1, {}},
      {"sum", {{30, 61, 40}}, [](const Inputs& in) { return sum(in[0], 1); }, 1, {}},
      {"sum", {{300, 241}}, [](const Inputs& in) { return sum(in[0], 1); }, 1, {}},
      {"max", {{30, 61, 40}}, [](const Inputs& in) { return max(in[0], 2); }, 1, {}},
  };
  int threads = std::max(2, omp_get_max_threads());
  for (const ThreadedCase& c : cases) {
    SCOPED_TRACE(c.op);
    std::vector<std::vector<double>> one = run_threaded_case(c, 1), many = run_threaded_case(c, threads);
    for (size_t k = 0; k < one.size(); ++k) {
      ASSERT_EQ(one[k].size(), many[k].size());
      double worst = 0;
      for (size_t i = 0; i < one[k].size(); ++i) worst = std::max(worst, abs_error(one[k][i], many[k][i]));
      EXPECT_LE(worst, 1e-10) << (k ? "gradient of input " + std::to_string(k - 1) : std::string("output"));
    }
  }
}

// ---- error messages name the op and the shapes
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error thrown)";
}

TEST(OpErrors, MatmulInnerDims) {
  EXPECT_EQ(error_of([] { matmul(Tensor::zeros({2, 3}), Tensor::zeros({4, 5})); }),
            "matmul: [2,3] x [4,5]: inner dims 3 != 4");
}

TEST(OpErrors, AddBroadcastFailure) {
  EXPECT_EQ(error_of([] { add(Tensor::zeros({2, 3}), Tensor::zeros({4, 3})); }),
            "add: shapes [2,3] and [4,3] cannot broadcast");
}

TEST(OpErrors, AttentionHeadsNotDivisible) {
  Tensor q = Tensor::zeros({2, 5, 4, 8}), k = Tensor::zeros({2, 5, 3, 8});
  EXPECT_EQ(error_of([&] { attention(q, k, k, false); }),
            "attention: q [2,5,4,8] and k [2,5,3,8]: 4 query heads not divisible by 3 kv heads");
}

TEST(OpErrors, AttentionMaskShapeAndGradient) {
  Tensor q = Tensor::zeros({1, 5, 2, 8}), k = Tensor::zeros({1, 7, 2, 8});
  std::string e = error_of([&] { attention(q, k, k, false, Tensor::zeros({5, 5})); });
  EXPECT_NE(e.find("attention: mask [5,5] does not fit scores [1,2,5,7]"), std::string::npos) << e;
  Tensor mask = Tensor::zeros({5, 7}).requires_grad_();
  e = error_of([&] { attention(q, k, k, false, mask); });
  EXPECT_NE(e.find("attention: mask [5,7] requires grad"), std::string::npos) << e;
}

TEST(OpErrors, CrossEntropyTargetOutOfRange) {
  Tensor logits = Tensor::zeros({3, 5}), t = Tensor::from(std::vector<int64_t>{1, 7, -100}, {3}, DType::i64);
  EXPECT_EQ(error_of([&] { cross_entropy(logits, t); }),
            "cross_entropy: logits [3,5] and targets [3]: target 7 at row 1 is out of [0,5) and not ignore_index -100");
  std::string e = error_of([&] { cross_entropy(logits, Tensor::zeros({4}, DType::i64)); });
  EXPECT_NE(e.find("cross_entropy: logits [3,5] and targets [4]"), std::string::npos) << e;
}

TEST(OpErrors, PatchConvNotDivisible) {
  EXPECT_EQ(error_of([] { patch_conv(Tensor::zeros({1, 3, 10, 12}), Tensor::zeros({8, 3, 4, 4})); }),
            "patch_conv: x [1,3,10,12] and w [8,3,4,4]: H 10 and W 12 not divisible by patch 4");
  std::string e = error_of([] { patch_conv(Tensor::zeros({1, 3, 8, 8}), Tensor::zeros({8, 2, 4, 4})); });
  EXPECT_NE(e.find("patch_conv: x [1,3,8,8] and w [8,2,4,4]: channels 3 != 2"), std::string::npos) << e;
}

TEST(OpErrors, NormsAndConvsNameTheirShapes) {
  std::string e = error_of([] { layer_norm(Tensor::zeros({2, 6}), Tensor::zeros({5}), Tensor(), 1e-5); });
  EXPECT_NE(e.find("layer_norm: weight [5] for input [2,6]"), std::string::npos) << e;
  e = error_of([] { depthwise_conv3x3(Tensor::zeros({1, 4, 4, 3}), Tensor::zeros({4, 1, 3, 3})); });
  EXPECT_NE(e.find("depthwise_conv3x3: x [1,4,4,3] and w [4,1,3,3]"), std::string::npos) << e;
  e = error_of([] { rope(Tensor::zeros({1, 5, 2, 6}), Tensor::zeros({4, 6}), Tensor::zeros({4, 6})); });
  EXPECT_NE(e.find("rope: x [1,5,2,6] with cos [4,6]"), std::string::npos) << e;
  e = error_of([] { dropout(Tensor::zeros({3}), 1.5, 0, 0); });
  EXPECT_NE(e.find("dropout: p = 1.5"), std::string::npos) << e;
}

}  // namespace
}  // namespace psa::test
