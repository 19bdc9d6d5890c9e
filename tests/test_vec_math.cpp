// The vectorised f32 exp (tensor/cpu/vec_math.h) against std::exp in double: a dense sweep of every input
// range the kernels can see, including results that round into denormals or overflow, and the special values.
// Error is counted in ulps of the correctly rounded f32 result (so denormal results are held to their own
// spacing, not to a relative error they cannot have), and reported as a relative error for normal results.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "tensor/cpu/vec_math.h"

namespace {

using psa::cpu::exp_array;
using psa::cpu::exp_f32;

// Distance in representable floats between got and the exact value (both finite, non-negative).
double ulps(float got, double exact) {
  float rounded = (float)exact;
  double spacing = std::nextafter(rounded, std::numeric_limits<float>::infinity()) - (double)rounded;
  if (rounded == std::numeric_limits<float>::max()) spacing = rounded - (double)std::nextafter(rounded, 0.0f);
  return std::fabs((double)got - exact) / spacing;
}

struct SweepError {
  double max_ulps = 0, max_rel = 0;  // max_rel over normal results only
  float worst_x = 0;
};

// Every input of [lo, hi) at step `step`, through the array path (vector body and scalar tail).
SweepError sweep(double lo, double hi, double step) {
  std::vector<float> x;
  for (double v = lo; v < hi; v += step) x.push_back((float)v);
  std::vector<float> y(x.size());
  exp_array(x.data(), y.data(), (int64_t)x.size());
  SweepError e;
  for (size_t i = 0; i < x.size(); ++i) {
    double exact = std::exp((double)x[i]);
    if (exact > std::numeric_limits<float>::max()) {
      EXPECT_TRUE(std::isinf(y[i]) || ulps(y[i], std::numeric_limits<float>::max()) <= 1) << "x = " << x[i];
      continue;
    }
    double u = ulps(y[i], exact);
    if (u > e.max_ulps) e.max_ulps = u, e.worst_x = x[i];
    if (exact >= std::numeric_limits<float>::min()) e.max_rel = std::max(e.max_rel, std::fabs(y[i] - exact) / exact);
  }
  return e;
}

TEST(VecExp, DenseSweepWithinTwoUlps) {
  SweepError e = sweep(-104.0, 89.0, 1.0 / 4096 + 1e-7);  // ~790k inputs, off the binary grid
  std::printf("exp f32: max %.3f ulp (at x = %.6g), max relative error %.3g on normal results\n", e.max_ulps,
              e.worst_x, e.max_rel);
  EXPECT_LE(e.max_ulps, 2.0) << "worst at x = " << e.worst_x;
  EXPECT_LE(e.max_rel, 3e-7);
}

TEST(VecExp, SmallArgumentsAndSoftmaxRange) {
  // Softmax and the activations see x - max <= 0 and |x| of a few units: sweep [-20, 20] more finely.
  SweepError e = sweep(-20.0, 20.0, 1.0 / 65536 + 1e-9);
  EXPECT_LE(e.max_ulps, 2.0) << "worst at x = " << e.worst_x;
  SweepError tiny = sweep(-1e-3, 1e-3, 1e-7);
  EXPECT_LE(tiny.max_ulps, 1.0) << "worst at x = " << tiny.worst_x;
}

TEST(VecExp, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  // 17 values: two full vectors and a tail, so both paths see every special value.
  std::vector<float> x = {0.0f, -0.0f, 1.0f, -inf, inf, nan, 88.72f, 88.73f, 100.0f, -87.0f, -100.0f, -104.0f,
                          -1e30f, 1e30f, -nan, std::numeric_limits<float>::denorm_min(), -150.0f};
  std::vector<float> y(x.size());
  exp_array(x.data(), y.data(), (int64_t)x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    SCOPED_TRACE("x = " + std::to_string(x[i]));
    EXPECT_EQ(std::isnan(y[i]), std::isnan(x[i]));
    if (std::isnan(x[i])) continue;
    double exact = std::exp((double)x[i]);
    if (exact > std::numeric_limits<float>::max()) EXPECT_EQ(y[i], inf);
    else EXPECT_LE(ulps(y[i], exact), 2.0) << "got " << y[i];
  }
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[3], 0.0f);
  EXPECT_EQ(y[4], inf);
}

TEST(VecExp, ScalarMatchesVectorLanesBitForBit) {
  std::vector<float> x;
  for (float v = -105.0f; v < 90.0f; v += 0.37f) x.push_back(v);
  std::vector<float> y(x.size());
  exp_array(x.data(), y.data(), (int64_t)x.size());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(y[i], exp_f32(x[i])) << "x = " << x[i];
}

}  // namespace
