// Fused optimizer kernels: AdamW and SGD read each parameter, its gradient and its state once and write them
// once (memory-bound, so one pass instead of torch's five is the whole optimisation), plus the global-norm
// helpers for gradient clipping. Parallelised with OpenMP over elements (updates) or over fixed-size blocks
// (the norm), so no result depends on the number of threads. Arithmetic runs in the tensor's own type, as
// torch does; scalars are folded in double first and rounded once.
#include <algorithm>
#include <cmath>

#include "tensor/cpu/kernel_util.h"
#include "tensor/cpu/kernels.h"

namespace psa::cpu {

namespace {

// The norm's partial sums are per block of this size, added in block order: fixed whatever the thread count.
constexpr int64_t kNormBlock = 1 << 14;

template <typename T>
double block_sum_squares(const T* x, int64_t n) {
  return sum_f64(n, [&](int64_t i) { return double(x[i]) * double(x[i]); });
}

}  // namespace

// torch's _single_tensor_adamw arrangement: p *= 1 - lr·wd; m = β1 m + (1-β1) g; v = β2 v + (1-β2) g²;
// p -= (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps), with bc_i = 1 - β_i^step.
static void adamw_step(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, const AdamWCoeffs& c) {
  dispatch_float(p.dtype(), "adamw", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using T = scalar_t;
    const T decay = T(1 - c.lr * c.weight_decay);
    const T b1 = T(c.beta1), b2 = T(c.beta2), a1 = T(1 - c.beta1), a2 = T(1 - c.beta2);
    const T step_size = T(c.lr / (1 - std::pow(c.beta1, (double)c.step)));
    const T sqrt_bc2 = T(std::sqrt(1 - std::pow(c.beta2, (double)c.step)));
    const T eps = T(c.eps);
    T* pp = p.data<T>();
    const T* pg = g.data<T>();
    T* pm = m.data<T>();
    T* pv = v.data<T>();
    const int64_t n = p.numel();
    for_blocks(n, [&](int64_t i0, int64_t i1) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {
        const T gi = pg[i];
        const T mi = b1 * pm[i] + a1 * gi;
        const T vi = b2 * pv[i] + a2 * gi * gi;
        pm[i] = mi;
        pv[i] = vi;
        pp[i] = pp[i] * decay - step_size * mi / (std::sqrt(vi) / sqrt_bc2 + eps);
      }
    });
  });
}

void adamw_steps(const std::vector<AdamWSlot>& slots) {
  for (const AdamWSlot& s : slots) adamw_step(*s.p, *s.g, *s.m, *s.v, s.c);
}

// torch's _single_tensor_sgd: d = g + wd·p; buf = first ? d : μ buf + (1-dampening) d;
// d = nesterov ? d + μ buf : buf; p -= lr·d.
void sgd_step(Tensor& p, const Tensor& g, Tensor& buf, const SgdCoeffs& c) {
  dispatch_float(p.dtype(), "sgd", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using T = scalar_t;
    const T lr = T(c.lr), wd = T(c.weight_decay), mu = T(c.momentum), keep = T(1 - c.dampening);
    const bool use_wd = c.weight_decay != 0, use_momentum = c.momentum != 0;
    T* pp = p.data<T>();
    const T* pg = g.data<T>();
    T* pb = use_momentum ? buf.data<T>() : nullptr;
    const int64_t n = p.numel();
    parallel_for(n, use_threads(n), [&](int64_t i) {
      T d = use_wd ? pg[i] + wd * pp[i] : pg[i];
      if (use_momentum) {
        const T b = c.first_step ? d : mu * pb[i] + keep * d;
        pb[i] = b;
        d = c.nesterov ? d + mu * b : b;
      }
      pp[i] -= lr * d;
    });
  });
}

namespace {

double tensor_sum_squares(const Tensor& x) {
  return dispatch_float(x.dtype(), "sum_squares", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    const scalar_t* px = x.data<scalar_t>();
    const int64_t n = x.numel(), blocks = (n + kNormBlock - 1) / kNormBlock;
    std::vector<double> partial(blocks);
    parallel_for(blocks, use_threads(n), [&](int64_t b) {
      partial[b] = block_sum_squares(px + b * kNormBlock, std::min(kNormBlock, n - b * kNormBlock));
    });
    double total = 0;
    for (double s : partial) total += s;
    return total;
  });
}

}  // namespace

double sum_squares(const std::vector<Tensor>& xs) {
  double total = 0;
  for (const Tensor& x : xs) total += tensor_sum_squares(x);
  return total;
}

void scale_in_place(const std::vector<Tensor>& xs, double s) {
  for (const Tensor& x : xs)
    dispatch_float(x.dtype(), "scale_in_place", [&](auto tag_) {
      using scalar_t = typename decltype(tag_)::type;
      scalar_t* px = x.data<scalar_t>();
      const scalar_t k = scalar_t(s);
      const int64_t n = x.numel();
      for_blocks(n, [&](int64_t i0, int64_t i1) {
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) px[i] *= k;
      });
    });
}

}  // namespace psa::cpu
