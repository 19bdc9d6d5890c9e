// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// generator. Element i of a draw with (seed, offset) is a pure function of (seed, offset, i), so the CPU and the
// GPU produce the same bits in any order and on any number of threads. Dropout compares integer bits with an
// integer threshold, so masks are identical across devices; normals (initialisation only) are made on the CPU.
#pragma once
#include <cmath>
#include <cstdint>

#include "tensor/host_device.h"

namespace psa {

struct Philox4 {
  uint32_t v[4];
};

PSA_HD Philox4 philox4x32(uint64_t counter_lo, uint64_t counter_hi, uint64_t key) {
  uint32_t c0 = (uint32_t)counter_lo, c1 = (uint32_t)(counter_lo >> 32);
  uint32_t c2 = (uint32_t)counter_hi, c3 = (uint32_t)(counter_hi >> 32);
  uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1;
    c3 = (uint32_t)p0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// 24 random bits -> [0, 1), exactly representable in f32.
PSA_HD float philox_uniform(uint64_t seed, uint64_t offset, uint64_t i) {
  return (float)(philox4x32(i, offset, seed).v[0] >> 8) * (1.0f / 16777216.0f);
}

// Dropout keep test in integers: keep when the 32-bit draw is >= p·2^32.
PSA_HD bool philox_keep(uint64_t seed, uint64_t offset, uint64_t i, uint32_t drop_threshold) {
  return philox4x32(i, offset, seed).v[0] >= drop_threshold;
}

// Standard normal by Box-Muller on two 32-bit draws (host only: libm differs across devices).
inline double philox_normal(uint64_t seed, uint64_t offset, uint64_t i) {
  Philox4 r = philox4x32(i, offset, seed);
  double u1 = ((double)r.v[0] + 0.5) * (1.0 / 4294967296.0), u2 = ((double)r.v[1] + 0.5) * (1.0 / 4294967296.0);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
}

}  // namespace psa
