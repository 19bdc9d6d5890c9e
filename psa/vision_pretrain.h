// Vision pretraining: the stand-in for CLIP's pretraining in the synthetic world.
//
// The paper starts from a CLIP ViT that already knows what a flag, a syringe or a red circle looks like; the
// safety head of Stage I only has to read those concepts off frozen features. A tiny ViT trained from scratch
// knows nothing, and learning to see through the language-model loss alone is slow (in the tiny preset the
// base VLM's clean-question accuracy stayed near chance after 1600 steps). So before the LLaVA-style base
// training, the ViT learns the generator's visual vocabulary from the scene descriptions the generator
// writes into each record's "meta": which motif is drawn and how large, how many objects there are, and per
// cell of the 3x3 grid which shape of which colour sits there, and for every patch which motif (if any) it
// shows. These are scene facts, not the safety labels (safe_level / safe_type are never used here). Like
// CLIP's web-scale corpus, the images are plentiful: fresh scenes from the generator's own seed stream each
// step (a tiny ViT trained on the 4800 base images alone overfits). The temporary classifiers are discarded
// afterwards; only the ViT keeps what it learned. With real data, load a pretrained CLIP instead.
#pragma once
#include <functional>

#include "nn/optim.h"
#include "psa/data.h"
#include "psa/synth.h"

namespace psa {

struct VisionPretrainOptions {
  int64_t steps = 300, batch = 64, warmup = 15;
  double lr = 2e-3, clip = 1.0;
  uint64_t seed = 42;
  bool progress = true;
  std::string log_path;  // JSONL, one line per step ("" = none)
};

struct VisionPretrainResult {
  int64_t steps = 0, examples = 0;  // examples: images seen
  double seconds = 0;
  std::vector<double> loss;  // per step
  json::Value heldout;        // accuracy per target (and per-motif recall) on the held-out split (null without one)
  json::Value stream_heldout;  // the same on 2048 scenes of the source that training never drew
};

// Where the images come from: `draw(first, n)` returns scenes first .. first + n - 1 (pixels preprocessed,
// record.meta holding the scene description); `words` lists every motif, shape and colour they may name.
struct SceneSource {
  SceneWords words;
  std::function<std::vector<Example>(int64_t first, int64_t n)> draw;
};
// The synthetic world's endless stream (psa/synth.h vision_scene), preprocessed to image_size.
SceneSource synthetic_scenes(const SynthConfig& cfg, int64_t image_size);

// Trains the vision tower (only) on the scene targets; `heldout` (may be null; records with meta) is scored.
VisionPretrainResult pretrain_vision(PsaVlm& m, const SceneSource& source, const Dataset* heldout,
                                     const VisionPretrainOptions& o);

}  // namespace psa
