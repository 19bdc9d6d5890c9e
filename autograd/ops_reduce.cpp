// Reductions. Gradient rules: sum over a dim -> the gradient broadcast back along that dim; mean = sum / n;
// max -> the gradient routed to the (first) position of the maximum, zero elsewhere.
#include "autograd/op_util.h"
#include "tensor/dispatch.h"

namespace psa {
namespace {

Shape reduced_shape(const Shape& s, int64_t dim, bool keepdim) {
  Shape out = s;
  if (keepdim) out[dim] = 1;
  else out.erase(out.begin() + dim);
  return out;
}

}  // namespace

Tensor sum(const Tensor& a, int64_t dim, bool keepdim) {
  check_defined("sum", a, "input");
  check_float("sum", a);
  if (a.dim() == 0) return a;
  int64_t d = normalize_dim("sum", dim, a.dim());
  DimSplit sp = split_at(a.shape(), d);
  Tensor out = Tensor::empty(reduced_shape(a.shape(), d, keepdim), a.dtype(), a.device());
  PSA_KERNEL(out.device(), sum_dim)(a, sp.outer, sp.n, sp.inner, out);
  Shape sa = a.shape(), kept = reduced_shape(a.shape(), d, true);
  return record("sum", out, {a}, [=](const Tensor& g) -> Grads { return {expand(reshape(g, kept), sa)}; });
}

Tensor sum(const Tensor& a) { return sum(reshape(a, {a.numel()}), 0, false); }

Tensor mean(const Tensor& a, int64_t dim, bool keepdim) {
  // Over an empty dim: 0 / 0 = NaN, as torch.mean (a zero would pass for a real mean).
  return mul_scalar(sum(a, dim, keepdim), 1.0 / (double)a.size(dim));
}

Tensor mean(const Tensor& a) { return mul_scalar(sum(a), 1.0 / (double)a.numel()); }

Tensor max(const Tensor& a) { return max(reshape(a, {a.numel()}), 0, false); }

Tensor max(const Tensor& a, int64_t dim, bool keepdim) {
  check_defined("max", a, "input");
  int64_t d = normalize_dim("max", dim, a.dim());
  PSA_CHECK(a.size(d) > 0, "max: empty dim ", dim, " in ", shape_str(a.shape()));
  DimSplit sp = split_at(a.shape(), d);
  Shape out_shape = reduced_shape(a.shape(), d, keepdim);
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  Tensor idx = Tensor::empty(out_shape, DType::i64, a.device());
  PSA_KERNEL(out.device(), max_dim)(a, sp.outer, sp.n, sp.inner, out, idx);
  Shape sa = a.shape();
  DType dt = a.dtype();
  return record("max", out, {a}, [=](const Tensor& g) -> Grads {
    Tensor ga = Tensor::empty(sa, dt, g.device());
    PSA_KERNEL(ga.device(), max_backward)(g, idx, sp.outer, sp.n, sp.inner, ga);
    return {ga};
  });
}

Tensor argmax(const Tensor& a, int64_t dim) {
  int64_t d = normalize_dim("argmax", dim, a.dim());
  PSA_CHECK(a.size(d) > 0, "argmax: empty dim ", dim, " in ", shape_str(a.shape()));
  DimSplit sp = split_at(a.shape(), d);
  Tensor idx = Tensor::empty(reduced_shape(a.shape(), d, false), DType::i64, a.device());
  Tensor none;
  PSA_KERNEL(idx.device(), max_dim)(a, sp.outer, sp.n, sp.inner, none, idx);
  return record_nondifferentiable("argmax", idx, {a});
}

// Sums away the dims that broadcasting added (leading) or stretched (size 1 in `shape`).
Tensor sum_to(const Tensor& a, const Shape& shape) {
  if (a.shape() == shape) return a;
  PSA_CHECK(a.dim() >= (int64_t)shape.size(), "sum_to: ", shape_str(a.shape()), " to ", shape_str(shape));
  Tensor r = a;
  while (r.dim() > (int64_t)shape.size()) r = sum(r, 0, false);
  for (int64_t d = 0; d < r.dim(); ++d)
    if (shape[d] == 1 && r.size(d) != 1) r = sum(r, d, true);
  PSA_CHECK(r.shape() == shape, "sum_to: ", shape_str(a.shape()), " cannot reduce to ", shape_str(shape));
  return r;
}

}  // namespace psa
