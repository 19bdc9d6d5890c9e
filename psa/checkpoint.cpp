#include "psa/checkpoint.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "nn/checkpoint.h"

namespace psa {
namespace fs = std::filesystem;

static json::Value lora_json(const LoraSettings& l) {
  json::Value v = json::Value::object();
  v.set("rank", l.rank);
  v.set("alpha", l.alpha);
  v.set("dropout", l.dropout);
  v.set("include_lm_head", l.include_lm_head);
  return v;
}

void save_checkpoint(const std::string& dir, const PsaVlm& model, const Tokenizer& tok, const std::string& stage,
                     const LoraSettings& lora) {
  fs::create_directories(dir);
  std::string config = json::dump(model.config.to_json(), 2);
  tok.save((fs::path(dir) / "tokenizer.json").string());
  json::write_file((fs::path(dir) / "config.json").string(), config + "\n");
  nn::write_tensors((fs::path(dir) / "model.safetensors").string(), model.state_dict(),
                    {{"format", "pt"}, {"config", config}, {"stage", stage}, {"lora", json::dump(lora_json(lora))}});
}

// A lower bound on the parameters `c` builds (the large matrices only). A config is read from the same file as
// the weights, so one that asks for far more than the file holds is hostile or corrupt: refusing it here stops
// a few bytes of JSON from allocating gigabytes before the strict load would have refused it anyway.
static double min_params(const PsaConfig& c) {
  const nn::ClipConfig& v = c.vision;
  const nn::LlamaConfig& t = c.text;
  const double h = v.hidden, H = t.hidden, hd = t.dim_head(), a = v.hidden + c.num_safety_tokens;
  double n = v.layers * (4 * h * h + 2 * h * v.intermediate) + double(v.channels) * v.patch * v.patch * h;
  n += double(t.vocab) * H + t.layers * (2 * H * t.heads * hd + 2 * H * t.kv_heads * hd + 3 * H * t.intermediate);
  n += 2.0 * c.abstractor_depth * a * a + 4 * H * H;  // C-Abstractor bottlenecks, cross-attention
  return n;
}

// Metadata JSON -> value; errors name the file and the entry ("m.safetensors: metadata 'config': ...").
template <typename F>
static auto from_metadata(const std::string& file, const std::string& key, const std::string& text, F&& f) {
  try {
    return f(json::parse(text, "json"));
  } catch (const Error& e) {
    fail(file, ": metadata '", key, "': ", e.what());
  }
}

Checkpoint load_checkpoint(const std::string& dir) {
  fs::path model_path = fs::path(dir) / "model.safetensors";
  PSA_CHECK(fs::exists(model_path), dir, ": no model.safetensors (is this a checkpoint folder? `psa train` writes them)");
  std::map<std::string, std::string> meta;
  nn::StateDict sd = nn::read_tensors(model_path.string(), &meta);
  PSA_CHECK(meta.count("config"), model_path.string(), ": no 'config' in the metadata");
  Checkpoint c;
  c.dir = dir;
  c.stage = meta.count("stage") ? meta["stage"] : "unknown";
  const std::string file = model_path.string();
  PsaConfig cfg = from_metadata(file, "config", meta["config"], [](const json::Value& v) { return PsaConfig::from_json(v); });
  double elements = 0;
  for (const auto& [name, t] : sd) elements += t.numel();
  PSA_CHECK(min_params(cfg) <= 2 * elements + (1 << 20), file, ": metadata 'config' describes a model of at least ",
            int64_t(min_params(cfg)), " parameters but the file holds ", int64_t(elements), " values");
  if (meta.count("lora"))
    c.lora = from_metadata(file, "lora", meta["lora"], [&](const json::Value& l) {
      LoraSettings s;
      s.rank = l.int_in("rank", 0, cfg.text.hidden);
      s.alpha = l.number_at("alpha");
      s.dropout = l.number_at("dropout");
      PSA_CHECK(s.dropout >= 0 && s.dropout < 1, "json: key 'dropout': ", s.dropout, " out of range [0, 1)");
      s.include_lm_head = l.bool_at("include_lm_head");
      return s;
    });
  c.model = std::make_shared<PsaVlm>(cfg);
  if (c.lora.rank > 0) c.model->add_lora(c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.include_lm_head);
  c.model->load_state_dict(sd, true, model_path.string());
  c.tokenizer = std::make_shared<Tokenizer>(Tokenizer::load((fs::path(dir) / "tokenizer.json").string()));
  PSA_CHECK(c.tokenizer->vocab_size() <= cfg.text.vocab, dir, ": tokenizer has ", c.tokenizer->vocab_size(),
            " tokens but the model's vocabulary is ", cfg.text.vocab);
  return c;
}

}  // namespace psa
