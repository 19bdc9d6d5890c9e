// Rotary embeddings and scaled dot-product attention.
// Both keep the heads where the projections put them, [B, T, H, D]: a head is T rows of D values, H·D apart, and
// every GEMM below takes that row stride as its leading dimension, so no permute copies the heads in or out.
// rope: rows of D are independent; spread over threads when large.
// attention: one (b, h) block at a time, blocks spread over OpenMP threads; inside a block the GEMMs run
// single-threaded (gemm.h's contract inside a parallel region), each operand that several row or column chunks
// multiply packed once per block (gemm.h's PackedB; repacking K and V for every chunk had been a quarter of
// the time at the tiny LLM's [103 x 32] heads). The forward keeps the probabilities P
// [B, H, T, S] for the backward (T, S are at most a few hundred in this project), so no score is recomputed.
// Causal attention skips the masked triangle: rows go in chunks of kCausalRows, each chunk's GEMMs stop at
// the last column its last row sees (and in the backward, the transposed products start at the first row
// that sees the chunk's columns). At the tiny LLM's T = 103 that is 61% of the full [T, S] work; bench_kernels
// attention_fwd_bwd [16, 4, 103, 32], one thread, min of 10 interleaved runs: 4.5 ms against 5.8 unchunked
// (12 or 18 rows: no better, then as each chunk re-packed K and V, and still none better on a Zen 5 once
// they were packed once: min of 10 interleaved runs within 1.5%; 36 or 60: less skipped).
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "tensor/cpu/kernel_util.h"
#include "tensor/cpu/kernels.h"
#include "tensor/cpu/vec_math.h"

namespace psa::cpu {
namespace {

// Row chunk of causal attention: smaller chunks skip more of the triangle, larger ones keep the GEMMs
// efficient; 24 rows = 4 micro-kernel rows (AVX2).
constexpr int64_t kCausalRows = 24;

}  // namespace

// ---- rope (rotate-half, HF Llama): out = x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1] for
// x = [x1, x2] halves of D. rotate_half is R with Rᵀ = -R, so gx = g·cos + Rᵀ(g·sin) = g·cos - rotate_half(g·sin).
// x, out, gout and gx [B, T, H, D]: row r = (b, t, h) is at position t = (r / H) % T.
namespace {

// One row of D = 2·half values, x = [x1, x2], c = [c1, c2], s = [s1, s2]:
//   forward   y = [x1·c1 - x2·s1, x2·c2 + x1·s2]
//   backward  y = [x1·c1 + x2·s2, x2·c2 - x1·s1]   (x = the gradient)
// f32 on VecF lanes, half a row per vector pass (the compiler's own loops, with a runtime trip count and a scalar
// epilogue per half, took ~100 us per tiny-model call); the formulas of the f64 loops (the compiler may fuse a
// product and a difference into one multiply-add in either, so f32 and f64 round differently).
template <typename S>
void rope_row(const S* x, const S* c, const S* s, S* y, int64_t half, bool backward) {
#ifdef PSA_VEC_EXP
  if constexpr (std::is_same_v<S, float>) {
    lane_loop(half, [&](int64_t i, auto m) {
      VecF x1 = load_lanes(x + i, m), x2 = load_lanes(x + half + i, m), c1 = load_lanes(c + i, m),
           c2 = load_lanes(c + half + i, m), s1 = load_lanes(s + i, m), s2 = load_lanes(s + half + i, m);
      store_lanes(y + i, backward ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1, m);
      store_lanes(y + half + i, backward ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2, m);
    });
    return;
  }
#endif
  for (int64_t d = 0; d < half; ++d) {
    y[d] = backward ? x[d] * c[d] + x[d + half] * s[d + half] : x[d] * c[d] - x[d + half] * s[d];
    y[d + half] = backward ? x[d + half] * c[d + half] - x[d] * s[d] : x[d + half] * c[d + half] + x[d] * s[d + half];
  }
}

// Every row of `in` rotated into `out` (the forward on x, or the backward on gout); rows of D, the positions
// t = (r / H) % T.
void rope_rows(const Tensor& in, const Tensor& cos, const Tensor& sin, Tensor& out, bool backward) {
  int64_t T = in.size(1), H = in.size(2), D = in.size(3), half = D / 2, rows = in.numel() / D;
  dispatch_float(in.dtype(), backward ? "rope_backward" : "rope", [&](auto tag_) {
    using S = typename decltype(tag_)::type;
    const S *px = in.data<S>(), *pc = cos.data<S>(), *ps = sin.data<S>();
    S* po = out.data<S>();
    parallel_for(rows, use_threads(rows * D), [&](int64_t r) {
      const int64_t t = (r / H) % T;
      rope_row(px + r * D, pc + t * D, ps + t * D, po + r * D, half, backward);
    });
  });
}

}  // namespace

void rope(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out) { rope_rows(x, cos, sin, out, false); }

void rope_backward(const Tensor& gout, const Tensor& cos, const Tensor& sin, Tensor& gx) {
  rope_rows(gout, cos, sin, gx, true);
}

// ---- attention. Per (b, h), with G = H / Hkv query heads per kv head and kv head h / G:
//   forward:  P = softmax(scale·Q Kᵀ + mask, causal: s > t + S - T masked) [T, S];  O = P V [T, D]
//   backward: dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P∘(dP - rowsum(dP∘P));  dQ = scale·dS K;  dK = scale·dSᵀ Q
// dK, dV of the G heads sharing a kv head are summed afterwards in a fixed order (no races, reproducible).
namespace {

struct AttnDims {
  int64_t B, H, Hkv, T, S, D;
  int64_t group() const { return H / Hkv; }
  // Where head h of row b starts in q, out and their gradients [B, T, H, D], and its row stride; the same for kv
  // head j in k, v [B, S, Hkv, D].
  int64_t q_head(int64_t b, int64_t h) const { return (b * T * H + h) * D; }
  int64_t q_ld() const { return H * D; }
  int64_t kv_head(int64_t b, int64_t j) const { return (b * S * Hkv + j) * D; }
  int64_t kv_ld() const { return Hkv * D; }
};

AttnDims dims_of(const Tensor& q, const Tensor& k) {
  return {q.size(0), q.size(2), k.size(2), q.size(1), k.size(1), q.size(3)};
}

// Columns row t of T sees under the causal mask (query t sits at key position t + S - T: a KV cache
// puts S - T earlier keys before the T queries).
int64_t visible_cols(int64_t t, int64_t T, int64_t S) { return std::min(S, std::max<int64_t>(t + S - T + 1, 0)); }

// First row that sees column s (rows before it have P[t, s] = 0).
int64_t first_row_seeing(int64_t s, int64_t T, int64_t S) { return std::max<int64_t>(s - (S - T), 0); }

// Rows [t0, t0 + rows) and the columns [0, cols) they need: one chunk of all T x S without the causal mask.
struct Chunk {
  int64_t t0, rows, cols;
};

std::vector<Chunk> row_chunks(const AttnDims& a, bool causal) {
  if (!causal) return {{0, a.T, a.S}};
  std::vector<Chunk> out;
  for (int64_t t0 = 0; t0 < a.T; t0 += kCausalRows) {
    int64_t rows = std::min(kCausalRows, a.T - t0);
    out.push_back({t0, rows, visible_cols(t0 + rows - 1, a.T, a.S)});
  }
  return out;
}

// Offset of the [T, S] mask block used by (b, h); -1 when there is no mask. Size-1 mask dims broadcast.
int64_t mask_offset(const Tensor& mask, const AttnDims& a, int64_t b, int64_t h) {
  if (!mask.defined()) return -1;
  if (mask.dim() == 2) return 0;
  int64_t mb = mask.size(0) == 1 ? 0 : b, mh = mask.size(1) == 1 ? 0 : h;
  return (mb * mask.size(1) + mh) * a.T * a.S;
}

// Turns the scores [T, S] into probabilities in place: add the mask, drop s > t + S - T when causal, stable
// softmax per row. Rows with every position masked become zeros (not NaN), so they pass nothing on.
// Rows t0 .. t0 + rows - 1 of T; P and mask point at row t0.
template <typename X>
void mask_softmax_rows(X* P, const X* mask, bool causal, int64_t t0, int64_t rows, int64_t T, int64_t S) {
  const X inf = std::numeric_limits<X>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    X* row = P + i * S;
    const int64_t t = t0 + i;
    int64_t visible = causal ? visible_cols(t, T, S) : S;
    if (mask)
      for (int64_t s = 0; s < visible; ++s) row[s] += mask[i * S + s];
    X mx = row_max(row, visible);
    if (mx == -inf) visible = 0;
    double sum = exp_shifted_sum(row, mx, row, visible);  // in place: each lane is read before it is written
    X inv = visible ? (X)(1.0 / sum) : X(0);
    for (int64_t s = 0; s < visible; ++s) row[s] *= inv;
    for (int64_t s = visible; s < S; ++s) row[s] = X(0);
  }
}

// dP -> dS = P∘(dP - rowsum(dP∘P)) in place, on `rows` rows of `cols` columns (row stride S); P is 0 past a
// row's visible columns, so a chunk's columns cover every nonzero term.
template <typename X>
void softmax_grad_rows(const X* P, X* dP, int64_t rows, int64_t cols, int64_t S) {
  for (int64_t t = 0; t < rows; ++t) {
    const X* p = P + t * S;
    X* d = dP + t * S;
    X c = (X)sum_f64(cols, [&](int64_t s) { return (double)d[s] * p[s]; });
    for (int64_t s = 0; s < cols; ++s) d[s] = p[s] * (d[s] - c);
  }
}

// gk[b, :, j] = Σ_{g < G} per_head[b, j·G + g] over the query heads' [S, D] blocks, into gk [B, S, Hkv, D].
template <typename X>
void sum_kv_groups(const X* per_head, const AttnDims& a, X* out) {
  int64_t block = a.S * a.D, G = a.group();
  parallel_for(a.B * a.Hkv, use_threads(a.B * a.H * block), [&](int64_t bj) {
    const X* src = per_head + bj * G * block;
    for (int64_t s = 0; s < a.S; ++s) {
      X* o = out + a.kv_head(bj / a.Hkv, bj % a.Hkv) + s * a.kv_ld();
      for (int64_t d = 0; d < a.D; ++d) o[d] = src[s * a.D + d];
      for (int64_t g = 1; g < G; ++g)
        for (int64_t d = 0; d < a.D; ++d) o[d] += src[g * block + s * a.D + d];
    }
  });
}

}  // namespace

void attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, bool causal, double scale,
               Tensor& out, Tensor& probs) {
  AttnDims a = dims_of(q, k);
  dispatch_float(q.dtype(), "attention", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    const X *pq = q.data<X>(), *pk = k.data<X>(), *pv = v.data<X>();
    const X* pm = mask.defined() ? mask.data<X>() : nullptr;
    X *po = out.data<X>(), *pp = probs.data<X>();
    const std::vector<Chunk> chunks = row_chunks(a, causal);
    parallel_for_dynamic(a.B * a.H, a.B * a.H > 1 && use_threads(a.B * a.H * a.T * a.S * a.D), [&](int64_t bh) {
      int64_t b = bh / a.H, h = bh % a.H, kv = a.kv_head(b, h / a.group()), ld = a.q_ld();
      const X* Q = pq + a.q_head(b, h);
      X* P = pp + bh * a.T * a.S;
      X* O = po + a.q_head(b, h);
      int64_t mo = mask_offset(mask, a, b, h);
      const PackedB<X> keys_t(true, a.D, a.S, pk + kv, a.kv_ld()), values(false, a.S, a.D, pv + kv, a.kv_ld());
      for (const Chunk& c : chunks) {  // P = 0 past `cols` (mask_softmax_rows writes it)
        keys_t.multiply(false, c.rows, c.cols, 0, a.D, (X)scale, Q + c.t0 * ld, ld, X(0), P + c.t0 * a.S, a.S);
        mask_softmax_rows(P + c.t0 * a.S, mo < 0 ? nullptr : pm + mo + c.t0 * a.S, causal, c.t0, c.rows, a.T, a.S);
        values.multiply(false, c.rows, a.D, 0, c.cols, X(1), P + c.t0 * a.S, a.S, X(0), O + c.t0 * ld, ld);
      }
    });
  });
}

void attention_backward(const Tensor& gout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& probs,
                        bool causal, double scale, Tensor& gq, Tensor& gk, Tensor& gv) {
  AttnDims a = dims_of(q, k);
  int64_t G = a.group(), kv_block = a.S * a.D;
  // The transposed products (dV = Pᵀ dO, dK = dSᵀ Q) go by chunks of columns [s0, s0 + width), each from the
  // first row t_lo that sees s0; rows before that have P = dS = 0 there.
  struct ColChunk {
    int64_t s0, width, t_lo;
  };
  std::vector<ColChunk> col_chunks;
  const int64_t col_width = causal ? kCausalRows : a.S;
  for (int64_t s0 = 0; s0 < a.S; s0 += col_width)
    col_chunks.push_back({s0, std::min(col_width, a.S - s0), causal ? first_row_seeing(s0, a.T, a.S) : 0});
  dispatch_float(q.dtype(), "attention_backward", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    const X *pg = gout.data<X>(), *pq = q.data<X>(), *pk = k.data<X>(), *pv = v.data<X>(), *pp = probs.data<X>();
    X* pgq = gq.defined() ? gq.data<X>() : nullptr;
    // With shared kv heads each query head writes its own dK/dV block [S, D], summed by sum_kv_groups below;
    // with one query head per kv head, its block of gk/gv [B, S, Hkv, D] directly.
    std::vector<X> dk_heads, dv_heads;
    X* dk = gk.defined() ? gk.data<X>() : nullptr;
    X* dv = gv.defined() ? gv.data<X>() : nullptr;
    if (G > 1 && dk) { dk_heads.resize(a.B * a.H * kv_block); dk = dk_heads.data(); }
    if (G > 1 && dv) { dv_heads.resize(a.B * a.H * kv_block); dv = dv_heads.data(); }
    const int64_t ld = a.q_ld(), kv_out_ld = G > 1 ? a.D : a.kv_ld();
    auto kv_out = [&](X* base, int64_t b, int64_t h) {
      return base + (G > 1 ? (b * a.H + h) * kv_block : a.kv_head(b, h));
    };
    const std::vector<Chunk> chunks = row_chunks(a, causal);
    // out[s0 : s0 + width] = alpha · M[t_lo:, s0 : s0 + width]ᵀ · R[t_lo:], chunk by chunk (t_lo < T always:
    // the last row sees every column at or before S - 1); R [T, D] (row stride ld) packed once for all chunks.
    auto transposed = [&](const X* M, const X* R, X alpha, X* out) {
      const PackedB<X> rows(false, a.T, a.D, R, ld);
      for (const ColChunk& c : col_chunks)
        rows.multiply(true, c.width, a.D, c.t_lo, a.T, alpha, M + c.s0, a.S, X(0), out + c.s0 * kv_out_ld, kv_out_ld);
    };
    parallel_for_dynamic(a.B * a.H, a.B * a.H > 1 && use_threads(a.B * a.H * a.T * a.S * a.D), [&](int64_t bh) {
      int64_t b = bh / a.H, h = bh % a.H, kv = a.kv_head(b, h / G);
      const X *dO = pg + a.q_head(b, h), *Q = pq + a.q_head(b, h), *P = pp + bh * a.T * a.S;
      if (dv) transposed(P, dO, X(1), kv_out(dv, b, h));
      if (!pgq && !dk) return;
      std::vector<X> dS(a.T * a.S);  // zeros: the entries no chunk writes are read as dS = 0 by dK
      const PackedB<X> values_t(true, a.D, a.S, pv + kv, a.kv_ld());
      std::optional<PackedB<X>> keys;  // only for dQ
      if (pgq) keys.emplace(false, a.S, a.D, pk + kv, a.kv_ld());
      for (const Chunk& c : chunks) {
        X* d = dS.data() + c.t0 * a.S;
        values_t.multiply(false, c.rows, c.cols, 0, a.D, X(1), dO + c.t0 * ld, ld, X(0), d, a.S);
        softmax_grad_rows(P + c.t0 * a.S, d, c.rows, c.cols, a.S);
        if (pgq)
          keys->multiply(false, c.rows, a.D, 0, c.cols, (X)scale, d, a.S, X(0), pgq + a.q_head(b, h) + c.t0 * ld, ld);
      }
      if (dk) transposed(dS.data(), Q, (X)scale, kv_out(dk, b, h));
    });
    if (G > 1 && gk.defined()) sum_kv_groups(dk_heads.data(), a, gk.data<X>());
    if (G > 1 && gv.defined()) sum_kv_groups(dv_heads.data(), a, gv.data<X>());
  });
}

}  // namespace psa::cpu
