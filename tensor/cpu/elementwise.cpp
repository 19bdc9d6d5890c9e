// Elementwise kernels, forward and backward side by side. Broadcasting is resolved into per-operand strides
// (0 along broadcast dims) and walked with the last dim innermost, so the common cases (same shape, a bias
// along the last dim, a scalar) are flat vectorisable loops.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "tensor/cpu/kernels.h"
#include "tensor/cpu/vec_math.h"

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

// ---- the activations whose cost is an exp, written once over V = double, float or (AVX2) 8 float lanes, so
// the f64 reference path, the f32 scalar tails and the f32 vector bodies share one formula (exp_of: the
// vectorised exp for f32, std::exp for f64, vec_math.h).
template <typename V>
using scalar_of = std::conditional_t<std::is_same_v<V, double>, double, float>;  // float for float and lanes

template <typename V>
V sigmoid_of(V x) {
  using S = scalar_of<V>;
  return S(1) / (S(1) + exp_of(-x));
}
template <typename V>
V silu_of(V x) { return x * sigmoid_of(x); }
template <typename V>
V quick_gelu_of(V x) {
  using S = scalar_of<V>;
  return x * sigmoid_of(S(1.702) * x);
}
// d/dx x·σ(a·x) = σ + a·x·σ·(1 - σ) with σ = σ(a·x): silu is a = 1, quick_gelu a = 1.702. The first form
// takes σ when the caller has it already.
template <typename V>
V x_sigmoid_grad(V x, V s, scalar_of<V> a) {
  using S = scalar_of<V>;
  return s + a * x * s * (S(1) - s);
}
template <typename V>
V x_sigmoid_grad(V x, scalar_of<V> a) {
  return x_sigmoid_grad(x, sigmoid_of(a * x), a);
}

template <typename T>
T unary_value(UnaryOp op, T x, T p) {
  switch (op) {
    case UnaryOp::neg: return -x;
    case UnaryOp::exp: return exp_of(x);
    case UnaryOp::log: return std::log(x);
    case UnaryOp::sqrt: return std::sqrt(x);
    case UnaryOp::rsqrt: return T(1) / std::sqrt(x);
    case UnaryOp::tanh: return std::tanh(x);
    case UnaryOp::sigmoid: return sigmoid_of(x);
    case UnaryOp::relu: return x > 0 ? x : T(0);
    case UnaryOp::gelu: return x * gelu_cdf(x);
    case UnaryOp::quick_gelu: return quick_gelu_of(x);
    case UnaryOp::silu: return silu_of(x);
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
    case UnaryOp::gelu: return gelu_cdf(x) + x * T(0.39894228040143267794) * exp_of(T(-0.5) * x * x);
    case UnaryOp::quick_gelu: return x_sigmoid_grad(x, T(1.702));
    case UnaryOp::silu: return x_sigmoid_grad(x, T(1));
    case UnaryOp::pow: return p * std::pow(x, p - T(1));
    case UnaryOp::add_scalar: return T(1);
    case UnaryOp::mul_scalar: return p;
  }
  return T(0);
}

// Runs body(begin, end) over [0, n) in blocks spread over the threads when n is large. Blocks are multiples of
// 8, so which elements take the vector body does not depend on the thread count.
template <typename F>
void for_blocks(int64_t n, F body) {
  constexpr int64_t kBlock = 1 << 12;
  int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for if (n > kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) body(b * kBlock, std::min(n, (b + 1) * kBlock));
}

// The activations that cost an exp, as lane loops (vec_math.h); false for the other ops (the scalar table).
template <typename T>
bool unary_lanes(UnaryOp op, const T* x, T* y, int64_t n) {
  auto run = [&](auto f) { for_blocks(n, [&](int64_t i, int64_t e) { map_lanes(x + i, y + i, e - i, f); }); };
  switch (op) {
    case UnaryOp::exp: run([](auto v) { return exp_of(v); }); return true;
    case UnaryOp::sigmoid: run([](auto v) { return sigmoid_of(v); }); return true;
    case UnaryOp::silu: run([](auto v) { return silu_of(v); }); return true;
    case UnaryOp::quick_gelu: run([](auto v) { return quick_gelu_of(v); }); return true;
    default: return false;
  }
}

// gx = g·op'(x) for the activations that cost an exp; false for the other ops.
template <typename T>
bool unary_backward_lanes(UnaryOp op, const T* x, const T* g, T* gx, int64_t n) {
  auto run = [&](auto f) { for_blocks(n, [&](int64_t i, int64_t e) { map_lanes(x + i, g + i, gx + i, e - i, f); }); };
  switch (op) {
    case UnaryOp::silu: run([](auto v, auto gv) { return gv * x_sigmoid_grad(v, scalar_of<T>(1)); }); return true;
    case UnaryOp::quick_gelu: run([](auto v, auto gv) { return gv * x_sigmoid_grad(v, scalar_of<T>(1.702)); }); return true;
    default: return false;
  }
}

// swiglu's backward at one position (V = a scalar or 8 float lanes): g_gate = g·u·silu'(x), g_up = g·silu(x),
// from one sigmoid.
template <typename V>
void swiglu_grads(V x, V u, V g, V& g_gate, V& g_up) {
  V s = sigmoid_of(x);
  g_up = g * (x * s);
  g_gate = g * u * x_sigmoid_grad(x, s, scalar_of<V>(1));
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
    if (unary_lanes(op, px, po, n)) return;
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
    if (unary_backward_lanes(op, px, pg, po, n)) return;
#pragma omp parallel for if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) po[i] = pg[i] * unary_derivative(op, px[i], py[i], p);
  });
}

// ---- swiglu = silu(gate)·up, fused: the forward reads two arrays and writes one, the backward reads three and
// writes two, where silu followed by mul (and their backwards: two muls and silu's) passes over 5 + 9 arrays.
// Nothing is saved beyond the inputs: the backward recomputes the sigmoid.
void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) {
  dispatch_float(out.dtype(), "swiglu", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T *pg = gate.data<T>(), *pu = up.data<T>();
    T* po = out.data<T>();
    for_blocks(out.numel(), [&](int64_t i, int64_t e) {
      map_lanes(pg + i, pu + i, po + i, e - i, [](auto x, auto u) { return silu_of(x) * u; });
    });
  });
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& gout, Tensor& g_gate, Tensor& g_up) {
  dispatch_float(gout.dtype(), "swiglu_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T *px = gate.data<T>(), *pu = up.data<T>(), *pg = gout.data<T>();
    T* dgate = g_gate.defined() ? g_gate.data<T>() : nullptr;
    T* dup = g_up.defined() ? g_up.data<T>() : nullptr;
    for_blocks(gout.numel(), [&](int64_t i, int64_t e) {
      T gg, gu;
#ifdef PSA_VEC_EXP
      if constexpr (std::is_same_v<T, float>)
        for (; i + 8 <= e; i += 8) {
          __m256 vg, vu;
          swiglu_grads(_mm256_loadu_ps(px + i), _mm256_loadu_ps(pu + i), _mm256_loadu_ps(pg + i), vg, vu);
          if (dgate) _mm256_storeu_ps(dgate + i, vg);
          if (dup) _mm256_storeu_ps(dup + i, vu);
        }
#endif
      for (; i < e; ++i) {
        swiglu_grads(px[i], pu[i], pg[i], gg, gu);
        if (dgate) dgate[i] = gg;
        if (dup) dup[i] = gu;
      }
    });
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
