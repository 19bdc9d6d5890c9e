// Small helpers shared by the test suites.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "autograd/gradcheck.h"
#include "tensor/error.h"
#include "tensor/tensor.h"

namespace psa::test {

// Message of the psa::Error thrown by f, or "" (so a missing throw fails the caller's EXPECT).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const psa::Error& e) {
    return e.what();
  }
  return "";
}

// A path under the repository root: committed test inputs sit beside the tests, and __FILE__ is relative to the
// root where make compiles (absolute when built elsewhere).
inline std::string repo_path(const std::string& rel) {
  std::filesystem::path here = std::filesystem::path(__FILE__).parent_path().parent_path();
  return (here.empty() ? std::filesystem::path(rel) : here / rel).string();
}

// Largest |a - b| over the elements (any dtype, any device), +Inf where only one side is NaN or infinite; a shape
// mismatch fails the calling test.
inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  std::vector<double> x = a.to_vector(), y = b.to_vector();
  double d = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) d = std::max(d, abs_error(x[i], y[i]));
  return d;
}

// max |got - ref| / (1 + |ref|) over the elements (+Inf where only one side of a pair is NaN or infinite).
inline double elementwise_error(const std::vector<double>& got, const std::vector<double>& ref) {
  double worst = 0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i)
    worst = std::max(worst, abs_error(got[i], ref[i]) / (1 + std::fabs(ref[i])));
  return worst;
}

// ||got - ref||_2 / ||ref||_2 (+Inf where only one side of a pair is NaN or infinite). An elementwise error over
// (1 + |ref|) is an absolute one for small values: it passes a gradient whose entries near 1e-6 are zero or off by
// a percent; this sees the tensor's scale. 0 for a reference whose RMS is below 1e-6, zero up to rounding (a layer
// norm over one element: its input gradient is f32 noise of the inputs' size), which only the elementwise error
// can judge.
inline double relative_norm_error(const std::vector<double>& got, const std::vector<double>& ref) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    const double e = abs_error(got[i], ref[i]);
    diff += e * e;
    if (std::isfinite(ref[i])) norm += ref[i] * ref[i];
  }
  if (norm <= 1e-12 * (double)ref.size()) return 0;
  return std::sqrt(diff / norm);
}

}  // namespace psa::test
