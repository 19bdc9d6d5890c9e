// The op test harness. Each op-table row registers an OpCase: how to run the op, a naive f64 reference written
// independently with plain loops, and the input shapes to try (include odd, non-tile-multiple sizes).
// tests/test_ops.cpp runs every case forward in f32 against the reference, checks gradients by central
// differences in f64, and fails when a table row has no case.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "autograd/gradcheck.h"
#include "autograd/ops.h"

namespace psa::test {

using Inputs = std::vector<Tensor>;
using OpFn = std::function<Tensor(const Inputs&)>;

struct OpCase {
  std::string op;                          // the op-table row this case covers
  std::vector<std::vector<Shape>> shapes;  // one input-shape list per trial
  OpFn run;                                // the engine op
  OpFn reference;                          // naive loops over f64 host data
  // Makes the inputs of one trial in `dtype`; default: N(0,1) for every shape. Integer inputs stay integer.
  std::function<Inputs(const std::vector<Shape>&, uint64_t seed, DType dtype)> make_inputs;
  std::vector<bool> differentiable;  // per input; default all true (integer inputs are never checked)
  double fwd_tol = 1e-5;             // max |f32 - ref| / (1 + |ref|)
  double grad_eps = 1e-6, grad_atol = 1e-6, grad_rtol = 1e-5;
  // false for shapes too large for central differences (two forwards per input element): such a case runs
  // forward against the reference, f32 gradients against f64 ones and CUDA parity, and covers the long-row
  // kernel paths (256 threads per row, several 64-row chunks of weight-gradient sums).
  bool finite_differences = true;
};

std::vector<OpCase>& op_cases();
bool register_cases(std::vector<OpCase> cases);

Inputs randn_inputs(const std::vector<Shape>& shapes, uint64_t seed, DType dtype);
// Host access to f64 tensors in references.
inline const double* cd(const Tensor& t) { return t.data<double>(); }
inline double* md(Tensor& t) { return t.data<double>(); }
inline Tensor empty64(const Shape& s) { return Tensor::empty(s, DType::f64); }

}  // namespace psa::test
