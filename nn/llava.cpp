#include "nn/llava.h"

namespace psa::nn {

MlpProjector::MlpProjector(int64_t in, int64_t out, const std::string& a) : act(a) {
  linear_1 = register_module("linear_1", std::make_shared<Linear>(in, out));
  linear_2 = register_module("linear_2", std::make_shared<Linear>(out, out));
}

// One gather instead of a slice per run and a concat per row: the host walks the ids and lists, for every output
// position, its source row in [text rows; insert rows], so the GPU sees one index_select (and one index_add in
// backward) rather than hundreds of small copies. Every output row has exactly one source, so both directions
// are exact.
Tensor splice_embeddings(const Tensor& text, const Tensor& ids, int64_t token, const Tensor& inserts, bool per_token) {
  PSA_CHECK(text.dim() == 3 && inserts.dim() == 3 && inserts.size(0) == text.size(0) &&
                ids.numel() == text.size(0) * text.size(1),
            "image splice: text ", shape_str(text.shape()), ", ids ", shape_str(ids.shape()), " and image features ",
            shape_str(inserts.shape()), " do not fit together");
  int64_t B = text.size(0), L = text.size(1), C = text.size(2), N = inserts.size(1);
  std::vector<int64_t> id = ids.to(Device::cpu).to(DType::i64).vec<int64_t>();
  std::vector<int64_t> source;  // rows of concat(text [B·L, C], inserts [B·N, C])
  for (int64_t b = 0; b < B; ++b) {
    int64_t used = 0;
    for (int64_t t = 0; t < L; ++t) {
      if (id[b * L + t] != token) {
        source.push_back(b * L + t);
        continue;
      }
      int64_t end = t;
      while (end < L && id[b * L + end] == token) ++end;
      int64_t take = per_token ? end - t : N * (end - t);
      PSA_CHECK(used + take <= N, "image splice: row ", b, " has more image tokens than the ", N, " image features");
      for (int64_t k = 0; k < take; ++k) source.push_back(B * L + b * N + used + k);
      used += take;
      t = end - 1;
    }
    PSA_CHECK(used == N, "image splice: row ", b, " has image tokens for ", used, " of ", N, " image features");
  }
  Tensor rows = concat({reshape(text, {B * L, C}), reshape(inserts, {B * N, C})}, 0);
  Tensor index = Tensor::from(source, {(int64_t)source.size()}, DType::i64).to(text.device());
  // Every row consumed exactly N features, so every row has the same length.
  return reshape(index_select(rows, 0, index), {B, B ? (int64_t)source.size() / B : 0, C});
}

Llava::Llava(const ClipConfig& vc, const LlamaConfig& tc, int64_t image_tok, int64_t layer)
    : image_token(image_tok), feature_layer(layer) {
  vision = register_module("vision_tower.vision_model", std::make_shared<ClipVision>(vc));
  projector = register_module("multi_modal_projector", std::make_shared<MlpProjector>(vc.hidden, tc.hidden));
  lm = register_module("language_model", std::make_shared<LlamaForCausalLM>(tc));
}

LlavaConfig LlavaConfig::from_json(const json::Value& c) {
  LlavaConfig l;
  l.vision = json::with_key("vision_config", [&] { return ClipConfig::from_json(c.at("vision_config")); });
  l.text = json::with_key("text_config", [&] { return LlamaConfig::from_json(c.at("text_config")); });
  // hidden_states has layers + 1 entries (the embeddings first); negative indices count from the end.
  const int64_t n = l.vision.layers;
  l.feature_layer = c.int_in_or("vision_feature_layer", l.feature_layer, -(n + 1), n);
  const std::string strategy = c.string_or("vision_feature_select_strategy", "default");
  PSA_CHECK(strategy == "default", "llava config: vision_feature_select_strategy '", strategy,
            "' is not supported (only 'default': drop CLS)");
  l.image_token = c.int_in("image_token_index", 0, l.text.vocab - 1);
  l.projector_act = activation_or(c, "projector_hidden_act", l.projector_act);
  return l;
}

std::shared_ptr<Llava> Llava::from_config(const json::Value& c) { return from_config(LlavaConfig::from_json(c)); }

std::shared_ptr<Llava> Llava::from_config(const LlavaConfig& l) {
  auto m = std::make_shared<Llava>(l.vision, l.text, l.image_token, l.feature_layer);
  m->projector->act = l.projector_act;
  return m;
}

Tensor Llava::image_features(const Tensor& px) const { return projector->forward(vision->features(px, feature_layer)); }

Tensor Llava::forward(const Tensor& px, const Tensor& ids) const {
  Tensor embeds = splice_embeddings(lm->embed(ids), ids, image_token, image_features(px), true);
  return lm->forward(embeds).logits;
}

}  // namespace psa::nn
