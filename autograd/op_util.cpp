#include "autograd/op_util.h"

namespace psa {

void check_defined(const char* op, const Tensor& t, const char* what) {
  PSA_CHECK(t.defined(), op, ": ", what, " is undefined");
}

void check_same_device(const char* op, const Tensor& a, const Tensor& b) {
  PSA_CHECK(a.device() == b.device(), op, ": inputs on different devices: ", device_name(a.device()), " ",
            shape_str(a.shape()), " and ", device_name(b.device()), " ", shape_str(b.shape()));
}

void check_same_dtype(const char* op, const Tensor& a, const Tensor& b) {
  PSA_CHECK(a.dtype() == b.dtype(), op, ": dtype mismatch: ", dtype_name(a.dtype()), " ", shape_str(a.shape()),
            " and ", dtype_name(b.dtype()), " ", shape_str(b.shape()));
}

void check_float(const char* op, const Tensor& t) {
  PSA_CHECK(is_float(t.dtype()), op, ": expects a floating tensor, got ", dtype_name(t.dtype()), " ",
            shape_str(t.shape()));
}

void check_float_operands(const char* op, const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  check_defined(op, a, a_name);
  check_defined(op, b, b_name);
  check_same_device(op, a, b);
  check_same_dtype(op, a, b);
  check_float(op, a);
}

void check_rank(const char* op, const Tensor& t, int64_t rank, const char* what) {
  PSA_CHECK(t.dim() == rank, op, ": ", what, " must have ", rank, " dims, got ", shape_str(t.shape()));
}

Shape broadcast_shape(const char* op, const Shape& a, const Shape& b) {
  size_t rank = std::max(a.size(), b.size());
  Shape out(rank);
  for (size_t i = 0; i < rank; ++i) {
    int64_t da = i < rank - a.size() ? 1 : a[i - (rank - a.size())];
    int64_t db = i < rank - b.size() ? 1 : b[i - (rank - b.size())];
    PSA_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", shape_str(a), " and ", shape_str(b),
              " cannot broadcast");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

int64_t normalize_dim(const char* op, int64_t dim, int64_t rank) {
  int64_t d = dim < 0 ? dim + rank : dim;
  PSA_CHECK(d >= 0 && d < rank, op, ": dim ", dim, " out of range for rank ", rank);
  return d;
}

void no_kernel(const char* op, Device d) { fail(op, ": no kernel for device ", device_name(d)); }

bool needs_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }

Tensor grad_buffer(bool needed, const Shape& shape, const Tensor& like) {
  return needed ? Tensor::empty(shape, like.dtype(), like.device()) : Tensor();
}

DimSplit split_at(const Shape& s, int64_t dim) {
  DimSplit r{1, s[dim], 1};
  for (int64_t i = 0; i < dim; ++i) r.outer *= s[i];
  for (size_t i = dim + 1; i < s.size(); ++i) r.inner *= s[i];
  return r;
}

}  // namespace psa
