// Tensors <-> safetensors files, and import of Hugging Face model folders.
#pragma once
#include <filesystem>
#include <functional>
#include <map>
#include <string>

#include "nn/json.h"
#include "nn/module.h"

namespace psa::nn {

using StateDict = std::map<std::string, Tensor>;

// Every tensor of a file, converted to the engine's dtypes (F16/BF16 -> f32, I8/U8/BOOL -> i32).
StateDict read_tensors(const std::string& path, std::map<std::string, std::string>* metadata = nullptr);
// For files this writer made (a checkpoint, a training state): fails unless `metadata` (read_tensors') holds the
// hashes it writes, so a file whose hashes were stripped along with an edit is not taken for a foreign one.
void require_hashes(const std::string& path, const std::map<std::string, std::string>& metadata);
// Writes atomically with an xxHash64 per tensor in the metadata (verified by read_tensors).
void write_tensors(const std::string& path, const StateDict& tensors, const std::map<std::string, std::string>& metadata = {});

// A model folder with config.json + model.safetensors (or a sharded index).
struct HfFolder {
  json::Value config;
  StateDict weights;
  std::string dir;
};
HfFolder read_hf_folder(const std::string& dir);

// Loads `weights` into `model`, mapping every key through `rename` first (the older and newer HF layouts).
void load_renamed(Module& model, const StateDict& weights, const std::function<std::string(const std::string&)>& rename,
                  const std::string& source, bool strict = true);

// Key layouts of LLaVA checkpoints -> the engine's (= the PSA-VLM reference's) names:
//   vision_tower.X (llava-hf) / model.vision_tower.X (transformers 5)  -> vision_tower.vision_model.X
//   model.multi_modal_projector.X                                      -> multi_modal_projector.X
//   model.language_model.X (transformers 5)                            -> language_model.model.X
//   lm_head.weight (transformers 5)                                    -> language_model.lm_head.weight
std::string llava_key(const std::string& key);
// CLIP: strips "vision_model." / "vision_tower.vision_model." prefixes.
std::string clip_key(const std::string& key);

// Runs f(); a std::filesystem error (a symlink loop, a directory without permission) becomes one psa::Error line
// naming the path, "a/b: cannot access: Too many levels of symbolic links", instead of the library's
// "filesystem error: status: ... [a/b]".
template <typename F>
auto naming_fs_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::filesystem::filesystem_error& e) {
    fail(e.path1().empty() ? std::string("filesystem") : e.path1().string(), ": cannot access: ", e.code().message());
  }
}

}  // namespace psa::nn
