#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>

#include "op_harness.h"
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
    if (c.reference && c.run && !c.shapes.empty()) covered.insert(c.op);
  for (const OpRow& row : op_table())
    EXPECT_TRUE(covered.count(row.name)) << "op '" << row.name << "' (" << row.family
                                         << ") has no forward reference + gradcheck case";
  for (const OpCase& c : op_cases()) EXPECT_TRUE(is_registered_op(c.op.c_str())) << c.op << " is not in the op table";
}

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
      double worst = 0;
      for (size_t i = 0; i < r.size(); ++i) worst = std::max(worst, std::fabs(g[i] - r[i]) / (1 + std::fabs(r[i])));
      EXPECT_LE(worst, c.fwd_tol);
    }
  }
}

TEST(Ops, GradientsMatchFiniteDifferences) {
  for (const OpCase& c : op_cases()) {
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

}  // namespace
}  // namespace psa::test
