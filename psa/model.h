// The PSA-VLM model (psa-vlm.md §2): LLaVA (CLIP ViT -> MLP projector -> Llama) plus the safety concept
// bottleneck: a C-Abstractor safety projector, two sets of safety tokens and a cross-attention safety head.
// Parameter names follow the reference implementation's state dict (design.md, "Modules and checkpoints").
#pragma once
#include "nn/c_abstractor.h"
#include "nn/llava.h"

namespace psa {

struct PsaConfig {
  std::string preset = "tiny";
  nn::ClipConfig vision;
  nn::LlamaConfig text;
  int64_t num_safety_tokens = 8;  // N_s
  int64_t abstractor_depth = 2, abstractor_mlp_depth = 2, head_heads = 8, feature_layer = -2;
  int64_t image_token = 3, pad_id = 0;
  double safety_loss_weight = 10;           // λ in L = L_LLM + λ (L_level + L_type)
  // Init std of the safety projector, cross-attention and heads: the reference's 0.02 at width 4096, kept at
  // the same scale relative to 1/sqrt(width) (0.02·sqrt(4096/D)); at width 128 plain 0.02 left the head's
  // attention uniform and Stage I barely learned in 600 steps (type CE 1.1 vs 0.25-0.5 in 300 steps).
  double safety_init_std = 0.02;
  std::string head_query = "position0";     // position0 (reference) | first_text (the question's first token) | mean_prompt
  std::string projector_act = "gelu";
  int64_t max_text_tokens = 96;             // longer prompts+answers are truncated at the answer end
  static PsaConfig from_preset(const std::string& name);  // "tiny" | "small" (design.md)
  static PsaConfig from_json(const json::Value& v);
  json::Value to_json() const;
  int64_t merged_length(int64_t text_len) const { return text_len - 1 + num_safety_tokens + vision.num_patches(); }
};

// One collated batch. ids hold exactly one image token per row; labels are -100 on everything but the answer.
struct PsaBatch {
  Tensor pixels;  // [B, 3, S, S] f32
  Tensor ids;     // [B, L] i64, right-padded with pad_id
  Tensor labels;  // [B, L] i64
  Tensor level, type;  // [B] i64 (undefined for unlabelled data)
  std::vector<int64_t> prompt_len;      // tokens before the answer, per row (head query modes, generation)
  std::vector<int64_t> question_start;  // the question's first token, per row (head query "first_text")
};

struct PsaOutput {
  Tensor level_logits, type_logits;  // [B, 4], [B, 7]
  Tensor lm_hidden;                  // [B, L - 1 + N_s + P, D] after the final norm (N_s = 0 without safety
                                     // tokens); the logits are lm->head(lm_hidden), computed by the loss only
                                     // where a label is
  Tensor merged_labels;              // [B, same]
  Tensor loss_level, loss_type, loss_lm, loss;  // scalars (undefined when not computed)
};

class PsaVlm : public nn::Module {
 public:
  explicit PsaVlm(const PsaConfig& c);
  // classify: run the safety head; lm: run the LLM (with the LLM-side safety tokens when `safety_tokens`).
  PsaOutput forward(const PsaBatch& b, bool classify, bool lm, bool safety_tokens) const;
  // The head only: [B, 4], [B, 7] logits from the image and the query token(s).
  std::pair<Tensor, Tensor> classify(const Tensor& pixels, const Tensor& text_embeds, const PsaBatch* b) const;
  // Safety-head attention over [s_head; patches] for the query: [B, heads, 1, N_s + P] (explanations).
  Tensor head_attention(const PsaBatch& b) const;
  // Embeddings of a prompt with the image spliced in, for generation ([1, T', D]).
  Tensor prompt_embeddings(const Tensor& pixels, const Tensor& ids, bool safety_tokens) const;
  // Stage II adapters on every LLM linear (lm_head only when include_lm_head).
  void add_lora(int64_t rank, double alpha, double dropout, bool include_lm_head, uint64_t seed = 0);
  // Folds every adapter into its weight for inference (the adapters stay in the state dict, inactive).
  void merge_lora();

  PsaConfig config;
  std::shared_ptr<nn::ClipVision> vision;
  std::shared_ptr<nn::MlpProjector> projector;
  std::shared_ptr<nn::LlamaForCausalLM> lm;
  std::shared_ptr<nn::CAbstractor> safety_projector;
  std::shared_ptr<nn::MultiheadAttention> cross_attention;
  std::shared_ptr<nn::Linear> level_head, type_head;
  Tensor s_head, s_llm;  // safety_query_tokens (with h_s, for the head), safety_query_tokens_2 (into the LLM)

 private:
  Tensor head_query(const Tensor& text_embeds, const PsaBatch* b) const;
  Tensor head_keys(const Tensor& features) const;
  std::pair<Tensor, Tensor> head_logits(const Tensor& text, const Tensor& features, const PsaBatch* b) const;
  // What replaces the <image> token: [s_llm; projected patches], or the patches alone without safety tokens.
  Tensor image_inserts(const Tensor& features, bool safety_tokens) const;
};

// Parameter-name prefixes of each group (for freezing, audits and the stage invariants).
extern const char* const kVisionPrefix;     // "vision_tower."
extern const char* const kProjectorPrefix;  // "multi_modal_projector."
extern const char* const kLmPrefix;         // "language_model."
std::vector<std::string> safety_prefixes(); // tokens, safe_mm_projector., safe_part.

}  // namespace psa
