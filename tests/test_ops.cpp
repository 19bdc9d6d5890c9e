#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <map>
#include <set>

#include "autograd/op_util.h"
#include "op_harness.h"
#include "test_util.h"
#include "tensor/profile.h"

namespace psa::test {

std::vector<OpCase>& op_cases() {
  static std::vector<OpCase> cases;
  return cases;
}

bool register_cases(std::vector<OpCase> cases) {
  for (OpCase& c : cases) op_cases().push_back(std::move(c));
  return true;
}

Inputs randn_inputs(const std::vector<Shape>& shapes, uint64_t seed, DType dtype) {
  Inputs in;
  for (size_t i = 0; i < shapes.size(); ++i) in.push_back(randn(shapes[i], seed * 131 + i, dtype));
  return in;
}

namespace {

Inputs make(const OpCase& c, size_t trial, DType dtype) {
  const auto& shapes = c.shapes[trial];
  return c.make_inputs ? c.make_inputs(shapes, 1000 + trial, dtype) : randn_inputs(shapes, 1000 + trial, dtype);
}

TEST(Ops, EveryTableRowHasForwardAndGradientTests) {
  std::set<std::string> covered;
  for (const OpCase& c : op_cases())
    if (c.reference && c.run && !c.shapes.empty() && c.finite_differences) covered.insert(c.op);
  for (const OpRow& row : op_table())
    EXPECT_TRUE(covered.count(row.name)) << "op '" << row.name << "' (" << row.family
                                         << ") has no forward reference + gradcheck case";
  for (const OpCase& c : op_cases()) EXPECT_TRUE(is_registered_op(c.op.c_str())) << c.op << " is not in the op table";
}

// f32 against f64 over a whole tensor, besides each case's elementwise tolerance: ~3e-7 at worst for every op
// and gradient (attention, gelu), so 1e-5 leaves room for other compilers while a percent's error in a tensor's
// small entries fails.
constexpr double kRelativeNormTol = 1e-5;

TEST(Ops, ForwardMatchesF64Reference) {
  for (const OpCase& c : op_cases()) {
    for (size_t t = 0; t < c.shapes.size(); ++t) {
      SCOPED_TRACE(c.op + " trial " + std::to_string(t));
      Inputs in64 = make(c, t, DType::f64), in32;
      for (const Tensor& x : in64) in32.push_back(is_float(x.dtype()) ? x.to(DType::f32) : x);
      Tensor ref = c.reference(in64);
      Tensor got = c.run(in32);
      ASSERT_EQ(got.shape(), ref.shape());
      std::vector<double> r = ref.to_vector(), g = got.to_vector();
      EXPECT_LE(elementwise_error(g, r), c.fwd_tol);
      EXPECT_LE(relative_norm_error(g, r), kRelativeNormTol);
      // The f64 kernels (which the CUDA f64 parity trusts): 2.3e-15 at worst, rounding only.
      EXPECT_LE(elementwise_error(c.run(in64).to_vector(), r), 1e-12) << "f64";
    }
  }
}

TEST(Ops, GradientsMatchFiniteDifferences) {
  for (const OpCase& c : op_cases()) {
    if (!c.finite_differences) continue;
    for (size_t t = 0; t < c.shapes.size(); ++t) {
      SCOPED_TRACE(c.op + " trial " + std::to_string(t));
      Inputs in = make(c, t, DType::f64);
      for (size_t i = 0; i < in.size(); ++i) {
        bool diff = c.differentiable.empty() || c.differentiable[i];
        if (diff && is_float(in[i].dtype())) in[i].requires_grad_();
      }
      GradcheckResult r = gradcheck(c.run, in, c.grad_eps, c.grad_atol, c.grad_rtol);
      EXPECT_TRUE(r.ok) << r.report << " (max abs err " << r.max_abs_err << ")";
    }
  }
}

// The f32 backward kernels are separate code from the f64 ones the finite differences check (vector lanes, f32
// transcendental approximations): their analytic gradients must match the f64 analytic gradients of the same
// inputs and the same output weights, to the case's forward tolerance (times 10 for the longer chains).
TEST(Ops, F32GradientsMatchF64Gradients) {
  std::map<std::string, double> worst_by_op;
  for (const OpCase& c : op_cases()) {
    for (size_t t = 0; t < c.shapes.size(); ++t) {
      SCOPED_TRACE(c.op + " trial " + std::to_string(t));
      Inputs in64 = make(c, t, DType::f64), in32;
      std::vector<bool> checked(in64.size());
      for (size_t i = 0; i < in64.size(); ++i) {
        checked[i] = (c.differentiable.empty() || c.differentiable[i]) && is_float(in64[i].dtype());
        in32.push_back(is_float(in64[i].dtype()) ? in64[i].to(DType::f32) : in64[i]);
        if (checked[i]) in64[i].requires_grad_(), in32[i].requires_grad_();
      }
      Tensor out64 = c.run(in64), out32 = c.run(in32);
      Tensor w = randn(out64.shape(), 4321, DType::f64);
      sum(mul(out64, w)).backward();
      sum(mul(out32, w.to(DType::f32))).backward();
      for (size_t i = 0; i < in64.size(); ++i) {
        if (!checked[i] || !in64[i].grad().defined()) continue;
        ASSERT_TRUE(in32[i].grad().defined()) << "input " << i << ": f64 has a gradient, f32 none";
        std::vector<double> g64 = in64[i].grad().to_vector(), g32 = in32[i].grad().to_vector();
        const double worst = elementwise_error(g32, g64);
        worst_by_op[c.op] = std::max(worst_by_op[c.op], worst);
        EXPECT_LE(relative_norm_error(g32, g64), kRelativeNormTol) << "gradient of input " << i;
        EXPECT_LE(worst, 10 * c.fwd_tol) << "gradient of input " << i;
      }
    }
  }
  for (const auto& [op, w] : worst_by_op) std::printf("  %-22s f32 vs f64 gradient: worst %.2e\n", op.c_str(), w);
}

// Ties (which finite differences cannot check): max's gradient and argmax both pick the first maximum.
TEST(Ops, MaxAndArgmaxPickTheFirstOfTiedMaxima) {
  Tensor x = Tensor::from(std::vector<float>{1, 3, 3, 0, 2, 2, -1, 2}, {2, 4}).requires_grad_();
  sum(max(x, 1)).backward();
  EXPECT_EQ(x.grad().vec<float>(), (std::vector<float>{0, 1, 0, 0, 1, 0, 0, 0}));
  EXPECT_EQ(argmax(x, 1).vec<int64_t>(), (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(argmax(x, 0).vec<int64_t>(), (std::vector<int64_t>{1, 0, 0, 1}));
  // Every dim of a 3-D tensor with many ties (values in {-1, 0, 1}) against a loop.
  Tensor y = randn({3, 5, 4}, 9);
  std::vector<float> q = y.vec<float>();
  for (float& v : q) v = std::round(v);
  y = Tensor::from(q, {3, 5, 4});
  for (int64_t d = 0; d < 3; ++d) {
    DimSplit sp = split_at(y.shape(), d);
    std::vector<int64_t> want;
    for (int64_t o = 0; o < sp.outer; ++o)
      for (int64_t j = 0; j < sp.inner; ++j) {
        int64_t best = 0;
        for (int64_t i = 1; i < sp.n; ++i)
          if (q[(o * sp.n + i) * sp.inner + j] > q[(o * sp.n + best) * sp.inner + j]) best = i;
        want.push_back(best);
      }
    EXPECT_EQ(argmax(y, d).vec<int64_t>(), want) << "dim " << d;
  }
}

// The checks above must fail on NaN: a NaN gradient (on both sides of the comparison) is a failure, and
// abs_error turns one-sided non-finite values into +Inf while matching ones compare equal.
TEST(Ops, GradcheckAndAbsErrorFailOnNaN) {
  Tensor x = randn({3}, 1, DType::f64).requires_grad_(), y = Tensor::from(std::vector<double>{1, NAN, 2}, {3}, DType::f64);
  GradcheckResult r = gradcheck([&](const std::vector<Tensor>& in) { return mul(in[0], y); }, {x});
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.report.find("nan"), std::string::npos) << r.report;
  EXPECT_EQ(abs_error(NAN, 1.0), INFINITY);
  EXPECT_EQ(abs_error(1.0, INFINITY), INFINITY);
  EXPECT_EQ(abs_error(NAN, NAN), 0.0);
  EXPECT_EQ(abs_error(-INFINITY, -INFINITY), 0.0);
  EXPECT_EQ(abs_error(INFINITY, -INFINITY), INFINITY);
  EXPECT_EQ(abs_error(1.0, 3.5), 2.5);
}

// Near: max |a - b| / (1 + |b|) <= tol.
void expect_near(const std::vector<float>& a, const std::vector<float>& b, double tol, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_LE(elementwise_error(std::vector<double>(a.begin(), a.end()), std::vector<double>(b.begin(), b.end())), tol)
      << what;
}

// The fused op against the composition it replaces (add, then the activation), in f32 at a size the kernels
// thread (3·130·97 elements > their 2^15 threshold) and with more than two 64-row chunks of bias sums; and the
// same bits for one thread and two, since the bias sums go by fixed row chunks, not by thread.
TEST(Ops, BiasActEqualsAddThenActivationForAnyThreadCount) {
  Tensor x = randn({3, 130, 97}, 5), b = randn({97}, 6), g = randn({3, 130, 97}, 7);
  int threads = omp_get_max_threads();
  for (const char* act : {"gelu", "quick_gelu", "silu", "relu", "tanh", "sigmoid"}) {
    SCOPED_TRACE(act);
    auto run = [&](bool fused, int n_threads) {
      omp_set_num_threads(n_threads);
      Tensor xs = x.clone().requires_grad_(), bs = b.clone().requires_grad_();
      Tensor y = fused ? bias_act(xs, bs, act) : activation(add(xs, bs), act);
      y.backward(g);
      return std::vector<std::vector<float>>{y.vec<float>(), xs.grad().vec<float>(), bs.grad().vec<float>()};
    };
    auto one = run(true, 1), two = run(true, 2), unfused = run(false, threads);
    omp_set_num_threads(threads);
    EXPECT_EQ(one, two) << "output or gradients depend on the thread count";
    expect_near(one[0], unfused[0], 1e-6, "output");
    expect_near(one[1], unfused[1], 1e-6, "input gradient");
    expect_near(one[2], unfused[2], 1e-6, "bias gradient");
  }
}

TEST(Ops, BiasActRejectsABiasThatDoesNotFit) {
  Tensor x = randn({4, 6}, 1);
  EXPECT_NE(error_of([&] { bias_act(x, randn({5}, 2), "gelu"); }).find("bias_act: input [4,6] and bias [5]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { bias_act(x, randn({1, 6}, 2), "gelu"); }).find("bias [1,6]"), std::string::npos);
  EXPECT_NE(error_of([&] { bias_act(x, randn({6}, 2), "no_such_act"); }).find("unknown activation 'no_such_act'"),
            std::string::npos);
}

TEST(Profile, CountsKernelCallsPerPassOnlyWhileOn) {
  Tensor a = randn({4, 5}, 1).requires_grad_(), b = randn({5, 3}, 2).requires_grad_();
  sum(matmul(a, b)).backward();  // before start(): not counted
  profile::start();
  sum(matmul(a, b)).backward();
  std::vector<profile::Row> rows = profile::stop();
  sum(matmul(a, b)).backward();  // after stop(): not counted
  std::map<std::string, int64_t> calls;
  for (const profile::Row& r : rows) {
    calls[r.kernel] = r.calls;
    EXPECT_GE(r.seconds, 0) << r.kernel;
  }
  EXPECT_EQ(calls["matmul"], 1);
  EXPECT_EQ(calls["matmul (backward)"], 2);  // dA and dB
  EXPECT_FALSE(profile::on());
}

TEST(Profile, CountsGemmClassFlopsOfEachPass) {
  // matmul [2, 3, 4] x [4, 5]: forward 2·(2·3)·5·4 = 240; backward dA = g·Bᵀ and dB = Aᵀ·g, 240 each.
  Tensor a = randn({2, 3, 4}, 1).requires_grad_(), b = randn({4, 5}, 2).requires_grad_();
  double before = profile::flops();
  Tensor y = matmul(a, b);
  EXPECT_EQ(profile::flops() - before, 240);
  sum(y).backward();
  EXPECT_EQ(profile::flops() - before, 720);
  // attention B 1, H 2, T 3, S 5, D 4: one T x S x D product per head is 2·3·5·4 = 120 flops, 240 for both
  // heads; forward QKᵀ and PV, backward dV, dP, dQ, dK.
  Tensor q = randn({1, 3, 2, 4}, 3).requires_grad_(), k = randn({1, 5, 2, 4}, 4).requires_grad_();
  Tensor v = randn({1, 5, 2, 4}, 5).requires_grad_();
  before = profile::flops();
  Tensor o = attention(q, k, v, false);
  EXPECT_EQ(profile::flops() - before, 2 * 240);
  sum(o).backward();
  EXPECT_EQ(profile::flops() - before, 6 * 240);
  // patch_conv x [2, 3, 8, 8], w [6, 3, 4, 4]: out [2, 6, 2, 2] (48 values), K = 48: 2·48·48 = 4608 forward, the same for
  // each of gx and gw.
  Tensor x = randn({2, 3, 8, 8}, 6).requires_grad_(), w = randn({6, 3, 4, 4}, 7).requires_grad_();
  before = profile::flops();
  Tensor c = patch_conv(x, w, Tensor());
  EXPECT_EQ(profile::flops() - before, 4608);
  sum(c).backward();
  EXPECT_EQ(profile::flops() - before, 3 * 4608);
}

int g_device_waits = 0;
void count_device_wait() { ++g_device_waits; }

TEST(Profile, WaitsForTheDeviceAroundEveryTimedKernel) {
  Tensor a = randn({4, 5}, 1).requires_grad_(), b = randn({5, 3}, 2).requires_grad_();
  g_device_waits = 0;
  profile::start(count_device_wait);
  sum(matmul(a, b)).backward();
  std::vector<profile::Row> rows = profile::stop();
  int64_t calls = 0;
  for (const profile::Row& r : rows) calls += r.calls;
  EXPECT_GT(calls, 3);
  EXPECT_EQ(g_device_waits, 2 * calls);  // before and after each
  sum(matmul(a, b)).backward();          // stopped: the hook is gone too
  EXPECT_EQ(g_device_waits, 2 * calls);
}

// The graph keeps what backward rules saved, not every intermediate: add saves nothing, and a matmul with a
// frozen weight saves only the weight (its input's gradient needs W, W's would need the input).
TEST(Autograd, FreesActivationsNoRuleSaved) {
  Tensor x = randn({8, 4}, 1).requires_grad_(), w = randn({4, 4}, 2), c = randn({8, 4}, 3);
  std::weak_ptr<Storage> after_add, after_matmul;
  Tensor loss;
  {
    Tensor y = add(x, c);
    Tensor z = matmul(y, w);
    Tensor h = add(z, c);
    after_add = y.impl()->storage;
    after_matmul = h.impl()->storage;
    loss = sum(matmul(h, w));
  }
  EXPECT_TRUE(after_add.expired()) << "add's output is only an input of a frozen matmul: nothing saves it";
  EXPECT_TRUE(after_matmul.expired());
  loss.backward();
  // d loss / dx = 1 · (Wᵀ)² summed the same way as the forward: check against the same graph built again.
  Tensor want = matmul(matmul(Tensor::ones({8, 4}), w, false, true), w, false, true);
  EXPECT_LT(max_abs_diff(x.grad(), want), 1e-5);
}

// Gradients meeting at a tensor are summed in place when nothing else holds the first one. What else may hold
// it: another entry (add's backward hands the same g to both inputs) and the caller's grad_output. Here
// y = (p + q) + p with p = 3x, q = 5x: the caller's g reaches p twice and q once, all as one tensor.
TEST(Autograd, AccumulatesInPlaceOnlyWhatNothingElseHolds) {
  Tensor x = randn({5}, 1).requires_grad_();
  Tensor p = mul_scalar(x, 3), q = mul_scalar(x, 5), y = add(add(p, q), p);  // dy/dx = 11
  Tensor g = randn({5}, 2), g_before = g.clone();
  y.backward(g);
  EXPECT_EQ(max_abs_diff(g, g_before), 0.0) << "the caller's grad_output was written to";
  std::vector<float> gx = x.grad().vec<float>(), gv = g_before.vec<float>();
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(gx[i], 11 * gv[i], 1e-5 * (1 + std::fabs(gx[i]))) << i;
}

TEST(Autograd, SecondBackwardThroughAUsedGraphFails) {
  Tensor x = randn({3}, 1).requires_grad_();
  Tensor y = mul(x, x);
  Tensor loss = sum(y);
  loss.backward();
  try {
    sum(mul(y, x)).backward();  // y's node already ran
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already used"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace psa::test
