// Elementwise kernels with broadcasting, forward and backward side by side (mirrors tensor/cpu/elementwise.cpp).
// Parallelisation: one thread per output element (grid-stride). Same-shape operands take a flat path; otherwise
// each thread turns its output index into per-operand offsets with strides that are 0 along broadcast dims.
#include <algorithm>

#include "tensor/cuda/common.cuh"

namespace psa::cuda {
namespace {

// Strides (in elements) of `shape` aligned to the right of the output, 0 where broadcast (as on the CPU).
Dims broadcast_dims(const Shape& shape, const Shape& out) {
  PSA_CHECK((int)out.size() <= kMaxDims, "cuda broadcast: rank ", out.size(), " > ", kMaxDims);
  Dims d{};
  d.rank = (int)out.size();
  int64_t s = 1;
  for (int i = 0; i < d.rank; ++i) d.size[i] = out[i], d.stride[i] = 0;
  for (size_t i = 0; i < shape.size(); ++i) {
    size_t sd = shape.size() - 1 - i, od = out.size() - 1 - i;
    d.stride[od] = shape[sd] == 1 ? 0 : s;
    s *= shape[sd];
  }
  return d;
}

// Two operands broadcast to one output, with the output's dims merged wherever both operands run on contiguously
// across them (outer stride = inner stride x inner size, 0 = 0 included) and size-1 dims dropped: a bias over
// the rows of [B, T, C] becomes [B·T, C]. An output index then costs one division per merged dim, shared by both
// operands, instead of two per dim and operand (~20 instructions each, which made broadcasting compute-bound).
struct Broadcast2 {
  int rank;
  int64_t size[kMaxDims], stride_a[kMaxDims], stride_b[kMaxDims];
};

Broadcast2 broadcast_pair(const Shape& a, const Shape& b, const Shape& out) {
  const Dims da = broadcast_dims(a, out), db = broadcast_dims(b, out);
  Broadcast2 p{};
  for (int k = 0; k < da.rank; ++k) {
    if (out[k] == 1) continue;
    const int last = p.rank - 1;
    if (p.rank > 0 && p.stride_a[last] == da.stride[k] * out[k] && p.stride_b[last] == db.stride[k] * out[k]) {
      p.size[last] *= out[k], p.stride_a[last] = da.stride[k], p.stride_b[last] = db.stride[k];
    } else {
      p.size[p.rank] = out[k], p.stride_a[p.rank] = da.stride[k], p.stride_b[p.rank] = db.stride[k];
      ++p.rank;
    }
  }
  return p;
}

// Offsets in a and b of output element i (the outermost dim needs no division: i is below its size there).
__device__ __forceinline__ void offsets_of(int64_t i, const Broadcast2& p, int64_t& oa, int64_t& ob) {
  oa = 0, ob = 0;
  for (int k = p.rank - 1; k > 0; --k) {
    const int64_t q = i / p.size[k], r = i - q * p.size[k];
    oa += r * p.stride_a[k], ob += r * p.stride_b[k];
    i = q;
  }
  oa += i * p.stride_a[0], ob += i * p.stride_b[0];  // rank 0: one element, strides 0
}

template <typename T>
__device__ __forceinline__ T apply(BinaryOp op, T x, T y) {
  switch (op) {
    case BinaryOp::add: return x + y;
    case BinaryOp::sub: return x - y;
    case BinaryOp::mul: return x * y;
    case BinaryOp::div: return x / y;
  }
  return x;
}

template <typename T>
__global__ void binary_flat(BinaryOp op, const T* a, const T* b, T* o, int64_t n) {
  CUDA_LOOP(i, n) o[i] = apply(op, a[i], b[i]);
}

template <typename T>
__global__ void binary_broadcast(BinaryOp op, const T* a, const T* b, Broadcast2 p, T* o, int64_t n) {
  CUDA_LOOP(i, n) {
    int64_t oa, ob;
    offsets_of(i, p, oa, ob);
    o[i] = apply(op, a[oa], b[ob]);
  }
}

template <typename T>
__global__ void gather_broadcast(const T* a, Broadcast2 p, T* o, int64_t n) {  // p's b is a again
  CUDA_LOOP(i, n) {
    int64_t oa, ob;
    offsets_of(i, p, oa, ob);
    o[i] = a[oa];
  }
}

template <typename T>
__device__ __forceinline__ T sigmoid_of(T x) { return T(1) / (T(1) + d_exp(-x)); }
template <typename T>
__device__ __forceinline__ T gelu_cdf(T x) { return T(0.5) * (T(1) + d_erf(x * T(0.70710678118654752440))); }

template <typename T>
__device__ __forceinline__ T unary_value(UnaryOp op, T x, T p) {
  switch (op) {
    case UnaryOp::neg: return -x;
    case UnaryOp::exp: return d_exp(x);
    case UnaryOp::log: return d_log(x);
    case UnaryOp::sqrt: return d_sqrt(x);
    case UnaryOp::rsqrt: return T(1) / d_sqrt(x);
    case UnaryOp::tanh: return d_tanh(x);
    case UnaryOp::sigmoid: return sigmoid_of(x);
    case UnaryOp::relu: return x > 0 ? x : T(0);
    case UnaryOp::gelu: return x * gelu_cdf(x);
    case UnaryOp::quick_gelu: return x * sigmoid_of(T(1.702) * x);
    case UnaryOp::silu: return x * sigmoid_of(x);
    case UnaryOp::pow: return d_pow(x, p);
    case UnaryOp::add_scalar: return x + p;
    case UnaryOp::mul_scalar: return x * p;
  }
  return x;
}

// d op(x)/dx, from x or from y = op(x) where cheaper (the same formulas as the CPU).
template <typename T>
__device__ __forceinline__ T unary_derivative(UnaryOp op, T x, T y, T p) {
  switch (op) {
    case UnaryOp::neg: return T(-1);
    case UnaryOp::exp: return y;
    case UnaryOp::log: return T(1) / x;
    case UnaryOp::sqrt: return T(0.5) / y;
    case UnaryOp::rsqrt: return T(-0.5) * y * y * y;
    case UnaryOp::tanh: return T(1) - y * y;
    case UnaryOp::sigmoid: return y * (T(1) - y);
    case UnaryOp::relu: return x > 0 ? T(1) : T(0);
    case UnaryOp::gelu: return gelu_cdf(x) + x * T(0.39894228040143267794) * d_exp(T(-0.5) * x * x);
    case UnaryOp::quick_gelu: { T s = sigmoid_of(T(1.702) * x); return s + T(1.702) * x * s * (T(1) - s); }
    case UnaryOp::silu: { T s = sigmoid_of(x); return s + x * s * (T(1) - s); }
    case UnaryOp::pow: return p * d_pow(x, p - T(1));
    case UnaryOp::add_scalar: return T(1);
    case UnaryOp::mul_scalar: return p;
  }
  return T(0);
}

template <typename T>
__global__ void unary_kernel(UnaryOp op, const T* x, T p, T* o, int64_t n) {
  CUDA_LOOP(i, n) o[i] = unary_value(op, x[i], p);
}

template <typename T>
__global__ void unary_backward_kernel(UnaryOp op, const T* x, const T* y, const T* g, T p, T* o, int64_t n) {
  CUDA_LOOP(i, n) o[i] = g[i] * unary_derivative(op, x[i], y[i], p);
}

// swiglu = silu(gate)·up and its backward (the CPU's formulas, tensor/cpu/elementwise.cpp).
template <typename T>
__global__ void swiglu_kernel(const T* gate, const T* up, T* o, int64_t n) {
  CUDA_LOOP(i, n) o[i] = gate[i] * sigmoid_of(gate[i]) * up[i];
}

template <typename T>
__global__ void swiglu_backward_kernel(const T* gate, const T* up, const T* g, T* g_gate, T* g_up, int64_t n) {
  CUDA_LOOP(i, n) {
    T x = gate[i], s = sigmoid_of(x);
    if (g_up) g_up[i] = g[i] * (x * s);
    if (g_gate) g_gate[i] = g[i] * up[i] * (s + x * s * (T(1) - s));
  }
}

// ---- bias_act = act(x + bias) over [rows, N], as on the CPU (tensor/cpu/elementwise.cpp): forward one thread per
// element; backward a grid of (column, chunk of kBiasSumChunk rows), each thread walking its chunk's rows in
// order, writing gx and its double sum, then one thread per column adding its chunks in order (no atomics, the
// CPU's order of additions). y = act(z) is recomputed only when the derivative is written in terms of it.

template <typename T>
__global__ void bias_act_kernel(UnaryOp act, const T* x, const T* bias, T* y, int64_t n, int64_t N) {
  CUDA_LOOP(i, n) y[i] = unary_value(act, x[i] + bias[i % N], T(0));
}

template <typename T>
__global__ void bias_act_grad_chunks(UnaryOp act, bool need_y, const T* x, const T* bias, const T* g, int64_t rows,
                                     int64_t N, T* gx, double* bias_sums) {
  int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t chunks = (rows + kBiasSumChunk - 1) / kBiasSumChunk;
  if (j >= N) return;
  for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    int64_t r1 = min(rows, (c + 1) * kBiasSumChunk);
    double s = 0;
    for (int64_t r = c * kBiasSumChunk; r < r1; ++r) {
      T z = x[r * N + j] + bias[j];
      T d = g[r * N + j] * unary_derivative(act, z, need_y ? unary_value(act, z, T(0)) : z, T(0));
      gx[r * N + j] = d;
      s += d;
    }
    if (bias_sums) bias_sums[c * N + j] = s;
  }
}

}  // namespace

void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  dispatch_float(out.dtype(), "cuda binary", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    if (a.shape() == out.shape() && b.shape() == out.shape()) {
      binary_flat<T><<<blocks_for(n), kThreads, 0, stream()>>>(op, a.data<T>(), b.data<T>(), out.data<T>(), n);
    } else {
      binary_broadcast<T><<<blocks_for(n), kThreads, 0, stream()>>>(
          op, a.data<T>(), b.data<T>(), broadcast_pair(a.shape(), b.shape(), out.shape()), out.data<T>(), n);
    }
    cudaCheckLaunch();
  });
}

void unary(UnaryOp op, const Tensor& x, double param, Tensor& out) {
  int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(out.dtype(), "cuda unary", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    unary_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(op, x.data<T>(), (T)param, out.data<T>(), n);
    cudaCheckLaunch();
  });
}

void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& gout, double param, Tensor& gx) {
  int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(gx.dtype(), "cuda unary_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    unary_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(op, x.data<T>(), y.data<T>(), gout.data<T>(),
                                                                       (T)param, gx.data<T>(), n);
    cudaCheckLaunch();
  });
}

void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  dispatch_float(out.dtype(), "cuda swiglu", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    swiglu_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(gate.data<T>(), up.data<T>(), out.data<T>(), n);
    cudaCheckLaunch();
  });
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& gout, Tensor& g_gate, Tensor& g_up) {
  int64_t n = gout.numel();
  if (n == 0) return;
  dispatch_float(gout.dtype(), "cuda swiglu_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    swiglu_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(gate.data<T>(), up.data<T>(), gout.data<T>(),
                                                                        g_gate.defined() ? g_gate.data<T>() : nullptr,
                                                                        g_up.defined() ? g_up.data<T>() : nullptr, n);
    cudaCheckLaunch();
  });
}

void bias_act(UnaryOp act, const Tensor& x, const Tensor& bias, Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  dispatch_float(out.dtype(), "cuda bias_act", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    bias_act_kernel<T>
        <<<blocks_for(n), kThreads, 0, stream()>>>(act, x.data<T>(), bias.data<T>(), out.data<T>(), n, bias.numel());
    cudaCheckLaunch();
  });
}

void bias_act_backward(UnaryOp act, const Tensor& x, const Tensor& bias, const Tensor& gout, Tensor& gx,
                       Tensor& gbias) {
  int64_t N = bias.numel(), rows = N ? x.numel() / N : 0, chunks = (rows + kBiasSumChunk - 1) / kBiasSumChunk;
  if (N == 0) return;
  Tensor sums = gbias.defined() ? Tensor::empty({std::max<int64_t>(chunks, 1), N}, DType::f64, Device::cuda) : Tensor();
  dispatch_float(gx.dtype(), "cuda bias_act_backward", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    if (chunks > 0) {
      dim3 grid((unsigned)((N + 127) / 128), (unsigned)std::min<int64_t>(chunks, 65535));
      bias_act_grad_chunks<T><<<grid, 128, 0, stream()>>>(act, derivative_reads_output(act), x.data<T>(),
                                                          bias.data<T>(), gout.data<T>(), rows, N, gx.data<T>(),
                                                          mut_or_null<double>(sums));
      cudaCheckLaunch();
    }
    if (gbias.defined()) {
      sum_chunks<T><<<blocks_for(N), kThreads, 0, stream()>>>(sums.data<double>(), chunks, N, gbias.data<T>());
      cudaCheckLaunch();
    }
  });
}

void broadcast_to(const Tensor& a, Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  dispatch_all(out.dtype(), "cuda broadcast_to", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    gather_broadcast<T><<<blocks_for(n), kThreads, 0, stream()>>>(
        a.data<T>(), broadcast_pair(a.shape(), a.shape(), out.shape()), out.data<T>(), n);
    cudaCheckLaunch();
  });
}

}  // namespace psa::cuda
