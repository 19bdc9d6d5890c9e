// PSA_HD marks functions compiled for both the CPU and CUDA: where the two devices must follow one rule exactly,
// the rule is written once (here, or beside its data as Philox in tensor/rng.h).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PSA_HD __host__ __device__ __forceinline__
#else
#define PSA_HD inline
#endif

namespace psa {

// The index max and argmax pick among n values `stride` apart: the first NaN, else the first maximum (torch's
// rule), for floating and integer T alike (x != x only for a NaN).
template <typename T>
PSA_HD int64_t column_argmax(const T* col, int64_t n, int64_t stride) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    const T x = col[i * stride], m = col[best * stride];
    if (m != m) break;
    if (x > m || x != x) best = i;
  }
  return best;
}

}  // namespace psa
