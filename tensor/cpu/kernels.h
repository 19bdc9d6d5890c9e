// CPU kernels. Each takes contiguous tensors already checked by the op in autograd/ and writes `out`, which the
// caller allocated. Templated over the scalar type inside; f32 for training, f64 for gradient checks.
#pragma once
#include "tensor/tensor.h"

namespace psa::cpu {

enum class BinaryOp { add, sub, mul, div };
enum class UnaryOp { neg, exp, log, sqrt, rsqrt, tanh, sigmoid, relu, gelu, quick_gelu, silu, pow, add_scalar, mul_scalar };

// elementwise.cpp
// out has the broadcast shape; it may be a itself when a, b and out have one shape (autograd sums gradients so)
void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out);
void unary(UnaryOp op, const Tensor& x, double param, Tensor& out);
// gx = gout * d op(x) / dx; y = op(x) is passed because some derivatives are cheaper from it
void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& gout, double param, Tensor& gx);
// Whether unary_backward reads y (the derivative is written in terms of op(x)); bias_act_backward, which has no
// saved output, recomputes y only for these ops.
inline bool derivative_reads_output(UnaryOp op) {
  return op == UnaryOp::exp || op == UnaryOp::sqrt || op == UnaryOp::rsqrt || op == UnaryOp::tanh ||
         op == UnaryOp::sigmoid;
}
// Llama's gated MLP activation, fused: out = silu(gate)·up (same shapes), and its backward
// g_gate = gout·up·silu'(gate), g_up = gout·silu(gate); an undefined g_gate / g_up is not computed.
void swiglu(const Tensor& gate, const Tensor& up, Tensor& out);
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& gout, Tensor& g_gate, Tensor& g_up);
// A Linear's bias add and activation, fused: x [rows, N] (any leading dims), bias [N], out = act(x + bias), act an
// activation kind (param-free: gelu, quick_gelu, silu, relu, tanh, sigmoid). The backward recomputes z = x + bias:
// gx = gout·act'(z) (always written) and gbias = Σ_rows gx (undefined: not computed), summed in double over fixed
// chunks of kBiasSumChunk rows and then chunk by chunk, so the result does not depend on the thread count (and the
// CUDA kernel, adding in the same order, gets the same sums from the same gx).
constexpr int64_t kBiasSumChunk = 64;
void bias_act(UnaryOp act, const Tensor& x, const Tensor& bias, Tensor& out);
void bias_act_backward(UnaryOp act, const Tensor& x, const Tensor& bias, const Tensor& gout, Tensor& gx, Tensor& gbias);

// reduce.cpp: a viewed as [outer, n, inner], reduced over n
void sum_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out);
void max_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out, Tensor& argmax);  // argmax i64
void max_backward(const Tensor& gout, const Tensor& argmax, int64_t outer, int64_t n, int64_t inner, Tensor& ga);
// out[i] = a[i mapped through broadcasting], out has shape `shape`
void broadcast_to(const Tensor& a, Tensor& out);

// shape.cpp
void permute(const Tensor& a, const std::vector<int64_t>& perm, Tensor& out);
// copy a [outer, n_a, inner] into out [outer, n_out, inner] at offset `at` along the middle dim (and back)
void copy_block(const Tensor& a, int64_t outer, int64_t n_a, int64_t inner, Tensor& out, int64_t n_out, int64_t at);
void extract_block(const Tensor& a, int64_t outer, int64_t n_a, int64_t inner, int64_t at, int64_t n_out, Tensor& out);
void index_select(const Tensor& a, int64_t outer, int64_t n, int64_t inner, const Tensor& index, Tensor& out);
void index_add(const Tensor& g, int64_t outer, int64_t n, int64_t inner, const Tensor& index, Tensor& ga);

// matmul.cpp: batched with broadcasting resolved by the caller into per-batch strides
void matmul(const Tensor& a, const Tensor& b, bool ta, bool tb, int64_t batch, int64_t M, int64_t N, int64_t K,
            int64_t stride_a, int64_t stride_b, Tensor& out, float beta = 0);

}  // namespace psa::cpu

// ==== optim.cpp: fused optimizer kernels (used by nn/optim.cpp). All update their tensors in place and are
// element-wise or block-wise, so results do not depend on the number of OpenMP threads.
namespace psa::cpu {

struct AdamWCoeffs {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;  // 1 on the first update; sets the bias corrections
};
// One parameter's AdamW update: p, g, m, v of one shape and floating dtype, with that parameter's coefficients
// (its own learning rate). One pass per element: decay p, update m and v, step p.
struct AdamWSlot {
  Tensor *p, *m, *v;
  const Tensor* g;
  AdamWCoeffs c;
};
// Every slot's update. On a GPU one launch per dtype covers them all (a model has hundreds of parameters, each
// a launch otherwise); the arithmetic per element is the same either way.
void adamw_steps(const std::vector<AdamWSlot>& slots);

struct SgdCoeffs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
  bool first_step;  // the momentum buffer starts as a copy of the first (decayed) gradient, as in torch
};
// buf is only read and written when momentum != 0.
void sgd_step(Tensor& p, const Tensor& g, Tensor& buf, const SgdCoeffs& c);

double sum_squares(const std::vector<Tensor>& xs);  // Σ over xs of Σ x², in double, in a fixed order
void scale_in_place(const std::vector<Tensor>& xs, double s);  // x *= s for each x (one launch on a GPU)

}  // namespace psa::cpu

// ---- nn.cpp, attention.cpp, conv.cpp: normalisation, losses, dropout, attention, convolutions ----------------
// Declared together so that ops_nn / ops_attention / ops_conv find their kernels in one place. Optional tensors
// (weights, biases, gradients nobody needs) may be undefined and are then skipped.
namespace psa::cpu {

// nn.cpp. x is viewed as [rows, C] over its last dim; mean/rstd are [rows] (saved for backward).
void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& out, Tensor& mean, Tensor& rstd);
void layer_norm_backward(const Tensor& gout, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                         Tensor& gx, Tensor& gw, Tensor& gb);
void rms_norm(const Tensor& x, const Tensor& w, double eps, Tensor& out, Tensor& rstd);
void rms_norm_backward(const Tensor& gout, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& gx, Tensor& gw);
// (log_)softmax over the middle dim of an [outer, n, inner] view; backward from the saved output y.
void softmax(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& out);
void softmax_backward(const Tensor& gout, const Tensor& y, int64_t outer, int64_t n, int64_t inner, bool log, Tensor& gx);
// logits [N, V], targets i64 [N] already validated; count = targets != ignore_index. loss [] and lse [N] out
// (lse is 0 on ignored rows: only the backward reads it).
void cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t count, Tensor& loss,
                   Tensor& lse);
void cross_entropy_backward(const Tensor& gout, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            int64_t ignore_index, int64_t count, Tensor& glogits);
// out = x·keep/(1-p) with keep = philox_keep(seed, offset, i, dropout_threshold(p)); also the backward (x = gout).
uint32_t dropout_threshold(double p);
void dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset, Tensor& out);

// attention.cpp. x, out, gout, gx [B, T, H, D], cos/sin [T, D].
void rope(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out);
void rope_backward(const Tensor& gout, const Tensor& cos, const Tensor& sin, Tensor& gx);
// q [B, T, H, D], k/v [B, S, Hkv, D], mask [T, S] or [Bm, Hm, T, S] (Bm in {1, B}, Hm in {1, H}) or undefined;
// out [B, T, H, D] and probs [B, H, T, S] (saved for backward).
void attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, bool causal, double scale,
               Tensor& out, Tensor& probs);
void attention_backward(const Tensor& gout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& probs,
                        bool causal, double scale, Tensor& gq, Tensor& gk, Tensor& gv);

// conv.cpp. patch_conv: x [B, C, H, W], w [O, C, p, p], bias [O] -> out [B, O, H/p, W/p].
void patch_conv(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out);
void patch_conv_backward(const Tensor& gout, const Tensor& x, const Tensor& w, Tensor& gx, Tensor& gw, Tensor& gbias);
// patch_conv's sizes, shared by the CPU and CUDA kernels: Hp × Wp = L patches of K = C·p·p values each.
struct PatchDims {
  int64_t B, C, H, W, p, Hp, Wp, L, K;
};
inline PatchDims patch_dims(const Tensor& x, const Tensor& w) {
  int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), p = w.size(2);
  return {B, C, H, W, p, H / p, W / p, (H / p) * (W / p), C * p * p};
}
// x [B, H, W, C], w [C, 1, 3, 3], padding 1.
void depthwise_conv3x3(const Tensor& x, const Tensor& w, Tensor& out);
void depthwise_conv3x3_backward(const Tensor& gout, const Tensor& x, const Tensor& w, Tensor& gx, Tensor& gw);
// x [B, H, W, C] -> out [B, out_h, out_w, C] with torch's bins.
void adaptive_avg_pool2d(const Tensor& x, Tensor& out);
void adaptive_avg_pool2d_backward(const Tensor& gout, Tensor& gx);

}  // namespace psa::cpu
