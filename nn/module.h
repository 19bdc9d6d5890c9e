// Module: named parameters and children, with dotted names identical to the Hugging Face / reference state
// dicts so that checkpoints round-trip with other tools. A child may be registered under a dotted name
// ("layers.3", "vision_tower.vision_model") to reproduce nested HF names without empty container modules.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "autograd/ops.h"

namespace psa::nn {

// How initialize() fills a parameter. Seeds are derived from (model seed, full parameter name), so the values
// do not depend on construction order or on which other modules exist.
struct Init {
  enum Kind { normal, zeros, ones, xavier_uniform, kaiming_uniform } kind = normal;
  double std = 0.02;
};

class Module {
 public:
  virtual ~Module() = default;

  // All parameters with their full dotted names, depth-first in registration order.
  std::vector<std::pair<std::string, Tensor>> named_parameters() const;
  std::map<std::string, Tensor> state_dict() const;
  Tensor parameter(const std::string& name) const;  // throws when missing
  int64_t num_parameters(bool trainable_only = false) const;

  // Copies values into the existing parameters (shapes must match; dtype converted). Missing or unexpected
  // keys are errors when strict, naming `source` and the key.
  void load_state_dict(const std::map<std::string, Tensor>& sd, bool strict = true,
                       const std::string& source = "state_dict");

  // requires_grad on every parameter whose full name starts with `prefix` ("" = all).
  void freeze(const std::string& prefix = "");
  void unfreeze(const std::string& prefix = "");
  void zero_grad();

  void train(bool on = true);
  void eval() { train(false); }
  bool training() const { return training_; }

  void initialize(uint64_t seed);
  // Only the parameters whose full name contains `part` (e.g. adapters added after initialisation).
  void initialize_matching(uint64_t seed, const std::string& part);
  // Changes the standard deviation of every normal-initialised parameter of this module and its children
  // (the 0.02 of 7B-scale models is 4x smaller than 1/sqrt(width) at width 128).
  void set_normal_init_std(double std);
  void to(Device device);  // moves every parameter in place (handles stay valid)
  void to(DType dtype);

 protected:
  // Registers a parameter created with `shape` and filled by initialize() with `init`.
  Tensor register_parameter(const std::string& name, const Shape& shape, Init init = {});
  template <typename M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> m) {
    children_.emplace_back(name, m);
    return m;
  }

 private:
  struct Param {
    std::string name;
    Tensor tensor;
    Init init;
  };
  void collect(const std::string& prefix, std::vector<std::pair<std::string, const Param*>>& out) const;
  void set_training(bool on);

  std::vector<Param> params_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

// ---- basic layers, HF names: weight/bias
class Linear : public Module {
 public:
  Linear(int64_t in, int64_t out, bool bias = true);
  Tensor forward(const Tensor& x) const;
  Tensor forward_act(const Tensor& x, const std::string& act) const;  // activation(forward(x), act), fused
  Tensor weight, bias;  // [out, in], [out]
  int64_t in_features, out_features;
  // LoRA (Hu et al. 2021): y = x·Wᵀ + b + (alpha/r)·dropout(x)·Aᵀ·Bᵀ, A [r, in] kaiming-uniform, B [out, r] zero.
  void add_lora(int64_t rank, double alpha, double dropout);
  bool has_lora() const { return lora_rank > 0; }
  void merge_lora();    // W += (alpha/r)·B·A, then the adapter is inactive until unmerge
  void unmerge_lora();  // W -= (alpha/r)·B·A
  Tensor lora_A, lora_B;
  int64_t lora_rank = 0;
  double lora_alpha = 0, lora_dropout = 0;
  bool lora_merged = false;
  uint64_t dropout_seed = 0, dropout_offset = 0;  // set by the trainer: a seed per adapter, the step
};

class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5);
  Tensor forward(const Tensor& x) const { return layer_norm(x, weight, bias, eps); }
  Tensor weight, bias;
  double eps;
};

class RMSNorm : public Module {
 public:
  explicit RMSNorm(int64_t dim, double eps = 1e-5);
  Tensor forward(const Tensor& x) const { return rms_norm(x, weight, eps); }
  Tensor weight;
  double eps;
};

class Embedding : public Module {
 public:
  Embedding(int64_t vocab, int64_t dim);
  Tensor forward(const Tensor& ids) const { return embedding(weight, ids); }
  Tensor weight;
};

}  // namespace psa::nn
