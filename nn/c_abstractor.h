// HoneyBee C-Abstractor (Cha et al. 2024), as the PSA-VLM safety projector: two timm RegStages of RegNet
// bottleneck blocks (1×1 conv, depthwise 3×3, squeeze-excite, 1×1 conv, channel LayerNorm) around an
// adaptive average pool, then an MLP readout. Everything runs channels-last on the token grid [B, H, W, C],
// so timm's LayerNorm2d is a LayerNorm over the last dim and the 1×1 convs are Linear layers.
#pragma once
#include "nn/json.h"
#include "nn/module.h"

namespace psa::nn {

struct CAbstractorConfig {
  int64_t encoder_hidden = 64, hidden = 72, output_hidden = 128, depth = 2, mlp_depth = 2;
  int64_t num_input_tokens = 16, num_queries = 16;
  double eps = 1e-5, se_ratio = 0.25;
  static CAbstractorConfig from_json(const json::Value& v);
  json::Value to_json() const;
};

// timm ConvNormAct with a 1×1 conv: weight [C_out, C_in, 1, 1] stored as torch keeps it.
class ConvNorm1x1 : public Module {
 public:
  ConvNorm1x1(int64_t in, int64_t out, bool act, double eps);
  Tensor forward(const Tensor& x) const;  // [B, H, W, C_in] -> [B, H, W, C_out]
  Tensor weight;
  std::shared_ptr<LayerNorm> bn;
  bool act;
};

class RegBottleneck : public Module {
 public:
  RegBottleneck(int64_t in, int64_t out, const CAbstractorConfig& c);
  Tensor forward(const Tensor& x) const;
  std::shared_ptr<ConvNorm1x1> conv1, conv3, downsample;
  Tensor dw_weight;  // conv2.conv.weight [C, 1, 3, 3]
  std::shared_ptr<LayerNorm> dw_norm;
  Tensor se_fc1_w, se_fc1_b, se_fc2_w, se_fc2_b;  // 1×1 convs with bias, [out, in, 1, 1] as timm stores them
};

class CAbstractor : public Module {
 public:
  explicit CAbstractor(const CAbstractorConfig& c);
  Tensor forward(const Tensor& x) const;  // [B, P, encoder_hidden] -> [B, num_queries, output_hidden]
  CAbstractorConfig config;
  std::vector<std::shared_ptr<RegBottleneck>> stage1, stage2;
  std::vector<std::shared_ptr<Linear>> readout;
};

// torch.nn.MultiheadAttention's constructor arguments as the conformance fixtures write them.
struct MhaConfig {
  int64_t embed_dim = 64, heads = 8;
  static MhaConfig from_json(const json::Value& v);
};

// torch.nn.MultiheadAttention as cross-attention (the PSA-VLM safety head): packed in_proj_weight [3E, E]
// with rows [W_q; W_k; W_v], in_proj_bias [3E], out_proj. No mask, no dropout.
class MultiheadAttention : public Module {
 public:
  MultiheadAttention(int64_t embed_dim, int64_t heads);
  Tensor forward(const Tensor& query, const Tensor& key_value) const;  // [B, L, E], [B, S, E] -> [B, L, E]
  Tensor attention_weights(const Tensor& query, const Tensor& key_value) const;  // [B, H, L, S]
  Tensor in_proj_weight, in_proj_bias;
  std::shared_ptr<Linear> out_proj;
  int64_t embed_dim, heads;

 private:
  Tensor project(const Tensor& x, int64_t which) const;  // 0 q, 1 k, 2 v -> [B, T, H, E/H]
};

}  // namespace psa::nn
