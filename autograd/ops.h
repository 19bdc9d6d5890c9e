// The differentiable ops. Each is one row of the op table (autograd/op_table.cpp) and lives in
// autograd/ops_<family>.cpp with its forward and its backward rule side by side; the kernels they call are in
// tensor/cpu/<family>.cpp (and tensor/cuda/<family>.cu). Shapes use B batch, T tokens, C channels, H heads.
#pragma once
#include <cstdint>
#include <vector>

#include "autograd/autograd.h"

namespace psa {

// ---- elementwise (ops_elementwise.cpp): numpy broadcasting; gradients are summed back to each input's shape
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor add_scalar(const Tensor& a, double s);
Tensor mul_scalar(const Tensor& a, double s);
Tensor neg(const Tensor& a);
Tensor exp(const Tensor& a);
Tensor log(const Tensor& a);
Tensor sqrt(const Tensor& a);
Tensor rsqrt(const Tensor& a);
Tensor pow_scalar(const Tensor& a, double p);
Tensor tanh(const Tensor& a);
Tensor sigmoid(const Tensor& a);
Tensor relu(const Tensor& a);
Tensor gelu(const Tensor& a);        // exact: x * Phi(x) with erf
Tensor quick_gelu(const Tensor& a);  // x * sigmoid(1.702 x), CLIP's activation
Tensor silu(const Tensor& a);
Tensor swiglu(const Tensor& gate, const Tensor& up);  // silu(gate)·up, fused (gate and up of one shape)
// By config name: gelu, quick_gelu, silu (swish), relu, tanh, sigmoid.
Tensor activation(const Tensor& a, const std::string& name);
// activation(x + bias, act), fused (a Linear's bias add and activation): x [..., N], bias [N].
Tensor bias_act(const Tensor& x, const Tensor& bias, const std::string& act);

// ---- reductions (ops_reduce.cpp)
Tensor sum(const Tensor& a);                                   // all elements -> shape []
Tensor sum(const Tensor& a, int64_t dim, bool keepdim = false);
Tensor mean(const Tensor& a);
Tensor mean(const Tensor& a, int64_t dim, bool keepdim = false);
Tensor max(const Tensor& a, int64_t dim, bool keepdim = false);  // gradient to the first maximum
Tensor max(const Tensor& a);                                     // all elements -> shape []
Tensor sum_to(const Tensor& a, const Shape& shape);              // reverse of broadcasting
Tensor argmax(const Tensor& a, int64_t dim);                     // i64, no gradient

// ---- matmul (ops_matmul.cpp)
// a [..., M, K] (or [..., K, M] when trans_a), b [..., K, N] (or [..., N, K]); batch dims broadcast,
// a 2-D b is shared by every batch.
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false);
// x [..., in], w [out, in], bias [out] or undefined: x·wᵀ + bias
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias = Tensor());
// activation(linear(x, w, bias), act), the bias add and activation fused (bias_act) when there is a bias
Tensor linear_act(const Tensor& x, const Tensor& w, const Tensor& bias, const std::string& act);

// ---- shape (ops_shape.cpp)
Tensor reshape(const Tensor& a, const Shape& shape);  // a view; one dim may be -1
Tensor permute(const Tensor& a, const std::vector<int64_t>& perm);
Tensor transpose(const Tensor& a, int64_t d0, int64_t d1);
Tensor concat(const std::vector<Tensor>& parts, int64_t dim);
Tensor slice(const Tensor& a, int64_t dim, int64_t start, int64_t end);  // [start, end)
std::vector<Tensor> split(const Tensor& a, const std::vector<int64_t>& sizes, int64_t dim);
Tensor expand(const Tensor& a, const Shape& shape);                   // broadcast copy
Tensor index_select(const Tensor& a, int64_t dim, const Tensor& index);  // index i32/i64 1-D
Tensor embedding(const Tensor& weight, const Tensor& ids);              // weight [V, C], ids [...] -> [..., C]

// ---- normalisation and losses (ops_nn.cpp)
Tensor layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps);  // over the last dim
Tensor rms_norm(const Tensor& x, const Tensor& w, double eps);                     // over the last dim
Tensor softmax(const Tensor& x, int64_t dim = -1);
Tensor log_softmax(const Tensor& x, int64_t dim = -1);
// logits [N, V], targets i64 [N]; mean over targets != ignore_index (0 when none counts).
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100);
Tensor dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset);

// ---- attention (ops_attention.cpp)
// Heads stay where the projections put them, [B, T, H, D] (a [B, T, H·D] output reshaped; flash-attn's layout), so
// neither op needs a permute before or after it.
// x [B, T, H, D] -> the same shape; cos/sin [T, D] tables for the positions; rotate-half convention (HF Llama).
Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin);
// q [B, T, H, D], k/v [B, S, Hkv, D] with H % Hkv == 0 -> [B, T, H, D]; mask additive [T, S] or [B|1, H|1, T, S] or
// undefined. scale defaults to 1/sqrt(D). Causal masks position s > t + (S - T) (queries are the last T of S).
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, const Tensor& mask = Tensor(),
                 double scale = 0);

// ---- convolution and pooling (ops_conv.cpp); images are NCHW, token grids NHWC = [B, H, W, C]
Tensor patch_conv(const Tensor& x, const Tensor& w, const Tensor& bias = Tensor());  // kernel = stride
Tensor depthwise_conv3x3(const Tensor& x, const Tensor& w);  // x [B, H, W, C], w [C, 1, 3, 3], padding 1
Tensor adaptive_avg_pool2d(const Tensor& x, int64_t out_h, int64_t out_w);  // x [B, H, W, C]

}  // namespace psa
