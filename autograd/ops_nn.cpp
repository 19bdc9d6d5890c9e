// Normalisation, softmax, losses and dropout: one fused kernel each way (tensor/cpu/nn.cpp). Gradient rules:
//   layer_norm: xhat = (x-mean)·rstd, gxhat = g·w;  gx = rstd·(gxhat - mean(gxhat) - xhat·mean(gxhat·xhat)),
//               gw = Σ g·xhat, gb = Σ g  (saves mean, rstd per row)
//   rms_norm:   xhat = x·rstd;  gx = rstd·(gxhat - xhat·mean(gxhat·xhat)), gw = Σ g·xhat  (saves rstd per row)
//   softmax:    gx = y·(g - Σ g·y);  log_softmax: gx = g - exp(y)·Σ g  (saves y)
//   cross_entropy: glogits = g/count·(softmax - onehot) on counted rows  (saves lse per row)
//   dropout:    gx = g·keep/(1-p), the same Philox mask recomputed
#include "autograd/op_util.h"
#include "tensor/dispatch.h"

namespace psa {
namespace {

// x [..., C] must have a non-empty last dim; an optional affine parameter must be [C] like x.
int64_t check_rows_input(const char* op, const Tensor& x) {
  check_defined(op, x, "input");
  check_float(op, x);
  PSA_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": input ", shape_str(x.shape()), " needs a non-empty last dim");
  return x.size(-1);
}

void check_affine(const char* op, const Tensor& x, const Tensor& p, const char* what) {
  if (!p.defined()) return;
  check_same_device(op, x, p);
  check_same_dtype(op, x, p);
  PSA_CHECK(p.dim() == 1 && p.size(0) == x.size(-1), op, ": ", what, " ", shape_str(p.shape()), " for input ",
            shape_str(x.shape()), ": want [", x.size(-1), "]");
}

}  // namespace

Tensor layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps) {
  const char* op = "layer_norm";
  int64_t C = check_rows_input(op, x);
  check_affine(op, x, w, "weight");
  check_affine(op, x, b, "bias");
  Shape stats_shape{x.numel() / C};
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor mean = Tensor::empty(stats_shape, x.dtype(), x.device()), rstd = Tensor::empty(stats_shape, x.dtype(), x.device());
  PSA_KERNEL(out.device(), layer_norm)(x, w, b, eps, out, mean, rstd);
  Tensor xs = x.detach(), ws = w.defined() ? w.detach() : Tensor();
  bool need_x = needs_grad(x), need_w = needs_grad(w), need_b = needs_grad(b);
  return record(op, out, {x, w, b}, [=](const Tensor& g) -> Grads {
    Tensor gx = grad_buffer(need_x, xs.shape(), xs), gw = grad_buffer(need_w, {C}, xs), gb = grad_buffer(need_b, {C}, xs);
    PSA_KERNEL(xs.device(), layer_norm_backward)(g, xs, ws, mean, rstd, gx, gw, gb);
    return {gx, gw, gb};
  }, {xs, ws});
}

Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  const char* op = "rms_norm";
  int64_t C = check_rows_input(op, x);
  check_affine(op, x, w, "weight");
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor rstd = Tensor::empty({x.numel() / C}, x.dtype(), x.device());
  PSA_KERNEL(out.device(), rms_norm)(x, w, eps, out, rstd);
  Tensor xs = x.detach(), ws = w.defined() ? w.detach() : Tensor();
  bool need_x = needs_grad(x), need_w = needs_grad(w);
  return record(op, out, {x, w}, [=](const Tensor& g) -> Grads {
    Tensor gx = grad_buffer(need_x, xs.shape(), xs), gw = grad_buffer(need_w, {C}, xs);
    PSA_KERNEL(xs.device(), rms_norm_backward)(g, xs, ws, rstd, gx, gw);
    return {gx, gw};
  }, {xs, ws});
}

namespace {

// softmax and log_softmax share everything but the flag; the output is saved detached (no self-reference).
Tensor softmax_op(const char* op, const Tensor& x, int64_t dim, bool log) {
  check_defined(op, x, "input");
  check_float(op, x);
  PSA_CHECK(x.dim() >= 1, op, ": input ", shape_str(x.shape()), " has no dim ", dim);
  int64_t d = normalize_dim(op, dim, x.dim());
  DimSplit sp = split_at(x.shape(), d);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  PSA_KERNEL(y.device(), softmax)(x, sp.outer, sp.n, sp.inner, log, y);
  Tensor ys = y.detach();
  return record(op, y, {x}, [=](const Tensor& g) -> Grads {
    Tensor gx = Tensor::empty(ys.shape(), ys.dtype(), ys.device());
    PSA_KERNEL(gx.device(), softmax_backward)(g, ys, sp.outer, sp.n, sp.inner, log, gx);
    return {gx};
  }, {ys});
}

// Targets must be i64 [N] on the host, each in [0, V) or ignore_index; returns how many count.
int64_t count_targets(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  const char* op = "cross_entropy";
  std::string shapes = str_cat("logits ", shape_str(logits.shape()), " and targets ", shape_str(targets.shape()));
  PSA_CHECK(targets.dtype() == DType::i64, op, ": ", shapes, ": targets must be i64, got ", dtype_name(targets.dtype()));
  PSA_CHECK(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": ", shapes,
            ": want logits [N,V] and targets [N]");
  PSA_CHECK(logits.size(1) > 0, op, ": ", shapes, ": empty vocabulary");
  check_same_device(op, logits, targets);
  Tensor host = targets.to(Device::cpu);  // a few ids: counted and validated on the host on either device
  const int64_t* t = host.data<int64_t>();
  int64_t V = logits.size(1), count = 0;
  for (int64_t i = 0; i < targets.numel(); ++i) {
    if (t[i] == ignore_index) continue;
    PSA_CHECK(t[i] >= 0 && t[i] < V, op, ": ", shapes, ": target ", t[i], " at row ", i, " is out of [0,", V,
              ") and not ignore_index ", ignore_index);
    ++count;
  }
  return count;
}

}  // namespace

Tensor softmax(const Tensor& x, int64_t dim) { return softmax_op("softmax", x, dim, false); }
Tensor log_softmax(const Tensor& x, int64_t dim) { return softmax_op("log_softmax", x, dim, true); }

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  const char* op = "cross_entropy";
  check_defined(op, logits, "logits");
  check_defined(op, targets, "targets");
  check_float(op, logits);
  int64_t count = count_targets(logits, targets, ignore_index);
  Tensor loss = Tensor::empty({}, logits.dtype(), logits.device());
  Tensor lse = Tensor::empty({logits.size(0)}, logits.dtype(), logits.device());
  PSA_KERNEL(loss.device(), cross_entropy)(logits, targets, ignore_index, count, loss, lse);
  Tensor xs = logits.detach();
  return record(op, loss, {logits, targets}, [=](const Tensor& g) -> Grads {
    Tensor gx = Tensor::empty(xs.shape(), xs.dtype(), xs.device());
    PSA_KERNEL(gx.device(), cross_entropy_backward)(g, xs, targets, lse, ignore_index, count, gx);
    return {gx, Tensor()};
  }, {xs, targets});
}

Tensor dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset) {
  const char* op = "dropout";
  check_defined(op, x, "input");
  check_float(op, x);
  PSA_CHECK(p >= 0 && p <= 1, op, ": p = ", p, " outside [0, 1] for input ", shape_str(x.shape()));
  if (p == 0) return x;
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  PSA_KERNEL(out.device(), dropout)(x, p, seed, offset, out);
  return record(op, out, {x}, [=](const Tensor& g) -> Grads {
    Tensor gx = Tensor::empty(g.shape(), g.dtype(), g.device());
    PSA_KERNEL(gx.device(), dropout)(g, p, seed, offset, gx);
    return {gx};
  });
}

}  // namespace psa
