#include "autograd/gradcheck.h"

#include <cmath>

#include "tensor/rng.h"

namespace psa {

Tensor randn(const Shape& shape, uint64_t seed, DType dtype, double stddev, Device device) {
  Tensor t = Tensor::empty(shape, DType::f64);
  double* p = t.data<double>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = stddev * philox_normal(seed, 0, i);
  return t.to(dtype).to(device);
}

Tensor rand_uniform(const Shape& shape, uint64_t seed, double lo, double hi, DType dtype, Device device) {
  Tensor t = Tensor::empty(shape, DType::f64);
  double* p = t.data<double>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = lo + (hi - lo) * philox_uniform(seed, 1, i);
  return t.to(dtype).to(device);
}

double abs_error(double a, double b) {
  if (std::isfinite(a) && std::isfinite(b)) return std::fabs(a - b);
  return (std::isnan(a) && std::isnan(b)) || a == b ? 0.0 : INFINITY;
}

namespace {

double weighted_sum(const Tensor& out, const Tensor& w) {
  std::vector<double> o = out.to_vector(), ww = w.to_vector();
  double s = 0;
  for (size_t i = 0; i < o.size(); ++i) s += o[i] * ww[i];
  return s;
}

}  // namespace

GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f, std::vector<Tensor> inputs,
                          double eps, double atol, double rtol) {
  GradcheckResult res;
  for (Tensor& t : inputs)
    PSA_CHECK(t.dtype() != DType::f32, "gradcheck: inputs must be f64 (or integer), got f32 ", shape_str(t.shape()));
  Tensor out = f(inputs);
  Tensor w = randn(out.shape(), 12345, DType::f64);
  for (Tensor& t : inputs) t.zero_grad();
  sum(mul(out, w)).backward();
  NoGrad no_grad;
  for (size_t k = 0; k < inputs.size(); ++k) {
    Tensor& x = inputs[k];
    if (!x.requires_grad()) continue;
    Tensor analytic = x.grad();
    std::vector<double> ga = analytic.defined() ? analytic.to_vector() : std::vector<double>(x.numel(), 0.0);
    double* p = x.data<double>();
    for (int64_t i = 0; i < x.numel(); ++i) {
      double orig = p[i];
      p[i] = orig + eps;
      double up = weighted_sum(f(inputs), w);
      p[i] = orig - eps;
      double down = weighted_sum(f(inputs), w);
      p[i] = orig;
      double numeric = (up - down) / (2 * eps);
      // A gradient is never expected to be NaN or infinite: a non-finite value on either side fails.
      double err = std::isfinite(numeric) && std::isfinite(ga[i]) ? std::fabs(numeric - ga[i]) : INFINITY;
      res.max_abs_err = std::max(res.max_abs_err, err);
      res.max_rel_err = std::max(res.max_rel_err, err / std::max(std::fabs(numeric), 1e-12));
      if (!(err <= atol + rtol * std::fabs(numeric)) && res.ok) {
        res.ok = false;
        res.report = str_cat("input ", k, " ", shape_str(x.shape()), " element ", i, ": analytic ", ga[i],
                             " numeric ", numeric);
      }
    }
  }
  return res;
}

}  // namespace psa
