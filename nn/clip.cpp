#include "nn/clip.h"

namespace psa::nn {

std::string activation_or(const json::Value& v, const std::string& key, const std::string& def) {
  const std::string name = v.string_or(key, def);
  // The engine's activation table decides which names run: asking it on one element keeps a second list of
  // names from drifting out of step with it, and an unknown name fails here rather than mid-forward.
  json::with_key(key, [&] { return activation(Tensor::zeros({1}), name); });
  return name;
}

ClipConfig ClipConfig::from_json(const json::Value& v) {
  ClipConfig c;
  // Ranges far above any real CLIP; they only stop absurd values before anything is allocated.
  c.hidden = v.int_in("hidden_size", 1, 1 << 16);
  c.layers = v.int_in("num_hidden_layers", 1, 1024);
  c.heads = v.int_in("num_attention_heads", 1, c.hidden);
  c.intermediate = v.int_in("intermediate_size", 1, 1 << 20);
  c.image_size = v.int_in("image_size", 1, 16384);
  c.patch = v.int_in("patch_size", 1, c.image_size);
  c.channels = v.int_in_or("num_channels", c.channels, 1, 16);
  c.eps = v.number_in_or("layer_norm_eps", c.eps, kMinEps, kMaxEps);
  c.act = activation_or(v, "hidden_act", c.act);
  PSA_CHECK(c.hidden % c.heads == 0, "clip config: hidden_size ", c.hidden, " not divisible by ", c.heads, " heads");
  PSA_CHECK(c.image_size % c.patch == 0, "clip config: image_size ", c.image_size,
            " not divisible by patch_size ", c.patch);
  return c;
}

json::Value ClipConfig::to_json() const {
  json::Value v = json::Value::object();
  v.set("model_type", "clip_vision_model");
  v.set("hidden_size", hidden);
  v.set("num_hidden_layers", layers);
  v.set("num_attention_heads", heads);
  v.set("intermediate_size", intermediate);
  v.set("image_size", image_size);
  v.set("patch_size", patch);
  v.set("num_channels", channels);
  v.set("layer_norm_eps", eps);
  v.set("hidden_act", act);
  return v;
}

ClipAttention::ClipAttention(int64_t hidden, int64_t h) : heads(h) {
  q_proj = register_module("q_proj", std::make_shared<Linear>(hidden, hidden));
  k_proj = register_module("k_proj", std::make_shared<Linear>(hidden, hidden));
  v_proj = register_module("v_proj", std::make_shared<Linear>(hidden, hidden));
  out_proj = register_module("out_proj", std::make_shared<Linear>(hidden, hidden));
}

// [B, T, H*D] <-> [B, T, H, D] (views: attention reads the heads in place)
static Tensor split_heads(const Tensor& x, int64_t heads) {
  return reshape(x, {x.size(0), x.size(1), heads, x.size(2) / heads});
}
static Tensor merge_heads(const Tensor& x) { return reshape(x, {x.size(0), x.size(1), x.size(2) * x.size(3)}); }

Tensor ClipAttention::forward(const Tensor& x) const {
  Tensor q = split_heads(q_proj->forward(x), heads), k = split_heads(k_proj->forward(x), heads),
         v = split_heads(v_proj->forward(x), heads);
  return out_proj->forward(merge_heads(attention(q, k, v, false)));
}

ClipLayer::ClipLayer(const ClipConfig& c) : act(c.act) {
  self_attn = register_module("self_attn", std::make_shared<ClipAttention>(c.hidden, c.heads));
  layer_norm1 = register_module("layer_norm1", std::make_shared<LayerNorm>(c.hidden, c.eps));
  fc1 = register_module("mlp.fc1", std::make_shared<Linear>(c.hidden, c.intermediate));
  fc2 = register_module("mlp.fc2", std::make_shared<Linear>(c.intermediate, c.hidden));
  layer_norm2 = register_module("layer_norm2", std::make_shared<LayerNorm>(c.hidden, c.eps));
}

Tensor ClipLayer::forward(const Tensor& x) const {
  Tensor h = add(x, self_attn->forward(layer_norm1->forward(x)));
  return add(h, fc2->forward(fc1->forward_act(layer_norm2->forward(h), act)));
}

ClipVision::ClipVision(const ClipConfig& c) : config(c) {
  patch_embedding = register_parameter("embeddings.patch_embedding.weight", {c.hidden, c.channels, c.patch, c.patch});
  class_embedding = register_parameter("embeddings.class_embedding", {c.hidden});
  position_embedding = register_parameter("embeddings.position_embedding.weight", {c.num_patches() + 1, c.hidden});
  pre_layrnorm = register_module("pre_layrnorm", std::make_shared<LayerNorm>(c.hidden, c.eps));
  for (int64_t i = 0; i < c.layers; ++i)
    layers.push_back(register_module("encoder.layers." + std::to_string(i), std::make_shared<ClipLayer>(c)));
  post_layernorm = register_module("post_layernorm", std::make_shared<LayerNorm>(c.hidden, c.eps));
}

Tensor ClipVision::embed(const Tensor& px) const {
  PSA_CHECK(px.dim() == 4 && px.size(1) == config.channels && px.size(2) == config.image_size &&
                px.size(3) == config.image_size,
            "clip: pixel_values ", shape_str(px.shape()), ", expected [B, ", config.channels, ", ",
            config.image_size, ", ", config.image_size, "]");
  int64_t B = px.size(0), C = config.hidden;
  Tensor patches = patch_conv(px, patch_embedding);  // [B, C, g, g]
  patches = transpose(reshape(patches, {B, C, -1}), 1, 2);  // [B, P, C]
  Tensor cls = expand(reshape(class_embedding, {1, 1, C}), {B, 1, C});
  Tensor x = add(concat({cls, patches}, 1), position_embedding);
  return pre_layrnorm->forward(x);
}

ClipVision::Output ClipVision::forward(const Tensor& px) const {
  Output out;
  Tensor x = embed(px);
  out.hidden_states.push_back(x);
  for (const auto& layer : layers) {
    x = layer->forward(x);
    out.hidden_states.push_back(x);
  }
  out.last_hidden_state = x;
  out.pooler_output = post_layernorm->forward(reshape(slice(x, 1, 0, 1), {x.size(0), x.size(2)}));
  return out;
}

Tensor ClipVision::features(const Tensor& px, int64_t feature_layer, bool keep_cls) const {
  int64_t n = config.layers, idx = feature_layer < 0 ? feature_layer + n + 1 : feature_layer;
  PSA_CHECK(idx >= 0 && idx <= n, "clip: vision_feature_layer ", feature_layer, " out of range for ", n, " layers");
  Tensor x = embed(px);
  for (int64_t i = 0; i < idx; ++i) x = layers[i]->forward(x);
  return keep_cls ? x : slice(x, 1, 1, x.size(1));
}

}  // namespace psa::nn
