// Stage training (psa-vlm.md §4): which parameters train in each stage, which data each stage sees, and the
// loop (AdamW, warmup + linear decay, global-norm clipping, seeded shuffling, NaN guard, JSONL log, resume).
#pragma once
#include "nn/optim.h"
#include "psa/checkpoint.h"
#include "psa/data.h"

namespace psa {

struct StageOptions {
  std::string stage;  // base | stage1 | stage2
  int64_t steps = 100, batch = 16, warmup = 20;
  double lr = 1e-3, clip = 1.0, weight_decay = 0;
  double vision_lr_scale = 1.0;  // the ViT's learning rate relative to lr (base stage; the others freeze it)
  // Base stage: the vision pretraining that came before it (psa train's --steps-vision, --batch-vision), which a
  // resume does not repeat: recorded with the options, so a resume cannot silently stand for another run.
  int64_t vision_steps = 0, vision_batch = 0;
  uint64_t seed = 42;
  LoraSettings lora;        // stage2: adapters on every LLM linear (rank 0 = full fine-tune of the LLM)
  std::string log_path;     // JSONL, one line per step ("" = none)
  // Training state (model weights, AdamW moments, step, data position, losses: one atomically written
  // safetensors file, so a kill at any moment leaves the previous state whole) saved here every
  // `state_every` steps and at the end ("" = none).
  std::string state_path;
  int64_t state_every = 0;
  std::string resume_from;  // a training state to continue from: the model's weights are replaced by its own
  // Every state records the options that decide the result (seed, batch, steps, learning rates, warmup, LoRA,
  // and `preset` when set), by the `psa train` flag that sets them; a resume with any other value is refused,
  // naming the flag and both values (a longer run too: the linear decay depends on the total).
  std::string preset;
  // xxh64 of the records file the stage trains on, recorded like the options ("" = not known yet): a resume on
  // other data would silently mix two datasets in one run.
  std::string data_xxh64;
  // And of the tokenizer's vocabulary (token texts in id order, which BPE adds in merge order): a tokenizer
  // replaced between a kill and --resume would train the rest of the stage on other ids.
  std::string tokenizer_xxh64;
  int64_t max_bad_steps = 5;  // a non-finite loss or gradient skips the step; this many in a row stop the run
  bool progress = true;
  int64_t stop_after = 0;   // testing: return after this many steps of this call (0 = run to the end)
  Device device = Device::cpu;  // where the model, the batches and the optimizer live during the stage
};

struct StageResult {
  int64_t steps = 0;    // steps run so far, skipped ones included (the schedule's position)
  int64_t skipped = 0;  // steps skipped for a non-finite loss or gradient
  int64_t resumed_at = 0;  // the step a resumed run continued from (0: a fresh start); seconds count from there
  double seconds = 0, tokens_per_second = 0;
  std::vector<double> loss, loss_lm, loss_level, loss_type;  // per step
};

// Freezes everything, then unfreezes the stage's set: base = vision, projector, LLM; stage1 = safety tokens,
// safety projector, cross-attention and heads; stage2 = the LoRA matrices (added here if missing), or the
// whole LLM when lora.rank == 0.
void set_trainable(PsaVlm& m, const std::string& stage, const LoraSettings& lora, uint64_t seed = 0);
// Stage I sees every risky record plus clean ones in the reference ratio (3000 clean : 11.2k risky, seed 42);
// the other stages see everything.
std::vector<int64_t> stage_indices(const Dataset& d, const std::string& stage, uint64_t seed);

// Refuses o.resume_from when its recorded options differ from o's (train_stage checks too, when it loads the
// state): lets `psa train` check every stage's state before any work. A state without a record passes silently
// here; train_stage warns about it.
void check_resume_options(const StageOptions& o);

// The model is moved to o.device for the stage and left there (checkpoint writers copy to the host).
StageResult train_stage(PsaVlm& m, const Dataset& data, const StageOptions& o);

// Bytes a CPU training step of `batch` rows holds at its peak, from the dimensions alone: per row what backward
// keeps and the allocator holds (per token and layer about 8 hidden-wide and 5 intermediate-wide vectors in the
// LLM, 8 and 4 in the ViT) at max_text_tokens, plus weights, gradients and AdamW's two moments. Fitted to
// bench-step's peak RSS, base stage: 6.4 MiB more a row from batch 64 to 128 (tiny, 32 text tokens; this gives
// 5.9) and 49 MiB from 8 to 16 (small, 48 tokens; this gives 52).
double step_memory_estimate(const PsaConfig& c, int64_t batch);
// Refuses a batch whose estimate is more than the memory available to this process (MemAvailable, and the
// cgroup's limit when there is one), naming the option, both sizes and the largest batch that fits: the
// kernel would otherwise kill the run with no message. Does nothing where neither can be read.
void check_batch_fits_memory(const std::string& what, const PsaConfig& c, int64_t batch);

}  // namespace psa
