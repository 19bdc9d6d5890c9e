// psa train: base VLM -> Stage I -> Stage II on a dataset folder, one checkpoint per stage.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <set>

#include "nn/safetensors.h"
#include "psa/eval.h"
#include "psa/plot.h"
#include "psa/synth.h"
#include "psa/train.h"
#include "psa/vision_pretrain.h"
#include "tensor/device.h"
#include "tools/cli.h"

namespace psa {
namespace fs = std::filesystem;
int cmd_eval(int argc, char** argv);

static const char* kTrainUsage = R"(usage: psa train [options]

Trains PSA-VLM in the paper's stages on a dataset folder (generated with `psa data` when missing):
  base    LLaVA-style training of ViT + projector + LLM on DIR/base_train.jsonl (the vulnerable base VLM)
  1       Stage I: safety tokens, C-Abstractor safety projector, cross-attention head and the two classifiers
          on DIR/train.jsonl (all risky records + clean ones in the reference 3000:11200 ratio, hard
          negatives first);
          L = L_LLM + lambda (L_level + L_type), lambda = 10; everything else frozen
  2       Stage II: LoRA on every LLM linear (or --full-ft), safety modules frozen, all of DIR/train.jsonl
Before base, the ViT learns the generator's scene vocabulary (motifs, shapes, colours, places) from the
records' "meta" (the stand-in for CLIP pretraining; --steps-vision 0 skips it, records without meta are ignored).
Each stage writes OUT/<stage>/ (model.safetensors, config.json, tokenizer.json), a JSONL log
OUT/<stage>/log.jsonl, and an audit against the previous stage; OUT/loss_curves.png plots every loss.
The base stage's tokenizer is OUT/tokenizer.json when it exists (one of psa tokenizer train --out, or of an
earlier run: remove it to train a new one on other data), else it is trained on the data and written there.
With --eval (default for --stage all) the benchmark runs on DIR/test.jsonl into OUT/report.json and
OUT/report.md, with every record's prediction and answers in OUT/predictions/<stage>.jsonl.
--data FILE.jsonl (real data, reference-format records): that one file trains every stage (Stage I takes its
risky records + the clean ratio), the tokenizer is built from it, there is no vision pretraining, and the
benchmark runs on test.jsonl beside the file when there is one (else it is skipped, with a notice).

options:
  --preset tiny|small      model and data preset (default tiny)
  --data DIR|FILE.jsonl    dataset folder (default data/<preset>), or one records file (see above)
  --out DIR                run folder (default runs/<preset>)
  --stage all|base|1|2     which stages (default all); later stages start from OUT/<previous stage>
  --seed N                 initialisation, shuffling and LoRA-dropout seed, 0..2^63-1 (default 42)
  --batch N                batch size, 1..4096 (default 16)
  --steps-vision N         vision pretraining steps before base, 0..10^7 (default 8000 tiny, 1200 small;
                           0 skips it)
  --batch-vision N         scenes per vision pretraining step, 1..4096 (default 32 tiny, 64 small)
  --steps-base N --steps-1 N --steps-2 N     optimiser steps per stage, 1..10^7
  --lr-base X --lr-1 X --lr-2 X              peak learning rates in [0, 10] (AdamW, warmup then linear decay)
  --warmup N               warmup steps, at most the stage's steps (default 5% of the stage's steps)
  --vision-lr-scale X      base stage: the ViT's learning rate as a fraction of --lr-base, in [0, 10] (default
                           0.1), so that the LLM loss tunes the pretrained ViT rather than overwriting what it learnt
  --lora-rank N --lora-alpha X --lora-dropout X   Stage II adapters (defaults 16, 16, 0.05): rank 0..the LLM's
                           hidden size (0 = --full-ft), alpha in (0, 10000], dropout in [0, 1)
  --lora-lm-head           also adapt lm_head (the reference code does, by accident)
  --full-ft                Stage II fine-tunes the whole LLM instead of LoRA
  --eval / --no-eval       run the benchmark at the end
  --eval-limit N           evaluate on the first N test records only (0 = all)
  --save-every N           write the training state OUT/<stage>/train_state.safetensors every N steps
                           (default 100; 0 = only at the end of each stage, where it is always written)
  --resume                 continue a killed run in OUT: each stage restarts from its training state (weights,
                           optimizer, data position, losses) and ends bit-identical to an uninterrupted run;
                           a stage without one starts from scratch; the state records the options that decide
                           the result (seed, batch, steps, learning rates, warmup, LoRA, preset, and the
                           records file's xxh64) and a different value is refused
  --overwrite              train stages whose folders already hold a checkpoint or a training state again from
                           scratch; when such a stage starts, the folders of the stages after it (trained
                           from the checkpoint it replaces) are removed, the predictions and report.json
                           entries of all of them and report.md too (its checkpoint stays until the new one
                           replaces it). Without --resume or --overwrite, psa train refuses to touch a stage
                           folder that holds either, or to leave a later stage behind that one replaced
                           (`make train` passes --overwrite: it always trains with the current build)
  --max-bad-steps K        a non-finite loss or gradient skips the step; K in a row stop the run (default 5)
  --device cpu|cuda        where the stages train (default cpu): model, batches and AdamW on that device
                           (the vision pretraining before base stays on the CPU)
  --quiet                  no progress bars)";

namespace {

// Bounds of the numeric options: wide enough for any real run, narrow enough that a typo fails at once instead
// of allocating until memory runs out (a batch) or running for ever (steps, a LoRA rank).
constexpr int64_t kMaxBatch = 4096, kMaxSteps = 10'000'000, kMaxEvalLimit = 1'000'000'000;
constexpr double kMaxLr = 10;

// A run that fails before writing anything leaves no folder behind: --out created here and holding only the
// lock and empty folders is removed when cmd_train returns or throws (a wrong --data must not leave
// runs/typo/.psa.lock behind).
struct RemoveIfOnlyLock {
  std::string dir;
  bool created = false;
  ~RemoveIfOnlyLock() {
    if (!created) return;
    std::error_code ec;
    const fs::path lock = fs::path(dir) / ".psa.lock";
    for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
      if (!it->is_directory(ec) && it->path() != lock) return;
    if (!ec) fs::remove_all(dir, ec);
  }
};

struct Plan {
  std::string preset, data, out;
  bool data_is_file = false;  // --data FILE.jsonl: one records file for every stage
  uint64_t seed;
  int64_t batch, vision_steps, vision_batch;
  bool resume, overwrite;
};

// The records a stage trains on: DIR/base_train.jsonl for base, DIR/train.jsonl for Stages I and II, or the
// one --data FILE.jsonl for all of them.
std::string training_split(const Plan& p, const std::string& stage) {
  if (p.data_is_file) return p.data;
  return (fs::path(p.data) / (stage == "base" ? "base_train.jsonl" : "train.jsonl")).string();
}

// The records file's xxh64, recorded in every training state; "" while the file does not exist yet.
std::string records_hash(const std::string& file) {
  if (!fs::is_regular_file(file)) return "";
  const std::string text = json::read_file(file);
  return st::xxh64_hex(text.data(), text.size());
}

std::string vocabulary_hash(const Tokenizer& tok) {
  std::string all;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    const std::string& t = tok.token_text(id);
    all += std::to_string(t.size()) + ":" + t;  // length-prefixed: no two vocabularies give the same string
  }
  return st::xxh64_hex(all.data(), all.size());
}

// One stage of this run: its checkpoint folder and its training options, all decided before any work.
struct StagePlan {
  std::string stage, prev;  // base | stage1 | stage2; the stage it starts from ("" for base)
  fs::path dir;
  StageOptions o;
};

const char* const kStages[] = {"base", "stage1", "stage2"};

// The skipped lines of a file are listed once per run (--data FILE trains every stage on one file).
Dataset load_split(const std::string& file, const Tokenizer& tok, const PsaConfig& cfg) {
  static std::set<std::string> listed;
  LoadReport rep;
  std::vector<Record> recs = load_records(file, &rep);
  const bool first = listed.insert(file).second;
  if (first) print_skipped(rep, file);  // the file's bad lines, which psa inspect lists too
  const size_t shown = rep.messages.size();
  Dataset d = build_dataset(recs, tok, cfg.vision.image_size, cfg.max_text_tokens, &rep);
  if (first) print_skipped(rep, "", shown);  // what this model cannot take (text too long, undecodable image)
  std::printf("%s: %ld records loaded, %ld skipped\n", file.c_str(), (long)d.size(), (long)rep.skipped);
  return d;
}

// OUT/tokenizer.json when it exists, else one trained on the training records (*fresh = true): the caller
// saves that one only once the first stage's data has loaded, so a failed run leaves no tokenizer of bad data
// for the next run to pick up.
Tokenizer tokenizer_for(const Plan& p, int64_t vocab, bool* fresh) {
  fs::path path = fs::path(p.out) / "tokenizer.json";
  *fresh = !fs::exists(path);
  if (!*fresh) {  // a tokenizer put there (psa tokenizer train --out), or the one of an earlier run
    Tokenizer tok = Tokenizer::load(path.string());
    PSA_CHECK(tok.vocab_size() <= vocab, path.string(), ": ", tok.vocab_size(), " tokens, more than the model's vocabulary "
              "of ", vocab, " (train it with --vocab ", vocab, " or remove it)");
    return tok;
  }
  std::vector<Record> recs;
  std::vector<std::string> files = {training_split(p, "base")};
  if (!p.data_is_file) files.push_back(training_split(p, "stage1"));
  for (const std::string& f : files) {
    std::vector<Record> r = load_records(f, nullptr, false);
    recs.insert(recs.end(), r.begin(), r.end());
  }
  PSA_CHECK(!recs.empty(), files[0], ": no usable records to train the tokenizer on (every line was skipped)");
  return Tokenizer::train(corpus_of(recs), vocab);
}

struct Defaults {
  int64_t steps;
  double lr;
};

Defaults stage_defaults(const std::string& preset, const std::string& stage) {
  bool tiny = preset == "tiny";
  // Tiny defaults fit `make train` in about a quarter of an hour on 2 cores (README has the measured time).
  if (stage == "base") return {tiny ? 1000 : 3000, tiny ? 2e-3 : 6e-4};
  if (stage == "stage1") return {tiny ? 800 : 1200, tiny ? 3e-3 : 1e-3};
  return {tiny ? 500 : 800, tiny ? 2e-3 : 1e-3};
}

// The loader's ranges (psa/checkpoint.h), so that a run never ends in a checkpoint that cannot be loaded.
LoraSettings lora_options(const cli::Args& a, const PsaConfig& cfg) {
  LoraSettings lora;
  if (a.has("--full-ft")) {
    for (const char* f : {"--lora-rank", "--lora-alpha", "--lora-dropout", "--lora-lm-head"})
      PSA_CHECK(!a.has(f), f, ": not with --full-ft (no adapters)");
    return lora;
  }
  lora.rank = a.get_int("--lora-rank", 16, 0, lora_max_rank(cfg));
  lora.alpha = a.get_double("--lora-alpha", 16, 0, kMaxLoraAlpha);
  PSA_CHECK(lora.rank == 0 || lora.alpha > 0, "--lora-alpha: expected > 0, got ", lora.alpha);
  lora.dropout = a.get_double("--lora-dropout", 0.05, 0, 1);
  PSA_CHECK(lora.dropout < 1, "--lora-dropout: ", lora.dropout, " is out of range [0, 1)");
  lora.include_lm_head = a.has("--lora-lm-head");
  return lora;
}

// Every option of every stage this run trains, checked before anything is generated, loaded or written.
std::vector<StagePlan> plan_stages(const cli::Args& a, const Plan& p, const std::string& which, Device device,
                                   const LoraSettings& lora) {
  const double vision_lr_scale = a.get_double("--vision-lr-scale", 0.1, 0, kMaxLr);
  const int64_t max_bad = a.get_int("--max-bad-steps", 5, 1, kMaxSteps);
  const int64_t save_every = a.get_int("--save-every", 100, 0, kMaxSteps);
  std::vector<StagePlan> todo;
  for (int i = 0; i < 3; ++i) {
    const std::string stage = kStages[i], flag = i == 0 ? "base" : std::to_string(i);
    if (which != "all" && which != flag) continue;
    StagePlan s;
    s.stage = stage;
    s.prev = i ? kStages[i - 1] : "";
    s.dir = fs::path(p.out) / stage;
    StageOptions& o = s.o;
    const Defaults d = stage_defaults(p.preset, stage);
    o.stage = stage;
    o.preset = p.preset;
    o.steps = a.get_int("--steps-" + flag, d.steps, 1, kMaxSteps);
    o.lr = a.get_double("--lr-" + flag, d.lr, 0, kMaxLr);
    o.warmup = a.get_int("--warmup", std::max<int64_t>(1, o.steps / 20), 0, kMaxSteps);
    PSA_CHECK(o.warmup <= o.steps, "--warmup: ", o.warmup, " steps is longer than the ", stage, " stage (--steps-",
              flag, " ", o.steps, ")");
    o.vision_lr_scale = vision_lr_scale;
    if (stage == std::string("base")) o.vision_steps = p.vision_steps, o.vision_batch = p.vision_batch;
    o.batch = p.batch;
    o.seed = p.seed;
    o.lora = lora;
    o.progress = !a.has("--quiet");
    o.max_bad_steps = max_bad;
    o.device = device;
    o.log_path = (s.dir / "log.jsonl").string();
    o.state_path = (s.dir / "train_state.safetensors").string();
    o.state_every = save_every;
    o.data_xxh64 = records_hash(training_split(p, stage));
    if (p.resume && fs::exists(o.state_path)) o.resume_from = o.state_path;
    todo.push_back(s);
  }
  return todo;
}

bool holds_checkpoint(const fs::path& dir) { return fs::exists(dir / "model.safetensors"); }
bool holds_run(const fs::path& dir) { return holds_checkpoint(dir) || fs::exists(dir / "train_state.safetensors"); }

// Training a stage over an existing one would mix two runs in OUT: its files replaced, the later stages left
// from the old one. Without --resume (continue) or --overwrite (start again), nothing is touched.
// The first entry of a stage folder that psa train did not write (a checkpoint's files, the training state, the
// logs, temp files of its atomic writes), "" when there is none.
std::string foreign_entry(const fs::path& dir) {
  static const std::set<std::string> kOwn = {"model.safetensors", "config.json",   "tokenizer.json",
                                             "train_state.safetensors", "log.jsonl", "vision_log.jsonl"};
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "";
  std::vector<std::string> names;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());  // the same name on every run
  for (const std::string& n : names)
    if (!kOwn.count(n) && !(n[0] == '.' && n.find(".tmp.") != std::string::npos)) return n;
  return "";
}

void check_stage_folders(const Plan& p, const std::vector<StagePlan>& todo) {
  // What this run writes into or (--overwrite) removes: the stage folders from its first stage on. Never
  // someone's files that happen to sit there (a dataset generated into OUT/stage2 was deleted whole).
  bool reached = false;
  for (const char* stage : kStages) {
    reached |= stage == todo.front().stage;
    if (!reached) continue;
    const fs::path dir = fs::path(p.out) / stage;
    const std::string other = foreign_entry(dir);
    PSA_CHECK(other.empty(), dir.string(), ": holds ", other, ", which psa train does not write (a stage folder is "
              "written and removed whole): move it, or the folder, elsewhere");
  }
  if (p.overwrite) return;
  for (const StagePlan& s : todo) {
    if (p.resume) {
      PSA_CHECK(!holds_checkpoint(s.dir) || !s.o.resume_from.empty(), s.dir.string(), " holds a checkpoint but no "
                "training state to resume from: pass --overwrite (without --resume) to train it again");
      continue;
    }
    PSA_CHECK(!holds_run(s.dir), s.dir.string(), " already holds a ", holds_checkpoint(s.dir) ? "checkpoint" :
              "training state", ": pass --resume to continue that run, or --overwrite to train it again (which "
              "removes the later stages trained from it)");
  }
  if (p.resume) return;
  bool after = false;  // the stages after the first one trained and not trained in this run would be left stale
  for (const char* stage : kStages) {
    const bool trained = std::any_of(todo.begin(), todo.end(), [&](const StagePlan& s) { return s.stage == stage; });
    const fs::path dir = fs::path(p.out) / stage;
    PSA_CHECK(!after || trained || !holds_run(dir), dir.string(), " was trained from the ", todo.front().stage,
              " checkpoint this run replaces: pass --overwrite to remove it (or train it again with --stage all)");
    after |= trained;
  }
}

// --overwrite: `s` starts again from scratch, and the stages after it were trained from the checkpoint it is about
// to replace. Their folders go, with the predictions of all of them, their report entries and the Markdown table
// made from them; report.json is rewritten at once, so that no kill leaves numbers of the replaced run in it.
// `s`'s own checkpoint stays until the new one replaces it atomically: a kill during training keeps it loadable.
void remove_replaced_stages(const Plan& p, const StagePlan& s, json::Value& report, const fs::path& report_path) {
  bool later = false;
  std::string removed;
  auto& entries = report.obj;
  for (const char* stage : kStages) {
    later |= stage == s.stage;
    if (!later) continue;
    entries.erase(std::remove_if(entries.begin(), entries.end(), [&](const auto& kv) { return kv.first == stage; }),
                  entries.end());
    const fs::path dir = fs::path(p.out) / stage;
    fs::remove(fs::path(p.out) / "predictions" / (std::string(stage) + ".jsonl"));
    if (stage == s.stage || !fs::exists(dir)) continue;
    fs::remove_all(dir);
    removed += (removed.empty() ? "" : ", ") + dir.string();
  }
  fs::remove(fs::path(p.out) / "report.md");
  if (fs::exists(report_path)) json::write_file(report_path.string(), json::dump(report, 2) + "\n");
  if (!removed.empty())
    std::printf("[%s] --overwrite: removed %s (trained from the %s being replaced)\n", s.stage.c_str(),
                removed.c_str(), s.stage.c_str());
  std::fflush(stdout);  // a record of what was deleted must survive an interrupt when stdout is a file
}

void record_stage(json::Value& report, const std::string& stage, const StageResult& r, const json::Value& audit) {
  json::Value s = report.find(stage) ? report.at(stage) : json::Value::object();
  s.set("train_seconds", r.seconds);
  s.set("tokens_per_second", r.tokens_per_second);
  s.set("steps", r.steps);
  s.set("first_loss", r.loss.empty() ? 0.0 : r.loss.front());
  s.set("last_loss", r.loss.empty() ? 0.0 : r.loss.back());
  if (!audit.is_null()) s.set("audit", audit);
  report.set(stage, s);
}

// The scene stream's generator config from DATA/dataset.json, checked against the generator's own limits here,
// before any training (synthetic_scenes checks too, but only after the base data is loaded). Errors name the
// file.
SynthConfig scene_config(const Plan& p) {
  const std::string info = (fs::path(p.data) / "dataset.json").string();
  const json::Value root = json::parse_file(info);
  SynthConfig sc = synth_preset(p.preset);
  try {
    PSA_CHECK(root.is_object(), "expected an object at the top level");
    const json::Value& gen = root.at("config");
    sc.seed = gen.int_in("seed", 0, int64_t(1) << 53);  // `psa data --seed` range: exact in JSON
    sc.image_size = int(gen.int_in("image_size", 1, 1 << 20));  // the generator's own range is checked next
    check_synth_config(sc);
  } catch (const Error& e) {
    fail(info, ": ", e.what());
  }
  return sc;
}

// The CLIP stand-in (psa/vision_pretrain.h) on scenes of the dataset's own generator config, scored on the
// validation split.
void pretrain_vision_tower(PsaVlm& model, const Plan& p, const SynthConfig& sc, bool quiet, const Tokenizer& tok,
                           const PsaConfig& cfg, json::Value& report, std::vector<Series>& curves) {
  VisionPretrainOptions o;
  o.steps = p.vision_steps;
  o.batch = p.vision_batch;
  o.seed = p.seed;
  o.progress = !quiet;
  o.log_path = (fs::path(p.out) / "base" / "vision_log.jsonl").string();
  fs::path val = fs::path(p.data) / "val.jsonl";
  Dataset heldout;
  if (fs::exists(val)) heldout = load_split(val.string(), tok, cfg);
  VisionPretrainResult r = pretrain_vision(model, synthetic_scenes(sc, cfg.vision.image_size), heldout.size() ? &heldout : nullptr, o);
  std::printf("[vision] %ld steps in %.1f s on %ld generated scenes; held-out accuracy %s; on unseen scenes %s\n",
              (long)r.steps, r.seconds, (long)r.examples, json::dump(r.heldout).c_str(), json::dump(r.stream_heldout).c_str());
  json::Value j = json::Value::object();
  j.set("steps", r.steps);
  j.set("train_seconds", r.seconds);
  j.set("heldout_accuracy", r.heldout);
  j.set("unseen_scene_accuracy", r.stream_heldout);
  report.set("vision_pretrain", j);
  curves.push_back({"vision pretraining loss", {}, r.loss});
}

}  // namespace

int cmd_train(int argc, char** argv) {
  cli::Args a;
  if (!cli::parse(argc, argv,
                  {kTrainUsage,
                   {"--preset", "--data", "--out", "--stage", "--seed", "--batch", "--steps-vision", "--batch-vision", "--steps-base", "--steps-1", "--steps-2",
                    "--lr-base", "--lr-1", "--lr-2", "--warmup", "--vision-lr-scale", "--lora-rank", "--lora-alpha", "--lora-dropout", "--eval-limit",
                    "--save-every", "--max-bad-steps", "--device"},
                   {"--lora-lm-head", "--full-ft", "--eval", "--no-eval", "--quiet", "--resume", "--overwrite"}},
                  &a))
    return 0;
  PSA_CHECK(a.positional.empty(), "train: unexpected argument '", a.positional[0], "' (see --help)");
  Plan p;
  p.preset = a.get("--preset", "tiny");
  PsaConfig cfg = PsaConfig::from_preset(p.preset);
  p.data = a.get_path("--data", "data/" + p.preset);
  p.data_is_file = cli::lower_extension(p.data) == ".jsonl";
  PSA_CHECK(!p.data_is_file || fs::is_regular_file(p.data), "--data: ", p.data, " is not a readable file");
  p.out = a.get_path("--out", "runs/" + p.preset);
  p.seed = a.get_int("--seed", 42, 0, std::numeric_limits<int64_t>::max());
  p.batch = a.get_int("--batch", 16, 1, kMaxBatch);
  // More, smaller steps: on 2048 unseen scenes 4000 x 32 told flags from plain stripes in 74% of cases
  // against 60% for 2000 x 64, in the same time (4000 x 64 reached 89%, at twice the time).
  p.vision_steps = a.get_int("--steps-vision", p.preset == "tiny" ? 8000 : 1200, 0, kMaxSteps);
  p.vision_batch = a.get_int("--batch-vision", p.preset == "tiny" ? 32 : 64, 1, kMaxBatch);
  p.resume = a.has("--resume");
  p.overwrite = a.has("--overwrite");
  PSA_CHECK(!(p.resume && p.overwrite), "--resume and --overwrite: choose one (continue the run in ", p.out,
            ", or train its stages again)");
  const int64_t eval_limit = a.get_int("--eval-limit", 0, 0, kMaxEvalLimit);
  std::string which = a.get("--stage", "all");
  std::string dev = a.get("--device", "cpu");
  PSA_CHECK(dev == "cpu" || dev == "cuda", "--device: expected cpu or cuda, got '", dev, "'");
  Device device = dev == "cuda" ? Device::cuda : Device::cpu;
  PSA_CHECK(device == Device::cpu || gpu::available(), "train --device cuda: no usable GPU (", gpu::describe(), ")");
  PSA_CHECK(which == "all" || which == "base" || which == "1" || which == "2", "--stage: expected all, base, 1 or 2, got '", which, "'");
  const LoraSettings lora = lora_options(a, cfg);
  std::vector<StagePlan> todo = plan_stages(a, p, which, device, lora);
  PSA_CHECK(p.data_is_file || !cli::path_inside(p.out, p.data), "--out ", p.out, ": inside the dataset folder ",
            p.data, " given with --data (write runs elsewhere)");
  // A run folder holds only what psa train writes: --overwrite removes stage folders and predictions in it.
  PSA_CHECK(!cli::path_inside(p.data, p.out), "--data ", p.data, ": inside the run folder ", p.out,
            " given with --out (keep data outside it: --overwrite removes what the run wrote there)");
  const bool eval = a.has("--eval") || (which == "all" && !a.has("--no-eval"));
  // With one records file, the benchmark reads the test.jsonl beside it: that folder is the dataset's.
  const fs::path eval_data = p.data_is_file ? fs::absolute(p.data).parent_path() : fs::path(p.data);
  PSA_CHECK(!eval || !p.data_is_file || !cli::path_inside(p.out, eval_data.string()), "--out ", p.out,
            ": inside ", eval_data.string(), ", the folder of --data ", p.data, " that the benchmark reads (write "
            "runs elsewhere, or pass --no-eval)");
  // The preset's dimensions (a later stage's checkpoint has the same), before any folder is made.
  if (device == Device::cpu) check_batch_fits_memory("--batch", cfg, p.batch);
  std::error_code ec;
  RemoveIfOnlyLock cleanup{p.out, !fs::exists(p.out, ec)};
  cli::check_output_dir("--out", p.out);
  cli::lock_output_dir("--out", p.out);  // before its folders are read: a second run must not act on a moving state
  for (const char* f : {"report.json", "report.md", "loss_curves.png"})
    cli::check_output_file("--out " + p.out, (fs::path(p.out) / f).string());
  if (eval) cli::check_output_dir("--out " + p.out + ": predictions", (fs::path(p.out) / "predictions").string());
  if (int n = remove_stale_temps(p.out))
    std::printf("removed %d leftover(s) of a killed write in %s\n", n, p.out.c_str());
  check_stage_folders(p, todo);
  for (const StagePlan& s : todo) check_resume_options(s.o);
  fs::path report_path = fs::path(p.out) / "report.json";
  json::Value report = read_report(report_path.string());
  check_table_file((fs::path(p.out) / "report.md").string());

  // A stage that starts from the previous stage's checkpoint takes its model and the tokenizer stored with it
  // (not OUT/tokenizer.json, nor a new one): the token ids must be the ones that model was trained on.
  std::shared_ptr<PsaVlm> model;
  std::shared_ptr<Tokenizer> tok;
  if (todo.front().stage != "base") {
    Checkpoint c = load_checkpoint((fs::path(p.out) / todo.front().prev).string());
    PSA_CHECK(c.stage == todo.front().prev, c.dir, ": holds a ", c.stage, " checkpoint, but the ",
              todo.front().stage, " stage starts from a ", todo.front().prev, " one (a copied or mixed run folder)");
    model = c.model;
    tok = c.tokenizer;
    cfg = model->config;
    PSA_CHECK(lora.rank <= lora_max_rank(cfg), "--lora-rank: ", lora.rank, " is out of range [0, ",
              lora_max_rank(cfg), "] for the model in ", c.dir);
  }
  if (!p.data_is_file && !fs::exists(fs::path(p.data) / "train.jsonl")) {
    // Only a missing or empty folder is filled with the synthetic data: never write into someone's data folder.
    PSA_CHECK(!fs::exists(p.data) || fs::is_directory(p.data), "--data ", p.data, ": neither a dataset folder nor a .jsonl "
              "records file (a dataset folder holds train.jsonl; `psa data --out DIR` writes one)");
    PSA_CHECK(!fs::exists(fs::path(p.data) / "model.safetensors"), "--data ", p.data, ": a checkpoint folder, not a "
              "dataset folder (--data takes the folder `psa data --out DIR` wrote, or a .jsonl records file)");
    PSA_CHECK(!fs::exists(p.data) || fs::is_empty(p.data), p.data, ": no train.jsonl, and the folder is not empty",
              fs::exists(fs::path(p.data) / "images") ? " (a dataset whose generation was stopped half-way? remove it, "
                                                        "and psa train or psa data makes it again)"
                                                      : " (psa data --out DIR writes a dataset into a new folder)");
    std::printf("generating the %s dataset into %s\n", p.preset.c_str(), p.data.c_str());
    cli::fill_new_folder("--data", p.data, "a dataset is generated only into a missing or empty folder", [&] {
      return generate_dataset(synth_preset(p.preset), p.data,
                              [](int64_t done, int64_t total) { cli::print_progress("data", done, total, "images"); });
    });
  }
  // Every file the run will read, before any stage trains or --overwrite removes anything.
  for (const StagePlan& s : todo)
    PSA_CHECK(fs::is_regular_file(training_split(p, s.stage)), training_split(p, s.stage), ": no such file (the ",
              s.stage, " stage trains on it)");
  PSA_CHECK(!eval || p.data_is_file || fs::is_regular_file(eval_data / "test.jsonl"), (eval_data / "test.jsonl").string(),
            ": no such file (the benchmark after training reads it; pass --no-eval to train without it)");
  // Data that the generator did not make (no dataset.json) has no scene stream: no vision pretraining. A
  // resumed base stage takes every weight from its state: pretraining again would only be overwritten.
  const StagePlan& first = todo.front();
  const bool pretrain = first.stage == "base" && first.o.resume_from.empty() && p.vision_steps > 0;
  const bool has_info = !p.data_is_file && fs::exists(fs::path(p.data) / "dataset.json");
  SynthConfig scenes;
  if (pretrain && has_info) scenes = scene_config(p);
  if (pretrain && !has_info)
    std::printf("[vision] %s%s: no scene stream, vision pretraining skipped\n", p.data.c_str(),
                p.data_is_file ? " is one records file" : " has no dataset.json (not generated)");
  bool save_tokenizer = false;
  if (!tok) {
    tok = std::make_shared<Tokenizer>(tokenizer_for(p, cfg.text.vocab, &save_tokenizer));
    cfg.image_token = tok->image_id();
    cfg.pad_id = tok->pad_id();
    cfg.text.bos_id = tok->bos_id();
    cfg.text.eos_id = tok->eos_id();
  }
  report.set("config", cfg.to_json());
  std::vector<Series> curves;
  for (const StagePlan& s : todo) {
    const std::string& stage = s.stage;
    if (!model) {
      model = std::make_shared<PsaVlm>(cfg);
      model->initialize(p.seed);
    }
    // The stage's data is read and found usable before --overwrite removes the stages it replaces.
    Dataset data = load_split(training_split(p, stage), *tok, cfg);
    PSA_CHECK(data.size() > 0, training_split(p, stage), ": no usable training examples for the ", stage,
              " stage (every record was skipped, see above)");
    if (save_tokenizer) {
      fs::create_directories(p.out);
      tok->save((fs::path(p.out) / "tokenizer.json").string());
      save_tokenizer = false;
    }
    if (p.overwrite) remove_replaced_stages(p, s, report, report_path);
    fs::create_directories(s.dir);
    if (int n = remove_stale_temps(s.dir.string()))
      std::printf("[%s] removed %d leftover(s) of a killed write in %s\n", stage.c_str(), n, s.dir.c_str());
    if (!s.o.resume_from.empty()) std::printf("[%s] resuming from %s\n", stage.c_str(), s.o.resume_from.c_str());
    if (stage == "base" && pretrain && has_info)
      pretrain_vision_tower(*model, p, scenes, a.has("--quiet"), *tok, cfg, report, curves);
    StageOptions o = s.o;
    if (o.data_xxh64.empty()) o.data_xxh64 = records_hash(training_split(p, stage));  // generated since the plan
    o.tokenizer_xxh64 = vocabulary_hash(*tok);
    StageResult r = train_stage(*model, data, o);
    const std::string resumed =
        r.resumed_at == 0 ? "" : r.resumed_at == r.steps ? std::string(", all done before: nothing left to run")
                                                          : str_cat(", the last ", r.steps - r.resumed_at, " now");
    std::printf("[%s] %ld steps (%ld skipped%s)", stage.c_str(), (long)r.steps, (long)r.skipped, resumed.c_str());
    if (r.resumed_at < r.steps) std::printf(" in %.1f s (%.0f tokens/s)", r.seconds, r.tokens_per_second);
    std::printf(", loss %.4f -> %.4f\n", r.loss.empty() ? NAN : r.loss.front(), r.loss.empty() ? NAN : r.loss.back());
    save_checkpoint(s.dir.string(), *model, *tok, stage, stage == "stage2" ? lora : LoraSettings{});
    json::Value audit;
    const fs::path prev = fs::path(p.out) / s.prev;
    if (!s.prev.empty() && fs::exists(prev / "model.safetensors")) {
      audit = audit_checkpoints(prev.string(), s.dir.string());
      std::printf("[%s] audit against %s:\n", stage.c_str(), s.prev.c_str());
      for (const json::Value& g : audit.at("groups").as_array())
        std::printf("  %-24s %3ld tensors: %3ld changed, %3ld unchanged, %3ld added\n", g.at("group").as_string().c_str(),
                    (long)g.at("tensors").as_int(), (long)g.at("changed").as_int(), (long)g.at("unchanged").as_int(),
                    (long)g.at("added").as_int());
    }
    record_stage(report, stage, r, audit);
    curves.push_back({stage + " loss", {}, r.loss});
    if (!r.loss_level.empty()) curves.push_back({stage + " level CE", {}, r.loss_level});
    if (!r.loss_type.empty()) curves.push_back({stage + " type CE", {}, r.loss_type});
    json::write_file(report_path.string(), json::dump(report, 2) + "\n");
  }
  const bool any_loss = std::any_of(curves.begin(), curves.end(), [](const Series& c) { return !c.y.empty(); });
  if (any_loss) {  // a state from before the loss series were kept resumes without any
    PlotOptions po{"PSA-VLM training losses (" + p.preset + ")", "step", "loss", true, 900, 500, 10};
    plot_lines((fs::path(p.out) / "loss_curves.png").string(), curves, po);
  }
  if (eval && p.data_is_file && !fs::exists(eval_data / "test.jsonl")) {
    std::printf("no test.jsonl beside %s: benchmark skipped\n", p.data.c_str());
  } else if (eval) {
    std::vector<std::string> ckpts;
    for (const char* stage : kStages)
      if (fs::exists(fs::path(p.out) / stage / "model.safetensors")) ckpts.push_back((fs::path(p.out) / stage).string());
    std::vector<std::string> args = {"--data", eval_data.string(), "--out", report_path.string(), "--md",
                                     (fs::path(p.out) / "report.md").string(), "--limit", std::to_string(eval_limit),
                                     "--predictions", (fs::path(p.out) / "predictions").string()};
    if (a.has("--quiet")) args.push_back("--quiet");
    for (const std::string& c : ckpts) {
      args.push_back("--ckpt");
      args.push_back(c);
    }
    std::vector<char*> argv2;
    for (std::string& s : args) argv2.push_back(s.data());
    return cmd_eval((int)argv2.size(), argv2.data());
  }
  return 0;
}

}  // namespace psa
