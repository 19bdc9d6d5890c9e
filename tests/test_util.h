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

}  // namespace psa::test
