// Elementwise kernels, forward and backward side by side. Broadcasting is resolved into per-operand strides
// (0 along broadcast dims) and walked with the last dim innermost, so the common cases (same shape, a bias
// along the last dim, a scalar) are flat vectorisable loops.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "tensor/cpu/kernel_util.h"
#include "tensor/cpu/kernels.h"
#include "tensor/cpu/vec_math.h"

namespace psa::cpu {
namespace {

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
    parallel_for(n, use_threads(n), [&](int64_t i) { o[i] = f(a[i], b[i]); });
    return;
  }
  if (so.empty()) { o[0] = f(a[0], b[0]); return; }
  auto st_a = broadcast_strides(sa, so), st_b = broadcast_strides(sb, so);
  int64_t rank = so.size(), inner = so.back(), outer = n / std::max<int64_t>(inner, 1);
  int64_t ia = st_a.back(), ib = st_b.back();
  parallel_for(outer, use_threads(n), [&](int64_t r) {
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
  });
}

// ---- the activations whose cost is an exp, written once over V = double, float or VecF lanes, so the f64
// reference path, the f32 scalar uses and the f32 lanes share one formula (exp_of: the
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

// Exact gelu x·Φ(x) and its derivative Φ + x·φ over V = double (the erf formula), float or 8 float lanes
// (the f32 Gaussian CDF of vec_math.h).
template <typename V>
V gelu_of(V x) {
  V cdf, pdf;
  gauss_of(x, cdf, pdf);
  return x * cdf;
}
template <typename V>
V gelu_grad(V x) {
  V cdf, pdf;
  gauss_of(x, cdf, pdf);
  return cdf + x * pdf;
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
    case UnaryOp::gelu: return gelu_of(x);
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
    case UnaryOp::gelu: return gelu_grad(x);
    case UnaryOp::quick_gelu: return x_sigmoid_grad(x, T(1.702));
    case UnaryOp::silu: return x_sigmoid_grad(x, T(1));
    case UnaryOp::pow: return p * std::pow(x, p - T(1));
    case UnaryOp::add_scalar: return T(1);
    case UnaryOp::mul_scalar: return p;
  }
  return T(0);
}

// The lane forms of the activations that cost an exp, generic over V (double, float or 8 float lanes): value(x)
// and grad(x, g) = g·f'(x). with_activation_lanes(act, body) calls body with them, or returns false for the
// activations that take the scalar table.
struct SiluLanes {
  template <typename V>
  static V value(V x) { return silu_of(x); }
  template <typename V>
  static V grad(V x, V g) { return g * x_sigmoid_grad(x, scalar_of<V>(1)); }
};
struct GeluLanes {
  template <typename V>
  static V value(V x) { return gelu_of(x); }
  template <typename V>
  static V grad(V x, V g) { return g * gelu_grad(x); }
};
struct QuickGeluLanes {
  template <typename V>
  static V value(V x) { return quick_gelu_of(x); }
  template <typename V>
  static V grad(V x, V g) { return g * x_sigmoid_grad(x, scalar_of<V>(1.702)); }
};

template <typename Body>
bool with_activation_lanes(UnaryOp act, Body body) {
  switch (act) {
    case UnaryOp::silu: body(SiluLanes{}); return true;
    case UnaryOp::gelu: body(GeluLanes{}); return true;
    case UnaryOp::quick_gelu: body(QuickGeluLanes{}); return true;
    default: return false;
  }
}

// y = op(x) over one range: lane loops for the ops that cost an exp, the scalar table otherwise.
template <typename T>
void unary_range(UnaryOp op, const T* x, T p, T* y, int64_t n) {
  auto activation = [&](auto L) { map_lanes(x, y, n, [](auto v) { return decltype(L)::value(v); }); };
  if (op == UnaryOp::exp) map_lanes(x, y, n, [](auto v) { return exp_of(v); });
  else if (op == UnaryOp::sigmoid) map_lanes(x, y, n, [](auto v) { return sigmoid_of(v); });
  else if (!with_activation_lanes(op, activation))
    for (int64_t i = 0; i < n; ++i) y[i] = unary_value(op, x[i], p);
}

// gx = g·op'(x) over one range, the same way.
template <typename T>
void unary_backward_range(UnaryOp op, const T* x, const T* y, const T* g, T p, T* gx, int64_t n) {
  auto activation = [&](auto L) { map_lanes(x, g, gx, n, [](auto v, auto gv) { return decltype(L)::grad(v, gv); }); };
  if (!with_activation_lanes(op, activation))
    for (int64_t i = 0; i < n; ++i) gx[i] = g[i] * unary_derivative(op, x[i], y[i], p);
}

// One row of bias_act, out = act(x + bias), and of its backward, gx = g·act'(x + bias): z = x + bias stays in
// registers. act(z) is recomputed only for the activations whose derivative is written in terms of it.
template <typename T>
void bias_act_row(UnaryOp act, const T* x, const T* bias, T* out, int64_t n) {
  auto lanes = [&](auto L) { map_lanes(x, bias, out, n, [](auto v, auto b) { return decltype(L)::value(v + b); }); };
  if (!with_activation_lanes(act, lanes))
    for (int64_t j = 0; j < n; ++j) out[j] = unary_value(act, x[j] + bias[j], T(0));
}

template <typename T>
void bias_act_grad_row(UnaryOp act, const T* x, const T* bias, const T* g, T* gx, int64_t n) {
  auto lanes = [&](auto L) {
    map_lanes(x, bias, g, gx, n, [](auto v, auto b, auto gv) { return decltype(L)::grad(v + b, gv); });
  };
  if (with_activation_lanes(act, lanes)) return;
  bool need_y = derivative_reads_output(act);
  for (int64_t j = 0; j < n; ++j) {
    T z = x[j] + bias[j];
    gx[j] = g[j] * unary_derivative(act, z, need_y ? unary_value(act, z, T(0)) : z, T(0));
  }
}

// swiglu's backward at one position (V = a scalar or VecF lanes): g_gate = g·u·silu'(x), g_up = g·silu(x),
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
    using T = typename decltype(tag_)::type;
    const T* px = x.data<T>();
    T* po = out.data<T>();
    for_blocks(x.numel(), [&](int64_t i, int64_t e) { unary_range(op, px + i, (T)param, po + i, e - i); });
  });
}

void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& gout, double param, Tensor& gx) {
  dispatch_float(gx.dtype(), "unary_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T *px = x.data<T>(), *py = y.data<T>(), *pg = gout.data<T>();
    T* po = gx.data<T>();
    for_blocks(x.numel(), [&](int64_t i, int64_t e) {
      unary_backward_range(op, px + i, py + i, pg + i, (T)param, po + i, e - i);
    });
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
#ifdef PSA_VEC_EXP
      if constexpr (std::is_same_v<T, float>) {
        lane_loop(e - i, [&](int64_t j, auto m) {
          VecF vg, vu;
          swiglu_grads(load_lanes(px + i + j, m), load_lanes(pu + i + j, m), load_lanes(pg + i + j, m), vg, vu);
          if (dgate) store_lanes(dgate + i + j, vg, m);
          if (dup) store_lanes(dup + i + j, vu, m);
        });
        return;
      }
#endif
      for (; i < e; ++i) {
        T gg, gu;
        swiglu_grads(px[i], pu[i], pg[i], gg, gu);
        if (dgate) dgate[i] = gg;
        if (dup) dup[i] = gu;
      }
    });
  });
}

// ---- bias_act = act(x + bias), fused, row by row (bias_act_row above). Passes over [rows, N] arrays: forward 2
// (read x, write out) where add then the activation make 4; backward 3 (read x and gout, write gx, whose rows
// are added into their chunk's bias sums while in L1) where the activation's backward then sum_to make 4.
void bias_act(UnaryOp act, const Tensor& x, const Tensor& bias, Tensor& out) {
  int64_t N = bias.numel(), rows = N ? x.numel() / N : 0;
  dispatch_float(out.dtype(), "bias_act", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T *px = x.data<T>(), *pb = bias.data<T>();
    T* po = out.data<T>();
    parallel_for(rows, use_threads(rows * N), [&](int64_t r) { bias_act_row(act, px + r * N, pb, po + r * N, N); });
  });
}

void bias_act_backward(UnaryOp act, const Tensor& x, const Tensor& bias, const Tensor& gout, Tensor& gx,
                       Tensor& gbias) {
  int64_t N = bias.numel(), rows = N ? x.numel() / N : 0;
  dispatch_float(gx.dtype(), "bias_act_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    const T *px = x.data<T>(), *pb = bias.data<T>(), *pg = gout.data<T>();
    T* pgx = gx.data<T>();
    bool need_bias = gbias.defined();
    auto chunk = [&](int64_t r0, int64_t r1, double* bias_sums) {
      for (int64_t r = r0; r < r1; ++r) {
        T* gx_row = pgx + r * N;
        bias_act_grad_row(act, px + r * N, pb, pg + r * N, gx_row, N);
        if (need_bias)
          for (int64_t j = 0; j < N; ++j) bias_sums[j] += gx_row[j];
      }
    };
    std::vector<double> sums =
        row_chunks_with_sums(rows, kBiasSumChunk, need_bias ? N : 0, use_threads(rows * N), chunk);
    if (need_bias) std::copy(sums.begin(), sums.end(), gbias.data<T>());
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
