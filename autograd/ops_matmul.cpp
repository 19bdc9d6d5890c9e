// matmul, linear and linear_act. With C = op(A)·op(B):  d op(A) = dC·op(B)ᵀ,  d op(B) = op(A)ᵀ·dC, written back in the
// stored layout of each operand, so the backward pass is two more matmuls with transpose flags and no copies.
// A shared 2-D right operand (weights) folds the batch into M: one large GEMM instead of many small ones.
#include "autograd/op_util.h"
#include "tensor/dispatch.h"

namespace psa {

Tensor matmul(const Tensor& a, const Tensor& b, bool ta, bool tb) {
  const char* op = "matmul";
  check_float_operands(op, a, "a", b, "b");
  PSA_CHECK(a.dim() >= 2 && b.dim() >= 2, op, ": ", shape_str(a.shape()), " x ", shape_str(b.shape()),
            ": both operands need at least 2 dims");
  if (b.dim() == 2 && a.dim() > 2 && !ta) {  // fold the batch of a into its rows
    Shape out_shape(a.shape().begin(), a.shape().end() - 1);
    Tensor out2 = matmul(reshape(a, {-1, a.size(-1)}), b, false, tb);
    out_shape.push_back(out2.size(1));
    return reshape(out2, out_shape);
  }
  int64_t M = ta ? a.size(-1) : a.size(-2), Ka = ta ? a.size(-2) : a.size(-1);
  int64_t Kb = tb ? b.size(-1) : b.size(-2), N = tb ? b.size(-2) : b.size(-1);
  PSA_CHECK(Ka == Kb, op, ": ", shape_str(a.shape()), (ta ? "ᵀ" : ""), " x ", shape_str(b.shape()), (tb ? "ᵀ" : ""),
            ": inner dims ", Ka, " != ", Kb);
  Shape batch_a(a.shape().begin(), a.shape().end() - 2), batch_b(b.shape().begin(), b.shape().end() - 2);
  PSA_CHECK(batch_a == batch_b || batch_a.empty() || batch_b.empty(), op, ": ", shape_str(a.shape()), " x ",
            shape_str(b.shape()), ": batch dims differ");
  Shape out_shape = batch_a.empty() ? batch_b : batch_a;
  int64_t batch = shape_numel(out_shape);
  out_shape.push_back(M);
  out_shape.push_back(N);
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  int64_t stride_a = batch_a.empty() ? 0 : M * Ka, stride_b = batch_b.empty() ? 0 : Ka * N;
  PSA_KERNEL(out.device(), matmul)(a, b, ta, tb, batch, M, N, Ka, stride_a, stride_b, out, 0.0f);
  profile::add_flops(2.0 * batch * M * N * Ka);  // the backward's GEMMs are matmul calls: counted there
  // Saved: b for a's gradient, a for b's, only when that gradient is needed (a frozen layer keeps no input).
  bool need_a = a.requires_grad(), need_b = b.requires_grad();
  Tensor as = need_b ? a.detach() : Tensor(), bs = need_a ? b.detach() : Tensor();
  Shape sa = a.shape(), sb = b.shape();
  return record(op, out, {a, b}, [=](const Tensor& g) -> Grads {
    Tensor ga, gb;
    if (need_a) ga = sum_to(ta ? matmul(bs, g, tb, true) : matmul(g, bs, false, !tb), sa);
    if (need_b) gb = sum_to(tb ? matmul(g, as, true, ta) : matmul(as, g, !ta, false), sb);
    return {ga, gb};
  }, {as, bs});
}

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias) {
  check_defined("linear", x, "input");
  check_rank("linear", w, 2, "weight");
  PSA_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "linear: input ", shape_str(x.shape()), " x weight ",
            shape_str(w.shape()), ": in_features ", x.dim() ? x.size(-1) : 0, " != ", w.size(1));
  Tensor x2 = x.dim() == 1 ? reshape(x, {1, x.size(0)}) : x;
  Tensor y = matmul(x2, w, false, true);
  if (bias.defined()) {
    PSA_CHECK(bias.dim() == 1 && bias.size(0) == w.size(0), "linear: bias ", shape_str(bias.shape()),
              " for weight ", shape_str(w.shape()));
    y = add(y, bias);
  }
  return x.dim() == 1 ? reshape(y, {w.size(0)}) : y;
}

Tensor linear_act(const Tensor& x, const Tensor& w, const Tensor& bias, const std::string& act) {
  if (!bias.defined()) return activation(linear(x, w), act);
  return bias_act(linear(x, w), bias, act);
}

}  // namespace psa
