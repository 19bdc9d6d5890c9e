// Elementwise kernels, forward and backward side by side. Broadcasting is resolved into per-operand strides
// (0 along broadcast dims) and walked with the last dim innermost, so the common cases (same shape, a bias
// along the last dim, a scalar) are flat vectorisable loops.
#include <cmath>

#include "tensor/cpu/kernels.h"

namespace psa::cpu {
namespace {

constexpr int64_t kParallelMin = 1 << 15;  // below this, threading costs more than it saves

// Strides (in elements) of `shape` aligned to the right of an `rank`-dim output, 0 where broadcast.
std::vector<int64_t> broadcast_strides(const Shape& shape, const Shape& out) {
  size_t rank = out.size();
  std::vector<int64_t> st(rank, 0);
  int64_t s = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    size_t d = shape.size() - 1 - i, od = rank - 1 - i;
    st[od] = shape[d] == 1 ? 0 : s;
    s *= shape[d];
  }
  return st;
}

template <typename T, typename F>
void binary_loop(const T* a, const T* b, T* o, const Shape& sa, const Shape& sb, const Shape& so, F f) {
  int64_t n = shape_numel(so);
  if (sa == so && sb == so) {
#pragma omp parallel for if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) o[i] = f(a[i], b[i]);
    return;
  }
  if (so.empty()) { o[0] = f(a[0], b[0]); return; }
  auto st_a = broadcast_strides(sa, so), st_b = broadcast_strides(sb, so);
  int64_t rank = so.size(), inner = so.back(), outer = n / std::max<int64_t>(inner, 1);
  int64_t ia = st_a.back(), ib = st_b.back();
#pragma omp parallel for if (n > kParallelMin)
  for (int64_t r = 0; r < outer; ++r) {
    int64_t rem = r, off_a = 0, off_b = 0;
    for (int64_t d = rank - 2; d >= 0; --d) {
      int64_t idx = rem % so[d];
      rem /= so[d];
      off_a += idx * st_a[d];
      off_b += idx * st_b[d];
    }
    const T* pa = a + off_a;
    const T* pb = b + off_b;
    T* po = o + r * inner;
    for (int64_t i = 0; i < inner; ++i) po[i] = f(pa[i * ia], pb[i * ib]);
  }
}

template <typename T>
T gelu_cdf(T x) { return T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440))); }

template <typename T>
T sigmoid_of(T x) { return T(1) / (T(1) + std::exp(-x)); }

template <typename T>
T unary_value(UnaryOp op, T x, T p) {
  switch (op) {
    case UnaryOp::neg: return -x;
    case UnaryOp::exp: return std::exp(x);
    case UnaryOp::log: return std::log(x);
    case UnaryOp::sqrt: return std::sqrt(x);
    case UnaryOp::rsqrt: return T(1) / std::sqrt(x);
    case UnaryOp::tanh: return std::tanh(x);
    case UnaryOp::sigmoid: return sigmoid_of(x);
    case UnaryOp::relu: return x > 0 ? x : T(0);
    case UnaryOp::gelu: return x * gelu_cdf(x);
    case UnaryOp::quick_gelu: return x * sigmoid_of(T(1.702) * x);
    case UnaryOp::silu: return x * sigmoid_of(x);
    case UnaryOp::pow: return std::pow(x, p);
    case UnaryOp::add_scalar: return x + p;
    case UnaryOp::mul_scalar: return x * p;
  }
  return x;
}

// d op(x)/dx, using y = op(x) where that is cheaper.
template <typename T>
T unary_derivative(UnaryOp op, T x, T y, T p) {
  switch (op) {
    case UnaryOp::neg: return T(-1);
    case UnaryOp::exp: return y;
    case UnaryOp::log: return T(1) / x;
    case UnaryOp::sqrt: return T(0.5) / y;
    case UnaryOp::rsqrt: return T(-0.5) * y * y * y;
    case UnaryOp::tanh: return T(1) - y * y;
    case UnaryOp::sigmoid: return y * (T(1) - y);
    case UnaryOp::relu: return x > 0 ? T(1) : T(0);
    case UnaryOp::gelu: return gelu_cdf(x) + x * T(0.39894228040143267794) * std::exp(T(-0.5) * x * x);
    case UnaryOp::quick_gelu: { T s = sigmoid_of(T(1.702) * x); return s + T(1.702) * x * s * (T(1) - s); }
    case UnaryOp::silu: { T s = sigmoid_of(x); return s + x * s * (T(1) - s); }
    case UnaryOp::pow: return p * std::pow(x, p - T(1));
    case UnaryOp::add_scalar: return T(1);
    case UnaryOp::mul_scalar: return p;
  }
  return T(0);
}

}  // namespace

void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  dispatch_float(out.dtype(), "binary", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using T = scalar_t;
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    T* po = out.data<T>();
    switch (op) {
      case BinaryOp::add: binary_loop(pa, pb, po, a.shape(), b.shape(), out.shape(), [](T x, T y) { return x + y; }); break;
      case BinaryOp::sub: binary_loop(pa, pb, po, a.shape(), b.shape(), out.shape(), [](T x, T y) { return x - y; }); break;
      case BinaryOp::mul: binary_loop(pa, pb, po, a.shape(), b.shape(), out.shape(), [](T x, T y) { return x * y; }); break;
      case BinaryOp::div: binary_loop(pa, pb, po, a.shape(), b.shape(), out.shape(), [](T x, T y) { return x / y; }); break;
    }
  });
}

void unary(UnaryOp op, const Tensor& x, double param, Tensor& out) {
  dispatch_float(out.dtype(), "unary", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using T = scalar_t;
    const T* px = x.data<T>();
    T* po = out.data<T>();
    T p = (T)param;
    int64_t n = x.numel();
#pragma omp parallel for if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) po[i] = unary_value(op, px[i], p);
  });
}

void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& gout, double param, Tensor& gx) {
  dispatch_float(gx.dtype(), "unary_backward", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using T = scalar_t;
    const T* px = x.data<T>();
    const T* py = y.data<T>();
    const T* pg = gout.data<T>();
    T* po = gx.data<T>();
    T p = (T)param;
    int64_t n = x.numel();
#pragma omp parallel for if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) po[i] = pg[i] * unary_derivative(op, px[i], py[i], p);
  });
}

void broadcast_to(const Tensor& a, Tensor& out) {
  dispatch_all(out.dtype(), "broadcast_to", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using T = scalar_t;
    const T* pa = a.data<T>();
    binary_loop(pa, pa, out.data<T>(), a.shape(), a.shape(), out.shape(), [](T x, T) { return x; });
  });
}

}  // namespace psa::cpu
