// LLaVA-1.5 (HF LlavaForConditionalGeneration): CLIP features of the penultimate layer without CLS, an MLP
// projector (Linear -> GELU -> Linear) into the LM width, spliced into the text embeddings at the image tokens.
#pragma once
#include "nn/clip.h"
#include "nn/llama.h"

namespace psa::nn {

class MlpProjector : public Module {
 public:
  MlpProjector(int64_t in, int64_t out, const std::string& act = "gelu");
  Tensor forward(const Tensor& x) const { return linear_2->forward(linear_1->forward_act(x, act)); }
  std::shared_ptr<Linear> linear_1, linear_2;
  std::string act;
};

// Replaces, row by row, the positions of `ids` [B, L] equal to `token` in `text` [B, L, C]: each run of
// `token` positions consumes rows of inserts[b] [N, C] in order (`per_token` = 1 row each, as HF LLaVA) or
// one occurrence consumes all N rows (per_token = false, as PSA-VLM's single <image> placeholder).
Tensor splice_embeddings(const Tensor& text, const Tensor& ids, int64_t token, const Tensor& inserts, bool per_token);

// HF LlavaConfig: the two towers' configs and the glue between them, validated before anything is built.
struct LlavaConfig {
  ClipConfig vision;
  LlamaConfig text;
  int64_t image_token = 0, feature_layer = -2;
  std::string projector_act = "gelu";
  static LlavaConfig from_json(const json::Value& config);
};

class Llava : public Module {
 public:
  Llava(const ClipConfig& vision, const LlamaConfig& text, int64_t image_token, int64_t feature_layer = -2);
  static std::shared_ptr<Llava> from_config(const json::Value& config);
  static std::shared_ptr<Llava> from_config(const LlavaConfig& config);
  Tensor image_features(const Tensor& pixel_values) const;  // [B, P, C_text]
  Tensor forward(const Tensor& pixel_values, const Tensor& ids) const;  // logits [B, L, V]
  std::shared_ptr<ClipVision> vision;
  std::shared_ptr<MlpProjector> projector;
  std::shared_ptr<LlamaForCausalLM> lm;
  int64_t image_token, feature_layer;
};

}  // namespace psa::nn
