// Fused optimizer kernels (mirrors tensor/cpu/optim.cpp): AdamW and SGD read each parameter, gradient and state
// once and write them once, one thread per element, arithmetic in the tensor's own type with the scalars folded
// in double on the host. The global norm: sum_squares is deterministic, with a fixed grid of blocks per tensor that
// each reduce a fixed slice by a tree into a double partial, all tensors' partials copied back at once and added in
// order on the host.
#include <vector>

#include "tensor/cuda/common.cuh"

namespace psa::cuda {
namespace {

template <typename T>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, T decay, T b1, T b2, T a1, T a2, T step_size,
                             T sqrt_bc2, T eps) {
  CUDA_LOOP(i, n) {
    const T gi = g[i];
    const T mi = b1 * m[i] + a1 * gi;
    const T vi = b2 * v[i] + a2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (d_sqrt(vi) / sqrt_bc2 + eps);
  }
}

template <typename T>
__global__ void sgd_kernel(T* p, const T* g, T* buf, int64_t n, T lr, T wd, T mu, T keep, bool use_wd, bool nesterov,
                           bool first) {
  CUDA_LOOP(i, n) {
    T d = use_wd ? g[i] + wd * p[i] : g[i];
    if (buf) {
      const T b = first ? d : mu * buf[i] + keep * d;
      buf[i] = b;
      d = nesterov ? d + mu * b : b;
    }
    p[i] -= lr * d;
  }
}

constexpr int kNormBlocks = 256;

template <typename T>
__global__ void sum_squares_kernel(const T* x, int64_t n, double* partial) {
  __shared__ double scratch[kThreads];
  int64_t per_block = (n + gridDim.x - 1) / gridDim.x;
  int64_t begin = (int64_t)blockIdx.x * per_block, end = min(n, begin + per_block);
  double s = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) s += (double)x[i] * (double)x[i];
  double total = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

template <typename T>
__global__ void scale_kernel(T* x, int64_t n, T k) {
  CUDA_LOOP(i, n) x[i] *= k;
}

}  // namespace

void adamw_step(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, const AdamWCoeffs& c) {
  int64_t n = p.numel();
  if (n == 0) return;
  dispatch_float(p.dtype(), "cuda adamw", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    adamw_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(
        p.data<T>(), g.data<T>(), m.data<T>(), v.data<T>(), n, T(1 - c.lr * c.weight_decay), T(c.beta1), T(c.beta2),
        T(1 - c.beta1), T(1 - c.beta2), T(c.lr / (1 - std::pow(c.beta1, (double)c.step))),
        T(std::sqrt(1 - std::pow(c.beta2, (double)c.step))), T(c.eps));
    cudaCheckLaunch();
  });
}

void sgd_step(Tensor& p, const Tensor& g, Tensor& buf, const SgdCoeffs& c) {
  int64_t n = p.numel();
  if (n == 0) return;
  dispatch_float(p.dtype(), "cuda sgd", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    T* pb = c.momentum != 0 ? buf.data<T>() : nullptr;
    sgd_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(p.data<T>(), g.data<T>(), pb, n, T(c.lr), T(c.weight_decay),
                                                            T(c.momentum), T(1 - c.dampening), c.weight_decay != 0,
                                                            c.nesterov, c.first_step);
    cudaCheckLaunch();
  });
}

double sum_squares(const std::vector<Tensor>& xs) {
  if (xs.empty()) return 0;
  // Tensor i's blocks write partial[i][0, kNormBlocks); an empty tensor leaves its zeros.
  Tensor partial = Tensor::zeros({(int64_t)xs.size() * kNormBlocks}, DType::f64, Device::cuda);
  for (size_t i = 0; i < xs.size(); ++i) {
    int64_t n = xs[i].numel();
    if (n == 0) continue;
    dispatch_float(xs[i].dtype(), "cuda sum_squares", [&](auto tag_) {
      using T = typename decltype(tag_)::type;
      sum_squares_kernel<T><<<kNormBlocks, kThreads, 0, stream()>>>(xs[i].data<T>(), n,
                                                                    partial.data<double>() + i * kNormBlocks);
      cudaCheckLaunch();
    });
  }
  const std::vector<double> host = partial.vec<double>();
  double total = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    double tensor_total = 0;  // per tensor first, as the CPU kernel adds them
    for (int b = 0; b < kNormBlocks; ++b) tensor_total += host[i * kNormBlocks + b];
    total += tensor_total;
  }
  return total;
}

void scale_in_place(Tensor& x, double s) {
  int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype(), "cuda scale_in_place", [&](auto tag_) {
    using T = typename decltype(tag_)::type;
    scale_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(x.data<T>(), n, T(s));
    cudaCheckLaunch();
  });
}

}  // namespace psa::cuda
