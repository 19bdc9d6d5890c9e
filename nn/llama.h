// Llama-style causal LM (HF LlamaForCausalLM): RMSNorm pre-norm layers, rotary positions (rotate-half),
// grouped-query attention, SwiGLU MLP, tied or untied LM head, and a KV cache for generation.
#pragma once
#include <functional>

#include "nn/json.h"
#include "nn/module.h"

namespace psa::nn {

struct LlamaConfig {
  int64_t vocab = 512, hidden = 128, intermediate = 352, layers = 4, heads = 4, kv_heads = 4, head_dim = 0;
  int64_t max_positions = 2048, bos_id = 1, eos_id = 2;
  double eps = 1e-5, rope_theta = 10000.0;
  bool tie_embeddings = false, attention_bias = false, mlp_bias = false;
  int64_t dim_head() const { return head_dim ? head_dim : hidden / heads; }
  static LlamaConfig from_json(const json::Value& v);  // HF LlamaConfig keys (old and new rope layouts)
  json::Value to_json() const;
};

// Keys and values of every layer so far: [B, Hkv, S, D] each.
struct KVCache {
  std::vector<Tensor> k, v;
  int64_t length() const { return k.empty() || !k[0].defined() ? 0 : k[0].size(1); }  // k[layer] [B, S, Hkv, D]
};

class LlamaAttention : public Module {
 public:
  explicit LlamaAttention(const LlamaConfig& c);
  // x [B, T, C]; cos/sin [T, D] for the positions of x; cache (optional) is extended with this step's k, v.
  Tensor forward(const Tensor& x, const Tensor& cos, const Tensor& sin, KVCache* cache, int64_t layer) const;
  std::shared_ptr<Linear> q_proj, k_proj, v_proj, o_proj;
  int64_t heads, kv_heads, head_dim;
};

class LlamaLayer : public Module {
 public:
  explicit LlamaLayer(const LlamaConfig& c);
  Tensor forward(const Tensor& x, const Tensor& cos, const Tensor& sin, KVCache* cache, int64_t layer) const;
  std::shared_ptr<RMSNorm> input_layernorm, post_attention_layernorm;
  std::shared_ptr<LlamaAttention> self_attn;
  std::shared_ptr<Linear> gate_proj, up_proj, down_proj;
};

class LlamaForCausalLM : public Module {
 public:
  explicit LlamaForCausalLM(const LlamaConfig& c);
  Tensor embed(const Tensor& ids) const;  // [B, T] -> [B, T, C]
  struct Output {
    std::vector<Tensor> hidden_states;  // embeddings, then each layer; the last one after the final norm (HF)
    Tensor logits;                      // [B, T, V]
  };
  // inputs_embeds [B, T, C] at positions cache_length .. cache_length+T-1.
  Output forward(const Tensor& inputs_embeds, KVCache* cache = nullptr, bool keep_hidden = false) const;
  Tensor logits(const Tensor& ids) const { return forward(embed(ids)).logits; }
  // forward() in two halves: the hidden states after the final norm [B, T, C] (each layer's appended to
  // `hidden_states` when given), and lm_head on them [..., C] -> [..., V].
  Tensor final_hidden(const Tensor& inputs_embeds, KVCache* cache = nullptr,
                      std::vector<Tensor>* hidden_states = nullptr) const;
  Tensor head(const Tensor& hidden) const;
  // Next-token loss: logits[:, t] predicts labels[:, t+1]; labels -100 are ignored; mean over counted tokens.
  static Tensor causal_lm_loss(const Tensor& logits, const Tensor& labels);
  // causal_lm_loss(head(hidden), labels) without the [B, T, V] logits: only the rows that predict a label
  // go through lm_head (in training the answer, about a third of the text and none of the image), so the
  // lm_head GEMMs and the softmax shrink by that factor. Same loss and gradients.
  Tensor causal_lm_loss_from_hidden(const Tensor& hidden, const Tensor& labels) const;
  std::vector<Linear*> linears();  // every Linear of the LM (LoRA targets), lm_head last
  LlamaConfig config;
  std::shared_ptr<Embedding> embed_tokens;
  std::vector<std::shared_ptr<LlamaLayer>> layers;
  std::shared_ptr<RMSNorm> norm;
  std::shared_ptr<Linear> lm_head;  // null when tied

 private:
  std::pair<Tensor, Tensor> rope_tables(int64_t start, int64_t T, DType dtype) const;
};

struct SamplingOptions {
  int64_t max_new_tokens = 64;
  double temperature = 0;  // 0 = greedy
  int64_t top_k = 0;       // 0 = off
  double top_p = 1.0;      // 1 = off
  uint64_t seed = 0;
  std::vector<int64_t> stop_ids;  // e.g. EOS
};

// Generates from a prompt given as embeddings [1, T, C] (so images can be spliced in), with the KV cache.
// Returns the new token ids (without the stop token).
std::vector<int64_t> generate(const LlamaForCausalLM& lm, const Tensor& prompt_embeds, const SamplingOptions& opt);
// Picks the next token from logits [V] (greedy, or sampled with temperature / top-k / top-p).
int64_t sample_token(const std::vector<float>& logits, const SamplingOptions& opt, uint64_t step);

}  // namespace psa::nn
