// The vectorised f32 exp and Gaussian CDF/density (tensor/cpu/vec_math.h) against std::exp and std::erfc in
// double: a dense sweep of every input
// range the kernels can see, including results that round into denormals or overflow, and the special values.
// Error is counted in ulps of the correctly rounded f32 result (so denormal results are held to their own
// spacing, not to a relative error they cannot have), and reported as a relative error for normal results.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "autograd/gradcheck.h"
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

// Every input of [lo, hi) at step `step`, through the array path (full vectors and a masked last one).
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
    if (std::isnan(u)) u = INFINITY;  // a NaN result is the worst, not skipped by `>`
    if (u > e.max_ulps) e.max_ulps = u, e.worst_x = x[i];
    if (exact >= std::numeric_limits<float>::min()) e.max_rel = std::max(e.max_rel, psa::abs_error(y[i], exact) / exact);
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
  // 17 values: full vectors and a masked last one.
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

// The row loops at every length around the lane width: the last partial vector must be read and written only
// where the row is (the rest of the buffer keeps its sentinel), give the scalar exp's bits, and leave the
// masked lanes out of the max and the sum.
TEST(VecRows, PartialVectorsAtEveryLength) {
  using psa::cpu::exp_shifted_sum;
  using psa::cpu::row_max;
  const float sentinel = -12345.0f;
  for (int64_t n = 0; n <= 50; ++n) {
    SCOPED_TRACE("n = " + std::to_string(n));
    std::vector<float> x(n + 20, 7.0f), y(n + 20, sentinel);  // 7 past the row: larger than any value in it
    for (int64_t i = 0; i < n; ++i) x[i] = std::sin(0.7 * i) * 3.0f - (i == n / 2 ? 0.0f : 1.0f);
    float mx = row_max(x.data(), n), expect_mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) expect_mx = std::max(expect_mx, x[i]);
    EXPECT_EQ(mx, expect_mx);
    if (n == 0) continue;
    double sum = exp_shifted_sum(x.data(), mx, y.data(), n), expect_sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(y[i], exp_f32(x[i] - mx)) << "i = " << i;
      expect_sum += std::exp((double)x[i] - mx);
    }
    for (size_t i = n; i < y.size(); ++i) ASSERT_EQ(y[i], sentinel) << "written past the row at " << i;
    EXPECT_NEAR(sum, expect_sum, 1e-6 * expect_sum);
    std::vector<float> z(n + 20, sentinel);
    exp_array(x.data(), z.data(), n);
    for (size_t i = n; i < z.size(); ++i) ASSERT_EQ(z[i], sentinel) << "exp_array wrote past the row at " << i;
  }
}

// ---- Φ(x), φ(x) for the exact gelu -------------------------------------------------------------------------

using psa::cpu::gauss_f32;

// Φ and φ of x through the lanes (VecF, the last vector masked) where there are lanes, else the scalar form.
void gauss_array(const std::vector<float>& x, std::vector<float>& cdf, std::vector<float>& pdf) {
  cdf.resize(x.size()), pdf.resize(x.size());
#ifdef PSA_VEC_EXP
  psa::cpu::lane_loop((int64_t)x.size(), [&](int64_t i, auto m) {
    psa::cpu::VecF c, p;
    gauss_f32(psa::cpu::load_lanes(&x[i], m), c, p);
    psa::cpu::store_lanes(&cdf[i], c, m), psa::cpu::store_lanes(&pdf[i], p, m);
  });
#else
  for (size_t i = 0; i < x.size(); ++i) gauss_f32(x[i], cdf[i], pdf[i]);
#endif
}

// Φ(x) and φ(x) of every float input of [lo, hi) at `step`, through the lanes where there are lanes, against
// double: Φ = erfc(-x/√2)/2 keeps its relative precision at negative x, where 1 + erf cancels.
struct GaussError {
  double cdf_rel = 0, pdf_rel = 0;
  float worst_cdf_x = 0, worst_pdf_x = 0;
};

GaussError gauss_sweep(double lo, double hi, double step) {
  std::vector<float> x, cdf, pdf;
  for (double v = lo; v < hi; v += step) x.push_back((float)v);
  gauss_array(x, cdf, pdf);
  GaussError e;
  const double min_normal = std::numeric_limits<float>::min();
  for (size_t k = 0; k < x.size(); ++k) {
    double xd = x[k], exact_cdf = 0.5 * std::erfc(-xd / std::sqrt(2.0));
    double exact_pdf = std::exp(-0.5 * xd * xd) / std::sqrt(2 * M_PI);
    if (exact_cdf >= min_normal) {
      double r = psa::abs_error(cdf[k], exact_cdf) / exact_cdf;
      if (r > e.cdf_rel) e.cdf_rel = r, e.worst_cdf_x = x[k];
    }
    if (exact_pdf >= min_normal) {
      double r = psa::abs_error(pdf[k], exact_pdf) / exact_pdf;
      if (r > e.pdf_rel) e.pdf_rel = r, e.worst_pdf_x = x[k];
    }
  }
  return e;
}

TEST(VecGauss, DenseSweepKeepsRelativePrecision) {
  // Down to x = -13: Φ(-13) ~ 6e-39 is still a normal float, so relative error is meaningful over the range.
  GaussError e = gauss_sweep(-13.0, 13.0, 1.0 / 8192 + 1e-8);
  std::printf("gauss f32: Φ max relative error %.3g (at x = %.6g), φ %.3g (at x = %.6g)\n", e.cdf_rel,
              e.worst_cdf_x, e.pdf_rel, e.worst_pdf_x);
  EXPECT_LE(e.cdf_rel, 1e-6) << "worst at x = " << e.worst_cdf_x;
  EXPECT_LE(e.pdf_rel, 1e-6) << "worst at x = " << e.worst_pdf_x;
}

TEST(VecGauss, SpecialValuesAndLanesMatchScalar) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> x = {0.0f, -0.0f, inf, -inf, nan, 0.7071f, -0.7071f, 0.7072f, 40.0f, -40.0f, 15.0f, -15.0f,
                          1e-30f, -1e-30f, 3.0f, -3.0f, 0.5f};
  for (float v = -20.0f; v < 20.0f; v += 0.173f) x.push_back(v);
  std::vector<float> cdf, pdf;
  gauss_array(x, cdf, pdf);
  for (size_t k = 0; k < x.size(); ++k) {
    float c, p;
    gauss_f32(x[k], c, p);
    if (std::isnan(x[k])) {
      EXPECT_TRUE(std::isnan(cdf[k]) && std::isnan(c) && std::isnan(pdf[k]));
      continue;
    }
    EXPECT_EQ(cdf[k], c) << "Φ lane vs scalar at x = " << x[k];
    EXPECT_EQ(pdf[k], p) << "φ lane vs scalar at x = " << x[k];
  }
  EXPECT_EQ(cdf[0], 0.5f);
  EXPECT_EQ(cdf[2], 1.0f);
  EXPECT_EQ(cdf[3], 0.0f);
  EXPECT_EQ(pdf[2], 0.0f);
  EXPECT_EQ(pdf[3], 0.0f);
  EXPECT_EQ(cdf[8], 1.0f);
  EXPECT_EQ(cdf[9], 0.0f);
}

}  // namespace
