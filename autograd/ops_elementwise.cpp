// Elementwise ops with broadcasting. Gradient rules:
//   add: ga = g, gb = g;  sub: gb = -g;  mul: ga = g·b, gb = g·a;  div: ga = g/b, gb = -g·a/b²
// each summed back to the input's shape (sum_to) when it was broadcast. Unary ops: gx = g·f'(x), with the
// derivative computed by the kernel from x and the saved output y. swiglu(gate, up) = silu(gate)·up:
//   g_gate = g·up·silu'(gate), g_up = g·silu(gate)  (saves gate and up; the sigmoid is recomputed)
// bias_act(x, bias, act) = act(x + bias):  gx = g·act'(x + bias), gbias = Σ_rows gx
#include "autograd/op_util.h"
#include "tensor/dispatch.h"

namespace psa {
namespace {

using cpu::BinaryOp;
using cpu::UnaryOp;

Tensor binary_forward(const char* op, BinaryOp kind, const Tensor& a, const Tensor& b) {
  check_float_operands(op, a, "a", b, "b");
  Tensor out = Tensor::empty(broadcast_shape(op, a.shape(), b.shape()), a.dtype(), a.device());
  PSA_KERNEL(out.device(), binary)(kind, a, b, out);
  return out;
}

Tensor unary_forward(const char* op, UnaryOp kind, const Tensor& x, double param) {
  check_defined(op, x, "input");
  check_float(op, x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  PSA_KERNEL(out.device(), unary)(kind, x, param, out);
  return out;
}

Tensor unary_grad(UnaryOp kind, const Tensor& x, const Tensor& y, const Tensor& g, double param) {
  Tensor gx = Tensor::empty(x.shape(), x.dtype(), x.device());
  PSA_KERNEL(gx.device(), unary_backward)(kind, x, y, g, param, gx);
  return gx;
}

// One op per unary kind; the output is saved detached so the node does not keep itself alive.
Tensor unary_op(const char* op, UnaryOp kind, const Tensor& x, double param = 0) {
  Tensor y = unary_forward(op, kind, x, param);
  Tensor xs = x.detach(), ys = y.detach();
  return record(op, y, {x}, [=](const Tensor& g) -> Grads { return {unary_grad(kind, xs, ys, g, param)}; }, {xs, ys});
}

// The activations a config may name (HF's hidden_act), each with its op and kernel kind.
struct Activation {
  const char* name;
  const char* op;
  UnaryOp kind;
};

const Activation& find_activation(const std::string& name) {
  static const Activation table[] = {
      {"gelu", "gelu", UnaryOp::gelu},  {"quick_gelu", "quick_gelu", UnaryOp::quick_gelu},
      {"silu", "silu", UnaryOp::silu},  {"swish", "silu", UnaryOp::silu},
      {"relu", "relu", UnaryOp::relu},  {"tanh", "tanh", UnaryOp::tanh},
      {"sigmoid", "sigmoid", UnaryOp::sigmoid},
  };
  for (const Activation& a : table)
    if (name == a.name) return a;
  fail("activation: unknown activation '", name, "' (known: gelu, quick_gelu, silu, swish, relu, tanh, sigmoid)");
}

}  // namespace

Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("add", BinaryOp::add, a, b);
  Shape sa = a.shape(), sb = b.shape();
  return record("add", out, {a, b}, [=](const Tensor& g) -> Grads { return {sum_to(g, sa), sum_to(g, sb)}; });
}

Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("sub", BinaryOp::sub, a, b);
  Shape sa = a.shape(), sb = b.shape();
  return record("sub", out, {a, b}, [=](const Tensor& g) -> Grads { return {sum_to(g, sa), sum_to(neg(g), sb)}; });
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("mul", BinaryOp::mul, a, b);
  bool need_a = a.requires_grad(), need_b = b.requires_grad();
  Tensor as = need_b ? a.detach() : Tensor(), bs = need_a ? b.detach() : Tensor();  // each only for the other's grad
  Shape sa = a.shape(), sb = b.shape();
  return record("mul", out, {a, b}, [=](const Tensor& g) -> Grads {
    return {need_a ? sum_to(mul(g, bs), sa) : Tensor(), need_b ? sum_to(mul(g, as), sb) : Tensor()};
  }, {as, bs});
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("div", BinaryOp::div, a, b);
  Tensor bs = b.detach(), outs = out.detach();
  Shape sa = a.shape();
  bool need_b = b.requires_grad();
  return record("div", out, {a, b}, [=](const Tensor& g) -> Grads {
    Tensor ga = div(g, bs);
    return {sum_to(ga, sa), need_b ? sum_to(neg(mul(ga, outs)), bs.shape()) : Tensor()};
  }, {bs, outs});
}

Tensor add_scalar(const Tensor& a, double s) { return unary_op("add_scalar", UnaryOp::add_scalar, a, s); }
Tensor mul_scalar(const Tensor& a, double s) { return unary_op("mul_scalar", UnaryOp::mul_scalar, a, s); }
Tensor neg(const Tensor& a) { return unary_op("neg", UnaryOp::neg, a); }
Tensor exp(const Tensor& a) { return unary_op("exp", UnaryOp::exp, a); }
Tensor log(const Tensor& a) { return unary_op("log", UnaryOp::log, a); }
Tensor sqrt(const Tensor& a) { return unary_op("sqrt", UnaryOp::sqrt, a); }
Tensor rsqrt(const Tensor& a) { return unary_op("rsqrt", UnaryOp::rsqrt, a); }
Tensor pow_scalar(const Tensor& a, double p) { return unary_op("pow_scalar", UnaryOp::pow, a, p); }
Tensor tanh(const Tensor& a) { return unary_op("tanh", UnaryOp::tanh, a); }
Tensor sigmoid(const Tensor& a) { return unary_op("sigmoid", UnaryOp::sigmoid, a); }
Tensor relu(const Tensor& a) { return unary_op("relu", UnaryOp::relu, a); }
Tensor gelu(const Tensor& a) { return unary_op("gelu", UnaryOp::gelu, a); }
Tensor quick_gelu(const Tensor& a) { return unary_op("quick_gelu", UnaryOp::quick_gelu, a); }
Tensor silu(const Tensor& a) { return unary_op("silu", UnaryOp::silu, a); }

// swiglu(gate, up) = silu(gate)·up in one kernel each way (Llama's MLP); gate and up have one shape.
Tensor swiglu(const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu";
  check_float_operands(op, gate, "gate", up, "up");
  PSA_CHECK(gate.shape() == up.shape(), op, ": gate ", shape_str(gate.shape()), " and up ", shape_str(up.shape()),
            " must have the same shape");
  Tensor out = Tensor::empty(gate.shape(), gate.dtype(), gate.device());
  PSA_KERNEL(out.device(), swiglu)(gate, up, out);
  Tensor gs = gate.detach(), us = up.detach();
  bool need_gate = needs_grad(gate), need_up = needs_grad(up);
  return record(op, out, {gate, up}, [=](const Tensor& g) -> Grads {
    Tensor g_gate = grad_buffer(need_gate, gs.shape(), gs), g_up = grad_buffer(need_up, us.shape(), us);
    PSA_KERNEL(g.device(), swiglu_backward)(gs, us, g, g_gate, g_up);
    return {g_gate, g_up};
  }, {gs, us});
}

Tensor activation(const Tensor& a, const std::string& name) {
  const Activation& act = find_activation(name);
  return unary_op(act.op, act.kind, a);
}

// bias_act(x [..., N], bias [N], act) = act(x + bias): a Linear's bias add and its activation in one kernel each
// way. Saves x and bias only: the backward recomputes z = x + bias, and act(z) where the derivative is written in
// terms of it (tanh, sigmoid), where add + activation save z and the output.
Tensor bias_act(const Tensor& x, const Tensor& bias, const std::string& act) {
  const char* op = "bias_act";
  UnaryOp kind = find_activation(act).kind;
  check_float_operands(op, x, "input", bias, "bias");
  PSA_CHECK(x.dim() >= 1 && bias.dim() == 1 && x.size(-1) == bias.size(0), op, ": input ", shape_str(x.shape()),
            " and bias ", shape_str(bias.shape()), ": the bias must be [N] for an input [..., N]");
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  PSA_KERNEL(out.device(), bias_act)(kind, x, bias, out);
  Tensor xs = x.detach(), bs = bias.detach();
  bool need_x = needs_grad(x), need_bias = needs_grad(bias);
  return record(op, out, {x, bias}, [=](const Tensor& g) -> Grads {
    Tensor gx = Tensor::empty(xs.shape(), xs.dtype(), xs.device());  // gbias sums it: written even if x needs none
    Tensor gbias = grad_buffer(need_bias, bs.shape(), bs);
    PSA_KERNEL(g.device(), bias_act_backward)(kind, xs, bs, g, gx, gbias);
    return {need_x ? gx : Tensor(), gbias};
  }, {xs, bs});
}

}  // namespace psa
