#include "nn/llava.h"

namespace psa::nn {

MlpProjector::MlpProjector(int64_t in, int64_t out, const std::string& a) : act(a) {
  linear_1 = register_module("linear_1", std::make_shared<Linear>(in, out));
  linear_2 = register_module("linear_2", std::make_shared<Linear>(out, out));
}

Tensor splice_embeddings(const Tensor& text, const Tensor& ids, int64_t token, const Tensor& inserts, bool per_token) {
  int64_t B = text.size(0), L = text.size(1), N = inserts.size(1);
  std::vector<int64_t> id = ids.to(DType::i64).vec<int64_t>();
  std::vector<Tensor> rows;
  for (int64_t b = 0; b < B; ++b) {
    Tensor tb = slice(text, 0, b, b + 1), ib = slice(inserts, 0, b, b + 1);
    std::vector<Tensor> pieces;
    int64_t used = 0, t = 0;
    while (t < L) {
      int64_t end = t;
      bool is_image = id[b * L + t] == token;
      while (end < L && (id[b * L + end] == token) == is_image) ++end;
      if (!is_image) {
        pieces.push_back(slice(tb, 1, t, end));
      } else {
        int64_t take = per_token ? end - t : N * (end - t);
        PSA_CHECK(used + take <= N, "image splice: row ", b, " has more image tokens than the ", N, " image features");
        pieces.push_back(slice(ib, 1, used, used + take > N ? N : used + take));
        used += take;
      }
      t = end;
    }
    PSA_CHECK(used == N, "image splice: row ", b, " has image tokens for ", used, " of ", N, " image features");
    rows.push_back(concat(pieces, 1));
  }
  return concat(rows, 0);
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
