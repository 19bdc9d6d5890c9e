#include "nn/conform.h"

#include <cmath>
#include <filesystem>

#include "nn/c_abstractor.h"
#include "nn/checkpoint.h"
#include "nn/llava.h"

namespace psa::nn {

bool ConformReport::ok() const {
  for (const ConformEntry& e : entries)
    if (!e.ok) return false;
  return !entries.empty();
}

double ConformReport::worst() const {
  double w = 0;
  for (const ConformEntry& e : entries) w = std::max(w, e.rel_err);
  return w;
}

std::string detect_kind(const std::string& dir) {
  json::Value c = json::parse_file((std::filesystem::path(dir) / "config.json").string());
  if (const json::Value* k = c.find("kind")) {
    std::string s = k->as_string();
    if (s == "c_abstractor") return s;
    if (s == "torch.nn.MultiheadAttention" || s == "mha") return "mha";
  }
  if (const json::Value* m = c.find("model_type")) {
    std::string s = m->as_string();
    if (s == "clip_vision_model" || s == "clip") return "clip_vision";
    if (s == "llama") return "llama";
    if (s == "llava") return "llava";
  }
  fail(dir, "/config.json: cannot tell the model kind (expected model_type clip_vision_model, llama or llava, or kind "
       "c_abstractor or torch.nn.MultiheadAttention)");
}

namespace {

constexpr double kNoiseRms = 1e-7;  // below this RMS a reference tensor is treated as zero

double rel_error(const Tensor& ours, const Tensor& theirs) {
  std::vector<double> a = ours.to_vector(), b = theirs.to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  // A gradient that is zero in exact arithmetic (e.g. the key bias of softmax attention, which shifts every
  // score of a row equally) is stored as rounding noise; compare such tensors by RMS instead of relatively.
  double n = std::max<size_t>(a.size(), 1);
  if (den / n < kNoiseRms * kNoiseRms) return std::sqrt(num / n);
  return std::sqrt(num / den);
}

struct Checker {
  ConformReport& report;
  const StateDict& io;
  void compare(const std::string& name, const Tensor& ours) {
    auto it = io.find(name);
    PSA_CHECK(it != io.end(), "conform: io.safetensors has no '", name, "'");
    Tensor theirs = it->second;
    if (name == "loss") theirs = reshape(theirs, {});
    PSA_CHECK(ours.defined(), "conform: no value computed for '", name, "'");
    Tensor o = ours.to(Device::cpu);
    PSA_CHECK(o.numel() == theirs.numel(), "conform: '", name, "': ours ", shape_str(o.shape()), " vs ",
              shape_str(theirs.shape()));
    double e = rel_error(o, theirs);
    report.entries.push_back({name, e, e <= report.tolerance && std::isfinite(e)});
  }
  // Parameter gradients: `grad_name(param)` gives the io key; a parameter without one must get no gradient.
  void compare_grads(const Module& m, const std::function<std::string(const std::string&)>& grad_name) {
    for (auto& [name, p] : m.named_parameters()) {
      std::string key = grad_name(name);
      if (io.count(key)) {
        compare(key, p.grad().defined() ? p.grad() : Tensor::zeros(p.shape()));
      } else {
        double norm = p.grad().defined() ? rel_error(p.grad(), Tensor::zeros(p.shape(), p.dtype())) : 0;
        report.entries.push_back({"nograd." + name, norm, norm == 0});
      }
    }
  }
};

Tensor input(const StateDict& io, const std::string& name, Device d, bool grad) {
  auto it = io.find(name);
  PSA_CHECK(it != io.end(), "conform: io.safetensors has no input '", name, "'");
  Tensor t = it->second.to(d);
  if (grad) t = t.clone().requires_grad_();
  return t;
}

Tensor weighted_loss(const Tensor& out, const StateDict& io, Device d) { return sum(mul(out, input(io, "loss_weight", d, false))); }

}  // namespace

ConformReport conform(const std::string& dir, Device device, double tolerance) {
  ConformReport r;
  r.kind = detect_kind(dir);
  r.tolerance = tolerance;
  HfFolder f = read_hf_folder(dir);
  StateDict io = read_tensors((std::filesystem::path(dir) / "io.safetensors").string());
  std::string src = dir + "/model.safetensors";
  Checker ck{r, io};
  auto same = [](const std::string& n) { return "grad." + n; };
  if (r.kind == "clip_vision") {
    ClipVision m(ClipConfig::from_json(f.config.find("vision_config") ? f.config.at("vision_config") : f.config));
    load_renamed(m, f.weights, clip_key, src);
    m.to(device);
    Tensor px = input(io, "pixel_values", device, true);
    ClipVision::Output out = m.forward(px);
    for (size_t i = 0; i < out.hidden_states.size(); ++i) ck.compare("hidden_states." + std::to_string(i), out.hidden_states[i]);
    ck.compare("last_hidden_state", out.last_hidden_state);
    ck.compare("pooler_output", out.pooler_output);
    Tensor feat = out.hidden_states[out.hidden_states.size() - 2];
    Tensor loss = weighted_loss(slice(feat, 1, 1, feat.size(1)), io, device);
    ck.compare("loss", loss);
    loss.backward();
    ck.compare_grads(m, same);
    ck.compare("grad_input.pixel_values", px.grad());
  } else if (r.kind == "llama") {
    LlamaForCausalLM m(LlamaConfig::from_json(f.config));
    load_renamed(m, f.weights, [](const std::string& k) { return k; }, src);
    m.to(device);
    auto out = m.forward(m.embed(input(io, "input_ids", device, false)), nullptr, true);
    for (size_t i = 0; i < out.hidden_states.size(); ++i)
      if (io.count("hidden_states." + std::to_string(i))) ck.compare("hidden_states." + std::to_string(i), out.hidden_states[i]);
    ck.compare("logits", out.logits);
    Tensor loss = LlamaForCausalLM::causal_lm_loss(out.logits, input(io, "labels", device, false));
    ck.compare("loss", loss);
    loss.backward();
    ck.compare_grads(m, same);
  } else if (r.kind == "llava") {
    auto m = Llava::from_config(f.config);
    load_renamed(*m, f.weights, llava_key, src);
    m->to(device);
    Tensor logits = m->forward(input(io, "pixel_values", device, false), input(io, "input_ids", device, false));
    ck.compare("logits", logits);
    Tensor loss = LlamaForCausalLM::causal_lm_loss(logits, input(io, "labels", device, false));
    ck.compare("loss", loss);
    loss.backward();
    ck.compare_grads(*m, [](const std::string& n) {  // io uses the transformers-5 in-memory names
      if (n.rfind("vision_tower.vision_model.", 0) == 0) return "grad.model.vision_tower." + n.substr(26);
      if (n.rfind("multi_modal_projector.", 0) == 0) return "grad.model." + n;
      if (n.rfind("language_model.model.", 0) == 0) return "grad.model.language_model." + n.substr(21);
      if (n == "language_model.lm_head.weight") return std::string("grad.lm_head.weight");
      return "grad." + n;
    });
  } else if (r.kind == "c_abstractor") {
    CAbstractor m(CAbstractorConfig::from_json(f.config));
    load_renamed(m, f.weights, [](const std::string& k) { return k; }, src);
    m.to(device);
    Tensor x = input(io, "x", device, true);
    Tensor y = m.forward(x);
    ck.compare("y", y);
    Tensor loss = weighted_loss(y, io, device);
    ck.compare("loss", loss);
    loss.backward();
    ck.compare_grads(m, same);
    ck.compare("grad_input.x", x.grad());
  } else {  // mha
    MultiheadAttention m(f.config.at("embed_dim").as_int(), f.config.at("num_heads").as_int());
    load_renamed(m, f.weights, [](const std::string& k) { return k; }, src);
    m.to(device);
    Tensor q = input(io, "query", device, true), kv = input(io, "key_value", device, true);
    Tensor y = m.forward(q, kv);
    ck.compare("y", y);
    if (io.count("attn_weights")) {
      NoGrad ng;
      ck.compare("attn_weights", m.attention_weights(q, kv));
    }
    Tensor loss = weighted_loss(y, io, device);
    ck.compare("loss", loss);
    loss.backward();
    ck.compare_grads(m, same);
    ck.compare("grad_input.query", q.grad());
    ck.compare("grad_input.key_value", kv.grad());
  }
  return r;
}

}  // namespace psa::nn
