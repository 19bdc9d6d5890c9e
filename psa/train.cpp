#include "psa/train.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <unistd.h>

#include "nn/checkpoint.h"
#include "psa/policy.h"

namespace psa {

void set_trainable(PsaVlm& m, const std::string& stage, const LoraSettings& lora, uint64_t seed) {
  m.freeze();
  if (stage == "base") {
    m.unfreeze(kVisionPrefix);
    m.unfreeze(kProjectorPrefix);
    m.unfreeze(kLmPrefix);
  } else if (stage == "stage1") {
    for (const std::string& p : safety_prefixes()) m.unfreeze(p);
  } else if (stage == "stage2") {
    if (lora.rank == 0) {
      m.unfreeze(kLmPrefix);
      return;
    }
    if (!m.lm->layers[0]->self_attn->q_proj->has_lora()) m.add_lora(lora.rank, lora.alpha, lora.dropout, lora.include_lm_head, seed);
    for (auto& [name, t] : m.named_parameters())
      if (name.find(".lora_A.") != std::string::npos || name.find(".lora_B.") != std::string::npos) Tensor(t).requires_grad_(true);
  } else {
    fail("unknown stage '", stage, "' (expected base, stage1 or stage2)");
  }
}

namespace {

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

void shuffle(std::vector<int64_t>& v, uint64_t seed) {
  for (int64_t i = (int64_t)v.size() - 1; i > 0; --i) std::swap(v[i], v[mix(seed + i) % (i + 1)]);
}

// Seeded epochs: the order of epoch e is a pure function of (seed, e), so a resumed run only needs (epoch, offset).
struct Sampler {
  std::vector<int64_t> pool, order;
  uint64_t seed = 0;
  int64_t epoch = -1, offset = 0;
  void start_epoch(int64_t e) {
    epoch = e;
    offset = 0;
    order = pool;
    shuffle(order, mix(seed ^ (uint64_t)e * 0x632BE59BD9B4E019ull));
  }
  std::vector<int64_t> next(int64_t batch) {
    std::vector<int64_t> b;
    while ((int64_t)b.size() < batch) {
      if (offset >= (int64_t)order.size()) start_epoch(epoch + 1);
      b.push_back(order[offset++]);
    }
    return b;
  }
};

void save_state(const std::string& path, const nn::AdamW& opt, const Sampler& s, const StageResult& r) {
  std::map<std::string, std::string> meta{{"step", std::to_string(opt.step())}, {"epoch", std::to_string(s.epoch)},
                                          {"offset", std::to_string(s.offset)}};
  nn::StateDict t = opt.state();
  t.emplace("__losses__", Tensor::from(r.loss, {(int64_t)r.loss.size()}, DType::f64));
  nn::write_tensors(path, t, meta);
}

std::string eta(double s) {
  char buf[32];
  snprintf(buf, sizeof buf, "%d:%02d", (int)s / 60, (int)s % 60);
  return buf;
}

}  // namespace

std::vector<int64_t> stage_indices(const Dataset& d, const std::string& stage, uint64_t seed) {
  std::vector<int64_t> risky, clean, all;
  for (int64_t i = 0; i < d.size(); ++i) {
    (d.examples[i].type == kCleanType ? clean : risky).push_back(i);
    all.push_back(i);
  }
  if (stage != "stage1" || risky.empty()) return all;
  int64_t keep = std::min<int64_t>(clean.size(), std::llround(risky.size() * 3000.0 / 11200.0));
  shuffle(clean, mix(seed));
  risky.insert(risky.end(), clean.begin(), clean.begin() + keep);
  return risky;
}

StageResult train_stage(PsaVlm& m, const Dataset& data, const StageOptions& o) {
  PSA_CHECK(data.size() > 0, "train ", o.stage, ": no training examples");
  set_trainable(m, o.stage, o.lora, o.seed);  // may add LoRA parameters (on the host): move afterwards
  m.to(o.device);
  m.train();
  std::vector<nn::ParamRef> params = nn::trainable(m);
  PSA_CHECK(!params.empty(), "train ", o.stage, ": no trainable parameters");
  nn::AdamW opt(params, o.lr, {0.9, 0.999, 1e-8, o.weight_decay});
  nn::Schedule sched{nn::Schedule::linear, o.lr, o.warmup, o.steps};
  Sampler sampler;
  sampler.pool = stage_indices(data, o.stage, o.seed);
  sampler.seed = o.seed;
  sampler.start_epoch(0);
  StageResult r;
  if (!o.resume_from.empty()) {
    std::map<std::string, std::string> meta;
    nn::StateDict st = nn::read_tensors(o.resume_from, &meta);
    Tensor losses = st.at("__losses__");
    st.erase("__losses__");
    opt.load_state(st, std::stoll(meta.at("step")));
    sampler.start_epoch(std::stoll(meta.at("epoch")));
    sampler.offset = std::stoll(meta.at("offset"));
    r.loss = losses.vec<double>();
  }
  std::ofstream log;
  if (!o.log_path.empty()) log.open(o.log_path, o.resume_from.empty() ? std::ios::trunc : std::ios::app);
  bool classify = o.stage != "base", safety_tokens = o.stage != "base";
  auto t0 = std::chrono::steady_clock::now();
  double tokens = 0;
  int64_t bad = 0, done_here = 0;
  for (int64_t step = opt.step(); step < o.steps; ++step) {
    opt.set_lr(nn::lr_at(sched, step));
    for (auto& l : m.lm->linears()) l->dropout_offset = step;  // LoRA dropout masks differ per step, repeat per run
    PsaBatch b = collate(data, sampler.next(o.batch), m.config.pad_id);
    if (o.device != Device::cpu)
      for (Tensor* t : {&b.pixels, &b.ids, &b.labels, &b.level, &b.type})
        if (t->defined()) *t = t->to(o.device);
    PsaOutput out = m.forward(b, classify, true, safety_tokens);
    opt.zero_grad();
    out.loss.backward();
    double loss = out.loss.item();
    if (!std::isfinite(loss) || !nn::grads_finite(params)) {
      std::fprintf(stderr, "\n[%s] step %ld: non-finite loss or gradient, step skipped\n", o.stage.c_str(), (long)step);
      PSA_CHECK(++bad < o.max_bad_steps, "train ", o.stage, ": ", bad, " non-finite steps in a row; stopping (the last "
                "saved checkpoint is intact)");
      opt.zero_grad();
      continue;
    }
    bad = 0;
    double norm = nn::clip_grad_norm(params, o.clip);
    opt.update();
    tokens += out.merged_labels.numel();
    r.loss.push_back(loss);
    r.loss_lm.push_back(out.loss_lm.item());
    if (classify) {
      r.loss_level.push_back(out.loss_level.item());
      r.loss_type.push_back(out.loss_type.item());
    }
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++done_here;
    if (log.is_open()) {
      json::Value j = json::Value::object();
      j.set("stage", o.stage);
      j.set("step", step + 1);
      j.set("loss", loss);
      j.set("loss_lm", r.loss_lm.back());
      if (classify) {
        j.set("loss_level", r.loss_level.back());
        j.set("loss_type", r.loss_type.back());
      }
      j.set("lr", opt.lr());
      j.set("grad_norm", norm);
      j.set("seconds", secs);
      log << json::dump(j) << "\n";
      log.flush();
    }
    // A terminal gets a redrawn bar; a log file gets one line per 10% instead of thousands of \r updates.
    static const bool tty = isatty(fileno(stderr));
    int64_t every = tty ? 5 : std::max<int64_t>(1, o.steps / 10);
    if (o.progress && (step + 1 == o.steps || done_here % every == 0)) {
      int width = 24, fill = (int)(width * (step + 1) / o.steps);
      std::fprintf(stderr, "%s[%s] %5ld/%ld |%s%s| loss %.4f  %.0f tok/s  ETA %s%s", tty ? "\r" : "", o.stage.c_str(), (long)step + 1,
                   (long)o.steps, std::string(fill, '#').c_str(), std::string(width - fill, '.').c_str(), loss,
                   tokens / secs, eta(secs / done_here * (o.steps - step - 1)).c_str(), tty ? " " : "\n");
      if (tty && step + 1 == o.steps) std::fprintf(stderr, "\n");
    }
    bool last = step + 1 == o.steps || (o.stop_after && done_here >= o.stop_after);
    if (!o.state_path.empty() && (last || (o.state_every && (step + 1) % o.state_every == 0))) save_state(o.state_path, opt, sampler, r);
    if (o.stop_after && done_here >= o.stop_after) break;
  }
  r.steps = opt.step();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.tokens_per_second = r.seconds > 0 ? tokens / r.seconds : 0;
  m.eval();
  return r;
}

}  // namespace psa
