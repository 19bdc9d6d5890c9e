// Checks shared by the ops: every message names the op and the offending shapes, dtypes or devices.
#pragma once
#include <string>

#include "autograd/ops.h"

namespace psa {

void check_defined(const char* op, const Tensor& t, const char* what);
void check_same_device(const char* op, const Tensor& a, const Tensor& b);
void check_same_dtype(const char* op, const Tensor& a, const Tensor& b);
void check_float(const char* op, const Tensor& t);
void check_rank(const char* op, const Tensor& t, int64_t rank, const char* what);
Shape broadcast_shape(const char* op, const Shape& a, const Shape& b);
int64_t normalize_dim(const char* op, int64_t dim, int64_t rank);
// Kernels that are not written for a device fail with the op's name rather than computing garbage.
[[noreturn]] void no_kernel(const char* op, Device d);

// Sizes of the dims before, at and after `dim`: the [outer, n, inner] view most kernels use.
struct DimSplit {
  int64_t outer, n, inner;
};
DimSplit split_at(const Shape& s, int64_t dim);

}  // namespace psa
