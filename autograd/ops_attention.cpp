// Rotary position embedding and scaled dot-product attention (kernels: tensor/cpu/attention.cpp).
// Gradient rules:
//   rope: out = x·cos + R x·sin with R = rotate_half (Rᵀ = -R)  ->  gx = g·cos + Rᵀ(g·sin); cos/sin are constants.
//         x and out [B,T,H,D] (a projection split into heads).
//   attention: P = softmax(scale·QKᵀ + mask), O = PV  ->  dV = PᵀdO, dS = P∘(dP - rowsum(dP∘P)) with dP = dO Vᵀ,
//              dQ = scale·dS K, dK = scale·dSᵀQ, summed over the query heads sharing a kv head (saves P).
//              The mask is a constant.
#include <cmath>

#include "autograd/op_util.h"
#include "tensor/dispatch.h"

namespace psa {
namespace {

// Tables and masks are inputs the ops do not differentiate: refuse rather than silently drop a gradient.
void check_constant(const char* op, const Tensor& t, const char* what) {
  PSA_CHECK(!(grad_enabled() && t.requires_grad()), op, ": ", what, " ", shape_str(t.shape()),
            " requires grad, but it is treated as a constant (detach it)");
}

void check_operand(const char* op, const Tensor& ref, const Tensor& t, const char* what) {
  check_defined(op, t, what);
  check_same_device(op, ref, t);
  check_same_dtype(op, ref, t);
  check_rank(op, t, ref.dim(), what);
}

}  // namespace

Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const char* op = "rope";
  check_defined(op, x, "x");
  check_float(op, x);
  check_rank(op, x, 4, "x [B,T,H,D]");
  check_defined(op, cos, "cos");
  check_defined(op, sin, "sin");
  for (const Tensor* table : {&cos, &sin}) {
    check_same_device(op, x, *table);
    check_same_dtype(op, x, *table);
  }
  int64_t T = x.size(1), D = x.size(3);
  PSA_CHECK(D % 2 == 0, op, ": x ", shape_str(x.shape()), ": head dim ", D, " must be even to rotate halves");
  PSA_CHECK(cos.shape() == Shape({T, D}) && sin.shape() == Shape({T, D}), op, ": x ", shape_str(x.shape()),
            " with cos ", shape_str(cos.shape()), " and sin ", shape_str(sin.shape()), ": want tables [", T, ",", D,
            "]");
  check_constant(op, cos, "cos");
  check_constant(op, sin, "sin");
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  PSA_KERNEL(out.device(), rope)(x, cos, sin, out);
  Tensor cs = cos.detach(), sn = sin.detach();
  Shape x_shape = x.shape();
  return record(op, out, {x}, [=](const Tensor& g) -> Grads {
    Tensor gx = Tensor::empty(x_shape, g.dtype(), g.device());
    PSA_KERNEL(gx.device(), rope_backward)(g, cs, sn, gx);
    return {gx};
  }, {cs, sn});
}

namespace {

// q [B,T,H,D], k = v [B,S,Hkv,D], H % Hkv == 0; mask [T,S] or [B|1, H|1, T, S].
void check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
  const char* op = "attention";
  check_defined(op, q, "q");
  check_float(op, q);
  check_rank(op, q, 4, "q [B,T,H,D]");
  check_operand(op, q, k, "k [B,S,Hkv,D]");
  check_operand(op, q, v, "v [B,S,Hkv,D]");
  std::string qk = str_cat("q ", shape_str(q.shape()), " and k ", shape_str(k.shape()));
  PSA_CHECK(k.shape() == v.shape(), op, ": k ", shape_str(k.shape()), " and v ", shape_str(v.shape()), " differ");
  PSA_CHECK(q.size(0) == k.size(0), op, ": ", qk, ": batch ", q.size(0), " != ", k.size(0));
  PSA_CHECK(q.size(3) == k.size(3), op, ": ", qk, ": head dims ", q.size(3), " != ", k.size(3));
  PSA_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op, ": ", qk, ": ", q.size(2),
            " query heads not divisible by ", k.size(2), " kv heads");
  if (!mask.defined()) return;
  check_same_device(op, q, mask);
  check_same_dtype(op, q, mask);
  int64_t B = q.size(0), T = q.size(1), H = q.size(2), S = k.size(1);
  const Shape& m = mask.shape();
  bool fits = (m == Shape{T, S}) || (m.size() == 4 && (m[0] == 1 || m[0] == B) && (m[1] == 1 || m[1] == H) &&
                                     m[2] == T && m[3] == S);
  PSA_CHECK(fits, op, ": mask ", shape_str(m), " does not fit scores [", B, ",", H, ",", T, ",", S, "] of ", qk,
            " (want [T,S] or [B|1,H|1,T,S])");
  check_constant(op, mask, "mask");
}

}  // namespace

// The CPU keeps the probabilities P [B, H, T, S] for the backward. CUDA runs flash-style: it keeps only the row
// log-sum-exp [B, H, T] and the output, and its backward recomputes P tile by tile (tensor/cuda/attention.cu),
// so the two devices save different tensors and this op is the one place that branches on the device.
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, const Tensor& mask, double scale) {
  const char* op = "attention";
  check_attention(q, k, v, mask);
  if (scale == 0) scale = 1.0 / std::sqrt((double)q.size(3));
  Tensor qs = q.detach(), ks = k.detach(), vs = v.detach();
  bool need_q = q.requires_grad(), need_k = k.requires_grad(), need_v = v.requires_grad();
  auto grads_like = [=]() -> Grads {
    return {grad_buffer(need_q, qs.shape(), qs), grad_buffer(need_k, ks.shape(), ks),
            grad_buffer(need_v, vs.shape(), vs)};
  };
  Tensor out = Tensor::empty(q.shape(), q.dtype(), q.device());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), S = k.size(1);
  const double products = 2.0 * B * H * T * S * q.size(3);  // one T x S x D GEMM
  profile::add_flops(2 * products);  // QKᵀ and PV
  if (q.device() == Device::cuda) {
#ifdef PSA_CUDA
    Tensor lse = Tensor::empty({B, H, T}, q.dtype(), q.device());
    profile::timed("attention", &cuda::attention)(q, k, v, mask, causal, scale, out, lse);
    Tensor os = out.detach(), ms = mask.defined() ? mask.detach() : Tensor();
    return record(op, out, {q, k, v}, [=](const Tensor& g) -> Grads {
      Grads gr = grads_like();
      profile::add_flops(4 * products);  // dV, dP, dQ, dK
      profile::timed("attention_backward", &cuda::attention_backward)(g, qs, ks, vs, os, lse, ms, causal, scale,
                                                                      gr[0], gr[1], gr[2]);
      return gr;
    }, {qs, ks, vs, os, ms});
#else
    no_cuda_kernel(op);
#endif
  }
  Tensor probs = Tensor::empty({B, H, T, S}, q.dtype(), q.device());
  profile::timed("attention", &cpu::attention)(q, k, v, mask, causal, scale, out, probs);
  return record(op, out, {q, k, v}, [=](const Tensor& g) -> Grads {
    Grads gr = grads_like();
    profile::add_flops(4 * products);  // dV, dP, dQ, dK
    profile::timed("attention_backward", &cpu::attention_backward)(g, qs, ks, vs, probs, causal, scale, gr[0], gr[1],
                                                                   gr[2]);
    return gr;
  }, {qs, ks, vs});
}

}  // namespace psa
