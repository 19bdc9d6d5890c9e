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
// Each formula is written once over V = one float or VecF, the widest float vector of the build (AVX-512: 16
// lanes, AVX2: 8), in a handful of primitives defined for both with the same rounding (fused multiply-adds,
// x86's min and max, round to nearest), so an element's value never depends on whether a lane or a scalar took
// it. The row loops take every f32 element through VecF, the last partial vector with masked loads and stores
// (masked lanes are not read, so a row may end where its allocation ends). 16 lanes against 8 (a Zen 5, one
// thread, bench_kernels): swiglu and its backward, softmax and attention's exps run in about 0.6-0.7x the time.
// Without AVX2 + FMA, exp is std::exp.
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

// ---- the primitives, on one float (std::fma compiles to the FMA instruction; min and max as x86's: the second
// operand unless the first is smaller / larger, so a NaN second operand passes through)
template <typename V>
V splat(float x);  // x in every lane (V = VecF) or x itself (V = float)
template <>
inline float splat<float>(float x) { return x; }
inline float fmadd(float a, float b, float c) { return std::fma(a, b, c); }   // a·b + c
inline float fnmadd(float a, float b, float c) { return std::fma(-a, b, c); }  // c - a·b
inline float fmsub(float a, float b, float c) { return std::fma(a, b, -c); }   // a·b - c
inline float vmin(float a, float b) { return a < b ? a : b; }
inline float vmax(float a, float b) { return a > b ? a : b; }
inline float round_nearest(float x) { return std::nearbyint(x); }
inline float vabs(float x) { return std::fabs(x); }
inline float select_lt(float x, float y, float a, float b) { return x < y ? a : b; }  // false for NaN
// p·2^k for integral kf in [-252, 254], as two factors 2^(k/2)·2^(k-k/2), each a normal float (see the top).
inline float mul_pow2(float p, float kf) {
  if (std::isnan(p)) return p;  // (int32_t)NaN is undefined; the lanes get a garbage scale, but p is NaN already
  auto pow2 = [](int32_t k) {  // 2^k for k in [-126, 127], from its bits (std::ldexp is a library call)
    uint32_t bits = uint32_t(k + 127) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  };
  int32_t k = (int32_t)kf, k1 = k >> 1, k2 = k - k1;
  return p * pow2(k1) * pow2(k2);
}

#ifdef PSA_VEC_EXP

// ---- the same on VecF lanes, and the loads and stores: FullLanes / TailLanes say whether all kLanes elements
// are there.
struct FullLanes {};

#if defined(__AVX512F__)
using VecF = __m512;
constexpr int kLanes = 16;
// The zero-masked forms with every lane on are the plain instructions; GCC 12's plain intrinsics (and its 512 -> 256
// cast) start from an "undefined" register that -Wall reports as uninitialised wherever they are inlined.
constexpr __mmask16 kAll = 0xffff;
struct TailLanes {
  __mmask16 m;
};
inline TailLanes tail_lanes(int64_t n) { return {(__mmask16)((1u << n) - 1)}; }
inline __m512 load_lanes(const float* p, FullLanes, float = 0) { return _mm512_loadu_ps(p); }
inline __m512 load_lanes(const float* p, TailLanes t, float fill = 0) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), t.m, p);
}
inline void store_lanes(float* p, __m512 v, FullLanes) { _mm512_storeu_ps(p, v); }
inline void store_lanes(float* p, __m512 v, TailLanes t) { _mm512_mask_storeu_ps(p, t.m, v); }
inline __m512 keep_lanes(__m512 v, TailLanes t) { return _mm512_maskz_mov_ps(t.m, v); }  // 0 in masked lanes
template <>
inline __m512 splat<__m512>(float x) { return _mm512_set1_ps(x); }
inline __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline __m512 fnmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fnmadd_ps(a, b, c); }
inline __m512 fmsub(__m512 a, __m512 b, __m512 c) { return _mm512_fmsub_ps(a, b, c); }
inline __m512 vmin(__m512 a, __m512 b) { return _mm512_maskz_min_ps(kAll, a, b); }
inline __m512 vmax(__m512 a, __m512 b) { return _mm512_maskz_max_ps(kAll, a, b); }
inline __m512 round_nearest(__m512 x) {
  return _mm512_maskz_roundscale_ps(kAll, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m512 vabs(__m512 x) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), x); }
inline __m512 select_lt(__m512 x, __m512 y, __m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, y, _CMP_LT_OQ), b, a);
}
inline __m512 mul_pow2(__m512 p, __m512 kf) {
  __m512i k = _mm512_maskz_cvtps_epi32(kAll, kf), k1 = _mm512_maskz_srai_epi32(kAll, k, 1);
  __m512i k2 = _mm512_sub_epi32(k, k1);
  __m512i bias = _mm512_set1_epi32(127);
  __m512 s1 = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_add_epi32(k1, bias), 23));
  __m512 s2 = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_add_epi32(k2, bias), 23));
  return _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
}
inline __m256 half_of(__m512 v, int which) {  // which = 0: lanes 0-7, 1: lanes 8-15
  __m512d d = _mm512_castps_pd(v);
  return _mm256_castpd_ps(which ? _mm512_maskz_extractf64x4_pd(0xf, d, 1) : _mm512_maskz_extractf64x4_pd(0xf, d, 0));
}
inline __m256 low_half(__m512 v) { return half_of(v, 0); }
inline __m256 high_half(__m512 v) { return half_of(v, 1); }
inline __m256 fold_sum(__m512 v) { return _mm256_add_ps(low_half(v), high_half(v)); }
inline __m256 fold_max(__m512 v) { return _mm256_max_ps(low_half(v), high_half(v)); }
#else
using VecF = __m256;
constexpr int kLanes = 8;
struct TailLanes {
  __m256i m;
};
inline TailLanes tail_lanes(int64_t n) {
  return {_mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
}
inline __m256 load_lanes(const float* p, FullLanes, float = 0) { return _mm256_loadu_ps(p); }
inline __m256 load_lanes(const float* p, TailLanes t, float fill = 0) {
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, t.m), _mm256_castsi256_ps(t.m));
}
inline void store_lanes(float* p, __m256 v, FullLanes) { _mm256_storeu_ps(p, v); }
inline void store_lanes(float* p, __m256 v, TailLanes t) { _mm256_maskstore_ps(p, t.m, v); }
inline __m256 keep_lanes(__m256 v, TailLanes t) { return _mm256_and_ps(v, _mm256_castsi256_ps(t.m)); }
template <>
inline __m256 splat<__m256>(float x) { return _mm256_set1_ps(x); }
inline __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256 fnmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fnmadd_ps(a, b, c); }
inline __m256 fmsub(__m256 a, __m256 b, __m256 c) { return _mm256_fmsub_ps(a, b, c); }
inline __m256 vmin(__m256 a, __m256 b) { return _mm256_min_ps(a, b); }
inline __m256 vmax(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
inline __m256 round_nearest(__m256 x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m256 vabs(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
inline __m256 select_lt(__m256 x, __m256 y, __m256 a, __m256 b) {
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, y, _CMP_LT_OQ));
}
inline __m256 mul_pow2(__m256 p, __m256 kf) {
  __m256i k = _mm256_cvtps_epi32(kf), k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  __m256i bias = _mm256_set1_epi32(127);
  __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
inline __m256 fold_sum(__m256 v) { return v; }
inline __m256 fold_max(__m256 v) { return v; }
#endif
inline VecF keep_lanes(VecF v, FullLanes) { return v; }

// Sum and maximum of the lanes, in a fixed order.
inline float hsum(VecF v) {
  __m256 h = fold_sum(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline float hmax(VecF v) {
  __m256 h = fold_max(v);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Runs body(i, FullLanes{}) at i = 0, kLanes, 2·kLanes, ... and body(i, TailLanes) on a last partial vector.
template <typename Body>
void lane_loop(int64_t n, Body body) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) body(i, FullLanes{});
  if (i < n) body(i, tail_lanes(n - i));
}

// exp of one float or of VecF lanes.
template <typename V>
inline V exp_f32(V x) {
  using namespace vexp_const;
  x = vmax(splat<V>(kLo), vmin(splat<V>(kHi), x));  // x second: NaN passes through both clamps
  V kf = round_nearest(x * kLog2e);
  V r = fnmadd(kf, splat<V>(kLn2Hi), x);
  r = fnmadd(kf, splat<V>(kLn2Lo), r);
  V p = splat<V>(kP0);
  for (float c : {kP1, kP2, kP3, kP4, kP5}) p = fmadd(p, r, splat<V>(c));
  p = fmadd(p, r * r, r + 1.0f);
  return mul_pow2(p, kf);
}

#else

inline float exp_f32(float x) { return std::exp(x); }

#endif

// exp for code templated over the scalar type: the vectorised exp for f32 (one value or VecF lanes), std::exp
// for f64.
inline double exp_of(double x) { return std::exp(x); }
inline float exp_of(float x) { return exp_f32(x); }
#ifdef PSA_VEC_EXP
inline VecF exp_of(VecF x) { return exp_f32(x); }
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

template <typename V, size_t N>
inline V horner_f32(const float (&c)[N], V x) {
  V p = splat<V>(c[N - 1]);
  for (size_t k = N - 1; k-- > 0;) p = fmadd(p, x, splat<V>(c[k]));
  return p;
}

// Φ(x) and φ(x) of one float or of VecF lanes.
template <typename V>
inline void gauss_f32(V x, V& cdf, V& pdf) {
  using namespace vgauss_const;
  V xc = vmax(splat<V>(-kClamp), vmin(splat<V>(kClamp), x));  // NaN passes
  V sq = xc * xc, sq_lo = fmsub(xc, xc, sq);
  V e = exp_f32(-0.5f * sq);
  e = fnmadd(e, 0.5f * sq_lo, e);  // e^{-(sq + sq_lo)/2} ≈ e^{-sq/2}·(1 - sq_lo/2)
  pdf = kRsqrt2Pi * e;
  V u = xc * kRsqrt2, z = vabs(u);
  V small = fmadd(0.5f * u, horner_f32(kP, u * u), splat<V>(0.5f));
  V t = 1.0f / fmadd(splat<V>(0.5f), z, splat<V>(1.0f));
  V q = (0.5f * e) * (t * horner_f32(kH, t));
  V large = select_lt(xc, splat<V>(0.0f), q, 1.0f - q);
  cdf = select_lt(z, splat<V>(kSplit), small, large);
}

// The f64 form, the reference the f32 forms are tested against: the erf formula itself.
inline void gauss_of(double x, double& cdf, double& pdf) {
  cdf = 0.5 * (1.0 + std::erf(x * 0.70710678118654752440));
  pdf = 0.39894228040143267794 * std::exp(-0.5 * x * x);
}
inline void gauss_of(float x, float& cdf, float& pdf) { gauss_f32(x, cdf, pdf); }
#ifdef PSA_VEC_EXP
inline void gauss_of(VecF x, VecF& cdf, VecF& pdf) { gauss_f32(x, cdf, pdf); }
#endif

// ---- array loops over f32 (VecF lanes, the last partial vector masked) or f64 (one double at a time). -----

// y[i] = f(x[i]), f generic: called on VecF lanes for f32 (masked lanes compute f(0), not stored), on doubles
// for f64.
template <typename T, typename F>
void map_lanes(const T* x, T* y, int64_t n, F f) {
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<T, float>) {
    lane_loop(n, [&](int64_t i, auto m) { store_lanes(y + i, f(load_lanes(x + i, m)), m); });
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = f(x[i]);
}

// y[i] = f(x[i], g[i]), the same way (an activation's backward: f = g·f'(x)).
template <typename T, typename F>
void map_lanes(const T* x, const T* g, T* y, int64_t n, F f) {
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<T, float>) {
    lane_loop(n, [&](int64_t i, auto m) { store_lanes(y + i, f(load_lanes(x + i, m), load_lanes(g + i, m)), m); });
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = f(x[i], g[i]);
}

// y[i] = f(a[i], b[i], c[i]), the same way (bias_act's backward: f = g·f'(x + bias)).
template <typename T, typename F>
void map_lanes(const T* a, const T* b, const T* c, T* y, int64_t n, F f) {
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<T, float>) {
    lane_loop(n, [&](int64_t i, auto m) {
      store_lanes(y + i, f(load_lanes(a + i, m), load_lanes(b + i, m), load_lanes(c + i, m)), m);
    });
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = f(a[i], b[i], c[i]);
}

// y = exp(x), elementwise.
template <typename T>
void exp_array(const T* x, T* y, int64_t n) {
  map_lanes(x, y, n, [](auto v) { return exp_of(v); });
}

// Largest of x[0, n): -inf for n = 0; NaNs are skipped (as std::max(mx, x) does).
template <typename T>
T row_max(const T* x, int64_t n) {
  const T lowest = -std::numeric_limits<T>::infinity();
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<T, float>) {
    // Not lane_loop: GCC keeps an accumulator that a lambda captures by reference in memory.
    VecF m = splat<VecF>(lowest);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) m = vmax(load_lanes(x + i, FullLanes{}), m);  // m second: NaN x skipped
    if (i < n) m = vmax(load_lanes(x + i, tail_lanes(n - i), lowest), m);              // masked lanes: -inf
    return hmax(m);
  }
#endif
  T mx = lowest;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  return mx;
}

// Σ exp(x - shift), also stored to y unless y is null. f32 sums in kLanes float lanes (added in a fixed order),
// f64 in one running double, so both are reproducible.
template <typename T>
double exp_shifted_sum(const T* x, T shift, T* y, int64_t n) {
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<T, float>) {
    const VecF s = splat<VecF>(shift);
    auto lanes_exp = [&](int64_t i, auto lanes) {  // returns the exps, 0 in masked lanes
      VecF e = exp_f32(load_lanes(x + i, lanes) - s);
      if (y) store_lanes(y + i, e, lanes);
      return keep_lanes(e, lanes);
    };
    VecF acc = splat<VecF>(0.0f);  // in a register: see row_max
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) acc = acc + lanes_exp(i, FullLanes{});
    if (i < n) acc = acc + lanes_exp(i, tail_lanes(n - i));
    return hsum(acc);
  }
#endif
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    T e = exp_of(x[i] - shift);
    if (y) y[i] = e;
    sum += e;
  }
  return sum;
}

}  // namespace psa::cpu
