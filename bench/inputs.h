// Seeded inputs shared by the kernel benchmarks (bench/kernels.cpp on the CPU, bench/kernels_cuda.cpp on the
// GPU, which copies them to the device): host tensors, so the CPU references read them directly.
#pragma once
#include <cstdint>
#include <random>

#include "tensor/tensor.h"

namespace psa::bench {

// f32 values drawn uniformly from [lo, hi).
inline Tensor uniform(const Shape& shape, float lo, float hi, uint32_t seed) {
  Tensor t = Tensor::empty(shape);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = u(rng);
  return t;
}

// i64 ids in [0, hi), uniformly drawn (repeats happen, as in real batches).
inline Tensor ids(int64_t n, int64_t hi, uint32_t seed) {
  Tensor t = Tensor::empty({n}, DType::i64);
  std::mt19937 rng(seed);
  for (int64_t i = 0; i < n; ++i) t.data<int64_t>()[i] = int64_t(rng() % uint32_t(hi));
  return t;
}

// Cross-entropy targets for N rows over V classes where, as in the LM loss, only one row in three counts (the
// others are -100, ignored).
inline Tensor targets_one_in_three(int64_t N, int64_t V) {
  Tensor t = ids(N, V, 5);
  for (int64_t i = 0; i < N; ++i)
    if (i % 3) t.data<int64_t>()[i] = -100;
  return t;
}

}  // namespace psa::bench
