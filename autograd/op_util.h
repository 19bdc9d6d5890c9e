// Checks shared by the ops: every message names the op and the offending shapes, dtypes or devices.
#pragma once
#include <string>

#include "autograd/ops.h"

namespace psa {

void check_defined(const char* op, const Tensor& t, const char* what);
void check_same_device(const char* op, const Tensor& a, const Tensor& b);
void check_same_dtype(const char* op, const Tensor& a, const Tensor& b);
void check_float(const char* op, const Tensor& t);
// Two float operands of one op: both defined, on one device, of one dtype.
void check_float_operands(const char* op, const Tensor& a, const char* a_name, const Tensor& b, const char* b_name);
void check_rank(const char* op, const Tensor& t, int64_t rank, const char* what);
Shape broadcast_shape(const char* op, const Shape& a, const Shape& b);
int64_t normalize_dim(const char* op, int64_t dim, int64_t rank);
// Kernels that are not written for a device fail with the op's name rather than computing garbage.
[[noreturn]] void no_kernel(const char* op, Device d);

// Backward rules compute a gradient only for the inputs that need one: needs_grad(input) says whether,
// grad_buffer gives an uninitialised tensor of `shape` (dtype and device of `like`) or an undefined one.
bool needs_grad(const Tensor& t);
Tensor grad_buffer(bool needed, const Shape& shape, const Tensor& like);

// Sizes of the dims before, at and after `dim`: the [outer, n, inner] view most kernels use.
struct DimSplit {
  int64_t outer, n, inner;
};
DimSplit split_at(const Shape& s, int64_t dim);

}  // namespace psa
