// Reductions over the middle dim of an [outer, n, inner] view. f32 sums accumulate in double: the model's
// reductions are short, and exactness against the f64 reference is worth more than the few cycles.
#include "tensor/cpu/kernel_util.h"
#include "tensor/cpu/kernels.h"
#include "tensor/host_device.h"

namespace psa::cpu {

void sum_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out) {
  dispatch_float(a.dtype(), "sum", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using T = scalar_t;
    const T* pa = a.data<T>();
    T* po = out.data<T>();
    if (inner == 1) {
      parallel_for(outer, use_threads(outer * n, 1 << 16), [&](int64_t o) {
        double acc = 0;
        for (int64_t i = 0; i < n; ++i) acc += pa[o * n + i];
        po[o] = (T)acc;
      });
      return;
    }
    parallel_for(outer, use_threads(outer * n * inner, 1 << 16), [&](int64_t o) {
      std::vector<double> acc(inner, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        const T* row = pa + (o * n + i) * inner;
        for (int64_t j = 0; j < inner; ++j) acc[j] += row[j];
      }
      for (int64_t j = 0; j < inner; ++j) po[o * inner + j] = (T)acc[j];
    });
  });
}

void max_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out, Tensor& argmax) {
  dispatch_all(a.dtype(), "max", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using T = scalar_t;
    const T* pa = a.data<T>();
    T* po = out.defined() ? out.data<T>() : nullptr;
    int64_t* pi = argmax.data<int64_t>();
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t j = 0; j < inner; ++j) {
        const T* col = pa + o * n * inner + j;
        const int64_t best = column_argmax(col, n, inner);
        if (po) po[o * inner + j] = col[best * inner];
        pi[o * inner + j] = best;
      }
  });
}

void max_backward(const Tensor& gout, const Tensor& argmax, int64_t outer, int64_t n, int64_t inner, Tensor& ga) {
  dispatch_float(ga.dtype(), "max_backward", [&](auto tag_) {
    using scalar_t = typename decltype(tag_)::type;
    using T = scalar_t;
    const T* pg = gout.data<T>();
    const int64_t* pi = argmax.data<int64_t>();
    T* po = ga.data<T>();
    std::fill(po, po + outer * n * inner, T(0));
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t j = 0; j < inner; ++j) po[(o * n + pi[o * inner + j]) * inner + j] = pg[o * inner + j];
  });
}

}  // namespace psa::cpu
