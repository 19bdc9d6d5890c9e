#include "nn/conform.h"

#include <cmath>
#include <filesystem>
#include <set>

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
  // std::max drops a NaN (every comparison with it is false), which printed a NaN run as "worst 0": keep it.
  double w = 0;
  for (const ConformEntry& e : entries) {
    if (std::isnan(e.rel_err)) return e.rel_err;
    w = std::max(w, e.rel_err);
  }
  return w;
}

static std::string kind_of(const json::Value& c) {
  const std::string kind = c.string_or("kind", ""), model_type = c.string_or("model_type", "");
  if (kind == "c_abstractor") return kind;
  if (kind == "torch.nn.MultiheadAttention" || kind == "mha") return "mha";
  if (model_type == "clip_vision_model" || model_type == "clip") return "clip_vision";
  if (model_type == "llama" || model_type == "llava") return model_type;
  fail("cannot tell the model kind (expected model_type clip_vision_model, llama or llava, or kind c_abstractor or "
       "torch.nn.MultiheadAttention)");
}

static std::string config_path(const std::string& dir) { return (std::filesystem::path(dir) / "config.json").string(); }

std::string detect_kind(const std::string& dir) {
  const std::string path = config_path(dir);
  const json::Value c = json::parse_file(path);
  return json::in_file(path, [&] { return kind_of(c); });
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
  std::set<std::string> used;  // the io keys compared or read as inputs
  void compare(const std::string& name, const Tensor& ours) {
    auto it = io.find(name);
    PSA_CHECK(it != io.end(), "conform: io.safetensors has no '", name, "'");
    used.insert(name);
    Tensor theirs = it->second;
    if (name == "loss") theirs = reshape(theirs, {});
    PSA_CHECK(ours.defined(), "conform: no value computed for '", name, "'");
    Tensor o = ours.to(Device::cpu);
    PSA_CHECK(o.shape() == theirs.shape(), "conform: '", name, "': ours ", shape_str(o.shape()), " vs ",
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
  // Every stored output and gradient must have been compared: a model computing fewer hidden states, or a
  // gradient key naming no parameter of ours, is a mismatch, not a smaller pass.
  void require_all_compared() {
    for (const auto& [name, t] : io)
      if (!used.count(name)) report.entries.push_back({"unchecked." + name, INFINITY, false});
  }
};

Tensor input(Checker& ck, const std::string& name, Device d, bool grad) {
  const StateDict& io = ck.io;
  ck.used.insert(name);
  auto it = io.find(name);
  PSA_CHECK(it != io.end(), "conform: io.safetensors has no input '", name, "'");
  Tensor t = it->second.to(d);
  if (grad) t = t.clone().requires_grad_();
  return t;
}

// Token ids (input_ids, labels) as the model reads them: integers in [0, vocab), labels also -100 (ignored).
// Checked here so that a bad id is named by its tensor, not by the embedding's index_select.
Tensor token_input(Checker& ck, const std::string& name, int64_t vocab, Device d) {
  Tensor t = input(ck, name, Device::cpu, false);
  PSA_CHECK(t.dtype() == DType::i64 || t.dtype() == DType::i32, "conform: io.safetensors '", name, "' is ",
            dtype_name(t.dtype()), ", expected integer token ids (I64)");
  const std::vector<double> ids = t.to_vector();
  for (size_t i = 0; i < ids.size(); ++i)
    PSA_CHECK((ids[i] >= 0 && ids[i] < vocab) || (name == "labels" && ids[i] == -100), "conform: io.safetensors '",
              name, "' ", shape_str(t.shape()), ": element ", i, " is ", (int64_t)ids[i], ", outside the vocabulary [0, ",
              vocab, ")", name == "labels" ? " and not -100" : "");
  return t.to(DType::i64).to(d);
}

Tensor weighted_loss(const Tensor& out, Checker& ck, Device d) { return sum(mul(out, input(ck, "loss_weight", d, false))); }

// Every config a fixture kind can hold, read and range-checked before a weight is read or a module built.
struct FixtureConfig {
  std::string kind;
  ClipConfig clip;
  LlamaConfig llama;
  LlavaConfig llava;
  CAbstractorConfig cabs;
  MhaConfig mha;
};

FixtureConfig read_config(const json::Value& c) {
  FixtureConfig f;
  f.kind = kind_of(c);
  if (f.kind == "clip_vision") {
    if (c.find("vision_config"))
      f.clip = json::with_key("vision_config", [&] { return ClipConfig::from_json(c.at("vision_config")); });
    else
      f.clip = ClipConfig::from_json(c);
  } else if (f.kind == "llama") {
    f.llama = LlamaConfig::from_json(c);
  } else if (f.kind == "llava") {
    f.llava = LlavaConfig::from_json(c);
  } else if (f.kind == "c_abstractor") {
    f.cabs = CAbstractorConfig::from_json(c);
  } else {
    f.mha = MhaConfig::from_json(c);
  }
  return f;
}

// Lower bounds on the parameters each config builds (the large matrices only), in double: the per-key ranges
// still let a product of them reach terabytes.
double clip_params(const ClipConfig& c) {
  const double h = c.hidden;
  return c.layers * (4 * h * h + 2 * h * c.intermediate) + double(c.channels) * c.patch * c.patch * h +
         (c.num_patches() + 1) * h;
}
double llama_params(const LlamaConfig& c) {
  const double H = c.hidden, D = c.dim_head();
  return double(c.vocab) * H * (c.tie_embeddings ? 1 : 2) +
         c.layers * (2 * H * c.heads * D + 2 * H * c.kv_heads * D + 3 * H * c.intermediate);
}
double min_params(const FixtureConfig& f) {
  if (f.kind == "clip_vision") return clip_params(f.clip);
  if (f.kind == "llama") return llama_params(f.llama);
  if (f.kind == "llava") {
    const double v = f.llava.vision.hidden, t = f.llava.text.hidden;
    return clip_params(f.llava.vision) + llama_params(f.llava.text) + v * t + t * t;
  }
  if (f.kind == "c_abstractor") {
    const CAbstractorConfig& c = f.cabs;
    const double h = c.hidden, o = c.output_hidden;
    return double(c.encoder_hidden) * h + (4 * c.depth - 1) * h * h + h * o + (c.mlp_depth - 1) * o * o;
  }
  return 4.0 * f.mha.embed_dim * f.mha.embed_dim;
}

// The weights come from the same folder as the config, so a config that asks for far more than they hold is
// corrupt or hostile: refused here instead of allocating gigabytes before the strict load refuses it anyway.
void check_size(const FixtureConfig& f, const StateDict& weights, const std::string& path) {
  double held = 0;
  for (const auto& [name, t] : weights) held += t.numel();
  const double want = min_params(f);
  PSA_CHECK(want <= 2 * held + (1 << 20), path, ": describes a model of at least ", std::llround(want),
            " parameters but the weights hold ", std::llround(held), " values");
}

}  // namespace

ConformReport conform(const std::string& dir, Device device, double tolerance) {
  ConformReport r;
  r.tolerance = tolerance;
  const std::string cfg_path = config_path(dir);
  const json::Value raw = json::parse_file(cfg_path);  // its errors name the file already
  const FixtureConfig cfg = json::in_file(cfg_path, [&] { return read_config(raw); });
  r.kind = cfg.kind;
  HfFolder f = read_hf_folder(dir);
  check_size(cfg, f.weights, cfg_path);
  StateDict io = read_tensors((std::filesystem::path(dir) / "io.safetensors").string());
  std::string src = dir + "/model.safetensors";
  Checker ck{r, io, {}};
  auto same = [](const std::string& n) { return "grad." + n; };
  if (r.kind == "clip_vision") {
    ClipVision m(cfg.clip);
    load_renamed(m, f.weights, clip_key, src);
    m.to(device);
    Tensor px = input(ck, "pixel_values", device, true);
    ClipVision::Output out = m.forward(px);
    for (size_t i = 0; i < out.hidden_states.size(); ++i) ck.compare("hidden_states." + std::to_string(i), out.hidden_states[i]);
    ck.compare("last_hidden_state", out.last_hidden_state);
    ck.compare("pooler_output", out.pooler_output);
    Tensor feat = out.hidden_states[out.hidden_states.size() - 2];
    Tensor loss = weighted_loss(slice(feat, 1, 1, feat.size(1)), ck, device);
    ck.compare("loss", loss);
    loss.backward();
    ck.compare_grads(m, same);
    ck.compare("grad_input.pixel_values", px.grad());
  } else if (r.kind == "llama") {
    LlamaForCausalLM m(cfg.llama);
    load_renamed(m, f.weights, [](const std::string& k) { return k; }, src);
    m.to(device);
    const int64_t V = cfg.llama.vocab;
    auto out = m.forward(m.embed(token_input(ck, "input_ids", V, device)), nullptr, true);
    for (size_t i = 0; i < out.hidden_states.size(); ++i)
      if (io.count("hidden_states." + std::to_string(i))) ck.compare("hidden_states." + std::to_string(i), out.hidden_states[i]);
    ck.compare("logits", out.logits);
    Tensor loss = LlamaForCausalLM::causal_lm_loss(out.logits, token_input(ck, "labels", V, device));
    ck.compare("loss", loss);
    loss.backward();
    ck.compare_grads(m, same);
  } else if (r.kind == "llava") {
    auto m = Llava::from_config(cfg.llava);
    load_renamed(*m, f.weights, llava_key, src);
    m->to(device);
    const int64_t V = cfg.llava.text.vocab;
    Tensor logits = m->forward(input(ck, "pixel_values", device, false), token_input(ck, "input_ids", V, device));
    ck.compare("logits", logits);
    Tensor loss = LlamaForCausalLM::causal_lm_loss(logits, token_input(ck, "labels", V, device));
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
    CAbstractor m(cfg.cabs);
    load_renamed(m, f.weights, [](const std::string& k) { return k; }, src);
    m.to(device);
    Tensor x = input(ck, "x", device, true);
    Tensor y = m.forward(x);
    ck.compare("y", y);
    Tensor loss = weighted_loss(y, ck, device);
    ck.compare("loss", loss);
    loss.backward();
    ck.compare_grads(m, same);
    ck.compare("grad_input.x", x.grad());
  } else {  // mha
    MultiheadAttention m(cfg.mha.embed_dim, cfg.mha.heads);
    load_renamed(m, f.weights, [](const std::string& k) { return k; }, src);
    m.to(device);
    Tensor q = input(ck, "query", device, true), kv = input(ck, "key_value", device, true);
    Tensor y = m.forward(q, kv);
    ck.compare("y", y);
    if (io.count("attn_weights")) {
      NoGrad ng;
      ck.compare("attn_weights", m.attention_weights(q, kv));
    }
    Tensor loss = weighted_loss(y, ck, device);
    ck.compare("loss", loss);
    loss.backward();
    ck.compare_grads(m, same);
    ck.compare("grad_input.query", q.grad());
    ck.compare("grad_input.key_value", kv.grad());
  }
  ck.require_all_compared();
  return r;
}

}  // namespace psa::nn
