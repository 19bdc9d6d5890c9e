// Optimizer bookkeeping around the fused kernels of tensor/cpu/optim.cpp and tensor/cuda/optim.cu: validation with errors that name the
// parameter, the state tensors, the step count, clipping over many tensors, and the LR schedules.
#include "nn/optim.h"

#include <cmath>
#include <map>
#include <set>

#include "tensor/dispatch.h"

namespace psa::nn {

namespace {

// A gradient must live where its parameter does: the fused kernels run on that one device.
void require_device(const char* who, const std::string& what, const Tensor& t, Device d) {
  PSA_CHECK(t.device() == d, who, ": ", what, " is on ", device_name(t.device()), " but its parameter is on ",
            device_name(d));
}

std::string key_of(const std::string& param, const char* moment) { return param + "." + moment; }

// The tensor `key` of `state`, checked against the parameter it belongs to and converted to its dtype.
Tensor state_entry(const std::map<std::string, Tensor>& state, const std::string& key, const Tensor& param) {
  auto it = state.find(key);
  PSA_CHECK(it != state.end(), "AdamW::load_state: missing '", key, "'");
  PSA_CHECK(it->second.shape() == param.shape(), "AdamW::load_state: '", key, "' has shape ",
            shape_str(it->second.shape()), ", the parameter has ", shape_str(param.shape()));
  return it->second.to(param.dtype());
}

}  // namespace

std::vector<ParamRef> trainable(const Module& m) {
  std::vector<ParamRef> out;
  for (auto& [name, t] : m.named_parameters())
    if (t.requires_grad()) out.push_back({name, t});
  return out;
}

// ---- Optimizer

Optimizer::Optimizer(std::vector<ParamRef> params, double lr, const char* name)
    : params_(std::move(params)), name_(name) {
  std::set<std::string> seen;
  std::map<const Storage*, std::string> memory;
  for (const ParamRef& r : params_) {
    PSA_CHECK(r.param.defined(), name_, ": parameter '", r.name, "' is undefined");
    PSA_CHECK(is_float(r.param.dtype()), name_, ": parameter '", r.name, "' is ", dtype_name(r.param.dtype()));
    // Names key the optimizer state in checkpoints, so two parameters under one name would share it.
    PSA_CHECK(seen.insert(r.name).second, name_, ": parameter name '", r.name, "' appears twice");
    // One buffer under two names would be stepped twice a step (and raced on by one fused CUDA launch).
    auto [it, fresh] = memory.emplace(r.param.impl()->storage.get(), r.name);
    PSA_CHECK(fresh, name_, ": parameters '", it->second, "' and '", r.name, "' are the same tensor (or share its memory)");
  }
  set_lr(lr);
}

void Optimizer::zero_grad() {
  for (ParamRef& r : params_) r.param.zero_grad();
}

void Optimizer::set_lr(double lr) {
  PSA_CHECK(lr >= 0 && std::isfinite(lr), name_, ": bad learning rate ", lr);
  lr_ = lr;
}

void Optimizer::check_grads() const {
  for (const ParamRef& r : params_) {
    Tensor g = r.param.grad();
    if (!g.defined()) continue;
    require_device(name_, "gradient of '" + r.name + "'", g, r.param.device());
    PSA_CHECK(g.shape() == r.param.shape() && g.dtype() == r.param.dtype(), name_, ": gradient of '", r.name,
              "' is ", shape_str(g.shape()), " ", dtype_name(g.dtype()), ", the parameter ",
              shape_str(r.param.shape()), " ", dtype_name(r.param.dtype()));
  }
}

// ---- AdamW

AdamW::AdamW(std::vector<ParamRef> params, double lr, AdamWOptions options)
    : Optimizer(std::move(params), lr, "AdamW"), options_(options) {
  const AdamWOptions& o = options_;
  PSA_CHECK(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, "AdamW: betas (", o.beta1, ", ", o.beta2,
            ") must lie in [0, 1)");
  PSA_CHECK(o.eps >= 0 && o.weight_decay >= 0, "AdamW: eps ", o.eps, " and weight_decay ", o.weight_decay,
            " must be >= 0");
  // Allocated up front (torch does it at the first update) so that state() always has every key.
  for (const ParamRef& r : params_) {
    exp_avg_.push_back(Tensor::zeros(r.param.shape(), r.param.dtype(), r.param.device()));
    exp_avg_sq_.push_back(Tensor::zeros(r.param.shape(), r.param.dtype(), r.param.device()));
  }
}

void AdamW::update() {
  check_grads();
  for (size_t i = 0; i < params_.size(); ++i)
    // Module::to() swaps a parameter's storage in place; moments made before that would no longer fit.
    PSA_CHECK(params_[i].param.dtype() == exp_avg_[i].dtype() && params_[i].param.device() == exp_avg_[i].device(),
              "AdamW: parameter '", params_[i].name, "' changed dtype or device after the optimizer was built");
  ++step_;
  std::vector<Tensor> grads(params_.size());
  std::vector<cpu::AdamWSlot> slots;
  for (size_t i = 0; i < params_.size(); ++i) {
    grads[i] = params_[i].param.grad();
    if (!grads[i].defined()) continue;
    const cpu::AdamWCoeffs c{lr_ * params_[i].lr_scale, options_.beta1, options_.beta2, options_.eps,
                             options_.weight_decay, step_};
    slots.push_back({&params_[i].param, &exp_avg_[i], &exp_avg_sq_[i], &grads[i], c});
  }
  for (Device d : {Device::cpu, Device::cuda}) {  // one call per device: on a GPU, one launch for all
    std::vector<cpu::AdamWSlot> on;
    for (const cpu::AdamWSlot& s : slots)
      if (s.p->device() == d) on.push_back(s);
    if (!on.empty()) PSA_KERNEL(d, adamw_steps)(on);
  }
  for (const cpu::AdamWSlot& s : slots) s.p->bump_version(), s.m->bump_version(), s.v->bump_version();
}

std::map<std::string, Tensor> AdamW::state() const {
  std::map<std::string, Tensor> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out[key_of(params_[i].name, "exp_avg")] = exp_avg_[i].clone();
    out[key_of(params_[i].name, "exp_avg_sq")] = exp_avg_sq_[i].clone();
  }
  return out;
}

void AdamW::load_state(const std::map<std::string, Tensor>& state, int64_t step) {
  PSA_CHECK(step >= 0, "AdamW::load_state: negative step ", step);
  std::set<std::string> expected;
  std::vector<Tensor> m, v;  // everything is checked before anything is overwritten
  for (const ParamRef& r : params_) {
    expected.insert({key_of(r.name, "exp_avg"), key_of(r.name, "exp_avg_sq")});
    m.push_back(state_entry(state, key_of(r.name, "exp_avg"), r.param));
    v.push_back(state_entry(state, key_of(r.name, "exp_avg_sq"), r.param));
  }
  for (auto& [key, t] : state)
    PSA_CHECK(expected.count(key), "AdamW::load_state: unexpected '", key, "' (no such parameter)");
  for (size_t i = 0; i < params_.size(); ++i) {
    exp_avg_[i].contiguous_copy_from(m[i]);
    exp_avg_sq_[i].contiguous_copy_from(v[i]);
  }
  step_ = step;
}

// ---- SGD

SGD::SGD(std::vector<ParamRef> params, double lr, SgdOptions options)
    : Optimizer(std::move(params), lr, "SGD"), options_(options), momentum_buffer_(params_.size()) {
  const SgdOptions& o = options_;
  PSA_CHECK(o.momentum >= 0 && o.weight_decay >= 0, "SGD: momentum ", o.momentum, " and weight_decay ",
            o.weight_decay, " must be >= 0");
  PSA_CHECK(!o.nesterov || (o.momentum > 0 && o.dampening == 0), "SGD: nesterov needs momentum and no dampening");
}

void SGD::update() {
  check_grads();
  ++step_;
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor g = params_[i].param.grad();
    if (!g.defined()) continue;
    Tensor& buf = momentum_buffer_[i];
    const bool first = !buf.defined();
    if (first && options_.momentum != 0) buf = Tensor::empty(g.shape(), g.dtype(), g.device());
    const cpu::SgdCoeffs c{lr_ * params_[i].lr_scale, options_.momentum,  options_.dampening,
                           options_.weight_decay,     options_.nesterov, first};
    PSA_KERNEL(g.device(), sgd_step)(params_[i].param, g, buf, c);
    params_[i].param.bump_version();
    if (buf.defined()) buf.bump_version();
  }
}

// ---- clipping

double clip_grad_norm(const std::vector<ParamRef>& params, double max_norm) {
  PSA_CHECK(max_norm > 0, "clip_grad_norm: max_norm ", max_norm, " must be > 0");
  std::vector<Tensor> grads;
  for (const ParamRef& r : params) {
    Tensor g = r.param.grad();
    if (!g.defined()) continue;
    require_device("clip_grad_norm", "gradient of '" + r.name + "'", g, r.param.device());
    PSA_CHECK(grads.empty() || g.device() == grads[0].device(), "clip_grad_norm: gradient of '", r.name, "' is on ",
              device_name(g.device()), ", the first one on ", device_name(grads[0].device()));
    grads.push_back(g);
  }
  if (grads.empty()) return 0;
  // One call for all gradients: on a GPU, one wait for the device per step instead of one per parameter.
  const double norm = std::sqrt(PSA_KERNEL(grads[0].device(), sum_squares)(grads));
  const double coef = max_norm / (norm + 1e-6);
  if (!std::isfinite(norm) || coef >= 1) return norm;
  // Each buffer once: two parameters may hold one gradient tensor (given with set_grad; backward() copies a shared
  // one), and one launch scaling it twice at once would race.
  std::vector<Tensor> distinct;
  std::set<const void*> seen;
  for (const Tensor& g : grads)
    if (seen.insert(g.raw()).second) distinct.push_back(g);
  PSA_KERNEL(grads[0].device(), scale_in_place)(distinct, coef);
  for (const Tensor& g : distinct) g.bump_version();
  return norm;
}

// ---- schedules

double lr_at(const Schedule& s, int64_t step) {
  PSA_CHECK(step >= 0 && s.warmup_steps >= 0 && s.total_steps >= 0, "lr_at: negative step ", step, ", warmup ",
            s.warmup_steps, " or total ", s.total_steps);
  // HF divides by max(1, ·) so that zero warmup or zero decay steps never divide by zero.
  if (step < s.warmup_steps) return s.peak_lr * double(step) / double(std::max<int64_t>(1, s.warmup_steps));
  const double decay_steps = double(std::max<int64_t>(1, s.total_steps - s.warmup_steps));
  const double progress = std::min(1.0, double(step - s.warmup_steps) / decay_steps);
  switch (s.kind) {
    case Schedule::constant: return s.peak_lr;
    case Schedule::linear: return s.peak_lr * std::max(0.0, double(s.total_steps - step) / decay_steps);
    case Schedule::cosine: return s.min_lr + (s.peak_lr - s.min_lr) * 0.5 * (1 + std::cos(M_PI * progress));
  }
  fail("lr_at: unknown schedule kind ", int(s.kind));
}

}  // namespace psa::nn
