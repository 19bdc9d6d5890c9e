// Optimizers against updates computed independently in double (the textbook formulas, not the kernels'
// arrangement), gradient clipping, the HF schedules, and that a resumed optimizer continues bit-identically.
#include <gtest/gtest.h>

#include "test_util.h"
#include <omp.h>

#include <cfloat>
#include <cmath>
#include <random>

#include "nn/optim.h"

namespace psa::nn {
namespace {

using psa::test::error_of;

Tensor param(const std::vector<double>& values, DType dtype) {
  Tensor t = Tensor::from(values, {(int64_t)values.size()}, dtype);
  t.requires_grad_(true);
  return t;
}

std::vector<double> random_values(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist;
  std::vector<double> v(n);
  for (double& x : v) x = dist(gen);
  return v;
}

// The gradient of f(p) = ½ Σ (p - c)², through backward(), so the optimizer sees what training gives it.
void quadratic_backward(const Tensor& p, const Tensor& c) {
  Tensor d = sub(p, c);
  mul_scalar(sum(mul(d, d)), 0.5).backward();
}

void run_adamw(const Tensor& p, const Tensor& c, double lr, AdamWOptions o, int steps) {
  AdamW opt({{"p", p}}, lr, o);
  for (int s = 0; s < steps; ++s) {
    quadratic_backward(p, c);
    opt.update();
    opt.zero_grad();
  }
}

// AdamW on the quadratic in double, as in Loshchilov & Hutter: decay, moments, bias-corrected m̂ / (sqrt(v̂) + ε).
std::vector<double> adamw_reference(std::vector<double> p, const std::vector<double>& c, double lr, double wd,
                                    int steps) {
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  std::vector<double> m(p.size(), 0.0), v(p.size(), 0.0);
  for (int t = 1; t <= steps; ++t) {
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    for (size_t i = 0; i < p.size(); ++i) {
      const double g = p[i] - c[i];
      p[i] -= lr * wd * p[i];
      m[i] = b1 * m[i] + (1 - b1) * g;
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      const double m_hat = m[i] / bc1, v_hat = v[i] / bc2;
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
  return p;
}

void expect_near_all(const std::vector<double>& got, const std::vector<double>& want, double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "element " << i;
}

// p0 has an element equal to its target: zero gradient, zero moments, and it must not move (0 / (0 + ε)).
const std::vector<double> kP0 = {1.0, -2.0, 0.5, 3.0, -0.25};
const std::vector<double> kC = {0.0, 1.0, 0.5, -1.0, 0.75};

void check_adamw_on_quadratic(double lr, double wd) {
  for (DType dt : {DType::f64, DType::f32}) {
    Tensor p = param(kP0, dt), c = Tensor::from(kC, {5}, dt);
    run_adamw(p, c, lr, {0.9, 0.999, 1e-8, wd}, 3);
    expect_near_all(p.to_vector(), adamw_reference(kP0, kC, lr, wd, 3), dt == DType::f64 ? 1e-13 : 1e-6);
  }
}

TEST(Optim, AdamWFirstStepMovesEachWeightByLrAgainstItsGradient) {
  // m̂ / sqrt(v̂) = g / |g| on step 1, whatever the betas: a check that needs no reference implementation.
  Tensor p = param(kP0, DType::f64), c = Tensor::from(kC, {5}, DType::f64);
  run_adamw(p, c, 0.1, {}, 1);
  expect_near_all(p.to_vector(), {0.9, -1.9, 0.5, 2.9, -0.15}, 1e-8);
}

TEST(Optim, AdamWThreeStepsMatchFormulas) { check_adamw_on_quadratic(0.1, 0.0); }

TEST(Optim, AdamWWeightDecayIsDecoupled) {
  check_adamw_on_quadratic(0.05, 0.1);
  // And the decay matters: without it the result differs by more than the tolerance above.
  EXPECT_GT(std::abs(adamw_reference(kP0, kC, 0.05, 0.1, 3)[0] - adamw_reference(kP0, kC, 0.05, 0, 3)[0]), 1e-3);
}

TEST(Optim, AdamWLrScaleActsAsThatParametersLearningRate) {
  // Two parameters in one optimizer: the scaled one follows the reference at lr * scale, the other at lr.
  Tensor a = param(kP0, DType::f64), b = param(kP0, DType::f64), c = Tensor::from(kC, {5}, DType::f64);
  AdamW opt({{"a", a, 0.25}, {"b", b}}, 0.1, {0.9, 0.999, 1e-8, 0.1});
  for (int s = 0; s < 3; ++s) {
    quadratic_backward(a, c);
    quadratic_backward(b, c);
    opt.update();
    opt.zero_grad();
  }
  expect_near_all(a.to_vector(), adamw_reference(kP0, kC, 0.025, 0.1, 3), 1e-13);
  expect_near_all(b.to_vector(), adamw_reference(kP0, kC, 0.1, 0.1, 3), 1e-13);
}

TEST(Optim, AdamWLargeTensorTakesTheParallelPathToTheSameResult) {
  const size_t n = 40000;  // above the kernels' OpenMP threshold (32768)
  std::vector<double> p0 = random_values(n, 1), c = random_values(n, 2);
  Tensor p = param(p0, DType::f32);
  run_adamw(p, Tensor::from(c, {(int64_t)n}, DType::f32), 0.01, {0.9, 0.999, 1e-8, 0.01}, 3);
  expect_near_all(p.to_vector(), adamw_reference(p0, c, 0.01, 0.01, 3), 2e-6);
}

TEST(Optim, ParameterWithoutGradIsUntouched) {
  Tensor a = param({1, 2, 3}, DType::f32), b = param({4, 5}, DType::f32);
  Tensor c = Tensor::zeros({3});
  AdamW opt({{"a", a}, {"b", b}}, 0.1, {0.9, 0.999, 1e-8, 0.1});  // decay must be skipped too
  for (int s = 0; s < 2; ++s) {
    quadratic_backward(a, c);  // b is off the loss path
    ASSERT_FALSE(b.grad().defined());
    opt.update();
    opt.zero_grad();
  }
  EXPECT_EQ(b.vec<float>(), (std::vector<float>{4, 5}));
  EXPECT_NE(a.vec<float>(), (std::vector<float>{1, 2, 3}));
  auto state = opt.state();
  EXPECT_EQ(state.at("b.exp_avg").vec<float>(), (std::vector<float>{0, 0}));
  EXPECT_EQ(state.at("b.exp_avg_sq").vec<float>(), (std::vector<float>{0, 0}));
  EXPECT_NE(state.at("a.exp_avg").vec<float>(), (std::vector<float>{0, 0, 0}));
  EXPECT_EQ(opt.step(), 2);
}

TEST(Optim, SgdMomentumStepsByHand) {
  // f = ½p², g = p, lr 0.1, μ 0.9: buf 1, 1.8, 2.34 -> p 0.9, 0.72, 0.486.
  // With weight decay 0.1 (d = 1.1 p): buf 1.1, 1.969, 2.53451 -> p 0.89, 0.6931, 0.439649.
  for (double wd : {0.0, 0.1}) {
    Tensor p = param({1.0}, DType::f64), zero = Tensor::zeros({1}, DType::f64);
    SGD opt({{"p", p}}, 0.1, {0.9, 0, wd, false});
    std::vector<double> got;
    for (int s = 0; s < 3; ++s) {
      quadratic_backward(p, zero);
      opt.update();
      opt.zero_grad();
      got.push_back(p.item());
    }
    expect_near_all(got, wd == 0 ? std::vector<double>{0.9, 0.72, 0.486} : std::vector<double>{0.89, 0.6931, 0.439649},
                    1e-14);
  }
}

TEST(Optim, SgdDampeningAndNesterovFollowTorch) {
  // Reference of torch.optim.SGD in double; buf starts as the first gradient, undamped.
  for (SgdOptions o : {SgdOptions{0.8, 0.3, 0.05, false}, SgdOptions{0.8, 0, 0.05, true}}) {
    Tensor p = param(kP0, DType::f64), c = Tensor::from(kC, {5}, DType::f64);
    SGD opt({{"p", p}}, 0.1, o);
    std::vector<double> want = kP0, buf(5);
    for (int t = 0; t < 3; ++t) {
      quadratic_backward(p, c);
      opt.update();
      opt.zero_grad();
      for (size_t i = 0; i < 5; ++i) {
        double d = want[i] - kC[i] + o.weight_decay * want[i];
        buf[i] = t == 0 ? d : o.momentum * buf[i] + (1 - o.dampening) * d;
        want[i] -= 0.1 * (o.nesterov ? d + o.momentum * buf[i] : buf[i]);
      }
    }
    expect_near_all(p.to_vector(), want, 1e-14);
  }
}

TEST(Optim, ClipGradNormScalesToMaxNormAndReturnsPreClipNorm) {
  Tensor a = param({0, 0}, DType::f32), b = param({0}, DType::f32), unused = param({7}, DType::f32);
  std::vector<ParamRef> ps = {{"a", a}, {"b", b}, {"unused", unused}};
  a.set_grad(Tensor::from(std::vector<double>{3, 4}, {2}));
  b.set_grad(Tensor::from(std::vector<double>{12}, {1}));
  EXPECT_DOUBLE_EQ(clip_grad_norm(ps, 20.0), 13.0);  // below the max: untouched
  EXPECT_EQ(a.grad().vec<float>(), (std::vector<float>{3, 4}));

  EXPECT_DOUBLE_EQ(clip_grad_norm(ps, 6.5), 13.0);
  const double k = 6.5 / (13.0 + 1e-6);  // torch's coefficient
  expect_near_all(a.grad().to_vector(), {3 * k, 4 * k}, 1e-6);
  expect_near_all(b.grad().to_vector(), {12 * k}, 1e-6);
  EXPECT_NEAR(clip_grad_norm(ps, 100.0), 6.5, 1e-5);
}

// Two parameters holding one gradient buffer (set_grad; backward() gives each its own): the clip must scale it
// once (it was scaled once per parameter, by coef², and on a GPU in one launch it would race).
TEST(Optim, ClipScalesAGradientSharedByTwoParametersOnce) {
  Tensor a = param({1, 2}, DType::f32), b = param({3, 4}, DType::f32);
  const Tensor shared = Tensor::full({2}, 10.0);
  a.set_grad(shared);
  b.set_grad(shared);
  std::vector<ParamRef> ps = {{"a", a}, {"b", b}};
  const double norm = clip_grad_norm(ps, 1.0), k = 1.0 / (norm + 1e-6);
  EXPECT_NEAR(norm, 20.0, 1e-9);  // four entries of 10
  expect_near_all(a.grad().to_vector(), {10 * k, 10 * k}, 1e-6);
}

TEST(Optim, GradNormIsExactAndIndependentOfThreadCount) {
  std::vector<double> g = random_values(100003, 3);
  double want = 0;
  for (double x : g) want += double(float(x)) * double(float(x));
  Tensor p = param(std::vector<double>(g.size(), 0.0), DType::f32);
  p.set_grad(Tensor::from(g, {(int64_t)g.size()}));
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const double one = clip_grad_norm({{"p", p}}, 1e9);
  omp_set_num_threads(std::max(threads, 3));
  const double many = clip_grad_norm({{"p", p}}, 1e9);
  omp_set_num_threads(threads);
  EXPECT_EQ(one, many);
  EXPECT_NEAR(one, std::sqrt(want), 1e-12 * std::sqrt(want));
}

TEST(Optim, NonFiniteGradientsAreReportedAndLeftAlone) {
  Tensor a = param({0, 0, 0}, DType::f32);
  std::vector<ParamRef> ps = {{"a", a}};
  // The largest finite gradients still give a finite norm: the check cannot mistake overflow for a bad value.
  a.set_grad(Tensor::from(std::vector<double>{FLT_MAX, -FLT_MAX, FLT_MAX}, {3}));
  EXPECT_TRUE(std::isfinite(clip_grad_norm(ps, 1.0)));
  for (double bad : {NAN, INFINITY, -INFINITY}) {
    a.set_grad(Tensor::from(std::vector<double>{1, bad, 3}, {3}));
    EXPECT_FALSE(std::isfinite(clip_grad_norm(ps, 1.0))) << bad;
    EXPECT_EQ(a.grad().to_vector()[0], 1.0);  // not scaled to NaN or 0
  }
}

TEST(Optim, ScheduleValuesFollowHuggingFace) {
  // Stage I settings: peak 1e-5, 20 warmup steps, 330 steps.
  Schedule lin{Schedule::linear, 1e-5, 20, 330};
  EXPECT_EQ(lr_at(lin, 0), 0.0);  // HF's first update uses lr 0
  EXPECT_DOUBLE_EQ(lr_at(lin, 10), 5e-6);
  EXPECT_DOUBLE_EQ(lr_at(lin, 20), 1e-5);
  EXPECT_DOUBLE_EQ(lr_at(lin, 175), 1e-5 * 155.0 / 310.0);
  EXPECT_EQ(lr_at(lin, 330), 0.0);
  EXPECT_EQ(lr_at(lin, 400), 0.0);

  Schedule cos{Schedule::cosine, 1e-3, 10, 110, 1e-4};
  EXPECT_DOUBLE_EQ(lr_at(cos, 5), 5e-4);
  EXPECT_DOUBLE_EQ(lr_at(cos, 10), 1e-3);
  EXPECT_DOUBLE_EQ(lr_at(cos, 60), 1e-4 + 0.9e-3 * 0.5);
  EXPECT_NEAR(lr_at(cos, 35), 1e-4 + 0.9e-3 * 0.5 * (1 + std::cos(M_PI / 4)), 1e-18);
  EXPECT_DOUBLE_EQ(lr_at(cos, 110), 1e-4);
  EXPECT_DOUBLE_EQ(lr_at(cos, 200), 1e-4);

  Schedule con{Schedule::constant, 2e-4, 4, 100};
  EXPECT_DOUBLE_EQ(lr_at(con, 1), 5e-5);
  EXPECT_DOUBLE_EQ(lr_at(con, 4), 2e-4);
  EXPECT_DOUBLE_EQ(lr_at(con, 1000), 2e-4);
  EXPECT_DOUBLE_EQ(lr_at(Schedule{Schedule::linear, 1.0, 0, 10}, 0), 1.0);  // no warmup: peak at once
}

// Params of a small two-tensor model.
std::vector<ParamRef> model_params(const std::vector<Tensor>& values) {
  return {{"w", values[0]}, {"b", values[1]}};
}

void train_steps(AdamW& opt, const std::vector<Tensor>& targets, const Schedule& s, int steps) {
  for (int k = 0; k < steps; ++k) {
    opt.set_lr(lr_at(s, opt.step()));  // a wrongly restored step changes the lr, not only the bias correction
    for (size_t i = 0; i < targets.size(); ++i) quadratic_backward(opt.params()[i].param, targets[i]);
    clip_grad_norm(opt.params(), 1.0);
    opt.update();
    opt.zero_grad();
  }
}

TEST(Optim, ResumedAdamWContinuesBitIdentically) {
  const int64_t n = 4000;
  std::vector<Tensor> targets = {Tensor::from(random_values(n, 5), {n}), Tensor::from(random_values(3, 6), {3})};
  std::vector<Tensor> pa = {param(random_values(n, 7), DType::f32), param({0.1, 0.2, 0.3}, DType::f32)};
  const Schedule s{Schedule::linear, 1e-2, 3, 10};
  AdamW a(model_params(pa), 0.0, {0.9, 0.999, 1e-8, 0.01});
  train_steps(a, targets, s, 2);

  std::vector<Tensor> pb = {pa[0].clone().requires_grad_(true), pa[1].clone().requires_grad_(true)};
  AdamW b(model_params(pb), 0.0, {0.9, 0.999, 1e-8, 0.01});
  b.load_state(a.state(), a.step());
  train_steps(a, targets, s, 4);
  train_steps(b, targets, s, 4);
  EXPECT_EQ(b.step(), 6);
  for (int i = 0; i < 2; ++i) EXPECT_EQ(pa[i].vec<float>(), pb[i].vec<float>()) << "parameter " << i;
  EXPECT_NE(pa[1].vec<float>(), (std::vector<float>{0.1f, 0.2f, 0.3f}));  // it did train
}

TEST(Optim, LoadStateErrorsNameTheKey) {
  Tensor w = param({1, 2}, DType::f32);
  AdamW opt({{"w", w}});
  auto state = opt.state();
  state.erase("w.exp_avg_sq");
  EXPECT_NE(error_of([&] { opt.load_state(state, 1); }).find("missing 'w.exp_avg_sq'"), std::string::npos);
  state["w.exp_avg_sq"] = Tensor::zeros({3});
  EXPECT_NE(error_of([&] { opt.load_state(state, 1); }).find("'w.exp_avg_sq' has shape [3]"), std::string::npos);
  state["w.exp_avg_sq"] = Tensor::zeros({2});
  state["v.exp_avg"] = Tensor::zeros({2});
  EXPECT_NE(error_of([&] { opt.load_state(state, 1); }).find("unexpected 'v.exp_avg'"), std::string::npos);
  EXPECT_EQ(opt.step(), 0);  // failed loads change nothing
}

TEST(Optim, BadGradientOrSetupFailsNamingTheParameter) {
  Tensor w = param({1, 2}, DType::f32);
  AdamW opt({{"w", w}});
  w.set_grad(Tensor::zeros({3}));
  EXPECT_NE(error_of([&] { opt.update(); }).find("gradient of 'w' is [3] f32"), std::string::npos);
  EXPECT_EQ(opt.step(), 0);
  EXPECT_NE(error_of([&] { AdamW({{"w", w}, {"w", w}}); }).find("'w' appears twice"), std::string::npos);
  // One buffer under two names would be stepped twice (a view of it as well).
  EXPECT_NE(error_of([&] { SGD({{"a.weight", w}, {"b.weight", w}}, 0.1); })
                .find("parameters 'a.weight' and 'b.weight' are the same tensor"),
            std::string::npos);
  EXPECT_NE(error_of([&] { AdamW({{"w", w}, {"w_view", reshape(w, {2})}}); }).find("same tensor"), std::string::npos);
  EXPECT_NE(error_of([&] { AdamW({{"w", w}}, 1e-3, {1.0, 0.999}); }).find("betas"), std::string::npos);
}

}  // namespace
}  // namespace psa::nn
