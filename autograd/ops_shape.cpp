// Shape ops. Gradient rules: reshape -> reshape back; permute -> inverse permutation; concat -> slices;
// slice -> zero tensor with the gradient copied into the slice; expand -> sum_to; index_select -> index_add.
#include "autograd/op_util.h"
#include "tensor/dispatch.h"

namespace psa {
namespace {

Shape infer_shape(const Shape& want, int64_t numel, const Shape& from) {
  Shape s = want;
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      PSA_CHECK(infer < 0, "reshape: more than one -1 in ", shape_str(want));
      infer = i;
    } else {
      PSA_CHECK(s[i] >= 0, "reshape: bad target shape ", shape_str(want));
      known *= s[i];
    }
  }
  if (infer >= 0) {
    PSA_CHECK(known > 0 && numel % known == 0, "reshape: ", shape_str(from), " to ", shape_str(want));
    s[infer] = numel / known;
  }
  PSA_CHECK(shape_numel(s) == numel, "reshape: ", shape_str(from), " (", numel, " elements) to ", shape_str(want));
  return s;
}

}  // namespace

Tensor reshape(const Tensor& a, const Shape& shape) {
  check_defined("reshape", a, "input");
  Shape s = infer_shape(shape, a.numel(), a.shape());
  if (s == a.shape()) return a;
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = a.impl()->storage;
  impl->offset = a.impl()->offset;
  impl->shape = s;
  impl->dtype = a.dtype();
  Shape sa = a.shape();
  return record("reshape", Tensor(impl), {a}, [=](const Tensor& g) -> Grads { return {reshape(g, sa)}; });
}

Tensor permute(const Tensor& a, const std::vector<int64_t>& perm) {
  check_defined("permute", a, "input");
  int64_t rank = a.dim();
  PSA_CHECK((int64_t)perm.size() == rank, "permute: ", perm.size(), " dims for a tensor of shape ",
            shape_str(a.shape()));
  std::vector<int64_t> p(rank), inverse(rank, -1);
  Shape out_shape(rank);
  for (int64_t i = 0; i < rank; ++i) {
    p[i] = normalize_dim("permute", perm[i], rank);
    PSA_CHECK(inverse[p[i]] < 0, "permute: dim ", perm[i], " repeated");
    inverse[p[i]] = i;
    out_shape[i] = a.size(p[i]);
  }
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  PSA_KERNEL(out.device(), permute)(a, p, out);
  return record("permute", out, {a}, [=](const Tensor& g) -> Grads { return {permute(g, inverse)}; });
}

Tensor transpose(const Tensor& a, int64_t d0, int64_t d1) {
  std::vector<int64_t> perm(a.dim());
  for (int64_t i = 0; i < a.dim(); ++i) perm[i] = i;
  std::swap(perm[normalize_dim("transpose", d0, a.dim())], perm[normalize_dim("transpose", d1, a.dim())]);
  return permute(a, perm);
}

Tensor concat(const std::vector<Tensor>& parts, int64_t dim) {
  PSA_CHECK(!parts.empty(), "concat: no tensors");
  const Tensor& first = parts[0];
  int64_t d = normalize_dim("concat", dim, first.dim());
  Shape out_shape = first.shape();
  out_shape[d] = 0;
  for (const Tensor& t : parts) {
    check_same_device("concat", first, t);
    check_same_dtype("concat", first, t);
    Shape s = t.shape();
    PSA_CHECK(t.dim() == first.dim(), "concat: ", shape_str(first.shape()), " and ", shape_str(s));
    s[d] = 0;
    Shape f = first.shape();
    f[d] = 0;
    PSA_CHECK(s == f, "concat: shapes ", shape_str(first.shape()), " and ", shape_str(t.shape()),
              " differ outside dim ", d);
    out_shape[d] += t.size(d);
  }
  Tensor out = Tensor::empty(out_shape, first.dtype(), first.device());
  DimSplit sp = split_at(out_shape, d);
  std::vector<int64_t> sizes;
  int64_t at = 0;
  for (const Tensor& t : parts) {
    PSA_KERNEL(out.device(), copy_block)(t, sp.outer, t.size(d), sp.inner, out, sp.n, at);
    at += t.size(d);
    sizes.push_back(t.size(d));
  }
  return record("concat", out, parts, [=](const Tensor& g) -> Grads { return split(g, sizes, d); });
}

Tensor slice(const Tensor& a, int64_t dim, int64_t start, int64_t end) {
  check_defined("slice", a, "input");
  int64_t d = normalize_dim("slice", dim, a.dim());
  PSA_CHECK(0 <= start && start <= end && end <= a.size(d), "slice: [", start, ", ", end, ") of dim ", d,
            " in ", shape_str(a.shape()));
  Shape out_shape = a.shape();
  out_shape[d] = end - start;
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  DimSplit sp = split_at(a.shape(), d);
  PSA_KERNEL(out.device(), extract_block)(a, sp.outer, sp.n, sp.inner, start, end - start, out);
  Shape sa = a.shape();
  return record("slice", out, {a}, [=](const Tensor& g) -> Grads {
    Tensor ga = Tensor::zeros(sa, g.dtype(), g.device());
    PSA_KERNEL(ga.device(), copy_block)(g, sp.outer, end - start, sp.inner, ga, sp.n, start);
    return {ga};
  });
}

std::vector<Tensor> split(const Tensor& a, const std::vector<int64_t>& sizes, int64_t dim) {
  int64_t d = normalize_dim("split", dim, a.dim()), total = 0;
  for (int64_t s : sizes) total += s;
  PSA_CHECK(total == a.size(d), "split: sizes sum to ", total, " but dim ", d, " of ", shape_str(a.shape()),
            " is ", a.size(d));
  std::vector<Tensor> out;
  int64_t at = 0;
  for (int64_t s : sizes) {
    out.push_back(slice(a, d, at, at + s));
    at += s;
  }
  return out;
}

Tensor expand(const Tensor& a, const Shape& shape) {
  check_defined("expand", a, "input");
  Shape s = broadcast_shape("expand", a.shape(), shape);
  PSA_CHECK(s == shape, "expand: ", shape_str(a.shape()), " cannot expand to ", shape_str(shape));
  if (a.shape() == shape) return a;
  Tensor out = Tensor::empty(shape, a.dtype(), a.device());
  PSA_KERNEL(out.device(), broadcast_to)(a, out);
  Shape sa = a.shape();
  return record("expand", out, {a}, [=](const Tensor& g) -> Grads { return {sum_to(g, sa)}; });
}

Tensor index_select(const Tensor& a, int64_t dim, const Tensor& index) {
  check_defined("index_select", a, "input");
  PSA_CHECK(index.dtype() == DType::i64 || index.dtype() == DType::i32, "index_select: index must be i32/i64, got ",
            dtype_name(index.dtype()));
  check_rank("index_select", index, 1, "index");
  check_same_device("index_select", a, index);
  int64_t d = normalize_dim("index_select", dim, a.dim());
  Shape out_shape = a.shape();
  out_shape[d] = index.numel();
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  DimSplit sp = split_at(a.shape(), d);
  PSA_KERNEL(out.device(), index_select)(a, sp.outer, sp.n, sp.inner, index, out);
  Shape sa = a.shape();
  return record("index_select", out, {a}, [=](const Tensor& g) -> Grads {
    Tensor ga = Tensor::empty(sa, g.dtype(), g.device());
    PSA_KERNEL(ga.device(), index_add)(g, sp.outer, sp.n, sp.inner, index, ga);
    return {ga};
  }, {index});
}

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  check_rank("embedding", weight, 2, "weight");
  Shape out_shape = ids.shape();
  out_shape.push_back(weight.size(1));
  return reshape(index_select(weight, 0, reshape(ids, {ids.numel()})), out_shape);
}

}  // namespace psa
