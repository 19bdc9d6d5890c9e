// Finite-difference gradient check in f64: every input is perturbed by ±eps, the scalar
// L = sum(f(inputs) * w) (w fixed random weights, so every output element matters) is recomputed, and the
// central difference is compared with the analytic gradient from backward().
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "autograd/ops.h"

namespace psa {

struct GradcheckResult {
  bool ok = true;
  double max_abs_err = 0, max_rel_err = 0;
  std::string report;  // first failure: input, element, analytic vs numeric
};

// inputs must be f64; those with requires_grad are checked.
GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f, std::vector<Tensor> inputs,
                          double eps = 1e-6, double atol = 1e-6, double rtol = 1e-5);

// |a - b| for checks against a tolerance: a pair of the same non-finite value (NaN and NaN, Inf and Inf) gives 0,
// any other pair holding a non-finite value +Inf. A raw NaN would pass them silently: std::max(worst, NaN) keeps
// worst, and NaN > tol is false.
double abs_error(double a, double b);

// Seeded helpers for tests and initialisation (Philox on the host, then copied: the same values on every
// device).
Tensor randn(const Shape& shape, uint64_t seed, DType dtype = DType::f32, double stddev = 1.0,
             Device device = Device::cpu);
Tensor rand_uniform(const Shape& shape, uint64_t seed, double lo, double hi, DType dtype = DType::f32,
                    Device device = Device::cpu);

}  // namespace psa
