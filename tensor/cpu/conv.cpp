// Convolutions and pooling of the vision side.
// patch_conv (kernel = stride = p, NCHW): patches never overlap, so im2col is a pure rearrangement into
// cols [B, L = H/p·W/p, K = C·p·p] and the convolution is one batched GEMM against w [O, K]; the backward is two
// GEMMs and col2im, the exact inverse rearrangement.
// depthwise_conv3x3 and adaptive_avg_pool2d work on channels-last token grids [B, H, W, C]: the innermost loop
// runs over C, contiguous in memory. Rows (b, y) are spread over OpenMP threads; weight gradients go through
// per-thread double accumulators summed in a fixed order.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "tensor/cpu/kernel_util.h"
#include "tensor/cpu/kernels.h"

namespace psa::cpu {
namespace {

// ---- patch_conv. cols[b, i·Wp + j, (c·p + ky)·p + kx] = x[b, c, i·p + ky, j·p + kx]: the (c, ky, kx) order of
// w [O, C, p, p], so out_b [O, L] = w [O, K] · cols_bᵀ.

// to_cols: x -> cols (im2col, x only read); otherwise cols -> x (col2im). Each copy is one p-long patch row.
template <typename X>
void rearrange_patches(const PatchDims& d, X* x, X* cols, bool to_cols) {
  parallel_for(d.B * d.Hp, use_threads(d.B * d.C * d.H * d.W), [&](int64_t bi) {
    int64_t b = bi / d.Hp, i = bi % d.Hp;
    for (int64_t j = 0; j < d.Wp; ++j) {
      X* patch = cols + (b * d.L + i * d.Wp + j) * d.K;
      for (int64_t c = 0; c < d.C; ++c)
        for (int64_t ky = 0; ky < d.p; ++ky) {
          X* img = x + ((b * d.C + c) * d.H + i * d.p + ky) * d.W + j * d.p;
          X* col = patch + (c * d.p + ky) * d.p;
          if (to_cols) std::copy(img, img + d.p, col);
          else std::copy(col, col + d.p, img);
        }
    }
  });
}

}  // namespace

void patch_conv(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) {
  PatchDims d = patch_dims(x, w);
  int64_t O = w.size(0);
  dispatch_float(x.dtype(), "patch_conv", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    std::vector<X> cols(d.B * d.L * d.K);
    rearrange_patches(d, const_cast<X*>(x.data<X>()), cols.data(), true);
    X* po = out.data<X>();
    gemm_batched(d.B, false, true, O, d.L, d.K, w.data<X>(), d.K, 0, cols.data(), d.K, d.L * d.K, po, d.L, O * d.L);
    if (!bias.defined()) return;
    const X* pb = bias.data<X>();
    for (int64_t bo = 0; bo < d.B * O; ++bo)
      for (int64_t l = 0; l < d.L; ++l) po[bo * d.L + l] += pb[bo % O];
  });
}

// gout [B, O, L]:  gbias = Σ_{b,l} gout;  gw = Σ_b gout_b · cols_b;  gcols_b = gout_bᵀ · w, then col2im -> gx.
void patch_conv_backward(const Tensor& gout, const Tensor& x, const Tensor& w, Tensor& gx, Tensor& gw, Tensor& gbias) {
  PatchDims d = patch_dims(x, w);
  int64_t O = w.size(0);
  dispatch_float(x.dtype(), "patch_conv_backward", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    const X* pg = gout.data<X>();
    if (gbias.defined()) {
      X* pb = gbias.data<X>();
      for (int64_t o = 0; o < O; ++o) {
        double s = 0;
        for (int64_t b = 0; b < d.B; ++b)
          for (int64_t l = 0; l < d.L; ++l) s += pg[(b * O + o) * d.L + l];
        pb[o] = (X)s;
      }
    }
    std::vector<X> cols(d.B * d.L * d.K);
    if (gw.defined()) {
      rearrange_patches(d, const_cast<X*>(x.data<X>()), cols.data(), true);
      for (int64_t b = 0; b < d.B; ++b)
        gemm(false, false, O, d.K, d.L, X(1), pg + b * O * d.L, d.L, cols.data() + b * d.L * d.K, d.K,
             b ? X(1) : X(0), gw.data<X>(), d.K);
    }
    if (gx.defined()) {
      gemm_batched(d.B, true, false, d.L, d.K, O, pg, d.L, O * d.L, w.data<X>(), d.K, 0, cols.data(), d.K, d.L * d.K);
      rearrange_patches(d, gx.data<X>(), cols.data(), false);
    }
  });
}

// ---- depthwise_conv3x3, padding 1: out[b,y,x,c] = Σ_{ky,kx} in[b, y+ky-1, x+kx-1, c]·w[c,0,ky,kx].
// The weights are first laid out as taps [9, C] so every inner loop is a contiguous run over C.
namespace {

template <typename X>
std::vector<X> taps_of(const X* w, int64_t C) {
  std::vector<X> taps(9 * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < 9; ++k) taps[k * C + c] = w[c * 9 + k];
  return taps;
}

// dst[b,y,x,:] = Σ_{ky,kx} src[b, y + sign·(ky-1), x + sign·(kx-1), :]·taps[ky,kx,:] — sign +1 is the forward
// correlation; sign -1 is its transpose, the gradient with respect to the input.
template <typename X>
void conv3x3_channels_last(const X* src, const X* taps, int64_t B, int64_t H, int64_t W, int64_t C, int sign, X* dst) {
  parallel_for(B * H, use_threads(B * H * W * C), [&](int64_t by) {
    int64_t b = by / H, y = by % H;
    for (int64_t x = 0; x < W; ++x) {
      X* o = dst + (by * W + x) * C;
      std::fill(o, o + C, X(0));
      for (int64_t ky = 0; ky < 3; ++ky) {
        int64_t yy = y + sign * (ky - 1);
        if (yy < 0 || yy >= H) continue;
        for (int64_t kx = 0; kx < 3; ++kx) {
          int64_t xx = x + sign * (kx - 1);
          if (xx < 0 || xx >= W) continue;
          const X* in = src + ((b * H + yy) * W + xx) * C;
          const X* t = taps + (ky * 3 + kx) * C;
          for (int64_t c = 0; c < C; ++c) o[c] += in[c] * t[c];
        }
      }
    }
  });
}

}  // namespace

void depthwise_conv3x3(const Tensor& x, const Tensor& w, Tensor& out) {
  int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  dispatch_float(x.dtype(), "depthwise_conv3x3", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    std::vector<X> taps = taps_of(w.data<X>(), C);
    conv3x3_channels_last(x.data<X>(), taps.data(), B, H, W, C, +1, out.data<X>());
  });
}

// gx = the transposed correlation of gout;  gw[c,ky,kx] = Σ_{b,y,x} gout[b,y,x,c]·x[b, y+ky-1, x+kx-1, c].
void depthwise_conv3x3_backward(const Tensor& gout, const Tensor& x, const Tensor& w, Tensor& gx, Tensor& gw) {
  int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  dispatch_float(x.dtype(), "depthwise_conv3x3_backward", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    const X *pg = gout.data<X>(), *px = x.data<X>();
    if (gx.defined()) {
      std::vector<X> taps = taps_of(w.data<X>(), C);
      conv3x3_channels_last(pg, taps.data(), B, H, W, C, -1, gx.data<X>());
    }
    if (!gw.defined()) return;
    auto row = [&](int64_t by, double* acc) {  // acc: taps [9, C]
      int64_t b = by / H, y = by % H;
      for (int64_t xo = 0; xo < W; ++xo) {
        const X* g = pg + (by * W + xo) * C;
        for (int64_t k = 0; k < 9; ++k) {
          int64_t yy = y + k / 3 - 1, xx = xo + k % 3 - 1;
          if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
          const X* in = px + ((b * H + yy) * W + xx) * C;
          double* a = acc + k * C;
          for (int64_t c = 0; c < C; ++c) a[c] += g[c] * in[c];
        }
      }
    };
    std::vector<double> taps = rows_with_partial_sums(B * H, 9 * C, use_threads(B * H * W * C), row);
    X* pw = gw.data<X>();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < 9; ++k) pw[c * 9 + k] = (X)taps[k * C + c];
  });
}

// ---- adaptive_avg_pool2d, torch's bins: output i averages inputs [floor(i·H/out), ceil((i+1)·H/out)).
// Bins may overlap (5 -> 3), so the backward gathers, for every input position, the bins that contain it:
// race-free across rows.
namespace {

struct Bins {
  std::vector<int64_t> start, end;  // per output index
  std::vector<int64_t> first, last;  // per input index: the bins containing it, first..last
};

Bins bins_of(int64_t in, int64_t out) {
  Bins b{std::vector<int64_t>(out), std::vector<int64_t>(out), std::vector<int64_t>(in, out), std::vector<int64_t>(in, -1)};
  for (int64_t i = 0; i < out; ++i) {
    b.start[i] = i * in / out;
    b.end[i] = ((i + 1) * in + out - 1) / out;
    for (int64_t y = b.start[i]; y < b.end[i]; ++y) {
      b.first[y] = std::min(b.first[y], i);
      b.last[y] = std::max(b.last[y], i);
    }
  }
  return b;
}

}  // namespace

void adaptive_avg_pool2d(const Tensor& x, Tensor& out) {
  int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), OH = out.size(1), OW = out.size(2);
  Bins rows = bins_of(H, OH), cols = bins_of(W, OW);
  dispatch_float(x.dtype(), "adaptive_avg_pool2d", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    const X* px = x.data<X>();
    X* po = out.data<X>();
    parallel_for(B * OH, use_threads(B * H * W * C), [&](int64_t bi) {
      int64_t b = bi / OH, i = bi % OH;
      std::vector<double> acc(C);
      for (int64_t j = 0; j < OW; ++j) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t y = rows.start[i]; y < rows.end[i]; ++y)
          for (int64_t xx = cols.start[j]; xx < cols.end[j]; ++xx) {
            const X* in = px + ((b * H + y) * W + xx) * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += in[c];
          }
        double inv = 1.0 / ((rows.end[i] - rows.start[i]) * (cols.end[j] - cols.start[j]));
        X* o = po + (bi * OW + j) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = (X)(acc[c] * inv);
      }
    });
  });
}

// gx[b,y,x,:] = Σ over bins (i, j) containing (y, x) of gout[b,i,j,:] / |bin (i, j)|.
void adaptive_avg_pool2d_backward(const Tensor& gout, Tensor& gx) {
  int64_t B = gx.size(0), H = gx.size(1), W = gx.size(2), C = gx.size(3), OH = gout.size(1), OW = gout.size(2);
  Bins rows = bins_of(H, OH), cols = bins_of(W, OW);
  dispatch_float(gx.dtype(), "adaptive_avg_pool2d_backward", [&](auto tag_) {
    using X = typename decltype(tag_)::type;
    const X* pg = gout.data<X>();
    X* po = gx.data<X>();
    parallel_for(B * H, use_threads(B * H * W * C), [&](int64_t by) {
      int64_t b = by / H, y = by % H;
      for (int64_t x = 0; x < W; ++x) {
        X* o = po + (by * W + x) * C;
        std::fill(o, o + C, X(0));
        for (int64_t i = rows.first[y]; i <= rows.last[y]; ++i)
          for (int64_t j = cols.first[x]; j <= cols.last[x]; ++j) {
            X inv = X(1) / X((rows.end[i] - rows.start[i]) * (cols.end[j] - cols.start[j]));
            const X* g = pg + ((b * OH + i) * OW + j) * C;
            for (int64_t c = 0; c < C; ++c) o[c] += g[c] * inv;
          }
      }
    });
  });
}

}  // namespace psa::cpu
