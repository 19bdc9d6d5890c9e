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

Checkpoint load_checkpoint(const std::string& dir) {
  fs::path model_path = fs::path(dir) / "model.safetensors";
  PSA_CHECK(fs::exists(model_path), dir, ": no model.safetensors (is this a checkpoint folder? `psa train` writes them)");
  std::map<std::string, std::string> meta;
  nn::StateDict sd = nn::read_tensors(model_path.string(), &meta);
  PSA_CHECK(meta.count("config"), model_path.string(), ": no 'config' in the metadata");
  Checkpoint c;
  c.dir = dir;
  c.stage = meta.count("stage") ? meta["stage"] : "unknown";
  PsaConfig cfg = PsaConfig::from_json(json::parse(meta["config"], model_path.string() + " metadata 'config'"));
  c.model = std::make_shared<PsaVlm>(cfg);
  if (meta.count("lora")) {
    json::Value l = json::parse(meta["lora"], model_path.string() + " metadata 'lora'");
    c.lora.rank = l.at("rank").as_int();
    c.lora.alpha = l.at("alpha").as_number();
    c.lora.dropout = l.at("dropout").as_number();
    c.lora.include_lm_head = l.at("include_lm_head").as_bool();
    if (c.lora.rank > 0) c.model->add_lora(c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.include_lm_head);
  }
  c.model->load_state_dict(sd, true, model_path.string());
  c.tokenizer = std::make_shared<Tokenizer>(Tokenizer::load((fs::path(dir) / "tokenizer.json").string()));
  PSA_CHECK(c.tokenizer->vocab_size() <= cfg.text.vocab, dir, ": tokenizer has ", c.tokenizer->vocab_size(),
            " tokens but the model's vocabulary is ", cfg.text.vocab);
  return c;
}

}  // namespace psa
