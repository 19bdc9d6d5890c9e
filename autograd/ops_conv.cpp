// Convolutions and pooling of the vision side (kernels: tensor/cpu/conv.cpp). Gradient rules:
//   patch_conv: out_b = w · cols_bᵀ + bias  ->  gw = Σ_b g_b · cols_b, gcols_b = g_bᵀ · w (col2im -> gx),
//               gbias = Σ g  (saves x; cols are rebuilt)
//   depthwise_conv3x3: gx = the transposed 3x3 correlation of g, gw[c,k] = Σ g·shifted x  (saves x, w)
//   adaptive_avg_pool2d: every input gets g/|bin| from each bin containing it  (saves nothing)
#include "autograd/op_util.h"
#include "tensor/dispatch.h"

namespace psa {
namespace {

void check_pair(const char* op, const Tensor& x, const Tensor& w) {
  check_defined(op, x, "x");
  check_defined(op, w, "w");
  check_float(op, x);
  check_same_device(op, x, w);
  check_same_dtype(op, x, w);
}

// x [B,C,H,W], w [O,C,p,p] with p dividing H and W, bias [O].
void check_patch_conv(const Tensor& x, const Tensor& w, const Tensor& bias) {
  const char* op = "patch_conv";
  check_pair(op, x, w);
  std::string xw = str_cat("x ", shape_str(x.shape()), " and w ", shape_str(w.shape()));
  PSA_CHECK(x.dim() == 4 && w.dim() == 4, op, ": ", xw, ": want x [B,C,H,W] and w [O,C,p,p]");
  int64_t p = w.size(2);
  PSA_CHECK(p > 0 && w.size(3) == p, op, ": ", xw, ": kernel must be square and non-empty");
  PSA_CHECK(w.size(1) == x.size(1), op, ": ", xw, ": channels ", x.size(1), " != ", w.size(1));
  PSA_CHECK(x.size(2) % p == 0 && x.size(3) % p == 0, op, ": ", xw, ": H ", x.size(2), " and W ", x.size(3),
            " not divisible by patch ", p);
  if (!bias.defined()) return;
  check_same_device(op, x, bias);
  check_same_dtype(op, x, bias);
  PSA_CHECK(bias.dim() == 1 && bias.size(0) == w.size(0), op, ": bias ", shape_str(bias.shape()), " for w ",
            shape_str(w.shape()), ": want [", w.size(0), "]");
}

}  // namespace

Tensor patch_conv(const Tensor& x, const Tensor& w, const Tensor& bias) {
  const char* op = "patch_conv";
  check_patch_conv(x, w, bias);
  int64_t p = w.size(2);
  Tensor out = Tensor::empty({x.size(0), w.size(0), x.size(2) / p, x.size(3) / p}, x.dtype(), x.device());
  PSA_KERNEL(out.device(), patch_conv)(x, w, bias, out);
  const double gemm = 2.0 * out.numel() * w.size(1) * p * p;  // out [B, O, L] = w [O, K] · cols [B, L, K]ᵀ
  profile::add_flops(gemm);
  Tensor xs = x.detach(), ws = w.detach();
  bool need_x = needs_grad(x), need_w = needs_grad(w), need_b = needs_grad(bias);
  return record(op, out, {x, w, bias}, [=](const Tensor& g) -> Grads {
    Tensor gx = grad_buffer(need_x, xs.shape(), xs), gw = grad_buffer(need_w, ws.shape(), ws);
    Tensor gb = need_b ? Tensor::empty({ws.size(0)}, ws.dtype(), ws.device()) : Tensor();
    profile::add_flops(gemm * (need_x + need_w));
    PSA_KERNEL(xs.device(), patch_conv_backward)(g, xs, ws, gx, gw, gb);
    return {gx, gw, gb};
  }, {xs, ws});
}

Tensor depthwise_conv3x3(const Tensor& x, const Tensor& w) {
  const char* op = "depthwise_conv3x3";
  check_pair(op, x, w);
  PSA_CHECK(x.dim() == 4 && w.shape() == Shape({x.size(3), 1, 3, 3}), op, ": x ", shape_str(x.shape()), " and w ",
            shape_str(w.shape()), ": want x [B,H,W,C] and w [C,1,3,3]");
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  PSA_KERNEL(out.device(), depthwise_conv3x3)(x, w, out);
  Tensor xs = x.detach(), ws = w.detach();
  bool need_x = needs_grad(x), need_w = needs_grad(w);
  return record(op, out, {x, w}, [=](const Tensor& g) -> Grads {
    Tensor gx = grad_buffer(need_x, xs.shape(), xs), gw = grad_buffer(need_w, ws.shape(), ws);
    PSA_KERNEL(xs.device(), depthwise_conv3x3_backward)(g, xs, ws, gx, gw);
    return {gx, gw};
  }, {xs, ws});
}

Tensor adaptive_avg_pool2d(const Tensor& x, int64_t out_h, int64_t out_w) {
  const char* op = "adaptive_avg_pool2d";
  check_defined(op, x, "x");
  check_float(op, x);
  check_rank(op, x, 4, "x [B,H,W,C]");
  PSA_CHECK(out_h > 0 && out_w > 0 && x.size(1) > 0 && x.size(2) > 0, op, ": x ", shape_str(x.shape()),
            " to ", out_h, "x", out_w, ": sizes must be positive");
  if (out_h == x.size(1) && out_w == x.size(2)) return x;  // every bin is one position
  Tensor out = Tensor::empty({x.size(0), out_h, out_w, x.size(3)}, x.dtype(), x.device());
  PSA_KERNEL(out.device(), adaptive_avg_pool2d)(x, out);
  Shape sx = x.shape();
  return record(op, out, {x}, [=](const Tensor& g) -> Grads {
    Tensor gx = Tensor::empty(sx, g.dtype(), g.device());
    PSA_KERNEL(gx.device(), adaptive_avg_pool2d_backward)(g, gx);
    return {gx};
  });
}

}  // namespace psa
