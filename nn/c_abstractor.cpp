#include "nn/c_abstractor.h"

#include <algorithm>
#include <cmath>

#include "nn/clip.h"  // kMinEps, kMaxEps

namespace psa::nn {

// Ranges far above any real projector; they only stop absurd values before anything is allocated.
constexpr int64_t kMaxWidth = 1 << 16, kMaxDepth = 64, kMaxTokens = 1 << 16;

CAbstractorConfig CAbstractorConfig::from_json(const json::Value& v) {
  CAbstractorConfig c;
  c.encoder_hidden = v.int_in("encoder_hidden_size", 1, kMaxWidth);
  c.hidden = v.int_in("hidden_size", 1, kMaxWidth);
  c.output_hidden = v.int_in("output_hidden_size", 1, kMaxWidth);
  c.depth = v.int_in("depth", 1, kMaxDepth);
  c.mlp_depth = v.int_in_or("mlp_depth", c.mlp_depth, 1, kMaxDepth);
  c.num_queries = v.int_in("num_queries", 1, kMaxTokens);
  c.num_input_tokens = v.int_in_or("num_input_tokens", c.num_queries, 1, kMaxTokens);
  c.se_ratio = v.number_in_or("se_ratio", c.se_ratio, 0, 1);
  c.eps = v.number_in_or("eps", c.eps, kMinEps, kMaxEps);
  // The blocks are built with SiLU; "act" is informational in the fixtures but must not say otherwise.
  const std::string act = v.string_or("act", "silu");
  PSA_CHECK(act == "silu" || act == "swish", "json: key 'act': '", act, "' is not supported (the blocks use silu)");
  auto square = [](int64_t n) { int64_t r = std::llround(std::sqrt((double)n)); return r * r == n; };
  PSA_CHECK(square(c.num_queries) && square(c.num_input_tokens), "c_abstractor config: num_queries ", c.num_queries,
            " and num_input_tokens ", c.num_input_tokens, " must be perfect squares");
  // Squeeze-excite width: llround(se_ratio * block input width) must leave at least one channel.
  const int64_t narrowest = std::min(c.encoder_hidden, c.hidden);
  PSA_CHECK(std::llround(c.se_ratio * narrowest) >= 1, "c_abstractor config: se_ratio ", c.se_ratio,
            " leaves no squeeze-excite channel for width ", narrowest);
  return c;
}

MhaConfig MhaConfig::from_json(const json::Value& v) {
  MhaConfig c;
  c.embed_dim = v.int_in("embed_dim", 1, kMaxWidth);
  c.heads = v.int_in("num_heads", 1, c.embed_dim);
  PSA_CHECK(c.embed_dim % c.heads == 0, "json: key 'num_heads': embed_dim ", c.embed_dim, " not divisible by ",
            c.heads, " heads");
  // The module is batch-first, with biases and keys/values as wide as the query; torch's other layouts would
  // load and then compare the wrong axes or miss parameters.
  PSA_CHECK(v.bool_or("batch_first", true), "json: key 'batch_first': false is not supported (inputs are [B, L, E])");
  PSA_CHECK(v.bool_or("bias", true), "json: key 'bias': false is not supported (in_proj_bias and out_proj.bias)");
  for (const char* k : {"add_bias_kv", "add_zero_attn"})
    PSA_CHECK(!v.bool_or(k, false), "json: key '", k, "': true is not supported");
  for (const char* k : {"kdim", "vdim"})
    PSA_CHECK(v.int_or(k, c.embed_dim) == c.embed_dim, "json: key '", k, "': ", v.int_or(k, c.embed_dim),
              " is not supported (key and value width must equal embed_dim ", c.embed_dim, ")");
  return c;
}

json::Value CAbstractorConfig::to_json() const {
  json::Value v = json::Value::object();
  v.set("kind", "c_abstractor");
  v.set("encoder_hidden_size", encoder_hidden);
  v.set("hidden_size", hidden);
  v.set("output_hidden_size", output_hidden);
  v.set("depth", depth);
  v.set("mlp_depth", mlp_depth);
  v.set("num_input_tokens", num_input_tokens);
  v.set("num_queries", num_queries);
  v.set("se_ratio", se_ratio);
  v.set("eps", eps);
  return v;
}

// A 1×1 conv on channels-last tokens is a Linear over the weight [out, in, 1, 1] viewed as [out, in]; with an
// activation after it, the bias add and the activation are fused (linear_act).
static Tensor conv1x1(const Tensor& x, const Tensor& w, const Tensor& b, const std::string& act = "") {
  Tensor w2 = reshape(w, {w.size(0), w.size(1)});
  return act.empty() ? linear(x, w2, b) : linear_act(x, w2, b, act);
}

ConvNorm1x1::ConvNorm1x1(int64_t in, int64_t out, bool a, double eps) : act(a) {
  weight = register_parameter("conv.weight", {out, in, 1, 1});
  bn = register_module("bn", std::make_shared<LayerNorm>(out, eps));
}

Tensor ConvNorm1x1::forward(const Tensor& x) const {
  Tensor y = bn->forward(conv1x1(x, weight, Tensor()));
  return act ? silu(y) : y;
}

RegBottleneck::RegBottleneck(int64_t in, int64_t out, const CAbstractorConfig& c) {
  int64_t squeeze = std::llround(c.se_ratio * in);  // timm: rd_channels from the block's input width
  conv1 = register_module("conv1", std::make_shared<ConvNorm1x1>(in, out, true, c.eps));
  dw_weight = register_parameter("conv2.conv.weight", {out, 1, 3, 3});
  dw_norm = register_module("conv2.bn", std::make_shared<LayerNorm>(out, c.eps));
  se_fc1_w = register_parameter("se.fc1.weight", {squeeze, out, 1, 1});
  se_fc1_b = register_parameter("se.fc1.bias", {squeeze}, {Init::zeros});
  se_fc2_w = register_parameter("se.fc2.weight", {out, squeeze, 1, 1});
  se_fc2_b = register_parameter("se.fc2.bias", {out}, {Init::zeros});
  conv3 = register_module("conv3", std::make_shared<ConvNorm1x1>(out, out, false, c.eps));
  if (in != out) downsample = register_module("downsample", std::make_shared<ConvNorm1x1>(in, out, false, c.eps));
}

Tensor RegBottleneck::forward(const Tensor& x) const {
  Tensor y = conv1->forward(x);
  y = silu(dw_norm->forward(depthwise_conv3x3(y, dw_weight)));
  int64_t B = y.size(0), C = y.size(3);
  Tensor pooled = mean(reshape(y, {B, -1, C}), 1);                         // [B, C]
  Tensor gate = conv1x1(conv1x1(pooled, se_fc1_w, se_fc1_b, "silu"), se_fc2_w, se_fc2_b, "sigmoid");  // [B, C]
  y = mul(y, reshape(gate, {B, 1, 1, C}));
  y = conv3->forward(y);
  return silu(add(y, downsample ? downsample->forward(x) : x));
}

CAbstractor::CAbstractor(const CAbstractorConfig& c) : config(c) {
  // Configs built in code skip from_json: forward needs a readout layer and a pooled grid of at least 1x1.
  PSA_CHECK(c.depth >= 1 && c.mlp_depth >= 1 && c.num_queries >= 1 && c.num_input_tokens >= 1,
            "c_abstractor: depth ", c.depth, ", mlp_depth ", c.mlp_depth, ", num_queries ", c.num_queries,
            " and num_input_tokens ", c.num_input_tokens, " must be >= 1");
  for (int64_t i = 0; i < c.depth; ++i)
    stage1.push_back(register_module("net.0.b" + std::to_string(i + 1),
                                     std::make_shared<RegBottleneck>(i ? c.hidden : c.encoder_hidden, c.hidden, c)));
  for (int64_t i = 0; i < c.depth; ++i)
    stage2.push_back(register_module("net.2.b" + std::to_string(i + 1), std::make_shared<RegBottleneck>(c.hidden, c.hidden, c)));
  for (int64_t i = 0; i < c.mlp_depth; ++i)
    readout.push_back(register_module("readout." + std::to_string(2 * i),
                                      std::make_shared<Linear>(i ? c.output_hidden : c.hidden, c.output_hidden)));
}

Tensor CAbstractor::forward(const Tensor& x) const {
  PSA_CHECK(x.dim() == 3 && x.size(1) == config.num_input_tokens && x.size(2) == config.encoder_hidden,
            "c_abstractor: input ", shape_str(x.shape()), ", expected [B, ", config.num_input_tokens, ", ",
            config.encoder_hidden, "]");
  int64_t B = x.size(0), g = std::llround(std::sqrt((double)x.size(1))), q = std::llround(std::sqrt((double)config.num_queries));
  Tensor h = reshape(x, {B, g, g, x.size(2)});
  for (const auto& b : stage1) h = b->forward(h);
  h = adaptive_avg_pool2d(h, q, q);
  for (const auto& b : stage2) h = b->forward(h);
  h = reshape(h, {B, q * q, config.hidden});
  for (size_t i = 0; i + 1 < readout.size(); ++i) h = readout[i]->forward_act(h, "silu");  // Linear, SiLU, ..., Linear
  return readout.back()->forward(h);  // mlp_depth >= 1 (config check)
}

MultiheadAttention::MultiheadAttention(int64_t e, int64_t h) : embed_dim(e), heads(h) {
  PSA_CHECK(e >= 1 && h >= 1, "multihead attention: embed_dim ", e, " and heads ", h, " must be >= 1");
  PSA_CHECK(e % h == 0, "multihead attention: embed_dim ", e, " not divisible by ", h, " heads");
  in_proj_weight = register_parameter("in_proj_weight", {3 * e, e}, {Init::xavier_uniform});
  in_proj_bias = register_parameter("in_proj_bias", {3 * e}, {Init::zeros});
  out_proj = register_module("out_proj", std::make_shared<Linear>(e, e));
}

Tensor MultiheadAttention::project(const Tensor& x, int64_t which) const {
  int64_t E = embed_dim, B = x.size(0), T = x.size(1);
  Tensor w = slice(in_proj_weight, 0, which * E, (which + 1) * E), b = slice(in_proj_bias, 0, which * E, (which + 1) * E);
  return reshape(linear(x, w, b), {B, T, heads, E / heads});
}

Tensor MultiheadAttention::forward(const Tensor& query, const Tensor& kv) const {
  PSA_CHECK(query.dim() == 3 && kv.dim() == 3 && query.size(2) == embed_dim && kv.size(2) == embed_dim &&
                query.size(0) == kv.size(0),
            "multihead attention: query ", shape_str(query.shape()), " and key/value ", shape_str(kv.shape()),
            " for embed_dim ", embed_dim);
  Tensor o = attention(project(query, 0), project(kv, 1), project(kv, 2), false);
  return out_proj->forward(reshape(o, {query.size(0), query.size(1), embed_dim}));
}

Tensor MultiheadAttention::attention_weights(const Tensor& query, const Tensor& kv) const {
  Tensor q = permute(project(query, 0), {0, 2, 1, 3}), k = permute(project(kv, 1), {0, 2, 1, 3});  // [B, H, T, E/H]
  return softmax(mul_scalar(matmul(q, k, false, true), 1.0 / std::sqrt((double)(embed_dim / heads))), -1);
}

}  // namespace psa::nn
