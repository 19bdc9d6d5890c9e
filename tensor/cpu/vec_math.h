// Vectorised f32 exp, the Gaussian CDF and density built on it (the exact gelu), and the row loops (a lane-wise
// map, a row max, exp-and-sum for softmax rows), for the CPU kernels' f32 paths; f64 paths keep std::exp and
// std::erf (they are the references the f32 paths are tested against). The activations (sigmoid, silu,
// quick_gelu, gelu) are written over these in elementwise.cpp.
//
// exp(x) = 2^k · e^r with k = round(x·log2 e) and r = x - k·ln2 (ln2 split in a hi part exact in f32 and a lo
// part, so r is exact to ~1 ulp), |r| <= ln2/2; e^r = 1 + r + r²·P(r) with Cephes' degree-5 minimax P
// (~1 ulp). 2^k is applied as two factors 2^(k/2)·2^(k-k/2), each a valid normal float, so results that
// round into denormals (x < -87.3) are rounded once and exp(88.7 .. 89) gives the largest floats or +inf
// instead of garbage. Inputs are clamped to [-110, 89]: below, the result rounds to 0 (-inf gives 0); above,
// it is +inf (+inf gives +inf). NaN stays NaN (the clamps pass it through, the polynomial propagates it).
//
// exp_f32 on 8 AVX2 lanes and on one float run the same operations, so an element's value does not depend on
// whether it fell in a vector body or a tail. Without AVX2+FMA everything is std::exp.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PSA_VEC_EXP 1
#endif

namespace psa::cpu {

namespace vexp_const {
constexpr float kHi = 89.0f, kLo = -110.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // kLn2Hi has 9 significant bits: k·kLn2Hi exact
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
}  // namespace vexp_const

#ifdef PSA_VEC_EXP

inline __m256 exp_f32(__m256 x) {
  using namespace vexp_const;
  // min/max return their second operand when one is NaN: with x second, NaN passes through both clamps.
  x = _mm256_max_ps(_mm256_set1_ps(kLo), _mm256_min_ps(_mm256_set1_ps(kHi), x));
  __m256 kf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i k = _mm256_cvtps_epi32(kf);  // NaN gives INT_MIN: garbage scale, but p is NaN already
  __m256i k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  __m256i bias = _mm256_set1_epi32(127);
  __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// 2^k for k in [-126, 127], from its bits (std::ldexp is a library call; this is one shift).
inline float pow2_f32(int32_t k) {
  uint32_t bits = uint32_t(k + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The same operations as the 8-lane exp_f32 on one value (std::fma compiles to the FMA instruction here).
inline float exp_f32(float x) {
  using namespace vexp_const;
  x = std::isnan(x) ? x : std::fmax(kLo, std::fmin(kHi, x));
  float kf = std::nearbyint(x * kLog2e);
  float r = std::fma(-kf, kLn2Hi, x);
  r = std::fma(-kf, kLn2Lo, r);
  float p = kP0;
  for (float c : {kP1, kP2, kP3, kP4, kP5}) p = std::fma(p, r, c);
  p = std::fma(p, r * r, r + 1.0f);
  if (std::isnan(p)) return p;
  int32_t k = (int32_t)kf, k1 = k >> 1, k2 = k - k1;
  return p * pow2_f32(k1) * pow2_f32(k2);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

#else

inline float exp_f32(float x) { return std::exp(x); }

#endif

// exp for code templated over the scalar type: the vectorised exp for f32 (one value or 8 lanes), std::exp
// for f64.
inline double exp_of(double x) { return std::exp(x); }
inline float exp_of(float x) { return exp_f32(x); }
#ifdef PSA_VEC_EXP
inline __m256 exp_of(__m256 x) { return exp_f32(x); }
#endif

// ---- The Gaussian CDF Φ(x) = (1 + erf(x/√2))/2 and density φ(x) for the exact gelu x·Φ(x) and its derivative
// Φ + x·φ, in f32 (std::erf is a scalar library call: it made the projector's gelu the slowest op of a step).
// With z = |x|/√2:
//   z < 0.5:  erf(z)  = z·P(z²),                   so Φ = 1/2 + (x/√2)·P(z²)/2
//   z >= 0.5: erfc(z) = e^{-z²}·t·H(t), t = 1/(1 + z/2), so Φ = q or 1 - q with q = e^{-z²}·t·H(t)/2
// erfc is approximated directly, so Φ at negative x keeps its relative precision down to the underflow of
// e^{-z²} instead of cancelling in 1 + erf. P (degree 4) and H (degree 9) are minimax fits of the relative error,
// derived by tools/fit_gelu.py (about 1e-7 each in f32). e^{-z²} = e^{-x²/2} is shared by Φ and φ; x² is split
// into x·x and its rounding error (one FMA) so e^{-x²/2} stays accurate at large |x|. |x| is clamped to 15
// for the exponential (e^{-112.5} is 0 in f32), so ±inf give Φ = 1 or 0 and φ = 0, as the erf formula does.
namespace vgauss_const {
constexpr float kP[] = {1.128379107e+00f, -3.761260808e-01f, 1.128282249e-01f, -2.675718442e-02f,
                        4.717990290e-03f};
constexpr float kH[] = {2.820947766e-01f, 2.820955813e-01f,  2.468075007e-01f,  1.765807867e-01f,
                        8.291614056e-02f, -8.763466030e-03f, -1.444518100e-02f, -1.918067336e-01f,
                        2.088783383e-01f, -6.443115324e-02f};
constexpr float kSplit = 0.5f, kClamp = 15.0f;
constexpr float kRsqrt2 = 0.70710678118654752f, kRsqrt2Pi = 0.39894228040143268f;
}  // namespace vgauss_const

template <size_t N>
inline float horner_f32(const float (&c)[N], float x) {
  float p = c[N - 1];
  for (size_t k = N - 1; k-- > 0;) p = std::fma(p, x, c[k]);
  return p;
}

// Φ(x) and φ(x) of one float; the 8-lane form below runs the same operations.
inline void gauss_f32(float x, float& cdf, float& pdf) {
  using namespace vgauss_const;
  float xc = std::isnan(x) ? x : std::fmax(-kClamp, std::fmin(kClamp, x));
  float sq = xc * xc, sq_lo = std::fma(xc, xc, -sq);
  float e = exp_f32(-0.5f * sq);
  e = std::fma(-e, 0.5f * sq_lo, e);  // e^{-(sq + sq_lo)/2} ≈ e^{-sq/2}·(1 - sq_lo/2)
  pdf = kRsqrt2Pi * e;
  float u = xc * kRsqrt2, z = std::fabs(u);
  float small = std::fma(0.5f * u, horner_f32(kP, u * u), 0.5f);
  float t = 1.0f / std::fma(0.5f, z, 1.0f);
  float q = 0.5f * e * (t * horner_f32(kH, t));
  float large = xc < 0 ? q : 1.0f - q;
  cdf = z < kSplit ? small : large;
}

#ifdef PSA_VEC_EXP
template <size_t N>
inline __m256 horner_f32(const float (&c)[N], __m256 x) {
  __m256 p = _mm256_set1_ps(c[N - 1]);
  for (size_t k = N - 1; k-- > 0;) p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(c[k]));
  return p;
}

inline void gauss_f32(__m256 x, __m256& cdf, __m256& pdf) {
  using namespace vgauss_const;
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  __m256 xc = _mm256_max_ps(_mm256_set1_ps(-kClamp), _mm256_min_ps(_mm256_set1_ps(kClamp), x));  // NaN passes
  __m256 sq = _mm256_mul_ps(xc, xc), sq_lo = _mm256_fmsub_ps(xc, xc, sq);
  __m256 e = exp_f32(_mm256_mul_ps(_mm256_set1_ps(-0.5f), sq));
  e = _mm256_fnmadd_ps(e, _mm256_mul_ps(half, sq_lo), e);
  pdf = _mm256_mul_ps(_mm256_set1_ps(kRsqrt2Pi), e);
  __m256 u = _mm256_mul_ps(xc, _mm256_set1_ps(kRsqrt2));
  __m256 z = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), u);
  __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(half, u), horner_f32(kP, _mm256_mul_ps(u, u)), half);
  __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(half, z, one));
  __m256 q = _mm256_mul_ps(_mm256_mul_ps(half, e), _mm256_mul_ps(t, horner_f32(kH, t)));
  __m256 large = _mm256_blendv_ps(_mm256_sub_ps(one, q), q, _mm256_cmp_ps(xc, _mm256_setzero_ps(), _CMP_LT_OQ));
  cdf = _mm256_blendv_ps(large, small, _mm256_cmp_ps(z, _mm256_set1_ps(kSplit), _CMP_LT_OQ));
}
#endif

// The f64 form, the reference the f32 forms are tested against: the erf formula itself.
inline void gauss_of(double x, double& cdf, double& pdf) {
  cdf = 0.5 * (1.0 + std::erf(x * 0.70710678118654752440));
  pdf = 0.39894228040143267794 * std::exp(-0.5 * x * x);
}
inline void gauss_of(float x, float& cdf, float& pdf) { gauss_f32(x, cdf, pdf); }
#ifdef PSA_VEC_EXP
inline void gauss_of(__m256 x, __m256& cdf, __m256& pdf) { gauss_f32(x, cdf, pdf); }
#endif

// ---- array loops over f32 (8 lanes in the body, one float at a time in the tail) or f64 (scalar). --------

// y[i] = f(x[i]), f generic: called on __m256 lanes and on single floats (or doubles).
template <typename T, typename F>
void map_lanes(const T* x, T* y, int64_t n, F f) {
  int64_t i = 0;
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<T, float>)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, f(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) y[i] = f(x[i]);
}

// y[i] = f(x[i], g[i]), the same way (an activation's backward: f = g·f'(x)).
template <typename T, typename F>
void map_lanes(const T* x, const T* g, T* y, int64_t n, F f) {
  int64_t i = 0;
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<T, float>)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, f(_mm256_loadu_ps(x + i), _mm256_loadu_ps(g + i)));
#endif
  for (; i < n; ++i) y[i] = f(x[i], g[i]);
}

// y[i] = f(a[i], b[i], c[i]), the same way (bias_act's backward: f = g·f'(x + bias)).
template <typename T, typename F>
void map_lanes(const T* a, const T* b, const T* c, T* y, int64_t n, F f) {
  int64_t i = 0;
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<T, float>)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, f(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), _mm256_loadu_ps(c + i)));
#endif
  for (; i < n; ++i) y[i] = f(a[i], b[i], c[i]);
}

// y = exp(x), elementwise.
template <typename T>
void exp_array(const T* x, T* y, int64_t n) {
  map_lanes(x, y, n, [](auto v) { return exp_of(v); });
}

// Largest of x[0, n): -inf for n = 0; NaNs are skipped (as std::max(mx, x) does).
template <typename T>
T row_max(const T* x, int64_t n) {
  int64_t i = 0;
  T mx = -std::numeric_limits<T>::infinity();
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<T, float>) {
    __m256 m = _mm256_set1_ps(mx);
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(x + i), m);  // m second: a NaN x is skipped
    mx = hmax8(m);
  }
#endif
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  return mx;
}

// Σ exp(x - shift), also stored to y unless y is null. f32 sums in 8 float lanes (added in a fixed order),
// f64 in one running double, so both are reproducible.
template <typename T>
double exp_shifted_sum(const T* x, T shift, T* y, int64_t n) {
  int64_t i = 0;
  double sum = 0;
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<T, float>) {
    __m256 acc = _mm256_setzero_ps(), s = _mm256_set1_ps(shift);
    for (; i + 8 <= n; i += 8) {
      __m256 e = exp_f32(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
      if (y) _mm256_storeu_ps(y + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
  }
#endif
  for (; i < n; ++i) {
    T e = exp_of(x[i] - shift);
    if (y) y[i] = e;
    sum += e;
  }
  return sum;
}

}  // namespace psa::cpu
