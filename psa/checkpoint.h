// A PSA-VLM checkpoint is a folder: model.safetensors (reference parameter names, with the model config, the
// stage, the LoRA settings and the xxHash64 of its tokenizer.json in the metadata and an xxHash64 per tensor),
// config.json and tokenizer.json.
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

// The LoRA settings a checkpoint may hold: load_checkpoint refuses others, and `psa train` checks its options
// against the same bounds before training, so that it never writes a checkpoint it cannot load. Rank 0 (none)
// .. lora_max_rank; with adapters, alpha in (0, kMaxLoraAlpha] and dropout in [0, 1).
int64_t lora_max_rank(const PsaConfig& c);
constexpr double kMaxLoraAlpha = 1e4;

struct Checkpoint {
  std::shared_ptr<PsaVlm> model;
  std::shared_ptr<Tokenizer> tokenizer;
  std::string stage;  // base | stage1 | stage2
  LoraSettings lora;
  std::string dir;
};

// Writes into `dir` (created): every file is first written completely (each atomically) into a staging folder
// in `dir`, then the three are renamed into place, model.safetensors last (see the .cpp for why), so a failed
// write (a full disk, non-finite LoRA numbers) leaves the folder as it was.
void save_checkpoint(const std::string& dir, const PsaVlm& model, const Tokenizer& tok, const std::string& stage,
                     const LoraSettings& lora);
// Refuses a tokenizer.json that is not the one the model was saved with (naming the folder).
Checkpoint load_checkpoint(const std::string& dir);
// A lower bound on the parameters `c` builds (its large matrices).
double min_params(const PsaConfig& c);

// `c`'s model with every LoRA adapter folded into its weight, W + (alpha/r)·B·A (PEFT's merge_and_unload), as a
// new model without adapter tensors: saved with save_checkpoint and rank 0 it loads as a plain model whose
// weights are the ones eval and infer compute (they merge the same way). Leaves c.model merged.
std::shared_ptr<PsaVlm> merged_model(const Checkpoint& c);

// Removes what a killed writer left in `dir` (not below it): the atomic writers' temp files
// ".<name>.tmp.<pid>.<n>" (model.safetensors, report.json, a chart...) and save_checkpoint's staging folders
// ".checkpoint.tmp.<pid>.<n>", only where process <pid> is gone (or is this one: a stage that starts has
// nothing in flight). Returns how many were removed.
int remove_stale_temps(const std::string& dir);

}  // namespace psa
