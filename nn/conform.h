// Conformance against golden data from Hugging Face / timm / torch (the fixture format of tests/data/hf):
// config.json + model.safetensors + io.safetensors with inputs, outputs, the loss and every gradient.
#pragma once
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace psa::nn {

struct ConformEntry {
  std::string name;  // e.g. "logits", "loss", "grad.model.layers.0.mlp.up_proj.weight", "nograd.post_layernorm.weight"
  double rel_err;    // ‖ours − theirs‖ / ‖theirs‖ (absolute norm when theirs is 0); +Inf for "unchecked.<key>",
                     // a stored tensor this model has no output or parameter for
  bool ok;
};

struct ConformReport {
  std::string kind;  // clip_vision, llama, llava, c_abstractor, mha
  std::vector<ConformEntry> entries;
  double tolerance = 1e-4;
  bool ok() const;
  double worst() const;
};

// Runs forward and backward on `device` from the folder's weights and inputs; compares everything stored.
ConformReport conform(const std::string& dir, Device device = Device::cpu, double tolerance = 1e-4);
std::string detect_kind(const std::string& dir);

}  // namespace psa::nn
