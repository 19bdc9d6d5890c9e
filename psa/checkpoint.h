// A PSA-VLM checkpoint is a folder: model.safetensors (reference parameter names, with the model config, the
// stage and the LoRA settings in the metadata and an xxHash64 per tensor), config.json and tokenizer.json.
#pragma once
#include <memory>

#include "psa/model.h"
#include "psa/tokenizer.h"

namespace psa {

struct LoraSettings {
  int64_t rank = 0;  // 0 = none
  double alpha = 0, dropout = 0;
  bool include_lm_head = false;
};

struct Checkpoint {
  std::shared_ptr<PsaVlm> model;
  std::shared_ptr<Tokenizer> tokenizer;
  std::string stage;  // base | stage1 | stage2
  LoraSettings lora;
  std::string dir;
};

// Writes into `dir` (created); every file is written atomically, model.safetensors last.
void save_checkpoint(const std::string& dir, const PsaVlm& model, const Tokenizer& tok, const std::string& stage,
                     const LoraSettings& lora);
Checkpoint load_checkpoint(const std::string& dir);

}  // namespace psa
