// Op cases for patch_conv, depthwise_conv3x3 and adaptive_avg_pool2d with naive f64 references (see op_harness.h):
// odd channel counts and grids, non-square images, overlapping pooling bins (5 -> 3) and uneven ones (5 -> 2x4).
#include <cmath>

#include "op_harness.h"

namespace psa::test {
namespace {

// ---- patch_conv: out[b,o,i,j] = bias[o] + Σ_{c,ky,kx} x[b,c,i·p+ky,j·p+kx]·w[o,c,ky,kx].
Tensor ref_patch_conv(const Inputs& in) {
  const Tensor &x = in[0], &w = in[1];
  int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = w.size(0), p = w.size(2);
  Tensor out = empty64({B, O, H / p, W / p});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < H / p; ++i)
        for (int64_t j = 0; j < W / p; ++j) {
          double acc = in.size() > 2 ? cd(in[2])[o] : 0;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t ky = 0; ky < p; ++ky)
              for (int64_t kx = 0; kx < p; ++kx)
                acc += cd(x)[((b * C + c) * H + i * p + ky) * W + j * p + kx] * cd(w)[((o * C + c) * p + ky) * p + kx];
          md(out)[((b * O + o) * (H / p) + i) * (W / p) + j] = acc;
        }
  return out;
}

// ---- depthwise_conv3x3, padding 1, x [B,H,W,C], w [C,1,3,3].
Tensor ref_depthwise(const Tensor& x, const Tensor& w) {
  int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  Tensor out = empty64(x.shape());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t xx = 0; xx < W; ++xx)
        for (int64_t c = 0; c < C; ++c) {
          double acc = 0;
          for (int64_t ky = 0; ky < 3; ++ky)
            for (int64_t kx = 0; kx < 3; ++kx) {
              int64_t sy = y + ky - 1, sx = xx + kx - 1;
              if (sy >= 0 && sy < H && sx >= 0 && sx < W)
                acc += cd(x)[((b * H + sy) * W + sx) * C + c] * cd(w)[c * 9 + ky * 3 + kx];
            }
          md(out)[((b * H + y) * W + xx) * C + c] = acc;
        }
  return out;
}

// ---- adaptive_avg_pool2d, x [B,H,W,C]: bin i covers [floor(i·H/out), ceil((i+1)·H/out)).
Tensor ref_pool(const Tensor& x, int64_t OH, int64_t OW) {
  int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  Tensor out = empty64({B, OH, OW, C});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < OH; ++i)
      for (int64_t j = 0; j < OW; ++j)
        for (int64_t c = 0; c < C; ++c) {
          int64_t y0 = (int64_t)std::floor((double)i * H / OH), y1 = (int64_t)std::ceil((double)(i + 1) * H / OH);
          int64_t x0 = (int64_t)std::floor((double)j * W / OW), x1 = (int64_t)std::ceil((double)(j + 1) * W / OW);
          double acc = 0;
          for (int64_t y = y0; y < y1; ++y)
            for (int64_t xx = x0; xx < x1; ++xx) acc += cd(x)[((b * H + y) * W + xx) * C + c];
          md(out)[((b * OH + i) * OW + j) * C + c] = acc / ((y1 - y0) * (x1 - x0));
        }
  return out;
}

std::vector<OpCase> conv_cases() {
  OpCase pc;
  pc.op = "patch_conv";
  pc.shapes = {{{2, 3, 8, 8}, {5, 3, 4, 4}, {5}}, {{1, 2, 6, 9}, {4, 2, 3, 3}}, {{2, 1, 2, 2}, {3, 1, 1, 1}, {3}}};
  pc.run = [](const Inputs& in) { return patch_conv(in[0], in[1], in.size() > 2 ? in[2] : Tensor()); };
  pc.reference = ref_patch_conv;
  OpCase dw;
  dw.op = "depthwise_conv3x3";
  // B·H = 21 in the last: the CUDA weight gradient's partial sums over chunks of 16 rows, the last one partial.
  dw.shapes = {{{2, 5, 5, 3}, {3, 1, 3, 3}}, {{1, 4, 6, 8}, {8, 1, 3, 3}}, {{1, 1, 1, 2}, {2, 1, 3, 3}},
               {{3, 7, 5, 4}, {4, 1, 3, 3}}};
  dw.run = [](const Inputs& in) { return depthwise_conv3x3(in[0], in[1]); };
  dw.reference = [](const Inputs& in) { return ref_depthwise(in[0], in[1]); };
  std::vector<OpCase> v{pc, dw};
  struct Pool { Shape x; int64_t oh, ow; };
  for (Pool p : {Pool{{2, 5, 5, 3}, 3, 3}, Pool{{1, 5, 5, 2}, 2, 4}, Pool{{1, 6, 4, 3}, 3, 2}, Pool{{1, 3, 3, 2}, 3, 3},
                 Pool{{1, 2, 3, 1}, 4, 5}}) {
    OpCase c;
    c.op = "adaptive_avg_pool2d";
    c.shapes = {{p.x}};
    c.run = [p](const Inputs& in) { return adaptive_avg_pool2d(in[0], p.oh, p.ow); };
    c.reference = [p](const Inputs& in) { return ref_pool(in[0], p.oh, p.ow); };
    v.push_back(c);
  }
  return v;
}

const bool registered = register_cases(conv_cases());

}  // namespace
}  // namespace psa::test
