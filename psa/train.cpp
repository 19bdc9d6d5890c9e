#include "psa/train.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <unistd.h>

#include "nn/checkpoint.h"
#include "nn/safetensors.h"
#include "psa/checkpoint.h"
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

const char* const kWeightPrefix = "weights/";
const char* const kLossKeys[] = {"__losses__", "__losses_lm__", "__losses_level__", "__losses_type__"};

std::vector<double>* loss_series(StageResult& r, int k) {
  std::vector<double>* s[] = {&r.loss, &r.loss_lm, &r.loss_level, &r.loss_type};
  return s[k];
}

const char* const kOptionsKey = "options";

std::string exact(double v) {  // round-trips, so that equal strings mean equal doubles
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// The options that decide a stage's result, named by the `psa train` flag that sets them. A longer --steps is
// no continuation either: the linear decay, and so every step's learning rate, depends on the total.
json::Value run_options(const StageOptions& o) {
  const std::string n = o.stage == "base" ? "base" : o.stage == "stage1" ? "1" : "2";
  json::Value v = json::Value::object();
  if (!o.preset.empty()) v.set("--preset", o.preset);
  if (!o.data_xxh64.empty()) v.set("--data", "records with xxh64 " + o.data_xxh64);
  if (!o.tokenizer_xxh64.empty()) v.set("tokenizer", "vocabulary with xxh64 " + o.tokenizer_xxh64);
  v.set("--seed", std::to_string(o.seed));
  v.set("--batch", std::to_string(o.batch));
  v.set("--steps-" + n, std::to_string(o.steps));
  v.set("--lr-" + n, exact(o.lr));
  v.set("--warmup", std::to_string(o.warmup));
  if (o.stage == "base") {
    v.set("--vision-lr-scale", exact(o.vision_lr_scale));
    v.set("--steps-vision", std::to_string(o.vision_steps));
    v.set("--batch-vision", std::to_string(o.vision_batch));
  }
  if (o.stage == "stage2") {
    v.set("--lora-rank", o.lora.rank ? std::to_string(o.lora.rank) : "0 (--full-ft)");
    if (o.lora.rank) {
      v.set("--lora-alpha", exact(o.lora.alpha));
      v.set("--lora-dropout", exact(o.lora.dropout));
      v.set("--lora-lm-head", o.lora.include_lm_head ? "on" : "off");
    }
  }
  v.set("clip", exact(o.clip));  // not on the command line, but just as much a part of the run
  v.set("weight decay", exact(o.weight_decay));
  return v;
}

// States written before the record existed are accepted with a warning: nothing to compare them with.
void check_run_options(const std::map<std::string, std::string>& meta, const StageOptions& o,
                       const std::string& path, bool warn) {
  auto it = meta.find(kOptionsKey);
  if (it == meta.end()) {
    if (warn)
      std::fprintf(stderr, "warning: %s has no record of the options it was trained with (an older psa): "
                   "resuming without checking that they are the same\n", path.c_str());
    return;
  }
  json::Value saved;
  try {
    saved = json::parse(it->second, "json");
    PSA_CHECK(saved.is_object(), "expected an object");
  } catch (const Error& e) {
    fail(path, ": metadata '", kOptionsKey, "': ", e.what());
  }
  const json::Value now = run_options(o);
  // A state of another stage (copied into this stage's folder) differs in its --steps-<stage> key: say so.
  for (const auto& [key, stage] : {std::pair<const char*, const char*>{"--steps-base", "base"},
                                   {"--steps-1", "stage1"}, {"--steps-2", "stage2"}})
    PSA_CHECK(!saved.find(key) || now.find(key), path, ": a training state of the ", stage, " stage, not of ", o.stage,
              " (a copied or mixed run folder)");
  // Values as stored (round-trip digits), shown in the fewest digits that read back the same.
  auto text = [](const json::Value& v, const std::string& k) {
    const json::Value* x = v.find(k);
    if (!x) return std::string("(not recorded)");
    const std::string t = x->is_string() ? x->as_string() : json::dump(*x);
    char* end = nullptr;
    const double d = std::strtod(t.c_str(), &end);
    if (t.empty() || *end != 0 || t.find_first_of(".eE") == std::string::npos) return t;  // integers stay exact
    char buf[32];
    for (int digits = 1; digits <= 17; ++digits) {
      std::snprintf(buf, sizeof buf, "%.*g", digits, d);
      if (std::strtod(buf, nullptr) == d) break;
    }
    return std::string(buf);
  };
  const json::Value* both[] = {&now, &saved};  // a key only one of them has differs too, except the hashes of
  // data and tokenizer (states from before they were recorded, and a check made before the data is generated
  // or the tokenizer loaded, have only one) and the vision pretraining (recorded only since later).
  for (const json::Value* v : both)
    for (const auto& [k, unused] : v->as_object()) {
      const bool optional = k == "--data" || k == "tokenizer" || k == "--steps-vision" || k == "--batch-vision";
      PSA_CHECK((optional && !(saved.find(k) && now.find(k))) || text(saved, k) == text(now, k), path,
                ": the training state was made with ", k, " ", text(saved, k), ", this run has ", k, " ", text(now, k),
                " (--resume continues a run only with its own options)");
    }
}

// One file holds everything a resumed run needs, so no crash can leave weights and optimizer out of step.
void save_state(const std::string& path, const PsaVlm& m, const nn::AdamW& opt, const Sampler& s, int64_t next_step,
                StageResult r, const StageOptions& o) {
  std::map<std::string, std::string> meta{{"step", std::to_string(next_step)},   {"opt_step", std::to_string(opt.step())},
                                          {"epoch", std::to_string(s.epoch)},    {"offset", std::to_string(s.offset)},
                                          {"skipped", std::to_string(r.skipped)},
                                          {kOptionsKey, json::dump(run_options(o))}};
  nn::StateDict t = opt.state();
  for (auto& [name, w] : m.state_dict()) t.emplace(kWeightPrefix + name, w);
  for (int k = 0; k < 4; ++k) {
    std::vector<double>& v = *loss_series(r, k);
    t.emplace(kLossKeys[k], Tensor::from(v, {(int64_t)v.size()}, DType::f64));
  }
  nn::write_tensors(path, t, meta);
}

// A non-negative integer from the state's metadata; errors name the file and the key.
int64_t meta_int(const std::map<std::string, std::string>& meta, const std::string& key, const std::string& path) {
  auto it = meta.find(key);
  PSA_CHECK(it != meta.end(), path, ": training state has no '", key, "' in its metadata");
  const std::string& v = it->second;
  char* end = nullptr;
  errno = 0;
  long long n = std::strtoll(v.c_str(), &end, 10);
  PSA_CHECK(!v.empty() && *end == 0 && errno == 0 && n >= 0, path, ": training state '", key, "' = '", v,
            "' is not a non-negative integer");
  return n;
}

struct Resumed {
  int64_t step = 0;
};

// Loads weights, optimizer moments, data position and losses; checks the state belongs to this run.
Resumed load_state(const std::string& path, PsaVlm& m, nn::AdamW& opt, Sampler& s, const StageOptions& o,
                   StageResult& r) {
  std::map<std::string, std::string> meta;
  nn::StateDict st = nn::read_tensors(path, &meta);
  check_run_options(meta, o, path, true);
  Resumed z;
  z.step = meta_int(meta, "step", path);
  const int64_t opt_step = meta.count("opt_step") ? meta_int(meta, "opt_step", path) : z.step;
  PSA_CHECK(opt_step <= z.step && z.step <= o.steps, path, ": training state at step ", z.step, " (", opt_step,
            " updates) does not fit a run of ", o.steps, " steps");
  const int64_t epoch = meta_int(meta, "epoch", path), offset = meta_int(meta, "offset", path);
  PSA_CHECK(offset <= (int64_t)s.pool.size(), path, ": data offset ", offset, " past the epoch of ", s.pool.size(),
            " examples (a different dataset?)");
  r.skipped = meta.count("skipped") ? meta_int(meta, "skipped", path) : 0;
  nn::require_hashes(path, meta);  // after the metadata's own checks, which say more about a hostile file
  for (int k = 0; k < 4; ++k) {
    auto it = st.find(kLossKeys[k]);
    if (it == st.end()) continue;  // states written before the per-loss series existed
    PSA_CHECK(it->second.dtype() == DType::f64 && it->second.dim() == 1, path, ": '", kLossKeys[k],
              "' must be a 1-d F64 tensor");
    *loss_series(r, k) = it->second.vec<double>();
    st.erase(it);
  }
  nn::StateDict weights;
  for (auto it = st.begin(); it != st.end();) {
    if (it->first.rfind(kWeightPrefix, 0) != 0) {
      ++it;
      continue;
    }
    weights.emplace(it->first.substr(std::strlen(kWeightPrefix)), it->second);
    it = st.erase(it);
  }
  if (!weights.empty()) m.load_state_dict(weights, true, path);  // states without weights: the caller's model
  opt.load_state(st, opt_step);
  s.start_epoch(epoch);
  s.offset = offset;
  return z;
}

// A resumed run appends to the log; lines past the resumed step came from the killed run and would repeat.
// Returns how many lines it keeps.
int64_t truncate_log(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return 0;
  std::string kept, line;
  int64_t lines = 0;
  while (std::getline(in, line)) {
    try {
      if (json::parse(line, path).int_or("step", 0) <= step) kept += line + "\n", ++lines;
    } catch (const Error&) {  // a line cut short by the kill
    }
  }
  json::write_file(path, kept);
  return lines;
}

std::string eta(double s) {
  char buf[32];
  snprintf(buf, sizeof buf, "%d:%02d", (int)s / 60, (int)s % 60);
  return buf;
}

}  // namespace

void check_resume_options(const StageOptions& o) {
  if (o.resume_from.empty()) return;
  const st::File f = st::File::open(o.resume_from, false);  // the load verifies the hashes
  check_run_options(f.metadata(), o, o.resume_from, false);
}

std::vector<int64_t> stage_indices(const Dataset& d, const std::string& stage, uint64_t seed) {
  std::vector<int64_t> risky, clean, all;
  for (int64_t i = 0; i < d.size(); ++i) {
    (d.examples[i].type == kCleanType ? clean : risky).push_back(i);
    all.push_back(i);
  }
  if (stage != "stage1" || risky.empty()) return all;
  int64_t keep = std::min<int64_t>(clean.size(), std::llround(risky.size() * 3000.0 / 11200.0));
  shuffle(clean, mix(seed));
  // Hard negatives (benign look-alikes, marked in the generator's meta) go in first: they are the clean
  // images that teach the head where a risk concept ends (striped banner vs flag); a random draw keeps
  // only a fifth of them.
  std::stable_partition(clean.begin(), clean.end(), [&](int64_t i) { return is_hard_negative(d.examples[i].record); });
  risky.insert(risky.end(), clean.begin(), clean.begin() + keep);
  return risky;
}

StageResult train_stage(PsaVlm& m, const Dataset& data, const StageOptions& o) {
  PSA_CHECK(data.size() > 0, "train ", o.stage, ": no training examples");
  set_trainable(m, o.stage, o.lora, o.seed);  // may add LoRA parameters (on the host): move afterwards
  m.to(o.device);
  m.train();
  std::vector<nn::ParamRef> params = nn::trainable(m);
  for (nn::ParamRef& p : params)
    if (p.name.rfind(kVisionPrefix, 0) == 0) p.lr_scale = o.vision_lr_scale;
  PSA_CHECK(!params.empty(), "train ", o.stage, ": no trainable parameters");
  nn::AdamW opt(params, o.lr, {0.9, 0.999, 1e-8, o.weight_decay});
  nn::Schedule sched{nn::Schedule::linear, o.lr, o.warmup, o.steps};
  Sampler sampler;
  sampler.pool = stage_indices(data, o.stage, o.seed);
  sampler.seed = o.seed;
  sampler.start_epoch(0);
  StageResult r;
  int64_t first_step = 0;
  if (!o.resume_from.empty()) first_step = load_state(o.resume_from, m, opt, sampler, o, r).step;
  if (!o.resume_from.empty() && !o.log_path.empty()) {
    // Every step but the skipped ones has a line. Fewer: the log lost lines the fsynced state kept (a power
    // loss, an edit); the state's loss series, which the report and the curves use, are whole.
    const int64_t lines = truncate_log(o.log_path, first_step), want = first_step - r.skipped;
    if (lines < want)
      std::fprintf(stderr, "warning: %s has lines for %ld of the %ld steps before the resumed step %ld (the rest "
                   "were lost); the training state holds every step's losses\n", o.log_path.c_str(), (long)lines,
                   (long)want, (long)first_step);
  }
  std::ofstream log;
  if (!o.log_path.empty()) log.open(o.log_path, o.resume_from.empty() ? std::ios::trunc : std::ios::app);
  bool classify = o.stage != "base", safety_tokens = o.stage != "base";
  auto t0 = std::chrono::steady_clock::now();
  double tokens = 0;
  int64_t bad = 0, done_here = 0;
  int64_t step = first_step;
  // LoRA dropout: each adapter its own masks (PEFT gives every module its own nn.Dropout), new every step,
  // the same in every run of a seed (and after a resume).
  std::vector<nn::Linear*> linears = m.lm->linears();
  for (size_t i = 0; i < linears.size(); ++i) linears[i]->dropout_seed = mix(o.seed ^ mix(i + 1));
  for (; step < o.steps; ++step) {
    opt.set_lr(nn::lr_at(sched, step));
    for (nn::Linear* l : linears) l->dropout_offset = step;
    PsaBatch b = collate(data, sampler.next(o.batch), m.config.pad_id);
    if (o.device != Device::cpu)
      for (Tensor* t : {&b.pixels, &b.ids, &b.labels, &b.level, &b.type})
        if (t->defined()) *t = t->to(o.device);
    PsaOutput out = m.forward(b, classify, true, safety_tokens);
    opt.zero_grad();
    out.loss.backward();
    // The losses in one read: on a GPU each item() is a copy back and a wait for the device.
    std::vector<Tensor> parts{out.loss, out.loss_lm};
    if (classify) parts.insert(parts.end(), {out.loss_level, out.loss_type});
    std::vector<double> losses;
    {
      NoGrad no_grad;
      for (Tensor& t : parts) t = reshape(t.detach(), {1});
      losses = concat(parts, 0).to_vector();
    }
    const double loss = losses[0];
    // Clipping leaves non-finite gradients alone and returns a non-finite norm for them: one check for both.
    double norm = nn::clip_grad_norm(params, o.clip);
    if (!std::isfinite(loss) || !std::isfinite(norm)) {
      // The batch is consumed and the schedule moves on, so a resumed run skips the same step.
      std::fprintf(stderr, "%s[%s] step %ld: non-finite %s (loss %g), step skipped\n", o.progress ? "\n" : "",
                   o.stage.c_str(), (long)step + 1,
                   std::isfinite(loss) ? "gradient" : "loss", loss);
      ++r.skipped;
      PSA_CHECK(++bad < o.max_bad_steps, "train ", o.stage, ": ", bad, " non-finite steps in a row (steps ",
                step + 2 - bad, "..", step + 1, "); stopping", o.state_path.empty() ? "" : " (the last good state " +
                o.state_path + " is intact)", " - lower the learning rate or check the data");
      opt.zero_grad();
      continue;
    }
    bad = 0;
    opt.update();
    tokens += out.merged_labels.numel();
    r.loss.push_back(loss);
    r.loss_lm.push_back(losses[1]);
    if (classify) {
      r.loss_level.push_back(losses[2]);
      r.loss_type.push_back(losses[3]);
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
    if (!o.state_path.empty() && (last || (o.state_every && (step + 1) % o.state_every == 0)))
      save_state(o.state_path, m, opt, sampler, step + 1, r, o);
    if (o.stop_after && done_here >= o.stop_after) {
      ++step;
      break;
    }
  }
  r.steps = step;
  r.resumed_at = first_step;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.tokens_per_second = r.seconds > 0 ? tokens / r.seconds : 0;
  m.eval();
  return r;
}

double step_memory_estimate(const PsaConfig& c, int64_t batch) {
  const nn::ClipConfig& v = c.vision;
  const nn::LlamaConfig& t = c.text;
  const double patches = v.num_patches(), tokens = c.merged_length(c.max_text_tokens);
  const double per_row = t.layers * tokens * (8.0 * t.hidden + 5.0 * t.intermediate) +
                         v.layers * (patches + 1) * (8.0 * v.hidden + 4.0 * v.intermediate);
  return 4.0 * (double(batch) * per_row + 4.0 * min_params(c));  // f32; weights, gradients, two moments
}

namespace {
// A "Key: N kB" line of /proc/meminfo in bytes, 0 when missing.
double meminfo_bytes(const std::string& key) {
  std::ifstream in("/proc/meminfo");
  std::string name;
  double kb = 0;
  std::string unit;
  while (in >> name >> kb) {
    std::getline(in, unit);
    if (name == key + ":") return kb * 1024;
  }
  return 0;
}
// The cgroup v2 limit left to this process's group; -1 when there is none ("max") or it cannot be read.
double cgroup_room_bytes() {
  std::ifstream max_in("/sys/fs/cgroup/memory.max"), cur_in("/sys/fs/cgroup/memory.current");
  double max = 0, cur = 0;
  if (!(max_in >> max) || !(cur_in >> cur)) return -1;
  return std::max(0.0, max - cur);
}
}  // namespace

void check_batch_fits_memory(const std::string& what, const PsaConfig& c, int64_t batch) {
  const double available = meminfo_bytes("MemAvailable"), cgroup = cgroup_room_bytes();
  if (available == 0 && cgroup < 0) return;
  const double room = cgroup < 0 ? available : available == 0 ? cgroup : std::min(available, cgroup);
  const double need = step_memory_estimate(c, batch);
  if (need <= room) return;
  const double per_row = step_memory_estimate(c, 1) - step_memory_estimate(c, 0);
  const int64_t fits = std::max<int64_t>(0, int64_t((room - step_memory_estimate(c, 0)) / per_row));
  const double gib = 1024.0 * 1024 * 1024;
  char msg[160];
  std::snprintf(msg, sizeof msg, "about %.1f GiB (%.0f MiB a row, estimated), more than the %.1f GiB available",
                need / gib, per_row / (1024 * 1024), room / gib);
  fail(what, " ", batch, ": a training step needs ", msg, fits ? " (at most " + std::to_string(fits) + " fits)" : "");
}

}  // namespace psa
