// CPU kernels. Each takes contiguous tensors already checked by the op in autograd/ and writes `out`, which the
// caller allocated. Templated over the scalar type inside; f32 for training, f64 for gradient checks.
#pragma once
#include "tensor/tensor.h"

namespace psa::cpu {

enum class BinaryOp { add, sub, mul, div };
enum class UnaryOp { neg, exp, log, sqrt, rsqrt, tanh, sigmoid, relu, gelu, quick_gelu, silu, pow, add_scalar, mul_scalar };

// elementwise.cpp
void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out);  // out has the broadcast shape
void unary(UnaryOp op, const Tensor& x, double param, Tensor& out);
// gx = gout * d op(x) / dx; y = op(x) is passed because some derivatives are cheaper from it
void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& gout, double param, Tensor& gx);

// reduce.cpp: a viewed as [outer, n, inner], reduced over n
void sum_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out);
void max_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out, Tensor& argmax);  // argmax i64
void max_backward(const Tensor& gout, const Tensor& argmax, int64_t outer, int64_t n, int64_t inner, Tensor& ga);
// out[i] = a[i mapped through broadcasting], out has shape `shape`
void broadcast_to(const Tensor& a, Tensor& out);

// shape.cpp
void permute(const Tensor& a, const std::vector<int64_t>& perm, Tensor& out);
// copy a [outer, n_a, inner] into out [outer, n_out, inner] at offset `at` along the middle dim (and back)
void copy_block(const Tensor& a, int64_t outer, int64_t n_a, int64_t inner, Tensor& out, int64_t n_out, int64_t at);
void extract_block(const Tensor& a, int64_t outer, int64_t n_a, int64_t inner, int64_t at, int64_t n_out, Tensor& out);
void index_select(const Tensor& a, int64_t outer, int64_t n, int64_t inner, const Tensor& index, Tensor& out);
void index_add(const Tensor& g, int64_t outer, int64_t n, int64_t inner, const Tensor& index, Tensor& ga);

// matmul.cpp: batched with broadcasting resolved by the caller into per-batch strides
void matmul(const Tensor& a, const Tensor& b, bool ta, bool tb, int64_t batch, int64_t M, int64_t N, int64_t K,
            int64_t stride_a, int64_t stride_b, Tensor& out, float beta = 0);

}  // namespace psa::cpu
