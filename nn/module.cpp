#include "nn/module.h"

#include <cmath>

#include "autograd/gradcheck.h"

namespace psa::nn {

void Module::collect(const std::string& prefix, std::vector<std::pair<std::string, const Param*>>& out) const {
  for (const Param& p : params_) out.emplace_back(prefix + p.name, &p);
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
}

std::vector<std::pair<std::string, Tensor>> Module::named_parameters() const {
  std::vector<std::pair<std::string, const Param*>> all;
  collect("", all);
  std::vector<std::pair<std::string, Tensor>> out;
  for (auto& [name, p] : all) out.emplace_back(name, p->tensor);
  return out;
}

std::map<std::string, Tensor> Module::state_dict() const {
  std::map<std::string, Tensor> sd;
  for (auto& [name, t] : named_parameters()) sd.emplace(name, t);
  return sd;
}

Tensor Module::parameter(const std::string& name) const {
  for (auto& [n, t] : named_parameters())
    if (n == name) return t;
  fail("no parameter named '", name, "'");
}

int64_t Module::num_parameters(bool trainable_only) const {
  int64_t n = 0;
  for (auto& [name, t] : named_parameters())
    if (!trainable_only || t.requires_grad()) n += t.numel();
  return n;
}

void Module::load_state_dict(const std::map<std::string, Tensor>& sd, bool strict, const std::string& source) {
  auto params = named_parameters();
  std::map<std::string, bool> used;
  for (auto& [name, t] : params) {
    auto it = sd.find(name);
    if (it == sd.end()) {
      PSA_CHECK(!strict, source, ": missing tensor '", name, "' ", shape_str(t.shape()));
      continue;
    }
    PSA_CHECK(it->second.shape() == t.shape(), source, ": tensor '", name, "' has shape ",
              shape_str(it->second.shape()), ", the model expects ", shape_str(t.shape()));
    PSA_CHECK(is_float(it->second.dtype()), source, ": tensor '", name, "' has dtype ",
              dtype_name(it->second.dtype()), ", expected a floating type");
    Tensor(t).contiguous_copy_from(it->second.to(t.dtype()).to(t.device()));
    used[name] = true;
  }
  if (!strict) return;
  for (auto& [name, t] : sd)
    PSA_CHECK(used.count(name), source, ": unexpected tensor '", name, "' ", shape_str(t.shape()),
              " (not a parameter of this model)");
}

void Module::freeze(const std::string& prefix) {
  for (auto& [name, t] : named_parameters())
    if (name.compare(0, prefix.size(), prefix) == 0) Tensor(t).requires_grad_(false);
}

void Module::unfreeze(const std::string& prefix) {
  for (auto& [name, t] : named_parameters())
    if (name.compare(0, prefix.size(), prefix) == 0) Tensor(t).requires_grad_(true);
}

void Module::zero_grad() {
  for (auto& [name, t] : named_parameters()) Tensor(t).zero_grad();
}

void Module::set_training(bool on) {
  training_ = on;
  for (auto& [name, child] : children_) child->set_training(on);
}
void Module::train(bool on) { set_training(on); }

Tensor Module::register_parameter(const std::string& name, const Shape& shape, Init init) {
  Tensor t = Tensor::zeros(shape);
  t.requires_grad_(true);
  params_.push_back({name, t, init});
  return t;
}

namespace {

uint64_t name_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull ^ seed;  // FNV-1a, then splitmix64 to spread the bits
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  h += 0x9E3779B97F4A7C15ull;
  h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
  h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
  return h ^ (h >> 31);
}

// fan_in / fan_out of a weight [out, in, k...] as torch computes them.
std::pair<double, double> fans(const Shape& s) {
  double receptive = 1;
  for (size_t i = 2; i < s.size(); ++i) receptive *= s[i];
  double in = s.size() > 1 ? s[1] * receptive : s[0], out = s[0] * receptive;
  return {in, out};
}

}  // namespace

void Module::initialize(uint64_t seed) { initialize_matching(seed, ""); }

void Module::initialize_matching(uint64_t seed, const std::string& part) {
  std::vector<std::pair<std::string, const Param*>> all;
  collect("", all);
  for (auto& [name, p] : all) {
    if (name.find(part) == std::string::npos) continue;
    Tensor t = p->tensor;
    uint64_t s = name_seed(seed, name);
    Tensor v;
    auto [fan_in, fan_out] = fans(t.shape());
    switch (p->init.kind) {
      case Init::normal: v = randn(t.shape(), s, DType::f64, p->init.std); break;
      case Init::zeros: v = Tensor::zeros(t.shape(), DType::f64); break;
      case Init::ones: v = Tensor::ones(t.shape(), DType::f64); break;
      case Init::xavier_uniform: {
        double a = std::sqrt(6.0 / (fan_in + fan_out));
        v = rand_uniform(t.shape(), s, -a, a, DType::f64);
        break;
      }
      case Init::kaiming_uniform: {  // torch's Linear default, a = sqrt(5): bound = 1/sqrt(fan_in)
        double a = 1.0 / std::sqrt(fan_in);
        v = rand_uniform(t.shape(), s, -a, a, DType::f64);
        break;
      }
    }
    t.contiguous_copy_from(v.to(t.dtype()).to(t.device()));
  }
}

void Module::set_normal_init_std(double std) {
  for (Param& p : params_)
    if (p.init.kind == Init::normal) p.init.std = std;
  for (auto& [name, child] : children_) child->set_normal_init_std(std);
}

void Module::to(Device device) {
  for (auto& [name, t] : named_parameters()) {
    if (t.device() == device) continue;
    Tensor moved = t.to(device);
    t.impl()->storage = moved.impl()->storage;
    t.impl()->offset = 0;
    t.zero_grad();
  }
}

void Module::to(DType dtype) {
  for (auto& [name, t] : named_parameters()) {
    if (t.dtype() == dtype) continue;
    Tensor conv = t.to(dtype);
    t.impl()->storage = conv.impl()->storage;
    t.impl()->offset = 0;
    t.impl()->dtype = dtype;
    t.zero_grad();
  }
}

// ---- layers

Linear::Linear(int64_t in, int64_t out, bool with_bias) : in_features(in), out_features(out) {
  weight = register_parameter("weight", {out, in}, {Init::normal, 0.02});
  if (with_bias) bias = register_parameter("bias", {out}, {Init::zeros});
}

Tensor Linear::forward(const Tensor& x) const {
  Tensor y = linear(x, weight, bias);
  if (lora_rank == 0 || lora_merged) return y;
  Tensor h = x;
  if (training() && lora_dropout > 0) h = dropout(h, lora_dropout, dropout_seed, dropout_offset);
  Tensor delta = linear(linear(h, lora_A), lora_B);
  double scale = lora_alpha / lora_rank;
  // x·1 is x exactly, forward and backward: at alpha = r (this project's default) the multiply is skipped
  return add(y, scale == 1 ? delta : mul_scalar(delta, scale));
}

// The bias add and the activation fuse (linear_act) unless an unmerged LoRA delta comes between them.
Tensor Linear::forward_act(const Tensor& x, const std::string& act) const {
  if (lora_rank > 0 && !lora_merged) return activation(forward(x), act);
  return linear_act(x, weight, bias, act);
}

void Linear::add_lora(int64_t rank, double alpha, double drop) {
  PSA_CHECK(rank > 0 && lora_rank == 0, "add_lora: rank ", rank, " on a Linear that has rank ", lora_rank);
  lora_rank = rank;
  lora_alpha = alpha;
  lora_dropout = drop;
  lora_A = register_parameter("lora_A.weight", {rank, in_features}, {Init::kaiming_uniform});
  lora_B = register_parameter("lora_B.weight", {out_features, rank}, {Init::zeros});
}

void Linear::merge_lora() {
  PSA_CHECK(lora_rank > 0 && !lora_merged, "merge_lora: no unmerged adapter");
  NoGrad ng;
  Tensor w = add(weight, mul_scalar(matmul(lora_B, lora_A), lora_alpha / lora_rank));
  Tensor(weight).contiguous_copy_from(w);
  lora_merged = true;
}

void Linear::unmerge_lora() {
  PSA_CHECK(lora_rank > 0 && lora_merged, "unmerge_lora: no merged adapter");
  NoGrad ng;
  Tensor w = sub(weight, mul_scalar(matmul(lora_B, lora_A), lora_alpha / lora_rank));
  Tensor(weight).contiguous_copy_from(w);
  lora_merged = false;
}

LayerNorm::LayerNorm(int64_t dim, double e) : eps(e) {
  weight = register_parameter("weight", {dim}, {Init::ones});
  bias = register_parameter("bias", {dim}, {Init::zeros});
}

RMSNorm::RMSNorm(int64_t dim, double e) : eps(e) { weight = register_parameter("weight", {dim}, {Init::ones}); }

Embedding::Embedding(int64_t vocab, int64_t dim) {
  weight = register_parameter("weight", {vocab, dim}, {Init::normal, 0.02});
}

}  // namespace psa::nn
