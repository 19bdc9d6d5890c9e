// CLIP vision transformer (HF CLIPVisionModel): patch conv (kernel = stride, no bias) + class token + learned
// positions, pre-LayerNorm ("pre_layrnorm", sic), pre-norm encoder layers, post-LayerNorm on the class token.
#pragma once
#include "nn/json.h"
#include "nn/module.h"

namespace psa::nn {

// Bounds of a config's norm epsilon: a zero or negative one divides by zero or takes the root of a negative
// variance; anything above 1 is no longer a small stabiliser.
constexpr double kMinEps = 1e-30, kMaxEps = 1;

// v[key] (or `def` when missing or null), refused unless the engine implements that activation:
// "json: key 'hidden_act': activation: unknown activation 'gelu_new' (known: ...)".
std::string activation_or(const json::Value& v, const std::string& key, const std::string& def);

struct ClipConfig {
  int64_t hidden = 64, layers = 4, heads = 4, intermediate = 256, image_size = 32, patch = 4, channels = 3;
  double eps = 1e-5;
  std::string act = "quick_gelu";
  int64_t grid() const { return image_size / patch; }
  int64_t num_patches() const { return grid() * grid(); }
  static ClipConfig from_json(const json::Value& v);  // HF vision_config keys
  json::Value to_json() const;
};

// Self-attention with separate q/k/v/out projections (all with bias), as in CLIP.
class ClipAttention : public Module {
 public:
  ClipAttention(int64_t hidden, int64_t heads);
  Tensor forward(const Tensor& x) const;  // [B, T, C] -> [B, T, C]
  std::shared_ptr<Linear> q_proj, k_proj, v_proj, out_proj;
  int64_t heads;
};

class ClipLayer : public Module {
 public:
  explicit ClipLayer(const ClipConfig& c);
  Tensor forward(const Tensor& x) const;
  std::shared_ptr<ClipAttention> self_attn;
  std::shared_ptr<LayerNorm> layer_norm1, layer_norm2;
  std::shared_ptr<Linear> fc1, fc2;
  std::string act;
};

class ClipVision : public Module {
 public:
  explicit ClipVision(const ClipConfig& c);
  struct Output {
    std::vector<Tensor> hidden_states;  // [embeddings after pre_layrnorm, layer 1, ..., layer L]
    Tensor last_hidden_state, pooler_output;
  };
  // Runs every layer and the post-norm (conformance and the pooled output).
  Output forward(const Tensor& pixel_values) const;
  // LLaVA's image features: hidden_states[feature_layer] (negative counts from the end), CLS dropped unless
  // keep_cls. Only the layers needed are computed. [B, 3, S, S] -> [B, P, C]
  Tensor features(const Tensor& pixel_values, int64_t feature_layer = -2, bool keep_cls = false) const;
  ClipConfig config;
  Tensor patch_embedding, class_embedding, position_embedding;
  std::shared_ptr<LayerNorm> pre_layrnorm, post_layernorm;
  std::vector<std::shared_ptr<ClipLayer>> layers;

 private:
  Tensor embed(const Tensor& pixel_values) const;
};

}  // namespace psa::nn
