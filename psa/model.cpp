#include "psa/model.h"

#include <cmath>
#include <tuple>

namespace psa {

const char* const kVisionPrefix = "vision_tower.";
const char* const kProjectorPrefix = "multi_modal_projector.";
const char* const kLmPrefix = "language_model.";

std::vector<std::string> safety_prefixes() {
  return {"safety_query_tokens", "safe_mm_projector.", "safe_part."};  // covers safety_query_tokens_2 too
}

PsaConfig PsaConfig::from_preset(const std::string& name) {
  PsaConfig c;
  c.preset = name;
  if (name == "tiny") {
    c.vision.image_size = 32, c.vision.patch = 4, c.vision.hidden = 64, c.vision.layers = 4, c.vision.heads = 4;
    c.vision.intermediate = 256, c.vision.act = "quick_gelu";
    c.text.hidden = 128, c.text.layers = 4, c.text.heads = 4, c.text.kv_heads = 4, c.text.intermediate = 352;
    c.text.vocab = 512;
    c.num_safety_tokens = 8, c.abstractor_depth = 2;
  } else if (name == "small") {
    c.vision.image_size = 64, c.vision.patch = 8, c.vision.hidden = 256, c.vision.layers = 6, c.vision.heads = 8;
    c.vision.intermediate = 1024, c.vision.act = "quick_gelu";
    c.text.hidden = 512, c.text.layers = 8, c.text.heads = 8, c.text.kv_heads = 8, c.text.intermediate = 1408;
    c.text.vocab = 4096;
    c.num_safety_tokens = 16, c.abstractor_depth = 3;
  } else {
    fail("unknown preset '", name, "' (known: tiny, small)");
  }
  c.text.max_positions = 512;
  c.safety_init_std = 0.02 * std::sqrt(4096.0 / c.text.hidden);
  return c;
}

json::Value PsaConfig::to_json() const {
  json::Value v = json::Value::object();
  v.set("model_type", "psa_vlm");
  v.set("preset", preset);
  v.set("vision_config", vision.to_json());
  v.set("text_config", text.to_json());
  v.set("num_safety_tokens", num_safety_tokens);
  v.set("abstractor_depth", abstractor_depth);
  v.set("abstractor_mlp_depth", abstractor_mlp_depth);
  v.set("head_heads", head_heads);
  v.set("vision_feature_layer", feature_layer);
  v.set("image_token_index", image_token);
  v.set("pad_token_id", pad_id);
  v.set("safety_loss_weight", safety_loss_weight);
  v.set("safety_init_std", safety_init_std);
  v.set("head_query", head_query);
  v.set("projector_hidden_act", projector_act);
  v.set("max_text_tokens", max_text_tokens);
  return v;
}

static void check_head_query(const std::string& q) {
  PSA_CHECK(q == "position0" || q == "first_text" || q == "mean_prompt", "psa config: head_query '", q,
            "' (expected position0, first_text or mean_prompt)");
}

PsaConfig PsaConfig::from_json(const json::Value& v) {
  PsaConfig c;
  c.preset = v.at("preset").as_string();
  c.vision = nn::ClipConfig::from_json(v.at("vision_config"));
  c.text = nn::LlamaConfig::from_json(v.at("text_config"));
  c.num_safety_tokens = v.int_in("num_safety_tokens", 1, 4096);
  c.abstractor_depth = v.int_in("abstractor_depth", 1, 64);
  c.abstractor_mlp_depth = v.int_in("abstractor_mlp_depth", 1, 64);
  c.head_heads = v.int_in("head_heads", 1, c.text.hidden);
  PSA_CHECK(c.text.hidden % c.head_heads == 0, "psa config: text hidden_size ", c.text.hidden,
            " not divisible by head_heads ", c.head_heads);
  c.feature_layer = v.int_in("vision_feature_layer", -c.vision.layers - 1, c.vision.layers);  // HF hidden_states index
  c.image_token = v.int_in("image_token_index", 0, c.text.vocab - 1);
  c.pad_id = v.int_in("pad_token_id", 0, c.text.vocab - 1);
  c.safety_loss_weight = v.at("safety_loss_weight").as_number();
  if (const json::Value* s = v.find("safety_init_std")) c.safety_init_std = s->as_number();
  c.head_query = v.at("head_query").as_string();
  check_head_query(c.head_query);  // here too, so that a bad checkpoint's error names its file
  c.projector_act = nn::activation_or(v, "projector_hidden_act", c.projector_act);
  c.max_text_tokens = v.int_in("max_text_tokens", 2, 1 << 20);
  return c;
}

PsaVlm::PsaVlm(const PsaConfig& c) : config(c) {
  check_head_query(c.head_query);
  int64_t D = c.text.hidden, Dv = c.vision.hidden, P = c.vision.num_patches();
  vision = register_module("vision_tower.vision_model", std::make_shared<nn::ClipVision>(c.vision));
  projector = register_module("multi_modal_projector", std::make_shared<nn::MlpProjector>(Dv, D, c.projector_act));
  lm = register_module("language_model", std::make_shared<nn::LlamaForCausalLM>(c.text));
  s_head = register_parameter("safety_query_tokens", {1, c.num_safety_tokens, D});
  s_llm = register_parameter("safety_query_tokens_2", {1, c.num_safety_tokens, D});
  nn::CAbstractorConfig ac;  // width = D_v + N_s and queries = patches, as the reference sets them (§2.1)
  ac.encoder_hidden = Dv, ac.hidden = Dv + c.num_safety_tokens, ac.output_hidden = D;
  ac.depth = c.abstractor_depth, ac.mlp_depth = c.abstractor_mlp_depth;
  ac.num_input_tokens = P, ac.num_queries = P;
  safety_projector = register_module("safe_mm_projector.proj", std::make_shared<nn::CAbstractor>(ac));
  cross_attention = register_module("safe_part.cross_attention", std::make_shared<nn::MultiheadAttention>(D, c.head_heads));
  level_head = register_module("safe_part.safety_head", std::make_shared<nn::Linear>(D, 4));
  type_head = register_module("safe_part.other_head", std::make_shared<nn::Linear>(D, 7));
  for (nn::Module* m : std::initializer_list<nn::Module*>{safety_projector.get(), cross_attention.get(), level_head.get(), type_head.get()})
    m->set_normal_init_std(c.safety_init_std);
}

// The reference reads output position 0 only; since query positions attend independently, computing just
// that query is exactly equivalent (psa-vlm.md §2.3).
Tensor PsaVlm::head_query(const Tensor& text, const PsaBatch* b) const {
  int64_t B = text.size(0), D = text.size(2);
  if (config.head_query == "position0") return slice(text, 1, 0, 1);
  if (config.head_query == "first_text") {
    PSA_CHECK(b && (int64_t)b->question_start.size() == B, "head_query first_text needs the question starts");
    std::vector<int64_t> rows(B);
    for (int64_t r = 0; r < B; ++r) rows[r] = r * text.size(1) + b->question_start[r];
    Tensor picked = index_select(reshape(text, {B * text.size(1), D}), 0,
                                 Tensor::from(rows, {B}, DType::i64).to(text.device()));
    return reshape(picked, {B, 1, D});
  }
  PSA_CHECK(b && (int64_t)b->prompt_len.size() == B, "head_query mean_prompt needs the prompt lengths");
  Tensor w = Tensor::zeros({B, text.size(1), 1}, DType::f64);  // average over the prompt tokens
  for (int64_t r = 0; r < B; ++r)
    for (int64_t t = 0; t < b->prompt_len[r]; ++t) w.data<double>()[r * text.size(1) + t] = 1.0 / b->prompt_len[r];
  return reshape(sum(mul(text, w.to(text.dtype()).to(text.device())), 1), {B, 1, D});
}

Tensor PsaVlm::head_keys(const Tensor& features) const {
  int64_t B = features.size(0);
  Tensor h_s = safety_projector->forward(features);  // [B, P, D]
  return concat({expand(s_head, {B, s_head.size(1), s_head.size(2)}), h_s}, 1);
}

std::pair<Tensor, Tensor> PsaVlm::head_logits(const Tensor& text, const Tensor& features, const PsaBatch* b) const {
  Tensor z = cross_attention->forward(head_query(text, b), head_keys(features));  // [B, 1, D]
  z = reshape(z, {z.size(0), z.size(2)});
  return {level_head->forward(z), type_head->forward(z)};
}

std::pair<Tensor, Tensor> PsaVlm::classify(const Tensor& pixels, const Tensor& text, const PsaBatch* b) const {
  return head_logits(text, vision->features(pixels, config.feature_layer), b);
}

Tensor PsaVlm::image_inserts(const Tensor& features, bool safety_tokens) const {
  Tensor h_i = projector->forward(features);
  if (!safety_tokens) return h_i;
  return concat({expand(s_llm, {h_i.size(0), s_llm.size(1), s_llm.size(2)}), h_i}, 1);
}

Tensor PsaVlm::head_attention(const PsaBatch& b) const {
  NoGrad ng;
  Tensor text = lm->embed(b.ids);
  return cross_attention->attention_weights(head_query(text, &b), head_keys(vision->features(b.pixels, config.feature_layer)));
}

namespace {

// Labels of the merged sequence: the image token's label becomes N_s + P labels of -100.
Tensor merged_labels(const Tensor& ids, const Tensor& labels, int64_t image_token, int64_t inserted) {
  int64_t B = ids.size(0), L = ids.size(1), Lm = L - 1 + inserted;
  std::vector<int64_t> id = ids.vec<int64_t>(), lab = labels.vec<int64_t>(), out;
  out.reserve(B * Lm);
  for (int64_t r = 0; r < B; ++r) {
    int64_t images = 0;
    for (int64_t t = 0; t < L; ++t) {
      if (id[r * L + t] == image_token) {
        out.insert(out.end(), inserted, -100);
        ++images;
      } else {
        out.push_back(lab[r * L + t]);
      }
    }
    PSA_CHECK(images == 1, "psa: row ", r, " has ", images, " image tokens, expected exactly one");
  }
  return Tensor::from(out, {B, Lm}, DType::i64);
}

}  // namespace

Tensor PsaVlm::prompt_embeddings(const Tensor& pixels, const Tensor& ids, bool safety_tokens) const {
  Tensor inserts = image_inserts(vision->features(pixels, config.feature_layer), safety_tokens);
  return nn::splice_embeddings(lm->embed(ids), ids, config.image_token, inserts, false);
}

PsaOutput PsaVlm::forward(const PsaBatch& b, bool classify_pass, bool lm_pass, bool safety_tokens) const {
  PsaOutput out;
  Tensor text = lm->embed(b.ids);
  Tensor features = vision->features(b.pixels, config.feature_layer);
  std::vector<Tensor> losses;
  if (classify_pass) {
    std::tie(out.level_logits, out.type_logits) = head_logits(text, features, &b);
    if (b.level.defined()) {
      out.loss_level = cross_entropy(out.level_logits, b.level);
      out.loss_type = cross_entropy(out.type_logits, b.type);
      losses.push_back(mul_scalar(add(out.loss_level, out.loss_type), config.safety_loss_weight));
    }
  }
  if (lm_pass) {
    Tensor inserts = image_inserts(features, safety_tokens);
    Tensor merged = nn::splice_embeddings(text, b.ids, config.image_token, inserts, false);
    out.merged_labels = merged_labels(b.ids, b.labels, config.image_token, inserts.size(1)).to(merged.device());
    out.lm_hidden = lm->final_hidden(merged);
    out.loss_lm = lm->causal_lm_loss_from_hidden(out.lm_hidden, out.merged_labels);
    losses.push_back(out.loss_lm);
  }
  if (!losses.empty()) out.loss = losses.size() == 1 ? losses[0] : add(losses[0], losses[1]);
  return out;
}

void PsaVlm::merge_lora() {
  for (nn::Linear* l : lm->linears())
    if (l->has_lora() && !l->lora_merged) l->merge_lora();
}

void PsaVlm::add_lora(int64_t rank, double alpha, double dropout, bool include_lm_head, uint64_t seed) {
  for (nn::Linear* l : lm->linears())
    if (include_lm_head || l != lm->lm_head.get()) l->add_lora(rank, alpha, dropout);
  initialize_matching(seed, ".lora_");  // A kaiming-uniform, B zero (PEFT's defaults)
}

}  // namespace psa
